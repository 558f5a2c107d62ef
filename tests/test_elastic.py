"""Elastic training and node loss (README "Reliability").

Fast, no Ray: `run.workers` takes N or MIN-MAX; resources are planned for MAX; the learning-rate
schedule keeps to its epochs when the world size changes.

On one loopback cluster (127.0.0.1, token auth; a head and a worker node of 1 CPU each, so that
one worker of 0.7 CPU fits a node with room for Ray Data's 0.25-CPU tasks), two runs:

- `unet-ray train --workers 1-2` as a Ray job: the worker node is SIGKILLed (raylet and all) in
  epoch 2, the run shrinks to the head's one worker and resumes from its last checkpoint; a new
  node then joins and the run grows back to 2 workers (resize interval lowered to 2 s). One run
  for both, so it trains enough epochs to outlast a node's start-up on 2 busy cores.
- `unet-ray tune` whose one trial runs on the worker node (the head is kept full while it starts):
  that node is SIGKILLed in epoch 2, Tune starts the trial again on the head, its Train run
  resumes from its checkpoint and the sweep finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from unet_ray import cluster
from unet_ray.config import ConfigError, TrainConfig

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 300  # the longest any single wait below may take (a restart on 2 busy cores: ~30 s)
# Ray's GCS declares a node dead after this many missed 1 s health checks (Ray's default: 5 of
# 3 s): the loss is noticed in seconds, not half a minute. A check fails at once when the raylet
# is gone (connection refused); a slow but living raylet has 10 s per check (the default).
# Ray Train may first try to restart the group at its old size, before the node is declared dead;
# that try waits this long for its workers (Ray's default 60 s) before the next one takes the new size.
HEALTH_CHECK_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
}
SMALL = {
    "data": {"image_size": 64, "synth_train": 64, "synth_val": 16, "augment": "none"},
    "model": {"depth": 3, "base_channels": 8},
    "optim": {"batch_size": 4, "lr": 3e-3},
    "run": {"cpus_per_worker": 0.7, "seed": 0},
}
# The elastic run: its 1-worker stretch must outlast a node's start-up and a resize (~20 s here):
# measured, a 1-worker epoch of 64 pairs took 0.6 s and 28 of them ended before a new node was
# used; 192 pairs take ~1.5 s an epoch: in a run of 30 epochs the new node was used from epoch 26,
# so 40 leave a margin.
ELASTIC_TRAIN_ROWS, ELASTIC_EPOCHS = 192, 40


# ---------------------------------------------------------------------------------------------
# Without Ray
# ---------------------------------------------------------------------------------------------


def test_workers_is_a_number_or_a_range():
    from unet_ray.cli import build_parser, config_from_args

    for given, stored, low, high in ((2, 2, 2, 2), ("3", 3, 3, 3), ("1-2", "1-2", 1, 2), (" 2 - 4", "2-4", 2, 4), ("2-2", 2, 2, 2)):
        run = TrainConfig.from_dict({"run": {"workers": given}}).validate().run
        assert (run.workers, run.min_workers, run.max_workers, run.elastic) == (stored, low, high, low != high)
    for bad, why in ((0, "must be >= 1"), ("0-2", "must be >= 1"), ("3-1", "MIN must not be above MAX"),
                     ("a-b", "MIN-MAX"), (1.5, "MIN-MAX"), (True, "MIN-MAX")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"run.workers={bad!r}: .*{why}"):
            TrainConfig.from_dict({"run": {"workers": bad}}).validate()
    # the flag, and a checkpoint's saved config read back
    cfg = config_from_args(build_parser().parse_args(["train", "--workers", "1-2", "--resize-interval-s", "5"]))
    assert (cfg.run.workers, cfg.run.resize_interval_s) == ("1-2", 5.0)
    assert TrainConfig.from_dict(cfg.to_dict()).run.workers == "1-2"
    with pytest.raises(ConfigError, match="run.resize_interval_s=0.0"):
        TrainConfig.from_dict({"run": {"resize_interval_s": 0}}).validate()


def test_an_elastic_run_is_planned_for_max_and_needs_min_to_fit():
    from unet_ray.train import plan_resources
    from unet_ray.tune import SweepConfig, TuneSection, plan_concurrency

    def run(**values):
        return TrainConfig.from_dict({"run": values}).validate()

    # each of MAX workers gets its CPUs: 1-4 on 8.5 CPUs is 2 CPUs a worker, as 4 fixed ones
    assert plan_resources(run(workers="1-4"), 8.5).cpus_per_worker == plan_resources(run(workers=4), 8.5).cpus_per_worker == 2.0
    # MIN must fit now (the rest may come with nodes that join); 3 fixed workers of 1 CPU do not
    plan_resources(run(workers="1-3", cpus_per_worker=1.0), 2.0)
    with pytest.raises(ConfigError, match="3 workers x 1 CPUs do not fit in 2 CPUs"):
        plan_resources(run(workers=3, cpus_per_worker=1.0), 2.0)
    sweep = SweepConfig(run(workers="1-2", cpus_per_worker=1.0), {"lr": {"choice": [1e-3]}}, TuneSection())
    assert plan_concurrency(sweep, {"CPU": 5.0}) == 2  # trials sized for 2 workers + data reserve


def test_the_schedule_keeps_to_its_epochs_when_the_world_size_changes():
    """A group of another size resumes at the same epoch of the plan: 2 workers take 8 steps an
    epoch (64 rows, batch 4), 1 worker 16. After 1 epoch at 8 steps, a 1-worker group goes on
    at step 16 of its own plan, ending the run at lr 0 after its epochs; back at 2 workers after
    epoch 3, at step 24. The lr at each epoch boundary is then the plan's for that group."""
    import torch

    from unet_ray import recipe
    from unet_ray.data import steps_per_epoch

    optim = TrainConfig.from_dict({"optim": {"epochs": 4, "lr": 3e-3, "warmup_epochs": 0.5}}).validate().optim
    assert (steps_per_epoch(64, 2, 4), steps_per_epoch(64, 1, 4)) == (8, 16)

    def group(steps: int, state=None):
        optimizer = recipe.build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim)
        schedule = recipe.StepSchedule(optimizer, optim, steps)
        if state:
            schedule.load_state_dict(state)
        return optimizer, schedule

    def train(optimizer, schedule, steps: int) -> None:
        for _ in range(steps):
            optimizer.step()
            schedule.step()

    def planned(steps: int, epochs_done: int) -> float:  # the lr at an epoch boundary, as planned
        return group(steps, {"steps_done": steps * epochs_done})[1].get_last_lr()

    two = group(8)
    train(*two, 8)
    assert two[1].state_dict() == {"steps_done": 8, "steps_per_epoch": 8}
    one = group(16, two[1].state_dict())  # shrunk after epoch 1
    assert one[1].steps_done == 16 and one[1].get_last_lr() == pytest.approx(planned(16, 1))
    train(*one, 32)  # epochs 2 and 3
    assert one[1].get_last_lr() == pytest.approx(planned(16, 3))
    again = group(8, one[1].state_dict())  # grown back after epoch 3
    assert again[1].steps_done == 24
    train(*again, 8)
    assert again[1].get_last_lr() == pytest.approx(0.0, abs=1e-12)  # the cosine ends with the last epoch
    # a state saved before steps_per_epoch was kept (same world size): taken as it is
    assert group(8, {"steps_done": 12})[1].steps_done == 12


# ---------------------------------------------------------------------------------------------
# One 2-node cluster on 127.0.0.1
# ---------------------------------------------------------------------------------------------


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait(what: str, check, timeout: float = WAIT_S, every: float = 0.2):
    """check() until it returns something true (returned), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def _jobs(c: cluster.LocalCluster):
    from ray.job_submission import JobSubmissionClient

    token = Path(c.token_path).read_text().strip()
    return JobSubmissionClient(c.dashboard_url, headers={"Authorization": f"Bearer {token}"})


def _finished(c: cluster.LocalCluster, job_id: str, timeout: float = WAIT_S) -> str:
    from ray.job_submission import JobStatus

    client = _jobs(c)
    status = _wait(f"job {job_id} to end", lambda: client.get_job_status(job_id).is_terminal() and client.get_job_status(job_id), timeout, 1.0)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-5000:]
    return client.get_job_logs(job_id)


def _train_workers(c: cluster.LocalCluster) -> list[dict]:
    return cluster.state(c, "actors", class_name="RayTrainWorker", state="ALIVE")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head and one worker node, 1 CPU each. Every process of it carries the cluster's marker and
    is stopped at the end, whatever the tests did to it."""
    saved = {k: os.environ.get(k) for k in ["PATH", *HEALTH_CHECK_ENV]}
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    os.environ.update(HEALTH_CHECK_ENV)  # the nodes inherit it
    temp_dir = tempfile.mkdtemp(prefix="uel", dir="/tmp")  # Ray's socket paths must stay short
    try:
        c = cluster.start(
            temp_dir, cluster.free_port(), cluster.free_port(), num_cpus=1, worker_nodes=1,
            token_path=tmp_path_factory.mktemp("auth") / "token", object_store_mb=300,
        )  # fmt: skip
        try:
            yield c
        finally:
            cluster.stop(c)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _history_line(rows: list[dict]) -> str:
    return " ".join(f"{r['epoch']}/w{r.get('world_size')}/r{r['restored_from_epoch']}" for r in rows)


@pytest.mark.ray
@pytest.mark.multinode
def test_streaming_reads_and_augments_on_both_nodes(two_nodes, tmp_path, monkeypatch):
    """`--ingest streaming` on head + worker node, data on a path both see: Ray Data's read and
    augment tasks run on both nodes (Ray's task state), and the run trains every epoch. First in
    the module: the node-loss tests below replace the worker node."""
    from unet_ray import pairs, prepare

    c = two_nodes
    monkeypatch.setattr(prepare, "PART_FILE_BYTES", 8 * (64 * 64 * 4 + 256 * 256))  # 8 rows a file
    pairs.write_synthetic(tmp_path / "pairs", 64, 16, seed=0)
    prepare.prepare(tmp_path / "pairs", tmp_path / "prepared", 64, "road", progress=lambda _: None)
    config = tmp_path / "streamed.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "data": {**SMALL["data"], "augment": "light"}}))
    storage = tmp_path / "shared"
    entrypoint = (
        f"unet-ray train --config {config} --data {tmp_path / 'prepared'} --ingest streaming --workers 2 "
        f"--epochs 2 --storage-path {storage} --name streamed"
    )
    job = _jobs(c).submit_job(entrypoint=entrypoint, submission_id="streamed1")
    logs = _finished(c, job)
    assert "data: streaming from" in logs, logs[-3000:]
    rows = _history(storage / "streamed")
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["world_size"] == 2 for r in rows)
    tasks = [t for t in cluster.state(c, "tasks") if "ReadParquet" in t["name"] and "rows_to_batch" in t["name"]]
    assert len({t["node_id"] for t in tasks}) == 2, [(t["name"], t["node_id"]) for t in tasks]


@pytest.mark.ray
@pytest.mark.multinode
def test_a_lost_node_shrinks_the_run_and_a_new_node_grows_it(two_nodes, tmp_path):
    """--workers 1-2 on head + worker node: SIGKILL the worker node's processes in epoch 2; the
    run goes on with the head's worker from its last checkpoint; a node that joins then is used;
    every epoch is in history.jsonl once, and the run learns as an undisturbed one does."""
    from unet_ray import recipe
    from unet_ray.data import steps_per_epoch

    c = two_nodes
    storage = tmp_path / "shared"  # both nodes see it: one machine
    config = tmp_path / "elastic.yaml"
    values = {**SMALL, "data": {**SMALL["data"], "synth_train": ELASTIC_TRAIN_ROWS},
              "run": {**SMALL["run"], "resize_interval_s": 2.0}}  # fmt: skip
    config.write_text(yaml.safe_dump(values))
    entrypoint = (
        f"unet-ray train --config {config} --workers 1-2 --epochs {ELASTIC_EPOCHS} "
        f"--storage-path {storage} --name elastic"
    )
    job = _jobs(c).submit_job(entrypoint=entrypoint, submission_id="elastic1")
    run_dir = storage / "elastic"

    first = _wait("epoch 1", lambda: _history(run_dir))
    workers = _train_workers(c)
    assert first[0]["world_size"] == 2 and len({w["node_id"] for w in workers}) == 2, (first, workers)
    lost_node = {_session_of(w["pid"]): w["node_id"] for w in workers}[c.pids[1]]
    committed = len(_history(run_dir))  # epochs done when the node goes: the next is interrupted
    killed = cluster.kill_node(c, 1)
    assert killed and not cluster.node_pids(c, 1)

    shrunk = _wait("an epoch on the head alone", lambda: [r for r in _history(run_dir) if r["world_size"] == 1])
    assert lost_node not in {n["node_id"] for n in cluster.alive_nodes(c)}
    cluster.add_node(c, num_cpus=1, object_store_mb=300)
    logs = _finished(c, job, timeout=2 * WAIT_S)

    rows = _history(run_dir)
    story = _history_line(rows)
    epochs = Counter(r["epoch"] for r in rows)
    assert sorted(epochs) == list(range(1, ELASTIC_EPOCHS + 1)), story
    # no committed epoch trained twice; at most the one in progress when the node went
    assert all(n == 1 for e, n in epochs.items() if e != committed + 1) and epochs[committed + 1] <= 2, story
    sizes = [r["world_size"] for r in rows]
    assert sizes[0] == 2 and 1 in sizes, story
    after_loss = rows[sizes.index(1)]
    assert after_loss == shrunk[0] and 0 < after_loss["restored_from_epoch"] <= committed + 1, story
    grown = [r for r in rows[sizes.index(1):] if r["world_size"] == 2]
    assert grown and grown[0]["restored_from_epoch"] > 0, story  # the new node's worker joined at a restart
    assert all(r["world_size"] == 2 for r in rows[rows.index(grown[0]):]), story
    # the learning rate at every epoch's end is the plan's, for the steps an epoch of that group has
    cfg = TrainConfig.from_dict({**values, "optim": {**values["optim"], "epochs": ELASTIC_EPOCHS}}).validate()
    for row in rows:
        steps = steps_per_epoch(ELASTIC_TRAIN_ROWS, row["world_size"], 4)
        assert row["steps_per_epoch"] == steps
        schedule = recipe.StepSchedule(recipe.build_optimizer([_zero()], cfg.optim), cfg.optim, steps)
        schedule.load_state_dict({"steps_done": steps * row["epoch"]})
        assert row["lr"] == pytest.approx(schedule.get_last_lr(), rel=1e-6, abs=1e-12), (row["epoch"], story)
    # Within the noise of an undisturbed run: this setting's undisturbed 8-epoch two-node run
    # (tests/test_cluster.py) ends near 0.9, runs of it agree within 0.05; 30 epochs end higher.
    best = json.loads((run_dir / "best.json").read_text())
    assert best["metrics"]["val_iou"] >= 0.85 and rows[-1]["val_iou"] >= 0.8, story
    assert "[unet-ray] resumed from epoch" in logs


def _zero():
    import torch

    return torch.nn.Parameter(torch.zeros(1))


@pytest.mark.ray
@pytest.mark.multinode
def test_a_tune_trial_whose_node_dies_is_retried_from_its_checkpoint(two_nodes, tmp_path):
    """A one-trial sweep whose trial runs on the worker node (a job holds the head's CPU while it
    starts): SIGKILL that node in the trial's epoch 2 and free the head; Tune starts the trial
    again (its FailureConfig), its Train run resumes from the last checkpoint, the sweep ends."""
    from ray.job_submission import JobStatus

    c = two_nodes
    if len(cluster.alive_nodes(c)) < 2:  # the test above lost its node and could not add one
        cluster.add_node(c, num_cpus=1, object_store_mb=300)
    node = len(c.pids) - 1  # the newest node: the worker node
    client = _jobs(c)
    # 1 CPU on the head (where no trial fits then) held by a job that only waits
    blocker = client.submit_job(
        entrypoint=f"{sys.executable} -c 'import time; time.sleep({2 * WAIT_S})'",
        entrypoint_num_cpus=1, entrypoint_resources={"node:__internal_head__": 0.01}, submission_id="blocker",
    )  # fmt: skip
    _wait("the blocker job to run", lambda: client.get_job_status(blocker) == JobStatus.RUNNING)
    sweep_yaml = tmp_path / "sweep.yaml"
    values = {**SMALL, "optim": {**SMALL["optim"], "epochs": 4}, "run": {**SMALL["run"], "workers": 1},
              "search": {"lr": {"choice": [3e-3]}}, "tune": {"num_samples": 1, "scheduler": "fifo"}}  # fmt: skip
    sweep_yaml.write_text(yaml.safe_dump(values))
    storage = tmp_path / "results"
    job = client.submit_job(
        entrypoint=f"unet-ray tune --config {sweep_yaml} --storage-path {storage} --name sweep", submission_id="sweep1"
    )
    runs = storage / "sweep" / "runs"

    def trial_dirs():
        return [p.parent for p in runs.glob("*/history.jsonl") if _history(p.parent)]

    (trial,) = _wait("the trial's epoch 1", trial_dirs)
    workers = _train_workers(c)
    assert workers and all(_session_of(w["pid"]) == c.pids[node] for w in workers), workers
    committed = len(_history(trial))
    cluster.kill_node(c, node)
    client.stop_job(blocker)  # room on the head for the trial's second start
    logs = _finished(c, job)

    rows = _history(trial)
    story = _history_line(rows)
    epochs = Counter(r["epoch"] for r in rows)
    assert sorted(epochs) == [1, 2, 3, 4], story
    assert all(n == 1 for e, n in epochs.items() if e != committed + 1), story
    restarts = [r for r in rows if r["restored_from_epoch"] > 0]
    assert restarts and restarts[0]["restored_from_epoch"] >= committed, story
    best = json.loads((storage / "sweep" / "best.json").read_text())
    assert len(best["trials"]) == 1 and best["trials"][0]["error"] is None and best["trials"][0]["epochs"] == len(rows), best
    assert "best trial" in logs
