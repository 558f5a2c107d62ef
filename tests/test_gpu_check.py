"""The GPU check (benchmarks/gpu_check.py) keeps working where there is no GPU: its dry run runs
every part on CPU with tiny sizes and writes the JSON and the table with every part present."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_dry_run_runs_every_part_and_writes_the_reports(tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=580,
    )  # fmt: skip
    took = time.perf_counter() - start
    result = json.loads((out / "gpu_check.json").read_text())
    parts = result["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    failed = {name: p for name, p in parts.items() if p["status"] != "ok"}
    assert not failed, json.dumps(failed, indent=1)[-4000:]
    assert done.returncode == 0, done.stderr[-3000:]

    assert parts["gpu_tests"]["counts"]  # pytest ran (on CPU every GPU test is skipped)
    e2e = parts["train_predict"]
    assert e2e["launch_to_first_step_s"] > 0 and e2e["predict"]["written"] == e2e["predict"]["inputs"] > 0
    assert "--workers 1" in e2e["train_command"] and e2e["predict_command"].startswith("unet-ray predict")
    assert gpu_check.GPU.compile_variants == (False, True)  # on a GPU: eager and compiled side by side
    for key in ("32px_compile",):  # the dry run: compiled only (eager is what every other Ray test runs)
        ray_run, plain = parts["ray_throughput"][key], parts["plain_throughput"][key]
        assert ray_run["images_per_s"] > 0 and plain["images_per_s"] > 0
        assert 0 <= ray_run["data_wait_share"] <= 1
        assert ray_run["gpu_util_source"].startswith("none")  # no GPU: said, not made up
        assert result["headline"][f"ratio_{key}"] > 0
    assert parts["max_batch"]["largest_batch"] >= 1
    assert parts["data_stage"]["image_size"] == 64 and parts["data_stage"]["images_per_s"] > 0
    assert parts["augment_per_core"]["image_size"] == 256 and parts["augment_per_core"]["images_per_s_per_core"] > 0

    table = (out / "gpu_check.md").read_text()
    assert table in done.stdout  # printed too
    for name in gpu_check.PARTS:
        assert f"part `{name}` | ok" in table
    assert "augment at 256 px, images/s per core" in table
    print(f"dry run took {took:.0f} s")


def test_a_part_that_fails_or_runs_out_of_time_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    """The orchestration alone, with stand-in parts: one fails, one hangs past its limit (its
    figures so far kept), one succeeds; the report still has every part."""
    script = tmp_path / "fake_part.py"
    script.write_text(
        "import json, sys, time, pathlib\n"
        "name, work = sys.argv[sys.argv.index('--part') + 1], pathlib.Path(sys.argv[sys.argv.index('--work') + 1])\n"
        "(work / f'{name}.json').write_text(json.dumps({'figure': 1}))\n"
        "if name == 'gpu_tests': sys.exit(3)\n"
        "if name == 'train_predict': time.sleep(60)\n"
    )

    def fake_run(name, check, dry, work, limit):  # a 2 s limit for the part that hangs
        return real_run(name, check, dry, work, 2 if name == "train_predict" else limit)

    real_run = gpu_check.run_part
    monkeypatch.setattr(gpu_check, "run_part", fake_run)
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)
    # stand-in for `python -m benchmarks.gpu_check --part NAME`: the fake script
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "gpu_check.py").write_text(script.read_text())
    monkeypatch.setattr(gpu_check, "markdown", lambda result: "table\n")
    start = time.perf_counter()
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert time.perf_counter() - start < 40
    assert code == 1
    parts = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    assert parts["gpu_tests"]["status"] == "failed (exit 3)"
    assert parts["train_predict"]["status"] == "timed out after 2 s" and parts["train_predict"]["figure"] == 1
    assert all(parts[name]["status"] == "ok" for name in gpu_check.PARTS[2:])


def test_without_cuda_the_check_stops_early_with_a_message(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--out", "/nonexistent/never/written"]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err


def test_gpu_util_sampler_averages_inside_the_training_windows():
    sampler = gpu_check.UtilSampler("cpu")
    sampler.samples = [(1.0, 10.0), (2.0, 90.0), (3.0, 100.0), (5.0, 0.0)]
    assert sampler.mean_over([(1.5, 3.5)]) == 95.0
    assert sampler.summary([(6.0, 7.0)])["gpu_busy_percent"] is None
    assert sampler.source.startswith("none")
