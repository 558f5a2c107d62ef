"""Segmentation losses: BCE-with-logits (one logit) or cross-entropy (C logits), both skipping
ignored pixels (255) and optionally weighted per class, plus an optional soft-Dice term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unet_ray.palette import IGNORE_INDEX


def class_weights(class_pixels, kind: str) -> torch.Tensor | None:
    """Per-class loss weights from the training pixels of each class, or None for "none".

    "inverse_log": 1 / ln(1.02 + share of the pixels), as in ENet (Paszke et al. 2016): from ~3 for
    road (38 % of the pixels) to ~50 for a class with almost none, so that rare classes (poles,
    signs, people) count in the loss as they count in the mean IoU. A class with no pixels gets
    the largest weight, which never applies."""
    if kind == "none":
        return None
    if kind != "inverse_log":  # "auto" is resolved by the config (TrainConfig.class_weighting)
        raise ValueError(f"unknown class weighting {kind!r}; choose none or inverse_log")
    pixels = torch.as_tensor(class_pixels, dtype=torch.float64)
    share = pixels / pixels.sum().clamp(min=1)
    return (1.0 / torch.log(1.02 + share)).float()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    dice_weight: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (N, K, H, W), target (N, H, W) long class ids with 255 = ignore -> scalar loss.

    `weights` (one per class, 2 for the one-logit road task): each pixel's BCE / CE term is
    weighted by its true class's weight, and the sum divided by the sum of the weights (as
    torch's weighted cross-entropy does), so that the loss stays a weighted mean."""
    valid = target != IGNORE_INDEX
    logits = logits.float()  # losses in fp32 even under bf16 autocast
    # the weight of each valid pixel (1 without weights); 0 for ignored ones
    pixel_weight = valid.float() if weights is None else weights.to(logits.device)[target.masked_fill(~valid, 0)] * valid
    # sum / weight sum rather than reduction="mean": the mean is NaN (0/0) for a batch whose
    # pixels are all ignored (here 0), and the same as this otherwise
    norm = pixel_weight.sum().clamp(min=1e-6)
    binary = logits.shape[1] == 1
    if binary:
        per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0], target.float().clamp(max=1), reduction="none")
    else:
        per_pixel = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    loss = (per_pixel * pixel_weight).sum() / norm
    if dice_weight > 0:  # the probabilities only when Dice needs them (19 classes: the unused softmax was ~40 % of the loss)
        if binary:
            road = torch.sigmoid(logits[:, 0])
            probs = torch.stack([1 - road, road], dim=1)
        else:
            probs = logits.softmax(1)
        loss = loss + dice_weight * soft_dice_loss(probs, target, valid)
    return loss


def deep_supervision_loss(
    aux_logits: list[torch.Tensor], target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of segmentation_loss over the coarser decoder levels' logits (UNet with_aux), each
    against the mask subsampled to its size: the pixel nearest each coarse pixel's centre (no
    interpolation: labels, 255 included, stay labels; cheaper than upsampling the logits)."""
    losses = []
    for logits in aux_logits:
        step_h, step_w = target.shape[-2] // logits.shape[-2], target.shape[-1] // logits.shape[-1]
        coarse = target[..., step_h // 2 :: step_h, step_w // 2 :: step_w]
        losses.append(segmentation_loss(logits, coarse, weights=weights))
    return torch.stack(losses).mean()


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of soft Dice, over valid pixels only. probs (N, K, H, W) sum to 1 over K."""
    k = probs.shape[1]
    one_hot = F.one_hot(target.masked_fill(~valid, 0), k).permute(0, 3, 1, 2).float()
    mask = valid.unsqueeze(1).float()
    inter = (probs * one_hot * mask).sum((0, 2, 3))
    total = ((probs + one_hot) * mask).sum((0, 2, 3))
    return 1 - ((2 * inter + eps) / (total + eps)).mean()
