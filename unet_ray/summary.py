"""What a finished command prints: the end of `unet-ray train` (the result, the run's report
page, the next commands with the run's real paths) and the lines of a Tune sweep.

High in the layers (it writes the report page, so it imports the dashboard); the progress lines
that `prepare`, `train` and `predict` share sit low, in console.py.
"""

from __future__ import annotations

import shlex
import time
import types
from pathlib import Path
from typing import Any

from unet_ray.console import duration


def run_and_report(cfg, progress=print) -> dict[str, Any]:
    """`unet-ray train`: the run (train.run_training), then its result, report page and next
    commands."""
    from unet_ray.train import object_storage_dir, run_dir_of, run_training

    started = time.perf_counter()

    def finish(summary: dict[str, Any], tracked) -> None:  # while the tracked runs are open
        finish_train(summary, run_dir_of(cfg), cfg.data.path, time.perf_counter() - started, progress, tracked,
                     object_storage_dir(cfg))  # fmt: skip

    return run_training(cfg, progress, finish=finish)


def finish_train(summary: dict[str, Any], run_dir: Path, data: str | None, seconds: float, progress=print,
                 tracked=None, storage_dir: str | None = None) -> None:  # fmt: skip
    """The end of `unet-ray train`: the result, the run's report page, the next commands.
    `tracked` (tracking.Tracked): gets the report page, the best checkpoint as its model and, in
    the run's TensorBoard files, a few predicted masks. `storage_dir`: the run's folder on object
    storage (checkpoints, prepared data and a copy of best.json are there), if it has one."""
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
    if tracked is not None:
        track_train_end(tracked, summary, run_dir, data, report)
        for line in tracked.lines():
            progress(line)
    for line in next_commands(run_dir, data, report, storage_dir):
        progress(line)


def track_train_end(tracked, summary: dict[str, Any], run_dir: Path, data: str | None, report: Path | None) -> None:
    """The end of a train run in its tracked runs: masks predicted by the best checkpoint for the
    first validation pairs (photo | true mask | predicted mask) in TensorBoard, the report page
    and the checkpoint (`model`) in MLflow and W&B."""
    import numpy as np

    from unet_ray.checkpoint import resolve
    from unet_ray.dashboard.predictions import NUM_SAMPLES, predict_samples

    from unet_ray import storage

    prepared = run_dir / "prepared"
    if not prepared.is_dir() and data:  # trained on a prepared folder given with --data
        prepared = data if storage.is_uri(data) else Path(data).expanduser()
    try:
        rows, _, _, epoch = predict_samples(resolve(summary["checkpoint"]), prepared, NUM_SAMPLES)
        strips = [(f"predictions/{i}", np.concatenate([r["photo"], r["truth"], r["prediction"]], axis=1))
                  for i, r in enumerate(rows)]  # fmt: skip
        tracked.log_images(strips, int(epoch or summary["metrics"].get("epoch") or 0))
    except Exception as e:  # the run itself succeeded: say why there are no pictures
        print(f"tracking: warning: no predicted masks for TensorBoard ({type(e).__name__}: {e})", flush=True)
    if tracked.remote:
        if report is not None:
            tracked.log_file(report)
        tracked.log_model(summary["checkpoint"])


def next_commands(run_dir: Path, data: str | None, report: Path | None, storage_dir: str | None = None) -> list[str]:
    """The commands to look at a finished train run or sweep (`run_dir`: the run's or the
    experiment's folder; `checkpoint` arguments take either), with its real paths. `report`: the
    page already written, if any. `storage_dir`: the run's folder on object storage, if any."""
    from unet_ray import layouts, storage
    from unet_ray.prepared_format import looks_prepared

    q = shlex.quote
    run = storage_dir or str(run_dir)
    if data is None:  # built-in synthetic pairs
        eval_data = storage.join(storage_dir, "prepared") if storage_dir else run_dir / "prepared"
        photos = run_dir / "synthetic_pairs" / "val"
    else:
        eval_data = data if storage.is_uri(data) else Path(data).expanduser()
        photos = None if looks_prepared(eval_data) else layouts.val_photos(eval_data)
    lines = [
        "next:",
        f"  unet-ray evaluate --checkpoint {q(run)} --data {q(str(eval_data))}",
        f"  unet-ray predict --checkpoint {q(run)} --input {q(str(photos)) if photos else 'PHOTOS_DIR'} "
        f"--out {q(str(run_dir / 'predictions'))}",
        # the report, the dashboard and TensorBoard read the driver's own copy of the run's files
        f"  unet-ray report --results {q(str(run_dir))} --out {q(str(report or run_dir / 'report.html'))}"
        + ("   (written already; again for a fresh copy)" if report else ""),
        f"  unet-ray dashboard --results {q(str(run_dir))}",
        f"  tensorboard --logdir {q(str(run_dir))}",
    ]
    return lines


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
