"""`unet-ray`: one command with subcommands. Errors in the user's input print one clear line and
exit non-zero (so a Ray job shows FAILED); nothing here runs at import time."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from unet_ray import jsonfile

# Flags shared by train (and tune's fixed settings): flag -> (dotted config key, type, help).
TRAIN_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--data": ("data.path", str, "data folder (pairs, official Cityscapes or images/ + masks/ folders) or prepared folder, "
               "a path or a URI (s3://...); default: built-in synthetic pairs"),
    "--layout": ("data.layout", str, "what --data is: auto (detected, the default), pairs, cityscapes or folders"),
    "--val-fraction": ("data.val_fraction", float, "folders layout with one images/ + masks/: share held out for val (default 0.2)"),
    "--image-size": ("data.image_size", str, "size images are stored and trained at: S (square) or HxW, e.g. 512x1024 (default 128)"),
    "--classes": ("data.classes", str, "auto (from the layout: road for pairs, cityscapes19 for Cityscapes, classes.yaml "
                  "for folders), road (binary) or cityscapes19"),
    "--workers": ("run.workers", str, "training workers: N (default 2), or MIN-MAX for an elastic group that grows "
                  "and shrinks with the cluster"),
    "--resize-interval-s": ("run.resize_interval_s", float, "with --workers MIN-MAX: seconds between checks for room "
                            "to grow the worker group (default 60)"),
    "--cpus-per-worker": ("run.cpus_per_worker", float, "CPUs per worker (default: worked out from the cluster)"),
    "--epochs": ("optim.epochs", int, "epochs (with --time-budget: the most it may train)"),
    "--time-budget": ("optim.time_budget", float, "minutes for the whole run: after epoch 1 it plans the epochs that fit"),
    "--batch-size": ("optim.batch_size", int, "batch size per worker (default 8 on CPUs, 32 with --gpu)"),
    "--lr": ("optim.lr", float, "peak learning rate"),
    "--weight-decay": ("optim.weight_decay", float, "weight decay (decoupled with adamw)"),
    "--optimizer": ("optim.optimizer", str, "adam, adamw or sgd (Nesterov momentum)"),
    "--schedule": ("optim.schedule", str, "learning rate per step: constant, cosine, poly or onecycle"),
    "--warmup-epochs": ("optim.warmup_epochs", float, "linear warmup, in epochs (fractions allowed)"),
    "--ema-decay": ("optim.ema_decay", float, "EMA of the weights per step, validated and saved (0 = off)"),
    "--augment": ("data.augment", str, "augmentation preset: none, light, medium, strong, or scale (random scale 0.5-2x "
                  "and crop, the Cityscapes recipe)"),
    "--ingest": ("data.ingest", str, "how data reaches the workers: auto (by size), memory or streaming (Ray Data reads from storage every epoch)"),
    "--block": ("model.block", str, "UNet block: plain or residual"),
    "--upsample": ("model.upsample", str, "UNet upsampling: transpose or bilinear"),
    "--deep-supervision": ("model.deep_supervision", float, "loss weight of heads on the coarser decoder levels (deep supervision; 0 = off, the default)"),
    "--precision": ("run.precision", str, "auto (bf16 on GPUs and bf16-capable CPUs), fp32 or bf16"),
    "--dice-weight": ("optim.dice_weight", float, "weight of the soft-Dice loss term"),
    "--class-weights": ("optim.class_weights", str, "loss weights per class: auto, none or inverse_log (rare classes count more)"),
    "--depth": ("model.depth", int, "UNet depth: number of 2x down-samplings"),
    "--base-channels": ("model.base_channels", int, "channels of the first UNet level"),
    "--storage-path": ("run.storage_path", str, "where runs, checkpoints and prepared data go (local path, NFS, s3://)"),
    "--name": ("run.name", str, "run name; re-running the same storage path and name resumes"),
    "--seed": ("run.seed", int, "seed for weights and synthetic data (default 0)"),
    "--max-failures": ("run.max_failures", int, "worker-group restarts from the latest checkpoint (default 3)"),
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (sections data, model, optim, run); flags override it")
    for flag, (_, typ, text) in TRAIN_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=text)
    p.add_argument("--gpu", action="store_true", default=None, help="train on GPUs (NCCL, bf16 autocast)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model in each worker")
    p.add_argument("--no-augment", dest="augment", action="store_const", const="none", default=None, help="turn augmentation off (--augment none)")
    p.add_argument("--skip-bad-files", action="store_true", default=None, help="leave unusable pair files out (listed in skipped.txt)")
    _add_tracking_flag(p)


def _add_tracking_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking", action="append", default=None, metavar="TOOL",
                   help="also send the run to mlflow, tensorboard and/or wandb (repeat it or give a,b); where to is set "
                        "the tools' own way: MLFLOW_TRACKING_URI, WANDB_PROJECT, WANDB_MODE, ...")  # fmt: skip


def _tracking_tools(given: list[str] | None) -> list[str] | None:
    """--tracking a --tracking b,c -> [a, b, c]; None when the flag was not given."""
    return None if given is None else [tool for value in given for tool in value.replace(",", " ").split()]


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user actually gave, as {dotted key: value}."""
    values = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in TRAIN_FLAGS.items()}
    values.update({"run.gpu": args.gpu, "run.compile": args.compile, "data.augment": args.augment,
                   "data.skip_bad_files": args.skip_bad_files, "run.tracking": _tracking_tools(args.tracking)})
    return {k: v for k, v in values.items() if v is not None}


def config_from_args(args: argparse.Namespace):
    from unet_ray.config import TrainConfig, load_yaml, merge

    cfg = TrainConfig()
    if args.config:
        cfg = merge(cfg, load_yaml(args.config), args.config)
    return merge(cfg, overrides_from_args(args), "command line").validate()


def cmd_synth(args: argparse.Namespace) -> int:
    from unet_ray.config import ConfigError
    from unet_ray.pairs import write_synthetic

    if args.train < 1 or args.val < 1:
        raise ConfigError(f"--train {args.train} --val {args.val}: synthetic data needs at least 1 pair in each")
    out = write_synthetic(args.out, args.train, args.val, seed=args.seed)
    print(f"wrote {args.train} train and {args.val} val synthetic pairs to {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from unet_ray.config import ConfigError, image_size_value
    from unet_ray.prepare import needs_ray, prepare, source_layout
    from unet_ray.raysession import ensure_ray

    try:
        image_size = image_size_value(args.image_size, "--image-size")
    except ConfigError as e:  # "--image-size 0: ...", as the flag was typed
        raise ConfigError(str(e).replace("--image-size=", "--image-size ", 1).replace("'", "")) from None
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction {args.val_fraction}: must be between 0 and 1")
    check_uris(("source", args.src, True), ("output folder", args.out, False))
    found = source_layout(args.src, args.layout, args.val_fraction)  # no layout, an empty split: a DataError here, before Ray
    if needs_ray(found):
        ensure_ray()
    prepare(args.src, args.out, image_size, args.classes, args.skip_bad_files, found=found)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # every config error surfaces here, before Ray starts
    from unet_ray.summary import run_and_report

    run_and_report(cfg)
    return 0


def check_uris(*given: tuple[str, str | None, bool]) -> None:
    """Probe each (role, path or URI, must exist) that is a URI (storage.py) before any work: a bad
    URI, a missing bucket or object, refused credentials or an endpoint that does not answer stop
    the command with one line naming the URI, redacted. Local paths are checked where they are used."""
    from unet_ray import storage

    for what, uri, must_exist in given:
        if uri is not None and storage.is_uri(uri):
            storage.check(uri, must_exist=must_exist, what=what)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from unet_ray.evaluate import evaluate_checkpoint

    check_uris(("checkpoint", args.checkpoint, True), ("data", args.data, True))
    result = evaluate_checkpoint(
        args.checkpoint, args.data, args.split, args.batch_size, args.skip_bad_files, flip_tta=args.tta, layout=args.layout
    )
    print(jsonfile.dumps(result, indent=2))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from unet_ray.tune import load_sweep, run_sweep

    given = {"data.path": args.data, "run.storage_path": args.storage_path, "run.name": args.name,
             "tune.num_samples": args.num_samples, "run.tracking": _tracking_tools(args.tracking)}
    overrides = {k: v for k, v in given.items() if v is not None}
    sweep = load_sweep(args.config, overrides)  # every check runs here, before Ray starts
    run_sweep(sweep, resume=args.resume)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from unet_ray.predict import PredictionFailed, predict

    # before the model is loaded and Ray starts
    check_uris(("checkpoint", args.checkpoint, True), *(("input", i, True) for i in args.input), ("output folder", args.out, False))
    try:
        summary = predict(
            args.checkpoint, args.input, args.out, workers=args.workers, gpu=args.gpu, overlay=args.overlay,
            batch_size=args.batch_size, kind=args.input_kind, skip_existing=args.skip_existing, flip_tta=args.tta,
        )
    except PredictionFailed as e:
        print(f"unet-ray predict: error: {e}", file=sys.stderr)
        return 1
    print(jsonfile.dumps(summary, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from unet_ray.export import ExportError, export

    try:
        path = export(args.checkpoint, args.format, args.out)
    except ExportError as e:
        print(f"unet-ray export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.format} model to {path}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from unet_ray import cluster

    temp_dir = args.temp_dir or cluster.DEFAULT_TEMP_DIR
    try:
        if args.action == "up":
            started = cluster.start(temp_dir, args.port, args.dashboard_port, args.num_cpus, args.worker_nodes)
            print(cluster.submit_hint(started))
        elif args.action == "down":
            print(cluster.down(temp_dir))
        else:
            print(cluster.status_text(temp_dir))
    except cluster.ClusterError as e:
        print(f"unet-ray cluster: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from unet_ray.dashboard.results import DashboardError
    from unet_ray.dashboard.server import serve

    try:
        serve(args.results, args.host, args.port, args.refresh)
    except DashboardError as e:
        print(f"unet-ray dashboard: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from unet_ray.dashboard.report import write_report
    from unet_ray.dashboard.results import DashboardError

    try:
        path = write_report(args.results, args.out)
    except DashboardError as e:
        print(f"unet-ray report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (self-contained: open it in any browser, no network needed)")
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

    p = sub.add_parser("prepare", help="data folder (any layout) -> Parquet with Ray Data")
    p.add_argument("--src", required=True, help="data folder: pairs (train/, val/), official Cityscapes (leftImg8bit/, "
                   "gtFine/) or images/ + masks/ folders with classes.yaml; a local path or a URI (s3://...)")
    p.add_argument("--out", required=True, help="prepared folder to write: a local path or a URI (s3://...)")
    p.add_argument("--image-size", default="128", help="S (square) or HxW, e.g. 512x1024 (default 128)")
    p.add_argument("--layout", default="auto", choices=["auto", "pairs", "cityscapes", "folders"])
    p.add_argument("--val-fraction", type=float, default=0.2, help="folders layout with one images/ + masks/: share held out for val")
    p.add_argument("--classes", default="auto", choices=["auto", "road", "cityscapes19"],
                   help="auto: the layout's own (road for pairs, cityscapes19 for Cityscapes, classes.yaml for folders)")
    p.add_argument("--skip-bad-files", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train the UNet with Ray Train (DDP)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="Ray Tune sweep over lr, depth, ...; every trial a Ray Train run")
    p.add_argument("--config", required=True, help="tune YAML, e.g. tune_configs/smoke.yaml")
    p.add_argument("--data", help="data folder (pairs, Cityscapes or images/ + masks/) or prepared folder (default: built-in synthetic pairs)")
    p.add_argument("--storage-path", help="where the experiment folder goes")
    p.add_argument("--name", help="experiment name (default: the YAML's run.name or file name)")
    p.add_argument("--num-samples", type=int, help="number of trials")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    _add_tracking_flag(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a data folder (any layout) or prepared folder, as JSON")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder, state.pt, or a run folder (uses its best.json); a local path or a URI "
                        "(s3://bucket/runs/NAME, ...; fetched into a local cache)")
    p.add_argument("--data", required=True,
                   help="data folder (pairs, Cityscapes or images/ + masks/) or prepared folder: a local path or a URI (s3://bucket/data, ...)")
    p.add_argument("--layout", default="auto", choices=["auto", "pairs", "cityscapes", "folders"], help="what --data is (default: detected)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip-bad-files", action="store_true")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation: mean logits of the photo and its mirror")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="masks for photos or pair files with Ray Data: <name>_mask.png, <name>_color.png (+ IoU for pairs)",
        description="Predict class masks for any number of photos with a pool of model actors (Ray Data). "
        "Photos of any size are resized to the model's square size (area interpolation) and the masks "
        "back to each photo's size (nearest neighbour). Pair files (256x512 photo | colour mask) are "
        "predicted from their left half and scored against the right half: the IoU printed equals "
        "`unet-ray evaluate` on the same files. Unreadable files are skipped and listed in OUT/skipped.txt.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder, state.pt, or a run/Tune folder (its best.json); a local path or a URI "
                        "(s3://bucket/runs/NAME, ...; each model actor fetches it into a local cache)")
    p.add_argument("--input", required=True, nargs="+", metavar="DIR_OR_FILE",
                   help="photo files, photo folders (searched recursively), pairs folders (train/, val/) or the root "
                        "of a Cityscapes or images/ + masks/ layout (each image scored against its mask); local "
                        "paths or URIs (s3://bucket/photos, ...: the actors read the files themselves)")
    p.add_argument("--out", required=True,
                   help="output folder (also gets summary.json and skipped.txt): a local path or a URI "
                        "(s3://bucket/masks, ...: the actors write the PNGs there)")
    p.add_argument("--workers", type=int, default=2,
                   help="model actors (default 2); with --gpu they share the GPUs, a fraction each: "
                        "one decodes its photos while another's batch runs on the GPU")
    p.add_argument("--gpu", action="store_true", help="predict on GPUs, shared by the model actors (see --workers)")
    p.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png (photo blended with the colours)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    p.add_argument("--input-kind", default="auto", choices=["auto", "photo", "pair"],
                   help="auto: a 256x512 file whose right half is a colour mask is a pair, anything else a photo")
    p.add_argument("--skip-existing", action="store_true", help="leave out files whose outputs are already in --out")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation: mean logits of the photo and its mirror")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export",
        help="a checkpoint's model as one ONNX or TorchScript file",
        description="Export the UNet alone. Input 'image': float32 (N, 3, S, S), RGB, uint8 / 127.5 - 1 "
        "(the same preprocessing as engine.to_model_input), S = the checkpoint's image size, N dynamic. "
        "Output 'logits': (N, K, S, S); K = 1 for road (road where logit > 0), else argmax over classes. "
        "Size, classes and this description are stored in the file's metadata. TorchScript is "
        "deprecated in PyTorch; prefer ONNX.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, state.pt, or a run/Tune folder (its best.json)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True, help="output file, e.g. model.onnx or model.pt")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "cluster",
        help="a local Ray cluster on 127.0.0.1 (token auth on) to try `ray job submit`: up, down, status",
        description="Start, stop or show a Ray cluster on this machine, every port on 127.0.0.1, token "
        "authentication on. A cluster is named by its --temp-dir (state and logs live there); `down` "
        "stops only that cluster's processes. For cloud clusters see cluster/README.md.",
    )
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--temp-dir", help="the cluster's folder (default /tmp/unet_ray_cluster)")
    p.add_argument("--port", type=int, default=6379, help="GCS port: RAY_ADDRESS=127.0.0.1:PORT (up; default 6379)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job submission port (up; default 8265)")
    p.add_argument("--num-cpus", type=int, help="CPUs of each node (up; default: all of this machine's)")
    p.add_argument("--worker-nodes", type=int, default=0, help="extra nodes on this machine, to try multi-node runs (up)")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser(
        "dashboard",
        help="web page of a Tune sweep or a train run (curves, IoU, best predictions), live while it runs",
        description="Serve a page over a sweep's experiment folder (<storage>/<name> of `unet-ray tune`) or a "
        "train run's folder (<storage>/<name> of `unet-ray train`) that refreshes itself while it runs. Binds "
        "to 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("--results", required=True, metavar="RESULTS_DIR", help="the sweep's or the run's folder, e.g. ~/unet_ray_results/smoke")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8050, help="port (default 8050; 0 picks a free one)")
    p.add_argument("--refresh", type=float, default=3.0, help="seconds between the page's updates (default 3)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("report", help="the dashboard of a sweep or a train run as one self-contained HTML file (no network needed)")
    p.add_argument("--results", required=True, metavar="RESULTS_DIR", help="the sweep's or the train run's folder, e.g. ~/unet_ray_results/smoke")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.set_defaults(func=cmd_report)

    for name in RAY_COMMANDS:
        sub.choices[name].add_argument(
            "-v", "--verbose", action="store_true",
            help="show everything Ray says (its INFO lines, execution plans, per-report dumps); default: a quiet console",
        )
    return parser


# Subcommands that start or join Ray: they take -v/--verbose.
RAY_COMMANDS = ("prepare", "train", "tune", "predict")


def main(argv: list[str] | None = None) -> int:
    from unet_ray.checkpoint import CheckpointError
    from unet_ray.config import ConfigError
    from unet_ray.pairs import BadPairError
    from unet_ray.prepared_format import DataError
    from unet_ray.storage import StorageError

    args = build_parser().parse_args(argv)
    if args.command in RAY_COMMANDS:
        from unet_ray import console

        console.setup(args.verbose)  # before Ray is imported: see console.py
    # StorageError: a URI that cannot be used, one line with credentials redacted
    known = (ConfigError, DataError, CheckpointError, BadPairError, StorageError, FileNotFoundError, PermissionError)
    try:
        return args.func(args)
    except known as e:
        print(f"unet-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unet-ray {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:
        import errno

        if e.errno != errno.ENOSPC:
            raise
        # the driver's own files (history.jsonl, best.json, the report) on a full disk
        print(f"unet-ray {args.command}: error: no space left on device writing {e.filename or 'the run folder'}; "
              "free space and run the same command again to resume", file=sys.stderr)  # fmt: skip
        return 1
    except Exception as e:
        from unet_ray.train import TrainingFailed

        if isinstance(e, TrainingFailed):
            print(f"unet-ray {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
