"""One training epoch and one evaluation pass in plain PyTorch: no Ray, no logging.

Both take any iterable of {"image": uint8 (N,H,W,3), "mask": uint8 (N,H,W)} tensor batches, so the
same code runs under Ray Train, in a plain loop (benchmarks) and in tests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import torch
from torch import nn

from unet_ray.losses import segmentation_loss
from unet_ray.metrics import ConfusionMatrix
from unet_ray.model import predict_classes


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], on the device (converted there, not on the host)."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (no loss scaling needed); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    dice_weight: float = 0.0,
    mixed_precision: bool = False,
    channels_last: bool = False,
) -> dict[str, float]:
    """Train over `batches`; returns mean loss, images seen and seconds spent, and how the first
    step ran (its logits' dtype, whether its input was channels_last)."""
    model.train()
    ran_as = {"logits_dtype": "none", "channels_last": False}
    loss_sum = torch.zeros((), device=device)
    images_seen = 0
    steps = 0
    start = time.perf_counter()
    for batch in batches:
        x = to_model_input(batch["image"], device, channels_last)
        y = batch["mask"].to(device, non_blocking=True).long()
        with autocast(device, mixed_precision):
            logits = model(x)
        loss = segmentation_loss(logits, y, dice_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if steps == 0:  # how long the epoch waited for data before its first step, plus that step
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_step_seconds = time.perf_counter() - start
            ran_as = {
                "logits_dtype": str(logits.dtype).removeprefix("torch."),
                "channels_last": x.is_contiguous(memory_format=torch.channels_last),
            }
        loss_sum += loss.detach()  # no .item() per step: it would sync the GPU every batch
        images_seen += x.shape[0]
        steps += 1
    if device.type == "cuda":  # the host queues steps ahead of the GPU: count the time until they ran
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "train_loss": float(loss_sum) / max(steps, 1),
        "train_images": images_seen,
        "train_seconds": seconds,
        "first_step_seconds": first_step_seconds if steps else seconds,
        **ran_as,
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    num_classes: int,
    device: torch.device,
    mixed_precision: bool = False,
    channels_last: bool = False,
) -> ConfusionMatrix:
    """Confusion matrix of `model` over `batches` (not reduced across processes)."""
    model.eval()
    confusion = ConfusionMatrix(num_classes, device)
    for batch in batches:
        x = to_model_input(batch["image"], device, channels_last)
        with autocast(device, mixed_precision):
            logits = model(x)
        confusion.update(batch["mask"].to(device), predict_classes(logits))
    return confusion
