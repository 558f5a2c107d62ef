"""What a run prints: Ray kept quiet by default, live progress in each epoch, one line per epoch,
and the next commands at the end. `-v/--verbose` lets Ray say everything again.

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
import shlex
import sys
import time
import types
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

VERBOSE_ENV = "UNET_RAY_VERBOSE"  # "1": Ray says everything; read by Tune trial processes too
# Set before Ray starts in quiet mode; see the module docstring.
QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "ERROR", "RAY_DISABLE_WORKER_LOG_PREFIX": "1"}
PROGRESS_EVERY_TTY_S = 5.0
PROGRESS_EVERY_LOG_S = 15.0
TAG = "[unet-ray]"
EPOCH_LINES_ONLY = {"lines": True, "verbose": False, "batches": 1, "every_s": float("inf")}


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


def worker_settings(train_rows: int, workers: int, batch_size: int, lines: bool = True) -> dict[str, Any]:
    """What rank 0 needs to print progress: built by the driver, sent in train_loop_config.
    `lines=False` (Tune trials) keeps the workers silent: the sweep prints trial events."""
    from unet_ray.data import steps_per_epoch

    return {
        "lines": lines,
        "verbose": is_verbose(),
        "batches": steps_per_epoch(train_rows, workers, batch_size),
        "every_s": progress_every_s(),
    }


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


# ---------------------------------------------------------------------------------------------
# Driver: the end of a run
# ---------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def finish_train(summary: dict[str, Any], run_dir: Path, data: str | None, seconds: float, progress=print) -> None:
    """The end of `unet-ray train`: the result, the run's report page, the next commands."""
    from unet_ray.dashboard.report import write_report
    from unet_ray.dashboard.results import DashboardError

    m = summary["metrics"]
    progress(
        f"done in {duration(seconds)}: best val_iou {m['val_iou']:.4f} at epoch {m['epoch']} "
        f"(pixel accuracy {m['val_pixel_accuracy']:.4f})"
    )
    progress(f"run folder: {run_dir}  (best.json, history.jsonl; best checkpoint {summary['checkpoint']})")
    report = run_dir / "report.html"
    try:
        write_report(run_dir, report)
        progress(f"report: {report}  (curves, IoU per class, predicted masks; opens with no network)")
    except (DashboardError, OSError) as e:  # the run itself succeeded: say why there is no page
        report = None
        progress(f"report: not written ({e})")
    for line in next_commands(run_dir, data, report):
        progress(line)


def next_commands(run_dir: Path, data: str | None, report: Path | None) -> list[str]:
    """The commands to look at a finished train run or sweep (`run_dir`: the run's or the
    experiment's folder; `checkpoint` arguments take either), with its real paths. `report`: the
    page already written, if any."""
    from unet_ray.prepare import looks_prepared

    q = shlex.quote
    run = str(run_dir)
    if data is None:  # built-in synthetic pairs
        eval_data, photos = run_dir / "prepared", run_dir / "synthetic_pairs" / "val"
    else:
        eval_data = Path(data).expanduser()
        photos = None if looks_prepared(eval_data) else eval_data / "val"
    lines = [
        "next:",
        f"  unet-ray evaluate --checkpoint {q(run)} --data {q(str(eval_data))}",
        f"  unet-ray predict --checkpoint {q(run)} --input {q(str(photos)) if photos else 'PHOTOS_DIR'} "
        f"--out {q(str(run_dir / 'predictions'))}",
        f"  unet-ray report --results {q(run)} --out {q(str(report or run_dir / 'report.html'))}"
        + ("   (written already; again for a fresh copy)" if report else ""),
        f"  unet-ray dashboard --results {q(run)}",
    ]
    return lines


# ---------------------------------------------------------------------------------------------
# Driver: a Tune sweep
# ---------------------------------------------------------------------------------------------


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _say(*args, **kwargs) -> None:
    """print(), looked up when called: Tune pickles its callbacks with the run config, and the
    builtin itself cannot be pickled once Ray has patched `print` in this process."""
    print(*args, **kwargs, flush=True)


def trial_lines(max_epochs: int, printer=None):
    """A Tune callback (it runs in the driver) that prints one line per trial event: started,
    each epoch's result, finished or stopped early by the scheduler, errored."""
    from ray.tune import Callback

    if printer is None or isinstance(printer, types.BuiltinFunctionType):  # print itself: see _say
        printer = _say

    class TrialLines(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            printer(f"tune: trial {trial.trial_id} started  {format_params(trial.config)}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "val_iou" in result and "epoch" in result:
                printer(
                    f"tune: trial {trial.trial_id} epoch {result['epoch']}/{max_epochs}  val_iou {result['val_iou']:.4f}  "
                    f"loss {result.get('train_loss', float('nan')):.4f}",
                )

        def on_trial_complete(self, iteration, trials, trial, **info):
            epoch = (trial.last_result or {}).get("epoch", 0)
            how = "finished" if epoch >= max_epochs else f"stopped early by the scheduler after epoch {epoch}"
            printer(f"tune: trial {trial.trial_id} {how}")

        def on_trial_error(self, iteration, trials, trial, **info):
            printer(f"tune: trial {trial.trial_id} errored (its error is in {trial.local_path or 'its folder'}/error.txt)")

    return TrialLines()
