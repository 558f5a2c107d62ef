"""Ray Data datasets for training and validation, built from a prepared folder, on one of two
ingest paths (data.ingest; "auto" picks by size, see choose_ingest):

memory:    Parquet (read by the driver) -> arrays -> one block per CPU, put in the object store
           (kept there for the run: no epoch reads or decodes again) -> joint augmentation,
           re-run and re-drawn on every epoch. Quick to start; the driver holds the data 2-3x.
streaming: Ray Data read tasks on the cluster's nodes read the part files from storage every
           epoch (a row group per block, the files in a new random order each epoch), and the
           same tasks turn them into arrays and augment them; blocks stream through the object
           store (bounded by Ray Data's backpressure) to the workers. The driver holds no rows.
val:       the same without augmentation (in memory: split among the workers once).

Where rows are mixed, on both paths: the prepared train rows are in a fixed random order
(prepare.py), so every block holds rows from the whole data set; each epoch the blocks (memory)
or files (streaming) come in a new random order, and each worker mixes the rows of the blocks
it receives in a shuffle buffer of a few batches (worker.shuffled_batches).

Also decides what `--data` points at (nothing, a data folder in one of layouts.LAYOUTS, a prepared
folder; check_source, before Ray starts) and turns it into a prepared folder, preparing it on the
way when needed (resolve_prepared).
"""

from __future__ import annotations

import json
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from unet_ray import layouts, palette, pairs, storage
from unet_ray.config import TrainConfig, image_shape, storage_uri
from unet_ray.prepare import DATA_TASK_CPUS, prepare, source_layout
from unet_ray.prepared_format import (
    FORMAT,
    META_FILE,
    SKIPPED_FILE,
    DataError,
    check_compatible,
    looks_prepared,
    prepared_arrays,
    read_meta,
    read_prepared_split,
)
from unet_ray.transforms import JointAugment

BATCH_ROWS = 64  # rows per Ray Data batch for the decode and augment stages


# "auto" keeps the data in memory up to this share of the cluster's object store (the blocks stay
# there for the whole run, beside what training itself puts in it) and this many bytes (the
# driver holds 2-3 copies while it builds the blocks); larger data streams.
MEMORY_INGEST_STORE_SHARE = 0.25
MEMORY_INGEST_MAX_BYTES = 2 * 2**30


@lru_cache(maxsize=4)
def _augmenter(image_size: int | str, preset: str) -> JointAugment:
    if "albumentations" not in sys.modules:
        # A data task never uses albumentations.pytorch (ToTensorV2), whose import pulls in torch:
        # 1.2 of the 1.9 s that the first augment task of every fresh worker process spends
        # importing albumentations (measured), while the training workers wait for a batch.
        sys.modules.setdefault("albumentations.pytorch", None)
    return JointAugment(image_shape(image_size), preset)


def augment_batch(batch: dict[str, np.ndarray], image_size: int | str, preset: str = "medium") -> dict[str, np.ndarray]:
    """Task-friendly wrapper: one albumentations pipeline per worker process, built once."""
    return _augmenter(image_size, preset)(batch)


def class_pixel_counts(meta: dict[str, Any], num_classes: int) -> list[int]:
    """How many training pixels each class has (ignored pixels left out): what class weights are
    computed from, counted by prepare (meta.json). For the road task, [rest, road]."""
    return [int(c) for c in meta["class_pixels"][:num_classes]]


def choose_ingest(mode: str, meta: dict[str, Any], object_store_bytes: float) -> tuple[str, str]:
    """("memory" or "streaming", the reason in words) for data.ingest `mode` and prepared data
    described by `meta` on a cluster with `object_store_bytes` of object store."""
    size = meta["bytes"]
    held = f"{size / 2**30:.2f} GB prepared, object store {object_store_bytes / 2**30:.1f} GB"
    if mode != "auto":
        return mode, f"data.ingest={mode}; {held}"
    if size <= min(MEMORY_INGEST_STORE_SHARE * object_store_bytes, MEMORY_INGEST_MAX_BYTES):
        return "memory", f"{held}: small enough to hold (--ingest streaming streams it)"
    limit = f"{MEMORY_INGEST_STORE_SHARE:.0%} of the store or {MEMORY_INGEST_MAX_BYTES / 2**30:g} GB"
    return "streaming", f"{held}: more than {limit}"


def build_datasets(
    prepared: str | Path,
    image_size: int,
    augment: str | bool,
    workers: int = 1,
    seed: int = 0,
    ingest: str = "memory",
) -> dict[str, Any]:
    """train and val as Ray Data datasets. `augment`: a transforms.AUGMENT_PRESETS name (True:
    "medium", False: "none"); `workers`: how many training workers will share val; `seed`: the
    row order of train's blocks (shuffle_rows), or of its files each epoch (streaming);
    `ingest`: "memory" or "streaming" (see the module's docstring)."""
    if isinstance(augment, bool):
        augment = "medium" if augment else "none"
    if ingest == "streaming":
        return _streaming_datasets(prepared, image_size, augment, seed)
    return _memory_datasets(prepared, image_size, augment, workers, seed)


def _streaming_datasets(prepared: str | Path, image_size: int, augment: str, seed: int) -> dict[str, Any]:
    import ray
    from ray.data import DataContext

    datasets = {}
    native = read_meta(prepared).get("native_size") is not None  # pairs' val rows have mask_native
    for split in pairs.SPLITS:
        columns = ["image", "mask"] + (["mask_native"] if split == "val" and native else [])
        # Ray 2.60's default Parquet reader (V2) lists the files in a task of its own that asks
        # for a whole CPU, which `num_cpus` does not reach: beside two training workers on 2 CPUs
        # it never runs and training waits forever (seen). The V1 reader lists in the driver and
        # its read tasks ask for DATA_TASK_CPUS. The dataset keeps the context it was made with.
        context = DataContext.get_current()
        v2, context.use_datasource_v2 = context.use_datasource_v2, False
        filesystem, path = storage.resolve(storage.join(prepared, split))  # a local folder or a URI
        try:
            ds = ray.data.read_parquet(
                path,
                filesystem=filesystem,
                columns=columns,
                # a new file order every epoch (reseeded per execution), reproducible from the seed
                shuffle=ray.data.FileShuffleConfig(seed=seed) if split == "train" else None,
                num_cpus=DATA_TASK_CPUS,
            )
        finally:
            context.use_datasource_v2 = v2
        # bytes -> arrays -> augmented arrays. With as many part files as read tasks (data
        # sets of more than a few files) Ray fuses this with the read into one task, on the node
        # that read the rows; a small set, read in fewer tasks and split, gets tasks of its own.
        ds = ds.map_batches(
            rows_to_batch,
            fn_kwargs={"image_size": image_size, "preset": augment if split == "train" else "none"},
            batch_format="pyarrow",
            batch_size=None,  # a whole block: one row group
            num_cpus=DATA_TASK_CPUS,
        )
        datasets[split] = ds
    return datasets


def rows_to_batch(rows: Any, image_size: int, preset: str = "none") -> dict[str, np.ndarray]:
    """Prepared rows (an Arrow table) -> uint8 arrays, augmented with `preset` ("none": as they are)."""
    arrays = prepared_arrays(rows, image_size, "prepared rows")
    if preset == "none":
        return {name: np.array(a) for name, a in arrays.items()}  # writable copies of the Arrow buffers
    return augment_batch(arrays, image_size, preset)


def _memory_datasets(prepared: str | Path, image_size: int, augment: str, workers: int, seed: int) -> dict[str, Any]:
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
    """Decide what `data.path` (a folder or a URI) is, with cheap checks, before Ray starts: a
    missing folder, bucket or object, refused credentials, no known layout, an empty split, images
    without masks (or masks without images), foreign Parquet, or data prepared for another label
    set or size: each a DataError. Sets data.layout, and data.classes from "auto" to the layout's
    own (with a folders layout's class names and colours), on `cfg`."""
    d = cfg.data
    if d.path is None:
        return
    source = _source(d.path)
    if looks_prepared(source):
        meta = read_meta(source)
        check_compatible(meta, storage.redact(source), d.classes, d.image_size)
        d.layout = meta.get("layout", "pairs")
        classes = None  # road and cityscapes19 are known; a data set's own classes come from meta.json
        if meta["classes"] == "custom":
            try:
                classes = palette.class_set("custom", meta["class_names"], [palette.parse_color(c) for c in meta["class_colors"]])
            except (KeyError, ValueError) as e:
                raise DataError(f"{storage.redact(source)}: meta.json has no usable class names and colours ({e}); prepare it again") from None
        cfg.with_classes(meta["classes"], classes)
        return
    found = source_layout(source, d.layout, d.val_fraction)  # lists every split: an empty one is an error
    found.check_paired(d.skip_bad_files)
    d.layout = found.kind
    cfg.with_classes(layouts.check_classes(found, d.classes), found.classes)


def _source(path: str) -> str | Path:
    """`data.path` as a local Path or a URI, checked to be there (DataError: one line)."""
    if storage.is_uri(path):
        try:
            storage.check(path, must_exist=True, what="data")
        except storage.StorageError as e:
            raise DataError(str(e)) from None
        return path
    source = Path(path).expanduser().resolve()
    if not source.exists():
        raise DataError(f"data folder {source} does not exist")
    return source


def prepared_target(cfg: TrainConfig, run_dir: Path) -> str | Path:
    """Where a run prepares its data: <storage path>/<name>/prepared, on object storage too (the
    streaming path's read tasks on every node read it from there)."""
    base = storage_uri(cfg.run.storage_path)
    return storage.join(base, cfg.run.name, "prepared") if storage.is_uri(base) else run_dir / "prepared"


def resolve_prepared(cfg: TrainConfig, run_dir: Path, progress=print) -> tuple[str | Path, dict[str, Any]]:
    """The prepared folder (a local Path or a URI) this run trains on, and its meta. Needs
    check_source(cfg) first (it resolves data.layout and data.classes).

    - no data.path: synthetic pairs written (once, seeded) under run_dir, then prepared;
    - a data folder: prepared into prepared_target, reused while source and settings match;
    - a prepared folder: used as is, after checking its label set and image size.
    """
    d = cfg.data
    if d.path is None:
        source = run_dir / "synthetic_pairs"
        if not (source / "val").is_dir():
            progress(f"data: no --data given; writing {d.synth_train}+{d.synth_val} synthetic pairs to {source}")
            pairs.write_synthetic(source, d.synth_train, d.synth_val, seed=cfg.run.seed)
    else:
        source = _source(d.path)
        if looks_prepared(source):
            meta = read_meta(source)
            check_compatible(meta, storage.redact(source), d.classes, d.image_size)
            return source, meta

    found = source_layout(source, d.layout, d.val_fraction)
    target = prepared_target(cfg, run_dir)
    wanted = {
        "format": FORMAT,  # data prepared by an older version is prepared again
        "source": storage.redact(source),
        "layout": found.kind,
        "classes": d.classes,
        "class_names": list(cfg.class_set.names),
        "image_size": d.image_size,
        "source_files": {s: len(found.items(s)[0]) for s in pairs.SPLITS},
    }
    meta_file = storage.join(target, META_FILE)
    if storage.is_file(meta_file):
        meta = json.loads(storage.read_text(meta_file))
        # Data prepared with --skip-bad-files is reused only by runs that allow skipping too.
        skips_allowed = d.skip_bad_files or not meta.get("skipped")
        if all(meta.get(k) == v for k, v in wanted.items()) and skips_allowed:
            skipped = f"; {meta['skipped']} bad files left out, see {storage.join(target, SKIPPED_FILE)}" if meta.get("skipped") else ""
            progress(f"data: reusing {storage.redact(target)} (prepared from {storage.redact(source)}{skipped})")
            return target, meta
    meta = prepare(source, target, d.image_size, d.classes, d.skip_bad_files, progress=progress, found=found)
    return target, meta
