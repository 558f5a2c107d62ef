"""Transforms on NumPy arrays: resizing a pair, and joint image+mask augmentation of batches.

Rows travel as uint8 (N, S, S, 3) images and (N, S, S) masks all the way to the training worker:
four times fewer bytes than float, and the float conversion happens on the worker's device.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from unet_ray.palette import IGNORE_INDEX


AUGMENT_PRESETS = ("none", "light", "medium", "strong")


def train_augmentation(image_size: int, preset: str = "medium"):
    """The preset's joint image+mask augmentation (an A.Compose), or None for "none".

    - light: horizontal flips only (a street scene mirrored is still a street scene);
    - medium: flips, a random resized crop (half the time, 50-100 % of the area) and colour jitter;
    - strong: flips, crops down to 25 % of the area most of the time, stronger colour jitter, blur.
    Masks are resampled with nearest neighbour (class ids must stay ids); no seed, so every epoch
    draws new parameters.
    """
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(AUGMENT_PRESETS)}")
    if preset == "none":
        return None
    # Imported here, not at the top: albumentations imports torch (seconds in a fresh process),
    # and the prepare and decode tasks, which import this module too, never augment. Its import
    # also asks PyPI for a newer version (up to 2 s, in every fresh data worker; offline cluster
    # nodes always wait the full timeout) unless told not to.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    def crop(scale: tuple[float, float], p: float):
        return A.RandomResizedCrop(
            size=(image_size, image_size),
            scale=scale,
            ratio=(0.75, 1.333),
            interpolation=cv2.INTER_LINEAR,
            # INTER_NEAREST samples floor(x * scale), half a pixel off the grid INTER_LINEAR uses,
            # which shifts the mask ~0.3 px against the image; the _EXACT variant is centred
            mask_interpolation=cv2.INTER_NEAREST_EXACT,
            p=p,
        )

    steps = {
        "light": [A.HorizontalFlip(p=0.5)],
        "medium": [
            A.HorizontalFlip(p=0.5),
            crop((0.5, 1.0), p=0.5),
            A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.03, p=0.5),
        ],
        "strong": [
            A.HorizontalFlip(p=0.5),
            crop((0.25, 1.0), p=0.8),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05, p=0.8),
            A.GaussianBlur(blur_limit=(3, 5), p=0.2),
        ],
    }[preset]
    return A.Compose(steps)


class JointAugment:
    """map_batches callable: augments every (image, mask) row of a batch with fresh parameters."""

    def __init__(self, image_size: int, preset: str = "medium"):
        self.image_size = image_size
        self.transform = train_augmentation(image_size, preset)
        if self.transform is None:
            raise ValueError("JointAugment needs a preset other than 'none' (leave the stage out instead)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.empty_like(batch["image"])
        masks = np.empty_like(batch["mask"])
        for i in range(len(images)):
            out = self.transform(image=batch["image"][i], mask=batch["mask"][i])
            images[i], masks[i] = out["image"], out["mask"]
        return {"image": images, "mask": masks}


def resize_pair(photo: np.ndarray, ids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Photo with area interpolation (no aliasing when shrinking), class ids with nearest neighbour."""
    if photo.shape[0] != size or photo.shape[1] != size:
        photo = cv2.resize(photo, (size, size), interpolation=cv2.INTER_AREA)
        ids = cv2.resize(ids, (size, size), interpolation=cv2.INTER_NEAREST)
    return photo, ids


__all__ = ["AUGMENT_PRESETS", "IGNORE_INDEX", "JointAugment", "resize_pair", "train_augmentation"]
