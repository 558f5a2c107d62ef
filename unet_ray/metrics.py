"""Confusion-matrix metrics: IoU per class, mean IoU, Dice, pixel accuracy.

Workers each fill a confusion matrix over their part of the validation set and sum them with one
all_reduce, so the metrics of N workers equal those of one process over the same pixels.
"""

from __future__ import annotations

import torch

from unet_ray.palette import IGNORE_INDEX


class ConfusionMatrix:
    """mat[t, p] counts pixels of true class t predicted as p; ignored pixels are left out."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        k = self.num_classes
        valid = target != IGNORE_INDEX
        idx = target[valid].long() * k + pred[valid].long()
        self.mat += torch.bincount(idx, minlength=k * k).reshape(k, k)

    def all_reduce(self) -> None:
        """Sum over all processes of the default torch.distributed group, when there is one."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)

    def compute(self) -> dict[str, float | list[float]]:
        return metrics_from_confusion(self.mat.cpu())


def metrics_from_confusion(mat: torch.Tensor) -> dict[str, float | list[float]]:
    """IoU and Dice per class (NaN for a class absent from both truth and prediction)."""
    mat = mat.double()
    tp = mat.diag()
    fp = mat.sum(0) - tp
    fn = mat.sum(1) - tp
    union = tp + fp + fn
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    dice = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.full_like(tp, float("nan")))
    total = mat.sum()
    return {
        "iou_per_class": iou.tolist(),
        "dice_per_class": dice.tolist(),
        "miou": float(iou.nanmean()) if torch.isfinite(iou).any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
    }


def headline(metrics: dict, num_classes: int) -> dict[str, float]:
    """The numbers a run reports: val_iou is road IoU for the binary task, mIoU for more classes."""
    if num_classes == 2:
        return {"val_iou": metrics["iou_per_class"][1], "val_dice": metrics["dice_per_class"][1]}
    return {"val_iou": metrics["miou"], "val_dice": _nanmean(metrics["dice_per_class"])}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")
