"""`unet-ray evaluate`: the metrics of a checkpoint over a whole split, in one process, no Ray.

Reads the same rows training validates on: a prepared folder's Parquet as stored, or a pairs
folder decoded exactly as `prepare` does, so the IoU here equals the IoU that N workers report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_ray import engine, metrics, palette
from unet_ray.checkpoint import load_model
from unet_ray.pairs import BadPairError, is_pairs_folder, list_pairs, read_pair
from unet_ray.prepare import DataError, check_compatible, looks_prepared, read_meta, read_prepared_split
from unet_ray.transforms import resize_pair


def iter_split(
    data: str | Path,
    split: str,
    label_set: str,
    image_size: int,
    batch_size: int = 32,
    skipped: list[str] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """uint8 image/mask tensor batches of `split` from a pairs folder or a prepared folder.

    A bad pair file raises a DataError naming it; when a `skipped` list is given, bad files are
    left out and their messages appended to it instead.
    """
    data = Path(data).expanduser()
    if not data.exists():
        raise DataError(f"data folder {data} does not exist")
    if is_pairs_folder(data) and not looks_prepared(data):
        try:
            files = list_pairs(data, split)
        except FileNotFoundError as e:
            raise DataError(str(e)) from None
        images, masks = [], []
        for path in files:
            try:
                pair = read_pair(path)
            except BadPairError as e:
                if skipped is None:
                    raise DataError(f"{e} (pass --skip-bad-files to leave such files out)") from None
                skipped.append(str(e))
                continue
            photo, ids = resize_pair(pair.photo, pair.train_ids, image_size)
            images.append(photo)
            masks.append(palette.to_label_set(ids, label_set))
            if len(images) == batch_size:
                yield _batch(images, masks)
                images, masks = [], []
        if images:
            yield _batch(images, masks)
        return
    check_compatible(read_meta(data), data, label_set, image_size)
    arrays = read_prepared_split(data, split, image_size)
    for start in range(0, len(arrays["image"]), batch_size):
        yield {k: torch.from_numpy(a[start : start + batch_size].copy()) for k, a in arrays.items()}


def _batch(images: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, torch.Tensor]:
    return {"image": torch.from_numpy(np.stack(images)), "mask": torch.from_numpy(np.stack(masks))}


def evaluate_checkpoint(
    checkpoint: str | Path, data: str | Path, split: str = "val", batch_size: int = 32, skip_bad_files: bool = False
) -> dict[str, Any]:
    """Metrics of `checkpoint` on `data`; the label set and image size come from the checkpoint."""
    model, cfg, state = load_model(checkpoint)
    skipped: list[str] | None = [] if skip_bad_files else None
    batches = iter_split(data, split, cfg.data.classes, cfg.data.image_size, batch_size, skipped)
    rows = [0]

    def counted(batches):
        for batch in batches:
            rows[0] += len(batch["image"])
            yield batch

    confusion = engine.evaluate(model, counted(batches), cfg.num_classes, torch.device("cpu"))
    pixels = int(confusion.mat.sum())
    if pixels == 0:
        raise DataError(f"{data}: the {split} split has no labelled pixels to evaluate")
    scores = confusion.compute()
    return {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "split": split,
        "classes": cfg.data.classes,
        "epoch": state["epoch"],
        **metrics.headline(scores, cfg.num_classes),
        "val_miou": scores["miou"],
        "val_pixel_accuracy": scores["pixel_accuracy"],
        "val_iou_per_class": dict(zip(palette.class_names(cfg.data.classes), scores["iou_per_class"])),
        "val_pixels": pixels,
        "pairs": rows[0],  # the pairs read and scored; bad files left out are in skipped_files
        "skipped_files": skipped or [],
    }
