"""One typed configuration for a training run, filled from defaults, then YAML, then CLI flags.

Every key is checked before any Ray work starts: an unknown key, a wrong type or an impossible
value (negative lr, a depth too deep for the image size, a missing data folder) is a ConfigError
whose message names the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unet_ray import palette

MAX_DEPTH = 7
# Names the config accepts; the code that implements each lives in transforms.py, model.py, recipe.py.
AUGMENT_PRESETS = ("none", "light", "medium", "strong", "scale")
MODEL_BLOCKS = ("plain", "residual")
UPSAMPLERS = ("transpose", "bilinear")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "poly", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16")
CLASS_WEIGHTINGS = ("auto", "none", "inverse_log")
# data.ingest: how training data reaches the workers (data.py). "memory": the driver reads the
# prepared rows once and puts them in the object store; "streaming": Ray Data read tasks on the
# cluster's nodes stream them from storage every epoch; "auto" picks by size.
INGEST_MODES = ("auto", "memory", "streaming")
TRACKING_TOOLS = ("mlflow", "tensorboard", "wandb")  # run.tracking; tracking.py sends the runs there
MIN_BOTTLENECK = 2  # pixels left at the bottom of the UNet
# Default batch per worker. 8 on CPUs (measured: larger batches gave no more images/s on 2 cores).
# 32 per GPU: 8 leaves a GPU launch-bound (the default model at 256 px is small); the learning
# rate stays at its default (AdamW's step size does not grow with the batch as SGD's does; the
# warmup covers the start); on a GPU, search lr first (tune_configs/lr_depth.yaml).
CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 32
# Search keys of a Tune YAML's `search:` section and the config field each one sets (here, low,
# so that the dashboard can order a sweep's columns without importing the search).
SEARCHABLE = {
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "dice_weight": "optim.dice_weight",
    "class_weights": "optim.class_weights",
    "batch_size": "optim.batch_size",
    "depth": "model.depth",
    "base_channels": "model.base_channels",
    "optimizer": "optim.optimizer",
    "schedule": "optim.schedule",
    "warmup_epochs": "optim.warmup_epochs",
    "ema_decay": "optim.ema_decay",
    "augment": "data.augment",
    "block": "model.block",
    "upsample": "model.upsample",
    "deep_supervision": "model.deep_supervision",
}


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it."""


@dataclass
class DataSection:
    # a data folder in one of LAYOUTS (layouts.py) or a prepared folder, local or a URI; None trains
    # on built-in synthetic pairs
    path: str | None = None
    # what the folder is: auto (detected), pairs, cityscapes (leftImg8bit/ + gtFine/) or folders
    # (images/ + masks/ + classes.yaml)
    layout: str = "auto"
    # the size rows are stored and trained at: S (square) or "HxW" ("512x1024": height x width)
    image_size: int | str = 128
    # "auto": from the layout (road for pairs, cityscapes19 for cityscapes, custom for folders);
    # "road" (binary, as in the tutorial) or "cityscapes19" for pairs and cityscapes; "custom":
    # a folders layout's classes.yaml, whose names and colours the run copies into class_names and
    # class_colors (so that checkpoints carry them)
    classes: str = "auto"
    class_names: list[str] = field(default_factory=list)
    class_colors: list[str] = field(default_factory=list)  # "#rrggbb" per class
    val_fraction: float = 0.2  # folders layout with one images/ + masks/: the share held out for val
    augment: str = "light"  # preset: none, light, medium, strong, scale (AUGMENT_PRESETS); true = medium
    skip_bad_files: bool = False
    ingest: str = "auto"  # auto, memory or streaming (INGEST_MODES)
    synth_train: int = 96  # size of the built-in synthetic data set
    synth_val: int = 32

    @property
    def shape(self) -> tuple[int, int]:
        """image_size as (height, width)."""
        return image_shape(self.image_size)


@dataclass
class ModelSection:
    depth: int = 4  # number of 2x down-samplings
    base_channels: int = 16
    batch_norm: bool = True
    block: str = "residual"  # "plain": two 3x3 convs per level; "residual": the same with an identity shortcut
    upsample: str = "bilinear"  # "transpose": 2x2 transposed conv; "bilinear": bilinear 2x, then a 1x1 conv
    # weight of the deep-supervision loss (a 1x1 head on each coarser decoder level, training only;
    # losses.deep_supervision_loss); 0 = off. Off by default: it tied at equal wall clock (benchmarks/README)
    deep_supervision: float = 0.0


@dataclass
class OptimSection:
    epochs: int = 10  # with time_budget: the most the run may train
    # minutes of wall clock for the whole `unet-ray train` run, start-up included; None = off. After
    # epoch 1 the run plans as many epochs as fit (at most `epochs`), its schedule spans them, and
    # later epochs adjust the plan to the pace (worker.budget_plan)
    time_budget: float | None = None
    # per worker; None: 8 on CPUs, 32 on GPUs (CPU_BATCH_SIZE, GPU_BATCH_SIZE; resolved by validate)
    batch_size: int | None = None
    lr: float = 2e-3  # peak learning rate (after warmup)
    weight_decay: float = 1e-4
    dice_weight: float = 0.0  # weight of the soft-Dice term added to BCE / CE
    # loss weight per class: "inverse_log" weights each class's pixels by 1/ln(1.02 + its share of the
    # training pixels (losses.py); "auto" = inverse_log for cityscapes19, none for road; "none"
    class_weights: str = "auto"
    optimizer: str = "adamw"  # adam, adamw, sgd (momentum + Nesterov)
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # learning rate per iteration: constant, cosine, poly, onecycle (recipe.py)
    warmup_epochs: float = 0.5  # linear warmup from lr/100, in epochs (fractions allowed); onecycle warms up by itself
    ema_decay: float = 0.0  # exponential moving average of the weights per step; 0 = off. EMA weights are validated and saved


@dataclass
class RunSection:
    # an int: that many workers, fixed; "MIN-MAX" (a string, e.g. "1-2"): an elastic worker group
    # that starts once MIN workers fit, grows toward MAX as resources appear and shrinks instead of
    # failing when a node is lost (worker_range; README "Reliability"). Resource planning sizes
    # workers for MAX (max_workers); inside the worker the real world size counts.
    workers: int | str = 2
    gpu: bool = False
    cpus_per_worker: float | None = None  # None: worked out from the cluster's CPUs
    storage_path: str = "~/unet_ray_results"
    name: str = "unet"
    seed: int = 0
    max_failures: int = 3  # worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2  # best ones by val_iou; the latest is always kept as well
    # bf16 autocast: "auto" = on with a GPU and on CPUs with native bf16 (avx512_bf16 / amx: 2.4x the
    # fp32 images/s measured on a 2-core EPYC), else fp32; "fp32" or "bf16" force it. Training runs
    # channels_last in every precision
    precision: str = "auto"
    compile: bool = False  # torch.compile the model in each worker (first step slower, later ones faster)
    # experiment tracking, any of mlflow, tensorboard, wandb (tracking.py); where to send is set the
    # tools' own way (MLFLOW_TRACKING_URI, WANDB_PROJECT, WANDB_MODE, ...). TensorBoard event files
    # are written into every run folder anyway; naming it adds the config to its HParams tab
    tracking: list[str] = field(default_factory=list)
    # elastic runs (workers "MIN-MAX"): seconds between Ray Train's checks for room to grow the
    # worker group (ScalingConfig.elastic_resize_monitor_interval_s; Ray's default 60). A resize
    # restarts the group from the latest checkpoint, so a short interval costs restarts
    resize_interval_s: float = 60.0

    @property
    def min_workers(self) -> int:
        return worker_range(self.workers)[0]

    @property
    def max_workers(self) -> int:
        return worker_range(self.workers)[1]

    @property
    def elastic(self) -> bool:
        low, high = worker_range(self.workers)
        return low != high


@dataclass
class TrainConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("data", "model", "optim", "run")

    @classmethod
    def from_dict(cls, values: dict[str, Any], origin: str = "config") -> "TrainConfig":
        return merge(cls(), values, origin)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, check_paths: bool = True) -> "TrainConfig":
        if self.optim.batch_size is None:
            self.optim.batch_size = GPU_BATCH_SIZE if self.run.gpu else CPU_BATCH_SIZE
        _validate(self, check_paths)
        return self

    @property
    def class_set(self) -> palette.ClassSet:
        """The classes the model predicts. data.classes "auto" must be resolved from the data first
        (data.check_source; a run does it before Ray starts). The built-in data are pairs: road."""
        d = self.data
        if d.classes == "auto" and d.path is None:
            return palette.class_set("road")
        if d.classes == "auto":
            raise ConfigError("data.classes=auto is decided by the data's layout; resolve it first (data.check_source)")
        colors = [palette.parse_color(c) for c in d.class_colors]
        return palette.class_set(d.classes, d.class_names, colors)

    @property
    def num_classes(self) -> int:
        return len(self.class_set)

    @property
    def class_weighting(self) -> str:
        """optim.class_weights with "auto" resolved: inverse_log where there are rare classes to
        lift (cityscapes19: +3 points of mIoU on the full set), none for the two-class road task (road is
        38 % of the pixels; its errors on other cities are mostly false road already)."""
        if self.optim.class_weights != "auto":
            return self.optim.class_weights
        return "none" if self.num_classes == 2 else "inverse_log"

    def with_classes(self, label_set: str, class_set: "palette.ClassSet | None" = None) -> None:
        """Set data.classes (resolved from "auto"); "custom" copies the data set's names and colours."""
        self.data.classes = label_set
        if label_set == "custom" and class_set is not None:
            self.data.class_names = list(class_set.names)
            self.data.class_colors = [palette.color_hex(c) for c in class_set.colors]


def merge(cfg: TrainConfig, values: dict[str, Any], origin: str) -> TrainConfig:
    """A copy of cfg with `values` ({section: {key: value}} or {"section.key": value}) applied."""
    cfg = TrainConfig(**{s: dataclasses.replace(getattr(cfg, s)) for s in TrainConfig.SECTIONS})
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections ({', '.join(TrainConfig.SECTIONS)})")
    for key, value in values.items():
        if "." in key:
            section, name = key.split(".", 1)
            _set(cfg, section, name, value, origin)
            continue
        if key not in TrainConfig.SECTIONS:
            raise ConfigError(f"{origin}: unknown section {key!r}; known: {', '.join(TrainConfig.SECTIONS)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: section {key!r} must be a mapping, got {value!r}")
        for name, v in value.items():
            _set(cfg, key, name, v, origin)
    return cfg


def worker_range(value: Any, where: str = "run.workers") -> tuple[int, int]:
    """(MIN, MAX) of run.workers: an int N is (N, N), a fixed group; "MIN-MAX" an elastic one;
    "N" (a flag or YAML string) is N. A ConfigError names anything else, or MIN > MAX, or MIN < 1."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and value.strip().isdigit():
        low = high = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", value):
        low, high = (int(part) for part in value.split("-"))
    else:
        raise ConfigError(f"{where}={value!r}: give a number of workers (2) or a range MIN-MAX (1-4)")
    if low < 1:
        raise ConfigError(f"{where}={value!r}: must be >= 1")
    if low > high:
        raise ConfigError(f"{where}={value!r}: MIN must not be above MAX")
    return low, high


def _workers_value(value: Any, where: str) -> int | str:
    """run.workers as stored: an int for a fixed group (also "2" and "2-2"), "MIN-MAX" for a range."""
    low, high = worker_range(value, where)
    return low if low == high else f"{low}-{high}"


def _set(cfg: TrainConfig, section: str, name: str, value: Any, origin: str) -> None:
    if section not in TrainConfig.SECTIONS:
        raise ConfigError(f"{origin}: unknown section {section!r}; known: {', '.join(TrainConfig.SECTIONS)}")
    obj = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        raise ConfigError(f"{origin}: unknown key {section}.{name}; known in {section}: {', '.join(fields)}")
    hint = typing.get_type_hints(type(obj))[name]
    if (section, name) == ("data", "augment") and isinstance(value, bool):
        value = "medium" if value else "none"  # the earlier on/off switch: on was today's medium
    if (section, name) == ("run", "workers"):  # int | str: coerce would take the first type only
        setattr(obj, name, _workers_value(value, f"{origin}: run.workers"))
        return
    if (section, name) == ("data", "image_size"):
        setattr(obj, name, image_size_value(value, f"{origin}: data.image_size"))
        return
    setattr(obj, name, coerce(value, hint, f"{origin}: {section}.{name}"))


def coerce(value: Any, hint: Any, where: str) -> Any:
    """value as the annotated type, or a ConfigError. YAML reads `1e-3` as a string: accept it."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            try:  # "--3" and "²" pass the check above but are no int: fall through to ConfigError
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(hint) is list:  # a YAML list, or "a,b" / "a b" from a flag
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if isinstance(value, (list, tuple)):
            return [coerce(v, typing.get_args(hint)[0], where) for v in value]
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 2048
LAYOUTS = ("auto", "pairs", "cityscapes", "folders")  # data.layout (layouts.py reads them)
CLASS_CHOICES = ("auto", *palette.LABEL_SETS, "custom")


def image_shape(value: Any, where: str = "data.image_size") -> tuple[int, int]:
    """(height, width) of an image size: S or "S" (square), "HxW", [H, W]; a ConfigError naming
    the value otherwise or when a side is not positive."""
    if isinstance(value, int) and not isinstance(value, bool):
        shape = (value, value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        shape = (int(value), int(value))
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", value):
        h, w = re.split(r"[xX]", value)
        shape = (int(h), int(w))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        shape = (value[0], value[1])
    else:
        raise ConfigError(f"{where}: expected a size S (square) or HEIGHTxWIDTH (e.g. 512x1024), got {value!r}")
    if min(shape) < 1:
        raise ConfigError(f"{where}={value}: must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} (each side)")
    return shape


def image_size_value(value: Any, where: str = "data.image_size", bounded: bool = True) -> int | str:
    """An image size as stored: an int for a square, "HxW" otherwise (so 512 == "512x512"); with
    `bounded`, a ConfigError when a side is outside MIN_IMAGE_SIZE..MAX_IMAGE_SIZE."""
    h, w = image_shape(value, where)
    if bounded and not all(MIN_IMAGE_SIZE <= side <= MAX_IMAGE_SIZE for side in (h, w)):
        raise ConfigError(f"{where}={value}: must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} (each side)")
    return h if h == w else f"{h}x{w}"


def _validate(cfg: TrainConfig, check_paths: bool) -> None:
    d, m, o, r = cfg.data, cfg.model, cfg.optim, cfg.run

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(d.classes in CLASS_CHOICES, f"data.classes={d.classes!r}: choose one of {', '.join(CLASS_CHOICES)}")
    need(d.layout in LAYOUTS, f"data.layout={d.layout!r}: choose one of {', '.join(LAYOUTS)}")
    if d.path is None:  # built-in synthetic pairs
        need(d.layout in ("auto", "pairs"), f"data.layout={d.layout}: needs data.path (the built-in data are pairs)")
        d.layout = "pairs"
        d.classes = "road" if d.classes == "auto" else d.classes
    if d.classes == "custom":
        need(len(d.class_names) >= 2, "data.classes=custom: needs data.class_names (2 or more; a folders layout's classes.yaml gives them)")
        need(len(d.class_colors) == len(d.class_names), f"data.class_colors: {len(d.class_colors)} colours for {len(d.class_names)} class names")
        for color in d.class_colors:
            try:
                palette.parse_color(color)
            except ValueError as e:
                raise ConfigError(f"data.class_colors: {e}") from None
    need(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction}: must be between 0 and 1")
    d.image_size = image_size_value(d.image_size)  # a ConfigError naming the value
    height, width = d.shape
    need(d.synth_train >= 1 and d.synth_val >= 1, "data.synth_train and data.synth_val must be >= 1")
    need(1 <= m.depth <= MAX_DEPTH, f"model.depth={m.depth}: must be between 1 and {MAX_DEPTH}")
    need(
        all(side % (2**m.depth) == 0 and side // 2**m.depth >= MIN_BOTTLENECK for side in (height, width)),
        f"model.depth={m.depth} is too deep for data.image_size={d.image_size}: each side must be a multiple "
        f"of 2**depth={2**m.depth} and leave at least {MIN_BOTTLENECK} pixels at the bottom",
    )
    need(d.ingest in INGEST_MODES, f"data.ingest={d.ingest!r}: choose one of {', '.join(INGEST_MODES)}")
    need(d.augment in AUGMENT_PRESETS, f"data.augment={d.augment!r}: choose one of {', '.join(AUGMENT_PRESETS)}")
    need(m.block in MODEL_BLOCKS, f"model.block={m.block!r}: choose one of {', '.join(MODEL_BLOCKS)}")
    need(m.upsample in UPSAMPLERS, f"model.upsample={m.upsample!r}: choose one of {', '.join(UPSAMPLERS)}")
    need(o.optimizer in OPTIMIZERS, f"optim.optimizer={o.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    need(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    need(0 <= o.momentum < 1, f"optim.momentum={o.momentum}: must be in [0, 1)")
    need(o.epochs >= 1, f"optim.epochs={o.epochs}: must be >= 1")
    need(0 <= o.warmup_epochs < o.epochs, f"optim.warmup_epochs={o.warmup_epochs}: must be >= 0 and below optim.epochs={o.epochs}")
    need(0 <= o.ema_decay < 1, f"optim.ema_decay={o.ema_decay}: must be in [0, 1) (0 turns the EMA off)")
    need(r.precision in PRECISIONS, f"run.precision={r.precision!r}: choose one of {', '.join(PRECISIONS)}")
    need(1 <= m.base_channels <= 512, f"model.base_channels={m.base_channels}: must be between 1 and 512")
    need(o.time_budget is None or o.time_budget > 0, f"optim.time_budget={o.time_budget}: minutes, must be > 0")
    need(o.batch_size >= 1, f"optim.batch_size={o.batch_size}: must be >= 1")
    need(0 < o.lr < 10, f"optim.lr={o.lr}: must be positive (and below 10)")
    need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: must be >= 0")
    need(o.dice_weight >= 0, f"optim.dice_weight={o.dice_weight}: must be >= 0")
    need(m.deep_supervision >= 0, f"model.deep_supervision={m.deep_supervision}: must be >= 0 (0 turns it off)")
    need(
        not (m.deep_supervision and m.depth < 2),
        f"model.deep_supervision={m.deep_supervision} needs model.depth >= 2 (a coarser decoder level to supervise)",
    )
    need(
        o.class_weights in CLASS_WEIGHTINGS,
        f"optim.class_weights={o.class_weights!r}: choose one of {', '.join(CLASS_WEIGHTINGS)}",
    )
    worker_range(r.workers)  # a ConfigError naming the value: 0, "3-1", "a-b"
    need(r.resize_interval_s > 0, f"run.resize_interval_s={r.resize_interval_s}: seconds, must be > 0")
    need(r.cpus_per_worker is None or r.cpus_per_worker > 0, f"run.cpus_per_worker={r.cpus_per_worker}: must be > 0")
    need(r.max_failures >= -1, f"run.max_failures={r.max_failures}: must be >= 0 (or -1 for no limit)")
    need(r.keep_checkpoints >= 1, f"run.keep_checkpoints={r.keep_checkpoints}: must be >= 1")
    for tool in r.tracking:
        need(tool in TRACKING_TOOLS, f"run.tracking: unknown tool {tool!r}; choose from {', '.join(TRACKING_TOOLS)}")
    r.tracking = list(dict.fromkeys(r.tracking))  # each tool once
    need(bool(r.name) and "/" not in r.name and r.name not in (".", ".."), f"run.name={r.name!r}: must be a plain folder name")
    # a URI (or a mistyped one, "s3:/x") is checked with storage.py, which names what is wrong
    if check_paths and d.path is not None and not re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", d.path):
        need(Path(d.path).expanduser().exists(), f"data.path={d.path}: no such folder")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return values


def storage_uri(storage_path: str) -> str:
    """Ray wants an absolute path or a URI (s3://, gs://)."""
    if "://" in storage_path:
        return storage_path
    return str(Path(storage_path).expanduser().resolve())
