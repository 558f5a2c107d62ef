"""The 1024x512 PNG data-stage benchmark runs end to end and reports measured images/s."""

from __future__ import annotations

import pytest


@pytest.mark.benchmark
@pytest.mark.timeout(120)
def test_data_stage_reports_images_per_s():
    from benchmarks.data_stage import STEPS, human, run

    result = run(n_images=2, repeats=1)
    rates = result["images_per_s_per_core"]
    assert set(rates) == {"stage", *STEPS}
    for step, rate in rates.items():
        assert rate["mean"] > 0 and len(rate["passes"]) == 1 and rate["spread"] == 0, step
    # the stage is its steps one after the other: slower than any one of them
    assert rates["stage"]["mean"] < min(rates[step]["mean"] for step in STEPS)
    assert result["input"]["images"] == 2 and result["input"]["photo_bytes_mean"] > 0
    assert "images/s per core" in human(result)
