"""Performance benchmark of unet_ray: Ray path vs a plain PyTorch loop, the data stage, start-up,
and (optionally) accuracy for a fixed time budget on real pairs.

    python -m benchmarks.run [--quick] [--out DIR] [--real-data DIR]
    python -m benchmarks.run --streaming [--quick]   (the two ingest paths: benchmarks/streaming.py)

Everything is measured in this one run on this machine; nothing is hard-coded. Writes
DIR/<machine>.json and DIR/<machine>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import quality

# Targets from the issue, shown next to the measurements (never used as results).
TARGETS = {
    "ratio_ray_vs_plain": 0.90, "data_images_per_s_per_core": 1000.0, "startup_to_first_step_s": 20.0,
    "augment_256px_images_per_s_per_core": 250.0,  # 16 cores feed >= 4000 images/s to one GPU
}  # fmt: skip


@dataclass
class Settings:
    image_size: int
    depth: int
    base_channels: int
    batch_size: int
    n_train: int
    n_val: int
    ray_workers: tuple[int, ...]  # the Ray path is timed with each of these worker counts
    ray_epochs: int  # epoch 1 is warm-up; later epochs give the steady-state figure
    plain_epochs: int  # likewise
    data_epochs: int  # timed passes over the data stage, after one warm-up pass
    data_copies: int  # the data stage reads the prepared train rows this many times over
    tune_trials: int  # trials of the start-up sweep (the second one starts in a warm cluster)
    startup_runs: int  # cold starts timed; the median is reported (one run on a shared VM varies by seconds)
    real_data_epochs: int


FULL = Settings(
    128, 4, 16, 16, n_train=256, n_val=32, ray_workers=(1, 2), ray_epochs=4, plain_epochs=4,
    data_epochs=4, data_copies=8, tune_trials=2, startup_runs=3, real_data_epochs=6,
)  # fmt: skip
QUICK = Settings(
    64, 3, 8, 16, n_train=64, n_val=16, ray_workers=(2,), ray_epochs=3, plain_epochs=4,
    data_epochs=3, data_copies=2, tune_trials=1, startup_runs=1, real_data_epochs=0,
)  # fmt: skip


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def machine_name() -> str:
    raw = f"{platform.node() or 'cpu'}-{os.cpu_count()}cpu"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


def train_config(s: Settings, data: str | None, storage: Path, name: str, workers: int, epochs: int):
    from unet_ray.config import TrainConfig

    return TrainConfig.from_dict(
        {
            "data": {"path": data, "image_size": s.image_size},
            "model": {"depth": s.depth, "base_channels": s.base_channels},
            "optim": {"epochs": epochs, "batch_size": s.batch_size},
            "run": {"workers": workers, "storage_path": str(storage), "name": name, "seed": 0, "max_failures": 0},
        }
    ).validate()


# ---------------------------------------------------------------------------------------------
# 1. training throughput
# ---------------------------------------------------------------------------------------------


def ray_training(s: Settings, prepared: Path, storage: Path, workers: int) -> dict[str, Any]:
    from unet_ray.train import plan_resources, read_history, run_dir_of, run_training

    import ray

    cfg = train_config(s, str(prepared), storage, f"ray_{workers}w", workers, s.ray_epochs)
    res = plan_resources(cfg, ray.cluster_resources().get("CPU", 0))
    start = time.perf_counter()
    run_training(cfg, progress=log)
    wall = time.perf_counter() - start
    history = read_history(run_dir_of(cfg))
    steady = [row["images_per_s"] for row in history if row["epoch"] > 1]  # epoch 1 starts the data workers
    return {
        "workers": workers,
        "cpus_per_worker": res.cpus_per_worker,
        "torch_threads_per_worker": res.torch_threads,
        "total_torch_threads": res.torch_threads * workers,
        "images_per_s_by_epoch": [row["images_per_s"] for row in history],
        "epoch_seconds": [row["epoch_seconds"] for row in history],
        "images_per_s": float(np.median(steady)),  # median: the machine may be shared
        "wall_s": wall,
    }


def augmented_batches(arrays: dict[str, np.ndarray], batch_size: int, augment, rng: np.random.Generator):
    """What a user's plain loop does: shuffle, slice a batch, augment it, hand tensors to the model."""
    import torch

    order = rng.permutation(len(arrays["image"]))
    for start in range(0, len(order) - batch_size + 1, batch_size):  # drop the last partial batch
        idx = order[start : start + batch_size]
        batch = augment({"image": arrays["image"][idx], "mask": arrays["mask"][idx]})
        yield {"image": torch.from_numpy(batch["image"]), "mask": torch.from_numpy(batch["mask"])}


def plain_training(
    s: Settings, arrays: dict[str, np.ndarray], threads: int, device_name: str = "cpu", image_size: int | None = None,
) -> dict[str, Any]:
    import torch

    from unet_ray import engine
    from unet_ray.config import ModelSection
    from unet_ray.model import build_model
    from unet_ray.recipe import use_bf16
    from unet_ray.transforms import JointAugment

    size = image_size or s.image_size
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        device = torch.device(device_name)
        # the precision and memory format the Ray workers train with (run.precision "auto")
        bf16 = use_bf16("auto", device)
        model = build_model(ModelSection(depth=s.depth, base_channels=s.base_channels), 1).to(device)
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        augment, rng = JointAugment(size), np.random.default_rng(0)
        per_epoch = []
        for _ in range(s.plain_epochs):
            stats = engine.train_one_epoch(
                model, augmented_batches(arrays, s.batch_size, augment, rng), optimizer, device,
                mixed_precision=bf16, channels_last=True,
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_epoch.append(stats["train_images"] / stats["train_seconds"])
        steady = per_epoch[1:]  # epoch 1 warms up the allocator and kernels
        return {"torch_threads": threads, "images_per_s_by_epoch": per_epoch, "images_per_s": float(np.median(steady))}
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# 2. data stage
# ---------------------------------------------------------------------------------------------


def replicate_prepared(prepared: Path, target: Path, copies: int) -> Path:
    """A prepared folder whose train split holds every train shard `copies` times: a data set the
    size of a real one for the data-stage figure, so that what each pass costs to start weighs on
    it as little as it does in a real epoch."""
    import shutil

    meta = json.loads((prepared / "meta.json").read_text())
    meta["counts"]["train"] *= copies
    meta["class_pixels"] = [c * copies for c in meta["class_pixels"]]
    train_bytes = sum(f.stat().st_size for f in (prepared / "train").glob("*.parquet"))
    meta["bytes"] += (copies - 1) * train_bytes
    (target / "train").mkdir(parents=True)
    shutil.copytree(prepared / "val", target / "val")
    for copy in range(copies):
        for shard in sorted((prepared / "train").glob("*.parquet")):
            shutil.copyfile(shard, target / "train" / f"copy{copy}_{shard.name}")
    (target / "meta.json").write_text(json.dumps(meta))
    return target


def ray_data_stage(s: Settings, prepared: Path) -> dict[str, Any]:
    import ray

    from unet_ray.data import build_datasets

    train = build_datasets(prepared, s.image_size, augment=True)["train"]

    def one_pass() -> tuple[int, float]:
        start, n = time.perf_counter(), 0
        for batch in train.iter_batches(batch_size=64):
            n += len(batch["image"])
        return n, time.perf_counter() - start

    one_pass()  # warm-up: worker processes start and import albumentations
    passes = [one_pass() for _ in range(s.data_epochs)]
    images, seconds = sum(n for n, _ in passes), sum(t for _, t in passes)
    cpus = ray.cluster_resources().get("CPU", 0)
    return {
        "images_per_s": images / seconds,
        "ray_cpus": cpus,
        "images_per_s_per_core": images / seconds / cpus,
        "seconds_per_pass": [t for _, t in passes],
        "images_per_pass": passes[0][0],
        "ray_data_stats_last_pass": train.stats(),  # where the time went, operator by operator
    }


def single_process_augment(s: Settings, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The same augmentation, batches of 64, in this process: one core, no Ray."""
    from unet_ray.transforms import JointAugment

    augment = JointAugment(s.image_size)
    n = len(arrays["image"])

    def one_pass() -> tuple[int, float]:
        start = time.perf_counter()
        for i in range(0, n, 64):
            augment({"image": arrays["image"][i : i + 64], "mask": arrays["mask"][i : i + 64]})
        return n, time.perf_counter() - start

    one_pass()
    passes = [one_pass() for _ in range(s.data_epochs)]
    return {"images_per_s": sum(p[0] for p in passes) / sum(p[1] for p in passes)}


def synthetic_arrays(n: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n synthetic pairs as prepared rows ({"image": (n,S,S,3), "mask": (n,S,S)} uint8, road ids),
    made in this process as `prepare` makes them (JPEG decode, palette, resize), without Ray."""
    from unet_ray import palette, pairs
    from unet_ray.transforms import resize_pair

    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        pair = pairs.decode_pair(pairs.synth_pair_bytes(rng), f"synthetic_{i}")
        photo, ids = resize_pair(pair.photo, pair.train_ids, image_size)
        images.append(photo)
        masks.append(palette.to_label_set(ids, "road"))
    return {"image": np.stack(images), "mask": np.stack(masks)}


def augment_per_core(arrays: dict[str, np.ndarray], seconds: float = 3.0) -> dict[str, Any]:
    """The augment stage (`transforms.JointAugment`, batches of 64) on one core: this process pinned
    to one CPU and OpenCV to one thread, for `seconds` after one warm-up batch. Images/s per core:
    how many cores it takes to feed a GPU."""
    import cv2

    from unet_ray.transforms import JointAugment

    size = arrays["image"].shape[1]
    augment = JointAugment(size)
    batch = {"image": arrays["image"][:64], "mask": arrays["mask"][:64]}
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = cv2.getNumThreads()
    try:
        if affinity:
            os.sched_setaffinity(0, {min(affinity)})
        cv2.setNumThreads(1)
        augment(batch)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            augment(batch)
            n += len(batch["image"])
        elapsed = time.perf_counter() - start
    finally:
        cv2.setNumThreads(threads)
        if affinity:
            os.sched_setaffinity(0, affinity)
    return {"image_size": size, "images_per_s_per_core": n / elapsed, "images": n, "pinned_to_one_cpu": bool(affinity)}


# ---------------------------------------------------------------------------------------------
# 3. start-up
# ---------------------------------------------------------------------------------------------


def startup(s: Settings, prepared: Path, storage: Path) -> dict[str, Any]:
    """`s.startup_runs` cold starts one after the other: the figures of the median run, and every
    run's launch-to-first-step time."""
    runs = [one_startup(s, prepared, storage, f"startup_{i}") for i in range(s.startup_runs)]
    runs.sort(key=lambda run: run["to_first_step_s"])
    return {**runs[len(runs) // 2], "runs_to_first_step_s": [run["to_first_step_s"] for run in runs]}


def one_startup(s: Settings, prepared: Path, storage: Path, name: str) -> dict[str, Any]:
    """Launch `unet-ray train` as a user would (its own local Ray, 2 workers) and time how long it
    takes until the end of its first optimizer step.

    The workers report, with epoch 1, the unix time the epoch began (`epoch_started_at`) and how
    long its first step took to end from there (`first_step_s`: the wait for the first batch plus
    one step); the other marks come from the command's progress lines.
    """
    from unet_ray.train import read_history

    cmd = [
        sys.executable, "-m", "unet_ray.cli", "train", "--data", str(prepared), "--image-size", str(s.image_size),
        "--depth", str(s.depth), "--base-channels", str(s.base_channels), "--batch-size", str(s.batch_size),
        "--epochs", "1", "--workers", "2", "--storage-path", str(storage), "--name", name, "--max-failures", "0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cold start: its own local Ray
    env["PYTHONUNBUFFERED"] = "1"  # progress lines arrive when printed, so their times mean something
    markers = {
        "ray_started_s": "ray: started",
        "data_ready_s": "data: ",
        "worker_group_started_s": "Started training worker group",
    }
    seen: dict[str, float] = {}
    tail: list[str] = []
    launched = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killer = threading.Timer(600, proc.kill)  # bounded: a hung run cannot stall the benchmark
    killer.start()
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            for key, text in markers.items():
                if key not in seen and text in line:
                    seen[key] = time.time() - launched
        code = proc.wait()
    finally:
        killer.cancel()
    total = time.time() - launched
    if code != 0:
        raise RuntimeError(f"unet-ray train exited {code}:\n{''.join(tail)}")
    first = read_history(storage / name)[0]
    return {
        "to_first_step_s": first["epoch_started_at"] + first["first_step_s"] - launched,
        "to_training_loop_s": first["epoch_started_at"] - launched,
        "first_step_s": first["first_step_s"],
        "first_epoch_seconds": first["epoch_seconds"],
        "process_total_s": total,
        **seen,
        "note": "prepared data given (no prepare step); 2 workers; 'first step' = the end of the first optimizer step",
    }


def tune_trial_startup(s: Settings, prepared: Path, storage: Path) -> dict[str, Any]:
    """A 1-epoch sweep of `s.tune_trials` trials (`unet_ray.tune.run_sweep`, what `unet-ray tune`
    runs) in the benchmark's Ray: per trial, seconds from the trial's start to the end of its first
    optimizer step (the trial's start from Tune's timestamp and time_total_s at its first report)."""
    import yaml

    from unet_ray.tune import load_sweep, run_sweep

    sweep_yaml = storage / "startup_sweep.yaml"
    storage.mkdir(parents=True, exist_ok=True)
    sweep_yaml.write_text(yaml.safe_dump({
        "data": {"path": str(prepared), "image_size": s.image_size},
        "model": {"base_channels": s.base_channels},
        "optim": {"epochs": 1, "batch_size": s.batch_size},
        "run": {"workers": 1, "storage_path": str(storage), "name": "startup_sweep"},
        "search": {"lr": {"loguniform": [1e-4, 1e-2]}, "depth": {"choice": [s.depth]}},
        "tune": {"num_samples": s.tune_trials, "scheduler": "fifo", "seed": 0},
    }))  # fmt: skip
    start = time.perf_counter()
    run_sweep(load_sweep(sweep_yaml), progress=log)
    wall = time.perf_counter() - start
    per_trial = []
    for result_file in sorted((storage / "startup_sweep").glob("*/result.json")):
        first = json.loads(result_file.read_text().splitlines()[0])
        # Tune's `timestamp` is whole seconds at the report; +0.5 centres its rounding error
        trial_started = first["timestamp"] + 0.5 - first["time_total_s"]
        per_trial.append(first["epoch_started_at"] + first["first_step_s"] - trial_started)
    if not per_trial:
        raise RuntimeError(f"the start-up sweep in {storage} recorded no trial result")
    return {"trial_to_first_step_s": per_trial, "sweep_wall_s": wall, "trials": len(per_trial)}


# ---------------------------------------------------------------------------------------------
# 4. accuracy for time on real pairs
# ---------------------------------------------------------------------------------------------


def real_data_split(source: Path, target: Path, n_val: int = 100) -> Path:
    """A pairs folder with train/ and val/ of symlinks: the last n_val files by numeric name are val."""
    files = sorted(source.glob("*.jpg"), key=lambda p: (int(p.stem) if p.stem.isdigit() else float("inf"), p.name))
    if len(files) <= n_val:
        raise ValueError(f"{source}: {len(files)} pair JPEGs; need more than {n_val}")
    for split, chunk in (("train", files[:-n_val]), ("val", files[-n_val:])):
        (target / split).mkdir(parents=True)
        for f in chunk:
            (target / split / f.name).symlink_to(f.resolve())
    return target


def accuracy_for_time(s: Settings, source: Path, work: Path) -> dict[str, Any]:
    from unet_ray.train import read_history, run_dir_of, run_training

    pairs_dir = real_data_split(source, work / "real_pairs")
    cfg = train_config(s, str(pairs_dir), work / "runs", "real", 2, s.real_data_epochs)
    start = time.perf_counter()
    summary = run_training(cfg, progress=log)
    wall = time.perf_counter() - start
    history = read_history(run_dir_of(cfg))
    return {
        "epochs": s.real_data_epochs,
        "train_pairs": len(list((pairs_dir / "train").iterdir())),
        "val_pairs": len(list((pairs_dir / "val").iterdir())),
        "best_road_iou": summary["metrics"]["val_iou"],
        "road_iou_by_epoch": [row["val_iou"] for row in history],
        "wall_s_incl_prepare": wall,
    }


# ---------------------------------------------------------------------------------------------
# 5. GPU
# ---------------------------------------------------------------------------------------------


def gpu_throughput(s: Settings, prepared_by_size: dict[int, dict[str, np.ndarray]]) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    for size, arrays in prepared_by_size.items():
        r = plain_training(s, arrays, torch.get_num_threads(), "cuda", image_size=size)
        out[f"images_per_s_{size}px_bf16_channels_last"] = r["images_per_s"]
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _ray_key(workers: int) -> str:
    return f"ray_{workers}_worker{'s' * (workers > 1)}"  # ray_1_worker, ray_2_workers


def markdown(result: dict[str, Any]) -> str:
    tr, dat, st = result["training"], result["data"], result["startup"]
    rows = [
        *((f"Ray path, {w} worker{'s' * (w > 1)} (img/s)", tr[_ray_key(w)]["images_per_s"], "")
          for w in result["settings"]["ray_workers"]),
        (f"plain PyTorch loop, {tr['plain']['torch_threads']} threads (img/s)", tr["plain"]["images_per_s"], ""),
        ("**ratio best Ray / plain**", result["ratio_ray_vs_plain"], f">= {TARGETS['ratio_ray_vs_plain']}"),
        (f"Ray Data read+augment (img/s, {dat['ray']['ray_cpus']:g} CPUs)", dat["ray"]["images_per_s"], ""),
        ("**Ray Data img/s per core**", result["data_images_per_s_per_core"], f">= {TARGETS['data_images_per_s_per_core']:g}"),
        ("same augment, 1 process, no Ray (img/s)", dat["single_process"]["images_per_s"], ""),
        ("**augment at 256 px, img/s per core** (1 CPU, 1 OpenCV thread)", result["augment_256px_images_per_s_per_core"],
         f">= {TARGETS['augment_256px_images_per_s_per_core']:g}"),
        (f"**start-up: launch to end of first step (s, median of {len(st['runs_to_first_step_s'])})**",
         st["to_first_step_s"], f"<= {TARGETS['startup_to_first_step_s']:g}"),
        ("start-up: launch to local Ray started (s)", st.get("ray_started_s", float("nan")), ""),
        ("start-up: launch to data ready (s)", st.get("data_ready_s", float("nan")), ""),
        ("start-up: launch to training workers started (s)", st.get("worker_group_started_s", float("nan")), ""),
        ("start-up: launch to training loop (s)", st["to_training_loop_s"], ""),
        ("start-up per Tune trial: trial start to first step (s, mean)",
         float(np.mean(result["tune_startup"]["trial_to_first_step_s"])), ""),
        ("prepare (s)", result["prepare_s"], ""),
    ]
    acc = result.get("accuracy_for_time", {})
    if "best_road_iou" in acc:
        rows += [
            (f"real data: best road IoU after {acc['epochs']} epochs", acc["best_road_iou"], ""),
            ("real data: wall time incl. prepare (s)", acc["wall_s_incl_prepare"], ""),
        ]
    for key, value in result["gpu"].items():
        if key.startswith("images_per_s"):
            rows.append((f"GPU {key}", value, ""))
    s = result["settings"]
    head = (
        f"# unet_ray benchmark: {result['machine']}\n\n"
        f"{result['mode']} mode, {s['image_size']}px, depth {s['depth']}, base {s['base_channels']}, "
        f"batch {s['batch_size']}, {s['n_train']} train images; {result['cpus']} CPUs; "
        f"{result['timestamp']}. GPU: {result['gpu'].get('skipped', result['gpu'].get('device'))}.\n\n"
        "| measurement | value | target |\n|---|---:|---:|\n"
    )
    return head + "".join(f"| {name} | {value:.3g} | {target} |\n" for name, value, target in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings (< 3 min on 2 cores)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for <machine>.json and .md")
    parser.add_argument("--real-data", help="folder of real pair JPEGs (no train/val subfolders) for accuracy-for-time")
    parser.add_argument("--streaming", action="store_true",
                        help="compare the streaming and in-memory ingest paths (images/s, driver peak RSS)")
    parser.add_argument("--data-stage", action="store_true",
                        help="the data stage's images/s per core on 1024x512 PNG input (decode, scale/crop, flip)")
    quality.add_arguments(parser)
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quality:
        if not args.real_data:
            parser.error("--quality needs --real-data DIR (a folder of pair JPEGs, e.g. the data set's train/)")
        return quality.run_quality(args, out, machine_name())
    if args.data_stage:
        from benchmarks import data_stage

        result = data_stage.run(8 if args.quick else 24, 1 if args.quick else 3)
        (out / f"{machine_name()}-data_stage.json").write_text(json.dumps(result, indent=2) + "\n")
        print(data_stage.human(result))
        return 0
    if args.streaming:
        from benchmarks.streaming import run_streaming

        return run_streaming(args.quick, out, machine_name())
    started = time.perf_counter()

    import ray
    from ray.data import DataContext

    from unet_ray import pairs
    from unet_ray.prepare import prepare
    from unet_ray.prepared_format import read_prepared_split
    from unet_ray.raysession import ensure_ray
    from unet_ray.train import plan_resources

    result: dict[str, Any] = {
        "machine": machine_name(), "mode": "quick" if args.quick else "full", "cpus": os.cpu_count(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": asdict(s), "targets": TARGETS,
    }
    with tempfile.TemporaryDirectory(prefix="unet_ray_bench_") as tmp_name:
        tmp = Path(tmp_name)
        ensure_ray(log)
        DataContext.get_current().enable_progress_bars = False
        try:
            pairs.write_synthetic(tmp / "pairs", s.n_train, s.n_val, seed=0)
            t0 = time.perf_counter()
            prepare(tmp / "pairs", tmp / "prepared", s.image_size, "road", progress=log)
            result["prepare_s"] = time.perf_counter() - t0
            prepared = tmp / "prepared"
            arrays = read_prepared_split(prepared, "train", s.image_size)

            log("data stage")
            big = replicate_prepared(prepared, tmp / f"prepared_x{s.data_copies}", s.data_copies)
            result["data"] = {"ray": ray_data_stage(s, big), "single_process": single_process_augment(s, arrays)}
            # one core at 256 px: the figure that says whether a node's CPUs can feed its GPU
            result["data"]["augment_256px_per_core"] = augment_per_core(synthetic_arrays(64, 256))
            result["augment_256px_images_per_s_per_core"] = result["data"]["augment_256px_per_core"]["images_per_s_per_core"]
            result["data_images_per_s_per_core"] = result["data"]["ray"]["images_per_s_per_core"]

            # The plain loop gets the CPU threads the Ray workers get in total (the most of the two runs).
            cpus = ray.cluster_resources().get("CPU", 0)
            threads = max(
                plan_resources(train_config(s, None, tmp, "plan", w, 1), cpus).torch_threads * w for w in s.ray_workers
            )
            log(f"plain loop, {threads} threads")
            training: dict[str, Any] = {"plain": plain_training(s, arrays, threads)}
            for workers in s.ray_workers:
                log(f"Ray training, {workers} worker(s)")
                training[_ray_key(workers)] = ray_training(s, prepared, tmp / "runs", workers)
            best = max(training[_ray_key(w)]["images_per_s"] for w in s.ray_workers)
            result["training"] = training
            result["ratio_ray_vs_plain"] = best / training["plain"]["images_per_s"]

            log(f"Tune trial start-up (a {s.tune_trials}-trial sweep)")
            result["tune_startup"] = tune_trial_startup(s, prepared, tmp / "tune")

            if args.real_data and s.real_data_epochs:
                log(f"accuracy for time on {args.real_data}")
                result["accuracy_for_time"] = accuracy_for_time(s, Path(args.real_data), tmp)
            else:
                reason = "quick mode" if args.real_data else "no --real-data given"
                result["accuracy_for_time"] = {"skipped": reason}

            gpu_sizes = {} if not _cuda() else {
                size: read_prepared_split(_prepare_at(tmp, size, prepared, s.image_size), "train", size) for size in (128, 256)
            }
            result["gpu"] = gpu_throughput(s, gpu_sizes)
        finally:
            ray.shutdown()
        log(f"start-up ({s.startup_runs} cold start(s) of `unet-ray train`)")
        result["startup"] = startup(s, prepared, tmp / "runs")
    result["total_s"] = time.perf_counter() - started

    return write_reports(out / result["machine"], result, markdown(result))


def write_reports(stem: Path, result: dict[str, Any], table: str) -> int:
    """STEM.json (every figure) and STEM.md (the table), and the table on stdout."""
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(table)
    print(table)
    log(f"wrote {stem}.json and {stem}.md in {result['total_s']:.0f}s")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _prepare_at(tmp: Path, size: int, prepared: Path, prepared_size: int) -> Path:
    from unet_ray.prepare import prepare

    if size == prepared_size:
        return prepared
    target = tmp / f"prepared_{size}"
    prepare(tmp / "pairs", target, size, "road", progress=log)
    return target


if __name__ == "__main__":
    sys.exit(main())
