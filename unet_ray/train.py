"""Ray Train: the driver that builds and runs the TorchTrainer.

Three layers, as in Ray's own examples: `train_loop_per_worker` (worker.py, runs on every
worker), `run_training` (here: data, resources, trainer, summary) and, in tune.py, Tune around it.
The driver never imports torch itself: the loop, and with it torch, is imported only to build
the trainer.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unet_ray import jsonfile
from unet_ray.config import ConfigError, TrainConfig, storage_uri

# CPUs kept free for Ray Data tasks when workers' CPUs are worked out automatically.
DATA_RESERVE_CPUS = 0.5
BEST_FILE = "best.json"
# Ray settings for Ray's processes when they all share one machine: a local Ray (ensure_ray) and
# the nodes of a loopback cluster (`unet-ray cluster up`). Set with setdefault: a user's value wins.
ONE_MACHINE_RAY_ENV = {
    # Ray kills idle task workers beyond one per CPU. Our quarter-CPU data tasks then start a
    # fresh process every epoch and pay ~2 s importing albumentations (and torch) each time.
    "RAY_num_workers_soft_limit": "8",
    # How often Ray Train's controller polls its workers (Ray's default: 2 s, made for large
    # clusters). It also finds a finished run only at its next poll: a tiny 2-epoch run took 41 s
    # instead of 46-47 s from command to "done" (3 runs each, 2-core VM), at the same images/s.
    # Ray Train passes it from the driver to its controller and workers.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


class TrainingFailed(RuntimeError):
    """The run failed; the message carries the first line of the root cause."""


# ---------------------------------------------------------------------------------------------
# Ray session and resources
# ---------------------------------------------------------------------------------------------


def ensure_ray(progress=print) -> None:
    """Join the cluster in RAY_ADDRESS (as inside `ray job submit`), else start a local Ray.

    A local Ray binds every port, the dashboard included, to 127.0.0.1, and keeps Ray's token
    authentication on.
    """
    address = os.environ.get("RAY_ADDRESS", "")
    if not address or any(host in address for host in ("127.0.0.1", "localhost")):
        # A local Ray, or a loopback cluster (unet-ray cluster up): without this Ray on Linux
        # advertises the machine's network address and its servers listen on every interface.
        # Set before `import ray`, which reads it once; see _keep_ray_on_loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        _keep_ray_on_loopback()
    import ray

    if ray.is_initialized():
        return
    # Ray Train's print patch copies every print() of a worker to stderr as well: each progress
    # line would reach the terminal twice. Plain prints still reach the driver through Ray's log
    # forwarding. (Ray Train passes this variable on to the controller and the workers.)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    kwargs = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    if address:
        from unet_ray import console

        # A joined cluster's processes do not inherit this environment: the console settings
        # (console.py) go to them through the job's runtime_env.
        ray.init(runtime_env={"env_vars": console.runtime_env_vars()}, **kwargs)
        progress(f"ray: joined the cluster at {os.environ['RAY_ADDRESS']}")
    else:
        for name, value in ONE_MACHINE_RAY_ENV.items():
            os.environ.setdefault(name, value)
        # Two helpers that cost a 2-core machine CPU while training starts and do nothing here
        # (~1.5 CPU-seconds each, measured): the idle worker processes Ray starts in advance (the
        # training and data tasks of a run cannot use them: Ray Train runs them under its own
        # runtime_env), and Ray Train's watcher for preempted cloud nodes (a local Ray has none).
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        from unet_ray import console

        console.quiet_driver_notices()
        ray.init(address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", **kwargs)
        progress(
            f"ray: started a local Ray on 127.0.0.1 with {ray.cluster_resources().get('CPU', 0):g} CPUs "
            "(token authentication on)"
        )


def _keep_ray_on_loopback() -> None:
    """Make an already imported Ray see RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 too: it reads the
    variable into a constant at import. Measured: set after the import, a local Ray's GCS and
    raylet listened on every interface (0.0.0.0 and ::), not on 127.0.0.1."""
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        constants.ENABLE_RAY_CLUSTER = False


@dataclass
class WorkerResources:
    cpus_per_worker: float
    torch_threads: int
    use_gpu: bool


def plan_resources(cfg: TrainConfig, cluster_cpus: float, data_reserve: float = DATA_RESERVE_CPUS) -> WorkerResources:
    """CPUs per training worker so that workers and Ray Data tasks always fit together.

    With every CPU held by workers, data tasks could never start and the run would hang; so unless
    the user says otherwise, workers share what is left after a reserve for data tasks.
    """
    r = cfg.run
    if r.cpus_per_worker is not None:
        cpus = r.cpus_per_worker
    elif r.gpu:
        cpus = max(1.0, min(4.0, (cluster_cpus - data_reserve) / r.workers))
    else:
        cpus = (cluster_cpus - data_reserve) / r.workers
    if cpus * r.workers > cluster_cpus - 0.25 + 1e-9 and not r.gpu:
        raise ConfigError(
            f"{r.workers} workers x {cpus:g} CPUs do not fit in {cluster_cpus:g} CPUs with room for data "
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


HISTORY_FILE = "history.jsonl"


def history_callback(run_dir: Path):
    """A Ray Train callback (it runs in the controller, once per report) that appends each epoch's
    metrics and checkpoint path to run_dir/history.jsonl: the record of a run across restarts."""
    from ray.train import UserCallback

    class WriteHistory(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            row = {**metrics[0], "checkpoint": checkpoint.path if checkpoint else None, "time": time.time()}
            with open(run_dir / HISTORY_FILE, "a") as f:
                f.write(jsonfile.dumps(row) + "\n")

    return WriteHistory()


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
    from unet_ray.data import steps_per_epoch
    from unet_ray.worker import train_loop_per_worker

    res = plan_resources(cfg, ray.cluster_resources().get("CPU", 0))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "torch_threads": res.torch_threads,
            # the learning-rate schedule is planned in optimizer steps
            "steps_per_epoch": steps_per_epoch(
                meta["counts"]["train"], cfg.run.workers, cfg.optim.batch_size, drop_last=cfg.run.compile
            ),
            "native_masks": bool(meta.get("native_size")),
            "console": console,
            "class_weights": class_weights,
            "deadline": deadline,
        },
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.workers, use_gpu=res.use_gpu, resources_per_worker={"CPU": res.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
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
) -> dict[str, Any]:
    """Prepare data, train, and return the summary (best checkpoint and its metrics).

    Shared by `unet-ray train` and every Tune trial. Re-running with the same storage and name
    resumes from the latest checkpoint (Ray Train restores the run's checkpoint state).
    `worker_lines=False` (Tune trials) keeps the workers from printing progress and epoch lines.
    `deadline`: see build_trainer.
    """
    from ray.data import DataContext

    from unet_ray.data import build_datasets, class_pixel_counts, resolve_prepared

    # Our own per-epoch lines show progress; Ray Data's bars flood logs that are not terminals.
    # Set here, not in ensure_ray, so that Tune trial processes get it too.
    DataContext.get_current().enable_progress_bars = False
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared, meta = resolve_prepared(cfg, run_dir, progress)
    progress(
        f"data: {meta['counts']['train']} train / {meta['counts']['val']} val pairs at {meta['image_size']}px, "
        f"label set {meta['classes']}"
    )
    datasets = build_datasets(prepared, cfg.data.image_size, cfg.data.augment, workers=cfg.run.workers, seed=cfg.run.seed)
    weights = None
    if cfg.class_weighting != "none":
        from unet_ray.losses import class_weights

        class_pixels = class_pixel_counts(prepared, cfg.data.image_size, cfg.num_classes)
        weights = class_weights(class_pixels, cfg.class_weighting).tolist()
        named = ", ".join(f"{name} {w:.1f}" for name, w in zip(meta["class_names"], weights))
        progress(f"loss: class weights ({cfg.class_weighting}, from the training pixels): {named}")
    if cfg.model.deep_supervision:
        progress(
            f"loss: + {cfg.model.deep_supervision:g} x deep supervision (heads on the {cfg.model.depth - 1} "
            "coarser decoder levels, training only)"
        )
    from unet_ray.console import worker_settings

    settings = worker_settings(meta["counts"]["train"], cfg.run.workers, cfg.optim.batch_size, lines=worker_lines)
    trainer = build_trainer(
        cfg,
        datasets,
        meta,
        run_name,
        storage,
        [history_callback(run_dir), *callbacks],
        console=settings,
        class_weights=weights,
        deadline=deadline,
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; keep the user's message, not Ray's stack
        raise TrainingFailed(f"training run {run_name} failed: {_root_cause(e)}") from e
    if result.error is not None:
        raise TrainingFailed(f"training run {run_name} failed: {_root_cause(result.error)}")
    return summarize(result, run_dir)


def summarize(result, run_dir: Path) -> dict[str, Any]:
    """Pick the best checkpoint by val_iou and write best.json in the run folder."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if m.get("val_iou") is not None]
    if not candidates:
        raise TrainingFailed(f"run in {run_dir} finished without a checkpoint")
    best_ckpt, best_metrics = max(candidates, key=lambda cm: cm[1]["val_iou"])
    summary = {
        "checkpoint": best_ckpt.path,
        "metrics": {k: v for k, v in best_metrics.items() if not isinstance(v, (dict,))},
        "last_metrics": dict(result.metrics or {}),
        "run_path": result.path,
    }
    jsonfile.write_atomic(run_dir / BEST_FILE, summary)
    return summary


def _root_cause(error: BaseException) -> str:
    seen = error
    while seen.__cause__ is not None and seen.__cause__ is not seen:
        seen = seen.__cause__
    text = str(seen).strip() or type(seen).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray puts the remote traceback in the message; the last line is the exception itself.
    return lines[-1] if lines else text


def run_training(cfg: TrainConfig, progress=print) -> dict[str, Any]:
    """`unet-ray train`: validate, start or join Ray, train, print and return the summary."""
    from unet_ray.checkpoint import check_resumable
    from unet_ray.data import check_source

    cfg.validate()
    check_source(cfg)  # bad data is a clear error before any Ray work
    run_dir = run_dir_of(cfg)
    if "://" not in storage_uri(cfg.run.storage_path):  # a local run folder can be read before Ray starts
        check_resumable(run_dir, cfg.to_dict())
    from unet_ray.console import finish_train

    started = time.perf_counter()
    deadline = None
    if cfg.optim.time_budget is not None:  # counted from here: Ray's start-up is part of the run
        deadline = time.time() + 60 * cfg.optim.time_budget
        progress(
            f"time budget: {cfg.optim.time_budget:g} min, start-up included; after epoch 1 the run plans "
            f"how many of at most {cfg.optim.epochs} epochs fit"
        )
    ensure_ray(progress)
    summary = fit(cfg, cfg.run.name, storage_uri(cfg.run.storage_path), run_dir, progress=progress, deadline=deadline)
    finish_train(summary, run_dir, cfg.data.path, time.perf_counter() - started, progress)
    return summary
