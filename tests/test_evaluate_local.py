"""evaluate.iter_split and the Ray-free parts of prepare (read_meta, check_compatible, decode_batch)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unet_ray.layouts import MaskCoding
from unet_ray import evaluate, pairs, palette, prepare, prepared_format
from unet_ray.prepared_format import DataError, check_compatible, read_meta
from unet_ray.transforms import resize_pair

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def test_iter_split_pairs_folder_road(make_pairs_folder):
    root = make_pairs_folder(5, 3)
    batches = list(evaluate.iter_split(root, "train", "road", 64, batch_size=2))
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]
    for b in batches:
        assert b["image"].dtype == torch.uint8 and b["mask"].dtype == torch.uint8
        assert b["image"].shape[1:] == (64, 64, 3)
        assert b["mask"].shape[1:] == (64, 64)
        assert set(torch.unique(b["mask"]).tolist()) <= {0, 1}
    masks = torch.cat([b["mask"] for b in batches])
    assert masks.any() and not masks.all()  # road and rest both present

    val = list(evaluate.iter_split(root, "val", "road", 64, batch_size=32))
    assert len(val) == 1 and val[0]["image"].shape == (3, 64, 64, 3)


def test_iter_split_matches_read_pair(pairs_folder):
    (batch,) = evaluate.iter_split(pairs_folder, "val", "cityscapes19", 128)
    pair = pairs.read_pair(pairs_folder / "val" / "1.jpg")
    photo, ids = resize_pair(pair.photo, pair.train_ids, 128)
    assert np.array_equal(batch["image"][0].numpy(), photo)
    assert np.array_equal(batch["mask"][0].numpy(), ids)
    assert set(torch.unique(batch["mask"]).tolist()) <= set(range(19)) | {255}


def test_iter_split_bad_file_raises_naming_it(pairs_folder):
    bad = pairs_folder / "val" / "7.jpg"
    bad.write_text("oops")
    with pytest.raises(DataError) as info:
        list(evaluate.iter_split(pairs_folder, "val", "road", 64))
    assert "7.jpg" in str(info.value)
    assert "--skip-bad-files" in str(info.value)


def test_cli_evaluate_prints_strict_json_with_counts(pairs_folder, tmp_path, capsys):
    """19 classes on 2 synthetic pairs: most classes never occur, and their IoU is null in the
    output, not NaN (which jq and JSON.parse refuse). The pairs read and skipped are counted."""
    from unet_ray import checkpoint as ckpt_io
    from unet_ray.cli import main
    from unet_ray.config import TrainConfig
    from unet_ray.model import build_model

    cfg = TrainConfig.from_dict(
        {"data": {"image_size": 64, "classes": "cityscapes19"}, "model": {"depth": 2, "base_channels": 4}}
    ).validate()
    model = build_model(cfg.model, cfg.num_classes)
    ckpt_io.save_state(tmp_path / "ckpt", {"model": model.state_dict(), "epoch": 1, "config": cfg.to_dict(), "metrics": {}})
    (pairs_folder / "val" / "bad.jpg").write_text("oops")
    args = ["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(pairs_folder), "--skip-bad-files"]
    assert main(args) == 0

    def refuse(constant):
        raise ValueError(f"{constant} in the output")

    result = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert result["images"] == 2 and len(result["skipped_files"]) == 1 and "bad.jpg" in result["skipped_files"][0]
    per_class = result["val_iou_per_class"]
    assert len(per_class) == 19 and None in per_class.values()


def test_iter_split_skips_bad_file_when_asked(pairs_folder):
    (pairs_folder / "val" / "7.jpg").write_text("oops")
    (pairs_folder / "val" / "8.jpg").write_bytes(b"")
    skipped: list[str] = []
    batches = list(evaluate.iter_split(pairs_folder, "val", "road", 64, skipped=skipped))
    assert sum(b["image"].shape[0] for b in batches) == 2  # the two good files
    assert len(skipped) == 2
    assert any("7.jpg" in s for s in skipped) and any("8.jpg" in s and "empty" in s for s in skipped)


def test_iter_split_missing_folder_and_split(tmp_path):
    with pytest.raises(DataError, match="data folder .*/nothing does not exist"):
        list(evaluate.iter_split(tmp_path / "nothing", "val", "road", 64))
    (tmp_path / "pairs" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="/pairs/val does not exist"):
        list(evaluate.iter_split(tmp_path / "pairs", "val", "road", 64))


# --- prepared folders, written by hand (prepare itself needs Ray) ---------------------------


def _items(files, split: str) -> dict[str, np.ndarray]:
    """decode_batch's input columns for pair files."""
    column = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {"image": column([str(p) for p in files]), "mask": column([""] * len(files)),
            "name": column([pairs.uri_stem(p) for p in files]), "split": column([split] * len(files))}  # fmt: skip


def _write_prepared(folder, pairs_root, image_size=64, label_set="road", meta_overrides=None):
    counts = {}
    for split in pairs.SPLITS:
        files = pairs.list_pairs(pairs_root, split)
        batch = prepare.decode_batch(_items(files, split), image_size, label_set, MaskCoding("pairs"))
        assert all(e == "" for e in batch["error"])
        (folder / split).mkdir(parents=True)
        table = pa.table(
            {
                "id": list(batch["id"]),
                "split": list(batch["split"]),
                "image": pa.array(list(batch["image"]), type=pa.binary()),
                "mask": pa.array(list(batch["mask"]), type=pa.binary()),
            }
        )
        if split == "val":
            table = table.append_column("mask_native", pa.array(list(batch["mask_native"]), type=pa.binary()))
        pq.write_table(table, folder / split / "part-0.parquet")
        counts[split] = len(files)
    meta = {
        "format": prepared_format.FORMAT,
        "image_size": image_size,
        "classes": label_set,
        "class_names": palette.class_names(label_set),
        "counts": counts,
        "skipped": 0,
    }
    meta.update(meta_overrides or {})
    (folder / prepared_format.META_FILE).write_text(json.dumps(meta))
    return folder


def test_prepared_folder_gives_the_same_batches_as_the_pairs_folder(tmp_path, pairs_folder):
    prepared = _write_prepared(tmp_path / "prepared", pairs_folder)
    assert read_meta(prepared)["classes"] == "road"
    from_prepared = list(evaluate.iter_split(prepared, "val", "road", 64, batch_size=1))
    from_pairs = list(evaluate.iter_split(pairs_folder, "val", "road", 64, batch_size=1))
    assert len(from_prepared) == len(from_pairs) == 2
    for a, b in zip(from_prepared, from_pairs):
        assert a["image"].dtype == torch.uint8 and a["mask"].dtype == torch.uint8
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        # prepared val rows hold the native masks as one tensor; a data folder's are a list (sizes may differ)
        assert a["mask_native"].shape == (1, 256, 256) and torch.equal(a["mask_native"][0], b["mask_native"][0])


def test_prepared_folder_incompatible_run(tmp_path, pairs_folder):
    prepared = _write_prepared(tmp_path / "prepared", pairs_folder)
    with pytest.raises(DataError, match="image size 64"):
        list(evaluate.iter_split(prepared, "val", "road", 128))
    with pytest.raises(DataError, match="cityscapes19"):
        list(evaluate.iter_split(prepared, "val", "cityscapes19", 64))


def test_decode_batch_marks_bad_files(tmp_path, pairs_folder):
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    good = pairs_folder / "train" / "1.jpg"
    out = prepare.decode_batch(_items([good, bad], "train"), 64, "road", MaskCoding("pairs"))
    assert list(out["id"]) == ["1", "bad"]
    assert out["error"][0] == "" and "bad.jpg" in out["error"][1]
    assert len(out["image"][0]) == 64 * 64 * 3 and len(out["mask"][0]) == 64 * 64
    assert out["image"][1] == b"" and out["mask"][1] == b""


def test_read_meta_parquet_without_meta(tmp_path):
    folder = tmp_path / "someone-elses"
    (folder / "train").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2, 3]}), folder / "train" / "data.parquet")
    with pytest.raises(DataError) as info:
        read_meta(folder)
    assert "not written by `unet-ray prepare`" in str(info.value)
    assert str(folder) in str(info.value)


def test_read_meta_neither_kind(tmp_path):
    with pytest.raises(DataError, match="neither a pairs folder"):
        read_meta(tmp_path)


def test_read_meta_bad_json_and_format(tmp_path, pairs_folder):
    prepared = _write_prepared(tmp_path / "prepared", pairs_folder)
    (prepared / "meta.json").write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        read_meta(prepared)
    (prepared / "meta.json").write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(DataError, match="something/else"):
        read_meta(prepared)


def test_read_meta_incomplete(tmp_path, pairs_folder):
    prepared = _write_prepared(tmp_path / "prepared", pairs_folder)
    (prepared / "val" / "part-0.parquet").unlink()
    with pytest.raises(DataError, match="incomplete") as info:
        read_meta(prepared)
    assert str(prepared / "val") in str(info.value)


def test_check_compatible():
    meta = {"classes": "road", "image_size": 128}
    check_compatible(meta, "/data/prepared", "road", 128)  # no error
    with pytest.raises(DataError) as info:
        check_compatible(meta, "/data/prepared", "cityscapes19", 128)
    message = str(info.value)
    assert "'road'" in message and "'cityscapes19'" in message and "/data/prepared" in message
    with pytest.raises(DataError) as info:
        check_compatible(meta, "/data/prepared", "road", 64)
    message = str(info.value)
    assert "128" in message and "64" in message and "/data/prepared" in message


def test_looks_prepared(tmp_path, pairs_folder):
    assert not prepared_format.looks_prepared(pairs_folder)  # JPEG pairs only
    prepared = _write_prepared(tmp_path / "prepared", pairs_folder)
    assert prepared_format.looks_prepared(prepared)
    (prepared / "meta.json").unlink()
    assert prepared_format.looks_prepared(prepared)  # Parquet under train/, val/: read_meta explains what is wrong
    flat = tmp_path / "flat"
    flat.mkdir()
    pq.write_table(pa.table({"x": [1]}), flat / "a.parquet")
    assert prepared_format.looks_prepared(flat)
    assert not prepared_format.looks_prepared(tmp_path / "empty-dir-that-does-not-exist")
