"""Ray Train: the driver that builds and runs the TorchTrainer.

Three layers, as in Ray's own examples: `train_loop_per_worker` (worker.py, runs on every
worker), `run_training` (here: data, resources, trainer, summary) and, in tune.py, Tune around it.
The driver never imports torch itself: the loop, and with it torch, is imported only to build
the trainer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unet_ray import jsonfile, tracking
from unet_ray import storage as storage_module  # `storage` is the storage path string in this module
from unet_ray.config import ConfigError, TrainConfig, storage_uri
from unet_ray.runfiles import BEST_FILE, HISTORY_FILE
from unet_ray.raysession import check_gpus, ensure_ray, gpu_notice, local_gpus, root_cause

# CPUs kept free for Ray Data tasks when workers' CPUs are worked out automatically.
DATA_RESERVE_CPUS = 0.5
class TrainingFailed(RuntimeError):
    """The run failed; the message carries the first line of the root cause."""


# ---------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------


@dataclass
class WorkerResources:
    cpus_per_worker: float
    torch_threads: int
    use_gpu: bool


def plan_resources(cfg: TrainConfig, cluster_cpus: float, data_reserve: float = DATA_RESERVE_CPUS) -> WorkerResources:
    """CPUs per training worker so that workers and Ray Data tasks always fit together.

    With every CPU held by workers, data tasks could never start and the run would hang; so unless
    the user says otherwise, workers share what is left after a reserve for data tasks.

    An elastic run (workers "MIN-MAX") is sized for MAX workers, so that every worker it may grow
    to fits the CPUs it asks for; only MIN of them must fit the cluster as it is now (the rest may
    come with nodes that join later: pass --cpus-per-worker then, as a share of today's CPUs is
    no measure of tomorrow's nodes).
    """
    r = cfg.run
    if r.cpus_per_worker is not None:
        cpus = r.cpus_per_worker
    elif r.gpu:
        cpus = max(1.0, min(4.0, (cluster_cpus - data_reserve) / r.max_workers))
    else:
        cpus = (cluster_cpus - data_reserve) / r.max_workers
    if cpus * r.min_workers > cluster_cpus - 0.25 + 1e-9 and not r.gpu:
        raise ConfigError(
            f"{r.min_workers} workers x {cpus:g} CPUs do not fit in {cluster_cpus:g} CPUs with room for data "
            "tasks; use fewer workers or a smaller --cpus-per-worker"
        )
    cpus = math.floor(cpus * 100) / 100
    return WorkerResources(cpus, torch_threads=max(1, int(cpus + 0.5)), use_gpu=r.gpu)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _val_unequal_data_config():
    """Split train equally (DDP needs the same number of steps on every worker) and val unequally:
    `equal=True` would drop rows, and validation must see every pixel.

    Train is augmented anew every epoch, so it streams through a split coordinator. Val is
    materialized and never changes: its blocks are divided among the workers once, with no
    coordinator actor to start (one process fewer at start-up) and none to run every epoch.
    """
    import ray.data
    import ray.train
    from ray.data.dataset import MaterializedDataset

    class SplitValUnequally(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                if name == "val" and isinstance(ds, MaterializedDataset):
                    for i, part in enumerate(ds.split(world_size, equal=False)):
                        output[i][name] = part.iterator()
                    continue
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, it in enumerate(ds.streaming_split(world_size, equal=(name == "train"), locality_hints=hints)):
                    output[i][name] = it
            return output

    # Explicit ingest options (the defaults): Ray Train's own defaults set a deprecated field and
    # the dataset manager warned about it on every run.
    return SplitValUnequally(execution_options=ray.data.ExecutionOptions())


def history_callback(run_dir: Path, storage_dir: str | None = None):
    """A Ray Train callback (it runs in the controller, once per report) that appends each epoch's
    metrics and checkpoint path to run_dir/history.jsonl: the record of a run across restarts.
    `storage_dir`: the run's folder on object storage, where a copy of the file is put each time."""
    from ray.train import UserCallback

    class WriteHistory(UserCallback):
        warned = False

        def after_report(self, run_context, metrics, checkpoint):
            where = checkpoint_uri(checkpoint.path, storage_dir) if checkpoint else None
            row = {**metrics[0], "checkpoint": where, "time": time.time()}
            with open(run_dir / HISTORY_FILE, "a") as f:
                f.write(jsonfile.dumps(row) + "\n")
            if storage_dir is None:
                return
            try:
                storage_module.upload(run_dir / HISTORY_FILE, storage_module.join(storage_dir, HISTORY_FILE))
            except storage_module.StorageError as e:  # the copy; the run and its own file go on
                if not self.warned:
                    print(f"[unet-ray] warning: history.jsonl not copied to the storage path ({e}); "
                          "trying again after every epoch", flush=True)  # fmt: skip
                    self.warned = True

    return WriteHistory()


def checkpoint_uri(path: str, storage_dir: str | None) -> str:
    """A checkpoint's path as Ray reports it, as a URI when the run's storage is object storage
    (Ray gives the path within the filesystem: "bucket/runs/r/checkpoint_...")."""
    if storage_dir is None or storage_module.is_uri(path):
        return path
    return f"{storage_dir.split('://', 1)[0]}://{path.lstrip('/')}"


def object_storage_dir(cfg: TrainConfig) -> str | None:
    """<storage path>/<name> when the storage path is a URI (s3://, gs://, ...), else None."""
    return _object_dir(storage_uri(cfg.run.storage_path), cfg.run.name)


def _object_dir(storage: str, run_name: str) -> str | None:
    return storage_module.join(storage, run_name) if storage_module.is_uri(storage) else None


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_trainer(
    cfg: TrainConfig,
    datasets: dict[str, Any],
    meta: dict[str, Any],
    run_name: str,
    storage: str,
    callbacks=(),
    console=None,
    class_weights: list[float] | None = None,
    deadline: float | None = None,
):
    """The TorchTrainer for `cfg` on prepared data described by `meta`; every Tune trial builds
    it too, through `fit`. `console`: what rank 0 prints (console.worker_settings); None prints
    epoch lines only. `class_weights`: the loss weight of each class (None: unweighted).
    `deadline`: unix time by which a run with a time budget must be done (None: no budget)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from unet_ray import console as console_io
    from unet_ray.worker import train_loop_per_worker

    res = plan_resources(cfg, ray.cluster_resources().get("CPU", 0))
    storage_filesystem, storage_path = storage_module.resolve(storage) if storage_module.is_uri(storage) else (None, storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "torch_threads": res.torch_threads,
            # The learning-rate schedule is planned in optimizer steps, and how many steps an epoch
            # has depends on the world size, which an elastic group changes: each worker group
            # works them out from its own size (worker.train_loop_per_worker, data.steps_per_epoch).
            "train_rows": meta["counts"]["train"],
            "native_masks": bool(meta.get("native_size")),
            "console": console,
            "class_weights": class_weights,
            "deadline": deadline,
            "storage_dir": storage_module.redact(f"{storage.rstrip('/')}/{run_name}"),  # named when a checkpoint cannot be written
        },
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            # (MIN, MAX): Ray Train's elastic worker group; an int: a fixed one
            num_workers=(cfg.run.min_workers, cfg.run.max_workers) if cfg.run.elastic else cfg.run.max_workers,
            use_gpu=res.use_gpu,
            resources_per_worker={"CPU": res.cpus_per_worker},
            elastic_resize_monitor_interval_s=cfg.run.resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            # object storage through our filesystem (storage.py: the AWS variables, short timeouts)
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute="val_iou",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=list(callbacks),
            logging_config=console_io.train_logging_config(),
        ),
        datasets=datasets,
        dataset_config=_val_unequal_data_config(),
    )


def run_dir_of(cfg: TrainConfig) -> Path:
    """Where the run's own files go (prepared data, history, best.json): inside the storage path
    when it is a file system; for s3:// or gs:// storage, a local folder of the driver's node."""
    storage = storage_uri(cfg.run.storage_path)
    if "://" in storage:
        return Path.home() / ".unet_ray" / cfg.run.name
    return Path(storage) / cfg.run.name


def fit(
    cfg: TrainConfig,
    run_name: str,
    storage: str,
    run_dir: Path,
    callbacks=(),
    progress=print,
    worker_lines: bool = True,
    deadline: float | None = None,
    tracked=None,
) -> dict[str, Any]:
    """Prepare data, train, and return the summary (best checkpoint and its metrics).

    Shared by `unet-ray train` and every Tune trial. Re-running with the same storage and name
    resumes from the latest checkpoint (Ray Train restores the run's checkpoint state).
    `worker_lines=False` (Tune trials) keeps the workers from printing progress and epoch lines.
    `deadline`: see build_trainer.
    """
    from ray.data import DataContext

    import ray

    from unet_ray.data import build_datasets, choose_ingest, class_pixel_counts, resolve_prepared

    storage_dir = _object_dir(storage, run_name)
    # Our own per-epoch lines show progress; Ray Data's bars flood logs that are not terminals.
    # Set here, not in ensure_ray, so that Tune trial processes get it too.
    DataContext.get_current().enable_progress_bars = False
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared, meta = resolve_prepared(cfg, run_dir, progress)
    progress(
        f"data: {meta['counts']['train']} train / {meta['counts']['val']} val images at {meta['image_size']}px "
        f"({meta.get('layout', 'pairs')} layout), label set {meta['classes']} ({len(meta['class_names'])} classes)"
    )
    ingest, why = choose_ingest(cfg.data.ingest, meta, ray.cluster_resources().get("object_store_memory", 0))
    where = "streaming from " + storage_module.redact(prepared) if ingest == "streaming" else "held in memory"
    progress(f"data: {where} ({why})")
    # val (in memory) in one block per worker of the largest group (a smaller one takes several each)
    datasets = build_datasets(prepared, cfg.data.image_size, cfg.data.augment, workers=cfg.run.max_workers,
                              seed=cfg.run.seed, ingest=ingest)  # fmt: skip
    weights = None
    if cfg.class_weighting != "none":
        from unet_ray.losses import class_weights

        class_pixels = class_pixel_counts(meta, cfg.num_classes)
        weights = class_weights(class_pixels, cfg.class_weighting).tolist()
        named = ", ".join(f"{name} {w:.1f}" for name, w in zip(meta["class_names"], weights))
        progress(f"loss: class weights ({cfg.class_weighting}, from the training pixels): {named}")
    if cfg.model.deep_supervision:
        progress(
            f"loss: + {cfg.model.deep_supervision:g} x deep supervision (heads on the {cfg.model.depth - 1} "
            "coarser decoder levels, training only)"
        )
    from unet_ray.console import worker_settings

    settings = worker_settings(lines=worker_lines)
    trainer = build_trainer(
        cfg,
        datasets,
        meta,
        run_name,
        storage,
        [history_callback(run_dir, storage_dir), *callbacks],
        console=settings,
        class_weights=weights,
        deadline=deadline,
    )
    # `tracked` (tracking.Tracked) logs each row history_callback appends, while training runs
    following = tracked.follow(run_dir / HISTORY_FILE) if tracked is not None else contextlib.nullcontext()
    try:
        with following:
            result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; keep the user's message, not Ray's stack
        raise TrainingFailed(f"training run {run_name} failed: {root_cause(e)}") from e
    if result.error is not None:
        raise TrainingFailed(f"training run {run_name} failed: {root_cause(result.error)}")
    return summarize(result, run_dir, storage_dir)


def summarize(result, run_dir: Path, storage_dir: str | None = None) -> dict[str, Any]:
    """Pick the best checkpoint by val_iou and write best.json in the run folder (and, for a run
    on object storage, in its folder there: what `evaluate --checkpoint s3://...` reads)."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if m.get("val_iou") is not None]
    if not candidates:
        raise TrainingFailed(f"run in {run_dir} finished without a checkpoint")
    best_ckpt, best_metrics = max(candidates, key=lambda cm: cm[1]["val_iou"])
    summary = {
        "checkpoint": checkpoint_uri(best_ckpt.path, storage_dir),
        "metrics": {k: v for k, v in best_metrics.items() if not isinstance(v, (dict,))},
        "last_metrics": dict(result.metrics or {}),
        "run_path": checkpoint_uri(result.path, storage_dir),
    }
    jsonfile.write_atomic(run_dir / BEST_FILE, summary)
    if storage_dir is not None:
        storage_module.upload(run_dir / BEST_FILE, storage_module.join(storage_dir, BEST_FILE))
    return summary


def check_storage(cfg: TrainConfig) -> None:
    """Before any Ray work: URIs that carry credentials are refused (they would be printed and
    saved with the config); an object-storage path's bucket must exist and take our keys."""
    for key, value in (("run.storage_path", cfg.run.storage_path), ("data.path", cfg.data.path)):
        if value and storage_module.is_uri(value) and storage_module.redact(value) != value:
            raise ConfigError(
                f"{key}={storage_module.redact(value)}: credentials in a URI would be printed and saved with the "
                "run's config; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the store's own variables) instead"
            )
    base = storage_uri(cfg.run.storage_path)
    if storage_module.is_uri(base):
        try:
            storage_module.check(base, must_exist=False, what="storage path")
        except storage_module.StorageError as e:
            raise ConfigError(str(e)) from None


def run_training(cfg: TrainConfig, progress=print, finish=None) -> dict[str, Any]:
    """Validate, start or join Ray, train, and return the summary (best checkpoint and metrics).
    `unet-ray train` prints the end of the run as well: summary.run_and_report, through
    `finish(summary, tracked)`, called while the run's tracked runs (tracking.Tracked) are open."""
    from unet_ray.checkpoint import check_resumable
    from unet_ray.data import check_source

    cfg.validate()
    check_storage(cfg)
    check_source(cfg)  # bad data is a clear error before any Ray work
    run_dir = run_dir_of(cfg)
    if "://" not in storage_uri(cfg.run.storage_path):  # a local run folder can be read before Ray starts
        check_resumable(run_dir, cfg.to_dict())
    deadline = None
    if cfg.optim.time_budget is not None:  # counted from here: Ray's start-up is part of the run
        deadline = time.time() + 60 * cfg.optim.time_budget
        progress(
            f"time budget: {cfg.optim.time_budget:g} min, start-up included; after epoch 1 the run plans "
            f"how many of at most {cfg.optim.epochs} epochs fit"
        )
    if cfg.run.gpu and not os.environ.get("RAY_ADDRESS"):  # a local Ray: refused before it starts
        check_gpus(cfg.run.min_workers, True, {"GPU": local_gpus()})
    # Before Ray: an MLflow or W&B server that cannot be reached stops the run here (ConfigError).
    tracked = tracking.start_run(cfg, run_dir, progress)
    with tracked:  # ends the tracked runs: FINISHED, or FAILED (KILLED on Ctrl-C) when training raises
        return _run_started(cfg, run_dir, deadline, tracked, finish, progress)


def _run_started(cfg: TrainConfig, run_dir: Path, deadline, tracked, finish, progress) -> dict[str, Any]:
    """run_training once everything that can be checked without Ray has been."""
    ensure_ray(progress)
    import ray

    # a joined cluster's GPUs: the workers the run needs to start (an elastic run's MIN; the rest
    # may come with nodes that join later)
    check_gpus(cfg.run.min_workers, cfg.run.gpu, ray.cluster_resources())
    notice = gpu_notice(cfg.run.gpu, ray.cluster_resources())
    if notice:
        progress(notice)
    summary = fit(cfg, cfg.run.name, storage_uri(cfg.run.storage_path), run_dir, progress=progress, deadline=deadline,
                  tracked=tracked)
    if finish is not None:
        finish(summary, tracked)
    storage_dir = object_storage_dir(cfg)
    if storage_dir is not None and (run_dir / "report.html").is_file():  # the report `finish` wrote
        storage_module.upload(run_dir / "report.html", storage_module.join(storage_dir, "report.html"))
    return summary
