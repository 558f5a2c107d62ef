"""The GPU check (benchmarks/gpu_check.py) keeps working where there is no GPU: its dry run runs
every job on CPU with tiny sizes and writes the JSON and the table with every job present; its
time limits add up; a job or a variant that fails does not stop the others; a machine that
cannot build torch.compile's kernels is told so up front."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check
from unet_ray.gpu import COMPILE_BACKEND_ENV

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.benchmark
@pytest.mark.timeout(600)
def test_dry_run_runs_every_job_and_writes_the_reports(tmp_path):
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
    assert result["jobs"] == gpu_check.job_plan(gpu_check.DRY)
    not_ok = {job: gpu_check.job_record(result, job) for job in result["jobs"]}
    not_ok = {job: record for job, record in not_ok.items() if record["status"] != "ok"}
    assert not not_ok, json.dumps(not_ok, indent=1)[-4000:]
    assert done.returncode == 0, done.stderr[-3000:]

    ready = result["compile_ready"]  # looked up and recorded; aot_eager builds no kernels: never blocks
    assert ready["backend"] == "aot_eager" and ready["blocking"] is False and isinstance(ready["ok"], bool)
    tests = parts["gpu_tests"]
    assert tests["counts"]  # pytest ran (on CPU every GPU test is skipped)
    assert "tests/test_gpu.py" in tests["files"] and "tests/test_gpu_check.py" not in tests["files"]
    e2e = parts["train_predict"]
    assert e2e["launch_to_first_step_s"] > 0 and "--workers 1" in e2e["train_command"]
    assert [run["workers"] for run in e2e["predict_runs"]] == list(gpu_check.DRY.predict_workers) == [1, 2]
    for run in e2e["predict_runs"]:
        assert run["written"] == run["inputs"] == gpu_check.DRY.predict_pairs and run["files_per_s"] > 0
        assert run["command"].startswith("unet-ray predict") and "--gpu" not in run["command"]
    assert e2e["predict_files_per_s_ratio"] > 0
    assert gpu_check.GPU.variants[:2] == ((256, False), (256, True))  # on a GPU: eager and compiled side by side
    for key in ("32px_compile",):  # the dry run: compiled only (eager is what every other Ray test runs)
        ray_run = parts["ray_throughput"]["variants"][key]
        plain = parts["plain_throughput"]["variants"][key]
        assert ray_run["images_per_s"] > 0 and plain["images_per_s"] > 0
        assert ray_run["images_per_s_metric"] in ("images_per_s", "images_per_s_steady")
        assert 0 <= ray_run["data_wait_share"] <= 1
        assert ray_run["gpu_util_source"].startswith("none")  # no GPU: said, not made up
        assert result["headline"][f"ratio_{key}"] > 0
    assert parts["max_batch"]["largest_batch"] >= 1
    assert parts["data_stage"]["image_size"] == 64 and parts["data_stage"]["images_per_s"] > 0
    assert parts["augment_per_core"]["image_size"] == 256 and parts["augment_per_core"]["images_per_s_per_core"] > 0

    table = (out / "gpu_check.md").read_text()
    assert table in done.stdout  # printed too
    for job in result["jobs"]:
        assert f"job `{job}` | ok" in table
    assert "augment at 256 px, images/s per core" in table
    print(f"dry run took {took:.0f} s")


@pytest.mark.parametrize("check", [gpu_check.GPU, gpu_check.DRY], ids=["gpu", "dry"])
def test_the_time_limits_add_up(check):
    """Every job has a limit, the limits add up to no more than the total, and on a GPU the total
    with a job's stopping time leaves the 8 minutes some slack for starting processes."""
    plan = gpu_check.job_plan(check)  # raises when a job lacks a limit or the sum is over the total
    assert sum(check.limits.values()) <= check.total_s
    assert len(plan) == len(gpu_check.PARTS) - 2 + 2 * len(check.variants)
    if check is gpu_check.GPU:
        assert check.total_s + sum(gpu_check.STOP_GRACE_S) <= 480 - 15


def test_the_headline_jobs_run_first_and_the_gpu_tests_late():
    plan = gpu_check.job_plan(gpu_check.GPU)
    assert plan[:4] == [
        "ray_throughput/256px_eager", "plain_throughput/256px_eager",
        "ray_throughput/256px_compile", "plain_throughput/256px_compile",
    ]  # fmt: skip
    # then the streaming ingest path beside the first job, then the end-to-end commands
    assert plan[4:6] == ["ray_streaming", "train_predict"] and set(plan[-2:]) == {"gpu_tests", "max_batch"}


def test_a_job_plan_whose_limits_do_not_add_up_is_refused():
    over = dataclasses.replace(gpu_check.DRY, total_s=sum(gpu_check.DRY.limits.values()) - 1)
    with pytest.raises(ValueError, match="more than the total"):
        gpu_check.job_plan(over)
    missing = dataclasses.replace(gpu_check.DRY, variants=((32, False), (32, True)))
    with pytest.raises(ValueError, match="32px_eager"):
        gpu_check.job_plan(missing)


# ---------------------------------------------------------------------------------------------
# the orchestration, with stand-in jobs
# ---------------------------------------------------------------------------------------------

TWO_VARIANTS = ((32, False), (32, True))


def stand_in_check(limits: dict[str, float]) -> gpu_check.Check:
    """DRY with an eager and a compiled variant; the limits in the order given, every other job 20 s."""
    check = dataclasses.replace(gpu_check.DRY, variants=TWO_VARIANTS, limits={})
    jobs = [f"{p}/{gpu_check.variant_key(*v)}" for p in gpu_check.VARIANT_PARTS for v in TWO_VARIANTS]
    jobs += [p for p in gpu_check.PARTS if p not in gpu_check.VARIANT_PARTS]
    all_limits = {**limits, **{job: 20.0 for job in jobs if job not in limits}}
    return dataclasses.replace(check, limits=all_limits, total_s=sum(all_limits.values()))


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """`python -m benchmarks.gpu_check --job JOB` replaced by a script that writes one figure, then
    exits 3 for the jobs in FAIL and sleeps for the jobs in HANG; returns (run main, ran jobs)."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")

    def install(check: gpu_check.Check, fail=(), hang=()):
        (tmp_path / "benchmarks" / "gpu_check.py").write_text(
            "import json, sys, time, pathlib\n"
            "job, work = sys.argv[sys.argv.index('--job') + 1], pathlib.Path(sys.argv[sys.argv.index('--work') + 1])\n"
            "(work / (job.replace('/', '.') + '.json')).write_text(json.dumps({'figure': 1}))\n"
            f"if job in {list(fail)!r}: sys.exit(3)\n"
            f"if job in {list(hang)!r}: time.sleep(60)\n"
        )
        monkeypatch.setattr(gpu_check, "REPO", tmp_path)
        monkeypatch.setattr(gpu_check, "DRY", check)
        start = time.perf_counter()
        code = gpu_check.main(["--dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
        assert time.perf_counter() - start < 40
        result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
        ran = {p.stem.replace(".", "/") for p in (tmp_path / "work").glob("*.json")}
        return code, result, ran, (tmp_path / "out" / "gpu_check.md").read_text()

    return install


def test_a_failing_variant_or_a_job_out_of_time_is_recorded_and_the_rest_still_run(stand_ins, monkeypatch):
    """One compiled variant fails, one job hangs past its limit (its figures so far kept): the
    part's other variant and every other job still run; the report has every job."""
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    monkeypatch.setattr(gpu_check, "MIN_JOB_S", 1.0)
    # the hanging job first: a job may use what earlier jobs left unused, and here none did
    check = stand_in_check({"train_predict": 2})
    code, result, ran, table = stand_ins(check, fail=["ray_throughput/32px_compile"], hang=["train_predict"])
    assert code == 1
    parts = result["parts"]
    assert list(parts) == list(gpu_check.PARTS) and result["jobs"][0] == "train_predict"
    ray_variants = parts["ray_throughput"]["variants"]
    assert ray_variants["32px_compile"]["status"] == "failed (exit 3)" and ray_variants["32px_compile"]["log_tail"] == []
    assert ray_variants["32px_eager"]["status"] == "ok" and ray_variants["32px_eager"]["figure"] == 1
    assert "log_tail" not in ray_variants["32px_eager"]
    assert parts["ray_throughput"]["status"] == "1 of 2 variants not ok (32px_compile)"
    assert parts["train_predict"]["status"] == "timed out after 2 s" and parts["train_predict"]["figure"] == 1
    others = [job for job in result["jobs"] if job not in ("ray_throughput/32px_compile", "train_predict")]
    assert all(gpu_check.job_record(result, job)["status"] == "ok" for job in others)
    assert ran == set(result["jobs"])
    assert "| job `ray_throughput/32px_compile` | failed (exit 3)" in table
    assert "| Ray path images/s, 32 px, torch.compile | (failed (exit 3)) |" in table


def test_without_a_c_compiler_the_compiled_variants_are_not_run_and_say_why(stand_ins, monkeypatch):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "inductor")  # builds kernels: what is missing blocks
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name, *a, **k: None)
    code, result, ran, table = stand_ins(stand_in_check({}))
    ready = result["compile_ready"]
    assert ready["ok"] is False and ready["blocking"] is True and ready["c_compiler"] is None
    assert [m.split(" (")[0] for m in ready["missing"]] == ["a C compiler"]
    compiled = [job for job in result["jobs"] if job.endswith("_compile")]
    assert len(compiled) == 2 and not ran & set(compiled)  # never started
    for job in compiled:
        assert gpu_check.job_record(result, job)["status"].startswith("not run: torch.compile needs a C compiler")
    assert all(gpu_check.job_record(result, job)["status"] == "ok" for job in set(result["jobs"]) - set(compiled))
    assert code == 1
    assert "| job `plain_throughput/32px_compile` | not run: torch.compile needs a C compiler" in table
    assert "| plain loop (tensors on the device) images/s, 32 px, torch.compile | (not run: torch.compile" in table


def test_compile_readiness_looks_up_the_compiler_headers_and_triton(monkeypatch, tmp_path):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(gpu_check.sysconfig, "get_paths", lambda *a, **k: {"include": str(tmp_path)})  # no Python.h
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` fails
    cpu = gpu_check.compile_readiness("cpu")
    assert cpu["ok"] is False and cpu["blocking"] is False  # recorded, but aot_eager builds nothing
    assert [m.split(" (")[0] for m in cpu["missing"]] == ["a C compiler", "Python's headers"]
    assert "not blocking" in gpu_check.readiness_line(cpu)
    cuda = gpu_check.compile_readiness("cuda")
    assert cuda["missing"][-1].startswith("triton (") and cuda["triton"] is None
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "inductor")
    assert "NOT ready, needs a C compiler" in gpu_check.readiness_line(gpu_check.compile_readiness("cuda"))


def test_without_cuda_the_check_stops_early_with_a_message(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--out", "/nonexistent/never/written"]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------


def test_gpu_util_sampler_averages_inside_the_training_windows():
    sampler = gpu_check.UtilSampler("cpu")
    assert sampler.period >= 1.0  # at most once a second
    sampler.samples = [(1.0, 10.0), (2.0, 90.0), (3.0, 100.0), (5.0, 0.0)]
    assert sampler.mean_over([(1.5, 3.5)]) == 95.0
    assert sampler.summary([(6.0, 7.0)])["gpu_busy_percent"] is None
    assert sampler.source.startswith("none")


def test_without_pynvml_the_sampler_reads_nvml_through_rays_bundled_copy(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` fails
    module, source = gpu_check._nvml_module()
    assert source == gpu_check.RAY_NVML == module.__name__
    assert callable(module.nvmlDeviceGetUtilizationRates)


def test_the_gpu_tests_run_only_the_files_that_mark_tests_gpu(tmp_path):
    mark = "pytest.mark." + "gpu"  # spelt apart: this file itself marks no test gpu
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_a.py").write_text(f"import pytest\npytestmark = [\n    {mark},\n]\n")
    (tests / "test_b.py").write_text(f"import pytest\n\n@{mark}\ndef test_x(): pass\n")
    (tests / "test_c.py").write_text("def test_gpu_free(): pass\n")
    (tests / "test_d.py").write_text(f"import pytest\nmarker = {mark}ish\n")
    assert gpu_check.gpu_test_files(tests) == ["tests/test_a.py", "tests/test_b.py"]
    real = gpu_check.gpu_test_files(REPO / "tests")
    assert "tests/test_gpu.py" in real and "tests/test_gpu_check.py" not in real


def test_ray_throughput_takes_the_steady_rate_where_the_history_has_it():
    rows = [
        {"images_per_s": 10.0, "images_per_s_steady": 50.0, "data_wait_share": 0.5},  # warm-up: left out
        {"images_per_s": 90.0, "images_per_s_steady": 100.0, "data_wait_share": 0.1},
        {"images_per_s": 95.0, "images_per_s_steady": 110.0, "data_wait_share": 0.3},
    ]
    rates = gpu_check.ray_rates(rows)
    assert rates["images_per_s"] == 105.0 and rates["images_per_s_metric"] == "images_per_s_steady"
    assert rates["images_per_s_by_epoch"] == [50.0, 100.0, 110.0] and rates["data_wait_share"] == 0.2
    older = gpu_check.ray_rates([{k: v for k, v in r.items() if k != "images_per_s_steady"} for r in rows])
    assert older["images_per_s"] == 92.5 and older["images_per_s_metric"] == "images_per_s"
