"""What a run prints (quiet by default, everything with --verbose), and the pictures of one
train run (report and dashboard over a run folder).

Fast tests (no Ray): the progress line, its bound on a non-terminal, the next commands, a hand-made
run folder read by the dashboard. The Ray tests share two real `unet-ray train` runs started as
subprocesses with stdout a pipe (not a terminal), as in `ray job logs`: a quiet one and a verbose
one, 2 epochs of a small synthetic set (about 40 s each on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import kill_session
from test_dashboard import browser, open_page  # noqa: F401  (browser: headless Chromium, a fixture)

from unet_ray import console, summary
from unet_ray.dashboard.figures import RUN_CHART_IDS, build_figures
from unet_ray.dashboard.results import FINISHED, read_experiment

MAX_LINES = 30  # the whole default 2-epoch console
SMALL = {"data": {"synth_train": 32, "synth_val": 16, "image_size": 64}, "model": {"depth": 3, "base_channels": 8},
         "optim": {"batch_size": 4}}
# Ray's own lines that the quiet console must not show
RAY_CHATTER = re.compile(
    r"Execution plan of Dataset|execution finished in|Reporting training result|TrainingReport\(|"
    r"Progress bars disabled|worker group|RayDeprecationWarning|Token authentication is enabled|"
    r"\((RayTrainWorker|TrainController|SplitCoordinator|DatasetManager) pid="
)


# Ray Train's placement-group cleaner finds its cluster by scanning the machine's processes; with
# another local Ray on the same machine (other runs on a shared test machine) it fails with this
# traceback, whatever the console settings. Not ours to hide: the tests leave it out of the count.
FOREIGN_RAY_BUG = re.compile(
    r"^Exception in thread PlacementGroupCleanerMonitor:\n(?:[ T].*\n)*?ConnectionError: Found multiple active Ray instances.*\n?",
    re.M,
)


def console_lines(result: subprocess.CompletedProcess) -> list[str]:
    return FOREIGN_RAY_BUG.sub("", result.stdout + result.stderr).splitlines()


# ---------------------------------------------------------------------------------------------
# No Ray
# ---------------------------------------------------------------------------------------------


def test_progress_line_shows_batches_rate_and_time_left():
    line = console.progress_line(1, 10, 12, 48, 6.0, 64.0)
    assert line.startswith("[unet-ray] training epoch 1/10:  25%|")
    assert "12/48 batches, 64.0 img/s, 00:18 left" in line
    assert "[unet-ray] epoch 1/10" not in line  # an epoch's summary line is told apart from its progress


def test_progress_lines_are_bounded_in_time():
    """One line per `every_s` at most, none once the epoch is done; only rank 0 prints."""
    batches = [{"image": [0] * 4} for _ in range(50)]
    printed: list[str] = []
    settings = {"lines": True, "batches": 50, "every_s": 0.05}
    start = time.perf_counter()
    for _ in console.track(batches, settings, 2, 3, world_size=2, printer=lambda line, **_: printed.append(line)):
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    assert 1 <= len(printed) <= seconds / 0.05 + 1
    assert all(line.startswith("[unet-ray] training epoch 2/3:") for line in printed)
    assert list(console.track(batches, None, 2, 3, world_size=2, printer=printed.append)) == batches  # rank > 0
    assert console.track(batches, {**settings, "lines": False}, 2, 3, 2) is batches  # Tune trials


def test_count_progress_prints_bounded_lines_with_rate_and_time_left():
    """prepare's progress: items done out of the total, the rate, the time left; at most one line
    per `every_s` and none once everything is done."""
    printed: list[str] = []
    meter = console.CountProgress("prepare: decoding", 100, "pairs", printer=printed.append, every_s=0.05)
    start = time.perf_counter()
    for _ in range(20):
        time.sleep(0.01)
        meter.update(5)
    seconds = time.perf_counter() - start
    assert 1 <= len(printed) <= seconds / 0.05 + 1
    first = printed[0]
    assert first.startswith("prepare: decoding: ") and "/100 pairs, " in first and " pairs/s, " in first
    assert first.endswith(" left") and "100/100" not in "".join(printed)


def test_worker_settings_print_at_the_log_pace_off_a_terminal():
    settings = console.worker_settings()
    assert settings["every_s"] == console.PROGRESS_EVERY_LOG_S  # pytest's stdout is not a terminal
    assert settings["lines"] and not console.worker_settings(lines=False)["lines"]


def test_next_commands_name_the_real_paths(tmp_path):
    run = tmp_path / "my runs" / "unet"
    lines = summary.next_commands(run, None, run / "report.html")
    text = "\n".join(lines)
    assert f"unet-ray evaluate --checkpoint '{run}' --data '{run}/prepared'" in text
    assert f"--input '{run}/synthetic_pairs/val'" in text
    assert f"unet-ray dashboard --results '{run}'" in text
    pairs = tmp_path / "pairs"
    assert f"--input {pairs}/val " in "\n".join(summary.next_commands(run, str(pairs), None))
    # the val photos of the official Cityscapes layout and of images/ + masks/ folders
    from layout_trees import write_cityscapes_tree, write_folders_tree

    city = write_cityscapes_tree(tmp_path / "city", splits=("val",), per_city=1)
    assert f"--input {city}/leftImg8bit/val " in "\n".join(summary.next_commands(run, str(city), None))
    own = write_folders_tree(tmp_path / "own", split_folders=False)
    assert f"--input {own}/images " in "\n".join(summary.next_commands(run, str(own), None))


def test_tune_prints_one_line_per_trial_event():
    from types import SimpleNamespace

    printed: list[str] = []
    lines = summary.trial_lines(3, printer=lambda line, **_: printed.append(line))
    trial = SimpleNamespace(trial_id="a1_00000", config={"lr": 0.00123, "depth": 3}, last_result={}, local_path="/x/t")
    lines.on_trial_start(0, [trial], trial)
    lines.on_trial_result(1, [trial], trial, {"epoch": 1, "val_iou": 0.5, "train_loss": 0.25})
    trial.last_result = {"epoch": 1}
    lines.on_trial_complete(2, [trial], trial)
    lines.on_trial_error(3, [trial], trial)
    assert printed == [
        "tune: trial a1_00000 started  lr=0.00123 depth=3",
        "tune: trial a1_00000 epoch 1/3  val_iou 0.5000  loss 0.2500",
        "tune: trial a1_00000 stopped early by the scheduler after epoch 1",
        "tune: trial a1_00000 errored (its error is in /x/t/error.txt)",
    ]


def _run_folder(tmp_path: Path, ious: list[float]) -> Path:
    run = tmp_path / "unet"
    run.mkdir()
    rows = [
        {"epoch": i + 1, "val_iou": iou, "train_loss": 1 - iou, "val_miou": iou / 2, "val_dice": iou,
         "val_pixel_accuracy": 0.9, "val_iou_per_class": [0.8, iou], "epoch_seconds": 3.0, "checkpoint": None}
        for i, iou in enumerate(ious)
    ]
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_a_train_run_folder_is_read_as_one_trial(tmp_path):
    run = _run_folder(tmp_path, [0.2, 0.7, 0.6])
    (run / "best.json").write_text(json.dumps({"checkpoint": None, "metrics": {"val_iou": 0.7}}))
    snapshot = read_experiment(run)
    assert snapshot.kind == "run" and snapshot.sweep_status == "finished"
    [trial] = snapshot.trials
    assert (trial.trial_id, trial.status, trial.epochs, trial.best_val_iou, trial.best_epoch) == ("unet", FINISHED, 3, 0.7, 2)
    assert [e["label"] for e in snapshot.per_class["epochs"]] == ["best epoch (2)", "last epoch (3)"]
    assert snapshot.per_class["epochs"][0]["iou"] == [0.8, 0.7]
    figures = build_figures(snapshot)
    assert tuple(figures) == RUN_CHART_IDS
    assert [t["name"] for t in figures["val_metrics"]["data"]] == ["IoU", "mIoU", "Dice", "pixel accuracy"]


def test_a_time_budget_run_shows_the_epochs_it_planned(tmp_path):
    run = _run_folder(tmp_path, [0.2, 0.7])
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    (run / "history.jsonl").write_text("".join(json.dumps({**r, "epochs_planned": 5}) + "\n" for r in rows))
    assert read_experiment(run).max_epochs == 5  # not the config's cap
    (tmp_path / "plain").mkdir()
    assert read_experiment(_run_folder(tmp_path / "plain", [0.2])).max_epochs is None  # no plan, no checkpoint


def test_a_run_without_best_json_that_went_quiet_is_interrupted(tmp_path):
    run = _run_folder(tmp_path, [0.2])
    snapshot = read_experiment(run, now=time.time() + 3600)
    assert snapshot.sweep_status == "stopped" and snapshot.trials[0].status == "interrupted"


# ---------------------------------------------------------------------------------------------
# Real runs of `unet-ray train` (subprocesses, stdout not a terminal)
# ---------------------------------------------------------------------------------------------


def fresh_env() -> dict[str, str]:
    """This environment without what an in-process `unet-ray` call of an earlier test left in it
    (console.setup's quiet variables): a user's own variables win over --verbose, and these
    would look like the user's to the command under test."""
    env = {k: v for k, v in os.environ.items() if k not in console.QUIET_ENV and k != console.VERBOSE_ENV}
    return {**env, "PYTHONUNBUFFERED": "1"}


def start_train(tmp: Path, name: str, *extra: str) -> tuple[list[str], subprocess.Popen]:
    """`unet-ray train` of the small config, its stdout and stderr in files (tmp/NAME.out, .err)."""
    config = tmp / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    cmd = [sys.executable, "-m", "unet_ray.cli", "train", "--config", str(config), "--epochs", "2",
           "--storage-path", str(tmp / "results"), "--name", name, *extra]
    with open(tmp / f"{name}.out", "w") as out, open(tmp / f"{name}.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, start_new_session=True, env=fresh_env())
    return cmd, proc


def finish_train(tmp: Path, name: str, cmd: list[str], proc: subprocess.Popen, timeout: float = 300):
    try:
        proc.wait(timeout=timeout)
    finally:
        kill_session(proc.pid)  # the local Ray it started, if anything of it is left
    out, err = (tmp / f"{name}.out").read_text(), (tmp / f"{name}.err").read_text()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train(tmp: Path, name: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return finish_train(tmp, name, *start_train(tmp, name, *extra), timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"quiet": (result, run folder), "verbose": (...)}: one run of each console, both at once
    (two `unet-ray train` commands on one machine, each with its own local Ray), and when each
    ran: {"spans": {name: (started, ended)}}."""
    tmp = tmp_path_factory.mktemp("console")
    started = {}
    for name, extra in (("quiet", ()), ("verbose", ("--verbose",))):
        started[name] = (time.time(), *start_train(tmp, name, *extra))
    found, spans = {}, {}
    for name, (began, cmd, proc) in started.items():
        result = finish_train(tmp, name, cmd, proc)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        found[name] = (result, tmp / "results" / name)
        spans[name] = (began, max(json.loads(x)["time"] for x in (tmp / "results" / name / "history.jsonl").read_text().splitlines()))
    found["spans"] = spans
    return found


@pytest.mark.ray
@pytest.mark.timeout(700)
def test_quiet_console_fits_30_lines_with_epochs_and_next_steps(runs):
    result, run = runs["quiet"]
    lines = console_lines(result)
    shown = "\n".join(lines)
    assert len(lines) <= MAX_LINES, shown
    assert not RAY_CHATTER.search(shown), shown
    for epoch in (1, 2):
        assert sum(line.startswith(f"[unet-ray] epoch {epoch}/2  loss ") for line in lines) == 1, shown
    assert re.search(r"^done in .*: best val_iou \d\.\d{4} at epoch \d", shown, re.M), shown
    assert f"report: {run / 'report.html'}" in shown
    assert f"unet-ray evaluate --checkpoint {run} --data {run / 'prepared'}" in shown
    assert f"unet-ray predict --checkpoint {run} --input {run / 'synthetic_pairs' / 'val'}" in shown
    assert f"unet-ray dashboard --results {run}" in shown
    assert (run / "report.html").is_file()


@pytest.mark.ray
@pytest.mark.timeout(700)
def test_two_trainings_at_once_leave_no_traceback(runs):
    """The quiet and the verbose run trained at the same time, each with its own local Ray: no Ray
    helper of either looked for "the" local Ray and found two (Ray Train's placement-group cleaner
    printed a 29-line traceback then, and could not clean up after a killed driver)."""
    (quiet_began, quiet_ended), (verbose_began, verbose_ended) = runs["spans"]["quiet"], runs["spans"]["verbose"]
    assert verbose_began < quiet_ended and quiet_began < verbose_ended  # they overlapped
    for name in ("quiet", "verbose"):
        result, _ = runs[name]
        shown = result.stdout + result.stderr
        for sign in ("Traceback", "Found multiple active Ray instances", "AuthenticationError"):
            assert sign not in shown, f"{name}: {shown[-4000:]}"


@pytest.mark.ray
@pytest.mark.timeout(700)
def test_verbose_console_shows_what_ray_says(runs):
    result, _ = runs["verbose"]
    shown = result.stdout + result.stderr
    for ray_line in ("Execution plan of Dataset", "Reporting training result 2: TrainingReport(",
                     "(RayTrainWorker pid=", "(TrainController pid="):
        assert ray_line in shown, shown[-3000:]
    assert "[unet-ray] epoch 2/2  loss " in shown


@pytest.mark.ray
@pytest.mark.timeout(700)
def test_report_of_a_train_run_in_chromium(runs, browser):
    """The report `train` wrote: curves, IoU per class and the predicted masks, drawn offline."""
    _, run = runs["quiet"]
    page, problems = open_page(browser, (run / "report.html").as_uri(), {"offline": True})
    for chart in RUN_CHART_IDS:
        page.wait_for_selector(f"#chart-{chart} .main-svg", timeout=30_000)
    assert page.text_content("#page-kind") == "Training run"
    assert page.text_content("#sweep-status") == "run finished"
    assert page.query_selector_all("#trials tbody tr")[0].get_attribute("data-trial-id") == "quiet"
    assert len(page.query_selector_all("#chart-class_iou .bars path")) >= 2  # 2 classes, best epoch
    figures = page.query_selector_all("#predictions figure")
    assert [f.get_attribute("data-kind") for f in figures[:3]] == ["photo", "truth", "prediction"]
    assert len(page.query_selector_all("#predictions img")) == 12  # 4 validation pairs
    assert not problems, problems


@pytest.mark.ray
@pytest.mark.timeout(700)
def test_a_failing_run_shows_its_cause_in_the_quiet_console(runs):
    """An error inside a training worker: the quiet run resumed from a damaged checkpoint (the
    worker loads it) fails, and the console says why in a few lines. Last in this module: it
    leaves the quiet run's latest checkpoint damaged."""
    result, run = runs["quiet"]
    latest = json.loads((run / "best.json").read_text())["last_metrics"]["epoch"]
    state = sorted(run.glob("checkpoint_*/state.pt"), key=lambda f: f.stat().st_mtime)[-1]
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    failed = train(run.parent.parent, "quiet", "--epochs", str(latest + 1), "--max-failures", "0")
    shown = failed.stdout + failed.stderr
    assert failed.returncode == 1, shown
    assert "unet-ray train: error: training run quiet failed: " in failed.stderr, shown
    assert "state.pt" in failed.stderr.splitlines()[-1], shown  # the cause names the damaged file
    assert len(console_lines(failed)) <= MAX_LINES, shown
