"""Clusters: `ray job submit` against real local Ray clusters (127.0.0.1 only, token auth on), and the
cloud cluster configs in cluster/ checked offline.

- one node, 2 CPUs, started with `unet-ray cluster up`: a training job succeeds and writes its
  metrics and best checkpoint under --storage-path; a job with a bad --data fails with our message;
  a client without the right token is refused;
- two nodes of 1 CPU each: a 2-worker run puts one worker on each node and reaches the same IoU as
  the same run on one node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli on 3.10
    import tomli as tomllib

from helpers import listening_addresses
from test_tracking import client as mlflow_client
from test_tracking import mlflow_server  # noqa: F401  (a fixture: the sweep job's MLflow server)
from test_tracking import numeric, wandb_run
from test_tracking import read_history as read_rows
from unet_ray import cluster
from unet_ray.checkpoint import resolve
from unet_ray.raysession import ONE_MACHINE_RAY_ENV

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # `ray`, from this Python
UNET_RAY_CLI = [sys.executable, "-m", "unet_ray.cli"]
JOB_TIMEOUT = 300  # seconds for one small training job on 2 busy cores
# Small, but enough epochs that the IoU settles (about 0.9 after 8 epochs of ~1 s). The same
# settings on one node and on two; --cpus-per-worker 0.75 fits one worker per 1-CPU node and
# leaves 0.25 CPU there for Ray Data tasks.
TRAIN_ARGS = [
    "--image-size", "64", "--depth", "3", "--base-channels", "8", "--epochs", "8", "--batch-size", "4",
    "--lr", "3e-3", "--workers", "2", "--cpus-per-worker", "0.75", "--no-augment", "--seed", "0",
]  # fmt: skip
SMALL_SYNTHETIC = {"data": {"synth_train": 64, "synth_val": 16}}


def path_with_this_python() -> str:
    """PATH with this Python's scripts first: jobs run `unet-ray` from the nodes' PATH, and the
    nodes inherit it from whoever starts them (CI may run pytest from an unactivated venv)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def short_temp_dir() -> str:
    """Ray's unix sockets live in the temp dir and their paths must stay under 108 bytes."""
    return tempfile.mkdtemp(prefix="ucl", dir="/tmp")


def submit(c: cluster.LocalCluster, entrypoint: list[str], submission_id: str, env=None, wait=True):
    """`ray job submit` as a user types it, from the repository root, with this checkout as
    working dir and cluster/runtime_env.yaml; waits for the job unless wait=False."""
    cmd = [
        *RAY_CLI, "job", "submit", "--address", c.dashboard_url, "--working-dir", ".",
        "--runtime-env", "cluster/runtime_env.yaml", "--submission-id", submission_id,
        *([] if wait else ["--no-wait"]), "--", *entrypoint,
    ]  # fmt: skip
    return subprocess.run(
        cmd, cwd=REPO, env=env or cluster.client_env(c), capture_output=True, text=True, timeout=JOB_TIMEOUT
    )


def jobs_client(c: cluster.LocalCluster):
    from ray.job_submission import JobSubmissionClient

    token = Path(c.token_path).read_text().strip()
    return JobSubmissionClient(c.dashboard_url, headers={"Authorization": f"Bearer {token}"})


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """A 2-CPU head started and stopped with `unet-ray cluster up|down`, on free ports, with its own
    temp dir and token file: nothing shared with other Ray instances on the machine."""
    temp_dir = short_temp_dir()
    token = tmp_path_factory.mktemp("auth") / "token"
    # without what an in-process ensure_ray of an earlier test set: `cluster up` must set it itself
    inherited = {k: v for k, v in os.environ.items() if k not in ONE_MACHINE_RAY_ENV}
    env = {**inherited, "PATH": path_with_this_python(), "RAY_AUTH_TOKEN_PATH": str(token)}
    port, dashboard_port = cluster.free_port(), cluster.free_port()
    up = subprocess.run(
        [*UNET_RAY_CLI, "cluster", "up", "--temp-dir", temp_dir, "--port", str(port),
         "--dashboard-port", str(dashboard_port), "--num-cpus", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"RAY_ADDRESS=127.0.0.1:{port}" in up.stdout
        assert f"ray job submit --address http://127.0.0.1:{dashboard_port} --working-dir ." in up.stdout
        c = cluster.find(temp_dir)
        assert c is not None and cluster.is_running(c)
        yield c
    finally:
        down = subprocess.run(
            [*UNET_RAY_CLI, "cluster", "down", "--temp-dir", temp_dir],
            env=env, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        left = cluster._marked_pids(str(Path(temp_dir).resolve()))
        shutil.rmtree(temp_dir, ignore_errors=True)  # Ray's own files; nothing to keep
        assert down.returncode == 0 and not left, (down.stdout, down.stderr, left)


@pytest.fixture(scope="module")
def job1(one_node, tmp_path_factory):
    """`unet-ray train` submitted as a Ray job on the one-node cluster; (storage path, result)."""
    storage = tmp_path_factory.mktemp("storage")
    config = storage.parent / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL_SYNTHETIC))
    entrypoint = ["unet-ray", "train", "--config", str(config), *TRAIN_ARGS, "--storage-path", str(storage), "--name", "job1"]
    return storage, submit(one_node, entrypoint, "job1")


@pytest.mark.ray
def test_train_job_joins_cluster_and_writes_under_storage_path(one_node, job1):
    from ray.job_submission import JobStatus

    storage, result = job1
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert jobs_client(one_node).get_job_status("job1") == JobStatus.SUCCEEDED
    # it joined the cluster from RAY_ADDRESS instead of starting a Ray of its own
    assert f"ray: joined the cluster at {one_node.address}" in output
    assert output.count("[unet-ray] epoch 8/8") == 1  # each progress line shown once

    run_dir = storage / "job1"
    assert [row["epoch"] for row in history(run_dir)] == list(range(1, 9))
    best = json.loads((run_dir / "best.json").read_text())
    state_file = resolve(run_dir)  # what every --checkpoint option does with a run folder
    assert state_file == Path(best["checkpoint"]) / "state.pt" and state_file.is_file()
    assert state_file.is_relative_to(storage) and Path(best["run_path"]).is_relative_to(storage)
    assert best["metrics"]["val_iou"] == max(row["val_iou"] for row in history(run_dir))


@pytest.mark.ray
def test_cluster_listens_on_loopback_only(one_node, job1):
    """After a job ran (workers, dashboard agents, job supervisor all started), every port that a
    process of the cluster listens on is bound to 127.0.0.1."""
    found = listening_addresses(cluster._marked_pids(str(Path(one_node.temp_dir).resolve())))
    assert f"127.0.0.1:{one_node.port}" in found and f"127.0.0.1:{one_node.dashboard_port}" in found
    assert all(address.startswith(("127.0.0.1:", "::1:")) for address in found), found


@pytest.mark.ray
def test_a_job_gets_the_one_machine_settings(one_node):
    """A job's driver has the settings `cluster up` gives its nodes (Ray Train reads the poll
    interval in the driver and passes it on to its controller)."""
    client = jobs_client(one_node)
    names = sorted(ONE_MACHINE_RAY_ENV)
    show = f"import json, os; print('seen=' + json.dumps({{k: os.environ.get(k) for k in {names!r}}}))"
    env_job = submit(one_node, [sys.executable, "-c", show], "env1")
    assert env_job.returncode == 0, env_job.stdout + env_job.stderr
    seen = next(line for line in client.get_job_logs("env1").splitlines() if line.startswith("seen="))
    assert json.loads(seen.removeprefix("seen=")) == ONE_MACHINE_RAY_ENV


@pytest.fixture(scope="module")
def sweep_job(one_node, mlflow_server, tmp_path_factory):
    """`unet-ray tune --tracking mlflow,wandb` as a Ray job: smoke.yaml cut to 2 trials of 2 epochs,
    sent to a real MLflow server (tests/test_tracking.py's) and to W&B offline. One sweep for the
    job checks here and the tracking checks (tests/test_tracking.py runs the train-run ones)."""
    uri, _ = mlflow_server
    tmp = tmp_path_factory.mktemp("sweep_job")
    smoke = yaml.safe_load((REPO / "tune_configs" / "smoke.yaml").read_text())
    smoke["optim"]["epochs"] = 2  # before ASHA's first rung (3): every trial runs to the end
    config = tmp / "smoke2.yaml"
    config.write_text(yaml.safe_dump(smoke))
    tracking_env = [f"MLFLOW_TRACKING_URI={uri}", "MLFLOW_EXPERIMENT_NAME=sweep-test", "WANDB_MODE=offline",
                    f"WANDB_DIR={tmp / 'wandb'}"]  # fmt: skip
    entrypoint = ["env", *tracking_env, "unet-ray", "tune", "--config", str(config), "--num-samples", "2",
                  "--storage-path", str(tmp / "results"), "--name", "sweep", "--tracking", "mlflow,wandb"]  # fmt: skip
    result = submit(one_node, entrypoint, "sweep1")
    return {"uri": uri, "result": result, "experiment": tmp / "results" / "sweep", "tmp": tmp}


@pytest.mark.ray
def test_tune_job_succeeds_and_writes_under_storage_path(one_node, sweep_job):
    from ray.job_submission import JobStatus

    # what is checked here is the sweep as a job (tests/test_tune.py runs the whole smoke sweep,
    # and what ASHA does with it)
    result, experiment = sweep_job["result"], sweep_job["experiment"]
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert jobs_client(one_node).get_job_status("sweep1") == JobStatus.SUCCEEDED
    best = json.loads((experiment / "best.json").read_text())
    assert len(best["trials"]) == 2 and best["val_iou"] == max(t["best_val_iou"] or -1 for t in best["trials"])
    assert Path(best["checkpoint"]).is_relative_to(experiment.parent) and resolve(experiment).is_file()


@pytest.mark.ray
def test_a_sweep_is_a_parent_run_with_a_child_run_per_trial(sweep_job):
    mlflow = mlflow_client(sweep_job["uri"])
    experiment = mlflow.get_experiment_by_name("sweep-test")
    runs = mlflow.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("unet_ray.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    best = json.loads((sweep_job["experiment"] / "best.json").read_text())
    assert parent.info.run_name == "sweep" and parent.info.status == "FINISHED"
    assert parent.data.params["search.lr"] == "loguniform [0.003, 0.03]" and parent.data.params["tune.num_samples"] == "2"
    assert parent.data.tags["best_trial"] == best["trial_id"]
    assert parent.data.metrics["best_val_iou"] == best["val_iou"]
    assert {a.path for a in mlflow.list_artifacts(parent.info.run_id)} == {"best.json", "model", "report.html"}
    assert [a.path for a in mlflow.list_artifacts(parent.info.run_id, "model")] == ["model/state.pt"]
    trials = {t["trial_id"]: t for t in best["trials"]}
    assert {c.info.run_name for c in children} == set(trials)
    for child in children:
        trial_id = child.info.run_name
        assert child.info.status == "FINISHED" and child.data.tags["unet_ray.trial_id"] == trial_id
        params = child.data.params
        assert float(params["optim.lr"]) == trials[trial_id]["config"]["lr"]
        assert int(params["model.depth"]) == trials[trial_id]["config"]["depth"]
        assert params["optim.epochs"] == "2" and params["run.workers"] == "1"
        rows = read_rows(sweep_job["experiment"] / "runs" / trial_id)
        assert [row["epoch"] for row in rows] == [1, 2]
        for key in numeric(rows[0]):
            logged = [(m.step, m.value) for m in mlflow.get_metric_history(child.info.run_id, key)]
            assert sorted(logged) == [(row["epoch"], float(row[key])) for row in rows], (trial_id, key)
    # each trial's Train run has its own TensorBoard files
    for trial_id in trials:
        assert list((sweep_job["experiment"] / "runs" / trial_id / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.ray
def test_a_sweep_in_wandb_is_one_group(sweep_job):
    runs = [wandb_run(folder) for folder in (sweep_job["tmp"] / "wandb" / "wandb").glob("offline-run-*")]
    assert sorted(r["run"].job_type for r in runs) == ["sweep", "trial", "trial"]
    assert {r["run"].run_group for r in runs} == {"sweep"}
    best = json.loads((sweep_job["experiment"] / "best.json").read_text())
    for found in runs:
        if found["run"].job_type == "trial":
            rows = read_rows(sweep_job["experiment"] / "runs" / found["run"].display_name)
            assert [h["val_iou"] for h in found["history"]] == pytest.approx([row["val_iou"] for row in rows])
        else:
            assert ("sweep-model", ["state.pt"]) in found["artifacts"]
            assert best["trial_id"] in found["raw"].decode(errors="replace")


@pytest.mark.ray
def test_failing_job_is_failed_with_our_message(one_node, tmp_path):
    from ray.job_submission import JobStatus

    entrypoint = ["unet-ray", "train", "--data", "/nonexistent", "--storage-path", str(tmp_path), "--name", "bad"]
    result = submit(one_node, entrypoint, "bad1")
    assert result.returncode == 1, result.stdout + result.stderr  # `ray job submit` exits 1 on FAILED
    client = jobs_client(one_node)
    assert client.get_job_status("bad1") == JobStatus.FAILED
    assert "exit code 2" in client.get_job_info("bad1").message  # the CLI's exit code for user errors
    logs = subprocess.run(
        [*RAY_CLI, "job", "logs", "bad1", "--address", one_node.dashboard_url],
        env=cluster.client_env(one_node), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert logs.returncode == 0, logs.stderr
    assert re.search(r"unet-ray train: error: .*/nonexistent", logs.stdout), logs.stdout
    assert not any(tmp_path.iterdir())  # stopped before writing anything


@pytest.mark.ray
def test_submit_without_the_token_is_refused(one_node):
    before = {job.submission_id for job in jobs_client(one_node).list_jobs()}
    wrong_token = {**cluster.client_env(one_node), "RAY_AUTH_TOKEN": "not-the-cluster-token"}  # beats the file
    no_token_mode = {k: v for k, v in cluster.client_env(one_node).items() if k != "RAY_AUTH_MODE"}
    for env, answer in ((wrong_token, "Authentication failed"), (no_token_mode, "Authentication required")):
        result = submit(one_node, ["echo", "must not run"], "intruder", env=env, wait=False)
        assert result.returncode != 0
        assert answer in result.stdout + result.stderr, result.stdout + result.stderr
    assert {job.submission_id for job in jobs_client(one_node).list_jobs()} == before


@pytest.mark.ray
@pytest.mark.multinode
def test_two_node_run_puts_one_worker_per_node_and_matches_one_node(job1, tmp_path, monkeypatch):
    storage1, result1 = job1
    assert result1.returncode == 0, "the one-node run failed; see the test above"
    monkeypatch.setenv("PATH", path_with_this_python())  # the nodes' environment
    temp_dir = short_temp_dir()
    try:
        c = cluster.start(
            temp_dir, cluster.free_port(), cluster.free_port(), num_cpus=1, worker_nodes=1,
            token_path=tmp_path / "token", object_store_mb=300,
        )  # fmt: skip
        check_two_node_run(c, storage1, tmp_path)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)  # start() and check_two_node_run stop the cluster


def check_two_node_run(c: cluster.LocalCluster, storage1: Path, tmp_path: Path) -> None:
    try:
        nodes = cluster.alive_nodes(c)
        assert len(nodes) == 2 and all(n["resources_total"]["CPU"] == 1 for n in nodes)
        shared = tmp_path / "shared"  # "shared storage": both nodes see this path
        # The one-node run's prepared data, read by Ray Data tasks on both nodes.
        prepared = storage1 / "job1" / "prepared"
        entrypoint = ["unet-ray", "train", "--data", str(prepared), *TRAIN_ARGS, "--storage-path", str(shared), "--name", "job2"]
        result = submit(c, entrypoint, "job2")
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

        workers = cluster.state(c, "actors", class_name="RayTrainWorker")
        assert len(workers) == 2, workers
        assert {w["node_id"] for w in workers} == {n["node_id"] for n in nodes}  # one per node

        one_node_iou = json.loads((storage1 / "job1" / "best.json").read_text())["metrics"]["val_iou"]
        two_node_iou = json.loads((shared / "job2" / "best.json").read_text())["metrics"]["val_iou"]
        assert two_node_iou > 0.5 and one_node_iou > 0.5, (one_node_iou, two_node_iou)
        assert two_node_iou == pytest.approx(one_node_iou, abs=0.05)
        assert resolve(shared / "job2").is_file()
    finally:
        cluster.stop(c)


# ---------------------------------------------------------------------------------------------
# The cloud configs, offline
# ---------------------------------------------------------------------------------------------


def project_pins() -> dict[str, str]:
    """{'ray': '<2.61,>=2.60', 'torch': ...}: the version ranges in pyproject.toml's dependencies."""
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {req.name: str(req.specifier) for req in map(Requirement, deps)}


def assert_matches_project(image: str) -> None:
    from packaging.specifiers import SpecifierSet

    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)(-gpu|-cu\d+)?", image)
    assert m, f"unexpected image {image}"
    assert m.group(1) in SpecifierSet(project_pins()["ray"]), (image, project_pins()["ray"])
    assert (m.group(2), m.group(3)) == ("3", "11"), image


def assert_sweep_fills(gpus: int) -> None:
    from unet_ray.tune import load_sweep

    sweep = load_sweep(REPO / "tune_configs" / "lr_depth.yaml")
    assert sweep.base.run.gpu and sweep.tune.max_concurrent_trials == gpus // sweep.base.run.workers


def test_a_client_of_the_cluster_is_not_sent_to_a_local_ray_started_before():
    """A process that started a local Ray (an in-process `unet-ray` call) named that Ray's dashboard
    in RAY_API_SERVER_ADDRESS; `ray job submit` and the nodes of a cluster started from it would ask
    that one instead (seen: "Failed to connect to Ray at address" of the old Ray). A user's own
    value stays."""
    from unet_ray.raysession import API_SERVER_ENV, OWN_API_SERVER_ENV

    c = cluster.LocalCluster(temp_dir="/tmp/x", port=1, dashboard_port=2, token_path="/tmp/x/token", pids=[], logs=[])
    ours = {API_SERVER_ENV: "http://127.0.0.1:5", OWN_API_SERVER_ENV: "http://127.0.0.1:5", "PATH": "/bin"}
    env = cluster.client_env(c, ours)
    assert API_SERVER_ENV not in env and OWN_API_SERVER_ENV not in env and env["RAY_AUTH_TOKEN_PATH"] == "/tmp/x/token"
    users = {**ours, API_SERVER_ENV: "http://127.0.0.1:7"}
    assert cluster.client_env(c, users)[API_SERVER_ENV] == "http://127.0.0.1:7"


def test_cloud_launcher_config_passes_validation():
    from packaging.specifiers import SpecifierSet
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER_DIR / "aws-gpu.yaml").read_text())
    config = prepare_config(raw)  # fills Ray's AWS defaults, as `ray up` does
    validate_config(config)  # Ray's JSON schema: a misspelt key fails here
    assert_matches_project(config["docker"]["image"])
    torch = re.search(r'torch==(\S+?)"', " ".join(config["setup_commands"]))
    assert torch and torch.group(1) in SpecifierSet(project_pins()["torch"])
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["max_workers"] > workers["min_workers"] == 0  # autoscaling GPU group
    # the project is installed on every node, from the checkout synced to every node
    assert raw["file_mounts"]["~/unet_ray"] == "." and "pip install -e ~/unet_ray" in config["setup_commands"]
    # the sweep asks for enough trials at once to grow the cluster to its full size (g5.12xlarge: 4 GPUs)
    assert workers["node_config"]["InstanceType"] == "g5.12xlarge"
    assert_sweep_fills(gpus=workers["max_workers"] * 4)
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in start


def test_kubernetes_manifest_matches_project_and_readme():
    from packaging.specifiers import SpecifierSet
    from ray.runtime_env import RuntimeEnv

    docs = [d for d in yaml.safe_load_all((CLUSTER_DIR / "kuberay-rayjob.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    claim, job = by_kind["PersistentVolumeClaim"], by_kind["RayJob"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        container = pod["containers"][0]
        assert_matches_project(container["image"])
        assert spec["rayVersion"] in container["image"]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims[mounts["/mnt/shared"]] == claim["metadata"]["name"]  # same claim, same path
    gpus = [pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for pod in pods[1:]]
    assert all(gpus), gpus
    assert_sweep_fills(gpus=sum(int(n) * g["maxReplicas"] for n, g in zip(gpus, spec["workerGroupSpecs"])))
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own checks of the fields
    # installs the project and a torch of the range pyproject.toml asks for
    packages = runtime_env["pip"]["packages"]
    torch = next(p for p in packages if p.startswith("torch=="))
    assert torch.split("==")[1].split("+")[0] in SpecifierSet(project_pins()["torch"]), torch
    assert any(p.startswith("unet_ray @ ") for p in packages), packages
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"]
    assert_matches_project(submitter)
    assert f"rayproject/ray:{spec['rayVersion']}-py311-gpu" in (CLUSTER_DIR / "README.md").read_text()
    entrypoint = job["spec"]["entrypoint"]
    assert entrypoint.startswith("unet-ray tune --config tune_configs/lr_depth.yaml")
    assert "--storage-path /mnt/shared/" in entrypoint
    assert entrypoint in (CLUSTER_DIR / "README.md").read_text()


def test_runtime_env_is_valid_and_leaves_data_and_results_out():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER_DIR / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    left_out = {".git", ".venv", "__pycache__", "data", "results", "checkpoints", "*.jpg", "*.parquet"}
    assert left_out <= set(env["excludes"])
    assert "pip" not in env and "conda" not in env  # installs nothing: works offline
