"""Data layouts (unet_ray/layouts.py) and what is built on them, all without Ray: detection,
listing and reading of the pairs / cityscapes / folders layouts, classes.yaml, prepare in process,
the checks `train` makes before Ray starts, and the metric against cityscapesscripts' own
evaluation on the same predictions."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from layout_trees import cityscapes_reference_miou, train_ids_to_label_ids, write_cityscapes_tree, write_folders_tree
from PIL import Image

from unet_ray import checkpoint as ckpt_io
from unet_ray import layouts, palette, predict
from unet_ray.config import TrainConfig
from unet_ray.evaluate import evaluate_checkpoint
from unet_ray.model import build_model
from unet_ray.pairs import BadPairError
from unet_ray.prepare import prepare
from unet_ray.prepared_format import DataError, read_prepared_split

# A custom class set with colours far apart: what the folders trees of the class-display tests use.
CUSTOM_NAMES = ("background", "road", "car")
CUSTOM_COLORS = ((0, 0, 0), (255, 0, 0), (0, 0, 255))
CS_SMALL = (32, 64)  # height, width of the Cityscapes trees that only test listing and reading


# --- helpers -----------------------------------------------------------------------------------


def _read_png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img).copy()


def _save_png(array: np.ndarray, path) -> None:
    Image.fromarray(array).save(path)


def _cs_tree(tmp_path, name="cs", **kwargs) -> Path:
    return write_cityscapes_tree(tmp_path / name, size=kwargs.pop("size", CS_SMALL), **kwargs)


def _cs_gt(root: Path, split: str, city: str, i: int, suffix: str = "_gtFine_labelIds.png") -> Path:
    return root / "gtFine" / split / city / f"{city}_000000_{i:06d}{suffix}"


def _cs_image(root: Path, split: str, city: str, i: int) -> Path:
    return root / "leftImg8bit" / split / city / f"{city}_000000_{i:06d}_leftImg8bit.png"


def _item_named(layout: layouts.Layout, split: str, name: str) -> layouts.Item:
    (item,) = [i for i in layout.items(split)[0] if i.name == name]
    return item


def _official_train_ids() -> np.ndarray:
    """label id -> train id by cityscapesscripts' own table (255 for ignored labels and for ids
    the table does not have), independent of palette.LABELS."""
    from cityscapesscripts.helpers.labels import id2label

    lut = np.full(256, 255, np.uint8)
    for label_id, label in id2label.items():
        if 0 <= label_id < 256 and 0 <= label.trainId < 255:
            lut[label_id] = label.trainId
    return lut


def _write_classes_yaml(root: Path, text: str) -> None:
    (root / "classes.yaml").write_text(text)


def _custom_tree(root: Path, names=CUSTOM_NAMES, **kwargs) -> Path:
    return write_folders_tree(root, classes=names, colors=CUSTOM_COLORS, **kwargs)


def _save_checkpoint(folder: Path, data: dict, seed: int = 0, train_epochs: int = 0) -> Path:
    """A depth-2 checkpoint for `data` (a data section). Untrained, its head is redrawn wider: a
    fresh head predicts one class nearly everywhere. With `train_epochs`, it is fitted to both
    splits of data["path"] instead (a second or two), so that its IoUs are far from 0 and from 1
    and a comparison of metrics means something."""
    from unet_ray import engine
    from unet_ray.evaluate import iter_split

    cfg = TrainConfig.from_dict({"data": data, "model": {"depth": 2, "base_channels": 8}}).validate()
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.num_classes)
    if train_epochs:
        batches = [b for split in ("train", "val") for b in iter_split(data["path"], split, cfg.data.classes, cfg.data.image_size, 8)]
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(train_epochs):
            engine.train_one_epoch(model, batches, optimizer, torch.device("cpu"))
    else:
        with torch.no_grad():
            model.head.weight.normal_(0, 1)
            model.head.bias.zero_()
    ckpt_io.save_state(folder, {"model": model.state_dict(), "epoch": 1, "config": cfg.to_dict(), "metrics": {}})
    return folder


def _predict_items(state_file: Path, out: Path, items: list[dict]) -> dict:
    """Predictor (the Ray Data actor class) called directly on one batch of list_inputs items."""
    out.mkdir(parents=True, exist_ok=True)
    batch = {key: np.array([item[key] for item in items], dtype=object) for key in items[0]}
    rows = predict.Predictor(str(state_file), str(out), False, False, "cpu", 1)(batch)
    assert list(rows["status"]) == ["ok"] * len(items), list(rows["error"])
    return rows


def _quiet(*_args) -> None:
    pass


# --- 1. detection --------------------------------------------------------------------------------


def test_each_layout_is_detected(tmp_path, make_pairs_folder):
    cs = layouts.detect(_cs_tree(tmp_path))
    assert cs.kind == "cityscapes" and cs.classes.label_set == "cityscapes19" and cs.coding.num_classes == 19

    split = layouts.detect(write_folders_tree(tmp_path / "split", n_train=2, n_val=1))
    single = layouts.detect(write_folders_tree(tmp_path / "single", n_train=2, n_val=1, split_folders=False))
    for found in (split, single):
        assert found.kind == "folders"
        assert found.classes.names == ("background", "road", "car") and found.coding.num_classes == 3
    assert [len(single.items(s)[0]) for s in ("train", "val")] == [2, 1]  # one images/ + masks/, split

    pairs = layouts.detect(make_pairs_folder(2, 1))
    assert pairs.kind == "pairs" and pairs.classes is None
    assert [i.name for i in pairs.items("val")[0]] == ["1"] and pairs.items("val")[0][0].mask is None


def test_forced_layout_that_does_not_fit_says_what_it_needs(tmp_path, make_pairs_folder):
    cs_root, pairs_root = _cs_tree(tmp_path), make_pairs_folder(1, 1)
    with pytest.raises(DataError, match=r"not in the cityscapes layout: it needs leftImg8bit/ and gtFine/"):
        layouts.detect(pairs_root, "cityscapes")
    with pytest.raises(DataError, match=re.escape("not in the folders layout: it needs train/images/ + train/masks/")):
        layouts.detect(cs_root, "folders")
    with pytest.raises(DataError, match=r"not in the pairs layout: it needs train/ and val/"):
        layouts.detect(cs_root, "pairs")
    with pytest.raises(DataError, match=r"--layout squares: choose one of auto, pairs, cityscapes, folders"):
        layouts.detect(cs_root, "squares")
    assert layouts.detect(cs_root, "cityscapes").kind == "cityscapes"  # forcing the right one works


def test_empty_folder_is_in_no_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty is in none of the data layouts \(cityscapes: .*folders: .*pairs: "):
        layouts.detect(tmp_path / "empty")


# --- 2. cityscapes -------------------------------------------------------------------------------


def test_cityscapes_items_pair_images_with_masks_by_city_and_key(tmp_path):
    root = _cs_tree(tmp_path)
    found = layouts.detect(root)
    for split in ("train", "val"):
        items, problems = found.items(split)
        assert problems == []
        assert [i.name for i in items] == [f"{c}/{c}_000000_{i:06d}" for c in ("aachen", "bochum") for i in range(2)]
        for item in items:
            city, key = item.name.split("/")
            assert item.image == str(root / "leftImg8bit" / split / city / f"{key}_leftImg8bit.png")
            assert item.mask == str(root / "gtFine" / split / city / f"{key}_gtFine_labelIds.png")


def test_cityscapes_label_ids_map_to_train_ids_as_the_official_table(tmp_path):
    root = _cs_tree(tmp_path)
    found = layouts.detect(root)
    official = _official_train_ids()
    items = found.items("train")[0] + found.items("val")[0]
    for item in items:  # the generated masks (roads, cars, void pixels, ...)
        photo, ids = layouts.read_item(item, found.coding)
        assert photo.shape == (*CS_SMALL, 3) and ids.dtype == np.uint8
        np.testing.assert_array_equal(ids, official[_read_png(item.mask)])
    # and every label id of the table, 0..33, in one mask (the generated scenes use only a few)
    every_id = np.resize(np.arange(34, dtype=np.uint8), CS_SMALL)
    _save_png(every_id, items[0].mask)
    np.testing.assert_array_equal(layouts.read_item(items[0], found.coding)[1], official[every_id])
    assert set(np.unique(official[every_id]).tolist()) == set(range(19)) | {255}


def test_cityscapes_label_train_ids_files_are_preferred(tmp_path):
    root = _cs_tree(tmp_path, train_ids=True)
    found = layouts.detect(root)
    item = _item_named(found, "val", "aachen/aachen_000000_000001")
    assert item.mask == str(_cs_gt(root, "val", "aachen", 1, "_gtFine_labelTrainIds.png"))
    # changed train ids (and labelIds left alone) show that read_item reads the labelTrainIds file
    changed = _read_png(item.mask)
    changed[: CS_SMALL[0] // 2] = 5
    _save_png(changed, item.mask)
    np.testing.assert_array_equal(layouts.read_item(item, found.coding)[1], changed)
    # a train id that is no class there is refused like a bad label id
    changed[0, 0] = 19
    _save_png(changed, item.mask)
    with pytest.raises(BadPairError, match=r"labelTrainIds\.png: train ids 19 are neither 0-18 nor 255"):
        layouts.read_item(item, found.coding)


def test_cityscapes_unpaired_files_are_reported(tmp_path):
    root = _cs_tree(tmp_path)
    _cs_gt(root, "val", "aachen", 0).unlink()  # an image without its mask
    orphan = _cs_gt(root, "train", "bochum", 9)  # a mask without its image
    shutil.copy(_cs_gt(root, "train", "bochum", 0), orphan)
    found = layouts.detect(root)

    val_items, val_problems = found.items("val")
    assert len(val_items) == 3
    assert len(val_problems) == 1 and val_problems[0].startswith(f"{_cs_image(root, 'val', 'aachen', 0)}: no mask")
    train_problems = found.items("train")[1]
    assert len(train_problems) == 1 and train_problems[0].startswith(f"{orphan}: no image")

    with pytest.raises(DataError, match=r"2 files in .* \(cityscapes layout\) have no partner") as info:
        found.check_paired(False)
    assert "aachen_000000_000000_leftImg8bit.png: no mask" in str(info.value)
    assert "bochum_000000_000009_gtFine_labelIds.png: no image" in str(info.value)
    assert "--skip-bad-files" in str(info.value)
    assert sorted(found.check_paired(True)) == sorted(train_problems + val_problems)


def _bad_cityscapes_masks() -> list[tuple[str, callable, str]]:
    """(what, make the bad mask from the good label ids, what the error says)."""
    h, w = CS_SMALL
    return [
        ("colour mask", lambda ids: np.stack([ids] * 3, axis=-1), r"an RGB mask where single-channel Cityscapes label ids"),
        ("16-bit mask", lambda ids: ids.astype(np.uint16) * 2, r"a 16-bit or float mask"),
        ("id 40", lambda ids: np.where(np.arange(w) < 3, np.uint8(40), ids).astype(np.uint8), r"label ids 40 are not in the Cityscapes label table"),
        ("smaller mask", lambda ids: ids[: h // 2, : w // 2].copy(), rf"mask is {w // 2}x{h // 2} \(width x height\) but its image .* is {w}x{h}"),
    ]  # fmt: skip


@pytest.mark.parametrize("what, make_bad, message", _bad_cityscapes_masks(), ids=[b[0] for b in _bad_cityscapes_masks()])
def test_cityscapes_bad_mask_names_the_file(tmp_path, what, make_bad, message):
    root = _cs_tree(tmp_path)
    found = layouts.detect(root)
    item = _item_named(found, "val", "bochum/bochum_000000_000001")
    bad = make_bad(_read_png(item.mask))
    _save_png(bad, item.mask)
    if what == "16-bit mask":  # PIL writes uint16 as a 16-bit PNG: make sure the test writes what it says
        with Image.open(item.mask) as img:
            assert img.mode in ("I;16", "I")
    with pytest.raises(BadPairError, match=message) as info:
        layouts.read_item(item, found.coding)
    assert str(info.value).startswith(item.mask)


def test_cityscapes_empty_split_names_the_folder(tmp_path):
    root = _cs_tree(tmp_path)
    shutil.rmtree(root / "leftImg8bit" / "val")
    found = layouts.detect(root)
    assert len(found.items("train")[0]) == 4
    with pytest.raises(DataError, match=re.escape(f"{root / 'leftImg8bit' / 'val'} holds no *_leftImg8bit.png files (the val split is empty)")):
        found.items("val")


# --- 3. folders ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction, n_val", [(0.04, 1), (0.2, 2), (0.27, 3), (0.66, 7)])
def test_val_fraction_split_is_deterministic_disjoint_and_complete(tmp_path, fraction, n_val):
    root = write_folders_tree(tmp_path / "one", n_train=8, n_val=2, size=(16, 16), split_folders=False)
    found = layouts.detect(root, val_fraction=fraction)
    train, val = ([i.name for i in found.items(s)[0]] for s in ("train", "val"))
    assert len(val) == n_val == max(1, round(10 * fraction))
    assert not set(train) & set(val) and sorted(train + val) == [f"img_{i:03d}" for i in range(10)]
    again = layouts.detect(root, val_fraction=fraction)  # a new listing: the same split
    assert [i.name for i in again.items("val")[0]] == val and [i.name for i in again.items("train")[0]] == train


def test_one_images_folder_is_listed_once_for_both_splits(tmp_path, monkeypatch):
    """Listing a bucket of thousands of files costs seconds: train and val of one images/ + masks/
    come from one listing; and a data folder listed by the caller is not listed again by prepare."""
    root = write_folders_tree(tmp_path / "one", n_train=4, n_val=1, size=(16, 16), split_folders=False)
    calls = []
    real_match = layouts._match
    monkeypatch.setattr(layouts, "_match", lambda *args: calls.append(args) or real_match(*args))
    found = layouts.detect(root)
    assert len(found.items("train")[0]) + len(found.items("val")[0]) == 5 and len(calls) == 1
    prepare(root, tmp_path / "prepared", 16, progress=lambda _: None, found=found)
    assert len(calls) == 1


def test_rgb_masks_map_through_classes_yaml_colours(tmp_path):
    # The same scenes written as class ids and as classes.yaml colours read as the same ids (the
    # ids tree also has an ignored corner, which RGB masks cannot express).
    ids_tree = write_folders_tree(tmp_path / "ids", n_train=2, n_val=1, masks="ids")
    rgb_tree = write_folders_tree(tmp_path / "rgb", n_train=2, n_val=1, masks="rgb")
    by_ids, by_rgb = layouts.detect(ids_tree), layouts.detect(rgb_tree)
    assert by_rgb.coding.colors == ((0, 0, 0), (128, 64, 128), (0, 0, 142))
    for a, b in zip(by_ids.items("train")[0], by_rgb.items("train")[0]):
        ids, from_rgb = layouts.read_item(a, by_ids.coding)[1], layouts.read_item(b, by_rgb.coding)[1]
        assert np.array_equal(ids[3:], from_rgb[3:]) and (ids[:3, :3] == 255).all()
        assert set(np.unique(from_rgb).tolist()) == {0, 1, 2}  # all three colours, mapped


def test_unknown_colour_names_the_file_and_the_colour(tmp_path):
    found = layouts.detect(write_folders_tree(tmp_path / "rgb", n_train=1, n_val=1, masks="rgb"))
    item = found.items("val")[0][0]
    mask = _read_png(item.mask)
    mask[5:7, 5:8] = (1, 2, 3)
    _save_png(mask, item.mask)
    with pytest.raises(BadPairError, match=r"colours that are no class in classes\.yaml: \(1, 2, 3\) \(6 px\)") as info:
        layouts.read_item(item, found.coding)
    assert str(info.value).startswith(item.mask)


def test_class_ids_outside_the_classes_are_named(tmp_path):
    found = layouts.detect(write_folders_tree(tmp_path / "ids", n_train=1, n_val=1))
    item = found.items("val")[0][0]
    mask = _read_png(item.mask)
    mask[10, 10], mask[11, 11] = 3, 7  # 3 classes: ids 3 and 7 are none of them, 255 is ignored
    _save_png(mask, item.mask)
    with pytest.raises(BadPairError, match=r"class ids 3, 7 are neither classes of classes\.yaml \(0-2\) nor its ignore_index 255") as info:
        layouts.read_item(item, found.coding)
    assert str(info.value).startswith(item.mask)


def test_custom_ignore_index_is_stored_as_255(tmp_path):
    root = write_folders_tree(tmp_path / "ids", n_train=1, n_val=1, ignore_index=99)
    assert "ignore_index: 99" in (root / "classes.yaml").read_text()
    found = layouts.detect(root)
    assert found.coding.ignore_index == 99
    item = found.items("val")[0][0]
    raw = _read_png(item.mask)
    assert (raw[:3, :3] == 99).all()
    ids = layouts.read_item(item, found.coding)[1]
    assert (ids[:3, :3] == 255).all() and not (ids == 99).any()
    assert np.array_equal(ids[3:], raw[3:])  # the class ids themselves are as written


GOOD_YAML = "classes:\n  - {name: a, color: [0, 0, 0]}\n  - {name: b, color: [255, 0, 0]}\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (None, r"classes\.yaml is missing"),
        ("classes:\n  - {name: a, color: [0, 0, 0]}\n", r"classes\.yaml: needs a list `classes:` of 2 or more classes"),
        ("classes: [a, a]\n", r"classes\.yaml: class names must differ \(a, a\)"),
        ("classes:\n  - {name: a, color: [0, 0, 0]}\n  - {name: b, color: [300, 0, 0]}\n", r"classes\.yaml: class 1 \(b\): colour \[300, 0, 0\]"),
        (GOOD_YAML + "colour_map: x\n", r"classes\.yaml: unknown keys colour_map"),
        (GOOD_YAML + "ignore_index: 1\n", r"classes\.yaml: ignore_index=1 must be an id from 2 to 255"),
        (GOOD_YAML + "ignore_index: 256\n", r"classes\.yaml: ignore_index=256 must be an id from 2 to 255"),
        ("classes:\n  - {name: a, color: [0, 0, 0]}\n  - b\n", r"classes\.yaml: give a colour to every class or to none"),
        ("classes: [a, b\n", r"classes\.yaml: not valid YAML"),
    ],
    ids=["missing", "one class", "duplicate names", "bad colour", "unknown key", "ignore is a class", "ignore above 255",
         "some colours", "bad yaml"],
)  # fmt: skip
def test_classes_yaml_problems_name_the_file(tmp_path, text, message):
    root = write_folders_tree(tmp_path / "f", n_train=1, n_val=1, size=(16, 16))
    if text is None:
        (root / "classes.yaml").unlink()
    else:
        _write_classes_yaml(root, text)
    with pytest.raises(DataError, match=message) as info:
        layouts.detect(root)
    assert str(root / "classes.yaml") in str(info.value)


def test_names_only_classes_get_colours_but_refuse_rgb_masks(tmp_path):
    root = write_folders_tree(tmp_path / "f", n_train=1, n_val=1, masks="rgb")
    _write_classes_yaml(root, "classes: [background, road, car]\n")
    found = layouts.detect(root)
    assert found.classes.names == ("background", "road", "car")
    assert found.classes.colors == palette.DEFAULT_COLORS[:3] and len(set(found.classes.colors)) == 3
    assert found.coding.colors == ()  # nothing to map RGB masks through
    item = found.items("val")[0][0]
    with pytest.raises(BadPairError, match=r"an RGB mask where single-channel class ids \(classes\.yaml gives no colours") as info:
        layouts.read_item(item, found.coding)
    assert str(info.value).startswith(item.mask)
    # class-id masks are fine with names only
    _save_png(np.ones(_read_png(item.mask).shape[:2], np.uint8), item.mask)
    assert (layouts.read_item(item, found.coding)[1] == 1).all()


@pytest.mark.parametrize("split_folders", [True, False], ids=["split folders", "one folder"])
def test_folders_unpaired_files_are_reported(tmp_path, split_folders):
    root = write_folders_tree(tmp_path / "f", n_train=3, n_val=1, size=(16, 16), split_folders=split_folders)
    base = root / "train" if split_folders else root
    (base / "masks" / "img_001.png").unlink()  # an image without its mask
    shutil.copy(base / "masks" / "img_000.png", base / "masks" / "img_099.png")  # a mask without its image
    found = layouts.detect(root)
    problems = found.items("train")[1]
    assert len(problems) == 2
    assert problems[0].startswith(f"{base / 'images' / 'img_001.jpg'}: no mask (expected {base / 'masks' / 'img_001.png'})")
    assert problems[1].startswith(f"{base / 'masks' / 'img_099.png'}: no image")
    assert "img_001" not in [i.name for s in ("train", "val") for i in found.items(s)[0]]
    with pytest.raises(DataError, match=r"2 files in .* \(folders layout\) have no partner"):
        found.check_paired(False)


# --- 4. prepare, in process ----------------------------------------------------------------------


def _prepare(src, out, **kwargs) -> dict:
    return prepare(src, out, "48x96", progress=_quiet, **kwargs)


def _layout_sources(tmp_path, make_pairs_folder):
    """(src, expected layout, classes, class names, native_size, train rows, val rows) per layout."""
    return [
        (make_pairs_folder(3, 2), "pairs", "road", ["rest", "road"], 256, 3, 2),
        (_cs_tree(tmp_path), "cityscapes", "cityscapes19", list(palette.class_names("cityscapes19")), None, 4, 4),
        (_custom_tree(tmp_path / "folders", n_train=3, n_val=2, size=(40, 56)), "folders", "custom", list(CUSTOM_NAMES), None, 3, 2),
    ]


def test_prepare_each_layout_at_a_non_square_size(tmp_path, make_pairs_folder):
    for src, kind, classes, names, native, n_train, n_val in _layout_sources(tmp_path, make_pairs_folder):
        out = tmp_path / f"prepared_{kind}"
        meta = _prepare(src, out)
        assert (meta["layout"], meta["classes"], meta["image_size"], meta["native_size"]) == (kind, classes, "48x96", native)
        assert meta["class_names"] == names and meta["counts"] == {"train": n_train, "val": n_val}
        assert json.loads((out / "meta.json").read_text()) == meta and meta["skipped"] == 0
        if kind == "folders":  # the colours of classes.yaml travel with the data
            assert meta["class_colors"] == ["#000000", "#ff0000", "#0000ff"]
        for split, n in (("train", n_train), ("val", n_val)):
            arrays = read_prepared_split(out, split, "48x96")
            assert arrays["image"].shape == (n, 48, 96, 3) and arrays["mask"].shape == (n, 48, 96)
            assert set(np.unique(arrays["mask"]).tolist()) <= set(range(len(names))) | {255}
            has_native = "mask_native" in arrays
            assert has_native == (kind == "pairs" and split == "val")
            if has_native:
                assert arrays["mask_native"].shape == (n, 256, 256)


def _no_output(out: Path) -> bool:
    """Neither the output nor prepare's temporary folder beside it."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def _stops_then_skips(root: Path, out: Path, message: str, counts: dict[str, int]) -> str:
    """prepare of `root` with one bad file: stops with `message` and writes nothing; with
    --skip-bad-files, writes `counts` rows and lists that one file in skipped.txt (its line)."""
    with pytest.raises(DataError, match=message):
        _prepare(root, out)
    assert _no_output(out)
    meta = _prepare(root, out, skip_bad_files=True)
    assert meta["skipped"] == 1 and meta["counts"] == counts
    [skipped] = (out / "skipped.txt").read_text().splitlines()
    named = skipped.split(": ", 1)[0]
    assert skipped.count(named) == 1, skipped  # "path: reason", the path once
    return skipped


def test_prepare_unpaired_image_stops_or_is_skipped(tmp_path):
    root = _custom_tree(tmp_path / "f", n_train=3, n_val=2, size=(40, 56))
    lonely = root / "train" / "images" / "img_001.jpg"
    (root / "train" / "masks" / "img_001.png").unlink()
    skipped = _stops_then_skips(root, tmp_path / "prepared", r"have no partner:\n  .*img_001\.jpg: no mask", {"train": 2, "val": 2})
    assert skipped.startswith(str(lonely)) and "no mask" in skipped


def test_prepare_bad_mask_stops_or_is_skipped(tmp_path):
    root = _cs_tree(tmp_path)
    bad = _cs_gt(root, "val", "bochum", 0)
    _save_png(np.full(CS_SMALL, 40, np.uint8), bad)  # 40: no Cityscapes label id
    message = r"1 of 8 files in .* cannot be used:\n  .*bochum_000000_000000_gtFine_labelIds\.png: label ids 40"
    skipped = _stops_then_skips(root, tmp_path / "prepared", message, {"train": 4, "val": 3})
    assert str(bad) in skipped and "label ids 40" in skipped


# --- 5. before Ray -------------------------------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch):
    """main() sets the console's environment variables for Ray; give them back after the test."""
    from unet_ray import console

    for key in (console.VERBOSE_ENV, *console.QUIET_ENV):
        monkeypatch.delenv(key, raising=False)


def _train_fails_before_ray(data: Path, tmp_path, capsys, *flags: str) -> str:
    from unet_ray.cli import main

    argv = ["train", "--data", str(data), "--storage-path", str(tmp_path / "runs"), "--name", "x", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("unet-ray train: error: "), err
    assert not (tmp_path / "runs" / "x").exists()  # not even a run folder
    return err


def test_train_unpaired_image_stops_before_ray(tmp_path, capsys, cli_env, ray_must_not_start):
    root = _custom_tree(tmp_path / "f", n_train=3, n_val=1, size=(32, 32))
    (root / "train" / "masks" / "img_002.png").unlink()
    err = _train_fails_before_ray(root, tmp_path, capsys)
    assert f"{root / 'train' / 'images' / 'img_002.jpg'}: no mask" in err and "--skip-bad-files" in err


def test_train_classes_that_do_not_fit_the_layout_stop_before_ray(tmp_path, capsys, cli_env, ray_must_not_start):
    root = _custom_tree(tmp_path / "f", n_train=2, n_val=1, size=(32, 32))
    err = _train_fails_before_ray(root, tmp_path, capsys, "--classes", "cityscapes19")
    assert "--classes cityscapes19 does not fit" in err and "(folders layout)" in err and "classes.yaml" in err


def test_train_image_size_not_a_multiple_of_depth_stops_before_ray(tmp_path, capsys, cli_env, ray_must_not_start):
    root = _custom_tree(tmp_path / "f", n_train=2, n_val=1, size=(32, 32))
    err = _train_fails_before_ray(root, tmp_path, capsys, "--image-size", "48x97", "--depth", "4")
    assert "model.depth=4 is too deep for data.image_size=48x97" in err and "multiple of 2**depth=16" in err


def test_check_source_resolves_a_folders_layout(tmp_path, ray_must_not_start):
    from unet_ray.data import check_source

    root = _custom_tree(tmp_path / "f", n_train=2, n_val=1, size=(32, 32))
    cfg = TrainConfig.from_dict({"data": {"path": str(root), "image_size": 32}}).validate()
    assert (cfg.data.layout, cfg.data.classes) == ("auto", "auto")
    check_source(cfg)
    assert (cfg.data.layout, cfg.data.classes) == ("folders", "custom")
    assert cfg.data.class_names == list(CUSTOM_NAMES)
    assert cfg.data.class_colors == ["#000000", "#ff0000", "#0000ff"]
    assert cfg.class_set == palette.class_set("custom", CUSTOM_NAMES, CUSTOM_COLORS)
    cfg.validate()  # what check_source filled in is a valid custom config


def test_check_source_takes_the_classes_of_a_prepared_folder(tmp_path, ray_must_not_start):
    """--data a prepared folder: the classes (names and colours of a custom set) come from its
    meta.json; a custom meta.json without colours is refused naming the folder."""
    from unet_ray.data import check_source

    root = _custom_tree(tmp_path / "f", n_train=2, n_val=1, size=(32, 32))
    prepared = tmp_path / "prepared"
    prepare(root, prepared, 32, progress=lambda _: None)
    cfg = TrainConfig.from_dict({"data": {"path": str(prepared), "image_size": 32}}).validate()
    check_source(cfg)
    assert (cfg.data.layout, cfg.data.classes, cfg.data.class_names) == ("folders", "custom", list(CUSTOM_NAMES))
    assert cfg.class_set == palette.class_set("custom", CUSTOM_NAMES, CUSTOM_COLORS)
    meta = json.loads((prepared / "meta.json").read_text())
    del meta["class_colors"]
    (prepared / "meta.json").write_text(json.dumps(meta))
    cfg = TrainConfig.from_dict({"data": {"path": str(prepared), "image_size": 32}}).validate()
    with pytest.raises(DataError, match=r"prepared: meta\.json has no usable class names and colours"):
        check_source(cfg)


# --- 6. the metric equals cityscapesscripts' -----------------------------------------------------


@pytest.fixture(scope="module")
def cs_eval_setup(tmp_path_factory):
    """(Cityscapes tree of 2 cities x 2 val images at 128x256, cityscapes19 checkpoint at 64x128
    trained briefly on it: an untrained model's mIoU is about 1e-4, which would pass any 1e-4 check)."""
    tmp = tmp_path_factory.mktemp("cs_eval")
    root = write_cityscapes_tree(tmp / "cityscapes", cities=("aachen", "bochum"), per_city=2, size=(128, 256), seed=1)
    data = {"path": str(root), "layout": "cityscapes", "classes": "cityscapes19", "image_size": "64x128"}
    return root, _save_checkpoint(tmp / "ckpt", data, seed=0, train_epochs=20)


def test_evaluate_miou_equals_cityscapes_reference(cs_eval_setup, tmp_path):
    root, ckpt = cs_eval_setup
    items, _ = predict.list_inputs([str(root)])
    val = [item for item in items if item["split"] == "val"]
    assert len(val) == 4 and {item["kind"] for item in val} == {"layout"}
    _predict_items(ckpt / "state.pt", tmp_path / "out", val)

    # Predictor's masks are train ids at each photo's own size; the reference wants label-id PNGs
    (tmp_path / "label_ids").mkdir()
    pred_files, gt_files, predicted = [], [], set()
    for item in val:
        train_ids = _read_png(tmp_path / "out" / f"{item['name']}_mask.png")
        assert train_ids.shape == _read_png(item["path"]).shape[:2] == (128, 256)
        predicted |= set(np.unique(train_ids).tolist())
        pred_files.append(tmp_path / "label_ids" / f"{item['name']}.png")
        _save_png(train_ids_to_label_ids(train_ids), pred_files[-1])
        gt_files.append(item["mask"])
    assert len(predicted) >= 4, f"the model should predict several classes, got {predicted}"
    reference = cityscapes_reference_miou(None, root, pred_files=pred_files, gt_files=gt_files)

    ours = evaluate_checkpoint(ckpt, root)
    assert ours["images"] == 4 and ours["classes"] == "cityscapes19"
    assert 0.2 < reference["miou"] < 0.95  # a figure a wrong pixel count would move
    # the figure at the training size differs by more than the tolerance: the check tells them apart
    assert abs(ours["val_miou"] - reference["miou"]) > 1e-3
    assert abs(ours["val_miou_native"] - reference["miou"]) < 1e-4, (ours["val_miou_native"], reference["miou"])
    per_class = ours["val_iou_per_class_native"]
    assert set(per_class) == set(reference["iou_per_class"])  # the same 19 names
    defined = {name for name, iou in per_class.items() if iou == iou}
    assert defined == {name for name, iou in reference["iou_per_class"].items() if iou == iou}
    assert len(defined) >= 4 and sum(0.05 < per_class[name] < 0.99 for name in defined) >= 3
    for name in defined:
        assert per_class[name] == pytest.approx(reference["iou_per_class"][name], abs=1e-6), name


# --- 7. class names and colours shown ------------------------------------------------------------


@pytest.fixture(scope="module")
def custom_setup(tmp_path_factory):
    """(folders tree with CUSTOM_NAMES / CUSTOM_COLORS, custom checkpoint at 32x64 for it)."""
    tmp = tmp_path_factory.mktemp("custom")
    root = _custom_tree(tmp / "folders", n_train=2, n_val=2, size=(48, 80), masks="rgb")
    data = {"path": str(root), "layout": "folders", "classes": "custom", "class_names": list(CUSTOM_NAMES),
            "class_colors": ["#000000", "#ff0000", "#0000ff"], "image_size": "32x64"}  # fmt: skip
    return root, _save_checkpoint(tmp / "ckpt", data, seed=0)


def test_predictor_colours_come_from_classes_yaml(custom_setup, tmp_path):
    root, ckpt = custom_setup
    items, _ = predict.list_inputs([str(root)])
    val = [item for item in items if item["split"] == "val"]
    assert [item["name"] for item in val] == ["val_img_002", "val_img_003"]
    _predict_items(ckpt / "state.pt", tmp_path / "out", val)
    table = np.array(CUSTOM_COLORS, np.uint8)
    seen = set()
    for item in val:
        mask = _read_png(tmp_path / "out" / f"{item['name']}_mask.png")
        color = _read_png(tmp_path / "out" / f"{item['name']}_color.png")
        assert mask.shape == (48, 80) and color.shape == (48, 80, 3)
        np.testing.assert_array_equal(color, table[mask])
        seen |= set(np.unique(mask).tolist())
    assert seen == {0, 1, 2}, "the model should predict every class, so that every colour is checked"


def test_legend_shows_the_checkpoint_class_names_and_colours(custom_setup):
    from unet_ray.checkpoint import load_model
    from unet_ray.dashboard.predictions import _legend

    _, cfg, _ = load_model(custom_setup[1])
    assert _legend(cfg.class_set) == [
        {"name": "background", "color": "#000000"}, {"name": "road", "color": "#ff0000"}, {"name": "car", "color": "#0000ff"},
    ]  # fmt: skip


def test_predict_samples_returns_the_yaml_classes(custom_setup, tmp_path):
    """The dashboard's sample masks: the checkpoint's own classes, names and colours of classes.yaml."""
    from unet_ray.dashboard.predictions import _legend, predict_samples

    root, ckpt = custom_setup
    prepared = tmp_path / "prepared"
    prepare(root, prepared, "32x64", progress=_quiet)
    rows, classes, size, epoch = predict_samples(ckpt / "state.pt", prepared, 2)
    assert isinstance(classes, palette.ClassSet) and classes.names == CUSTOM_NAMES
    assert [entry["name"] for entry in _legend(classes)] == list(CUSTOM_NAMES)
    assert [entry["color"] for entry in _legend(classes)] == ["#000000", "#ff0000", "#0000ff"]
    assert (size, epoch, len(rows)) == ("32x64", 1, 2)
    table = np.array(CUSTOM_COLORS, np.uint8)
    for row in rows:  # masks drawn in the classes.yaml colours
        assert set(map(tuple, row["prediction"].reshape(-1, 3).tolist())) <= set(map(tuple, table.tolist()))


def test_evaluate_keys_ious_by_the_yaml_names_and_refuses_other_classes(custom_setup, tmp_path):
    root, ckpt = custom_setup
    result = evaluate_checkpoint(ckpt, root)
    assert result["classes"] == "custom" and result["images"] == 2
    assert list(result["val_iou_per_class"]) == list(CUSTOM_NAMES)
    assert list(result["val_iou_per_class_native"]) == list(CUSTOM_NAMES)

    other = write_folders_tree(tmp_path / "other", n_train=1, n_val=1, size=(48, 80), classes=("sky", "road", "car"), colors=CUSTOM_COLORS)
    with pytest.raises(DataError, match=r"folders layout, classes sky, road, car\) does not fit the checkpoint's classes \(custom: background, road, car\)"):
        evaluate_checkpoint(ckpt, other)


def test_predict_refuses_a_layout_whose_classes_are_not_the_models(tmp_path, ray_must_not_start):
    """A layout's masks are scored against the model's classes: other classes (a folders tree
    with its own names, or Cityscapes for a custom model) stop predict before Ray starts, and a
    classes.yaml that cannot be read is an error, not a folder of photos to predict."""
    custom = palette.class_set("custom", CUSTOM_NAMES, CUSTOM_COLORS)
    other = _custom_tree(tmp_path / "other", names=("sky", "grass", "water"))
    with pytest.raises(DataError, match=r"folders layout, classes sky, grass, water\) does not fit the checkpoint's classes \(custom"):
        predict.list_inputs([str(other)], classes=custom)
    with pytest.raises(DataError, match=r"cityscapes layout.*does not fit the checkpoint's classes \(custom"):
        predict.list_inputs([str(_cs_tree(tmp_path))], classes=custom)
    items, _ = predict.list_inputs([str(_cs_tree(tmp_path, name="cs2"))], classes=palette.class_set("road"))
    assert {item["kind"] for item in items} == {"layout"} and all(item["mask"] for item in items)
    (other / "classes.yaml").write_text("classes: [just-one]\n")
    with pytest.raises(DataError, match=r"classes\.yaml: needs a list `classes:` of 2 or more"):
        predict.list_inputs([str(other)])
