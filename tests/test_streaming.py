"""The streaming ingest path with more data than the object store holds, and how `auto` chooses.

The big run (marked `benchmark`: the second test command) writes 1 GiB of prepared rows at
256 px straight into Parquet (random pixels: they do not compress) and trains one epoch on a
local Ray whose object store is 256 MB, as a Ray job: `--ingest auto` must stream it, and the
epoch must finish with every row, no worker restarted and nothing killed for memory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from unet_ray import cluster
from unet_ray.data import MEMORY_INGEST_MAX_BYTES, choose_ingest
from unet_ray.prepared_format import FORMAT, META_FILE, NATIVE_SIZE

GIB = 2**30


def test_auto_holds_small_data_in_memory_and_streams_the_rest():
    store = 8 * GIB
    small, large = {"bytes": int(0.2 * GIB)}, {"bytes": 3 * GIB}
    assert choose_ingest("auto", small, store)[0] == "memory"
    assert choose_ingest("auto", large, store)[0] == "streaming"
    assert choose_ingest("auto", small, 0.5 * GIB)[0] == "streaming"  # more than a quarter of the store
    assert choose_ingest("auto", {"bytes": MEMORY_INGEST_MAX_BYTES + 1}, 100 * GIB)[0] == "streaming"
    assert choose_ingest("memory", large, store)[0] == "memory"  # the user's word wins
    assert choose_ingest("streaming", small, store)[0] == "streaming"
    path, why = choose_ingest("auto", large, store)
    assert "3.00 GB prepared" in why and "object store 8.0 GB" in why


def write_prepared_rows(folder: Path, train_rows: int, val_rows: int, size: int, rows_per_file: int = 16) -> int:
    """A prepared folder of random rows (road label set) written directly; returns its bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    class_pixels = np.zeros(2, np.int64)
    for split, rows in (("train", train_rows), ("val", val_rows)):
        (folder / split).mkdir(parents=True)
        for index, start in enumerate(range(0, rows, rows_per_file)):
            n = min(rows_per_file, rows - start)
            images = rng.integers(0, 256, (n, size * size * 3), dtype=np.uint8)
            masks = (rng.random((n, size * size)) < 0.3).astype(np.uint8)
            if split == "train":
                class_pixels += np.bincount(masks.ravel(), minlength=2)
            columns = {
                "id": pa.array([f"{split}{start + i}" for i in range(n)]),
                "split": pa.array([split] * n),
                "image": pa.array([row.tobytes() for row in images], pa.binary()),
                "mask": pa.array([row.tobytes() for row in masks], pa.binary()),
            }
            if split == "val":
                native = np.repeat(np.repeat(masks.reshape(n, size, size), NATIVE_SIZE // size, 1), NATIVE_SIZE // size, 2)
                columns["mask_native"] = pa.array([row.tobytes() for row in native.reshape(n, -1)], pa.binary())
            pq.write_table(pa.table(columns), folder / split / f"part-{index:05d}.parquet", row_group_size=rows_per_file)
    size_bytes = sum(f.stat().st_size for f in folder.rglob("*.parquet"))
    meta = {
        "format": FORMAT, "image_size": size, "classes": "road", "native_size": NATIVE_SIZE,
        "class_names": ["rest", "road"], "counts": {"train": train_rows, "val": val_rows},
        "class_pixels": [int(c) for c in class_pixels], "bytes": size_bytes, "skipped": 0,
        "source": "random rows (tests/test_streaming.py)", "source_files": {"train": train_rows, "val": val_rows},
    }  # fmt: skip
    (folder / META_FILE).write_text(json.dumps(meta))
    return size_bytes


@pytest.mark.ray
@pytest.mark.benchmark
@pytest.mark.timeout(900)
def test_a_data_set_four_times_the_object_store_trains_one_epoch(tmp_path_factory):
    from ray.job_submission import JobStatus, JobSubmissionClient

    work = tmp_path_factory.mktemp("big")
    prepared = work / "prepared"
    size, train_rows = 256, 4800  # 4800 x (192 + 64) KiB; random masks compress a little: ~1.05 GiB
    written = write_prepared_rows(prepared, train_rows, 64, size)
    assert written >= GIB

    saved_path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), saved_path])
    temp_dir = tempfile.mkdtemp(prefix="ubig", dir="/tmp")  # Ray's socket paths must stay short
    try:
        c = cluster.start(temp_dir, cluster.free_port(), cluster.free_port(), num_cpus=2,
                          token_path=work / "token", object_store_mb=256)  # fmt: skip
        try:
            token = Path(c.token_path).read_text().strip()
            client = JobSubmissionClient(c.dashboard_url, headers={"Authorization": f"Bearer {token}"})
            entrypoint = (
                f"unet-ray train --data {prepared} --image-size {size} --depth 2 --base-channels 4 --batch-size 32 "
                f"--augment light --epochs 1 --workers 2 --max-failures 0 --storage-path {work / 'runs'} --name big"
            )
            job = client.submit_job(entrypoint=entrypoint, submission_id="big1")
            deadline = time.monotonic() + 780
            while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
                time.sleep(2)
            logs = client.get_job_logs(job)
            assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-5000:]
            nodes = cluster.alive_nodes(c)
        finally:
            cluster.stop(c)
    finally:
        os.environ["PATH"] = saved_path
        shutil.rmtree(temp_dir, ignore_errors=True)

    assert "data: streaming from" in logs and "more than 25% of the store" in logs, logs[-3000:]
    [row] = [json.loads(x) for x in (work / "runs" / "big" / "history.jsonl").read_text().splitlines()]
    assert row["epoch"] == 1 and row["world_size"] == 2 and row["restored_from_epoch"] == 0
    assert row["steps_per_epoch"] == -(-train_rows // 2 // 32)  # every row: 2 workers x 75 steps x 32
    assert row["val_pixels"] == 64 * size * size
    for sign in ("OutOfMemoryError", "killed due to memory", "Traceback"):
        assert sign not in logs, logs[-3000:]
    assert len(nodes) == 1 and nodes[0]["resources_total"]["object_store_memory"] <= 256 * 2**20 * 1.01
