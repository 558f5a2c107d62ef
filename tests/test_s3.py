"""Training from object storage, end to end, against a real S3 API (moto's server on 127.0.0.1).

Pairs are uploaded to a bucket; `unet-ray train --data s3://... --storage-path s3://...` is
killed after its first checkpoint and run again (it resumes from the checkpoint in the bucket),
then `evaluate` and `predict` read the checkpoint from the bucket and predict writes into one.
Bad URIs, a missing bucket and refused keys stop before Ray with one line. The secret key is
never in any output or file. Marked `objectstore`: the second test command runs it.
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
from helpers import kill_session, run_cli

from unet_ray import pairs, storage

pytestmark = [pytest.mark.ray, pytest.mark.objectstore]
TRAIN_FLAGS = ["--image-size", "64", "--depth", "3", "--base-channels", "8", "--batch-size", "4", "--lr", "3e-3",
               "--workers", "2", "--augment", "none"]  # fmt: skip


def command_env(s3_server, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    return {**env, **s3_server.env, "HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


def cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli(args, env, timeout)


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):
    """The killed-and-resumed training run from a bucket to a bucket."""
    tmp = tmp_path_factory.mktemp("s3run")
    s3_server.make_bucket("data")
    s3_server.make_bucket("runs")
    env = command_env(s3_server, tmp / "home")
    os.environ.update(s3_server.env)  # for this process's own storage calls below
    pairs.write_synthetic(tmp / "pairs", 64, 16, seed=0)
    storage.upload(tmp / "pairs", "s3://data/pairs")
    args = ["train", "--data", "s3://data/pairs", "--storage-path", "s3://runs/exp", "--name", "r1", "--epochs", "4",
            *TRAIN_FLAGS]  # fmt: skip
    history = tmp / "home" / ".unet_ray" / "r1" / "history.jsonl"  # the driver's own copy
    first_log = tmp / "first.log"
    with open(first_log, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "unet_ray.cli", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while not (history.is_file() and history.read_text().strip()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        kill_session(proc.pid)
        proc.wait(timeout=30)
    done_before = [json.loads(x)["epoch"] for x in history.read_text().splitlines()] if history.is_file() else []
    assert 1 <= len(done_before) < 4, first_log.read_text()[-3000:]
    rerun = cli(args, env, timeout=400)
    return {"tmp": tmp, "env": env, "args": args, "first": first_log.read_text(), "rerun": rerun,
            "done_before": done_before, "history": history}  # fmt: skip


def test_a_run_from_a_bucket_to_a_bucket_resumes_after_the_driver_is_killed(s3_run):
    rerun = s3_run["rerun"]
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    shown = rerun.stdout + rerun.stderr
    assert f"resumed from epoch {s3_run['done_before'][-1]} checkpoint" in shown, shown[-3000:]
    # prepared once, into the bucket, where every node's read tasks can reach it
    assert storage.is_file("s3://runs/exp/r1/prepared/meta.json")
    assert "data: reusing s3://runs/exp/r1/prepared" in shown
    # the run's files are in the bucket too: its history (every epoch once) and best.json
    rows = [json.loads(x) for x in storage.read_text("s3://runs/exp/r1/history.jsonl").splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    best = json.loads(storage.read_text("s3://runs/exp/r1/best.json"))
    assert best["checkpoint"].startswith("s3://runs/exp/r1/checkpoint_")
    assert storage.is_file(best["checkpoint"] + "/state.pt")
    assert best["metrics"]["val_iou"] > 0.5, rows
    # the report page (a copy in the bucket) shows the best checkpoint's masks for 4 validation
    # pairs, read from the bucket: photo, true mask, prediction each
    report = storage.read_text("s3://runs/exp/r1/report.html")
    assert report.count("data:image/png;base64,") >= 12 and "no validation data" not in report


def test_evaluate_and_predict_read_the_checkpoint_from_the_bucket(s3_run):
    env = s3_run["env"]
    best = json.loads(storage.read_text("s3://runs/exp/r1/best.json"))
    evaluated = cli(["evaluate", "--checkpoint", "s3://runs/exp/r1", "--data", "s3://runs/exp/r1/prepared"], env)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    iou = float(re.search(r"val_iou\D*(\d\.\d+)", evaluated.stdout).group(1))
    assert iou == pytest.approx(best["metrics"]["val_iou"], abs=1e-4), evaluated.stdout
    predicted = cli(["predict", "--checkpoint", "s3://runs/exp/r1", "--input", "s3://data/pairs/val",
                     "--out", "s3://runs/predictions", "--workers", "1"], env)  # fmt: skip
    assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-3000:]
    masks = storage.list_files("s3://runs/predictions", "_mask.png")
    assert len(masks) == 16, masks


def test_the_secret_key_is_never_shown_or_written(s3_run, s3_server):
    secret = s3_server.env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in s3_run["first"] + s3_run["rerun"].stdout + s3_run["rerun"].stderr
    for file in (s3_run["tmp"] / "home").rglob("*"):
        if file.is_file() and file.stat().st_size < 50_000_000:
            assert secret.encode() not in file.read_bytes(), file
    for uri in storage.list_files("s3://runs/exp/r1"):
        if not uri.endswith(".parquet"):
            assert secret.encode() not in storage.read_bytes(uri), uri


@pytest.mark.parametrize(
    "flag, uri, message",
    [
        ("--data", "s3://no-such-bucket/pairs", "bucket 'no-such-bucket' does not exist"),
        ("--storage-path", "s3://no-such-bucket/runs", "bucket 'no-such-bucket' does not exist"),
        ("--data", "s3:/data/pairs", "is not a valid URI"),
        ("--data", "s3://data/not-there", "does not exist"),
        ("--storage-path", "s3://key:hunter2@runs/x", "credentials"),
    ],
)
def test_a_bad_uri_stops_before_ray_with_one_line(s3_run, flag, uri, message):
    args = ["train", "--data", "s3://data/pairs", "--storage-path", "s3://runs/bad", "--name", "bad", "--epochs", "1"]
    args[args.index(flag) + 1] = uri
    done = cli(args, s3_run["env"], timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert "ray: started" not in done.stdout and "hunter2" not in done.stdout + done.stderr


def test_refused_keys_stop_before_ray_with_one_line(s3_run, s3_server):
    with s3_server.enforce_auth():  # the env's testing-key is now unknown to the server
        done = cli(["train", "--data", "s3://data/pairs", "--storage-path", "s3://runs/bad", "--name", "bad"],
                   s3_run["env"], timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    # the storage path is checked first
    assert len(lines) == 1 and "storage path s3://runs/bad: access denied" in lines[0], lines
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr
