"""The benchmark runs end to end in quick mode and writes its JSON and Markdown reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.benchmark
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


def test_quality_split_keeps_the_last_files_by_number_for_validation(tmp_path):
    from benchmarks.quality import fixed_split

    source = tmp_path / "all"
    source.mkdir()
    for i in range(1, 13):  # 1..12: by number, not by name (10.jpg sorts before 2.jpg as text)
        (source / f"{i}.jpg").write_bytes(b"x")
    split = fixed_split(source, tmp_path / "split", train_pairs=5, val_pairs=4)
    assert sorted(p.name for p in (split / "val").iterdir()) == ["10.jpg", "11.jpg", "12.jpg", "9.jpg"]
    assert sorted(int(p.stem) for p in (split / "train").iterdir()) == [1, 2, 3, 4, 5]
    with pytest.raises(SystemExit, match="needs more than 12"):
        fixed_split(source, tmp_path / "other", train_pairs=None, val_pairs=12)


@pytest.mark.ray
@pytest.mark.benchmark
@pytest.mark.timeout(420)
def test_quality_benchmark_gives_every_recipe_the_same_time_budget(tmp_path):
    """--time-budget: each `unet-ray train` run plans the epochs that fit its minutes, so the old
    and the new recipe compare at equal wall clock; the table says how many epochs each trained."""
    from unet_ray import pairs
    from unet_ray.checkpoint import latest_checkpoint
    from unet_ray.evaluate import evaluate_checkpoint

    source = pairs.write_synthetic(tmp_path / "pairs", n_train=10, n_val=1, seed=3) / "train"  # 1.jpg..10.jpg
    out = tmp_path / "results"
    budget_min, max_epochs = 0.5, 40
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quality", "--real-data", str(source), "--out", str(out),
         "--val-pairs", "4", "--seeds", "1", "--time-budget", str(budget_min),
         "--old-epochs", str(max_epochs), "--new-epochs", str(max_epochs)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "quality.json").read_text())
    assert (result["time_budget"], result["train_pairs"], result["val_files"]) == (budget_min, 6, "7.jpg-10.jpg")
    rows = result["results"]["road"]
    assert sorted(rows) == ["new defaults", "old defaults"]
    for label, row in rows.items():
        (run,) = row["runs"]
        # the budget, not the cap, ended the run: a few epochs of 6 pairs fit in what start-up leaves
        assert 1 <= run["epochs"] < max_epochs, (label, run["epochs"])
        assert len(run["val_iou_by_epoch"]) == run["epochs"]
        assert run["wall_s"] < budget_min * 60 + 30, (label, run["wall_s"])  # within the budget, give or take an epoch
        assert 0.0 <= run["last"]["val_iou"] <= 1.0 and 0.0 <= run["last"]["val_iou_native"] <= 1.0
        # flip TTA scores the last epoch's model, as `unet-ray evaluate --tta` does
        name = f"road_{label.split()[0]}_s0"
        tta = evaluate_checkpoint(latest_checkpoint(out / "quality_work" / "runs" / name), out / "quality_work" / "prepared_road", flip_tta=True)
        assert tta["epoch"] == run["epochs"]
        assert run["last_tta"] == {k: tta[k] for k in ("val_iou", "val_iou_native", "val_pixel_accuracy")}
        assert row["summary"]["last_tta_val_iou"]["values"] == [tta["val_iou"]]
    table = (out / "quality.md").read_text()
    assert "same time budget, 0.5 min" in table
    for label, row in rows.items():
        summary = row["summary"]
        tta_cells = f"| {summary['last_tta_val_iou']['mean']:.3f} ± 0.000 | {summary['last_tta_val_iou_native']['mean']:.3f} ± 0.000 |"
        assert f"| road | {label} | {row['runs'][0]['epochs']} |" in table and tta_cells in table


def test_quality_benchmark_interleaves_the_recipes_seed_by_seed(tmp_path, monkeypatch):
    """A drifting VM must not put all of one recipe's runs on a slow stretch: old s0, new s0, old s1..."""
    import argparse

    from benchmarks import quality

    source = tmp_path / "all"
    source.mkdir()
    for i in range(1, 8):
        (source / f"{i}.jpg").write_bytes(b"x")
    out = tmp_path / "results"
    (out / "quality_work" / "prepared_road").mkdir(parents=True)
    (out / "quality_work" / "prepared_road" / "meta.json").write_text("{}")  # prepared already: no subprocess
    order = []

    def fake_train_once(recipe, data, storage, name, classes, epochs, seed, timeout_s, time_budget=None):
        order.append((name, epochs, time_budget))
        figures = {"val_iou": 0.5 + seed / 10, "val_iou_native": 0.5, "val_pixel_accuracy": 0.9}
        return {"seed": seed, "epochs": 3, "wall_s": 60.0, "last": figures, "best": figures, "best_epoch": 3,
                "val_iou_by_epoch": [0.1, 0.3, figures["val_iou"]]}  # fmt: skip

    monkeypatch.setattr(quality, "train_once", fake_train_once)
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(["--seeds", "2", "--val-pairs", "3", "--time-budget", "2", "--old-epochs", "9"])
    args.real_data = str(source)
    assert quality.run_quality(args, out, "test-machine") == 0
    assert order == [("road_old_s0", 9, 2.0), ("road_new_s0", 8, 2.0), ("road_old_s1", 9, 2.0), ("road_new_s1", 8, 2.0)]
    rows = json.loads((out / "quality.json").read_text())["results"]["road"]
    assert [run["seed"] for run in rows["old defaults"]["runs"]] == [0, 1]
    assert rows["new defaults"]["summary"]["last_val_iou"]["mean"] == pytest.approx(0.55)
    assert rows["new defaults"]["summary"]["last_val_iou"]["spread"] == pytest.approx(0.1)


def test_quality_runs_show_their_epochs_as_they_come_and_stop_at_the_timeout(capsys):
    from benchmarks.quality import run_showing_epochs

    script = "import time; print('[unet-ray] epoch 1/9  val_iou 0.5', flush=True); print('noise', flush=True); time.sleep(60)"
    start = time.monotonic()
    returncode, tail = run_showing_epochs([sys.executable, "-c", script], "road_new_s0", timeout_s=2)
    assert time.monotonic() - start < 30
    assert returncode != 0
    assert tail[:2] == ["[unet-ray] epoch 1/9  val_iou 0.5", "noise"]
    assert "killed after the run timeout of 2 s" in tail[-1]
    shown = capsys.readouterr().err
    assert "[quality] road_new_s0: epoch 1/9  val_iou 0.5" in shown
    assert "noise" not in shown  # only the epoch lines, not everything a run prints

    returncode, tail = run_showing_epochs([sys.executable, "-c", "print('done')"], "x", timeout_s=30)
    assert (returncode, tail) == (0, ["done"])


def test_an_interrupted_quality_run_leaves_no_training_behind(monkeypatch):
    """The run has a session of its own (Ctrl-C does not reach it): stopping the benchmark must stop it."""
    from benchmarks import quality

    seen = []

    def interrupt(message):
        seen.append(message)
        raise KeyboardInterrupt

    monkeypatch.setattr(quality, "log", interrupt)
    script = "import os, time; print(f'[unet-ray] epoch 1/9 pid={os.getpid()}', flush=True); time.sleep(60)"
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        quality.run_showing_epochs([sys.executable, "-c", script], "road_new_s0", timeout_s=120)
    assert time.monotonic() - start < 30
    pid = int(seen[0].rsplit("pid=", 1)[1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
