"""`unet-ray evaluate` and `unet-ray predict` with object-storage URIs, against a real S3 API (moto's
server on 127.0.0.1, tests/conftest.py's s3_server): a checkpoint, a run folder (best.json), a
prepared folder, a pairs folder and photos in a bucket give exactly what their local copies give;
predict writes from its actors into a bucket the same PNG bytes a local run writes; bad URIs,
missing buckets and objects and refused keys stop before Ray with one line, credentials redacted.

Only the bucket-to-bucket predict starts Ray (in a subprocess, as a user's command would)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image

from unet_ray import checkpoint as ckpt_io
from unet_ray import pairs, predict, storage
from unet_ray.checkpoint import CheckpointError
from unet_ray.cli import main
from unet_ray.config import TrainConfig
from unet_ray.model import build_model
from unet_ray.prepare import prepare

from conftest import encode

# moto's server starts in the first S3 test's setup (a few seconds; the fixture waits at most 60)
pytestmark = pytest.mark.timeout(300)

SECRET_IN_URI = "hunter2-secret"
CHECKPOINT_NAME = "checkpoint_2026-01-02_03-04-05.000000"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """checkpoint.fetch's copies in this test's folder, not the user's ~/.cache."""
    monkeypatch.setenv(ckpt_io.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "checkpoints"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Local originals: a 64 px cityscapes19 checkpoint (untrained, its head scaled up so that its
    predictions hold many classes), a pairs folder (4 train, 3 val) and its prepared folder."""
    tmp = tmp_path_factory.mktemp("storage_commands")
    cfg = TrainConfig.from_dict(
        {"data": {"image_size": 64, "classes": "cityscapes19"},
         "model": {"depth": 2, "base_channels": 4, "block": "plain", "upsample": "transpose"}}
    ).validate()  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.num_classes)
    with torch.no_grad():
        model.head.weight.normal_(0, 1)
        model.head.bias.zero_()
    checkpoint = tmp / "run" / CHECKPOINT_NAME
    ckpt_io.save_state(checkpoint, {"model": model.state_dict(), "epoch": 2, "config": cfg.to_dict(), "metrics": {}})
    root = pairs.write_synthetic(tmp / "pairs", 4, 3, seed=0)
    prepared = tmp / "prepared"
    prepare(root, prepared, 64, "cityscapes19", progress=lambda *_: None)  # 7 pairs: in process, no Ray
    return {"checkpoint": checkpoint, "pairs": root, "prepared": prepared, "tmp": tmp}


def upload_all(local, bucket: str) -> dict[str, str]:
    """The originals in `bucket`, laid out as a training run on object storage leaves them."""
    run = f"{bucket}/runs/r"
    checkpoint = f"{run}/{CHECKPOINT_NAME}"
    storage.upload(local["checkpoint"], checkpoint)
    storage.write_text(f"{run}/best.json", json.dumps({"checkpoint": checkpoint, "epoch": 2, "metrics": {"val_iou": 0.1}}))
    storage.write_text(f"{run}/history.jsonl", json.dumps({"epoch": 1}) + "\n")
    storage.upload(local["pairs"], f"{bucket}/data/pairs")
    storage.upload(local["prepared"], f"{bucket}/data/prepared")
    return {"run": run, "checkpoint": checkpoint, "pairs": f"{bucket}/data/pairs", "prepared": f"{bucket}/data/prepared"}


def evaluated(capsys, checkpoint, data, *extra: str) -> dict:
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), *extra]) == 0
    return json.loads(capsys.readouterr().out)


def without_locations(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("checkpoint", "data")}


# --- evaluate (no Ray) -------------------------------------------------------------------------


def test_evaluate_from_a_bucket_gives_the_local_metrics(s3_env, local, capsys, ray_must_not_start):
    remote = upload_all(local, s3_env.make_bucket("eval-same"))
    for data in ("pairs", "prepared"):
        for split in ("val", "train"):
            expected = evaluated(capsys, local["checkpoint"], local[data], "--split", split)
            got = evaluated(capsys, remote["checkpoint"], remote[data], "--split", split)
            assert got["checkpoint"] == remote["checkpoint"] and got["data"] == remote[data]
            assert without_locations(got) == without_locations(expected), (data, split)
            assert got["images"] == (3 if split == "val" else 4) and got["val_pixels"] > 0
    # the metrics are not all trivial: the model predicts several classes
    assert 0 < expected["val_miou"] < 1
    assert ray_must_not_start.calls == []


def test_evaluate_skips_bad_pair_files_in_a_bucket_naming_their_uris(s3_env, local, capsys):
    remote = upload_all(local, s3_env.make_bucket("eval-bad"))
    storage.write_bytes(f"{remote['pairs']}/val/9.jpg", b"no image")
    assert main(["evaluate", "--checkpoint", remote["run"], "--data", remote["pairs"]]) == 2
    assert f"unet-ray evaluate: error: {remote['pairs']}/val/9.jpg: not a readable image" in capsys.readouterr().err
    result = evaluated(capsys, remote["run"], remote["pairs"], "--skip-bad-files")
    assert result["images"] == 3 and len(result["skipped_files"]) == 1
    assert result["skipped_files"][0].startswith(f"{remote['pairs']}/val/9.jpg: not a readable image")


def test_a_run_folder_uri_resolves_through_its_best_json(s3_env, local, own_cache, capsys):
    remote = upload_all(local, s3_env.make_bucket("eval-run"))
    assert ckpt_io.locate(remote["run"]) == f"{remote['checkpoint']}/state.pt"
    assert ckpt_io.locate(remote["checkpoint"]) == f"{remote['checkpoint']}/state.pt"
    assert ckpt_io.locate(f"{remote['checkpoint']}/state.pt") == f"{remote['checkpoint']}/state.pt"
    expected = evaluated(capsys, local["checkpoint"], local["prepared"])
    got = evaluated(capsys, remote["run"], remote["prepared"])
    assert got["checkpoint"] == remote["run"] and without_locations(got) == without_locations(expected)

    # fetched once into the cache, as the very bytes; a second fetch reuses the copy
    fetched = ckpt_io.fetch(remote["run"])
    assert fetched.parent.parent == own_cache and fetched.name == "state.pt"
    assert fetched.read_bytes() == (local["checkpoint"] / "state.pt").read_bytes()
    assert len(list(own_cache.iterdir())) == 1 and not list(own_cache.glob("*/.fetch-*"))
    assert ckpt_io.resolve(remote["run"]) == fetched
    # a changed object is a new version: fetched again, not the stale copy
    other = local["tmp"] / "other"
    state = ckpt_io.load_state(local["checkpoint"])
    ckpt_io.save_state(other, {**state, "epoch": 7, "extra": "x" * 100})
    storage.upload(other / "state.pt", f"{remote['checkpoint']}/state.pt")
    assert ckpt_io.load_state(remote["run"])["epoch"] == 7
    assert len(list(own_cache.iterdir())) == 2

    # best.json in a bucket may name a local checkpoint
    storage.write_text(f"{remote['run']}-local/best.json", json.dumps({"checkpoint": str(local["checkpoint"])}))
    assert ckpt_io.locate(f"{remote['run']}-local") == str(local["checkpoint"] / "state.pt")
    assert ckpt_io.load_state(f"{remote['run']}-local")["epoch"] == 2


def test_unusable_checkpoints_in_a_bucket_are_named(s3_env, local):
    bucket = s3_env.make_bucket("eval-ckpt-errors")
    storage.write_bytes(f"{bucket}/broken/state.pt", b"not a checkpoint")
    storage.write_text(f"{bucket}/notrun/readme.txt", "x")
    storage.write_text(f"{bucket}/badbest/best.json", "{not json")
    cases = [
        (f"{bucket}/broken", f"{bucket}/broken/state.pt is corrupt or not a PyTorch checkpoint"),
        (f"{bucket}/notrun", f"{bucket}/notrun holds no state.pt and no best.json"),
        (f"{bucket}/badbest", f"{bucket}/badbest/best.json is not a unet_ray summary"),
        (f"{bucket}/nothing", f"checkpoint {bucket}/nothing does not exist"),
    ]
    for uri, message in cases:
        with pytest.raises(CheckpointError) as info:
            ckpt_io.load_model(uri)
        assert str(info.value).startswith(message), str(info.value)


def one_error_line(captured, command: str) -> str:
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"unet-ray {command}: error: "), lines
    return lines[0]


def error_cases(bucket: str) -> list[tuple[str, str, str]]:
    """(flag, URI, the error's expected text) for each way a URI goes wrong."""
    return [
        ("--checkpoint", "s3://no-such-bucket/runs/r", "checkpoint s3://no-such-bucket/runs/r: bucket 'no-such-bucket' does not exist"),
        ("--checkpoint", f"{bucket}/runs/none", f"checkpoint {bucket}/runs/none does not exist"),
        ("--checkpoint", "s3:/x", "checkpoint s3:/x is not a valid URI"),
        ("--data", "s3://no-such-bucket/data", "data s3://no-such-bucket/data: bucket 'no-such-bucket' does not exist"),
        ("--data", f"{bucket}/data/none", f"data {bucket}/data/none does not exist"),
        ("--data", "s3:/x", "data s3:/x is not a valid URI: write s3://bucket/path"),
        ("--data", "nosuch://b/k", "data nosuch://b/k: unknown storage scheme 'nosuch'"),
        ("--data", f"s3://AKIAUSER:{SECRET_IN_URI}@no-such-bucket/d", "data s3://***@no-such-bucket/d: bucket 'no-such-bucket' does not exist"),
    ]


def test_evaluate_bad_uris_stop_with_one_line(s3_env, local, capsys, ray_must_not_start):
    remote = upload_all(local, s3_env.make_bucket("eval-errors"))
    for flag, uri, message in error_cases("s3://eval-errors"):
        args = {"--checkpoint": remote["run"], "--data": remote["prepared"]} | {flag: uri}
        assert main(["evaluate", *[x for pair in args.items() for x in pair]]) == 2, (flag, uri)
        captured = capsys.readouterr()
        line = one_error_line(captured, "evaluate")
        assert message in line, line
        assert SECRET_IN_URI not in line and s3_env.env["AWS_SECRET_ACCESS_KEY"] not in line
    assert ray_must_not_start.calls == []


def test_predict_bad_uris_stop_with_one_line(s3_env, local, tmp_path, capsys, ray_must_not_start):
    remote = upload_all(local, s3_env.make_bucket("predict-errors"))
    bucket = "s3://predict-errors"
    cases = [(flag, uri, message) for flag, uri, message in error_cases(bucket) if flag == "--checkpoint"] + [
        ("--input", "s3://no-such-bucket/photos", "input s3://no-such-bucket/photos: bucket 'no-such-bucket' does not exist"),
        ("--input", f"{bucket}/in/none", f"input {bucket}/in/none does not exist"),
        ("--input", "s3:/x", "input s3:/x is not a valid URI: write s3://bucket/path"),
        ("--input", "nosuch://b/k", "input nosuch://b/k: unknown storage scheme 'nosuch'"),
        ("--out", "s3://no-such-bucket/out", "output folder s3://no-such-bucket/out: bucket 'no-such-bucket' does not exist"),
        ("--out", "s3:/x", "output folder s3:/x is not a valid URI"),
        ("--out", f"s3://AKIAUSER:{SECRET_IN_URI}@no-such-bucket/o", "output folder s3://***@no-such-bucket/o: bucket 'no-such-bucket' does not exist"),
    ]  # fmt: skip
    for flag, uri, message in cases:
        args = {"--checkpoint": remote["run"], "--input": f"{remote['pairs']}/val", "--out": str(tmp_path / "o")} | {flag: uri}
        assert main(["predict", *[x for pair in args.items() for x in pair]]) == 2, (flag, uri)
        line = one_error_line(capsys.readouterr(), "predict")
        assert message in line, line
        assert SECRET_IN_URI not in line and s3_env.env["AWS_SECRET_ACCESS_KEY"] not in line
    assert not (tmp_path / "o").exists() and not storage.exists(f"{bucket}/out")
    assert ray_must_not_start.calls == []


def test_refused_keys_stop_evaluate_and_predict_with_one_line(s3_env, local, tmp_path, capsys, monkeypatch, ray_must_not_start):
    remote = upload_all(local, s3_env.make_bucket("guarded"))
    with s3_env.enforce_auth() as (key_id, secret):
        # an unknown key id (the environment's testing-key), then the server's key id with a wrong secret
        for key, wrong in (("testing-key", s3_env.env["AWS_SECRET_ACCESS_KEY"]), (key_id, "wrong-secret-Xy7")):
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
            runs = [
                (["evaluate", "--checkpoint", remote["run"], "--data", remote["prepared"]], "evaluate", f"checkpoint {remote['run']}"),
                (["evaluate", "--checkpoint", str(local["checkpoint"]), "--data", remote["pairs"]], "evaluate", f"data {remote['pairs']}"),
                (["predict", "--checkpoint", remote["run"], "--input", str(tmp_path), "--out", str(tmp_path / "o")], "predict",
                 f"checkpoint {remote['run']}"),
                (["predict", "--checkpoint", str(local["checkpoint"]), "--input", f"{remote['pairs']}/val", "--out",
                  str(tmp_path / "o")], "predict", f"input {remote['pairs']}/val"),
                (["predict", "--checkpoint", str(local["checkpoint"]), "--input", str(local["pairs"]), "--out", "s3://guarded/out"],
                 "predict", "output folder s3://guarded/out"),
            ]  # fmt: skip
            for argv, command, shown in runs:
                assert main(argv) == 2, argv
                line = one_error_line(capsys.readouterr(), command)
                assert f"{shown}: access denied; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line, line
                assert wrong not in line and secret not in line
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.env["AWS_ACCESS_KEY_ID"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.env["AWS_SECRET_ACCESS_KEY"])
    assert not (tmp_path / "o").exists()
    assert ray_must_not_start.calls == []


# --- predict: listing, the actor's reads and writes (no Ray) -----------------------------------


def photo_tree(root: Path) -> dict[str, tuple[int, int]]:
    """A few small photos in nested folders (odd sizes, PNG and JPEG) and one unreadable file;
    {relative path: (height, width)} of the readable ones."""
    sizes = {"a.jpg": (64, 64), "sub/b.png": (48, 80), "sub/deeper/c.jpg": (64, 40), "sub/a.png": (64, 64)}
    for i, (rel, (h, w)) in enumerate(sizes.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        photo = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        (root / rel).write_bytes(encode(photo, "PNG" if rel.endswith(".png") else "JPEG"))
    (root / "bad.jpg").write_bytes(b"this is no image")
    return sizes


def test_list_inputs_of_a_bucket_names_outputs_as_for_local_folders(s3_env, local, tmp_path, monkeypatch):
    """The same tree locally and in a bucket: the same output names, kinds and splits (recursive,
    relative paths in the names, the output folder left out), without reading any file."""
    bucket = s3_env.make_bucket("listing")
    tree = tmp_path / "in"
    photo_tree(tree / "photos")
    (tree / "photos" / "sub" / "b.jpg").write_bytes(b"x")  # collides with sub/b.png: sub_b-2
    shutil.copytree(local["pairs"], tree / "pairs")
    (tree / "photos" / "out").mkdir()
    (tree / "photos" / "out" / "old_mask.png").write_bytes(b"x")  # an earlier run's output inside the input
    storage.upload(tree, f"{bucket}/in")

    def no_reading(*args, **kwargs):
        raise AssertionError("the driver must not read the input files")

    monkeypatch.setattr(storage, "read_bytes", no_reading)
    for inputs in (["photos"], ["photos", "pairs"], ["pairs"], ["photos/sub/b.png", "pairs/val"], ["pairs/val/2.jpg"]):
        expected, expected_collisions = predict.list_inputs([str(tree / i) for i in inputs], out=tree / "photos" / "out")
        got, collisions = predict.list_inputs([f"{bucket}/in/{i}" for i in inputs], out=f"{bucket}/in/photos/out")
        assert [(i["name"], i["kind"], i["split"]) for i in got] == [(i["name"], i["kind"], i["split"]) for i in expected], inputs
        assert [i["path"] for i in got] == [f"{bucket}/in/" + Path(i["path"]).relative_to(tree).as_posix() for i in expected]
        assert collisions == {k: f"{bucket}/in/" + Path(v).relative_to(tree).as_posix() for k, v in expected_collisions.items()}
    got, collisions = predict.list_inputs([f"{bucket}/in/photos"], out=f"{bucket}/in/photos/out")
    assert [i["name"] for i in got] == ["a", "bad", "sub_a", "sub_b", "sub_b-2", "sub_deeper_c"]
    assert collisions == {"sub_b": f"{bucket}/in/photos/sub/b.jpg", "sub_b-2": f"{bucket}/in/photos/sub/b.png"}
    assert "out_old_mask" in [i["name"] for i in predict.list_inputs([f"{bucket}/in/photos"])[0]]  # no --out given there
    with pytest.raises(predict.DataError, match=f"input {bucket}/in/none does not exist"):
        predict.list_inputs([f"{bucket}/in/none"])


def test_the_actor_reads_and_writes_a_bucket_itself(s3_env, local, tmp_path):
    """Predictor (the map_batches class) given URIs: fetches the checkpoint, reads each input's
    bytes, writes the PNGs (the same bytes as into a local folder), skips what exists, and names
    unreadable and missing inputs by their URIs."""
    bucket = s3_env.make_bucket("actor")
    sizes = photo_tree(tmp_path / "photos")
    storage.upload(tmp_path / "photos", f"{bucket}/photos")
    remote = upload_all(local, bucket)
    names = [Path(rel).with_suffix("").as_posix().replace("/", "_") for rel in sizes] + ["bad", "gone"]

    def batch(root: str) -> dict[str, np.ndarray]:
        paths = [f"{root}/{rel}" for rel in sizes] + [f"{root}/bad.jpg", f"{root}/gone.jpg"]
        n = len(paths)
        return {"path": np.array(paths, dtype=object), "name": np.array(names, dtype=object),
                "kind": np.array(["auto"] * n, dtype=object), "split": np.array([""] * n, dtype=object)}  # fmt: skip

    (tmp_path / "out").mkdir()
    here = predict.Predictor(str(local["checkpoint"] / "state.pt"), str(tmp_path / "out"), True, False, "cpu", 1)
    there = predict.Predictor(ckpt_io.locate(remote["run"]), f"{bucket}/out", True, False, "cpu", 1)
    rows_here, rows_there = here(batch(str(tmp_path / "photos"))), there(batch(f"{bucket}/photos"))
    assert rows_there["status"].tolist() == rows_here["status"].tolist() == ["ok"] * len(sizes) + ["bad", "bad"]
    assert rows_there["error"][-2].startswith(f"{bucket}/photos/bad.jpg: not a readable image")
    assert rows_there["error"][-1] == f"{bucket}/photos/gone.jpg does not exist"
    written = storage.list_files(f"{bucket}/out")
    assert len(written) == 3 * len(sizes)
    for uri in written:
        assert storage.read_bytes(uri) == (tmp_path / "out" / uri.rsplit("/", 1)[-1]).read_bytes(), uri
    mask = np.asarray(Image.open(tmp_path / "out" / "sub_b_mask.png"))
    assert mask.shape == sizes["sub/b.png"] and len(np.unique(mask)) > 1

    again = predict.Predictor(ckpt_io.locate(remote["run"]), f"{bucket}/out", True, True, "cpu", 1)(batch(f"{bucket}/photos"))
    assert again["status"].tolist() == ["exists"] * len(sizes) + ["bad", "bad"]


# --- predict through Ray, bucket to bucket -----------------------------------------------------


def command_env(s3_server, tmp: Path) -> dict[str, str]:
    """The machine's environment without its AWS settings or Ray address, with the moto server's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    return {**env, **s3_server.env, ckpt_io.CACHE_ENV: str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}


def cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli(args, env, timeout)


def test_predict_refused_keys_stop_the_command_before_ray(s3_server, local, tmp_path):
    """The command itself (a subprocess, as a user runs it): exit 2, one line, no Ray."""
    s3_server.make_bucket("guarded-cli")
    env = command_env(s3_server, tmp_path)
    with s3_server.enforce_auth():  # the env's testing-key is now unknown to the server
        done = cli(["predict", "--checkpoint", str(local["checkpoint"]), "--input", str(local["pairs"]),
                    "--out", "s3://guarded-cli/out"], env, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "output folder s3://guarded-cli/out: access denied" in lines[0], lines
    assert "ray: started" not in done.stdout and s3_server.env["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr


@pytest.mark.ray
@pytest.mark.objectstore  # a local Ray in a subprocess: with the other object-storage runs (second command)
def test_predict_from_a_bucket_to_a_bucket_writes_the_local_bytes(s3_env, local, tmp_path):
    s3_server = s3_env
    photos = tmp_path / "photos"
    sizes = photo_tree(photos)
    env = command_env(s3_server, tmp_path)
    bucket = s3_server.make_bucket("predicted")
    remote = upload_all(local, bucket)
    storage.upload(photos, f"{bucket}/in/photos")
    flags = ["--workers", "1", "--batch-size", "2", "--overlay"]

    here = cli(["predict", "--checkpoint", str(local["checkpoint"]), "--input", str(photos),
                "--out", str(tmp_path / "out"), *flags], env, timeout=240)  # fmt: skip
    assert here.returncode == 0, here.stdout[-3000:] + here.stderr[-3000:]
    there = cli(["predict", "--checkpoint", remote["run"], "--input", f"{bucket}/in/photos", "--out", f"{bucket}/out", *flags],
                env, timeout=240)  # fmt: skip
    assert there.returncode == 0, there.stdout[-3000:] + there.stderr[-3000:]
    assert "ray: started" in there.stdout  # its own local Ray
    assert f"predict: {len(sizes) + 1} files -> {bucket}/out (model 64px, cityscapes19, epoch 2 of {remote['checkpoint']}/state.pt)" in there.stdout

    local_files = sorted(p.name for p in (tmp_path / "out").iterdir())
    remote_files = storage.list_files(f"{bucket}/out")
    assert [uri.rsplit("/", 1)[-1] for uri in remote_files] == local_files
    pngs = [name for name in local_files if name.endswith(".png")]
    assert len(pngs) == 3 * len(sizes)
    for name in pngs:
        assert storage.read_bytes(f"{bucket}/out/{name}") == (tmp_path / "out" / name).read_bytes(), name
    summary = json.loads(storage.read_text(f"{bucket}/out/summary.json"))
    expected = json.loads((tmp_path / "out" / "summary.json").read_text())
    varying = ("checkpoint", "out", "skipped_list", "seconds", "files_per_s")
    assert {k: v for k, v in summary.items() if k not in varying} == {k: v for k, v in expected.items() if k not in varying}
    assert (summary["written"], summary["skipped"]) == (len(sizes), 1)
    assert summary["out"] == f"{bucket}/out" and summary["skipped_list"] == f"{bucket}/out/skipped.txt"
    assert summary["checkpoint"] == f"{remote['checkpoint']}/state.pt"
    skipped = storage.read_text(f"{bucket}/out/skipped.txt").splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(f"{bucket}/in/photos/bad.jpg: not a readable image")

    secret = s3_server.env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in there.stdout + there.stderr
    for uri in remote_files:
        assert secret.encode() not in storage.read_bytes(uri), uri
    for file in (tmp_path / "cache").rglob("*"):
        assert file.is_dir() or secret.encode() not in file.read_bytes(), file
