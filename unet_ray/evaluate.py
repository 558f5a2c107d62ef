"""`unet-ray evaluate`: the metrics of a checkpoint over a whole split, in one process, no Ray.

Reads the same rows training validates on: a prepared folder's Parquet as stored, or a pairs
folder decoded exactly as `prepare` does, so the IoU here equals the IoU that N workers report.
Checkpoint and data may be local paths or object-storage URIs (storage.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_ray import engine, metrics, palette, storage
from unet_ray.checkpoint import load_model
from unet_ray.pairs import BadPairError, is_pairs_folder, list_pairs, read_pair
from unet_ray.prepared_format import DataError, check_compatible, looks_prepared, read_meta, read_prepared_split
from unet_ray.transforms import resize_pair


def iter_split(
    data: str | Path,
    split: str,
    label_set: str,
    image_size: int,
    batch_size: int = 32,
    skipped: list[str] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """uint8 image/mask tensor batches of `split` from a pairs folder or a prepared folder (a local
    path or a URI), with `mask_native` (the mask at the pair's own 256x256) where the source has
    it: always for pairs, for the val split of a prepared folder.

    A bad pair file raises a DataError naming it; when a `skipped` list is given, bad files are
    left out and their messages appended to it instead. Messages name URIs redacted.
    """
    remote = storage.is_uri(data)
    data = os.fspath(data) if remote else Path(data).expanduser()
    shown = storage.redact(data)
    if not (storage.exists(data) if remote else data.exists()):
        raise DataError(f"data folder {shown} does not exist")
    if is_pairs_folder(data) and not looks_prepared(data):  # each takes URIs too
        try:
            files = list_pairs(data, split)  # URIs for a URI
        except FileNotFoundError as e:
            raise DataError(str(e)) from None
        images, masks, native = [], [], []
        for path in files:
            try:
                pair = read_pair(path)  # a URI's bytes are read with storage.read_bytes
            except BadPairError as e:
                if skipped is None:
                    raise DataError(f"{e} (pass --skip-bad-files to leave such files out)") from None
                skipped.append(str(e))
                continue
            photo, ids = resize_pair(pair.photo, pair.train_ids, image_size)
            images.append(photo)
            masks.append(palette.to_label_set(ids, label_set))
            native.append(palette.to_label_set(pair.train_ids, label_set))
            if len(images) == batch_size:
                yield _batch(images, masks, native)
                images, masks, native = [], [], []
        if images:
            yield _batch(images, masks, native)
        return
    check_compatible(read_meta(data), shown, label_set, image_size)
    arrays = read_prepared_split(data, split, image_size)
    for start in range(0, len(arrays["image"]), batch_size):
        yield {k: torch.from_numpy(a[start : start + batch_size].copy()) for k, a in arrays.items()}


def _batch(images: list[np.ndarray], masks: list[np.ndarray], native: list[np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.stack(rows)) for name, rows in (("image", images), ("mask", masks), ("mask_native", native))}


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "val",
    batch_size: int = 32,
    skip_bad_files: bool = False,
    flip_tta: bool = False,
) -> dict[str, Any]:
    """Metrics of `checkpoint` on `data` (each a local path or a URI); the label set and image size
    come from the checkpoint.

    val_* figures compare with the masks at the training size; val_*_native (where the data has
    the pairs' own masks) with the 256x256 masks, the logits upsampled bilinearly. With
    `flip_tta` the logits are the mean over the photo and its mirror image."""
    model, cfg, state = load_model(checkpoint)
    skipped: list[str] | None = [] if skip_bad_files else None
    batches = iter(iter_split(data, split, cfg.data.classes, cfg.data.image_size, batch_size, skipped))
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
    names = palette.class_names(cfg.data.classes)
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
        "pairs": rows[0],  # the pairs read and scored; bad files left out are in skipped_files
        "skipped_files": skipped or [],
    }
