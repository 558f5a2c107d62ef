"""One training epoch and one evaluation pass in plain PyTorch: no Ray, no logging.

Both take any iterable of {"image": uint8 (N,H,W,3), "mask": uint8 (N,H,W)} tensor batches, so the
same code runs under Ray Train, in a plain loop (benchmarks) and in tests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from unet_ray.losses import deep_supervision_loss, segmentation_loss
from unet_ray.metrics import ConfusionMatrix
from unet_ray.model import predict_classes


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], on the device (converted there, not on the host)."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast (no loss scaling needed) on CUDA or CPU when enabled; a no-op otherwise."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def exact_fp32(device: torch.device):
    """fp32 math as on a CPU. On CUDA, PyTorch runs fp32 convolutions in TF32 (a 10-bit mantissa)
    by default; evaluation turns that off so that a GPU's IoU equals `unet-ray evaluate`'s."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    dice_weight: float = 0.0,
    class_weights: torch.Tensor | None = None,
    mixed_precision: bool = False,
    channels_last: bool = False,
    scheduler=None,
    ema: nn.Module | None = None,
    deep_supervision: float = 0.0,
) -> dict[str, float]:
    """Train over `batches`; returns mean loss, images seen and seconds spent, and how the first
    step ran (its logits' dtype, whether its input was channels_last).

    `scheduler` (recipe.StepSchedule) is stepped and `ema` (an AveragedModel) updated after every
    optimizer step. `deep_supervision` > 0 (a model with aux heads): that weight times the aux
    heads' loss is added to the loss."""
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
            if deep_supervision:
                logits, aux_logits = model(x, with_aux=True)
            else:
                logits = model(x)
        loss = segmentation_loss(logits, y, dice_weight, class_weights)
        if deep_supervision:
            loss = loss + deep_supervision * deep_supervision_loss(aux_logits, y, class_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(getattr(model, "module", model))  # the weights, not the DDP wrapper
        if steps == 0:  # how long the epoch waited for data before its first step, plus that step
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_step_seconds, first_step_images = time.perf_counter() - start, x.shape[0]
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
        "first_step_images": first_step_images if steps else 0,
        **ran_as,
    }


def predict_logits(model: nn.Module, x: torch.Tensor, flip_tta: bool = False) -> torch.Tensor:
    """model(x) in fp32; with flip_tta the mean of the logits of x and of x mirrored left-right
    (mirrored back), as the two passes would give one by one."""
    logits = model(x).float()
    if flip_tta:
        logits = (logits + model(x.flip(-1)).float().flip(-1)) / 2
    return logits


def to_native_size(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits at the training size -> logits at `size` (bilinear): the masks users compare with."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    num_classes: int,
    device: torch.device,
    mixed_precision: bool = False,
    channels_last: bool = False,
    flip_tta: bool = False,
    native: bool = False,
) -> dict[str, ConfusionMatrix]:
    """Confusion matrices of `model` over `batches` (not reduced across processes): "train_size"
    against the masks at the training size and, with `native`, "native" against the batches'
    `mask_native` (each image's own resolution), with the logits upsampled to it: a tensor (one
    size, 256x256 for pairs) in one go, a list of tensors (a data folder's images, 2048x1024 for
    Cityscapes) one image at a time (a batch of 19-class logits at 2048x1024 would take gigabytes).
    Both exist even when there are no batches, so every worker all-reduces the same matrices."""
    model.eval()
    confusion = {"train_size": ConfusionMatrix(num_classes, device)}
    if native:
        confusion["native"] = ConfusionMatrix(num_classes, device)
    for batch in batches:
        x = to_model_input(batch["image"], device, channels_last)
        with autocast(device, mixed_precision), (contextlib.nullcontext() if mixed_precision else exact_fp32(device)):
            logits = predict_logits(model, x, flip_tta)
        confusion["train_size"].update(batch["mask"].to(device), predict_classes(logits))
        if native:
            native_masks = batch["mask_native"]
            if isinstance(native_masks, torch.Tensor):  # one size for the batch (prepared pairs: 256x256)
                truth = native_masks.to(device)
                confusion["native"].update(truth, predict_classes(to_native_size(logits, truth.shape[-2:])))
                continue
            for one_logits, truth in zip(logits, native_masks):  # a list: each image at its own size
                truth = truth.to(device)
                confusion["native"].update(truth, predict_classes(to_native_size(one_logits[None], truth.shape[-2:]))[0])
    return confusion
