"""What a GPU run needs before it starts, checked on CPU with a faked cluster: workers that cannot
all get a GPU are refused (Ray Train would otherwise wait for them forever), a CPU run on a
cluster with GPUs says so, and the GPU defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from unet_ray import raysession, train
from unet_ray.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, ConfigError, TrainConfig


def gpu_config(tmp_path, workers: int) -> TrainConfig:
    return TrainConfig.from_dict(
        {"run": {"gpu": True, "workers": workers, "storage_path": str(tmp_path), "name": "g"}}
    ).validate()


def test_check_gpus_names_the_workers_and_the_gpus_found():
    raysession.check_gpus(2, True, {"CPU": 16, "GPU": 2})  # fits
    raysession.check_gpus(4, False, {"CPU": 16})  # CPU run: nothing to check
    with pytest.raises(ConfigError, match=r"--gpu --workers 2: each run's worker needs a whole GPU and the cluster has 1; use --workers 1 or fewer"):
        raysession.check_gpus(2, True, {"CPU": 16, "GPU": 1})
    with pytest.raises(ConfigError, match=r"each trial's worker needs a whole GPU and the cluster has 1"):
        raysession.check_gpus(2, True, {"CPU": 16, "GPU": 1.0}, per="trial")
    with pytest.raises(ConfigError, match=r"--gpu: the Ray cluster has no GPUs \(0 found\); leave out --gpu"):
        raysession.check_gpus(1, True, {"CPU": 16})


def test_a_local_gpu_run_with_more_workers_than_gpus_stops_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(train, "local_gpus", lambda: 1)  # one GPU on this (faked) machine

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run that cannot get its GPUs")

    monkeypatch.setattr(train, "ensure_ray", no_ray)
    with pytest.raises(ConfigError, match="--gpu --workers 2: .* the cluster has 1; use --workers 1"):
        train.run_training(gpu_config(tmp_path, workers=2))


def joined_cluster(monkeypatch, resources: dict[str, float], fit) -> None:
    """run_training as on a joined cluster with `resources` (never contacted: ensure_ray is faked),
    with `fit` in place of the training itself."""
    import ray

    monkeypatch.setattr(train, "ensure_ray", lambda progress=print: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    monkeypatch.setattr(train, "fit", fit)


def test_a_joined_cluster_without_enough_gpus_is_refused_before_training(tmp_path, monkeypatch):
    """`ray job submit` / RAY_ADDRESS: the GPUs are the cluster's, known once joined; the run stops
    there, before any data or trainer work."""

    def no_fit(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.1:10001")
    joined_cluster(monkeypatch, {"CPU": 32.0, "GPU": 3.0}, no_fit)
    with pytest.raises(ConfigError, match="--gpu --workers 4: .* the cluster has 3; use --workers 3"):
        train.run_training(gpu_config(tmp_path, workers=4))


def test_a_cpu_run_on_a_cluster_with_gpus_says_so(tmp_path, monkeypatch):
    joined_cluster(monkeypatch, {"CPU": 8.0, "GPU": 2.0}, lambda *args, **kwargs: {"fitted": True})
    printed: list[str] = []
    cfg = TrainConfig.from_dict({"run": {"storage_path": str(tmp_path), "name": "c"}}).validate()
    assert train.run_training(cfg, progress=printed.append) == {"fitted": True}
    assert "note: the cluster has 2 GPUs and this run trains on CPUs; add --gpu to use them" in printed
    assert raysession.gpu_notice(True, {"GPU": 2.0}) is None and raysession.gpu_notice(False, {"CPU": 2.0}) is None


def test_a_gpu_sweep_whose_trials_need_more_gpus_than_the_cluster_has_is_refused(tmp_path, monkeypatch):
    import ray

    from unet_ray import tune

    monkeypatch.setattr(raysession, "ensure_ray", lambda progress=print: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        f"run:\n  gpu: true\n  workers: 2\n  storage_path: {tmp_path}\n  name: s\n"
        "search:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
    )
    with pytest.raises(ConfigError, match="each trial's worker needs a whole GPU and the cluster has 1"):
        tune.run_sweep(tune.load_sweep(str(sweep_file)), progress=lambda *_: None)


def test_unet_ray_train_gpu_without_a_gpu_exits_with_one_line_before_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, whatever machine runs this
    done = subprocess.run(
        [sys.executable, "-m", "unet_ray.cli", "train", "--gpu", "--storage-path", str(tmp_path), "--name", "g"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "unet-ray train: error: --gpu: the Ray cluster has no GPUs (0 found); leave out --gpu to train on CPUs"
    ]
    assert "ray:" not in done.stdout  # no Ray was started or joined


def test_the_batch_size_default_follows_the_device():
    assert TrainConfig().validate(check_paths=False).optim.batch_size == CPU_BATCH_SIZE == 8
    assert TrainConfig.from_dict({"run": {"gpu": True}}).validate().optim.batch_size == GPU_BATCH_SIZE == 32
    given = TrainConfig.from_dict({"run": {"gpu": True}, "optim": {"batch_size": 12}}).validate()
    assert given.optim.batch_size == 12  # a batch the user gives is kept
