"""Ray Data datasets for training and validation, built from a prepared folder.

train: read Parquet -> raw bytes to arrays -> materialize (kept in the object store, so later
epochs skip the read) -> joint augmentation, re-run and re-drawn on every epoch.
val:   read Parquet -> arrays -> materialize; no augmentation.

Also resolves what `--data` points at (nothing, a pairs folder, a prepared folder) into a prepared
folder, preparing it on the way when needed.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from unet_ray import pairs
from unet_ray.config import TrainConfig
from unet_ray.prepare import DATA_TASK_CPUS, META_FILE, DataError, check_compatible, looks_prepared, prepare, read_meta
from unet_ray.transforms import JointAugment, rows_to_arrays

BATCH_ROWS = 64  # rows per Ray Data batch for the decode and augment stages


@lru_cache(maxsize=4)
def _augmenter(image_size: int) -> JointAugment:
    return JointAugment(image_size)


def augment_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Task-friendly wrapper: one albumentations pipeline per worker process, built once."""
    return _augmenter(image_size)(batch)


def build_datasets(prepared: str | Path, image_size: int, augment: bool) -> dict[str, Any]:
    import ray

    datasets = {}
    for split in pairs.SPLITS:
        ds = ray.data.read_parquet(
            str(Path(prepared) / split), columns=["image", "mask"], num_cpus=DATA_TASK_CPUS
        ).map_batches(
            rows_to_arrays, fn_kwargs={"image_size": image_size}, batch_size=BATCH_ROWS, num_cpus=DATA_TASK_CPUS
        ).materialize()
        if split == "train" and augment:
            ds = ds.map_batches(
                augment_batch, fn_kwargs={"image_size": image_size}, batch_size=BATCH_ROWS, num_cpus=DATA_TASK_CPUS
            )
        datasets[split] = ds
    return datasets


def check_source(cfg: TrainConfig) -> None:
    """Cheap checks of `data.path`, run before Ray starts: a missing folder, an empty or missing
    train/ or val/, foreign Parquet, or data prepared for another label set or size."""
    if cfg.data.path is None:
        return
    source = Path(cfg.data.path).expanduser()
    if not source.exists():
        raise DataError(f"data folder {source} does not exist")
    if looks_prepared(source) or not pairs.is_pairs_folder(source):
        check_compatible(read_meta(source), source, cfg.data.classes, cfg.data.image_size)
    else:
        for split in pairs.SPLITS:
            _count_files(source, split)


def resolve_prepared(cfg: TrainConfig, run_dir: Path, progress=print) -> tuple[Path, dict[str, Any]]:
    """The prepared folder this run trains on, and its meta.

    - no data.path: synthetic pairs written (once, seeded) under run_dir, then prepared;
    - a pairs folder: prepared under run_dir/prepared, reused while source and settings match;
    - a prepared folder: used as is, after checking its label set and image size.
    """
    d = cfg.data
    if d.path is None:
        source = run_dir / "synthetic_pairs"
        if not (source / "val").is_dir():
            progress(f"data: no --data given; writing {d.synth_train}+{d.synth_val} synthetic pairs to {source}")
            pairs.write_synthetic(source, d.synth_train, d.synth_val, seed=cfg.run.seed)
    else:
        source = Path(d.path).expanduser().resolve()
        if not source.exists():
            raise DataError(f"data folder {source} does not exist")
        if looks_prepared(source) or not pairs.is_pairs_folder(source):
            meta = read_meta(source)
            check_compatible(meta, source, d.classes, d.image_size)
            return source, meta

    target = run_dir / "prepared"
    wanted = {
        "source": str(source.resolve()),
        "classes": d.classes,
        "image_size": d.image_size,
        "source_files": {s: _count_files(source, s) for s in pairs.SPLITS},
    }
    if (target / META_FILE).is_file():
        meta = json.loads((target / META_FILE).read_text())
        if all(meta.get(k) == v for k, v in wanted.items()):
            progress(f"data: reusing {target} (prepared from {source})")
            return target, meta
    meta = prepare(source, target, d.image_size, d.classes, d.skip_bad_files, progress=progress)
    return target, meta


def _count_files(root: Path, split: str) -> int:
    try:
        return len(pairs.list_pairs(root, split))
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
