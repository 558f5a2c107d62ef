"""The benchmark runs end to end in quick mode and writes its JSON and Markdown reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_quick_benchmark_writes_measured_reports(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = list(out.glob("*.json"))
    assert len(reports) == 1, sorted(p.name for p in out.iterdir())
    result = json.loads(reports[0].read_text())
    for key in ("ratio_ray_vs_plain", "data_images_per_s_per_core"):
        assert result[key] > 0, key
    startup = result["startup"]
    assert startup["to_first_step_s"] > startup["to_training_loop_s"] > startup["ray_started_s"] > 0
    assert startup["runs_to_first_step_s"] == [startup["to_first_step_s"]]  # quick mode: one cold start
    assert all(t > 0 for t in result["tune_startup"]["trial_to_first_step_s"])
    assert result["tune_startup"]["trials"] == result["settings"]["tune_trials"]
    assert "augment_batch" in result["data"]["ray"]["ray_data_stats_last_pass"]
    assert result["training"]["plain"]["images_per_s"] > 0
    assert sorted(result["training"]) == ["plain", "ray_2_workers"]  # quick mode: the Ray path with 2 workers only
    assert result["data"]["augment_256px_per_core"]["image_size"] == 256
    assert result["augment_256px_images_per_s_per_core"] > 0
    assert "skipped" in result["gpu"] or result["gpu"]["images_per_s_128px_bf16_channels_last"] > 0
    table = reports[0].with_suffix(".md").read_text()
    assert "ratio best Ray / plain" in table
    assert "augment at 256 px, img/s per core" in table
