"""Tune results dashboard and report.

Fast tests (no Ray) read a hand-made experiment folder in Tune's layout: statuses, history vs
result.json, path relocation, the server's refusals and the CLI's errors. The browser tests share
one small real sweep (3 trials x 3 epochs, about 2 minutes on 2 cores) and one headless Chromium
(Debian's `chromium`, driven by the `playwright` package; no browser download).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import kill_session

from unet_ray.dashboard.results import (
    ERRORED, FINISHED, INTERRUPTED, PENDING, RUNNING, STOPPED, DashboardError, read_experiment, read_jsonl, relocate,
)

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tune_configs" / "smoke.yaml"
CHROMIUM = os.environ.get("UNET_RAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
CHARTS = ("curve_iou", "curve_loss", "lr_scatter", "parallel")
SWEEP_EPOCHS, SWEEP_TRIALS = 3, 2  # 2 trials: one round on 2 CPUs
WAIT_MS = 30_000  # every browser wait is bounded


# ---------------------------------------------------------------------------------------------
# A hand-made experiment folder in Tune's layout (no Ray)
# ---------------------------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _epoch_rows(trial_id: str, ious: list[float], first_epoch: int = 1, done_at_end: bool = False) -> list[dict]:
    rows = [
        {"trial_id": trial_id, "epoch": first_epoch + i, "val_iou": iou, "train_loss": 1.0 - iou,
         "epoch_seconds": 2.0, "time_total_s": 2.0 * (first_epoch + i), "done": False}
        for i, iou in enumerate(ious)
    ]
    if rows and done_at_end:
        rows[-1]["done"] = True
    return rows


def make_experiment(root: Path) -> Path:
    """Five trials: finished (its result.json restarted by a resume), stopped early by ASHA,
    errored, running, pending; Tune's state file says the same."""
    exp = root / "sweep"
    trials = {
        # trial id: (Tune status, params, history ious, result.json first epoch, done)
        "aaaaa_00000": ("TERMINATED", {"lr": 1e-3, "depth": 3}, [0.2, 0.5, 0.7], 2, True),
        "aaaaa_00001": ("TERMINATED", {"lr": 1e-5, "depth": 2}, [0.1], 1, True),
        "aaaaa_00002": ("ERROR", {"lr": 5e-3, "depth": 3}, [], 1, False),
        "aaaaa_00003": ("RUNNING", {"lr": 2e-4, "depth": 2}, [0.3, 0.4], 1, False),
        "aaaaa_00004": ("PENDING", {"lr": 3e-4, "depth": 3}, None, 1, False),
    }
    state = []
    for i, (trial_id, (status, params, ious, first, done)) in enumerate(trials.items()):
        folder = f"run_trial_{trial_id}_{i}_depth={params['depth']},lr={params['lr']:.4f}_2026-01-01_00-00-00"
        if ious is not None:
            (exp / folder).mkdir(parents=True)
            (exp / folder / "params.json").write_text(json.dumps(params))
            rows = _epoch_rows(trial_id, ious, done_at_end=done)
            _jsonl(exp / folder / "result.json", rows[first - 1:])
            if ious:
                for row in rows:
                    row["checkpoint"] = f"/old/machine/results/sweep/runs/{trial_id}/checkpoint_{row['epoch']}"
                    (exp / "runs" / trial_id / f"checkpoint_{row['epoch']}").mkdir(parents=True)
                _jsonl(exp / "runs" / trial_id / "history.jsonl", rows)
        if status == "ERROR":
            (exp / folder / "error.txt").write_text("Failure # 1\nTraceback (most recent call last):\nRuntimeError: <b>boom</b>\n")
        runtime = {"error_filename": "error.txt" if status == "ERROR" else None, "last_result": {}}
        state.append([json.dumps({"trial_id": trial_id, "status": status, "config": params, "relative_logdir": folder}),
                      json.dumps(runtime)])
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": state, "runner_data": {}}))
    (exp / "tuner.pkl").write_bytes(b"\x80\x04not served")
    return exp


@pytest.fixture
def experiment(tmp_path):
    return make_experiment(tmp_path)


def set_tune_status(experiment: Path, trial_id: str, status: str) -> None:
    """Record `status` for the trial in every Tune state file of the folder, as Tune writes it."""
    for file in experiment.glob("experiment_state-*.json"):
        state = json.loads(file.read_text())
        for pair in state["trial_data"]:
            trial = json.loads(pair[0])
            if trial["trial_id"] == trial_id:
                pair[0] = json.dumps({**trial, "status": status})
        file.write_text(json.dumps(state))


def trial_folder(experiment: Path, trial_id: str) -> Path:
    return next(p for p in experiment.iterdir() if p.is_dir() and trial_id in p.name and (p / "params.json").is_file())


def test_statuses_epochs_and_best_from_tune_files_and_histories(experiment):
    snap = read_experiment(experiment)
    trials = {t.trial_id: t for t in snap.trials}
    assert {t: trials[t].status for t in trials} == {
        "aaaaa_00000": FINISHED, "aaaaa_00001": STOPPED, "aaaaa_00002": ERRORED,
        "aaaaa_00003": RUNNING, "aaaaa_00004": PENDING,
    }
    assert snap.sweep_status == "running" and snap.max_epochs == 3
    # result.json of the resumed trial lacks epoch 1; history.jsonl has every epoch
    assert trials["aaaaa_00000"].epochs == 3 and [p["epoch"] for p in trials["aaaaa_00000"].curve] == [1, 2, 3]
    assert trials["aaaaa_00000"].best_val_iou == pytest.approx(0.7)
    assert "RuntimeError: <b>boom</b>" in trials["aaaaa_00002"].error
    assert [t.trial_id for t in snap.trials][:3] == ["aaaaa_00000", "aaaaa_00003", "aaaaa_00001"]  # best first
    # no best.json yet: the best so far, its checkpoint mapped from the old machine into this folder
    assert snap.best["trial_id"] == "aaaaa_00000" and snap.best["epoch"] == 3
    assert snap.best["checkpoint_path"] == str(experiment / "runs" / "aaaaa_00000" / "checkpoint_3")


def test_error_txt_of_a_resumed_trial_that_then_ended_is_not_an_error(experiment):
    # Tune (resume_errored=True) resumed both after a failure; they ran to the end, or to ASHA's stop
    for trial_id in ("aaaaa_00000", "aaaaa_00001", "aaaaa_00003"):
        (trial_folder(experiment, trial_id) / "error.txt").write_text("Failure # 1\nRuntimeError: an old failure\n")
    trials = {t.trial_id: t for t in read_experiment(experiment).trials}
    assert [trials[t].status for t in ("aaaaa_00000", "aaaaa_00001", "aaaaa_00003")] == [FINISHED, STOPPED, RUNNING]
    assert [t.trial_id for t in trials.values() if t.error] == ["aaaaa_00002"]  # Tune's ERROR only
    # no Tune state to say otherwise: error.txt is all there is to go by
    for file in experiment.glob("experiment_state-*.json"):
        file.unlink()
    trials = {t.trial_id: t for t in read_experiment(experiment).trials}
    assert trials["aaaaa_00000"].status == ERRORED and "an old failure" in trials["aaaaa_00000"].error


def test_terminated_without_done_is_judged_by_its_epochs(experiment):
    for trial_id in ("aaaaa_00000", "aaaaa_00001"):
        result_file = trial_folder(experiment, trial_id) / "result.json"
        _jsonl(result_file, [{**row, "done": False} for row in read_jsonl(result_file, [])])
    trials = {t.trial_id: t for t in read_experiment(experiment).trials}
    assert trials["aaaaa_00000"].last_epoch == 3 and trials["aaaaa_00000"].status == FINISHED
    assert trials["aaaaa_00001"].last_epoch == 1 and trials["aaaaa_00001"].status == STOPPED


def test_history_missing_falls_back_to_result_json(experiment):
    shutil.rmtree(experiment / "runs" / "aaaaa_00003")
    trial = next(t for t in read_experiment(experiment).trials if t.trial_id == "aaaaa_00003")
    assert trial.epochs == 2 and trial.best_val_iou == pytest.approx(0.4) and trial.checkpoint is None


def test_sweep_that_stopped_or_finished(experiment):
    later = time.time() + 3600
    snap = read_experiment(experiment, now=later)
    statuses = {t.trial_id: t.status for t in snap.trials}
    assert snap.sweep_status == "stopped" and statuses["aaaaa_00003"] == INTERRUPTED
    (experiment / "best.json").write_text(json.dumps({"trial_id": "aaaaa_00000", "val_iou": 0.7, "checkpoint": "/gone/x"}))
    assert read_experiment(experiment, now=later).sweep_status == "finished"


def test_stale_best_json_and_half_written_lines(experiment):
    # a resumed sweep runs on past the best.json of its first run
    (experiment / "best.json").write_text(json.dumps({"trial_id": "aaaaa_00003", "val_iou": 0.4, "checkpoint": "/x"}))
    history_file = experiment / "runs" / "aaaaa_00000" / "history.jsonl"
    with open(history_file, "a") as f:
        f.write('{"epoch": 4, "val_iou": 0.9')  # a line being written right now
    snap = read_experiment(experiment)
    assert snap.best["trial_id"] == "aaaaa_00000" and snap.trials[0].epochs == 3 and not snap.warnings
    history_file.write_text(history_file.read_text().replace('{"epoch": 4, "val_iou": 0.9', "garbage\n{}\n"))
    assert any("line 4 is not JSON" in w for w in read_experiment(experiment).warnings)


def test_relocate_prefers_the_copy_inside_the_experiment(tmp_path):
    exp = tmp_path / "copy" / "smoke"
    (exp / "runs" / "t1" / "checkpoint_1").mkdir(parents=True)
    assert relocate("/elsewhere/results/smoke/runs/t1/checkpoint_1", exp) == exp / "runs" / "t1" / "checkpoint_1"
    assert relocate("/elsewhere/results/smoke/runs/t9/checkpoint_1", exp) is None
    assert relocate(None, exp) is None


def test_figures_show_the_trials_params_and_best(experiment):
    from unet_ray.dashboard.figures import build_figures

    snap = read_experiment(experiment)
    figures = build_figures(snap)
    scored = [t for t in snap.trials if t.best_val_iou is not None]
    best_id = snap.best["trial_id"]

    # val_iou against lr: log axis, one trace per depth (its trials' lr and best val_iou), the best ringed
    scatter = figures["lr_scatter"]
    assert scatter["layout"]["xaxis"]["type"] == "log"
    by_depth = {f"depth={d}": [t for t in scored if t.params["depth"] == d] for d in {t.params["depth"] for t in scored}}
    traces = {tr["name"]: tr for tr in scatter["data"]}
    assert set(traces) == set(by_depth) | {f"best: {best_id}"}
    for name, members in by_depth.items():
        assert sorted(zip(traces[name]["x"], traces[name]["y"])) == sorted((t.params["lr"], t.best_val_iou) for t in members)

    # parallel coordinates: one axis per searched key, then the best val_iou
    (parcoords,) = figures["parallel"]["data"]
    labels = [d["label"].removesuffix(" (log)") for d in parcoords["dimensions"]]
    assert labels == [*snap.param_keys, "best val_iou"] and set(snap.param_keys) == {"lr", "depth"}
    assert parcoords["dimensions"][-1]["values"] == [t.best_val_iou for t in scored]

    # learning curves: one trace per trial that reported an epoch, the best drawn wider and on top
    for chart, metric in (("curve_iou", "val_iou"), ("curve_loss", "train_loss")):
        data = figures[chart]["data"]
        with_points = {t.trial_id: t for t in snap.trials if any(p[metric] is not None for p in t.curve)}
        assert sorted(tr["name"].removesuffix(" (best)") for tr in data) == sorted(with_points)
        for tr in data:
            trial = with_points[tr["name"].removesuffix(" (best)")]
            assert tr["y"] == [p[metric] for p in trial.curve]
        assert data[-1]["name"] == f"{best_id} (best)"
        assert data[-1]["line"]["width"] > max(tr["line"]["width"] for tr in data[:-1])


def test_cli_dashboard_binds_loopback_by_default(experiment):
    """`unet-ray dashboard` without --host listens on 127.0.0.1 only: the real command, whose
    listening socket is read from /proc (not what the server says of itself), and which serves."""
    import signal

    from helpers import listening_addresses

    command = [sys.executable, "-m", "unet_ray.cli", "dashboard", "--results", str(experiment), "--port", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        listening = {}
        while not listening and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            listening = listening_addresses([proc.pid])
        assert proc.poll() is None, proc.communicate(timeout=30)
        assert len(listening) == 1, listening  # one socket, and it was found within the deadline
        (address,) = listening
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0, address
        conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
        try:
            conn.request("GET", "/api/state")
            response = conn.getresponse()
            assert response.status == 200 and len(json.loads(response.read())["trials"]) == 5
        finally:
            conn.close()
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the command's own way to stop
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"at http://127.0.0.1:{port}/" in out and "note: listening on" not in out, out
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)
            proc.communicate(timeout=30)


@pytest.mark.parametrize("make", ["missing", "empty", "file", "parent"])
def test_cli_refuses_what_is_not_an_experiment(tmp_path, make, capsys):
    from unet_ray.cli import main

    target = {"missing": tmp_path / "nope", "empty": tmp_path, "file": tmp_path / "f.txt", "parent": tmp_path}[make]
    if make == "file":
        target.write_text("x")
    if make == "parent":
        make_experiment(tmp_path)
    # the real command line once (no traceback on stderr), the report in-process
    done = subprocess.run([sys.executable, "-m", "unet_ray.cli", "dashboard", "--port", "0", "--results", str(target)],
                          capture_output=True, text=True, timeout=120)
    assert main(["report", "--results", str(target), "--out", str(tmp_path / "r.html")]) == 2
    for command, rc, err in (("dashboard", done.returncode, done.stderr), ("report", 2, capsys.readouterr().err)):
        assert rc == 2, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"unet-ray {command}: error: ") and str(target) in err
        if make == "parent":
            assert "pass " + str(tmp_path / "sweep") in err
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------------------------------
# The server's routes (plain HTTP on 127.0.0.1)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(folder: Path):
    """The dashboard server on folder, serving from a thread until the block ends."""
    from unet_ray.dashboard.server import make_server

    server = make_server(folder, port=0, refresh_s=0.5)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(experiment):
    with running_server(experiment) as server:
        yield server


def raw_get(server, path: str, host: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    """A request with the path sent exactly as given (urllib would normalise it)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        conn.putrequest(method, path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_server_binds_loopback_and_serves_its_routes(served, experiment):
    assert served.server_address[0] == "127.0.0.1"
    status, body = raw_get(served, "/")
    assert status == 200 and b"Tune results" in body and b"cdn" not in body.lower()
    status, body = raw_get(served, "/static/plotly.min.js")
    assert status == 200 and len(body) > 1_000_000
    status, body = raw_get(served, "/api/state")
    state = json.loads(body)
    assert status == 200 and len(state["trials"]) == 5 and set(state["figures"]) == set(CHARTS)
    assert all("checkpoint" not in t for t in state["trials"])  # no absolute paths of this machine
    folder = next(p.name for p in experiment.iterdir() if p.name.startswith("run_trial_aaaaa_00000"))
    status, body = raw_get(served, f"/files/{folder}/params.json".replace(",", "%2C").replace("=", "%3D"))
    assert status == 200 and json.loads(body) == {"lr": 1e-3, "depth": 3}
    status, body = raw_get(served, "/api/predictions")  # no prepared data, empty checkpoints: a message
    assert status == 200 and "prepared" in json.loads(body)["error"]


def test_server_refuses_paths_outside_the_experiment(served, experiment, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    (experiment / "link.txt").symlink_to(secret)
    (experiment / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    refused = [
        "/files/../secret.txt", "/files/../../etc/passwd", "/files/%2e%2e/secret.txt", "/files/%2E%2E%2Fsecret.txt",
        "/files/runs/%2e%2e/%2e%2e/secret.txt", "/files//etc/passwd", "/files/%2Fetc%2Fpasswd",
        f"/files/{secret}", "/files/link.txt", "/files/linkdir/secret.txt", "/files/tuner.pkl",
        "/files/..%5csecret.txt", "/files/%00",
    ]
    for path in refused:
        status, body = raw_get(served, path)
        assert status in (403, 404), (path, status)
        assert b"TOP-SECRET" not in body and b"root:" not in body, path
    for path in ("/../secret.txt", "/static/../../secret.txt", "/api/../files/../secret.txt", "/secret.txt"):
        status, body = raw_get(served, path)
        assert status == 404 and b"TOP-SECRET" not in body, path
    assert raw_get(served, "/files/no-such-file.json")[0] == 404
    # another site's page reaching 127.0.0.1 through DNS rebinding names itself in Host
    assert raw_get(served, "/api/state", host="evil.example:8050")[0] == 403
    assert raw_get(served, "/api/state", host="localhost:8050")[0] == 200
    assert raw_get(served, "/api/state", method="POST")[0] >= 400


def test_experiment_folder_removed_while_serving_is_a_clear_error(served, experiment, monkeypatch, capsys):
    assert raw_get(served, "/api/state")[0] == 200
    shutil.rmtree(experiment)
    for path in ("/api/state", "/api/predictions"):
        status, body = raw_get(served, path)
        assert status == 503 and json.loads(body)["error"] == f"results folder {experiment} does not exist", path
    # a read that fails half way (a folder made unreadable): the same kind of answer
    experiment.mkdir()

    def unreadable(path, now=None):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("unet_ray.dashboard.server.read_experiment", unreadable)
    status, body = raw_get(served, "/api/state")
    assert status == 503 and json.loads(body)["error"] == f"cannot read the results folder {experiment} (Permission denied)"
    assert "Traceback" not in capsys.readouterr().err


def test_port_in_use_is_a_clear_error(served, experiment):
    from unet_ray.dashboard.server import make_server

    with pytest.raises(DashboardError, match="in use"):
        make_server(experiment, port=served.server_address[1])


# ---------------------------------------------------------------------------------------------
# One real sweep and one headless Chromium, shared by the browser tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def started_sweep(tmp_path_factory):
    """`unet-ray tune` on a copy of smoke.yaml cut to 3 epochs, started in the background:
    (process, experiment folder, log file). The first browser test watches it run.

    UNET_RAY_TEST_SWEEP=<experiment folder of such a sweep> reuses one (to iterate on the page)."""
    if os.environ.get("UNET_RAY_TEST_SWEEP"):
        yield None, Path(os.environ["UNET_RAY_TEST_SWEEP"]), None
        return
    tmp = tmp_path_factory.mktemp("sweep")
    values = yaml.safe_load(SMOKE.read_text())
    values["optim"]["epochs"] = SWEEP_EPOCHS
    config = tmp / "dash.yaml"
    config.write_text(yaml.safe_dump(values))
    cmd = [sys.executable, "-m", "unet_ray.cli", "tune", "--config", str(config), "--storage-path", str(tmp / "results"),
           "--num-samples", str(SWEEP_TRIALS)]
    log = tmp / "tune.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        yield proc, tmp / "results" / "dash", log
    finally:
        kill_session(proc.pid)  # only left if a test failed while the sweep ran
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def sweep(started_sweep):
    """The experiment folder of the finished sweep."""
    proc, experiment, log = started_sweep
    if proc is not None:
        assert proc.wait(timeout=540) == 0, log.read_text()[-6000:]
    return experiment


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="the browser tests need `pip install playwright` (in the test extra)"
    )
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"the browser tests need Chromium at {CHROMIUM}: apt-get install -y chromium")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str, context_options: dict | None = None):
    page = browser.new_context(viewport={"width": 1400, "height": 900}, **(context_options or {})).new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url)
    return page, problems


def table_rows(page) -> dict[str, dict[str, str]]:
    """{trial id: {column key: data-value or text}} of the trials table."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('#trials tbody tr')].map(tr => [
             tr.dataset.trialId,
             Object.fromEntries([...tr.querySelectorAll('td')].map(td => [td.dataset.key, td.dataset.value ?? td.textContent]))]))"""
    )


def history(experiment: Path, trial_id: str) -> list[dict]:
    lines = (experiment / "runs" / trial_id / "history.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def wait_until_drawn(page) -> None:
    for chart in CHARTS:
        page.wait_for_selector(f"#chart-{chart} .main-svg", timeout=WAIT_MS)
    page.wait_for_selector("#trials tbody tr", timeout=WAIT_MS)


EPOCHS_SHOWN = "() => [...document.querySelectorAll('#trials td[data-key=epochs]')].reduce((n, td) => n + Number(td.dataset.value || 0), 0)"


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_page_follows_the_sweep_while_it_runs(browser, started_sweep):
    """Opened while the real sweep runs, the page shows its new epochs as they come, with the
    sweep marked running, in the same document (no reload)."""
    proc, experiment, log = started_sweep
    if proc is None:
        pytest.skip("UNET_RAY_TEST_SWEEP names a finished sweep")
    deadline = time.monotonic() + 300
    while not any(experiment.glob("experiment_state-*.json")):  # what makes it a Tune experiment
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "the sweep never wrote its state"
        time.sleep(0.2)
    with running_server(experiment) as server:
        page, problems = open_page(browser, server.url)
        page.wait_for_selector("#trials tbody tr", timeout=120_000)
        page.evaluate("window.__sameDocument = true")
        shown = page.evaluate(EPOCHS_SHOWN)
        page.wait_for_function(
            f"""() => ({EPOCHS_SHOWN})() > {shown}
                      && document.getElementById('sweep-status').textContent === 'sweep running'""",
            timeout=120_000,
        )
        # 'sweep running': the page saw new epochs before best.json (written at the sweep's end)
        assert page.evaluate(EPOCHS_SHOWN) > shown and page.evaluate("window.__sameDocument === true")
        assert not problems, problems


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_dashboard_shows_the_sweep(browser, sweep, tmp_path_factory):
    with running_server(sweep) as server:
        page, problems = open_page(browser, server.url)
        wait_until_drawn(page)
        page.wait_for_selector("#predictions img", timeout=90_000)  # first model load imports torch
        rows = table_rows(page)
        best = json.loads((sweep / "best.json").read_text())
        trial_ids = {r["trial_id"] for r in best["trials"]}
        assert set(rows) == trial_ids and len(rows) == SWEEP_TRIALS
        for trial_id, row in rows.items():
            ious = [r["val_iou"] for r in history(sweep, trial_id)]
            assert float(row["best_val_iou"]) == pytest.approx(max(ious)), trial_id
            assert float(row["last_val_iou"]) == pytest.approx(ious[-1]), trial_id
            assert int(row["epochs"]) == len(ious)
            expected = "finished" if len(ious) == SWEEP_EPOCHS else "stopped early"
            assert page.get_attribute(f'tr[data-trial-id="{trial_id}"]', "data-status") == expected
            assert {"lr", "depth"} <= {k.removeprefix("param:") for k in row}
        # best first, highlighted, equal to best.json; every row in order of its best val_iou
        order = page.eval_on_selector_all("#trials tbody tr", "trs => trs.map(tr => tr.dataset.trialId)")
        ranked = [float(rows[t]["best_val_iou"]) for t in order]
        assert len(order) == SWEEP_TRIALS and ranked == sorted(ranked, reverse=True)
        first = page.get_attribute("#trials tbody tr:first-child", "data-trial-id")
        assert first == best["trial_id"] and "best" in page.get_attribute("#trials tbody tr:first-child", "class")
        assert float(rows[first]["best_val_iou"]) == pytest.approx(best["val_iou"])
        # the best trial's predictions: photo, true mask, predicted mask for 4 validation pairs
        images = page.eval_on_selector_all("#predictions img", "imgs => imgs.map(i => [i.src.slice(0, 22), i.naturalWidth])")
        assert len(images) == 12 and all(src == "data:image/png;base64," and width == 64 for src, width in images)
        assert best["trial_id"] in page.inner_text("#predictions-caption")
        # sorting by a column (numbers: largest first), a second click flips it
        page.click('th[data-key="param:lr"]')
        lrs = [float(v) for v in page.eval_on_selector_all('td[data-key="param:lr"]', "tds => tds.map(t => t.dataset.value)")]
        assert lrs == sorted(lrs, reverse=True)
        page.click('th[data-key="param:lr"]')
        lrs = [float(v) for v in page.eval_on_selector_all('td[data-key="param:lr"]', "tds => tds.map(t => t.dataset.value)")]
        assert lrs == sorted(lrs)
        shot = tmp_path_factory.mktemp("screenshots") / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        assert not problems, problems


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_page_follows_a_running_sweep_without_reload(browser, sweep, tmp_path):
    # a copy whose recorded paths name a machine that is not this one
    copy = tmp_path / "dash"
    shutil.copytree(sweep, copy, symlinks=True)
    for file in [copy / "best.json", *copy.glob("runs/*/history.jsonl")]:
        file.write_text(file.read_text().replace(str(sweep), "/machine/that/ran/it/dash"))
    with running_server(copy) as server:
        page, problems = open_page(browser, server.url)
        wait_until_drawn(page)
        page.wait_for_selector("#predictions img", timeout=90_000)  # checkpoint and data found in the copy
        page.evaluate("window.__sameDocument = true")
        rows = table_rows(page)
        trial_id = min(rows, key=lambda t: int(rows[t]["epochs"]))
        old = history(copy, trial_id)
        # a new epoch that beats every trial
        new_row = {**old[-1], "epoch": old[-1]["epoch"] + 1, "val_iou": 0.99, "time": time.time()}
        with open(copy / "runs" / trial_id / "history.jsonl", "a") as f:
            f.write(json.dumps(new_row) + "\n")
        page.wait_for_function(
            """([id, n]) => { const td = document.querySelector(`tr[data-trial-id="${id}"] td[data-key="epochs"]`);
                              return td && Number(td.dataset.value) === n; }""",
            arg=[trial_id, len(old) + 1], timeout=WAIT_MS,
        )
        assert page.get_attribute("#trials tbody tr:first-child", "data-trial-id") == trial_id
        assert "0.9900" in page.inner_text("#best")
        # a trial that fails (Tune records ERROR and writes error.txt): its status and its error text
        # appear, still without a reload
        other = next(t for t in rows if t != trial_id)
        (trial_folder(copy, other) / "error.txt").write_text(
            "Failure # 1\nTraceback (most recent call last):\nValueError: <script>x</script>\n"
        )
        set_tune_status(copy, other, "ERROR")
        page.wait_for_selector(f'#errors pre[data-trial-id="{other}"]', timeout=WAIT_MS)
        assert "ValueError: <script>x</script>" in page.inner_text(f'#errors pre[data-trial-id="{other}"]')
        assert page.get_attribute(f'tr[data-trial-id="{other}"]', "data-status") == "errored"
        assert page.evaluate("window.__sameDocument === true")
        assert not problems, problems


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_report_is_self_contained(browser, sweep, tmp_path):
    from unet_ray.cli import main

    out = tmp_path / "report.html"
    assert main(["report", "--results", str(sweep), "--out", str(out)]) == 0
    html = out.read_text()
    assert not re.search(r"""<(script|link|img|iframe)[^>]+(src|href)\s*=\s*["']?(https?:)?//""", html, re.I)

    requested: list[str] = []
    page, problems = open_page(browser, out.as_uri(), {"offline": True})
    page.on("request", lambda r: requested.append(r.url))
    page.route(re.compile(r"^(https?|wss?|ftp):"), lambda route: route.abort())
    page.reload()  # with the listeners in place from the first request
    wait_until_drawn(page)
    rows = table_rows(page)
    best = json.loads((sweep / "best.json").read_text())
    assert set(rows) == {r["trial_id"] for r in best["trials"]}
    for row in best["trials"]:
        assert float(rows[row["trial_id"]]["best_val_iou"]) == pytest.approx(row["best_val_iou"])
    assert page.get_attribute("#trials tbody tr:first-child", "data-trial-id") == best["trial_id"]
    assert len(page.query_selector_all("#predictions img")) == 12
    external = [u for u in requested if not u.startswith(("file:", "data:", "blob:", "about:"))]
    assert not external, external
    assert not problems, problems
