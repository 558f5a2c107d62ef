"""Reliability: bad input gives clear messages (or is skipped and counted), a killed driver's run
resumes from its last checkpoint, a full disk stops a run (or prepare) with its path and leaves
what was written intact, and two runs on one machine keep to their own Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_claiming_a_huge_size
from helpers import in_process_ray, kill_session
from unet_ray import pairs
from unet_ray.cli import main

BAD_FILES = {
    # name: (how to write it, the words the message must contain)
    "text.jpg": (lambda p: p.write_text("not an image"), "not a readable image"),
    "truncated.jpg": (lambda p: p.write_bytes(pairs.synth_pair_bytes(np.random.default_rng(1))[:3000]), "not a readable image"),
    "empty.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "square.jpg": (lambda p: Image.new("RGB", (256, 256)).save(p, "JPEG"), "256x256"),
    "gray.jpg": (lambda p: Image.new("L", (512, 256)).save(p, "JPEG"), "grayscale"),
    "rgba.jpg": (lambda p: Image.new("RGBA", (512, 256)).save(p, "PNG"), "RGBA"),
    "noise.jpg": (
        lambda p: Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 512, 3), dtype=np.uint8)).save(p, "JPEG"),
        "colour mask",
    ),
    "unreadable.jpg": (lambda p: p.symlink_to(p.parent / "missing-target.jpg"), "cannot be read"),
    "huge.jpg": (lambda p: p.write_bytes(jpeg_claiming_a_huge_size(512, 256)), "not a readable image"),
}


@pytest.fixture
def bad_pairs(tmp_path):
    root = pairs.write_synthetic(tmp_path / "pairs", 6, 3, seed=0)
    for name, (write, _) in BAD_FILES.items():
        write(root / "train" / name)
    return root


def test_missing_or_empty_split_is_refused_before_ray(tmp_path, capsys, ray_must_not_start):
    root = pairs.write_synthetic(tmp_path / "pairs", 2, 1)
    for f in (root / "val").iterdir():
        f.unlink()
    assert main(["prepare", "--src", str(root), "--out", str(tmp_path / "out")]) == 2
    assert "val holds no .jpg/.png pair files" in capsys.readouterr().err
    (root / "val").rmdir()
    assert main(["train", "--data", str(root), "--storage-path", str(tmp_path / "r")]) == 2
    assert "val does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert ray_must_not_start.calls == []


def test_foreign_parquet_is_refused(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "foreign" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "foreign" / "train" / "part.parquet")
    assert main(["train", "--data", str(tmp_path / "foreign"), "--storage-path", str(tmp_path / "r")]) == 2
    assert "not written by `unet-ray prepare`" in capsys.readouterr().err


@pytest.mark.ray
class TestBadInputThroughRay:
    """prepare (and train, which prepares on the way) with a real Ray; prepare decodes through Ray
    Data tasks and (as it does for a few hundred pairs or fewer) in the calling process."""

    @pytest.fixture(scope="class", autouse=True)
    def ray_session(self):
        with in_process_ray():
            yield

    @pytest.fixture(params=["ray_tasks", "in_process"])
    def decode_in(self, request, monkeypatch):
        """prepare decodes with Ray Data tasks, or (a few hundred pairs or fewer) in this process."""
        from unet_ray import prepare

        monkeypatch.setattr(prepare, "IN_PROCESS_MAX_PAIRS", 0 if request.param == "ray_tasks" else 10**6)
        return request.param

    def test_both_decode_paths_write_the_same_rows(self, tmp_path, monkeypatch):
        import pyarrow.parquet as pq

        from unet_ray import prepare

        src = pairs.write_synthetic(tmp_path / "pairs", 40, 5, seed=3)  # two decode batches of train
        tables = {}
        for limit in (0, 10**6):
            monkeypatch.setattr(prepare, "IN_PROCESS_MAX_PAIRS", limit)
            out = tmp_path / f"out{limit}"
            prepare.prepare(src, out, 32, "cityscapes19", progress=lambda _: None)
            tables[limit] = {split: pq.read_table(out / split).sort_by("id") for split in ("train", "val")}
            assert json.loads((out / "meta.json").read_text())["counts"] == {"train": 40, "val": 5}
        for split in ("train", "val"):
            assert tables[0][split].equals(tables[10**6][split]), split

    def test_prepare_names_every_bad_file(self, bad_pairs, decode_in, tmp_path, capsys):
        assert main(["prepare", "--src", str(bad_pairs), "--out", str(tmp_path / "out"), "--image-size", "64"]) == 2
        err = capsys.readouterr().err
        assert f"{len(BAD_FILES)} of {6 + 3 + len(BAD_FILES)} files in" in err
        for name, (_, words) in BAD_FILES.items():
            line = next((ln for ln in err.splitlines() if name in ln), "")
            assert words in line, f"{name}: {line!r}"
        assert not (tmp_path / "out").exists()  # nothing half-written

    def test_prepare_skips_and_counts_when_allowed(self, bad_pairs, decode_in, tmp_path, capsys):
        out = tmp_path / "out"
        assert main(["prepare", "--src", str(bad_pairs), "--out", str(out), "--image-size", "64", "--skip-bad-files"]) == 0
        meta = json.loads((out / "meta.json").read_text())
        assert meta["counts"] == {"train": 6, "val": 3} and meta["skipped"] == len(BAD_FILES)
        assert (meta["image_size"], meta["classes"], meta["class_names"]) == (64, "road", ["rest", "road"])
        # the Parquet rows: file id, split, raw image and class-id mask of every good file
        import pyarrow.parquet as pq

        for split, count in meta["counts"].items():
            table = pq.read_table(out / split)
            # val rows also carry the mask at the pairs' own 256x256, for the native-size IoU
            native = {"mask_native"} if split == "val" else set()
            assert set(table.column_names) == {"id", "split", "image", "mask"} | native
            assert sorted(table["id"].to_pylist()) == sorted(p.stem for p in (bad_pairs / split).iterdir() if p.name not in BAD_FILES)
            assert set(table["split"].to_pylist()) == {split} and table.num_rows == count
            assert {len(b) for b in table["image"].to_pylist()} == {64 * 64 * 3}
            assert {len(b) for b in table["mask"].to_pylist()} == {64 * 64}
            if native:
                assert {len(b) for b in table["mask_native"].to_pylist()} == {256 * 256}
        skipped = (out / "skipped.txt").read_text().splitlines()
        assert sorted(Path(line.split(": ")[0]).name for line in skipped) == sorted(BAD_FILES)
        assert f"skipped {len(BAD_FILES)} bad files" in capsys.readouterr().out

    def test_train_on_bad_pairs_names_the_file(self, bad_pairs, tmp_path, capsys):
        code = main(["train", "--data", str(bad_pairs), "--storage-path", str(tmp_path / "r"), "--image-size", "64"])
        assert code == 2
        assert "empty.jpg: empty file" in capsys.readouterr().err

    def test_train_skips_and_counts_when_allowed(self, bad_pairs, tmp_path, capsys):
        storage = tmp_path / "r"
        args = ["train", "--data", str(bad_pairs), "--storage-path", str(storage), "--name", "skip", "--image-size", "64",
                "--depth", "2", "--base-channels", "4", "--epochs", "1", "--workers", "1"]  # fmt: skip
        assert main([*args, "--skip-bad-files"]) == 0
        out = capsys.readouterr().out
        assert "data: 6 train / 3 val images at 64px (pairs layout)" in out and f"skipped {len(BAD_FILES)} bad files" in out
        skipped = (storage / "skip" / "prepared" / "skipped.txt").read_text().splitlines()
        assert sorted(Path(line.split(": ")[0]).name for line in skipped) == sorted(BAD_FILES)
        # the same data without --skip-bad-files is not reused as if it were clean: the bad files are named
        assert main(args) == 2
        assert "empty.jpg: empty file" in capsys.readouterr().err



# ---------------------------------------------------------------------------------------------
# A full disk: a small tmpfs mounted for the test (root only; skipped where mount is refused)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """mount(kilobytes) -> a folder on a tmpfs of that size, unmounted at the end."""
    mounted = []

    def mount(kilobytes: int, required: bool = True) -> Path | None:
        """required=False: None instead of a skip where mounting is refused."""
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(folder)],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        if done.returncode != 0 and not required:
            return None
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def fill(folder: Path) -> Path:
    """Write zeros into folder/filler until the disk is full."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_prepare_on_a_full_disk_leaves_nothing_a_later_run_would_use(tmp_path, small_disk):
    """A prepare that runs out of space names its output and leaves no half-written folder; a
    prepared folder already there stays as it was (a later run reads it or refuses it whole)."""
    from unet_ray.prepare import prepare
    from unet_ray.prepared_format import DataError, read_meta

    disk = small_disk(400)
    out = disk / "prepared"
    prepare(pairs.write_synthetic(tmp_path / "small", 4, 2, seed=0), out, 32, "road", progress=lambda *_: None)
    before = {f.relative_to(out): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}
    larger = pairs.write_synthetic(tmp_path / "large", 16, 8, seed=1)  # 64 px: about 1 MB, more than is free
    with pytest.raises(DataError, match=f"cannot write the prepared data to {out}: No space left on device"):
        prepare(larger, out, 64, "road", progress=lambda *_: None)
    assert sorted(p.name for p in disk.iterdir()) == ["prepared"]  # no half-written temporary folder
    assert {f.relative_to(out): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()} == before
    assert read_meta(out)["image_size"] == 32


TINY_TRAIN = ["--image-size", "64", "--depth", "3", "--base-channels", "8", "--batch-size", "8", "--workers", "1"]


def tiny_config(tmp_path: Path, train: int = 32, val: int = 16) -> list[str]:
    config = tmp_path / "tiny.yaml"
    config.write_text(f"data:\n  synth_train: {train}\n  synth_val: {val}\n")
    return ["--config", str(config)]


@pytest.mark.ray
def test_killed_driver_then_full_disk_each_resume_at_the_next_epoch(tmp_path, small_disk):
    """One run, interrupted twice, on a 64 MB disk:
    1. SIGKILL `unet-ray train` and every process it started after its second checkpoint (the
       driver and the local Ray it started, head and all);
    2. the same command resumes after the last checkpoint; the storage fills up after its next
       checkpoint: the run stops with one line naming the run's storage, and the checkpoints
       written before are intact;
    3. once there is room the same command resumes from the last of them and finishes: every
       epoch trained once, each progress line printed once.
    Where a tmpfs cannot be mounted (not root), 1 and 3 run on the plain disk and 2 is left out."""
    from unet_ray import checkpoint as ckpt_io

    disk = small_disk(64 * 1024, required=False)
    store = (disk or tmp_path) / "results"
    cmd = [
        sys.executable, "-m", "unet_ray.cli", "train", "--storage-path", str(store), "--name", "driver",
        "--image-size", "64", "--depth", "3", "--base-channels", "8", "--epochs", "7", "--batch-size", "8",
        "--lr", "3e-3", "--workers", "2",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    history = store / "driver" / "history.jsonl"

    def rows():
        return [json.loads(x) for x in history.read_text().splitlines()] if history.is_file() else []

    def epochs():
        return [row["epoch"] for row in rows()]

    # 1. killed with its local Ray after two epochs
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        while len(epochs()) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_session(proc.pid)  # the driver, the local Ray it started and every Ray worker
        proc.wait(timeout=30)
    done_before = epochs()
    assert len(done_before) >= 2, (tmp_path / "first.log").read_text()[-3000:]
    assert len(done_before) < 5, "the run went too far before it could be killed"
    resumes = [done_before[-1]]

    # 2. resumed, then the disk fills up after its next checkpoint
    if disk is not None:
        with open(tmp_path / "second.log", "w") as log:
            # no restarts: each would fail at the same copy (the default, 3, retries a disk that
            # may be freed meanwhile); what is tested is the message and what is left
            proc = subprocess.Popen([*cmd, "--max-failures", "0"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # fmt: skip
            try:
                deadline = time.monotonic() + 300
                while len(rows()) <= len(done_before) and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                filler = fill(disk)
                proc.wait(timeout=300)
            finally:
                kill_session(proc.pid)
        output = (tmp_path / "second.log").read_text()
        written = rows()
        assert f"resumed from epoch {done_before[-1]} checkpoint" in output, output[-3000:]
        assert proc.returncode == 1 and len(done_before) < len(written) < 7, output[-3000:]
        failed_epoch = written[-1]["epoch"] + 1
        assert (
            f"unet-ray train: error: training run driver failed: unet_ray.worker.CheckpointNotWritten: [Errno 28] the checkpoint of epoch "
            f"{failed_epoch} cannot be written to {store}/driver: no space left on device. The run's earlier checkpoints "
            "there are intact: free space and run the same command again to resume"
        ) in output.splitlines(), output[-3000:]
        # every checkpoint the run keeps (the 2 best and the latest; older ones it removed as it
        # went) was committed before the disk filled and still loads, the latest among them
        kept = [row for row in written if Path(row["checkpoint"]).exists()]
        assert len(kept) >= 2 and kept[-1] is written[-1], [row["checkpoint"] for row in written]
        for row in kept:
            assert ckpt_io.load_state(row["checkpoint"])["epoch"] == row["epoch"]
        filler.unlink()
        resumes.append(written[-1]["epoch"])

    # 3. resumed again, to the end
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resumed from epoch {resumes[-1]} checkpoint" in rerun.stdout + rerun.stderr
    # each progress line reaches the user once (Ray Train's print patch would copy it to stderr)
    assert (rerun.stdout + rerun.stderr).count("[unet-ray] epoch 7/7") == 1
    assert epochs() == [1, 2, 3, 4, 5, 6, 7]
    # the first epoch of each resumed run records the checkpoint it started from, no other does
    assert [row["restored_from_epoch"] for row in rows()] == [epoch - 1 if epoch - 1 in resumes else 0 for epoch in range(1, 8)]


def test_a_full_disk_under_the_driver_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """The driver's own files (best.json, history.jsonl, the report) on a full disk: one line."""
    import errno

    from unet_ray import summary

    def full(cfg, progress=print):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "unet" / "best.json"))

    monkeypatch.setattr(summary, "run_and_report", full)
    assert main(["train", "--storage-path", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"unet-ray train: error: no space left on device writing {tmp_path / 'r' / 'unet' / 'best.json'}; "
        "free space and run the same command again to resume"
    ]
