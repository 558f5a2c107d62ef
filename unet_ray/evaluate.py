"""`unet-ray evaluate`: the metrics of a checkpoint over a whole split, in one process, no Ray.

Reads the same rows training validates on: a prepared folder's Parquet as stored, or a data folder
(any of layouts.LAYOUTS) decoded exactly as `prepare` does, so the IoU here equals the IoU that N
workers report. From a data folder it also scores every image at its own size (val_*_native: the
logits upsampled bilinearly to the mask's size), the figure Cityscapes' own evaluation
(cityscapesscripts' evalPixelLevelSemanticLabeling) reports for the same predictions.
Checkpoint and data may be local paths or object-storage URIs (storage.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_ray import engine, layouts, metrics, palette, storage
from unet_ray.checkpoint import load_model
from unet_ray.config import image_shape
from unet_ray.pairs import BadPairError
from unet_ray.prepared_format import DataError, check_compatible, looks_prepared, read_meta, read_prepared_split
from unet_ray.transforms import resize_pair


def iter_split(
    data: str | Path,
    split: str,
    label_set: str,
    image_size: int | str,
    batch_size: int = 32,
    skipped: list[str] | None = None,
    layout: str = "auto",
    class_names: list[str] | None = None,
    val_fraction: float = 0.2,
) -> Iterator[dict[str, Any]]:
    """uint8 image/mask tensor batches of `split` of a data folder or a prepared folder (a local
    path or a URI), at `image_size` and with the classes of `label_set` (a checkpoint's; for
    "custom", the data's class names must be `class_names`), with `mask_native`
    (each image's mask at its own size: a list of tensors) for a data folder and for the val split
    of prepared pairs.

    A bad file raises a DataError naming it; when a `skipped` list is given, bad files are
    left out and their messages appended to it instead. Messages name URIs redacted.
    """
    remote = storage.is_uri(data)
    data = os.fspath(data) if remote else Path(data).expanduser()
    shown = storage.redact(data)
    if not (storage.exists(data) if remote else data.exists()):
        raise DataError(f"data folder {shown} does not exist")
    shape = image_shape(image_size)
    if looks_prepared(data):
        meta = read_meta(data)
        check_compatible(meta, shown, label_set, image_size)
        _check_class_names(meta["class_names"], class_names, shown)
        arrays = read_prepared_split(data, split, shape)
        for start in range(0, len(arrays["image"]), batch_size):
            yield {k: torch.from_numpy(a[start : start + batch_size].copy()) for k, a in arrays.items()}
        return
    found = layouts.detect(data, layout, val_fraction)
    layouts.check_model_classes(found, label_set, class_names)
    items, problems = found.items(split)
    if problems and skipped is None:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more} (pass --skip-bad-files to leave such files out)")
    if skipped is not None:
        skipped += problems
    images, masks, native = [], [], []
    for item in items:
        try:
            photo, class_ids = layouts.read_item(item, found.coding)  # a URI's bytes are read with storage.read_bytes
        except BadPairError as e:
            if skipped is None:
                raise DataError(f"{e} (pass --skip-bad-files to leave such files out)") from None
            skipped.append(str(e))
            continue
        small, small_ids = resize_pair(photo, class_ids, shape)
        images.append(small)
        masks.append(palette.to_label_set(small_ids, label_set))
        native.append(torch.from_numpy(palette.to_label_set(class_ids, label_set)))
        if len(images) == batch_size:
            yield _batch(images, masks, native)
            images, masks, native = [], [], []
    if images:
        yield _batch(images, masks, native)


def _check_class_names(names: list[str], wanted: list[str] | None, shown: str) -> None:
    if wanted is not None and list(names) != list(wanted):
        raise DataError(f"{shown} has the classes {', '.join(names)}, but the checkpoint predicts {', '.join(wanted)}")


def _batch(images: list[np.ndarray], masks: list[np.ndarray], native: list[torch.Tensor]) -> dict[str, Any]:
    return {"image": torch.from_numpy(np.stack(images)), "mask": torch.from_numpy(np.stack(masks)), "mask_native": native}


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "val",
    batch_size: int = 32,
    skip_bad_files: bool = False,
    flip_tta: bool = False,
    layout: str = "auto",
) -> dict[str, Any]:
    """Metrics of `checkpoint` on `data` (each a local path or a URI); the classes and image size
    come from the checkpoint, the layout of `data` is detected (or forced by `layout`).

    val_* figures compare with the masks at the training size; val_*_native (where the data has
    each image's own mask: data folders, and prepared pairs) with the masks at the images' own
    sizes, the logits upsampled bilinearly. With `flip_tta` the logits are the mean over the
    photo and its mirror image."""
    model, cfg, state = load_model(checkpoint)
    skipped: list[str] | None = [] if skip_bad_files else None
    custom_names = list(cfg.class_set.names) if cfg.data.classes == "custom" else None
    batches = iter(iter_split(data, split, cfg.data.classes, cfg.data.image_size, batch_size, skipped, layout,
                              custom_names, cfg.data.val_fraction))  # fmt: skip
    first = next(batches, None)
    rows = [0]

    def counted():
        for batch in ([first] if first is not None else []):
            rows[0] += len(batch["image"])
            yield batch
        for batch in batches:
            rows[0] += len(batch["image"])
            yield batch

    native = first is not None and "mask_native" in first
    confusion = engine.evaluate(
        model, counted(), cfg.num_classes, torch.device("cpu"), flip_tta=flip_tta, native=native
    )
    pixels = int(confusion["train_size"].mat.sum())
    if pixels == 0:
        raise DataError(f"{storage.redact(data)}: the {split} split has no labelled pixels to evaluate")
    scores = confusion["train_size"].compute()
    names = list(cfg.class_set.names)
    native_figures = {}
    if native:
        native_scores = confusion["native"].compute()
        native_figures = {
            "val_iou_native": metrics.headline(native_scores, cfg.num_classes)["val_iou"],
            "val_miou_native": native_scores["miou"],
            "val_iou_per_class_native": dict(zip(names, native_scores["iou_per_class"])),
        }
    return {
        "checkpoint": storage.redact(os.fspath(checkpoint)),  # no credentials in the output
        "data": storage.redact(os.fspath(data)),
        "split": split,
        "classes": cfg.data.classes,
        "epoch": state["epoch"],
        "flip_tta": flip_tta,
        "image_size": cfg.data.image_size,
        **metrics.headline(scores, cfg.num_classes),
        "val_miou": scores["miou"],
        "val_pixel_accuracy": scores["pixel_accuracy"],
        "val_iou_per_class": dict(zip(names, scores["iou_per_class"])),
        **native_figures,
        "val_pixels": pixels,
        "images": rows[0],  # the images read and scored; bad files left out are in skipped_files
        "skipped_files": skipped or [],
    }
