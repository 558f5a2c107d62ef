"""The best checkpoint's masks for the first few validation pairs, as PNG data URIs.

Rows come from `evaluate.iter_split`, the same rows validation scored, at the checkpoint's image
size and classes; masks are drawn in the classes' own colours (Cityscapes' palette, or a folders
layout's classes.yaml: `palette.ClassSet.colorize`).
"""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path
from typing import Any

import numpy as np

NUM_SAMPLES = 4
_lock = threading.Lock()  # one model on the CPU at a time, whatever the number of page requests
_cache: dict[tuple[str, str, int], dict[str, Any]] = {}


def png_data_uri(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def best_predictions(best: dict[str, Any] | None, prepared: str | None, count: int = NUM_SAMPLES) -> dict[str, Any]:
    """{trial_id, epoch, classes, image_size, samples: [{photo, truth, prediction, pixel_accuracy}]}
    or {error} saying why there are none. Cached per checkpoint file and its modification time."""
    if not best:
        return {"error": "no trial has reported a val_iou yet"}
    checkpoint = best.get("checkpoint_path")
    if not checkpoint:
        return {"error": f"the checkpoint of trial {best['trial_id']} is not in this experiment folder"}
    from unet_ray import storage

    if not prepared or not storage.exists(prepared):  # a local folder, or a URI (a run on object storage)
        return {"error": f"no validation data: the sweep's prepared folder ({storage.redact(prepared or 'prepared/')}) is missing"}
    from unet_ray.checkpoint import CheckpointError, resolve

    try:
        state_file = resolve(checkpoint)
        key = (str(state_file), str(prepared), state_file.stat().st_mtime_ns)
    except (CheckpointError, OSError) as e:  # removed since the snapshot was read
        return {"error": str(e)}
    with _lock:
        if key not in _cache:
            _cache.clear()  # only the current best is ever shown
            _cache[key] = _predict(state_file, prepared if storage.is_uri(prepared) else Path(prepared), count)
        result = dict(_cache[key])
    return {"trial_id": best["trial_id"], "checkpoint": best.get("checkpoint"), **result}


def _predict(state_file: Path, prepared: Path, count: int) -> dict[str, Any]:
    from unet_ray.checkpoint import CheckpointError
    from unet_ray.prepared_format import DataError

    try:
        rows, classes, size, epoch = predict_samples(state_file, prepared, count)
    except (CheckpointError, DataError, OSError) as e:
        return {"error": str(e)}
    if not rows:
        return {"error": f"{prepared} has no validation rows"}
    samples = [
        {
            "photo": png_data_uri(row["photo"]),
            "truth": png_data_uri(row["truth"]),
            "prediction": png_data_uri(row["prediction"]),
            "pixel_accuracy": row["pixel_accuracy"],
        }
        for row in rows
    ]
    return {
        "epoch": epoch, "classes": classes.label_set, "image_size": size, "samples": samples,
        "legend": _legend(classes),
    }


def predict_samples(state_file: Path, prepared: Path, count: int) -> tuple[list[dict[str, Any]], Any, int | str, Any]:
    """The checkpoint's masks for the first `count` validation rows: ([{photo, truth, prediction
    (RGB uint8 arrays, masks in the classes' colours), pixel_accuracy}], palette.ClassSet, size, epoch)."""
    import torch

    from unet_ray import engine, palette
    from unet_ray.checkpoint import load_model
    from unet_ray.evaluate import iter_split
    from unet_ray.model import predict_classes

    model, cfg, state = load_model(state_file)
    classes, size = cfg.class_set, cfg.data.image_size
    custom_names = list(classes.names) if cfg.data.classes == "custom" else None
    batch = next(iter(iter_split(prepared, "val", cfg.data.classes, size, count, class_names=custom_names)), None)
    if batch is None:
        return [], classes, size, state.get("epoch")
    with torch.inference_mode():
        predicted = predict_classes(model(engine.to_model_input(batch["image"], torch.device("cpu")))).numpy()
    rows = []
    for photo, truth, pred in zip(batch["image"].numpy(), batch["mask"].numpy(), predicted.astype(np.uint8)):
        labelled = truth != palette.IGNORE_INDEX
        rows.append(
            {
                "photo": photo,
                "truth": classes.colorize(truth),
                "prediction": classes.colorize(pred),
                "pixel_accuracy": float((pred[labelled] == truth[labelled]).mean()) if labelled.any() else None,
            }
        )
    return rows, classes, size, state.get("epoch")


def _legend(classes) -> list[dict[str, str]]:
    """Class names and their mask colours (a palette.ClassSet's), for the key under the images."""
    from unet_ray import palette

    return [{"name": n, "color": palette.color_hex(rgb)} for n, rgb in zip(classes.names, classes.colors)]
