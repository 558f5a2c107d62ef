"""The layout-tree helpers (tests/layout_trees.py) and the cityscapesscripts wrapper: no Ray, no torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from layout_trees import (
    cityscapes_reference_miou,
    train_ids_to_label_ids,
    write_cityscapes_tree,
    write_folders_tree,
)
from PIL import Image

from unet_ray import palette

# Label ids of the 19 evaluated classes, from our own table (independent of cityscapesscripts).
EVAL_IDS = {lb.id: lb.name for lb in palette.LABELS if lb.id >= 0 and 0 <= lb.train_id < 255}
ROAD_ID, SIDEWALK_ID, CAR_ID = 7, 8, 26


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory) -> Path:
    return write_cityscapes_tree(tmp_path_factory.mktemp("cs") / "cityscapes", train_ids=True)


def test_cityscapes_tree_layout(cs_root):
    photos = sorted(cs_root.glob("leftImg8bit/*/*/*_leftImg8bit.png"))
    gts = sorted(cs_root.glob("gtFine/*/*/*_gtFine_labelIds.png"))
    assert len(photos) == len(gts) == 2 * 2 * 2  # splits x cities x per_city
    assert {p.relative_to(cs_root / "leftImg8bit") for p in photos} == {
        Path(split, city, f"{city}_000000_{i:06d}_leftImg8bit.png")
        for split in ("train", "val") for city in ("aachen", "bochum") for i in range(2)
    }
    for photo in photos:
        key = photo.name.removesuffix("_leftImg8bit.png")
        split, city = photo.parent.parent.name, photo.parent.name
        gt = cs_root / "gtFine" / split / city / f"{key}_gtFine_labelIds.png"
        with Image.open(photo) as img:
            assert (img.mode, img.size) == ("RGB", (256, 128))
        with Image.open(gt) as img:
            assert (img.mode, img.size) == ("L", (256, 128))
        ids = _read(gt)
        assert ids.dtype == np.uint8 and ids.max() <= 33
        # void ids (ignored in evaluation) and the scene's road are there
        assert {0, 1, 9, ROAD_ID} <= set(np.unique(ids).tolist())


def test_cityscapes_train_ids_match_label_ids(cs_root):
    from cityscapesscripts.helpers.labels import id2label

    lut = np.array([id2label[i].trainId if i in id2label and id2label[i].trainId >= 0 else 255 for i in range(256)], np.uint8)
    files = sorted(cs_root.glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))
    assert len(files) == 8
    for f in files:
        train = _read(f)
        ids = _read(f.with_name(f.name.replace("labelTrainIds", "labelIds")))
        assert train.dtype == np.uint8 and set(np.unique(train).tolist()) <= set(range(19)) | {255}
        np.testing.assert_array_equal(train, lut[ids])
        assert (train == 255).any()  # ignored pixels exist
        # and back: train ids -> label ids agrees with the truth wherever a pixel is evaluated
        valid = train != 255
        np.testing.assert_array_equal(train_ids_to_label_ids(train)[valid], ids[valid])


def test_cityscapes_tree_is_deterministic(tmp_path):
    a = write_cityscapes_tree(tmp_path / "a", splits=("val",), cities=("ulm",), per_city=1, size=(32, 64), seed=3)
    b = write_cityscapes_tree(tmp_path / "b", splits=("val",), cities=("ulm",), per_city=1, size=(32, 64), seed=3)
    c = write_cityscapes_tree(tmp_path / "c", splits=("val",), cities=("ulm",), per_city=1, size=(32, 64), seed=4)
    rel = "gtFine/val/ulm/ulm_000000_000000_gtFine_labelIds.png"
    assert (a / rel).read_bytes() == (b / rel).read_bytes() != (c / rel).read_bytes()
    assert not (a / rel.replace("labelIds", "labelTrainIds")).exists()


def test_train_ids_to_label_ids():
    from cityscapesscripts.helpers.labels import id2label

    train = np.array([[*range(19), 255]], dtype=np.uint8)
    ids = train_ids_to_label_ids(train)
    assert ids.dtype == np.uint8 and ids.shape == train.shape
    assert [id2label[int(i)].trainId for i in ids[0, :19]] == list(range(19))
    assert ids[0, 19] == 0 and ids[0, 0] == ROAD_ID
    with pytest.raises(ValueError, match="19"):
        train_ids_to_label_ids(np.array([19], dtype=np.uint8))


def test_folders_tree_split_ids(tmp_path):
    root = write_folders_tree(tmp_path / "ds")
    assert yaml.safe_load((root / "classes.yaml").read_text()) == {
        "classes": [
            {"name": "background", "color": [0, 0, 0]},
            {"name": "road", "color": [128, 64, 128]},
            {"name": "car", "color": [0, 0, 142]},
        ],
        "ignore_index": 255,
    }
    seen: set[int] = set()
    for split, n in (("train", 4), ("val", 2)):
        images = sorted((root / split / "images").glob("*.jpg"))
        masks = sorted((root / split / "masks").glob("*.png"))
        assert len(images) == n and [p.stem for p in images] == [p.stem for p in masks]
        for img_path, mask_path in zip(images, masks):
            with Image.open(img_path) as img:
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (128, 96))
            with Image.open(mask_path) as img:
                assert (img.mode, img.size) == ("L", (128, 96))
            mask = _read(mask_path)
            assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) <= {0, 1, 2, 255}
            assert 0 < (mask == 255).sum() < 20  # a few ignored pixels
            seen |= set(np.unique(mask).tolist())
    assert seen == {0, 1, 2, 255}  # road and car drawn somewhere


def test_folders_tree_flat_rgb(tmp_path):
    colors = ((0, 0, 0), (128, 64, 128), (0, 0, 142))
    root = write_folders_tree(tmp_path / "ds", n_train=2, n_val=1, masks="rgb", split_folders=False, size=(40, 60))
    assert not (root / "train").exists()
    images, masks = sorted((root / "images").glob("*.jpg")), sorted((root / "masks").glob("*.png"))
    assert [p.stem for p in images] == [p.stem for p in masks] == ["img_000", "img_001", "img_002"]
    for mask_path in masks:
        with Image.open(mask_path) as img:
            assert (img.mode, img.size) == ("RGB", (60, 40))
        found = {tuple(c) for c in np.unique(_read(mask_path).reshape(-1, 3), axis=0).tolist()}
        assert found <= set(colors)


def _copy_predictions(gt_root: Path, pred_dir: Path, edit=None) -> None:
    """Predictions = label ids converted back from the train-id ground truth (ignored -> 0), named
    like a submission (<city>_<seq>_<frame>_pred.png); edit(name, ids) may change them."""
    pred_dir.mkdir()
    for f in sorted(gt_root.glob("gtFine/val/*/*_gtFine_labelTrainIds.png")):
        ids = train_ids_to_label_ids(_read(f))
        if edit:
            ids = edit(f.name, ids)
        Image.fromarray(ids).save(pred_dir / f.name.replace("gtFine_labelTrainIds", "pred"))


def _expected_ious(gt_root: Path, pred_dir: Path) -> dict[str, float]:
    """IoU = TP / (TP + FP + FN) summed over all images. Pixels whose truth is an ignored label are no
    FP of any class; a prediction of an ignored id on an evaluated pixel is an FN of its true class.
    Classes absent from both truth and prediction are left out."""
    tp, fp, fn = (dict.fromkeys(EVAL_IDS, 0) for _ in range(3))
    for gt_file in sorted(gt_root.glob("gtFine/val/*/*_gtFine_labelIds.png")):
        gt = _read(gt_file)
        pred = _read(pred_dir / gt_file.name.replace("gtFine_labelIds", "pred"))
        valid = np.isin(gt, list(EVAL_IDS))
        for c in EVAL_IDS:
            tp[c] += int(((gt == c) & (pred == c)).sum())
            fn[c] += int(((gt == c) & (pred != c)).sum())
            fp[c] += int((valid & (gt != c) & (pred == c)).sum())
    return {EVAL_IDS[c]: tp[c] / (tp[c] + fp[c] + fn[c]) for c in EVAL_IDS if tp[c] + fp[c] + fn[c]}


def test_reference_miou_perfect(cs_root, tmp_path):
    _copy_predictions(cs_root, tmp_path / "pred")
    res = cityscapes_reference_miou(tmp_path / "pred", cs_root, split="val")
    assert res["miou"] == 1.0
    present = {k for k, v in res["iou_per_class"].items() if not np.isnan(v)}
    assert present == set(_expected_ious(cs_root, tmp_path / "pred")) and "road" in present
    assert len(res["iou_per_class"]) == 19
    # every pixel counted once, ignored ones included
    assert res["conf_matrix"].sum() == 4 * 128 * 256


def test_reference_miou_perturbed(cs_root, tmp_path):
    # One image: its road becomes sidewalk; another: a car block becomes 0 'unlabeled' (an ignored
    # id: a false negative of car, a false positive of nothing).
    def edit(name: str, ids: np.ndarray) -> np.ndarray:
        ids = ids.copy()
        if name.startswith("aachen_000000_000000"):
            ids[ids == ROAD_ID] = SIDEWALK_ID
        if name.startswith("bochum_000000_000000"):
            ids[(ids == CAR_ID) & (np.arange(ids.shape[1]) < 128)] = 0
        return ids

    _copy_predictions(cs_root, tmp_path / "pred", edit)
    expected = _expected_ious(cs_root, tmp_path / "pred")
    assert expected["road"] < 1 and expected["sidewalk"] < 1 and expected["car"] < 1
    res = cityscapes_reference_miou(tmp_path / "pred", cs_root, split="val")
    got = {k: v for k, v in res["iou_per_class"].items() if not np.isnan(v)}
    assert got.keys() == expected.keys()
    for name, iou in expected.items():
        assert got[name] == pytest.approx(iou, abs=1e-12), name
    assert res["miou"] == pytest.approx(sum(expected.values()) / len(expected), abs=1e-12)
    assert res["miou"] < 1

    # the same with explicit lists instead of the script's own file search
    gts = sorted(cs_root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    preds = [tmp_path / "pred" / g.name.replace("gtFine_labelIds", "pred") for g in gts]
    assert cityscapes_reference_miou(None, cs_root, pred_files=preds, gt_files=gts)["miou"] == res["miou"]


def test_reference_miou_errors(cs_root, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="Found no prediction"):
        cityscapes_reference_miou(tmp_path / "empty", cs_root)
    # train ids are not label ids: 255 would crash the script with a bare IndexError
    pred = tmp_path / "train_ids"
    pred.mkdir()
    for f in sorted(cs_root.glob("gtFine/val/*/*_gtFine_labelTrainIds.png")):
        Image.fromarray(_read(f)).save(pred / f.name.replace("gtFine_labelTrainIds", "pred"))
    with pytest.raises(ValueError, match="label ids"):
        cityscapes_reference_miou(pred, cs_root)
