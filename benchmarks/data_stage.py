"""`python -m benchmarks.data_stage`: the data stage's throughput per core on 1024x512 PNG pairs.

    python -m benchmarks.data_stage [--images N] [--repeats R]

Writes N synthetic 1024x512 (width x height) RGB PNG photos and 8-bit PNG class-id masks (mode
"L") into a temp folder, then, in this one process pinned to one CPU with OpenCV, OpenMP and torch
on one thread, takes every pair through the stage a training data task runs, timing each step:

- decode: `layouts.read_item` as prepare's tasks run it for an images/ + masks/ folder: both
  files' bytes (from the page cache after the warm-up pass: a local disk's cost is left out),
  PNG -> uint8 arrays with PIL, the mask's mode, size and class ids checked;
- resize: `transforms.resize_pair` to the stored size 512x1024 (h x w), a no-op check here;
- augment: the "scale" preset (`transforms.train_augmentation`: random scale 0.5-2.0, pad, crop
  of 512x1024, flip, colour jitter half the time).

One warm-up pass, then `repeats` timed passes; images/s per core (mean, spread = max - min over
the passes) for the whole stage and for each step. The synthetic photos are smooth upscaled
scenes, so their PNGs are smaller and decode faster than camera photos: the JSON keeps the mean
file sizes. Nothing is hard-coded: every figure is measured in the run.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before numpy and OpenCV load: their OpenMP pools read it once
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

STORED = (512, 1024)  # (height, width) of the files and of the stored rows
CROP = (512, 1024)  # (height, width) the augmentation crops to
PRESET = "scale"
STEPS = ("decode", "resize", "augment")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def write_pngs(folder: Path, n: int, seed: int = 0) -> list[tuple[Path, Path]]:
    """n (photo.png, ids.png) pairs at STORED, from `pairs.synth_scene` (256x256) upscaled."""
    from unet_ray import palette, pairs

    rng = np.random.default_rng(seed)
    h, w = STORED
    files = []
    for i in range(n):
        photo, colors = pairs.synth_scene(rng)
        photo = cv2.resize(photo, (w, h), interpolation=cv2.INTER_LINEAR)
        colors = cv2.resize(colors, (w, h), interpolation=cv2.INTER_NEAREST)  # palette colours stay exact
        ids = palette.decode_color_mask(colors)[0]
        files.append((folder / f"{i}_photo.png", folder / f"{i}_ids.png"))
        Image.fromarray(photo).save(files[-1][0])
        Image.fromarray(ids).save(files[-1][1])  # 2-D uint8: mode "L"
    return files


def palette_classes() -> tuple[str, ...]:
    from unet_ray import palette

    return palette.class_set("cityscapes19").names  # the ids write_pngs draws: Cityscapes train ids


def one_pass(files: list[tuple[Path, Path]], augment) -> dict[str, float]:
    """Seconds spent in each step over all pairs."""
    from unet_ray.layouts import Item, MaskCoding, read_item
    from unet_ray.transforms import resize_pair

    coding = MaskCoding("folders", num_classes=len(palette_classes()))
    seconds = dict.fromkeys(STEPS, 0.0)
    for photo_path, ids_path in files:
        t1 = time.perf_counter()
        photo, ids = read_item(Item(str(photo_path), str(ids_path), photo_path.stem), coding)
        t2 = time.perf_counter()
        photo, ids = resize_pair(photo, ids, STORED)
        t3 = time.perf_counter()
        out = augment(image=photo, mask=ids)
        t4 = time.perf_counter()
        if out["image"].shape[:2] != CROP or out["mask"].shape != CROP:
            raise AssertionError(f"augmented to {out['image'].shape} / {out['mask'].shape}, expected {CROP}")
        for step, (start, end) in zip(STEPS, ((t1, t2), (t2, t3), (t3, t4))):
            seconds[step] += end - start
    return seconds


def run(n_images: int = 24, repeats: int = 3) -> dict[str, Any]:
    """Images/s per core of the whole stage and of each step (mean, spread, every pass)."""
    from unet_ray.transforms import train_augmentation

    augment = train_augmentation(CROP, PRESET)  # imports albumentations, which imports torch
    torch = sys.modules.get("torch")
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cv2_threads, torch_threads = cv2.getNumThreads(), (torch.get_num_threads() if torch else None)
    with tempfile.TemporaryDirectory(prefix="unet_ray_data_stage_") as tmp:
        log(f"writing {n_images} synthetic {STORED[1]}x{STORED[0]} PNG pairs")
        files = write_pngs(Path(tmp), n_images)
        try:
            if affinity:  # one core even if a library starts threads of its own
                os.sched_setaffinity(0, {min(affinity)})
            cv2.setNumThreads(1)
            if torch:
                torch.set_num_threads(1)
            one_pass(files, augment)  # warm-up: page cache, lazy imports, allocator
            passes = [one_pass(files, augment) for _ in range(repeats)]
        finally:
            cv2.setNumThreads(cv2_threads)
            if torch:
                torch.set_num_threads(torch_threads)
            if affinity:
                os.sched_setaffinity(0, affinity)
        sizes = [(p.stat().st_size, m.stat().st_size) for p, m in files]

    def summary(per_pass: list[float]) -> dict[str, Any]:
        rates = [n_images / s for s in per_pass]
        return {"mean": statistics.mean(rates), "spread": max(rates) - min(rates), "passes": rates}

    per_core = {"stage": summary([sum(p.values()) for p in passes])}
    per_core.update({step: summary([p[step] for p in passes]) for step in STEPS})
    return {
        "input": {"width": STORED[1], "height": STORED[0], "format": "PNG", "images": n_images,
                  "photo_bytes_mean": statistics.mean(s[0] for s in sizes),
                  "ids_bytes_mean": statistics.mean(s[1] for s in sizes)},
        "crop": {"width": CROP[1], "height": CROP[0]},
        "preset": PRESET,
        "repeats": repeats,
        "pinned_to_one_cpu": bool(affinity),
        "images_per_s_per_core": per_core,
        "ms_per_image": {step: 1000 / v["mean"] for step, v in per_core.items()},
    }  # fmt: skip


def human(result: dict[str, Any]) -> str:
    rate = result["images_per_s_per_core"]
    steps = ", ".join(f"{step} {rate[step]['mean']:.0f}" for step in STEPS)
    return (
        f"data stage, {result['input']['width']}x{result['input']['height']} PNG -> {PRESET} crop: "
        f"{rate['stage']['mean']:.1f} images/s per core (spread {rate['stage']['spread']:.1f} over "
        f"{result['repeats']} passes of {result['input']['images']}); by step: {steps} images/s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_stage", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="synthetic pairs written and timed (default 24)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up (default 3)")
    args = parser.parse_args(argv)
    result = run(args.images, args.repeats)
    print(json.dumps(result, indent=2))
    print(human(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
