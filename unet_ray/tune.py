"""Ray Tune around the training driver: every trial is a full Ray Train run.

The Ray 2.60 way: a function trial builds the same TorchTrainer as `unet-ray train` (through
`train.fit`, imported, not copied) and forwards its reports to Tune with `TuneReportCallback`.
ASHA stops poor trials early; an interrupted sweep continues with `--resume`.

Layout under <storage>/<name>/ (Tune's experiment folder):
    <trial folders>            Tune's own: params.json, result.json, progress.csv, TensorBoard events
    prepared/                  the data, prepared once by the driver for all trials
    runs/<trial_id>/           each trial's Ray Train run: checkpoints, history.jsonl
    best.json                  the best trial: id, config, val_iou, checkpoint
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unet_ray import jsonfile, tracking
from unet_ray.runfiles import BEST_FILE, RUNS_DIR
from unet_ray.config import SEARCHABLE, ConfigError, TrainConfig, coerce, load_yaml, merge, storage_uri

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
TRIAL_DRIVER_CPUS = 0.01  # a trial's own process only waits on its TorchTrainer


@dataclass
class TuneSection:
    num_samples: int = 4
    scheduler: str = "asha"  # asha | fifo
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0
    searcher: str = "random"  # random | optuna
    seed: int | None = 0
    max_concurrent_trials: int | None = None  # None: as many as the cluster's resources allow


@dataclass
class SweepConfig:
    base: TrainConfig
    search: dict[str, dict[str, Any]]
    tune: TuneSection = field(default_factory=TuneSection)


def load_sweep(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and check a tune YAML; every mistake is a ConfigError before any trial starts."""
    raw = load_yaml(path)
    origin = str(path)
    search = raw.pop("search", None)
    tune_raw = raw.pop("tune", {}) or {}
    overrides = dict(overrides or {})
    num_samples = overrides.pop("tune.num_samples", None)
    base = merge(TrainConfig(), raw, origin)
    if overrides:
        base = merge(base, overrides, "command line")
    if "run.name" not in overrides and "name" not in (raw.get("run") or {}):
        base.run.name = Path(path).stem
    base.validate()
    if base.optim.time_budget is not None:
        # ASHA compares trials at fixed epochs (its rungs), and optim.epochs is its max_t
        raise ConfigError(
            f"{origin}: optim.time_budget={base.optim.time_budget} is for `unet-ray train` runs; a sweep "
            "trains each trial for optim.epochs (ASHA stops the weak ones early)"
        )
    if "://" in storage_uri(base.run.storage_path):
        # Trials run on any node and read the prepared data and write their Train runs under the
        # experiment folder, so it must be a file system that every node mounts at the same path.
        raise ConfigError(
            f"run.storage_path={base.run.storage_path}: a sweep needs a file system path shared by all nodes "
            "(NFS, EFS, a mounted bucket), not an object-store URI; see cluster/README.md"
        )
    if not isinstance(tune_raw, dict):
        raise ConfigError(f"{origin}: tune: must be a mapping")
    tune_section = TuneSection()
    hints = typing.get_type_hints(TuneSection)
    for key, value in tune_raw.items():
        if key not in hints:
            raise ConfigError(f"{origin}: unknown key tune.{key}; known: {', '.join(hints)}")
        setattr(tune_section, key, coerce(value, hints[key], f"{origin}: tune.{key}"))
    if num_samples is not None:
        tune_section.num_samples = num_samples
    _check_tune(tune_section, origin)
    sweep = SweepConfig(base, _check_search(search, base, origin), tune_section)
    return sweep


def _check_tune(t: TuneSection, origin: str) -> None:
    if t.num_samples < 1:
        raise ConfigError(f"{origin}: tune.num_samples={t.num_samples}: must be >= 1")
    if t.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"{origin}: tune.scheduler={t.scheduler!r}: choose asha or fifo")
    if t.searcher not in ("random", "optuna"):
        raise ConfigError(f"{origin}: tune.searcher={t.searcher!r}: choose random or optuna")
    if t.grace_period < 1 or t.reduction_factor <= 1:
        raise ConfigError(f"{origin}: tune.grace_period must be >= 1 and tune.reduction_factor > 1")
    if t.max_concurrent_trials is not None and t.max_concurrent_trials < 1:
        raise ConfigError(f"{origin}: tune.max_concurrent_trials must be >= 1")


def _check_search(search: Any, base: TrainConfig, origin: str) -> dict[str, dict[str, Any]]:
    """Each key searchable, each distribution well formed, and every value it can take valid."""
    if not isinstance(search, dict) or not search:
        raise ConfigError(f"{origin}: a `search:` section with at least one of {', '.join(SEARCHABLE)} is required")
    checked = {}
    for key, spec in search.items():
        where = f"{origin}: search.{key}"
        if key not in SEARCHABLE:
            raise ConfigError(f"{where}: unknown search key; searchable: {', '.join(SEARCHABLE)}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: give one of {', '.join(DISTRIBUTIONS)}, e.g. {{loguniform: [1e-4, 1e-2]}}")
        kind, values = next(iter(spec.items()))
        section, name = SEARCHABLE[key].split(".")
        hint = typing.get_type_hints(type(getattr(base, section)))[name]  # the annotation, as coerce reads it
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
        values = [coerce(v, hint, where) for v in values]
        if kind == "choice":
            candidates = values
        else:
            if len(values) != 2 or not values[0] < values[1]:
                raise ConfigError(f"{where}: {kind} needs [low, high] with low < high, got {values}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: loguniform bounds must be positive, got {values}")
            candidates = values
        for v in candidates:  # each bound / choice must make a valid run config
            try:
                merge(base, {SEARCHABLE[key]: v}, where).validate(check_paths=False)
            except ConfigError as e:
                raise ConfigError(f"{where}: value {v!r} is not valid here: {e}") from None
        checked[key] = {kind: values}
    return checked


def param_space(search: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ray import tune

    make = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": lambda a, b: tune.randint(a, b + 1)}
    space = {}
    for key, spec in search.items():
        kind, values = next(iter(spec.items()))
        space[key] = tune.choice(values) if kind == "choice" else make[kind](*values)
    return space


def trial_config(base: dict[str, Any], params: dict[str, Any], prepared: str) -> TrainConfig:
    cfg = merge(TrainConfig.from_dict(base), {SEARCHABLE[k]: v for k, v in params.items() if k in SEARCHABLE}, "trial")
    cfg.data.path = prepared
    return cfg.validate()


def make_trainable(base: dict[str, Any], prepared: str, experiment: str):
    """The function each trial runs: one Ray Train run of the shared driver, reporting to Tune."""

    def run_trial(params: dict[str, Any]) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from unet_ray.console import is_verbose
        from unet_ray.train import fit, read_history

        trial_id = tune.get_context().get_trial_id()
        cfg = trial_config(base, params, prepared)
        runs = Path(experiment) / RUNS_DIR
        finished = _finished_run_report(read_history(runs / trial_id), cfg.optim.epochs)
        if finished is not None:
            # The Train run ended before the sweep was interrupted, but Tune never recorded its
            # last report. Training again would report nothing (no epoch left) and leave the trial
            # without a result: hand Tune the run's recorded last epoch instead.
            tune.report(finished)
            return
        # Same (storage, name) on a resumed trial: Ray Train restores its latest checkpoint.
        # The workers stay silent unless --verbose: the sweep's driver prints each trial's events.
        fit(cfg, trial_id, str(runs), runs / trial_id, callbacks=[TuneReportCallback()], progress=lambda *_: None,
            worker_lines=is_verbose())

    return run_trial


def _finished_run_report(history: list[dict[str, Any]], epochs: int) -> dict[str, Any] | None:
    """The last epoch's metrics of a Train run that already trained all `epochs`, else None."""
    if not history or history[-1]["epoch"] < epochs:
        return None
    return {k: v for k, v in history[-1].items() if k not in ("checkpoint", "time")}


def plan_concurrency(sweep: SweepConfig, cluster: dict[str, float]) -> int:
    """How many trials fit at once: GPUs bound GPU sweeps, CPUs (with data reserve) CPU sweeps."""
    from unet_ray.train import DATA_RESERVE_CPUS

    r = sweep.base.run
    if sweep.tune.max_concurrent_trials:
        return sweep.tune.max_concurrent_trials
    if r.gpu:
        return max(1, int(cluster.get("GPU", 0) // r.max_workers))
    per_worker = r.cpus_per_worker if r.cpus_per_worker is not None else 1.0
    per_trial = r.max_workers * per_worker + DATA_RESERVE_CPUS  # an elastic trial may grow to MAX
    return max(1, math.floor(cluster.get("CPU", 1) / per_trial))


def run_sweep(sweep: SweepConfig, resume: bool = False, progress=print) -> dict[str, Any]:
    """`unet-ray tune`: prepare data once, run (or resume) the sweep, write and return best.json."""
    from ray import tune

    from unet_ray.data import check_source

    base = sweep.base
    storage = storage_uri(base.run.storage_path)
    experiment = Path(storage) / base.run.name
    if resume and not (experiment.is_dir() and tune.Tuner.can_restore(str(experiment))):
        raise ConfigError(f"--resume: {experiment} holds no Tune experiment to resume")
    if not resume and experiment.is_dir() and any(experiment.glob("experiment_state-*.json")):
        raise ConfigError(f"{experiment} already holds a sweep: pass --resume to continue it, or choose another --name")

    check_source(base)
    # Before Ray: an MLflow or W&B server that cannot be reached stops the sweep here (ConfigError).
    tracked = tracking.start_sweep(base, sweep.search, dataclasses.asdict(sweep.tune), experiment, progress)
    with tracked:  # ends the parent runs: FINISHED, or FAILED (KILLED on Ctrl-C)
        return _sweep_started(sweep, resume, storage, experiment, tracked, progress)


def _sweep_started(sweep: SweepConfig, resume: bool, storage: str, experiment: Path, tracked, progress) -> dict[str, Any]:
    """run_sweep once everything that can be checked without Ray has been."""
    import ray
    from ray import tune

    from unet_ray import console, summary
    from unet_ray.data import resolve_prepared
    from unet_ray.raysession import check_gpus, ensure_ray

    base = sweep.base
    ensure_ray(progress)
    check_gpus(base.run.min_workers, base.run.gpu, ray.cluster_resources(), per="trial")
    experiment.mkdir(parents=True, exist_ok=True)
    prepared, _ = resolve_prepared(base, experiment, progress)
    if base.run.cpus_per_worker is None and not base.run.gpu:
        base.run.cpus_per_worker = 1.0  # trials share the cluster; see plan_concurrency
    trainable = tune.with_resources(
        make_trainable(base.to_dict(), str(prepared), str(experiment)), {"CPU": TRIAL_DRIVER_CPUS}
    )
    concurrency = plan_concurrency(sweep, ray.cluster_resources())
    progress(f"tune: {sweep.tune.num_samples} trials, up to {concurrency} at a time, results in {experiment}")

    if resume:
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep.search),
            tune_config=tune.TuneConfig(
                num_samples=sweep.tune.num_samples,
                scheduler=_scheduler(sweep, experiment / RUNS_DIR),
                # the searcher carries the concurrency limit: Tune ignores max_concurrent_trials
                # when it is given a BasicVariantGenerator
                search_alg=_searcher(sweep, concurrency),
                # the scheduler and searcher know metric and mode; TuneConfig must not repeat them
            ),
            # quiet: one line per trial event (summary.trial_lines) instead of Tune's status tables
            run_config=tune.RunConfig(
                name=base.run.name, storage_path=storage, verbose=1 if console.is_verbose() else 0,
                callbacks=[summary.trial_lines(base.optim.epochs, progress), tracking_callback(base.optim.epochs)],
                # A trial whose own process dies (its node lost, say) is started again, up to
                # run.max_failures times; its Train run, same storage and name, then resumes from
                # its latest checkpoint. (Workers lost under a living trial are restarted by Ray
                # Train itself, with the same limit: build_trainer.)
                failure_config=tune.FailureConfig(max_failures=base.run.max_failures),
            ),
        )
    # the trials' tracked runs: started, fed and ended by tracking_callback from `tracked`
    base_config = base.to_dict()
    tracked.trial_config = lambda params: trial_config(base_config, params, str(prepared)).to_dict()
    tracking.set_current_sweep(tracked)
    try:
        results = tuner.fit()
    finally:
        tracking.set_current_sweep(None)
    best = summarize_sweep(results, experiment, progress)
    _track_sweep_end(tracked, best, experiment)
    for line in [*tracked.lines(), *summary.next_commands(experiment, base.data.path, None)]:
        progress(line)
    return best


def tracking_callback(max_epochs: int):
    """A Tune callback (in the driver) that gives each trial its tracked runs (children of the
    sweep's, tracking.Sweep): started with the trial, fed the rows its Train run appends to its
    history.jsonl when Tune gets each result, ended with the trial. It holds nothing itself: Tune
    pickles its callbacks with the experiment (and restores them on --resume), so it finds the
    sweep that runs in this process at each event."""
    from ray.tune import Callback

    class TrackTrials(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            sweep = tracking.current_sweep()
            if sweep is not None:
                sweep.trial_started(trial.trial_id, trial.config)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            sweep = tracking.current_sweep()
            if sweep is not None:
                sweep.trial_result(trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            sweep = tracking.current_sweep()
            if sweep is not None:
                sweep.trial_ended(trial.trial_id, False, max_epochs)

        def on_trial_error(self, iteration, trials, trial, **info):
            sweep = tracking.current_sweep()
            if sweep is not None:
                sweep.trial_ended(trial.trial_id, True, max_epochs)

    return TrackTrials()


def _track_sweep_end(tracked, best: dict[str, Any], experiment: Path) -> None:
    """The sweep's parent runs get the best trial and its val_iou; MLflow and W&B also best.json,
    the best trial's checkpoint (`model`) and the report page (unet-ray report)."""
    import tempfile

    from unet_ray.dashboard.report import write_report
    from unet_ray.dashboard.results import DashboardError

    tracked.log_summary({"best_val_iou": best["val_iou"]}, {"best_trial": best["trial_id"]})
    if not tracked.remote:
        return
    tracked.log_file(experiment / BEST_FILE)
    tracked.log_model(best["checkpoint"])
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tracked.log_file(write_report(experiment, Path(tmp) / "report.html"))
        except (DashboardError, OSError) as e:
            print(f"tracking: warning: no report page for the sweep's tracked runs ({e})", flush=True)


def _scheduler(sweep: SweepConfig, runs_dir: Path):
    """Tune's trial scheduler; ASHA refills its rungs from `runs_dir` when a sweep resumes."""
    from ray.tune.schedulers import FIFOScheduler

    from unet_ray.asha import ResumableASHA

    t = sweep.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    return ResumableASHA(
        runs_dir=runs_dir,
        time_attr="epoch",
        metric="val_iou",
        mode="max",
        max_t=sweep.base.optim.epochs,
        grace_period=min(t.grace_period, sweep.base.optim.epochs),
        reduction_factor=t.reduction_factor,
    )


def _searcher(sweep: SweepConfig, max_concurrent: int):
    """The search algorithm, limited to `max_concurrent` trials at a time."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    t = sweep.tune
    if t.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("tune.searcher=optuna needs the optuna package: pip install optuna") from None
        return ConcurrencyLimiter(OptunaSearch(metric="val_iou", mode="max", seed=t.seed), max_concurrent)
    return BasicVariantGenerator(random_state=t.seed, max_concurrent=max_concurrent)


def summarize_sweep(results, experiment: Path, progress=print) -> dict[str, Any]:
    """Table of trials by best val_iou; best.json with the best trial's config, IoU and checkpoint."""
    from unet_ray.summary import format_params
    from unet_ray.train import TrainingFailed, read_history

    rows = []
    for result in results:
        trial_id = _trial_id(result)
        # The Train run's history is the complete record: Tune restarts the result log of a
        # trial it resumes, while the Train run inside continues from its checkpoint.
        history = read_history(experiment / RUNS_DIR / trial_id)
        best_row = max(history, key=lambda r: r["val_iou"]) if history else None
        rows.append(
            {
                "trial_id": trial_id,
                "config": result.config,
                "epochs": len(history),
                "best_val_iou": best_row["val_iou"] if best_row else None,
                "last_val_iou": history[-1]["val_iou"] if history else None,
                "checkpoint": best_row.get("checkpoint") if best_row else None,
                "error": str(result.error).strip().splitlines()[-1] if result.error else None,
            }
        )
    rows.sort(key=lambda r: -1 if r["best_val_iou"] is None else r["best_val_iou"], reverse=True)
    progress(f"{'trial':<12} {'best val_iou':>12} {'epochs':>6}  config")
    for r in rows:
        iou = f"{r['best_val_iou']:.4f}" if r["best_val_iou"] is not None else "error"
        progress(f"{r['trial_id']:<12} {iou:>12} {r['epochs']:>6}  {format_params(r['config'])}")
    scored = [r for r in rows if r["best_val_iou"] is not None and r["checkpoint"]]
    if not scored:
        raise TrainingFailed(f"no trial of {experiment} reported a val_iou with a checkpoint; see the trial errors above")
    best = scored[0]
    summary = {
        "trial_id": best["trial_id"],
        "config": best["config"],
        "val_iou": best["best_val_iou"],
        "checkpoint": best["checkpoint"],
        "prepared": str(experiment / "prepared"),
        "trials": rows,
    }
    jsonfile.write_atomic(experiment / BEST_FILE, summary)
    progress(f"best trial {best['trial_id']}: val_iou {best['best_val_iou']:.4f}, {format_params(best['config'])}")
    progress(f"best checkpoint: {best['checkpoint']}  (summary: {experiment / BEST_FILE})")
    return summary


def _trial_id(result) -> str:
    """Tune's id of the trial behind a result (an errored trial that reported nothing: its folder)."""
    if result.metrics and result.metrics.get("trial_id"):
        return result.metrics["trial_id"]
    return Path(result.path).name if result.path else "?"
