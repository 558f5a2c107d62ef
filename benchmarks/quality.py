"""Model quality benchmark: the old default recipe against today's defaults, on one fixed split
of real pairs, with several seeds each, through `unet-ray train` as users run it.

    python -m benchmarks.run --quality --real-data DIR [--out D] [--train-pairs N] [--seeds 2]
        [--classes road cityscapes19] [--old-epochs E] [--new-epochs E] [--time-budget MIN]

DIR is a folder of pair JPEGs named 1.jpg ... N.jpg (the data set's train/ folder). The split is
fixed: the last VAL_PAIRS files by number are validation, never trained or tuned on; training
takes the first --train-pairs of the rest (all by default). Every run is a fresh `unet-ray train`
process (its own local Ray), timed from launch to exit. Reported per recipe: mean and spread over
seeds of the last epoch's and the best epoch's val IoU (road IoU or 19-class mIoU), at the training
size and at the pairs' native 256x256 masks, the last epoch's model again with flip test-time
augmentation (`unet-ray evaluate --tta`), and the wall time. Writes DIR_OUT/quality.json and .md.

With --time-budget MIN every run gets the same wall clock (`unet-ray train --time-budget`, start-up
included): it trains the epochs that fit, at most --old-epochs / --new-epochs, and the table says
how many each seed trained. Without it the recipes compare at those fixed epoch counts.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

VAL_PAIRS = 375  # files 2601-2975 of the 2975 Cityscapes training pairs
# The defaults of unet_ray before the recipe work (issue 13), spelled out so that the benchmark
# keeps measuring them after the defaults change.
OLD_RECIPE: dict[str, dict[str, Any]] = {
    "data": {"augment": "medium"},
    "model": {"block": "plain", "upsample": "transpose", "depth": 4, "base_channels": 16},
    "optim": {
        "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant", "warmup_epochs": 0.0,
        "ema_decay": 0.0, "batch_size": 16, "dice_weight": 0.0, "class_weights": "none",
    },
    "run": {"precision": "fp32"},
}  # fmt: skip
NEW_RECIPE: dict[str, dict[str, Any]] = {}  # today's defaults: whatever `unet-ray train` does without flags
PROGRESS_LINES = ("[unet-ray] epoch ", "[unet-ray] time budget")  # what a run shows while it trains


def log(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


def fixed_split(source: Path, target: Path, train_pairs: int | None, val_pairs: int = VAL_PAIRS) -> Path:
    """train/ and val/ of symlinks: val = the last `val_pairs` files by number, train = the first
    `train_pairs` of the others (all when None)."""
    files = sorted(source.glob("*.jpg"), key=lambda p: (int(p.stem) if p.stem.isdigit() else float("inf"), p.name))
    if len(files) <= val_pairs:
        raise SystemExit(f"{source}: {len(files)} pair JPEGs; the fixed split needs more than {val_pairs}")
    train, val = files[:-val_pairs], files[-val_pairs:]
    if train_pairs is not None:
        train = train[:train_pairs]
    for split, chunk in (("train", train), ("val", val)):
        folder = target / split
        folder.mkdir(parents=True, exist_ok=True)
        for f in chunk:
            link = folder / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return target


def train_once(
    recipe: dict[str, Any],
    data: Path,
    storage: Path,
    name: str,
    classes: str,
    epochs: int,
    seed: int,
    timeout_s: float,
    time_budget: float | None = None,
) -> dict[str, Any]:
    """One `unet-ray train` run of `recipe`; its history's last and best epochs and its wall time.

    `epochs`: how many it trains, or with `time_budget` (minutes) the most it may train."""
    config = {section: dict(values) for section, values in recipe.items()}
    config.setdefault("data", {}).update({"path": str(data), "classes": classes})
    config.setdefault("optim", {})["epochs"] = epochs
    if time_budget is not None:
        config["optim"]["time_budget"] = time_budget
    config.setdefault("run", {}).update({"seed": seed, "storage_path": str(storage), "name": name, "max_failures": 0})
    config_file = storage / f"{name}.yaml"
    storage.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    returncode, output_tail = run_showing_epochs(["unet-ray", "train", "--config", str(config_file)], name, timeout_s)
    wall = time.perf_counter() - start
    if returncode != 0:
        raise RuntimeError(f"{name} failed (exit {returncode}):\n" + "\n".join(output_tail))
    history = [json.loads(line) for line in (storage / name / "history.jsonl").read_text().splitlines() if line]
    last = history[-1]
    best = max(history, key=lambda row: row["val_iou"])
    return {
        "seed": seed,
        "epochs": len(history),  # trained; fewer than asked where a time budget ended the run
        "wall_s": wall,
        "last": _figures(last),
        # the last epoch's model as `unet-ray evaluate --tta` scores it: evaluation only, outside the
        # wall time and the time budget (flip TTA doubles the cost of inference, not of training)
        "last_tta": flip_tta_figures(storage / name, data, len(history)),
        "best": _figures(best),
        "best_epoch": best["epoch"],
        "val_iou_by_epoch": [row["val_iou"] for row in history],
    }


def run_showing_epochs(command: list[str], name: str, timeout_s: float) -> tuple[int, list[str]]:
    """Run `command`, passing its epoch and time-budget lines on to the log as they come (a run
    takes up to 20 minutes); (exit code, its last lines of output). Killed after `timeout_s`."""
    # its own process group, so that a timeout or an interrupt also stops the local Ray it started
    # (which holds the pipe open); a run left behind would slow every later run on the machine
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        os.killpg(process.pid, signal.SIGKILL)

    timer = threading.Timer(timeout_s, stop)
    timer.start()
    tail: collections.deque[str] = collections.deque(maxlen=60)
    try:
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            if line.startswith(PROGRESS_LINES):
                log(f"{name}: {line.removeprefix('[unet-ray] ')}")
        returncode = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:  # interrupted (Ctrl-C: its own session does not get the SIGINT)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if timed_out.is_set():
        tail.append(f"[quality] killed after the run timeout of {timeout_s:.0f} s (--run-timeout-s)")
    return returncode, list(tail)


def flip_tta_figures(run_folder: Path, data: Path, last_epoch: int) -> dict[str, Any]:
    """Val figures of the run's last checkpoint with flip test-time augmentation."""
    from unet_ray.checkpoint import latest_checkpoint
    from unet_ray.evaluate import evaluate_checkpoint

    scores = evaluate_checkpoint(latest_checkpoint(run_folder), data, "val", flip_tta=True)
    if scores["epoch"] != last_epoch:  # the last epoch's checkpoint is always kept (run.keep_checkpoints)
        raise RuntimeError(f"{run_folder}: latest checkpoint is of epoch {scores['epoch']}, the run trained {last_epoch}")
    return _figures(scores)


def _figures(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "val_iou": row["val_iou"],
        "val_iou_native": row.get("val_iou_native"),
        "val_pixel_accuracy": row["val_pixel_accuracy"],
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread (max - min) over seeds of each figure."""

    def stat(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "spread": max(values) - min(values), "values": values}

    out: dict[str, Any] = {"wall_s": stat([r["wall_s"] for r in runs])}
    for which in ("last", "last_tta", "best"):
        for key in ("val_iou", "val_iou_native"):
            values = [r[which][key] for r in runs if which in r and r[which][key] is not None]
            if values:
                out[f"{which}_{key}"] = stat(values)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Quality benchmark, {result['timestamp']}, {result['machine']}: {result['train_pairs']} train pairs, "
        f"{result['val_pairs']} val pairs (files {result['val_files']}, never tuned on), 128 px, "
        f"{result['seeds']} seed(s) per row; mean ± spread (max - min).",
        "",
        "| label set | recipe | epochs trained | wall time | last epoch IoU | last, native 256 px "
        "| last, flip TTA | last, flip TTA, native | best epoch IoU | best, native |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(summary: dict[str, Any], key: str, digits: int = 3) -> str:
        if key not in summary:
            return "—"
        return f"{summary[key]['mean']:.{digits}f} ± {summary[key]['spread']:.{digits}f}"

    for classes, recipes in result["results"].items():
        for recipe, row in recipes.items():
            s = row["summary"]
            wall = s["wall_s"]
            epochs = " / ".join(str(run["epochs"]) for run in row["runs"])  # per seed
            lines.append(
                f"| {classes} | {recipe} | {epochs} | {wall['mean'] / 60:.1f} min | {cell(s, 'last_val_iou')} | "
                f"{cell(s, 'last_val_iou_native')} | {cell(s, 'last_tta_val_iou')} | {cell(s, 'last_tta_val_iou_native')} | "
                f"{cell(s, 'best_val_iou')} | {cell(s, 'best_val_iou_native')} |"
            )
    lines.append("")
    if result.get("time_budget"):
        lines.append(
            f"Every run had the same time budget, {result['time_budget']:g} min of wall clock (`--time-budget`, "
            "start-up included), and trained the epochs that fit (epochs trained: one figure per seed)."
        )
    lines.append("IoU: road IoU for `road`, mean IoU over the 19 classes for `cityscapes19`.")
    lines.append(
        "Flip TTA: the last epoch's model evaluated as `unet-ray evaluate --tta` does (mean logits of the photo "
        "and its mirror); evaluation only, not counted in the wall time."
    )
    return "\n".join(lines) + "\n"


def run_quality(args, out: Path, machine: str) -> int:
    if args.time_budget is not None and args.time_budget <= 0:
        raise SystemExit(f"--time-budget {args.time_budget}: minutes per run, must be > 0")
    if args.seeds < 1:
        raise SystemExit(f"--seeds {args.seeds}: must be at least 1")
    if args.val_pairs < 1:
        raise SystemExit(f"--val-pairs {args.val_pairs}: must be at least 1")
    source = Path(args.real_data).expanduser()
    work = out / "quality_work"
    data = fixed_split(source, work / "pairs", args.train_pairs, args.val_pairs)
    n_train = len(list((data / "train").iterdir()))
    files = sorted((data / "val").iterdir(), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)
    result: dict[str, Any] = {
        "machine": machine,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_pairs": n_train,
        "val_pairs": len(files),
        "val_files": f"{files[0].name}-{files[-1].name}",
        "seeds": args.seeds,
        "time_budget": args.time_budget,  # minutes per run, or None: fixed epoch counts
        "results": {},
    }
    recipes = {
        f"{which} defaults": (recipe, epochs)
        for which, recipe, epochs in (("old", OLD_RECIPE, args.old_epochs), ("new", NEW_RECIPE, args.new_epochs))
        if which in args.recipes
    }
    for classes in args.classes:
        prepared = work / f"prepared_{classes}"
        if not (prepared / "meta.json").is_file():
            log(f"preparing {data} for {classes}")
            done = subprocess.run(
                ["unet-ray", "prepare", "--src", str(data), "--out", str(prepared), "--classes", classes],
                capture_output=True, text=True,
            )
            if done.returncode != 0:  # say why, not only that it failed
                raise SystemExit(f"unet-ray prepare of {data} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        rows = result["results"][classes] = {label: {"max_epochs": epochs, "runs": []} for label, (_, epochs) in recipes.items()}
        # Seed by seed, each recipe in turn: the VM's speed drifts over an hour, and a time budget
        # turns that into epochs, so one recipe's runs must not all fall on a slow stretch.
        for seed in range(args.seeds):
            for label, (recipe, epochs) in recipes.items():
                name = f"{classes}_{label.split()[0]}_s{seed}"
                budget = f", time budget {args.time_budget:g} min" if args.time_budget else ""
                log(f"{name}: {'at most ' if budget else ''}{epochs} epochs{budget}")
                run = train_once(
                    recipe, prepared, work / "runs", name, classes, epochs, seed, args.run_timeout_s, args.time_budget
                )
                log(f"{name}: last {run['last']['val_iou']:.4f} (native {run['last']['val_iou_native']}), {run['wall_s']:.0f}s")
                rows[label]["runs"].append(run)
                rows[label]["summary"] = summarize(rows[label]["runs"])
                (out / "quality.json").write_text(json.dumps(result, indent=2))  # partial results survive a stop
    table = markdown(result)
    (out / "quality.md").write_text(table)
    print(table)
    return 0


def add_arguments(parser) -> None:
    group = parser.add_argument_group("--quality")
    group.add_argument("--quality", action="store_true", help="model quality: old vs new default recipe on --real-data")
    group.add_argument("--train-pairs", type=int, help="train on the first N pairs of the split (default: all)")
    group.add_argument("--seeds", type=int, default=2)
    group.add_argument("--classes", nargs="+", default=["road"], choices=["road", "cityscapes19"])
    group.add_argument("--recipes", nargs="+", default=["old", "new"], choices=["old", "new"])
    group.add_argument("--old-epochs", type=int, default=8)
    group.add_argument("--new-epochs", type=int, default=8)
    group.add_argument(
        "--time-budget", type=float, help="minutes of wall clock per run, the same for every recipe (epochs: the most)"
    )
    group.add_argument(
        "--val-pairs", type=int, default=VAL_PAIRS, help=f"validation: the last N files (default {VAL_PAIRS}: 2601-2975)"
    )
    group.add_argument("--run-timeout-s", type=float, default=3600)


__all__ = ["OLD_RECIPE", "add_arguments", "fixed_split", "run_quality"]
