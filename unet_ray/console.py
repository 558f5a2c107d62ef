"""What a run prints while it works: Ray kept quiet by default, live progress in each epoch and in
`prepare` and `predict`, one line per epoch. `-v/--verbose` lets Ray say everything again. Low in
the layers (it imports nothing of this package): the end of a run is printed by summary.py.

Quiet is done with Ray's own settings, never by filtering text (Ray 2.60):
- Ray Train (controller and workers: worker-group lines, "Moving model to device", ...):
  `RunConfig(logging_config=ray.train.LoggingConfig(log_level="WARNING"))`; it travels with the
  run config to every process of the run. See `train_logging_config`. The per-report dumps
  ("Reporting training result N: TrainingReport(...)") come from a logger outside `ray.train`:
  the worker sets its level (`quiet_train_worker`).
- Ray Data (execution plans, "execution finished" lines, "Progress bars disabled" warnings, in the
  driver, the split coordinator and the workers): `RAY_DATA_LOG_LEVEL=ERROR`, read by every
  process when it imports ray.data. A local Ray's processes inherit the driver's environment when
  it is set before `ray.init`; on a joined cluster it goes in the job's runtime_env
  (`runtime_env_vars`). Ray Data's warnings are about how this package drives Ray Data (the user
  writes no Ray Data code), so in the quiet console they count as Ray's internals.
- Ray core in the driver: its `ray` logger at WARNING (ray.init's logging_level), and the logger
  of Ray's notice that a new local cluster has token authentication on at ERROR (our own start
  line says so). Setting RAY_AUTH_MODE=token instead would avoid the notice, but Ray reads that
  variable at import: set later, the local Ray refused its own driver (measured).
- The "(RayTrainWorker pid=...)" prefix of forwarded worker lines: `RAY_DISABLE_WORKER_LOG_PREFIX`,
  read by the driver when it imports ray, so `setup` must run before that.
Errors are never hidden: a failed run ends with its root cause (train.TrainingFailed), and what
Ray logs at ERROR still reaches the console.

Live progress inside an epoch: the training workers are other processes whose stdout reaches the
driver through Ray's log forwarding, line by line and never as a terminal, so a redrawn bar
cannot cross it. Rank 0 therefore prints one plain line (tqdm's `format_meter`, ASCII) every
`every_s` seconds: 5 s when the driver writes to a terminal, 15 s otherwise (log files,
`ray job logs`), so a log grows by at most 4 lines a minute. No extra actor or queue: on a
2-core machine each extra Ray process costs about a second of start-up.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

VERBOSE_ENV = "UNET_RAY_VERBOSE"  # "1": Ray says everything; read by Tune trial processes too
# Set before Ray starts in quiet mode; see the module docstring.
QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "ERROR", "RAY_DISABLE_WORKER_LOG_PREFIX": "1"}
PROGRESS_EVERY_TTY_S = 5.0
PROGRESS_EVERY_LOG_S = 15.0
TAG = "[unet-ray]"
EPOCH_LINES_ONLY = {"lines": True, "verbose": False, "every_s": float("inf")}


def setup(verbose: bool) -> None:
    """Choose quiet or verbose for this process and every Ray process it starts. Call it before
    `import ray`; a variable the user set already wins."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def runtime_env_vars() -> dict[str, str]:
    """Environment variables a joined cluster's processes need for the same console (a local Ray
    inherits them). Keys the submitted job's runtime_env already sets are left to it: Ray refuses
    to merge a ray.init runtime_env that repeats one of them."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job_env: dict[str, Any] = {}
    if RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ:
        job = json.loads(os.environ[RAY_JOB_CONFIG_JSON_ENV_VAR])
        job_env = ((job.get("runtime_env") or {}).get("env_vars")) or {}
    wanted = {VERBOSE_ENV: os.environ.get(VERBOSE_ENV, "0")}
    if "RAY_DATA_LOG_LEVEL" in os.environ:
        wanted["RAY_DATA_LOG_LEVEL"] = os.environ["RAY_DATA_LOG_LEVEL"]
    return {k: v for k, v in wanted.items() if k not in job_env}


def quiet_driver_notices() -> None:
    """Quiet mode: Ray's notice, on every local start, that token authentication is on."""
    if not is_verbose():
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def train_logging_config():
    """Ray Train's console level for the controller and the workers of a run."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")


# ---------------------------------------------------------------------------------------------
# Training workers (rank 0 prints)
# ---------------------------------------------------------------------------------------------


def worker_settings(lines: bool = True) -> dict[str, Any]:
    """What rank 0 needs to print progress: built by the driver, sent in train_loop_config (the
    worker adds its group's batches per epoch: an elastic group's size may change). `lines=False`
    (Tune trials) keeps the workers silent: the sweep prints trial events."""
    return {"lines": lines, "verbose": is_verbose(), "every_s": progress_every_s()}


def quiet_train_worker(settings: dict[str, Any]) -> None:
    """On a training worker, in quiet mode: Ray Train logs each `ray.train.report` call with all
    its metrics ("Reporting training result N: TrainingReport(...)") through a logger named after
    its file, outside `ray.train`, so RunConfig's logging_config does not reach it; its level
    does."""
    if settings.get("verbose"):
        return
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def progress_line(epoch: int, epochs: int, done: int, total: int, elapsed: float, images_per_s: float) -> str:
    from tqdm import tqdm

    return tqdm.format_meter(
        done, max(total, done), elapsed, prefix=f"{TAG} training epoch {epoch}/{epochs}", ascii=True,
        unit="batch", postfix=f"{images_per_s:.1f} img/s",
        bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} batches{postfix}, {remaining} left",
    )


def track(
    batches: Iterable[Any], settings: dict[str, Any] | None, epoch: int, epochs: int, world_size: int, printer=print
) -> Iterable[Any]:
    """`batches` as they are; every `every_s` seconds one progress line (rank 0 only: pass
    settings=None elsewhere). img/s counts all workers (rank 0's rate times the world size)."""
    if not settings or not settings.get("lines"):
        return batches
    return _tracked(iter(batches), settings, epoch, epochs, world_size, printer)


def _tracked(batches: Iterator[Any], settings: dict[str, Any], epoch: int, epochs: int, world: int, printer) -> Iterator[Any]:
    start = last = time.perf_counter()
    done = images = 0
    for batch in batches:
        yield batch
        done += 1
        images += len(batch["image"])
        now = time.perf_counter()
        if now - last >= settings["every_s"] and done < settings["batches"]:
            last = now
            printer(progress_line(epoch, epochs, done, settings["batches"], now - start, images * world / (now - start)),
                    flush=True)


def progress_every_s() -> float:
    """Seconds between progress lines: 5 on a terminal, 15 in a log (see the module docstring)."""
    return PROGRESS_EVERY_TTY_S if sys.stdout.isatty() else PROGRESS_EVERY_LOG_S


class CountProgress:
    """Progress of work counted in items (pairs decoded by `prepare`) seen by the driver: one
    plain line (tqdm's `format_meter`) at most every `every_s` seconds, never a redrawn bar, so
    it reads the same in a terminal and in `ray job logs`."""

    def __init__(self, label: str, total: int, unit: str, printer=print, every_s: float | None = None):
        self.label, self.total, self.unit, self.printer = label, total, unit, printer
        self.every_s = progress_every_s() if every_s is None else every_s
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        from tqdm import tqdm

        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            self.printer(tqdm.format_meter(
                self.done, self.total, now - self.start, prefix=self.label, ascii=True,
                postfix=f"{self.done / (now - self.start):.1f} {self.unit}/s",
                bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} " + self.unit + "{postfix}, {remaining} left",
            ))


def epoch_line(report: dict[str, Any], epochs: int) -> str:
    """val_iou at the training size; "native" at the pairs' own 256x256 masks (logits upsampled)."""
    native = f" (native {report['val_iou_native']:.4f})" if report.get("val_iou_native") is not None else ""
    lr = f"  lr {report['lr']:.2g}" if "lr" in report else ""
    return (
        f"{TAG} epoch {report['epoch']}/{epochs}  loss {report['train_loss']:.4f}  val_iou {report['val_iou']:.4f}{native}  "
        f"pixel_acc {report['val_pixel_accuracy']:.4f}{lr}  {report['images_per_s']:.1f} img/s  {report['epoch_seconds']:.1f}s"
    )


def budget_line(budget_min: float, planned: int, max_epochs: int, epoch_s: float, seconds_left: float) -> str:
    """A time-budget run's plan, printed when an epoch sets or changes it."""
    return (
        f"{TAG} time budget {budget_min:g} min: {planned} epochs fit (at most {max_epochs}; "
        f"~{epoch_s:.1f}s an epoch, {duration(max(seconds_left, 0.0))} left); the schedule now spans {planned}"
    )


def duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"

