"""Reading the prepared format back: rows of raw bytes -> uint8 arrays (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from unet_ray.prepared_format import DataError, prepared_arrays, read_prepared_split


def _rows(n: int, size: int, seed: int = 0, binary=pa.binary()):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    masks = rng.integers(0, 2, (n, size, size), dtype=np.uint8)
    table = pa.table(
        {
            "image": pa.array([im.tobytes() for im in images], type=binary),
            "mask": pa.array([m.tobytes() for m in masks], type=binary),
        }
    )
    return table, images, masks


@pytest.mark.parametrize("binary", [pa.binary(), pa.large_binary()])
def test_round_trip(binary):
    table, images, masks = _rows(3, 16, binary=binary)
    out = prepared_arrays(table, 16, "here")
    assert out["image"].dtype == np.uint8 and out["mask"].dtype == np.uint8
    assert not out["image"].flags.writeable and not out["mask"].flags.writeable  # views, not copies
    assert np.array_equal(out["image"], images)
    assert np.array_equal(out["mask"], masks)


def test_slices_and_several_files():
    """Record batches start at an offset into shared buffers; a table read from several files
    has several chunks. Both must give exactly their own rows."""
    first, images_a, masks_a = _rows(5, 8, seed=1)
    second, images_b, masks_b = _rows(4, 8, seed=2)
    both = pa.concat_tables([first, second])
    assert both.column("image").num_chunks == 2
    out = prepared_arrays(both, 8, "here")
    assert np.array_equal(out["image"], np.concatenate([images_a, images_b]))
    assert np.array_equal(out["mask"], np.concatenate([masks_a, masks_b]))
    batch = first.to_batches(max_chunksize=2)[1]  # rows 2 and 3
    assert batch.column("image").offset == 2
    out = prepared_arrays(batch, 8, "here")
    assert np.array_equal(out["image"], images_a[2:4])
    assert np.array_equal(out["mask"], masks_a[2:4])


def test_empty_split():
    table, _, _ = _rows(0, 8)
    out = prepared_arrays(table, 8, "here")
    assert out["image"].shape == (0, 8, 8, 3) and out["mask"].shape == (0, 8, 8)


def test_rows_of_another_size_are_a_clear_error():
    table, _, _ = _rows(2, 8)
    with pytest.raises(DataError, match=r"prep/train: image rows are not 16x16"):
        prepared_arrays(table, 16, "prep/train")


def test_read_prepared_split(tmp_path):
    import pyarrow.parquet as pq

    table, images, masks = _rows(3, 8)
    (tmp_path / "train").mkdir()
    pq.write_table(table, tmp_path / "train" / "part-0.parquet")
    out = read_prepared_split(tmp_path, "train", 8)
    assert np.array_equal(out["image"], images) and np.array_equal(out["mask"], masks)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "part-0.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"val: cannot read the prepared Parquet files"):
        read_prepared_split(tmp_path, "val", 8)


def test_a_lost_part_file_is_not_silently_fewer_rows(tmp_path):
    """meta.json records each split's row count; a split that reads fewer rows is refused."""
    import json

    import pyarrow.parquet as pq

    (tmp_path / "train").mkdir()
    for part in range(2):
        pq.write_table(_rows(3, 8, seed=part)[0], tmp_path / "train" / f"part-{part}.parquet")
    (tmp_path / "meta.json").write_text(json.dumps({"counts": {"train": 6, "val": 1}}))
    assert len(read_prepared_split(tmp_path, "train", 8)["image"]) == 6
    (tmp_path / "train" / "part-1.parquet").unlink()
    with pytest.raises(DataError, match=r"train holds 3 rows but .*meta.json records 6: part files are missing"):
        read_prepared_split(tmp_path, "train", 8)


def test_prepare_from_a_bucket_into_a_bucket_writes_what_a_local_prepare_writes(s3_env, tmp_path):
    """`unet-ray prepare --src s3://... --out s3://...` (few files: decoded in this process, no Ray):
    the same rows, meta and class pixel counts as a local prepare of the same files; train rows in
    part files of whole row groups; a missing source is one line naming the URI."""
    import json

    from unet_ray import pairs, storage
    from unet_ray.prepare import ROW_GROUP_ROWS, prepare

    s3_env.make_bucket("prep")
    pairs.write_synthetic(tmp_path / "pairs", 40, 8, seed=3)
    storage.upload(tmp_path / "pairs", "s3://prep/pairs")
    local = prepare(tmp_path / "pairs", tmp_path / "prepared", 32, "road", progress=lambda _: None)
    remote = prepare("s3://prep/pairs", "s3://prep/prepared", 32, "road", progress=lambda _: None)
    assert json.loads(storage.read_text("s3://prep/prepared/meta.json")) == remote
    for key in ("counts", "class_pixels", "bytes", "image_size", "format"):
        assert remote[key] == local[key], key
    for split in ("train", "val"):
        here, there = read_prepared_split(tmp_path / "prepared", split, 32), read_prepared_split("s3://prep/prepared", split, 32)
        assert all(np.array_equal(here[k], there[k]) for k in here), split
    import pyarrow.parquet as pq

    part = pq.ParquetFile(tmp_path / "prepared" / "train" / "part-00000.parquet")
    assert part.metadata.row_group(0).num_rows == min(ROW_GROUP_ROWS, local["counts"]["train"])
    with pytest.raises(DataError, match=r"s3://prep/nothing is in none of the data layouts"):
        prepare("s3://prep/nothing", "s3://prep/out", 32, "road", progress=lambda _: None)


@pytest.mark.parametrize("layout", ["cityscapes", "folders"])
def test_a_layout_in_a_bucket_prepares_as_it_does_on_disk(s3_env, tmp_path, layout):
    """The official Cityscapes layout and an images/ + masks/ folder, listed and read from object
    storage: the same items, rows and classes as from a local copy (unpaired files named by URI)."""
    import json

    from layout_trees import write_cityscapes_tree, write_folders_tree

    from unet_ray import storage
    from unet_ray.prepare import prepare

    bucket = s3_env.make_bucket(f"lay-{layout}")
    if layout == "cityscapes":
        root = write_cityscapes_tree(tmp_path / "data", per_city=1, size=(64, 128))
    else:
        root = write_folders_tree(tmp_path / "data", n_train=3, n_val=2, size=(48, 64), masks="rgb", split_folders=False)
    storage.upload(root, f"{bucket}/data")
    local = prepare(root, tmp_path / "prepared", "32x64", progress=lambda _: None)
    remote = prepare(f"{bucket}/data", f"{bucket}/prepared", "32x64", progress=lambda _: None)
    assert json.loads(storage.read_text(f"{bucket}/prepared/meta.json")) == remote
    for key in ("layout", "classes", "class_names", "class_colors", "counts", "class_pixels", "image_size"):
        assert remote[key] == local[key], key
    for split in ("train", "val"):
        here, there = read_prepared_split(tmp_path / "prepared", split, "32x64"), read_prepared_split(f"{bucket}/prepared", split, "32x64")
        assert all(np.array_equal(here[k], there[k]) for k in here), split
    # an image whose mask is missing is named by its URI
    missing = next(p for p in storage.list_files(f"{bucket}/data", ".png") if "gtFine" in p or "/masks/" in p)
    storage.resolve(missing)[0].delete_file(storage.resolve(missing)[1])
    with pytest.raises(DataError, match=rf"{bucket}/data/.*: no mask \(expected {bucket}/data/"):
        prepare(f"{bucket}/data", f"{bucket}/prepared2", "32x64", progress=lambda _: None)
