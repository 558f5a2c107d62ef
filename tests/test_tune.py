"""Ray Tune sweeps: YAML checks (no Ray), and one real sweep on 2 CPUs, interrupted and resumed."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import kill_session

from unet_ray import console
from unet_ray.config import ConfigError
from unet_ray.train import read_history
from unet_ray.tune import load_sweep

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tune_configs" / "smoke.yaml"


def write_yaml(tmp_path, **changes):
    values = yaml.safe_load(SMOKE.read_text())
    for key, value in changes.items():
        section, name = key.split(".")
        values.setdefault(section, {})[name] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("yaml_name", ["smoke.yaml", "lr_depth.yaml", "example.yaml"])
def test_shipped_configs_load(yaml_name):
    sweep = load_sweep(REPO / "tune_configs" / yaml_name)
    assert "lr" in sweep.search and "depth" in sweep.search


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tune.num_samplez": 3}, "unknown key tune.num_samplez"),
        ({"optim.lrr": 0.1}, "unknown key optim.lrr"),
        ({"search.depth": {"choice": []}}, "non-empty list"),
        ({"search.lr": {"loguniform": [-1e-3, 1e-2]}}, "must be positive"),
        ({"search.lr": {"uniform": [1e-2, 1e-3]}}, "low < high"),
        ({"search.depth": {"choice": [3, 9]}}, "value 9 is not valid"),
        ({"search.momentum": {"choice": [0.9]}}, "unknown search key"),
        ({"tune.scheduler": "pbt"}, "choose asha or fifo"),
        ({"optim.time_budget": 20}, "is for `unet-ray train` runs"),
    ],
)
def test_bad_sweep_yaml_is_refused_before_any_trial(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_yaml(tmp_path, **change))


def test_cli_refuses_bad_yaml_before_ray_starts(tmp_path, capsys, ray_must_not_start):
    from unet_ray.cli import main

    bad = write_yaml(tmp_path, **{"search.depth": {"choice": []}})
    assert main(["tune", "--config", str(bad), "--storage-path", str(tmp_path / "results")]) == 2
    assert "search.depth" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()  # no experiment was started
    assert ray_must_not_start.calls == []


def test_object_store_uri_is_refused_for_a_sweep_before_ray_starts(tmp_path, capsys, monkeypatch, ray_must_not_start):
    from unet_ray.cli import main

    monkeypatch.chdir(tmp_path)  # a URI taken for a relative path would show up here as ./s3:
    assert main(["tune", "--config", str(SMOKE), "--storage-path", "s3://bucket/results"]) == 2
    assert "a sweep needs a file system path shared by all nodes" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert ray_must_not_start.calls == []


def _trial_rows(experiment: Path) -> dict[str, list[dict]]:
    """Every result row Tune recorded, by trial id (from the trial folders' result.json)."""
    rows = {}
    for result_file in experiment.glob("*/result.json"):
        lines = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if lines:
            rows[lines[0]["trial_id"]] = lines
    return rows


def _history(experiment: Path, trial: str) -> list[int]:
    """The epochs in the trial's Train record, runs/<trial>/history.jsonl."""
    return [row["epoch"] for row in read_history(experiment / "runs" / trial)]


def _trial_results_in_order(console_output: str) -> list[tuple[str, int]]:
    """(trial id, epoch) of each `tune: trial X epoch E/N` line, in the order printed."""
    return [(t, int(e)) for t, e in re.findall(r"tune: trial (\S+) epoch (\d+)/", console_output)]


class _AshaRule:
    """Asynchronous successive halving as Ray's ASHAScheduler applies it (one bracket): when a
    trial first reaches a rung, it is cut if its value is below the (1 - 1/rf) percentile of the
    values recorded there before it; then its value is recorded."""

    def __init__(self, grace: int, reduction_factor: int, max_t: int):
        self.rf = reduction_factor
        count = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
        self.rungs = {grace * reduction_factor**k: {} for k in range(count)}

    def replay(self, results: list[tuple[str, int]], values: dict[str, dict[int, float]]) -> dict[str, int]:
        """The (trial -> epoch) cuts of `results` in this order."""
        cuts = {}
        for trial, epoch in results:
            for milestone in sorted(self.rungs, reverse=True):
                recorded = self.rungs[milestone]
                if epoch < milestone or trial in recorded:
                    continue
                value = values[trial][epoch]
                if recorded and value < np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100):
                    cuts[trial] = epoch
                recorded[trial] = value
                break
        return cuts


def _finished_trials(experiment: Path) -> int:
    return sum(1 for rows in _trial_rows(experiment).values() if rows[-1].get("done"))


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) spans that overlap at one moment."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda e: (e[0], e[1]))
    live = most = 0
    for _, step in events:
        live += step
        most = max(most, live)
    return most


def _trials_handed_out(searcher, sweep, storage: Path) -> int:
    """How many trials `searcher` starts before it holds the next one back (none completing)."""
    from ray.tune.experiment import Experiment

    from unet_ray.tune import param_space

    def trainable(config):  # never run: the searcher only creates the trials
        pass

    searcher.add_configurations(
        [Experiment("limit", trainable, config=param_space(sweep.search), num_samples=sweep.tune.num_samples,
                    storage_path=str(storage))]
    )
    started = 0
    while started <= sweep.tune.num_samples and searcher.next_trial() is not None:
        started += 1
    return started


@pytest.mark.parametrize(
    "cluster, gpu, max_trials, expected",
    [
        # smoke.yaml: 1 worker x 0.5 CPU + 0.5 CPU kept for Ray Data (train.DATA_RESERVE_CPUS) = 1 CPU a trial
        ({"CPU": 2.0}, False, None, 2),
        ({"CPU": 3.5}, False, None, 3),
        ({"CPU": 1.0}, False, None, 1),
        ({"CPU": 0.5}, False, None, 1),  # too small for one trial: still one, never zero
        ({"CPU": 16.0, "GPU": 2.0}, True, None, 2),  # a GPU sweep: one trial per GPU (1 worker each)
        ({"CPU": 16.0}, False, 1, 1),  # tune.max_concurrent_trials wins over what would fit
    ],
)
def test_searcher_limits_concurrency(tmp_path, cluster, gpu, max_trials, expected, ray_must_not_start):
    """The searcher of a sweep holds back the trials the cluster cannot run side by side: the
    limit is worked out from the cluster's resources and the trials' needs (plan_concurrency), as
    run_sweep does, and the searcher then hands out only that many of the 4 trials."""
    from unet_ray.tune import _searcher, plan_concurrency

    sweep = load_sweep(SMOKE)
    assert (sweep.tune.num_samples, sweep.base.run.workers, sweep.base.run.cpus_per_worker) == (4, 1, 0.5)
    sweep.base.run.gpu = gpu
    sweep.tune.max_concurrent_trials = max_trials
    searcher = _searcher(sweep, plan_concurrency(sweep, cluster))
    assert searcher.max_concurrent == expected
    assert _trials_handed_out(searcher, sweep, tmp_path) == expected


def _write_history(runs: Path, trial_id: str, values: list[float]) -> None:
    (runs / trial_id).mkdir(parents=True)
    rows = [json.dumps({"epoch": e, "val_iou": v}) for e, v in enumerate(values, start=1)]
    (runs / trial_id / "history.jsonl").write_text("\n".join(rows) + "\n")


def test_resumed_asha_cuts_against_the_results_of_before_the_interruption(tmp_path):
    """Tune pickles the scheduler as the sweep began and does not save its rungs: a resumed sweep
    must refill them from the trials' histories (fails with a plain ASHAScheduler)."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from unet_ray.tune import _scheduler

    sweep = load_sweep(SMOKE)  # grace 3, reduction factor 2, 8 epochs: rungs at epochs 3 and 6
    runs = tmp_path / "runs"
    _write_history(runs, "finished", [0.5, 0.7, 0.90, 0.91, 0.92, 0.95, 0.95, 0.96])
    _write_history(runs, "interrupted", [0.4, 0.6, 0.80, 0.84])  # Ctrl-C after epoch 4
    resumed = _scheduler(sweep, runs)  # what Tuner.restore hands back: fresh, empty rungs
    for trial_id in ("finished", "interrupted", "new"):  # Tune adds every restored trial, then new ones
        resumed.on_trial_add(None, SimpleNamespace(trial_id=trial_id))

    def decide(trial_id, epoch, val_iou):
        return resumed.on_trial_result(None, SimpleNamespace(trial_id=trial_id), {"epoch": epoch, "val_iou": val_iou})

    # a trial started after the resume meets the rung of epoch 3 as it was: 0.84 < median(0.90, 0.80) = 0.85
    assert decide("new", 3, 0.84) == TrialScheduler.STOP
    # the interrupted trial continues at epoch 5: rung 3 is behind it (no second cut there) ...
    assert decide("interrupted", 5, 0.10) == TrialScheduler.CONTINUE
    # ... and at epoch 6 it meets the finished trial's 0.95
    assert decide("interrupted", 6, 0.86) == TrialScheduler.STOP
    # a fresh sweep (no histories) cuts nobody who is first at a rung
    fresh = _scheduler(sweep, tmp_path / "empty")
    fresh.on_trial_add(None, SimpleNamespace(trial_id="new"))
    assert fresh.on_trial_result(None, SimpleNamespace(trial_id="new"), {"epoch": 3, "val_iou": 0.1}) == TrialScheduler.CONTINUE


def test_finished_train_run_hands_its_last_report_to_tune():
    from unet_ray.tune import _finished_run_report

    history = [{"epoch": e, "val_iou": e / 10, "checkpoint": f"/c{e}", "time": 1.0} for e in (1, 2, 3)]
    assert _finished_run_report(history, epochs=4) is None  # not finished: resume trains epoch 4
    assert _finished_run_report(history, epochs=3) == {"epoch": 3, "val_iou": 0.3}
    assert _finished_run_report([], epochs=3) is None


@pytest.mark.ray
def test_sweep_interrupted_then_resumed(tmp_path):
    """Also the sweep of a user's own data: an images/ + masks/ folder with RGB masks and a
    classes.yaml (folders layout, val held out by data.val_fraction), its classes in every trial."""
    from layout_trees import write_folders_tree

    storage = tmp_path / "results"
    data = write_folders_tree(tmp_path / "own", n_train=96, n_val=16, size=(64, 96), masks="rgb", split_folders=False)
    # 3 of smoke.yaml's 4 trials: on 2 CPUs the resumed half then runs in one round, not two
    cmd = [sys.executable, "-m", "unet_ray.cli", "tune", "--config", str(SMOKE), "--storage-path", str(storage),
           "--num-samples", "3", "--data", str(data)]  # fmt: skip
    # the quiet console, whatever an earlier in-process test left in os.environ
    quiet_keys = {console.VERBOSE_ENV, *console.QUIET_ENV}
    env = {**{k: v for k, v in os.environ.items() if k not in quiet_keys}, "PYTHONUNBUFFERED": "1"}
    experiment = storage / "smoke"

    # 1. start the sweep, Ctrl-C it once a trial has finished
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 400
    while _finished_trials(experiment) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _finished_trials(experiment) >= 1, (tmp_path / "first.log").read_text()[-3000:]
    interrupted = proc.poll() is None
    if interrupted:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
    kill_session(proc.pid)  # nothing of the first sweep may still write while we look
    proc.wait(timeout=30)
    rows_before = _trial_rows(experiment)
    finished_before = {t for t, rows in rows_before.items() if rows[-1].get("done")}
    # trials ran at most as many at a time as the sweep planned ("up to N at a time")
    planned = int(re.search(r"up to (\d+) at a time", (tmp_path / "first.log").read_text()).group(1))
    assert planned == 2  # smoke.yaml on 2 CPUs: one 0.5-CPU worker + 0.5 CPU for data per trial
    # `timestamp` is whole seconds (rounded down): +1 keeps each span inside the trial's real one
    spans = [(r[0]["timestamp"] + 1 - r[0]["time_total_s"], r[-1]["timestamp"]) for r in rows_before.values()]
    assert _most_at_once(spans) <= planned, spans
    # every trial's Train history at the interruption: what a resumed ASHA refills its rungs from
    histories_before = {run.name: _history(experiment, run.name) for run in sorted((experiment / "runs").iterdir())}

    # 2. resume: finished trials are not run again, the others complete
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=500)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # both halves print our trial lines, never Tune's status tables (the resumed Tuner keeps the
    # quiet RunConfig it pickled)
    for output in ((tmp_path / "first.log").read_text(), resumed.stdout):
        assert "tune: trial " in output and "Trial status" not in output, output[-3000:]
    rows = _trial_rows(experiment)
    assert len(rows) == 3, f"trials with results: {sorted(rows)}\n{resumed.stdout[-4000:]}\n{resumed.stderr[-4000:]}"
    for trial, trial_rows in rows.items():
        assert trial_rows[-1].get("done"), trial
        # the Train run's own record: every epoch once, across the interruption
        history = _history(experiment, trial)
        assert history == list(range(1, len(history) + 1)), f"{trial} trained an epoch twice: {history}"
        if trial in finished_before:
            assert history == histories_before.get(trial, []), f"finished trial {trial} ran again"
        # Tune restarts an unfinished trial's result.json; its rows are the epochs run since
        tune_epochs = [r["epoch"] for r in trial_rows]
        assert tune_epochs == history[len(history) - len(tune_epochs):]

    # ASHA stopped exactly the trials its rule stops, given the order in which the driver received
    # the results (the order of our trial lines: Tune calls the scheduler, then the callbacks) and
    # their exact values (the Train histories). Whether a trial is cut depends on that order, so
    # the check is "these and no others", never "at least one". On resume the rungs restart
    # from the histories as they stood at the interruption.
    smoke = yaml.safe_load(SMOKE.read_text())
    max_epochs = smoke["optim"]["epochs"]
    values = {t: {r["epoch"]: r["val_iou"] for r in read_history(experiment / "runs" / t)} for t in {*rows, *histories_before}}
    printed_before = _trial_results_in_order((tmp_path / "first.log").read_text())
    printed_after = _trial_results_in_order(resumed.stdout)
    # every result Tune recorded was printed (else the replay below would judge from too little)
    assert {(t, r["epoch"]) for t, trial_rows in rows.items() for r in trial_rows} <= {*printed_before, *printed_after}
    asha = _AshaRule(smoke["tune"]["grace_period"], smoke["tune"]["reduction_factor"], max_epochs)
    expected_cuts = asha.replay(printed_before, values)
    asha = _AshaRule(smoke["tune"]["grace_period"], smoke["tune"]["reduction_factor"], max_epochs)
    asha.replay([(t, e) for t, epochs in histories_before.items() for e in epochs], values)  # refilled, not decided
    expected_cuts.update(asha.replay(printed_after, values))
    actual_cuts = {t: r[-1]["epoch"] for t, r in rows.items() if r[-1]["epoch"] < max_epochs}
    assert actual_cuts == expected_cuts, {t: [(e, round(v, 4)) for e, v in vs.items()] for t, vs in values.items()}

    # best.json names the trial with the highest reported val_iou, and its checkpoint evaluates to it
    best = json.loads((experiment / "best.json").read_text())
    reported = {t: [json.loads(x)["val_iou"] for x in (experiment / "runs" / t / "history.jsonl").read_text().splitlines()] for t in rows}
    top = max(reported, key=lambda t: max(reported[t]))
    assert best["trial_id"] == top
    assert best["val_iou"] == pytest.approx(max(reported[top]))
    from unet_ray.evaluate import evaluate_checkpoint

    evaluated = evaluate_checkpoint(experiment, best["prepared"])
    # the checkpoint of the best epoch, exactly; its IoU within a few pixels: the trial validated
    # on one torch thread, this process evaluates on all of them, and a logit within rounding of
    # 0 may fall on the other side (seen once in a full run: 0.91823 against 0.91828, one pixel
    # of the 16 x 64 x 64 val pixels; neighbouring epochs can differ by as little as 1e-4)
    assert evaluated["epoch"] == reported[top].index(max(reported[top])) + 1
    assert evaluated["val_iou"] == pytest.approx(best["val_iou"], abs=2e-4)
    # the trials trained the data's own classes (classes.yaml, in order), and smoke.yaml's best
    # trial has learned the scenes: its mIoU over the three is far above "background everywhere"
    # (whose mIoU is a third of the background share, ~0.2)
    per_class = evaluated["val_iou_per_class"]
    assert list(per_class) == ["background", "road", "car"] and evaluated["classes"] == "custom", evaluated
    assert best["val_iou"] >= 0.6, reported
    assert per_class["background"] >= 0.6 and per_class["road"] >= 0.5 and evaluated["val_pixel_accuracy"] >= 0.8, evaluated

    # TensorBoard can read the sweep
    assert list(experiment.glob("*/events.out.tfevents.*"))
