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

    The plan is in epochs (total and warmup), turned into steps with `steps_per_epoch`, which the
    state keeps too: a worker group of another size (an elastic run that lost or gained workers)
    has another number of steps per epoch, and moves forward by the same share of the run instead
    (steps taken x its steps per epoch / theirs; at an epoch's end, epochs done x its own), so
    that the learning rate at every epoch boundary is the plan's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim_cfg, steps_per_epoch: int, epochs: int | None = None):
        """`epochs`: how many the schedule spans; optim_cfg.epochs unless a time budget planned fewer."""
        o = optim_cfg
        self.optimizer = optimizer
        self.steps_per_epoch, self.warmup_epochs = steps_per_epoch, o.warmup_epochs
        self.schedule, self.lr = o.schedule, o.lr
        self._plan(o.epochs if epochs is None else epochs)
        self.scheduler = self._fresh()

    def _plan(self, epochs: int) -> None:
        self.total_steps = max(1, epochs * self.steps_per_epoch)
        self.warmup_steps = min(self.total_steps - 1, round(self.warmup_epochs * self.steps_per_epoch))

    def replan(self, epochs: int) -> None:
        """Span `epochs` from now on, keeping the steps taken: the learning rates from here are those
        of a schedule planned for `epochs` from the start (a time budget's plan after epoch 1)."""
        steps_done = self.steps_done
        self._plan(epochs)
        self.load_state_dict({"steps_done": steps_done})

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
        return {"steps_done": self.steps_done, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        steps = int(state["steps_done"])
        saved_per_epoch = int(state.get("steps_per_epoch", self.steps_per_epoch))  # older states: the same
        if saved_per_epoch != self.steps_per_epoch:  # another world size: the same share of the plan
            steps = round(steps * self.steps_per_epoch / saved_per_epoch)
        self.scheduler = self._fresh()
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(min(steps, self.total_steps)):
                self.scheduler.step()


def _build_scheduler(optimizer, schedule: str, lr: float, total: int, warmup: int) -> lr_scheduler.LRScheduler:
    if schedule == "onecycle":
        # its own warmup (cosine from lr/25 up to lr) and annealing down to (lr/25)/1e4
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


def plan_epochs(seconds_left: float, epoch_seconds: float, epochs_done: int, max_epochs: int) -> int:
    """How many epochs a run with a time budget trains in all: those done, plus as many more as fit
    in `seconds_left` at `epoch_seconds` each (steady_epoch_seconds); at least the ones done, at
    most `max_epochs`."""
    more = int(seconds_left // epoch_seconds) if epoch_seconds > 0 else max_epochs
    return max(epochs_done, min(max_epochs, epochs_done + max(more, 0)))


def steady_epoch_seconds(epoch_seconds: float, train_seconds: float, first_step_seconds: float, steps: int) -> float:
    """What a later epoch is expected to take, from the first one: its time (validation included)
    with its first step, which also waited for the data pipeline to start, counted as one of its
    other steps instead."""
    if steps <= 1:
        return epoch_seconds
    one_step = max(train_seconds - first_step_seconds, 0.0) / (steps - 1)
    return epoch_seconds - first_step_seconds + one_step


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """EMA of the weights and of the BatchNorm statistics (use_buffers), updated after every
    optimizer step; None when decay is 0. The first update copies the weights."""
    if decay <= 0:
        return None
    return WeightEMA(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class WeightEMA(AveragedModel):
    """AveragedModel whose update costs no host-device sync. Its counter `n_averaged` stays on the
    CPU (AveragedModel's default), where reading it is free; torch's own update also copies it to
    the GPU on every step (a blocking copy: the host waits for the GPU's queue), and this one does
    not: the EMA function never uses it."""

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if int(self.n_averaged) == 0:  # the first update copies the weights
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)
        else:
            floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
            others = [(a, c) for a, c in zip(averaged, current, strict=True) if not a.is_floating_point()]
            if floats:
                self.multi_avg_fn([a for a, _ in floats], [c for _, c in floats], None)
            for a, c in others:  # BatchNorm's batch counters: averaged as torch's EMA does
                self.multi_avg_fn([a], [c], None)
        self.n_averaged += 1


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
