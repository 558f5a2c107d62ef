"""Experiment tracking (unet_ray/tracking.py): MLflow, TensorBoard and W&B.

A real MLflow tracking server (SQLite store and artifacts in a temporary folder, 127.0.0.1, a free
port) runs for the whole module; everything is read back through MLflow's own client. One
1-epoch `unet-ray train` with every tool runs as a subprocess, as a user runs it, and every check
shares it. A sweep's tracking (a parent run with a child per trial, a W&B group) is checked on
tests/test_cluster.py's sweep job, which runs with `--tracking mlflow,wandb` against this module's
server fixture: one 2-trial sweep for both. W&B runs
offline (WANDB_MODE=offline): its run files hold what it would send. Without Ray: the config key and
flag, what never becomes a parameter, an unreachable server (the run stops before Ray starts) and
a server that goes away mid-run (a warning; the run goes on).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import kill_session

from unet_ray import tracking
from unet_ray.cli import build_parser, config_from_args, overrides_from_args
from unet_ray.config import ConfigError, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"data": {"synth_train": 32, "synth_val": 16, "image_size": 64}, "model": {"depth": 3, "base_channels": 8},
         "optim": {"batch_size": 4}}
# A credential in the environment (the MLflow client sends it to the server): it must show up in
# no parameter, tag, W&B record, file of the run folder or console line.
TOKEN = "tok-3f9c2a71-never-logged"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_env(**extra: str) -> dict[str, str]:
    """This environment without what in-process `unet-ray` calls of other tests left in it (the
    console's quiet variables), without the tools' own settings of whoever runs the tests, plus `extra`."""
    from unet_ray import console

    env = {k: v for k, v in os.environ.items()
           if k not in console.QUIET_ENV and k != console.VERBOSE_ENV and not k.startswith(("MLFLOW_", "WANDB_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}  # fmt: skip


def run_command(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "unet_ray.cli", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc.pid)  # the local Ray it started, W&B's service, anything left
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def wait_for_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:g}s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """(URI, tmp folder) of a real `mlflow server` on 127.0.0.1, SQLite store, artifacts served."""
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(tmp / "server.log", "w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
           "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    # MLflow's background job runner (GenAI jobs) is not needed here, nor its huey package
    env = {**command_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=tmp)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", 120, proc)
        yield f"http://127.0.0.1:{port}", tmp
    finally:
        kill_session(proc.pid)
        log.close()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flat(config: dict, prefix: str = "") -> dict[str, str]:
    """A TrainConfig dict as MLflow parameters, written out independently of tracking.flat_params."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = ",".join(value) if isinstance(value, list) else str(value)
    return out


def numeric(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time",)}  # fmt: skip


def read_history(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# W&B's offline run file (LevelDB log blocks of protobuf records; wandb 0.31 has no Python reader)
# ---------------------------------------------------------------------------------------------


def wandb_records(run_file: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    pos, block, chunks = 7, 32768, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_run(folder: Path) -> dict:
    """{run, config, history, artifacts, exit} of one offline run folder."""
    [run_file] = folder.glob("run-*.wandb")
    found = {"run": None, "config": {}, "history": [], "artifacts": [], "exit": None, "raw": run_file.read_bytes()}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["run"] = record.run
            found["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            found["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                     for item in record.history.item})  # fmt: skip
        elif kind == "artifact":
            found["artifacts"].append((record.artifact.name, [c.path for c in record.artifact.manifest.contents]))
        elif kind == "exit":
            found["exit"] = record.exit
    return found


# ---------------------------------------------------------------------------------------------
# No Ray
# ---------------------------------------------------------------------------------------------


def test_tracking_is_a_config_key_and_a_repeatable_flag():
    assert TrainConfig().run.tracking == []
    cfg = TrainConfig.from_dict({"run": {"tracking": ["wandb", "mlflow", "wandb"]}}).validate(check_paths=False)
    assert cfg.run.tracking == ["wandb", "mlflow"]
    with pytest.raises(ConfigError, match=r"run.tracking: unknown tool 'mlfow'; choose from mlflow, tensorboard, wandb"):
        TrainConfig.from_dict({"run": {"tracking": ["mlfow"]}}).validate(check_paths=False)
    with pytest.raises(ConfigError, match=r"run.tracking: expected list, got 3"):
        TrainConfig.from_dict({"run": {"tracking": 3}})
    args = build_parser().parse_args(["train", "--tracking", "mlflow", "--tracking", "tensorboard,wandb"])
    assert overrides_from_args(args)["run.tracking"] == ["mlflow", "tensorboard", "wandb"]
    assert "run.tracking" not in overrides_from_args(build_parser().parse_args(["train"]))
    with pytest.raises(ConfigError, match="unknown tool 'neptune'"):
        config_from_args(build_parser().parse_args(["train", "--tracking", "neptune"]))
    tune_args = build_parser().parse_args(["tune", "--config", "x.yaml", "--tracking", "mlflow,wandb"])
    assert tune_args.tracking == ["mlflow,wandb"]


def test_a_sweep_takes_the_flag(tmp_path):
    from unet_ray.tune import load_sweep

    sweep = load_sweep(ROOT / "tune_configs" / "smoke.yaml", {"run.tracking": ["mlflow"], "run.storage_path": str(tmp_path)})
    assert sweep.base.run.tracking == ["mlflow"]


def test_what_could_hold_a_secret_is_masked_and_versions_are_tags():
    params = tracking.flat_params({
        "run": {"storage_path": "s3://AKIAEXAMPLE:wJalr/secret@bucket/runs?X-Amz-Signature=abc123&region=eu",
                "api_token": "xyz", "name": "unet", "tracking": ["mlflow", "wandb"], "cpus_per_worker": None},
    })  # fmt: skip
    assert params == {"run.storage_path": "s3://***@bucket/runs?X-Amz-Signature=***&region=eu", "run.api_token": "***",
                      "run.name": "unet", "run.tracking": "mlflow,wandb", "run.cpus_per_worker": "None"}  # fmt: skip
    assert tracking.redact("https://user:pass@mlflow.example/x?token=t1") == "https://***@mlflow.example/x?token=***"
    import ray

    from unet_ray import __version__

    tags = tracking.version_tags()
    assert tags["ray.version"] == ray.__version__
    git = tracking.git_commit()
    assert tags["unet_ray.code_version"].startswith(git[0] if git else __version__)


def test_each_number_of_a_history_row_is_a_metric_under_its_own_name():
    row = {"epoch": 2, "val_iou": 0.5, "lr": 0.001, "val_iou_per_class": [0.9, None], "channels_last": True,
           "dist_backend": "gloo", "checkpoint": "/x", "time": 1.0e9}  # fmt: skip
    assert tracking.epoch_metrics(row, ["rest", "road"]) == {"epoch": 2.0, "val_iou": 0.5, "lr": 0.001,
                                                             "val_iou_per_class/rest": 0.9}  # fmt: skip


def test_an_unreachable_server_stops_the_run_before_ray_starts(tmp_path):
    """One line naming the URI (its password masked), exit status 2, nothing of Ray, no run folder."""
    uri = f"http://alice:hunter2@127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = run_command(
        ["train", "--epochs", "1", "--storage-path", str(tmp_path / "results"), "--name", "nowhere", "--tracking", "mlflow"],
        command_env(MLFLOW_TRACKING_URI=uri), timeout=120,
    )  # fmt: skip
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 2, lines
    masked = uri.replace("alice:hunter2@", "***@")
    assert lines == [f"unet-ray train: error: tracking: MLflow server at {masked} cannot be reached (Connection refused)"]
    assert not (tmp_path / "results" / "nowhere").exists()
    assert time.monotonic() - started < 60


class Proxy:
    """A TCP forwarder on 127.0.0.1 to `port`, that can be shut: a server that goes away."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.open = True
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            self.conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def shut(self) -> None:
        self.open = False
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone leaves it listening)
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


def test_a_server_that_goes_away_mid_run_costs_one_warning(mlflow_server, tmp_path, monkeypatch, capsys):
    uri, _ = mlflow_server
    proxy = Proxy(int(uri.rsplit(":", 1)[1]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "goes-away")
    cfg = TrainConfig.from_dict({"run": {"tracking": ["mlflow"], "name": "away", "storage_path": str(tmp_path)}}).validate()
    tracked = tracking.start_run(cfg, tmp_path / "away", progress=lambda *_: None)
    [mlflow_sink] = [s for s in tracked.sinks if s.key == "mlflow"]
    tracked.log_epoch({"epoch": 1, "val_iou": 0.25, "time": time.time()})
    proxy.shut()
    started = time.monotonic()
    tracked.log_epoch({"epoch": 2, "val_iou": 0.5, "time": time.time()})  # the server is gone: a warning
    tracked.log_epoch({"epoch": 3, "val_iou": 0.75, "time": time.time()})  # dropped at once
    (tmp_path / "report.html").write_text("<html></html>")
    tracked.log_file(tmp_path / "report.html")
    tracked.close()
    assert time.monotonic() - started < 30
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tracking: warning:")]
    assert len(warnings) == 1 and "MLflow stopped working (epoch 2: " in warnings[0], warnings
    # what reached the server before it went away is there, and the TensorBoard files have it all
    run = client(uri).get_run(mlflow_sink.run_id)
    assert run.data.metrics == {"val_iou": 0.25, "epoch": 1.0} and run.info.status == "RUNNING"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "away" / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("val_iou")] == [0.25, 0.5, 0.75]


# ---------------------------------------------------------------------------------------------
# A real train run and a real sweep
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_run(mlflow_server, tmp_path_factory):
    """A 1-epoch `unet-ray train --tracking mlflow --tracking tensorboard,wandb`."""
    uri, _ = mlflow_server
    tmp = tmp_path_factory.mktemp("train")
    (tmp / "small.yaml").write_text(yaml.safe_dump(SMALL))
    argv = ["train", "--config", str(tmp / "small.yaml"), "--epochs", "1", "--workers", "1",
            "--storage-path", str(tmp / "results"), "--name", "tracked", "--tracking", "mlflow", "--tracking", "tensorboard,wandb"]  # fmt: skip
    env = command_env(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="train-test", MLFLOW_TRACKING_TOKEN=TOKEN,
                      WANDB_MODE="offline", WANDB_DIR=str(tmp / "wandb"), WANDB_PROJECT="unet-ray-tests")  # fmt: skip
    result = run_command(argv, env, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    cfg = config_from_args(build_parser().parse_args(argv))
    return {"uri": uri, "result": result, "run": tmp / "results" / "tracked", "config": cfg.to_dict(), "tmp": tmp}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_train_run_is_one_mlflow_run_with_config_metrics_artifacts_and_versions(train_run):
    import ray

    mlflow = client(train_run["uri"])
    experiment = mlflow.get_experiment_by_name("train-test")
    [run] = mlflow.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params == flat(train_run["config"])  # the whole config
    history = read_history(train_run["run"])
    assert [row["epoch"] for row in history] == [1]
    for key, value in numeric(history[0]).items():  # every epoch, the same names and numbers
        assert [(m.step, m.value) for m in mlflow.get_metric_history(run.info.run_id, key)] == [(1, value)], key
    assert run.data.metrics["val_iou_per_class/road"] == history[0]["val_iou_per_class"][1]
    tags = run.data.tags
    git = tracking.git_commit()
    assert tags["unet_ray.code_version"].startswith(git[0] if git else "0.")
    assert tags["ray.version"] == ray.__version__ and tags["unet_ray.kind"] == "train"
    assert [a.path for a in mlflow.list_artifacts(run.info.run_id, "model")] == ["model/state.pt"]
    report = Path(mlflow.download_artifacts(run.info.run_id, "report.html", str(train_run["tmp"])))
    assert report.read_bytes() == (train_run["run"] / "report.html").read_bytes()
    assert TOKEN not in json.dumps([run.data.params, run.data.tags])


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_train_run_writes_tensorboard_scalars_and_predicted_masks(train_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(train_run["run"] / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    history = read_history(train_run["run"])
    for key, value in numeric(history[0]).items():
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(1, pytest.approx(value, rel=1e-6))], key
    images = events.Tags()["images"]
    assert images == [f"predictions/{i}" for i in range(4)]  # photo | true mask | predicted mask
    first = events.Images(images[0])[0]
    assert (first.width, first.height, first.step) == (3 * 64, 64, 1)
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")  # --tracking tensorboard
    shown = train_run["result"].stdout
    assert f"tensorboard --logdir {train_run['run']}" in shown
    assert f"tracking: MLflow: {train_run['uri']}/#/experiments/" in shown


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_train_run_in_wandb_offline_holds_config_metrics_and_artifacts(train_run):
    [folder] = (train_run["tmp"] / "wandb" / "wandb").glob("offline-run-*")
    found = wandb_run(folder)
    assert found["run"].project == "unet-ray-tests" and found["run"].display_name == "tracked"
    assert found["config"]["run"]["name"] == "tracked" and found["config"]["optim"]["epochs"] == 1
    history = read_history(train_run["run"])
    [logged] = found["history"]
    for key, value in numeric(history[0]).items():
        assert logged[key] == pytest.approx(value, rel=1e-12), key
    assert sorted(name for name, _ in found["artifacts"]) == ["tracked-model", "tracked-report"]
    assert ("tracked-model", ["state.pt"]) in found["artifacts"]
    assert found["exit"] is not None and found["exit"].exit_code == 0
    # nothing secret anywhere: W&B's records, the run folder's small files, the console
    assert TOKEN.encode() not in found["raw"]
    assert b"--tracking" not in found["raw"]  # nor the command line (a --storage-path can hold credentials)
    for file in train_run["run"].rglob("*"):
        if file.is_file() and file.suffix in (".json", ".jsonl", ".html") and file.stat().st_size < 5_000_000:
            assert TOKEN not in file.read_text(errors="replace"), file
    assert TOKEN not in train_run["result"].stdout + train_run["result"].stderr
