"""`unet-ray`: one command with subcommands. Errors in the user's input print one clear line and
exit non-zero (so a Ray job shows FAILED); nothing here runs at import time."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# Flags shared by train (and tune's fixed settings): flag -> (dotted config key, type, help).
TRAIN_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--data": ("data.path", str, "pairs folder (train/, val/) or prepared folder; default: built-in synthetic pairs"),
    "--image-size": ("data.image_size", int, "square size the pairs are resized to (default 128)"),
    "--classes": ("data.classes", str, "label set: road (binary) or cityscapes19"),
    "--workers": ("run.workers", int, "training workers (default 2)"),
    "--cpus-per-worker": ("run.cpus_per_worker", float, "CPUs per worker (default: worked out from the cluster)"),
    "--epochs": ("optim.epochs", int, "epochs (default 10)"),
    "--batch-size": ("optim.batch_size", int, "batch size per worker (default 16)"),
    "--lr": ("optim.lr", float, "Adam learning rate (default 1e-3)"),
    "--weight-decay": ("optim.weight_decay", float, "Adam weight decay (default 0)"),
    "--dice-weight": ("optim.dice_weight", float, "weight of the soft-Dice loss term (default 0)"),
    "--depth": ("model.depth", int, "UNet depth: number of 2x down-samplings (default 4)"),
    "--base-channels": ("model.base_channels", int, "channels of the first UNet level (default 16)"),
    "--storage-path": ("run.storage_path", str, "where runs, checkpoints and prepared data go (local path, NFS, s3://)"),
    "--name": ("run.name", str, "run name; re-running the same storage path and name resumes"),
    "--seed": ("run.seed", int, "seed for weights and synthetic data (default 0)"),
    "--max-failures": ("run.max_failures", int, "worker-group restarts from the latest checkpoint (default 3)"),
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (sections data, model, optim, run); flags override it")
    for flag, (_, typ, text) in TRAIN_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=text)
    p.add_argument("--gpu", action="store_true", default=None, help="train on GPUs (NCCL, bf16 autocast, channels_last)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None, help="turn augmentation off")
    p.add_argument("--skip-bad-files", action="store_true", default=None, help="leave unusable pair files out (listed in skipped.txt)")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user actually gave, as {dotted key: value}."""
    values = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in TRAIN_FLAGS.items()}
    values.update({"run.gpu": args.gpu, "data.augment": args.augment, "data.skip_bad_files": args.skip_bad_files})
    return {k: v for k, v in values.items() if v is not None}


def config_from_args(args: argparse.Namespace):
    from unet_ray.config import TrainConfig, load_yaml, merge

    cfg = TrainConfig()
    if args.config:
        cfg = merge(cfg, load_yaml(args.config), args.config)
    return merge(cfg, overrides_from_args(args), "command line").validate()


def cmd_synth(args: argparse.Namespace) -> int:
    from unet_ray.pairs import write_synthetic

    out = write_synthetic(args.out, args.train, args.val, seed=args.seed)
    print(f"wrote {args.train} train and {args.val} val synthetic pairs to {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from unet_ray.prepare import prepare
    from unet_ray.train import ensure_ray

    ensure_ray()
    prepare(args.src, args.out, args.image_size, args.classes, args.skip_bad_files)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # every config error surfaces here, before Ray starts
    from unet_ray.train import run_training

    run_training(cfg)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from unet_ray.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.skip_bad_files)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unet-ray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic pairs in the users' format (train/, val/)")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=96)
    p.add_argument("--val", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="pairs folder -> Parquet with Ray Data")
    p.add_argument("--src", required=True, help="pairs folder with train/ and val/")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--classes", default="road", choices=["road", "cityscapes19"])
    p.add_argument("--skip-bad-files", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train the UNet with Ray Train (DDP)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a pairs or prepared folder, as JSON")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, state.pt, or a run folder (uses its best.json)")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip-bad-files", action="store_true")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from unet_ray.checkpoint import CheckpointError
    from unet_ray.config import ConfigError
    from unet_ray.pairs import BadPairError
    from unet_ray.prepare import DataError

    args = build_parser().parse_args(argv)
    known = (ConfigError, DataError, CheckpointError, BadPairError, FileNotFoundError)
    try:
        return args.func(args)
    except known as e:
        print(f"unet-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unet-ray {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        from unet_ray.train import TrainingFailed

        if isinstance(e, TrainingFailed):
            print(f"unet-ray {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
