"""The GPU check: one command that proves and measures the GPU path on one GPU in under 8 minutes.

    python -m benchmarks.gpu_check [--out DIR] [--dry-run]

Jobs, each a subprocess under its own time limit, in this order: the headline first, so that a
check cut short still has it.

  ray_throughput/256px_eager      Ray path (Ray Data + TorchTrainer, 1 GPU worker) images/s, bf16 +
                                  channels_last; data-wait share; GPU busy
  plain_throughput/256px_eager    plain PyTorch loop over tensors already on the GPU; peak memory
  ray_throughput/256px_compile    the same two with torch.compile: with the two above, the
  plain_throughput/256px_compile  headline (Ray / plain images/s at 256 px, eager then compiled)
  ray_streaming                   the Ray path at 256 px, eager, with `--ingest streaming` (Ray Data
                                  read tasks every epoch instead of rows held in memory): its
                                  images/s, data-wait share and GPU busy against the job above
  train_predict                   `unet-ray train --gpu --workers 1` on synthetic pairs (256 px,
                                  2 epochs; launch to end of first step), then `unet-ray predict
                                  --gpu` of 256 synthetic pairs with --workers 1 and --workers 4
  ray_throughput/128px_eager      the Ray path and the plain loop at 128 px (eager only: compiling
  plain_throughput/128px_eager    a second shape would not fit in the 8 minutes)
  data_stage                      Ray Data read + augment at 256 px with all the node's CPUs
  augment_per_core                the augment stage at 256 px on one core
  gpu_tests                       `pytest -m gpu` over the test files that mark tests gpu
  max_batch                       largest batch that trains at 256 px (default model, bf16)

Each variant of ray_throughput and plain_throughput is a job of its own: a compile error in one
does not lose the others. A job that fails or runs out of time is recorded as such (status, the
figures it had written, its log's tail) and the rest still run. The limits of all jobs add up to
no more than the check's total (450 s on a GPU, leaving 30 s of the 8 minutes for starting and
stopping processes); a job may also use what the jobs before it left unused, never what the jobs
after it are owed.

Before any job it checks what torch.compile needs to build kernels (a C compiler, Python.h and,
on CUDA, triton); when something is missing it says so and the compiled variants are not run.

Writes DIR/gpu_check.json (rewritten after every job) and DIR/gpu_check.md and prints the table.
`--dry-run` runs the same code on CPU with tiny sizes (32 px, compiled with the aot_eager backend,
which builds no kernels; about 2 minutes on an idle 2-core machine); the test suite runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unet_ray.gpu import COMPILE_BACKEND_ENV

# Targets from the issue (shown next to the figures, never used as results).
TARGETS = {
    "ray_images_per_s_256px": 3000.0, "ray_vs_plain": 0.95, "gpu_busy_percent": 90.0, "first_step_s": 15.0,
    "augment_256px_images_per_s_per_core": 250.0,
}  # fmt: skip
PARTS = ("ray_throughput", "plain_throughput", "ray_streaming", "train_predict", "data_stage", "augment_per_core", "gpu_tests", "max_batch")
VARIANT_PARTS = ("ray_throughput", "plain_throughput")  # one job per (image size, compiled) variant
MIN_JOB_S = 5.0  # a job offered less time than this is not started
STOP_GRACE_S = (8.0, 2.0)  # after a job's limit: SIGTERM, wait; SIGKILL, wait


@dataclass(frozen=True)
class Check:
    device: str
    variants: tuple[tuple[int, bool], ...]  # (image size, torch.compile) of the throughput parts
    depth: int
    base_channels: int
    batch_size: int  # per step, throughput parts
    n_pairs: int  # distinct synthetic pairs prepared for the throughput parts
    copies: int  # ... each read this many times per epoch (a data set the size of a real one)
    n_val: int
    ray_epochs: int  # epoch 1 warms up (and compiles); later epochs give the steady figure
    plain_images: int  # tensors held on the device by the plain loop
    plain_epochs: int
    e2e_size: int
    e2e_epochs: int
    e2e_batch: int
    e2e_synth: tuple[int, int] | None  # (train, val) pairs; None: the command's default
    predict_pairs: int  # synthetic pairs `unet-ray predict` runs over (enough for a rate)
    predict_workers: tuple[int, ...]  # `--workers` of each predict run; the first is the baseline
    data_size: int  # Ray Data stage image size
    augment_size: int  # augment-per-core image size (256 px in both modes: the figure the issue asks for)
    data_passes: int
    augment_seconds: float
    max_batch_size: int  # largest-batch search: image size and cap
    max_batch_cap: int
    worker_cpus: float | None  # CPUs per training worker (None: as `unet-ray train` works it out)
    limits: dict[str, float]  # seconds per job, in the order the jobs run (see job_plan)
    total_s: float  # all jobs together; the limits add up to no more


GPU = Check(
    "cuda", variants=((256, False), (256, True), (128, False)), depth=4, base_channels=16, batch_size=128,
    n_pairs=512, copies=8, n_val=64, ray_epochs=4, plain_images=2048, plain_epochs=5,
    e2e_size=256, e2e_epochs=2, e2e_batch=32, e2e_synth=None, predict_pairs=256, predict_workers=(1, 4),
    data_size=256, augment_size=256, data_passes=3, augment_seconds=3.0,
    max_batch_size=256, max_batch_cap=16384, worker_cpus=None,
    # estimates for an H100 with 16 cores: process and Ray start-up ~10 s per job, preparing the
    # 256 px data ~15 s (once), compiling fwd+bwd ~60 s (the plain loop's then mostly hits
    # inductor's cache), unet-ray train ~30 s and each predict ~20 s
    limits={
        "ray_throughput/256px_eager": 50, "plain_throughput/256px_eager": 25,
        "ray_throughput/256px_compile": 90, "plain_throughput/256px_compile": 40,
        "ray_streaming": 35, "train_predict": 90,
        "ray_throughput/128px_eager": 25, "plain_throughput/128px_eager": 10,
        "data_stage": 25, "augment_per_core": 10, "gpu_tests": 30, "max_batch": 20,
    },
    total_s=450,
)  # fmt: skip
DRY = Check(
    # compiled only: the eager path is the same code with run.compile off, which every Ray test runs
    "cpu", variants=((32, True),), depth=2, base_channels=4, batch_size=8,
    n_pairs=16, copies=2, n_val=8, ray_epochs=2, plain_images=32, plain_epochs=2,
    e2e_size=64, e2e_epochs=1, e2e_batch=8, e2e_synth=(16, 8), predict_pairs=8, predict_workers=(1, 2),
    data_size=64, augment_size=256, data_passes=1, augment_seconds=0.5,
    max_batch_size=32, max_batch_cap=16, worker_cpus=1.0,
    # about 2 minutes on an idle 2-core machine; the limits only catch a hang (a busy machine is slower)
    limits={
        "ray_throughput/32px_compile": 120, "plain_throughput/32px_compile": 50, "ray_streaming": 100,
        "train_predict": 180, "data_stage": 80, "augment_per_core": 30, "gpu_tests": 40, "max_batch": 40,
    },
    total_s=640,
)  # fmt: skip


def log(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


def variant_key(size: int, compiled: bool) -> str:
    return f"{size}px_{'compile' if compiled else 'eager'}"


def job_plan(check: Check) -> list[str]:
    """The jobs in the order they run (the order of `check.limits`), after checking that the limits
    name every part and every variant exactly once and add up to no more than the total."""
    expected = {f"{part}/{variant_key(*v)}" for part in VARIANT_PARTS for v in check.variants}
    expected |= set(PARTS) - set(VARIANT_PARTS)
    if set(check.limits) != expected:
        raise ValueError(f"limits name {sorted(check.limits)}, the jobs are {sorted(expected)}")
    if sum(check.limits.values()) > check.total_s:
        raise ValueError(f"limits add up to {sum(check.limits.values())} s, more than the total {check.total_s} s")
    return list(check.limits)


def split_job(job: str) -> tuple[str, str | None]:
    """'ray_throughput/256px_eager' -> ('ray_throughput', '256px_eager'); 'max_batch' -> ('max_batch', None)."""
    part, _, variant = job.partition("/")
    return part, variant or None


# ---------------------------------------------------------------------------------------------
# what torch.compile needs
# ---------------------------------------------------------------------------------------------


def compile_readiness(device: str) -> dict[str, Any]:
    """What torch.compile's inductor backend needs to build kernels, looked up before any job:
    without it every compiled variant fails after a minute of tracing, with an error deep in a log.
    A C compiler and Python.h (Triton builds its launcher, inductor its C++ wrappers, as Python
    extensions) and, on CUDA, triton. `blocking`: the compiled variants are not run; never with a
    backend that builds no kernels (the dry run's aot_eager), where it is only recorded."""
    backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
    compiler = c_compiler()
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    missing = []
    if compiler is None:
        missing.append("a C compiler ($CC, sysconfig's CC, cc, gcc or clang on PATH)")
    if not python_h.is_file():
        missing.append(f"Python's headers ({python_h}; e.g. the python3-dev package)")
    triton = None
    if device == "cuda":
        triton, error = _import_version("triton")
        if error:
            missing.append(f"triton ({error})")
    return {
        "ok": not missing, "missing": missing, "backend": backend, "blocking": bool(missing) and backend == "inductor",
        "c_compiler": compiler, "python_h": str(python_h), "triton": triton,
    }  # fmt: skip


def c_compiler() -> str | None:
    """The first C compiler on PATH of: $CC (Triton takes it first), sysconfig's CC (the one Python
    was built with), cc, gcc, clang (Triton's own fallbacks)."""
    names = [os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"]
    for name in filter(None, names):
        found = shutil.which(name.split()[0])  # sysconfig's CC may carry flags: "gcc -pthread"
        if found:
            return found
    return None


def _import_version(name: str) -> tuple[str | None, str | None]:
    """(version, None) when `name` imports, else (None, the error)."""
    try:
        module = importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install failing as it loads: both mean "missing"
        return None, f"{type(e).__name__}: {e}"
    return getattr(module, "__version__", "?"), None


def readiness_line(ready: dict[str, Any]) -> str:
    head = f"torch.compile ({ready['backend']})"
    if ready["ok"]:
        triton = f", triton {ready['triton']}" if ready["triton"] else ""
        return f"{head}: ready (C compiler {ready['c_compiler']}, Python.h{triton})"
    needs = " and ".join(ready["missing"])
    if ready["blocking"]:
        return f"{head}: NOT ready, needs {needs}; the compiled variants will not run"
    return f"{head}, which builds no kernels: inductor would need {needs}; not blocking"


# ---------------------------------------------------------------------------------------------
# running the jobs
# ---------------------------------------------------------------------------------------------


class PartRecord:
    """What a job has measured so far, rewritten after every figure: a job killed at its time
    limit still leaves the figures it had."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.update({key: value})

    def update(self, values: dict[str, Any]) -> None:
        self.data.update(values)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def job_files(work: Path, job: str) -> tuple[Path, Path]:
    """(figures, log) of a job."""
    stem = job.replace("/", ".")
    return work / f"{stem}.json", work / f"{stem}.log"


def run_job(job: str, dry: bool, work: Path, limit: float) -> dict[str, Any]:
    """Run one job in a subprocess (its own process group) for at most `limit` seconds."""
    result_file, log_file = job_files(work, job)
    result_file.unlink(missing_ok=True)  # figures from an earlier check in the same --work are not this one's
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--job", job, "--work", str(work)]
    if dry:
        cmd.append("--dry-run")
    start = time.perf_counter()
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = f"timed out after {limit:.0f} s"
    figures = json.loads(result_file.read_text()) if result_file.is_file() else {}
    record = {"status": status, "seconds": round(time.perf_counter() - start, 1), "limit_s": round(limit), **figures}
    if status != "ok":
        record["log_tail"] = log_file.read_text(errors="replace").splitlines()[-15:]
    return record


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the job's process group (a Ray driver shuts its local Ray down), then SIGKILL."""
    for sig, wait in zip((signal.SIGTERM, signal.SIGKILL), STOP_GRACE_S):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


REPO = Path(__file__).resolve().parents[1]


def run_all(check: Check, dry: bool, work: Path, ready: dict[str, Any], on_record) -> None:
    """Every job of the plan in order; `on_record(job, record)` after each (the report is
    rewritten then: a check cut short keeps what it has). `check.total_s` counts from the first
    job's start: the check's own start-up is part of the slack the total leaves."""
    plan = job_plan(check)
    started = time.perf_counter()
    for i, job in enumerate(plan):
        # this job's own limit plus what earlier jobs left unused; never what later jobs are owed
        owed_later = sum(check.limits[j] for j in plan[i + 1 :])
        limit = check.total_s - (time.perf_counter() - started) - owed_later
        if job.endswith("_compile") and ready["blocking"]:
            record = {"status": f"not run: torch.compile needs {' and '.join(ready['missing'])}", "seconds": 0.0}
        elif limit < MIN_JOB_S:
            record = {"status": "not run: the check's time was spent", "seconds": 0.0}
        else:
            log(f"{job} (limit {limit:.0f} s)")
            record = run_job(job, dry, work, limit)
        log(f"{job}: {record['status']} in {record['seconds']:.0f} s")
        on_record(job, record)


def empty_parts(check: Check) -> dict[str, Any]:
    """parts -> (variants ->) records, every job present from the start as not run yet."""
    pending = {"status": "not run yet", "seconds": 0.0}
    parts: dict[str, Any] = {}
    for part in PARTS:
        if part in VARIANT_PARTS:
            parts[part] = {**pending, "variants": {variant_key(*v): dict(pending) for v in check.variants}}
        else:
            parts[part] = dict(pending)
    return parts


def put_record(parts: dict[str, Any], job: str, record: dict[str, Any]) -> None:
    """Store a job's record; a variant part's status and seconds sum up its variants'."""
    part, variant = split_job(job)
    if variant is None:
        parts[part] = record
        return
    variants = parts[part]["variants"]
    variants[variant] = record
    bad = [v for v, r in variants.items() if r["status"] != "ok"]
    status = "ok" if not bad else f"{len(bad)} of {len(variants)} variants not ok ({', '.join(bad)})"
    parts[part].update(status=status, seconds=round(sum(r["seconds"] for r in variants.values()), 1))


def job_record(result: dict[str, Any], job: str) -> dict[str, Any]:
    part, variant = split_job(job)
    return result["parts"][part]["variants"][variant] if variant else result["parts"][part]


def run_job_here(job: str, check: Check, work: Path) -> int:
    """The job itself (in the subprocess that run_job started)."""
    part, variant = split_job(job)
    rec = PartRecord(job_files(work, job)[0])
    if variant is None:
        PART_FUNCTIONS[part](check, work, rec)
    else:
        variants = {variant_key(*v): v for v in check.variants}
        PART_FUNCTIONS[part](check, work, rec, variants[variant])
    return 0


# ---------------------------------------------------------------------------------------------
# GPU utilisation
# ---------------------------------------------------------------------------------------------

RAY_NVML = "ray._private.thirdparty.pynvml"  # the NVML bindings Ray ships (ray 2.x)


class UtilSampler:
    """Samples GPU utilisation (% of time a kernel ran, as NVML reports it) every `period` s in a
    thread: NVML through pynvml or Ray's bundled copy of it, else by running nvidia-smi; `source`
    says which (or why there is none). Once a second: NVML's own figure is an average over up to
    a second, and a sampling thread in the driver must not compete with Ray's for the CPU.
    `mean_over(windows)` averages the samples inside time windows."""

    def __init__(self, device: str, period: float = 1.0):
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self.source, self._read = _util_reader(device)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-util", daemon=True)

    def __enter__(self) -> "UtilSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while self._read is not None and not self._stop.wait(self.period):
            value = self._read()
            if value is not None:
                self.samples.append((time.time(), float(value)))

    def mean_over(self, windows: list[tuple[float, float]]) -> float | None:
        inside = [u for t, u in self.samples if any(lo <= t <= hi for lo, hi in windows)]
        return float(np.mean(inside)) if inside else None

    def summary(self, windows: list[tuple[float, float]]) -> dict[str, Any]:
        return {"gpu_busy_percent": self.mean_over(windows), "gpu_util_source": self.source,
                "gpu_util_samples": sum(any(lo <= t <= hi for lo, hi in windows) for t, _ in self.samples)}


def _nvml_module() -> tuple[Any, str]:
    """(module, source): `pynvml` when it imports, else Ray's bundled copy (always there with
    Ray, so no extra install on the GPU machine); (None, why) when neither imports."""
    errors = []
    for name in ("pynvml", RAY_NVML):
        try:
            return importlib.import_module(name), name
        except ImportError as e:
            errors.append(f"{name}: {e}")
    return None, "; ".join(errors)


def _util_reader(device: str):
    if device != "cuda":
        return "none (no GPU in a dry run)", None
    nvml, source = _nvml_module()
    if nvml is not None:
        try:
            nvml.nvmlInit()
            handle = nvml.nvmlDeviceGetHandleByIndex(0)
            return f"NVML via {source}", lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception as e:  # NVML present but failing (driver mismatch): say so, try nvidia-smi
            source = f"{source} failed: {type(e).__name__}: {e}"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return f"none (NVML unavailable: {source}; no nvidia-smi)", None

    def read() -> float | None:
        done = subprocess.run(
            [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "--id=0"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        return float(done.stdout.split()[0]) if done.returncode == 0 and done.stdout.strip() else None

    return f"nvidia-smi sampling (NVML unavailable: {source})", read


# ---------------------------------------------------------------------------------------------
# the parts
# ---------------------------------------------------------------------------------------------

GPU_MARK = re.compile(r"\bpytest\.mark\.gpu\b")


def gpu_test_files(tests: Path) -> list[str]:
    """The test files that mark tests gpu (module `pytestmark` or decorator), relative to the
    repository: `pytest -m gpu` over these only, not over tests/ (collecting the whole suite
    would nest a big pytest inside the suite's own run of the dry run)."""
    found = [p for p in sorted(tests.glob("test_*.py")) if GPU_MARK.search(p.read_text(errors="replace"))]
    return [str(p.relative_to(tests.parent)) for p in found]


def part_gpu_tests(check: Check, work: Path, rec: PartRecord) -> None:
    files = gpu_test_files(REPO / "tests")
    rec["files"] = files
    if not files:
        raise RuntimeError("no test file in tests/ marks tests gpu")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", *files, "-p", "no:cacheprovider"]
    rec["command"] = "pytest -q -m gpu " + " ".join(files)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {word: int(n) for n, word in (t.split()[:2] for t in last.strip("= ").split(", ") if t[:1].isdigit())}
    rec["summary"] = last
    rec["counts"] = counts
    if done.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu exited {done.returncode}: {last}\n{done.stdout[-2000:]}")


def part_train_predict(check: Check, work: Path, rec: PartRecord) -> None:
    from unet_ray import pairs
    from unet_ray.train import read_history

    storage, name = work / "e2e_runs", "e2e"
    shutil.rmtree(storage, ignore_errors=True)  # a run left by an earlier check would be resumed, not timed
    gpu = ["--gpu"] if check.device == "cuda" else []
    train = [
        "train", *gpu, "--workers", "1", "--image-size", str(check.e2e_size), "--epochs", str(check.e2e_epochs),
        "--batch-size", str(check.e2e_batch), "--depth", str(check.depth), "--base-channels", str(check.base_channels),
        "--storage-path", str(storage), "--name", name, "--max-failures", "0",
    ]  # fmt: skip
    if check.worker_cpus:
        train += ["--cpus-per-worker", str(check.worker_cpus)]
    if check.e2e_synth:
        config = work / "e2e_config.yaml"
        config.write_text(f"data:\n  synth_train: {check.e2e_synth[0]}\n  synth_val: {check.e2e_synth[1]}\n")
        train += ["--config", str(config)]
    rec["train_command"] = "unet-ray " + " ".join(train)
    launched = time.time()
    _cli(train, work / "train.log")
    rec["train_wall_s"] = time.time() - launched
    history = read_history(storage / name)
    first = history[0]
    rec["launch_to_first_step_s"] = first["epoch_started_at"] + first["first_step_s"] - launched
    rec["epochs"] = [
        {k: row.get(k) for k in ("epoch", "val_iou", "images_per_s", "images_per_s_steady", "data_wait_share",
                                 "logits_dtype", "channels_last", "dist_backend")}
        for row in history
    ]  # fmt: skip
    # pairs of their own for predict, written after training: more val pairs in the training run
    # would be generated before its first step and count in launch_to_first_step_s
    source = pairs.write_synthetic(work / "predict_pairs", 1, check.predict_pairs, seed=1)
    runs = []
    for workers in check.predict_workers:
        runs.append(_predict(storage / name, source / "val", work / f"predicted_w{workers}", workers, gpu))
        rec["predict_runs"] = runs
    base, last = runs[0]["files_per_s"], runs[-1]["files_per_s"]
    rec["predict_files_per_s_ratio"] = last / base if base and last else None  # last run's over the first's


def _predict(checkpoint: Path, source: Path, out: Path, workers: int, gpu: list[str]) -> dict[str, Any]:
    """`unet-ray predict` of `source` into `out` with `workers` model actors: its summary's figures."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(source), "--out", str(out),
            "--workers", str(workers), *gpu]  # fmt: skip
    start = time.time()
    _cli(args, out.with_suffix(".log"))
    summary = json.loads((out / "summary.json").read_text())
    keep = ("inputs", "written", "skipped", "iou", "seconds", "files_per_s")
    return {"workers": workers, "command": "unet-ray " + " ".join(args), "wall_s": time.time() - start,
            **{k: summary.get(k) for k in keep}}  # fmt: skip


def _cli(args: list[str], log_file: Path) -> None:
    """`unet-ray ARGS` (as `python -m unet_ray.cli`: the code of this checkout), output to log_file."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's
    with open(log_file, "w") as out:
        code = subprocess.run([sys.executable, "-m", "unet_ray.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=REPO).returncode  # fmt: skip
    if code != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"unet-ray {args[0]} exited {code}:\n{tail}")


def prepared_copies(check: Check, work: Path, size: int) -> Path:
    """Synthetic pairs prepared at `size`, the train rows copied `check.copies` times (made once;
    the jobs share them). Built in a temporary folder and renamed into place: a job killed while
    making it leaves nothing half-made for the next. Needs Ray started."""
    from benchmarks.run import replicate_prepared
    from unet_ray import pairs
    from unet_ray.prepare import prepare

    target = work / f"prepared_{size}_x{check.copies}"
    if (target / "meta.json").is_file():
        return target
    source = work / "pairs"
    if not (source / "val").is_dir():
        tmp = Path(tempfile.mkdtemp(prefix="pairs.", dir=work))
        pairs.write_synthetic(tmp, check.n_pairs, check.n_val, seed=0)
        os.replace(tmp, source)
    with tempfile.TemporaryDirectory(prefix=target.name + ".", dir=work) as tmp:
        prepare(source, Path(tmp) / "once", size, "road", progress=log)
        replicate_prepared(Path(tmp) / "once", Path(tmp) / "copies", check.copies)
        os.replace(Path(tmp) / "copies", target)
    return target


def ray_rates(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The Ray path's images/s from its history rows: the median over the epochs after the first
    (which warms up and compiles). Each row's `images_per_s_steady` (after the epoch's first
    batch: no pipeline start-up in it) where the worker reports it, else its `images_per_s`;
    `images_per_s_metric` says which."""
    keys = ["images_per_s_steady" if row.get("images_per_s_steady") is not None else "images_per_s" for row in history]
    rates = [float(row[key]) for row, key in zip(history, keys)]
    steady = slice(1, None) if len(history) > 1 else slice(None)
    return {
        "images_per_s": float(np.median(rates[steady])),
        "images_per_s_by_epoch": rates,
        "images_per_s_metric": " and ".join(sorted(set(keys[steady]))),
        "data_wait_share": float(np.median([row["data_wait_share"] for row in history[steady]])),
    }


def part_ray_throughput(check: Check, work: Path, rec: PartRecord, variant: tuple[int, bool]) -> None:
    import ray

    from benchmarks.run import train_config
    from unet_ray.config import merge
    from unet_ray.raysession import ensure_ray
    from unet_ray.train import plan_resources

    size, compiled = variant
    ensure_ray(log)
    cpus = ray.cluster_resources().get("CPU", 0)
    rec["node"] = {"cpus": cpus, "gpus": ray.cluster_resources().get("GPU", 0)}
    prepared = prepared_copies(check, work, size)
    key = variant_key(size, compiled)
    cfg = train_config(_bench_settings(check, size), str(prepared), work / "ray_runs", key, 1, check.ray_epochs)
    overrides = {"run.gpu": check.device == "cuda", "run.compile": compiled, "run.cpus_per_worker": check.worker_cpus}
    cfg = merge(cfg, overrides, "gpu check").validate()
    res = plan_resources(cfg, cpus)
    rec.update({"worker_cpus": res.cpus_per_worker, "torch_threads": res.torch_threads, **timed_ray_run(check, cfg)})


def timed_ray_run(check: Check, cfg) -> dict[str, Any]:
    """Train `cfg` in this process's Ray, sampling GPU use: the figures of its steady epochs."""
    from unet_ray.train import read_history, run_dir_of, run_training

    shutil.rmtree(run_dir_of(cfg), ignore_errors=True)  # an earlier check's run would be resumed, not timed
    start = time.time()
    with UtilSampler(check.device) as util:
        run_training(cfg, progress=log)
    history = read_history(run_dir_of(cfg))
    steady = history[1:] or history
    windows = [(r["epoch_started_at"], r["epoch_started_at"] + r["train_seconds"]) for r in steady]
    return {
        **ray_rates(history),
        "first_step_s": history[0]["first_step_s"],  # includes compiling when compiled
        "logits_dtype": history[0]["logits_dtype"], "channels_last": history[0]["channels_last"],
        "wall_s": time.time() - start,
        **util.summary(windows),
    }  # fmt: skip


def part_ray_streaming(check: Check, work: Path, rec: PartRecord) -> None:
    """ray_throughput's first variant (eager at its size), on the streaming ingest path."""
    import ray

    from benchmarks.run import train_config
    from unet_ray.config import merge
    from unet_ray.raysession import ensure_ray

    size = check.variants[0][0]
    ensure_ray(log)
    prepared = prepared_copies(check, work, size)
    cfg = train_config(_bench_settings(check, size), str(prepared), work / "ray_runs", f"{size}px_streaming", 1, check.ray_epochs)
    overrides = {"run.gpu": check.device == "cuda", "run.cpus_per_worker": check.worker_cpus, "data.ingest": "streaming"}
    cfg = merge(cfg, overrides, "gpu check").validate()
    rec["node"] = {"cpus": ray.cluster_resources().get("CPU", 0), "gpus": ray.cluster_resources().get("GPU", 0)}
    rec.update({"image_size": size, **timed_ray_run(check, cfg)})


def _bench_settings(check: Check, size: int):
    """benchmarks.run's Settings for one of this check's image sizes."""
    from benchmarks.run import QUICK

    return dataclasses.replace(
        QUICK, image_size=size, depth=check.depth, base_channels=check.base_channels, batch_size=check.batch_size,
        n_train=check.n_pairs * check.copies, n_val=check.n_val, data_epochs=check.data_passes,
    )  # fmt: skip


def _device(check: Check):
    """(device, on CUDA); on CPU one torch thread: two threads on a busy 2-core machine run a tiny
    model 50x slower (measured: OpenMP threads waiting on each other)."""
    import torch

    if check.device == "cpu":
        torch.set_num_threads(1)
    return torch.device(check.device), check.device == "cuda"


def part_plain_throughput(check: Check, work: Path, rec: PartRecord, variant: tuple[int, bool]) -> None:
    import torch

    from unet_ray import engine
    from unet_ray.config import ModelSection
    from unet_ray.gpu import compile_model, move_batch
    from unet_ray.model import build_model

    size, compiled = variant
    device, fast = _device(check)
    g = torch.Generator().manual_seed(0)
    host = {
        "image": torch.randint(0, 256, (check.plain_images, size, size, 3), dtype=torch.uint8, generator=g),
        "mask": torch.randint(0, 2, (check.plain_images, size, size), dtype=torch.uint8, generator=g),
    }
    on_device = move_batch(host, device)  # once: the loop reads tensors already on the device
    torch.manual_seed(0)
    net = build_model(ModelSection(depth=check.depth, base_channels=check.base_channels), 2).to(device)
    if fast:
        net = net.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
    model = compile_model(net, compiled)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    per_epoch, windows, first_epoch_s = [], [], None
    with UtilSampler(check.device) as util:
        for epoch in range(check.plain_epochs):
            order = torch.randperm(check.plain_images, device=device)
            batches = (
                {name: t[order[i : i + check.batch_size]] for name, t in on_device.items()}
                for i in range(0, check.plain_images - check.batch_size + 1, check.batch_size)
            )
            began = time.time()
            stats = engine.train_one_epoch(model, batches, optimizer, device, mixed_precision=fast, channels_last=fast)
            if epoch == 0:
                first_epoch_s = stats["train_seconds"]
            else:
                windows.append((began, began + stats["train_seconds"]))
            per_epoch.append(stats["train_images"] / stats["train_seconds"])
            rec["images_per_s_by_epoch"] = per_epoch  # so far: a job stopped at its limit keeps them
    rec.update({
        "images_per_s": float(np.median(per_epoch[1:] or per_epoch)),
        "first_epoch_s": first_epoch_s,  # includes compiling when compiled
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if fast else None,
        "logits_dtype": stats["logits_dtype"], "channels_last": stats["channels_last"],
        **util.summary(windows),
    })  # fmt: skip


def part_max_batch(check: Check, work: Path, rec: PartRecord) -> None:
    """Doubling from 16, then bisecting between the last batch that trained and the first that did
    not (to within 1/16 of it): one bf16 training step per try."""
    import torch

    from unet_ray import engine
    from unet_ray.config import ModelSection
    from unet_ray.model import build_model

    device, fast = _device(check)
    size = check.max_batch_size
    net = build_model(ModelSection(), 2).to(device)  # the default model
    if fast:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    tried: dict[int, bool] = {}

    def fits(n: int) -> bool:
        images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, device=device)
        batch = {"image": images, "mask": images[..., 0] > 127}
        try:
            engine.train_one_epoch(net, [batch], optimizer, device, mixed_precision=fast, channels_last=fast)
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        except RuntimeError as e:  # e.g. a kernel refusing a tensor this large: does not fit either
            ok = False
            rec["error_at"] = {"batch": n, "error": str(e)[:300]}
        del images, batch
        optimizer.zero_grad(set_to_none=True)
        if fast:
            if ok:
                rec["peak_gpu_memory_gib_at_largest"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        tried[n] = ok
        rec["tried"] = dict(tried)
        if ok:  # so far: what a part stopped at its time limit still reports
            rec["largest_batch"] = max(rec.data.get("largest_batch", 0), n)
        return ok

    low, high = 0, None
    n = min(16, check.max_batch_cap)
    while n <= check.max_batch_cap and fits(n):
        low, n = n, n * 2
    if n <= check.max_batch_cap:
        high = n
        while high - low > max(1, high // 16):
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
    rec["image_size"] = size
    rec["largest_batch"] = low
    if high is None:
        rec["limited_by"] = f"the search's cap ({check.max_batch_cap})"
    else:
        rec["limited_by"] = "an error, see error_at" if "error_at" in rec.data else "memory"
    rec["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30 if fast else None


def part_data_stage(check: Check, work: Path, rec: PartRecord) -> None:
    import ray

    from benchmarks.run import ray_data_stage
    from unet_ray.raysession import ensure_ray

    ensure_ray(log)
    prepared = prepared_copies(check, work, check.data_size)
    stage = ray_data_stage(_bench_settings(check, check.data_size), prepared)
    stage.pop("ray_data_stats_last_pass", None)
    rec["image_size"] = check.data_size
    rec["node_cpus"] = ray.cluster_resources().get("CPU", 0)
    rec.update(stage)


def part_augment_per_core(check: Check, work: Path, rec: PartRecord) -> None:
    from benchmarks.run import augment_per_core, synthetic_arrays

    rec.update(augment_per_core(synthetic_arrays(64, check.augment_size), check.augment_seconds))


PART_FUNCTIONS = {name: globals()[f"part_{name}"] for name in PARTS}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _variant_records(result: dict[str, Any], part: str, key: str) -> dict[str, Any]:
    return result["parts"].get(part, {}).get("variants", {}).get(key, {})


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue asks for, from the jobs' records (None where a job gave none)."""
    out: dict[str, Any] = {}
    for size, compiled in result["settings"]["variants"]:
        key = variant_key(size, compiled)
        r = _variant_records(result, "ray_throughput", key).get("images_per_s")
        p = _variant_records(result, "plain_throughput", key).get("images_per_s")
        out[f"ray_{key}"], out[f"plain_{key}"] = r, p
        out[f"ratio_{key}"] = r / p if r and p else None
    return out


def markdown(result: dict[str, Any]) -> str:
    parts = result["parts"]
    rows: list[tuple[str, str, str]] = []

    def add(name: str, value: Any, target: str = "") -> None:
        rows.append((name, _fmt(value), target))

    for job in result["jobs"]:
        record = job_record(result, job)
        limit = f", limit {record['limit_s']} s" if "limit_s" in record else ""
        add(f"job `{job}`", f"{record['status']} ({record['seconds']:.0f} s{limit})")
    ready = result["compile_ready"]
    needs = "no: needs " + " and ".join(ready["missing"])
    add("torch.compile ready (C compiler, Python.h, triton on CUDA)", "yes" if ready["ok"] else needs)
    head = headline(result)
    for size, compiled in result["settings"]["variants"]:
        _throughput_rows(add, result, head, size, compiled)
    add("GPU utilisation measured with", _source(parts["ray_throughput"]) or _source(parts["plain_throughput"]))
    add("Ray path images/s from the history's", _first(parts["ray_throughput"], "images_per_s_metric"))
    st = parts["ray_streaming"]
    label = f"{st.get('image_size', '?')} px, eager, --ingest streaming"
    add(f"Ray path images/s, {label}", _or_status(st.get("images_per_s"), job_record(result, "ray_streaming")))
    add(f"Ray path: share of step time waiting for data, {label}", st.get("data_wait_share"))
    add(f"Ray path: GPU busy %, {label}", st.get("gpu_busy_percent"), f">= {TARGETS['gpu_busy_percent']:g}")
    _e2e_rows(add, parts["train_predict"])
    tests = parts["gpu_tests"]
    add(f"GPU tests (`{tests.get('command', 'pytest -m gpu')}`)", tests.get("summary"))
    mb = parts["max_batch"]
    add(f"largest batch at {mb.get('image_size', '?')} px, default model (limited by {mb.get('limited_by', '?')})",
        mb.get("largest_batch"))
    add("peak GPU memory at that batch (GiB)", mb.get("peak_gpu_memory_gib_at_largest"))
    ds = parts["data_stage"]
    add(f"Ray Data read + augment at {ds.get('image_size', '?')} px, all {_fmt(ds.get('node_cpus'))} CPUs (images/s)",
        ds.get("images_per_s"))
    ap = parts["augment_per_core"]
    add(f"augment at {ap.get('image_size', '?')} px, images/s per core", ap.get("images_per_s_per_core"),
        f">= {TARGETS['augment_256px_images_per_s_per_core']:g}")
    title = (
        f"# GPU check: {result['machine']}\n\n"
        f"{result['mode']}; device: {result['device_name']}; {result['cpus']} CPUs; {result['timestamp']}; "
        f"total {result['total_s']:.0f} s.\n\n| measurement | value | target |\n|---|---:|---:|\n"
    )
    return title + "".join(f"| {n} | {v} | {t} |\n" for n, v, t in rows)


def _throughput_rows(add, result: dict[str, Any], head: dict[str, Any], size: int, compiled: bool) -> None:
    key = variant_key(size, compiled)
    label = f"{size} px, {'torch.compile' if compiled else 'eager'}"
    r, p = _variant_records(result, "ray_throughput", key), _variant_records(result, "plain_throughput", key)
    target = f">= {TARGETS['ray_images_per_s_256px']:g}" if size == 256 else ""
    # a variant without a figure shows why (not run: torch.compile needs ..., failed, timed out)
    add(f"Ray path images/s, {label}", _or_status(head[f"ray_{key}"], r), target)
    add(f"plain loop (tensors on the device) images/s, {label}", _or_status(head[f"plain_{key}"], p))
    add(f"**ratio Ray / plain**, {label}", head[f"ratio_{key}"], f">= {TARGETS['ray_vs_plain']:g}")
    add(f"Ray path: share of step time waiting for data, {label}", r.get("data_wait_share"))
    add(f"Ray path: GPU busy %, {label}", r.get("gpu_busy_percent"), f">= {TARGETS['gpu_busy_percent']:g}")
    add(f"Ray path: first step (s, incl. compiling), {label}", r.get("first_step_s"))
    add(f"plain loop: peak GPU memory (GiB), {label}", p.get("peak_gpu_memory_gib"))


def _e2e_rows(add, e2e: dict[str, Any]) -> None:
    add("`unet-ray train` (end to end): launch to end of first step (s)", e2e.get("launch_to_first_step_s"),
        f"<= {TARGETS['first_step_s']:g}")
    add("`unet-ray train`: wall time (s); last val IoU", _pair(e2e.get("train_wall_s"), _last(e2e.get("epochs"), "val_iou")))
    for run in e2e.get("predict_runs") or []:
        label = f"`unet-ray predict --workers {run['workers']}` of {_fmt(run.get('inputs'))} pairs"
        figures = f"{_fmt(run.get('files_per_s'))}; {_pair(run.get('wall_s'), run.get('iou'))}"
        add(f"{label}: files/s; wall time (s); IoU", figures)
    add("`unet-ray predict`: files/s, most workers / 1 worker", e2e.get("predict_files_per_s_ratio"))


def _or_status(value: Any, record: dict[str, Any]) -> Any:
    if value is None and record.get("status", "ok") != "ok":
        return f"({record['status']})"
    return value


def _first(part: dict[str, Any], key: str) -> Any:
    """`key` from the first of a part's variants that has it."""
    return next((v[key] for v in part.get("variants", {}).values() if v.get(key) is not None), None)


def _source(part: dict[str, Any]) -> Any:
    return _first(part, "gpu_util_source")


def _last(rows: list[dict[str, Any]] | None, key: str) -> Any:
    return rows[-1].get(key) if rows else None


def _pair(a: Any, b: Any) -> str:
    return f"{_fmt(a)}; {_fmt(b)}"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def machine() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "machine": f"{platform.node() or 'host'}-{os.cpu_count()}cpu",
        "cpus": os.cpu_count(),
        "device_name": torch.cuda.get_device_name(0) if cuda else "CPU (no CUDA)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def write_report(out: Path, result: dict[str, Any], started: float) -> str:
    """gpu_check.json and gpu_check.md as they stand; returns the table."""
    result["total_s"] = time.perf_counter() - started
    result["headline"] = headline(result)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out / "gpu_check.json")
    table = markdown(result)
    (out / "gpu_check.md").write_text(table)
    return table


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_check", help="folder for gpu_check.json and .md")
    parser.add_argument("--dry-run", action="store_true", help="the same code on CPU with tiny sizes (< 2 min)")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job, e.g. ray_throughput/256px_eager
    parser.add_argument("--work", help="keep the jobs' files and logs in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    check = DRY if args.dry_run else GPU
    if args.dry_run:  # compile without building kernels (see unet_ray.gpu.compile_model)
        os.environ.setdefault(COMPILE_BACKEND_ENV, "aot_eager")
    if args.job:
        return run_job_here(args.job, check, Path(args.work))

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}). Install the CUDA build of PyTorch and run on a GPU machine, "
            "or use --dry-run to run the same code on CPU.",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ready = compile_readiness(check.device)
    log(readiness_line(ready))
    result: dict[str, Any] = {
        **machine(), "mode": "dry run (CPU, tiny sizes)" if args.dry_run else "GPU",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": dataclasses.asdict(check),
        "targets": TARGETS, "compile_ready": ready, "jobs": job_plan(check), "parts": empty_parts(check),
    }  # fmt: skip

    def on_record(job: str, record: dict[str, Any]) -> None:
        put_record(result["parts"], job, record)
        write_report(out, result, started)

    with tempfile.TemporaryDirectory(prefix="unet_ray_gpu_check_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run_all(check, args.dry_run, work, ready, on_record)
    table = write_report(out, result, started)
    print(table)
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {result['total_s']:.0f} s")
    return 0 if all(job_record(result, job)["status"] == "ok" for job in result["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
