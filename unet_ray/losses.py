"""Segmentation losses: BCE-with-logits (one logit) or cross-entropy (C logits), both skipping
ignored pixels (255), plus an optional soft-Dice term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unet_ray.palette import IGNORE_INDEX


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 0.0) -> torch.Tensor:
    """logits (N, K, H, W), target (N, H, W) long class ids with 255 = ignore -> scalar loss."""
    valid = target != IGNORE_INDEX
    logits = logits.float()  # losses in fp32 even under bf16 autocast
    if logits.shape[1] == 1:
        x = logits[:, 0]
        t = target.float()
        per_pixel = F.binary_cross_entropy_with_logits(x, t.clamp(max=1), reduction="none")
        loss = (per_pixel * valid).sum() / valid.sum().clamp(min=1)
        probs = torch.stack([1 - torch.sigmoid(x), torch.sigmoid(x)], dim=1)
    else:
        # sum / valid count rather than reduction="mean": the mean is NaN (0/0) for a batch whose
        # pixels are all ignored, and the same as this otherwise
        per_pixel = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
        loss = per_pixel.sum() / valid.sum().clamp(min=1)
        probs = logits.softmax(1)
    if dice_weight > 0:
        loss = loss + dice_weight * soft_dice_loss(probs, target, valid)
    return loss


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of soft Dice, over valid pixels only. probs (N, K, H, W) sum to 1 over K."""
    k = probs.shape[1]
    one_hot = F.one_hot(target.masked_fill(~valid, 0), k).permute(0, 3, 1, 2).float()
    mask = valid.unsqueeze(1).float()
    inter = (probs * one_hot * mask).sum((0, 2, 3))
    total = ((probs + one_hot) * mask).sum((0, 2, 3))
    return 1 - ((2 * inter + eps) / (total + eps)).mean()
