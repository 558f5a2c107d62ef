"""The training recipe built from the config: optimizer, per-iteration learning-rate schedule with
warmup, an exponential moving average (EMA) of the weights, and the numeric precision.

One place that the Ray worker, the benchmarks and the tests share. Plain PyTorch, no Ray: every
piece is torch.optim / torch.optim.lr_scheduler / torch.optim.swa_utils, configured here.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

WARMUP_START_FACTOR = 0.01  # warmup starts at lr / 100
POLY_POWER = 0.9  # the "poly" schedule of DeepLab and nnU-Net
ONECYCLE_WARMUP_SHARE = 0.3  # OneCycleLR's default pct_start, when no warmup is given


def build_optimizer(params, optim_cfg) -> torch.optim.Optimizer:
    """Adam, AdamW (decoupled weight decay) or SGD with Nesterov momentum, from a config.OptimSection."""
    o = optim_cfg
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0, weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.optimizer!r}")


class StepSchedule:
    """A torch LR scheduler stepped once per optimizer step, for `total_steps` steps.

    Past total_steps it stops stepping: a cosine would climb again, OneCycleLR would raise, and a
    run can take a step or two more than planned when a shard's last batch is split differently.
    Its saved state is the number of steps taken: a resumed run re-plans the schedule from the
    config (so a run resumed with more epochs stretches its schedule) and moves it forward by
    that many steps, which gives exactly the uninterrupted run's learning rates.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim_cfg, steps_per_epoch: int):
        o = optim_cfg
        self.optimizer = optimizer
        self.total_steps = max(1, o.epochs * steps_per_epoch)
        self.warmup_steps = min(self.total_steps - 1, round(o.warmup_epochs * steps_per_epoch))
        self.schedule, self.lr = o.schedule, o.lr
        self.scheduler = self._fresh()

    def _fresh(self) -> lr_scheduler.LRScheduler:
        for group in self.optimizer.param_groups:  # plan from the configured lr, not the current one
            group["lr"] = self.lr
            group.pop("initial_lr", None)
        return _build_scheduler(self.optimizer, self.schedule, self.lr, self.total_steps, self.warmup_steps)

    @property
    def steps_done(self) -> int:
        return self.scheduler.last_epoch

    def step(self) -> None:
        if self.scheduler.last_epoch < self.total_steps:
            self.scheduler.step()

    def get_last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler = self._fresh()
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(min(int(state["steps_done"]), self.total_steps)):
                self.scheduler.step()


def _build_scheduler(optimizer, schedule: str, lr: float, total: int, warmup: int) -> lr_scheduler.LRScheduler:
    if schedule == "onecycle":
        # its own warmup (cosine from lr/25 up to lr) and annealing down to lr/1e4
        share = warmup / total if warmup > 0 else ONECYCLE_WARMUP_SHARE
        return lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=share)
    decay_steps = total - warmup
    if schedule == "constant":
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=0.0)
    elif schedule == "poly":
        main = lr_scheduler.PolynomialLR(optimizer, total_iters=decay_steps, power=POLY_POWER)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    if warmup == 0:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, end_factor=1.0, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """EMA of the weights and of the BatchNorm statistics (use_buffers), updated after every
    optimizer step; None when decay is 0. The first update copies the weights."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX): bf16 autocast is then
    faster than fp32; without them oneDNN emulates bf16 and it is slower."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run with run.precision=`precision` trains with bf16 autocast."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
