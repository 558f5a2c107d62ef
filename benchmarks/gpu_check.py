"""The GPU check: one command that proves and measures the GPU path on one GPU in under 8 minutes.

    python -m benchmarks.gpu_check [--out DIR] [--dry-run]

Parts, each a subprocess under its own time limit (one that fails or runs out of time is recorded
as such, with what it had measured, and the others still run):

  gpu_tests         `pytest -m gpu tests/`
  train_predict     `unet-ray train --gpu --workers 1` on synthetic pairs (256 px, 2 epochs), then
                    `unet-ray predict --gpu` on its checkpoint; launch to end of first step
  ray_throughput    Ray path (Ray Data + TorchTrainer, 1 GPU worker) images/s at 128 and 256 px,
                    bf16 + channels_last, eager and torch.compile; data-wait share; GPU busy
  plain_throughput  plain PyTorch loop over tensors already on the GPU, same sizes and variants;
                    peak GPU memory; GPU busy
  max_batch         largest batch that trains at 256 px (default model, bf16, channels_last)
  data_stage        Ray Data read + augment at 256 px with all the node's CPUs (images/s)
  augment_per_core  the augment stage at 256 px on one core (images/s)

Writes DIR/gpu_check.json and DIR/gpu_check.md and prints the table. `--dry-run` runs the same
code on CPU with tiny sizes (under 2 minutes on 2 cores); the test suite runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
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
PARTS = ("gpu_tests", "train_predict", "ray_throughput", "plain_throughput", "max_batch", "data_stage", "augment_per_core")


@dataclass(frozen=True)
class Check:
    device: str
    sizes: tuple[int, ...]  # training throughput at these image sizes
    compile_variants: tuple[bool, ...]
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
    data_size: int  # Ray Data stage image size
    augment_size: int  # augment-per-core image size (256 px in both modes: the figure the issue asks for)
    data_passes: int
    augment_seconds: float
    max_batch_size: int  # largest-batch search: image size and cap
    max_batch_cap: int
    worker_cpus: float | None  # CPUs per training worker (None: as `unet-ray train` works it out)
    limits: dict[str, float]  # seconds per part
    total_s: float  # all parts together


GPU = Check(
    "cuda", sizes=(128, 256), compile_variants=(False, True), depth=4, base_channels=16, batch_size=128,
    n_pairs=512, copies=8, n_val=64, ray_epochs=4, plain_images=2048, plain_epochs=5,
    e2e_size=256, e2e_epochs=2, e2e_batch=32, e2e_synth=None,
    data_size=256, augment_size=256, data_passes=3, augment_seconds=3.0,
    max_batch_size=256, max_batch_cap=16384, worker_cpus=None,
    limits={"gpu_tests": 75, "train_predict": 110, "ray_throughput": 200, "plain_throughput": 90,
            "max_batch": 50, "data_stage": 60, "augment_per_core": 30},
    total_s=450,
)  # fmt: skip
DRY = Check(
    # compiled only: the eager path is the same code with run.compile off, which every Ray test runs
    "cpu", sizes=(32,), compile_variants=(True,), depth=2, base_channels=4, batch_size=8,
    n_pairs=16, copies=2, n_val=8, ray_epochs=2, plain_images=32, plain_epochs=2,
    e2e_size=64, e2e_epochs=1, e2e_batch=8, e2e_synth=(16, 8),
    data_size=64, augment_size=256, data_passes=1, augment_seconds=0.5,
    max_batch_size=32, max_batch_cap=16, worker_cpus=1.0,
    # about 1.5 minutes on an idle 2-core machine; the limits only catch a hang (a busy machine is slower)
    limits={"gpu_tests": 90, "train_predict": 180, "ray_throughput": 180, "plain_throughput": 90,
            "max_batch": 60, "data_stage": 120, "augment_per_core": 60},
    total_s=540,
)  # fmt: skip


def log(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# running the parts
# ---------------------------------------------------------------------------------------------


class PartRecord:
    """What a part has measured so far, rewritten after every figure: a part killed at its time
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


def run_part(name: str, check: Check, dry: bool, work: Path, limit: float) -> dict[str, Any]:
    """Run one part in a subprocess (its own process group) for at most `limit` seconds."""
    result_file = work / f"{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--part", name, "--work", str(work)]
    if dry:
        cmd.append("--dry-run")
    start = time.perf_counter()
    with open(work / f"{name}.log", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = f"timed out after {limit:.0f} s"
    figures = json.loads(result_file.read_text()) if result_file.is_file() else {}
    tail = (work / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
    record = {"status": status, "seconds": round(time.perf_counter() - start, 1), **figures}
    if status != "ok":
        record["log_tail"] = tail
    return record


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (a Ray driver shuts its local Ray down), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
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


# ---------------------------------------------------------------------------------------------
# GPU utilisation
# ---------------------------------------------------------------------------------------------


class UtilSampler:
    """Samples GPU utilisation (% of time a kernel ran, as NVML reports it) every `period` s in a
    thread: with pynvml when it is installed, else by running nvidia-smi; `source` says which
    (or why there is none). `mean_over(windows)` averages the samples inside time windows."""

    def __init__(self, device: str, period: float = 0.1):
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


def _util_reader(device: str):
    if device != "cuda":
        return "none (no GPU in a dry run)", None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return "pynvml", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
    except Exception as e:  # not installed or no NVML: say so and sample with nvidia-smi
        reason = f"{type(e).__name__}: {e}"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return f"none (pynvml unavailable: {reason}; no nvidia-smi)", None

    def read() -> float | None:
        done = subprocess.run(
            [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "--id=0"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        return float(done.stdout.split()[0]) if done.returncode == 0 and done.stdout.strip() else None

    return f"nvidia-smi sampling (pynvml unavailable: {reason})", read


# ---------------------------------------------------------------------------------------------
# the parts
# ---------------------------------------------------------------------------------------------


def part_gpu_tests(check: Check, work: Path, rec: PartRecord) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {word: int(n) for n, word in (t.split()[:2] for t in last.strip("= ").split(", ") if t[:1].isdigit())}
    rec["command"] = "pytest -q -m gpu tests/"
    rec["summary"] = last
    rec["counts"] = counts
    if done.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu exited {done.returncode}: {last}\n{done.stdout[-2000:]}")


def part_train_predict(check: Check, work: Path, rec: PartRecord) -> None:
    from unet_ray.train import read_history

    storage, name = work / "e2e_runs", "e2e"
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
        {k: row.get(k) for k in ("epoch", "val_iou", "images_per_s", "data_wait_share", "logits_dtype", "channels_last",
                                 "dist_backend")}
        for row in history
    ]  # fmt: skip
    val = storage / name / "synthetic_pairs" / "val"
    predict = ["predict", "--checkpoint", str(storage / name), "--input", str(val), "--out", str(work / "predicted"),
               "--workers", "1", *gpu]  # fmt: skip
    rec["predict_command"] = "unet-ray " + " ".join(predict)
    start = time.time()
    _cli(predict, work / "predict.log")
    rec["predict_wall_s"] = time.time() - start
    summary = json.loads((work / "predicted" / "summary.json").read_text())
    rec["predict"] = {k: summary.get(k) for k in ("inputs", "written", "skipped", "iou", "seconds", "files_per_s")}


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
    the Ray parts share them). Needs Ray started."""
    from benchmarks.run import replicate_prepared
    from unet_ray import pairs
    from unet_ray.prepare import prepare

    target = work / f"prepared_{size}_x{check.copies}"
    if (target / "meta.json").is_file():
        return target
    source = work / "pairs"
    if not (source / "val").is_dir():
        pairs.write_synthetic(work / "pairs.tmp", check.n_pairs, check.n_val, seed=0)
        os.replace(work / "pairs.tmp", source)
    prepare(source, work / f"prepared_{size}", size, "road", progress=log)
    tmp = Path(tempfile.mkdtemp(prefix=target.name, dir=work))
    shutil.rmtree(tmp)
    replicate_prepared(work / f"prepared_{size}", tmp, check.copies)
    os.replace(tmp, target)
    return target


def _variant(size: int, compiled: bool) -> str:
    return f"{size}px_{'compile' if compiled else 'eager'}"


def part_ray_throughput(check: Check, work: Path, rec: PartRecord) -> None:
    import ray

    from benchmarks.run import train_config
    from unet_ray.config import merge
    from unet_ray.train import ensure_ray, plan_resources, read_history, run_dir_of, run_training

    ensure_ray(log)
    cpus = ray.cluster_resources().get("CPU", 0)
    rec["node"] = {"cpus": cpus, "gpus": ray.cluster_resources().get("GPU", 0)}
    with UtilSampler(check.device) as util:
        for size in check.sizes:
            prepared = prepared_copies(check, work, size)
            for compiled in check.compile_variants:
                key = _variant(size, compiled)
                cfg = train_config(_bench_settings(check, size), str(prepared), work / "ray_runs", key, 1, check.ray_epochs)
                overrides = {
                    "run.gpu": check.device == "cuda", "run.compile": compiled, "run.cpus_per_worker": check.worker_cpus,
                }  # fmt: skip
                cfg = merge(cfg, overrides, "gpu check").validate()
                res = plan_resources(cfg, cpus)
                start = time.time()
                run_training(cfg, progress=log)
                history = read_history(run_dir_of(cfg))
                steady = history[1:] or history
                windows = [(r["epoch_started_at"], r["epoch_started_at"] + r["train_seconds"]) for r in steady]
                rec[key] = {
                    "images_per_s": float(np.median([r["images_per_s"] for r in steady])),
                    "images_per_s_by_epoch": [r["images_per_s"] for r in history],
                    "data_wait_share": float(np.median([r["data_wait_share"] for r in steady])),
                    "first_step_s": history[0]["first_step_s"],  # includes compiling when compiled
                    "logits_dtype": history[0]["logits_dtype"], "channels_last": history[0]["channels_last"],
                    "worker_cpus": res.cpus_per_worker, "torch_threads": res.torch_threads,
                    "wall_s": time.time() - start,
                    **util.summary(windows),
                }  # fmt: skip


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


def part_plain_throughput(check: Check, work: Path, rec: PartRecord) -> None:
    import torch

    from unet_ray import engine
    from unet_ray.config import ModelSection
    from unet_ray.gpu import compile_model, move_batch
    from unet_ray.model import build_model

    device, fast = _device(check)
    with UtilSampler(check.device) as util:
        for size in check.sizes:
            g = torch.Generator().manual_seed(0)
            host = {
                "image": torch.randint(0, 256, (check.plain_images, size, size, 3), dtype=torch.uint8, generator=g),
                "mask": torch.randint(0, 2, (check.plain_images, size, size), dtype=torch.uint8, generator=g),
            }
            on_device = move_batch(host, device)  # once: the loop reads tensors already on the device
            for compiled in check.compile_variants:
                torch.manual_seed(0)
                net = build_model(ModelSection(depth=check.depth, base_channels=check.base_channels), 2).to(device)
                if fast:
                    net = net.to(memory_format=torch.channels_last)
                    torch.cuda.reset_peak_memory_stats(device)
                model = compile_model(net, compiled)
                optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
                per_epoch, windows, first_epoch_s = [], [], None
                for epoch in range(check.plain_epochs):
                    order = torch.randperm(check.plain_images, device=device)
                    batches = (
                        {name: t[order[i : i + check.batch_size]] for name, t in on_device.items()}
                        for i in range(0, check.plain_images - check.batch_size + 1, check.batch_size)
                    )
                    began = time.time()
                    stats = engine.train_one_epoch(
                        model, batches, optimizer, device, mixed_precision=fast, channels_last=fast
                    )
                    if epoch == 0:
                        first_epoch_s = stats["train_seconds"]
                    else:
                        windows.append((began, began + stats["train_seconds"]))
                    per_epoch.append(stats["train_images"] / stats["train_seconds"])
                rec[_variant(size, compiled)] = {
                    "images_per_s": float(np.median(per_epoch[1:] or per_epoch)),
                    "images_per_s_by_epoch": per_epoch,
                    "first_epoch_s": first_epoch_s,  # includes compiling when compiled
                    "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if fast else None,
                    "logits_dtype": stats["logits_dtype"], "channels_last": stats["channels_last"],
                    **util.summary(windows),
                }  # fmt: skip
                del model, net, optimizer


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
    from unet_ray.train import ensure_ray

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


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue asks for, from the parts' records (None where a part gave none)."""
    parts = result["parts"]
    ray_part, plain = parts.get("ray_throughput", {}), parts.get("plain_throughput", {})
    check = result["settings"]
    out: dict[str, Any] = {}
    for size in check["sizes"]:
        for compiled in check["compile_variants"]:
            key = _variant(size, compiled)
            r, p = ray_part.get(key, {}).get("images_per_s"), plain.get(key, {}).get("images_per_s")
            out[f"ray_{key}"], out[f"plain_{key}"] = r, p
            out[f"ratio_{key}"] = r / p if r and p else None
    return out


def markdown(result: dict[str, Any]) -> str:
    parts, check = result["parts"], result["settings"]
    rows: list[tuple[str, str, str]] = []

    def add(name: str, value: Any, target: str = "") -> None:
        rows.append((name, _fmt(value), target))

    for name in PARTS:
        part = parts[name]
        add(f"part `{name}`", f"{part['status']} ({part['seconds']:.0f} s)")
    tests = parts["gpu_tests"]
    add("GPU tests (`pytest -m gpu`)", tests.get("summary"))
    e2e = parts["train_predict"]
    add("`unet-ray train` (end to end): launch to end of first step (s)", e2e.get("launch_to_first_step_s"),
        f"<= {TARGETS['first_step_s']:g}")
    add("`unet-ray train`: wall time (s); last val IoU", _pair(e2e.get("train_wall_s"), _last(e2e.get("epochs"), "val_iou")))
    predicted = e2e.get("predict") or {}
    add("`unet-ray predict` on its checkpoint: wall time (s); IoU", _pair(e2e.get("predict_wall_s"), predicted.get("iou")))
    head = headline(result)
    ray_part, plain = parts["ray_throughput"], parts["plain_throughput"]
    for size in check["sizes"]:
        for compiled in check["compile_variants"]:
            key = _variant(size, compiled)
            label = f"{size} px, {'torch.compile' if compiled else 'eager'}"
            target = f">= {TARGETS['ray_images_per_s_256px']:g}" if size == 256 else ""
            add(f"Ray path images/s, {label}", head[f"ray_{key}"], target)
            add(f"plain loop (tensors on the device) images/s, {label}", head[f"plain_{key}"])
            add(f"**ratio Ray / plain**, {label}", head[f"ratio_{key}"], f">= {TARGETS['ray_vs_plain']:g}")
            r = ray_part.get(key, {})
            add(f"Ray path: share of step time waiting for data, {label}", r.get("data_wait_share"))
            add(f"Ray path: GPU busy %, {label}", r.get("gpu_busy_percent"), f">= {TARGETS['gpu_busy_percent']:g}")
            add(f"Ray path: first step (s, incl. compiling), {label}", r.get("first_step_s"))
            add(f"plain loop: peak GPU memory (GiB), {label}", plain.get(key, {}).get("peak_gpu_memory_gib"))
    add("GPU utilisation measured with", ray_part.get("gpu_util_source") or _source(ray_part))
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


def _source(part: dict[str, Any]) -> Any:
    for value in part.values():
        if isinstance(value, dict) and "gpu_util_source" in value:
            return value["gpu_util_source"]
    return None


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


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_check", help="folder for gpu_check.json and .md")
    parser.add_argument("--dry-run", action="store_true", help="the same code on CPU with tiny sizes (< 2 min)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part
    parser.add_argument("--work", help="keep the parts' files and logs in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    check = DRY if args.dry_run else GPU
    if args.dry_run:  # compile without building kernels (see unet_ray.gpu.compile_model)
        os.environ.setdefault(COMPILE_BACKEND_ENV, "aot_eager")
    if args.part:
        work = Path(args.work)
        PART_FUNCTIONS[args.part](check, work, PartRecord(work / f"{args.part}.json"))
        return 0

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
    started = time.perf_counter()
    result: dict[str, Any] = {
        **machine(), "mode": "dry run (CPU, tiny sizes)" if args.dry_run else "GPU",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": dataclasses.asdict(check),
        "targets": TARGETS, "parts": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="unet_ray_gpu_check_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in PARTS:
            left = check.total_s - (time.perf_counter() - started)
            limit = min(check.limits[name], left)
            if limit < 5:
                result["parts"][name] = {"status": "not run: the check's time was spent", "seconds": 0.0}
                continue
            log(f"{name} (limit {limit:.0f} s)")
            result["parts"][name] = run_part(name, check, args.dry_run, work, limit)
            log(f"{name}: {result['parts'][name]['status']} in {result['parts'][name]['seconds']:.0f} s")
    result["total_s"] = time.perf_counter() - started
    result["headline"] = headline(result)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    table = markdown(result)
    (out / "gpu_check.md").write_text(table)
    print(table)
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {result['total_s']:.0f} s")
    return 0 if all(p["status"] == "ok" for p in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
