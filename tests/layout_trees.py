"""Tiny data trees in two common segmentation layouts, and the official Cityscapes evaluation.

- `write_cityscapes_tree`: the Cityscapes layout as unpacked from its archives
  (leftImg8bit/<split>/<city>/..._leftImg8bit.png, gtFine/<split>/<city>/..._gtFine_labelIds.png).
- `write_folders_tree`: "image and mask folders" (images/*.jpg, masks/*.png matched by stem,
  classes.yaml).
- `cityscapes_reference_miou`: cityscapesscripts' evalPixelLevelSemanticLabeling, called in-process,
  so tests can compare our mIoU with the reference number.

Plain numpy/PIL; no Ray, no torch. Scenes come from unet_ray.pairs.synth_scene, so a model can
learn them.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from unet_ray import palette
from unet_ray.pairs import synth_scene

# Cityscapes label ids used for the void pixels sprinkled into every mask.
UNLABELED_ID, EGO_VEHICLE_ID, PARKING_ID = 0, 1, 9


def _color_to_label_id() -> dict[tuple[int, int, int], int]:
    """Palette colour -> label id; the first label with a colour wins (pole before polegroup, and
    car before license plate, whose id is -1)."""
    table: dict[tuple[int, int, int], int] = {}
    for lb in palette.LABELS:
        if lb.id >= 0:
            table.setdefault(lb.color, lb.id)
    return table


def _scene_label_ids(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scene as (photo (256, 256, 3) uint8, Cityscapes label ids (256, 256) uint8)."""
    photo, color_mask = synth_scene(rng)
    ids = np.zeros(color_mask.shape[:2], dtype=np.uint8)
    found = np.zeros(ids.shape, dtype=bool)
    for color, label_id in _color_to_label_id().items():
        sel = np.all(color_mask == color, axis=-1)
        ids[sel & ~found] = label_id
        found |= sel
    if not found.all():  # synth_scene draws only palette colours; anything else is a bug there
        raise AssertionError("synth_scene drew a colour outside the Cityscapes palette")
    return photo, ids


def _resize(photo: np.ndarray, ids: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = size
    photo = np.asarray(Image.fromarray(photo).resize((w, h), Image.Resampling.BILINEAR))
    ids = np.asarray(Image.fromarray(ids).resize((w, h), Image.Resampling.NEAREST))  # no blended ids
    return photo, ids.copy()


def write_cityscapes_tree(
    root: str | os.PathLike,
    splits: tuple[str, ...] = ("train", "val"),
    cities: tuple[str, ...] = ("aachen", "bochum"),
    per_city: int = 2,
    size: tuple[int, int] = (128, 256),
    seed: int = 0,
    train_ids: bool = False,
) -> Path:
    """Write the Cityscapes layout under `root` (size = height, width) and return `root`.

    Files per image: leftImg8bit/<split>/<city>/<city>_000000_<frame:06d>_leftImg8bit.png (RGB) and
    gtFine/<split>/<city>/<city>_000000_<frame:06d>_gtFine_labelIds.png (mode L, label ids 0..33),
    plus ..._gtFine_labelTrainIds.png (train ids 0..18, 255 ignored) when `train_ids`. Every mask
    has void pixels: unlabeled (0) on the top row, ego vehicle (1) on the bottom rows and a parking
    (9) patch, all ignored in evaluation. The same seed writes the same files.
    """
    root = Path(root)
    h, w = size
    id_to_train = np.full(256, palette.IGNORE_INDEX, dtype=np.uint8)
    for lb in palette.LABELS:
        if 0 <= lb.id and 0 <= lb.train_id < palette.IGNORE_INDEX:
            id_to_train[lb.id] = lb.train_id
    for s, split in enumerate(splits):
        rng = np.random.default_rng((seed, s))
        for city in cities:
            img_dir = root / "leftImg8bit" / split / city
            gt_dir = root / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            for i in range(per_city):
                photo, ids = _resize(*_scene_label_ids(rng), size)
                photo = photo.copy()
                ego = max(h // 12, 1)
                ids[0, :] = UNLABELED_ID
                ids[h - ego :, :] = EGO_VEHICLE_ID
                photo[h - ego :, :] = (30, 30, 35)  # the car's bonnet, as on the real photos
                py, px = int(rng.integers(h // 2, h - ego - h // 8)), int(rng.integers(0, w - w // 6))
                ids[py : py + h // 8, px : px + w // 6] = PARKING_ID
                photo[py : py + h // 8, px : px + w // 6] = (150, 120, 125)
                key = f"{city}_000000_{i:06d}"
                Image.fromarray(photo).save(img_dir / f"{key}_leftImg8bit.png")
                Image.fromarray(ids).save(gt_dir / f"{key}_gtFine_labelIds.png")
                if train_ids:
                    Image.fromarray(id_to_train[ids]).save(gt_dir / f"{key}_gtFine_labelTrainIds.png")
    return root


def write_folders_tree(
    root: str | os.PathLike,
    n_train: int = 4,
    n_val: int = 2,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    masks: str = "ids",
    split_folders: bool = True,
    classes: tuple[str, ...] = ("background", "road", "car"),
    colors: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (128, 64, 128), (0, 0, 142)),
    ignore_index: int = 255,
) -> Path:
    """Write an "image and mask folders" data set under `root` (size = height, width); return `root`.

    split_folders: train/images, train/masks, val/images, val/masks; else images/ and masks/ with
    all n_train + n_val files. img_NNN.jpg (RGB JPEG) pairs with masks/img_NNN.png by stem. masks:
    "ids" = mode L class ids 0..K-1 with a small ignore_index patch; "rgb" = RGB in `colors` (no
    ignored pixels: there is no colour for them). Scene pixels of a Cityscapes class whose name is
    one of `classes` get that class, all others class 0. Also writes root/classes.yaml.
    """
    if masks not in ("ids", "rgb"):
        raise ValueError(f"masks must be 'ids' or 'rgb', got {masks!r}")
    if len(classes) != len(colors) or not 1 <= len(classes) <= 255 or ignore_index < len(classes):
        raise ValueError("need as many colours as classes, at most 255 classes, ignore_index >= K")
    root = Path(root)
    h, w = size
    # label id -> class index: a Cityscapes label named like one of `classes` keeps it, the rest is 0
    id_to_class = np.zeros(256, dtype=np.uint8)
    for lb in palette.LABELS:
        if lb.id >= 0 and lb.name in classes:
            id_to_class[lb.id] = classes.index(lb.name)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(colors)] = colors

    rng = np.random.default_rng(seed)
    for i in range(n_train + n_val):
        folder = root / ("train" if i < n_train else "val") if split_folders else root
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        photo, ids = _resize(*_scene_label_ids(rng), size)
        cls = id_to_class[ids]
        Image.fromarray(photo).save(folder / "images" / f"img_{i:03d}.jpg", quality=95)
        if masks == "rgb":
            Image.fromarray(table[cls]).save(folder / "masks" / f"img_{i:03d}.png")
        else:
            cls[:3, :3] = ignore_index  # a few ignored pixels in a corner
            Image.fromarray(cls).save(folder / "masks" / f"img_{i:03d}.png")

    def yaml_str(s: str) -> str:  # plain when it reads back as itself ("null", "yes" do not), else JSON
        plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ .-]*", s) and s.strip() == s and yaml.safe_load(s) == s
        return s if plain else json.dumps(s)

    lines = ["classes:"]
    lines += [f"  - {{name: {yaml_str(n)}, color: [{c[0]}, {c[1]}, {c[2]}]}}" for n, c in zip(classes, colors)]
    lines.append(f"ignore_index: {ignore_index}")
    (root / "classes.yaml").write_text("\n".join(lines) + "\n")
    return root


def train_ids_to_label_ids(train_id_mask: np.ndarray) -> np.ndarray:
    """Train ids (0..18, 255 ignored) -> Cityscapes label ids, by cityscapesscripts' own trainId2label
    (255 -> 0 'unlabeled'). Other values raise a ValueError."""
    from cityscapesscripts.helpers.labels import trainId2label

    lut = np.full(256, -1, dtype=np.int16)
    for train_id, label in trainId2label.items():
        if 0 <= train_id <= 255:
            lut[train_id] = label.id
    out = lut[np.asarray(train_id_mask, dtype=np.uint8)]
    if (out < 0).any():
        raise ValueError(f"not a train id: {sorted(set(np.unique(train_id_mask).tolist()) - set(np.flatnonzero(lut >= 0).tolist()))}")
    return out.astype(np.uint8)


def cityscapes_reference_miou(
    pred_dir: str | os.PathLike | None,
    gt_root: str | os.PathLike,
    split: str = "val",
    pred_files: list[str | os.PathLike] | None = None,
    gt_files: list[str | os.PathLike] | None = None,
) -> dict:
    """mIoU of label-id prediction PNGs by cityscapesscripts' evalPixelLevelSemanticLabeling.

    By default every gt_root/gtFine/<split>/*/*_gtFine_labelIds.png is paired with the one file under
    `pred_dir` (searched recursively) matching <city>_<seq>_<frame>*.png, by the script's own
    getPrediction; or give `pred_files` and `gt_files` as parallel lists. Returns {"miou": the
    script's averageScoreClasses, "iou_per_class": {name: IoU} of the 19 evaluated classes (nan where
    a class is in neither truth nor prediction), "conf_matrix": (34, 34) counts (rows truth, columns
    prediction), "result": the script's whole result dict}. Writes no files; a failure in the
    script (it calls sys.exit) becomes a RuntimeError with its message.
    """
    # Its import raises if CITYSCAPES_EXPORT_DIR names no directory; the export is off below anyway.
    saved = os.environ.pop("CITYSCAPES_EXPORT_DIR", None)
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
    finally:
        if saved is not None:
            os.environ["CITYSCAPES_EXPORT_DIR"] = saved
    from cityscapesscripts.helpers.labels import id2label

    args = copy.copy(cs_eval.args)  # a fresh copy: getPrediction caches its search on args
    args.evalInstLevelScore = False  # needs *_instanceIds.png, and np.in1d (gone in numpy 2.4)
    args.evalPixelAccuracy = False  # np.in1d as well
    args.JSONOutput = False  # else it writes <site-packages>/../../evaluationResults/*.json
    args.quiet = True
    args.colorized = False
    args.bold = args.nocol = ""
    args.predictionPath = None if pred_dir is None else str(pred_dir)
    args.predictionWalk = None
    args.cityscapesPath = str(gt_root)

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            if gt_files is None:
                gt_files = sorted(glob.glob(os.path.join(str(gt_root), "gtFine", split, "*", "*_gtFine_labelIds.png")))
                if not gt_files:
                    raise RuntimeError(f"no *_gtFine_labelIds.png under {gt_root}/gtFine/{split}")
            if pred_files is None:
                if pred_dir is None:
                    raise ValueError("give pred_dir or pred_files")
                pred_files = [cs_eval.getPrediction(args, str(g)) for g in gt_files]
            pred_files, gt_files = [str(p) for p in pred_files], [str(g) for g in gt_files]
            # Its pure-Python path (no Cython in the wheel) indexes a 34x34 matrix with the values:
            # a prediction of 255 would die with a bare IndexError. Say which file instead.
            for p in pred_files:
                with Image.open(p) as img:
                    too_big = (np.asarray(img) > 33).any()
                if too_big:
                    raise ValueError(f"{p}: values above 33; predictions must be label ids (train_ids_to_label_ids)")
            result = cs_eval.evaluateImgLists(pred_files, gt_files, args)
    except SystemExit:
        raise RuntimeError(f"cityscapesscripts failed: {out.getvalue().strip()}") from None
    evaluated = {id2label[i].name for i in args.evalLabels if not id2label[i].ignoreInEval}
    return {
        "miou": float(result["averageScoreClasses"]),
        "iou_per_class": {k: float(v) for k, v in result["classScores"].items() if k in evaluated},
        "conf_matrix": np.asarray(result["confMatrix"], dtype=np.int64),
        "result": result,
    }
