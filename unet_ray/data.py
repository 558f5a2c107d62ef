"""Ray Data datasets for training and validation, built from a prepared folder.

train: Parquet (read by the driver) -> arrays -> one block per CPU, put in the object store
       (kept there for the run: no epoch reads or decodes again) -> joint augmentation,
       re-run and re-drawn on every epoch.
val:   the same without augmentation.

Also resolves what `--data` points at (nothing, a pairs folder, a prepared folder) into a prepared
folder, preparing it on the way when needed.
"""

from __future__ import annotations

import json
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from unet_ray import pairs
from unet_ray.config import TrainConfig
from unet_ray.prepare import DATA_TASK_CPUS, prepare
from unet_ray.prepared_format import (
    FORMAT,
    META_FILE,
    SKIPPED_FILE,
    DataError,
    check_compatible,
    looks_prepared,
    read_meta,
    read_prepared_split,
)
from unet_ray.transforms import JointAugment

BATCH_ROWS = 64  # rows per Ray Data batch for the decode and augment stages


@lru_cache(maxsize=4)
def _augmenter(image_size: int, preset: str) -> JointAugment:
    if "albumentations" not in sys.modules:
        # A data task never uses albumentations.pytorch (ToTensorV2), whose import pulls in torch:
        # 1.2 of the 1.9 s that the first augment task of every fresh worker process spends
        # importing albumentations (measured), while the training workers wait for a batch.
        sys.modules.setdefault("albumentations.pytorch", None)
    return JointAugment(image_size, preset)


def augment_batch(batch: dict[str, np.ndarray], image_size: int, preset: str = "medium") -> dict[str, np.ndarray]:
    """Task-friendly wrapper: one albumentations pipeline per worker process, built once."""
    return _augmenter(image_size, preset)(batch)


def class_pixel_counts(prepared: str | Path, image_size: int, num_classes: int) -> list[int]:
    """How many training pixels each class has (ignored pixels left out): what class weights are
    computed from. For the road task, [rest, road]."""
    masks = read_prepared_split(prepared, "train", image_size)["mask"]
    counts = np.bincount(masks.ravel(), minlength=256)
    return [int(c) for c in counts[:num_classes]]


def build_datasets(
    prepared: str | Path, image_size: int, augment: str | bool, workers: int = 1, seed: int = 0
) -> dict[str, Any]:
    """train and val as Ray Data datasets. `augment`: a transforms.AUGMENT_PRESETS name (True:
    "medium", False: "none"); `workers`: how many training workers will share val; `seed`: the
    row order of train's blocks (shuffle_rows)."""
    if isinstance(augment, bool):
        augment = "medium" if augment else "none"
    import ray
    from ray.data.block import BlockAccessor

    cpus = int(ray.cluster_resources().get("CPU", 1))
    datasets = {}
    for split in pairs.SPLITS:
        # Read here rather than by `read_parquet` tasks: 0.2 s against 1.3 s warm and 3.6 s cold for
        # 256 rows at 128 px on 2 cores, paid by every run and every Tune trial before its first
        # step. The data stays in the object store for the whole run, so it is read only once.
        arrays = read_prepared_split(prepared, split, image_size)
        if split == "train":
            arrays = shuffle_rows(arrays, seed)
        # train: one block per CPU. Each block is one augment task per epoch, so the augmentation runs
        # on every CPU at once (one block would be augmented by one task, serially). Not
        # smaller: each task costs ~10 ms of Ray overhead (measured: 64-row blocks halved the
        # throughput on 2 cores). The blocks are made here and put in the object store as they
        # are (from_blocks): no Ray tasks, so no worker process to start before training can.
        rows = len(arrays["image"])
        # val is divided among the workers by whole blocks (train.py): one block per worker, so
        # that every worker validates its share of the rows, and no rows are dropped.
        blocks_wanted = _block_count(rows, cpus) if split == "train" else max(1, min(rows, workers))
        bounds = np.linspace(0, rows, blocks_wanted + 1).astype(int)
        blocks = [
            BlockAccessor.batch_to_block({name: a[lo:hi] for name, a in arrays.items()})
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
        ds = ray.data.from_blocks(blocks)
        if split == "train":
            ds = ds.randomize_block_order()  # drawn again every epoch; rows are mixed on the workers
        if split == "train" and augment != "none":
            ds = ds.map_batches(
                augment_batch,
                fn_kwargs={"image_size": image_size, "preset": augment},
                batch_size=BATCH_ROWS,
                num_cpus=DATA_TASK_CPUS,
            )
        datasets[split] = ds
    return datasets


def shuffle_rows(arrays: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """The rows in a random order, the same in every column. Prepared rows are in file order, and in
    the Cityscapes pairs that is city order. Training workers get whole blocks (of the blocks cut
    below, in a random order every epoch) and mix rows only within them, so blocks of file-ordered
    rows gave each worker one half of the cities per epoch: its BatchNorm statistics, and those a
    checkpoint keeps (rank 0's), came from half the cities."""
    order = np.random.default_rng(seed).permutation(len(next(iter(arrays.values()))))
    return {name: column[order] for name, column in arrays.items()}


def steps_per_epoch(train_rows: int, workers: int, batch_size: int, drop_last: bool = False) -> int:
    """Optimizer steps per epoch on each worker: the train split is divided equally among workers
    (rows that do not divide are dropped: DDP needs the same step count everywhere); the last
    batch of a worker is partial, or dropped with `drop_last` (compiled models: one shape)."""
    rows = train_rows // max(workers, 1)
    return max(1, rows // batch_size if drop_last else math.ceil(rows / batch_size))


def _block_count(rows: int, cpus: int) -> int:
    """As many blocks as CPUs, but none smaller than one Ray Data batch."""
    return max(1, min(cpus, math.ceil(rows / BATCH_ROWS)))


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
        "format": FORMAT,  # data prepared by an older version is prepared again
        "source": str(source.resolve()),
        "classes": d.classes,
        "image_size": d.image_size,
        "source_files": {s: _count_files(source, s) for s in pairs.SPLITS},
    }
    if (target / META_FILE).is_file():
        meta = json.loads((target / META_FILE).read_text())
        # Data prepared with --skip-bad-files is reused only by runs that allow skipping too.
        skips_allowed = d.skip_bad_files or not meta.get("skipped")
        if all(meta.get(k) == v for k, v in wanted.items()) and skips_allowed:
            skipped = f"; {meta['skipped']} bad files left out, see {target / SKIPPED_FILE}" if meta.get("skipped") else ""
            progress(f"data: reusing {target} (prepared from {source}{skipped})")
            return target, meta
    meta = prepare(source, target, d.image_size, d.classes, d.skip_bad_files, progress=progress)
    return target, meta


def _count_files(root: Path, split: str) -> int:
    try:
        return len(pairs.list_pairs(root, split))
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
