"""Transforms on NumPy arrays: resizing a pair, and joint image+mask augmentation of batches.

Rows travel as uint8 (N, H, W, 3) images and (N, H, W) masks all the way to the training worker:
four times fewer bytes than float, and the float conversion happens on the worker's device.
A size is an int S (square, S x S) or a (height, width) tuple; `shape_of` turns either into (h, w).
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from unet_ray.config import AUGMENT_PRESETS  # the presets train_augmentation builds; config checks names against them
from unet_ray.palette import IGNORE_INDEX

Size = int | tuple[int, int]


def shape_of(size: Size) -> tuple[int, int]:
    """(height, width) of a size: an int S means S x S, a (height, width) pair is taken as is."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        h, w = size
    else:
        h = w = size
    # bool is an int subclass: True would silently mean 1 x 1
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        return int(h), int(w)
    raise ValueError(f"image size {size!r}: expected a positive int or a (height, width) pair of positive ints")


def train_augmentation(image_size: Size, preset: str = "medium", color: bool = True):
    """The preset's joint image+mask augmentation (an A.Compose), or None for "none".

    - light: horizontal flips only (a street scene mirrored is still a street scene);
    - medium: flips, a random resized crop (half the time, 50-100 % of the area) and colour jitter;
    - strong: flips, crops down to 25 % of the area most of the time, stronger colour jitter, blur;
    - scale: the Cityscapes recipe of mmsegmentation and the torchvision references: rescale by a
      factor drawn from 0.5-2.0, pad to at least the crop size where smaller (mask padding is
      IGNORE_INDEX, so it never counts as a class), a random crop of exactly the size, flips and
      light colour jitter. The only preset whose output is the size whatever the input's size;
      the others expect rows already at the size.
    Masks are resampled with nearest neighbour (class ids must stay ids); no seed, so every epoch
    draws new parameters. `color=False` leaves out the photometric steps (jitter, blur): the
    geometry alone, for tests that compare pixel values with ids.
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

    h, w = shape_of(image_size)
    # INTER_NEAREST samples floor(x * scale), half a pixel off the grid INTER_LINEAR uses, which
    # shifts the mask ~0.3 px against the image; the _EXACT variant is centred
    mask_nearest = cv2.INTER_NEAREST_EXACT

    def crop(scale: tuple[float, float], p: float):
        aspect = w / h  # crops near the output's aspect: near-square crops of a 2:1 output would stretch 2x
        return A.RandomResizedCrop(
            size=(h, w),
            scale=scale,
            ratio=(0.75 * aspect, 1.333 * aspect),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=mask_nearest,
            p=p,
        )

    def jitter(strength: float, hue: float, p: float) -> list:
        if not color:
            return []
        return [A.ColorJitter(brightness=strength, contrast=strength, saturation=strength, hue=hue, p=p)]

    steps = {
        "light": [A.HorizontalFlip(p=0.5)],
        "medium": [
            A.HorizontalFlip(p=0.5),
            crop((0.5, 1.0), p=0.5),
            *jitter(0.25, hue=0.03, p=0.5),
        ],
        "strong": [
            A.HorizontalFlip(p=0.5),
            crop((0.25, 1.0), p=0.8),
            *jitter(0.4, hue=0.05, p=0.8),
            *([A.GaussianBlur(blur_limit=(3, 5), p=0.2)] if color else []),
        ],
        "scale": [
            # scale_limit is added to 1: (-0.5, 1.0) draws a factor uniformly from 0.5-2.0. p=1:
            # RandomScale's default p is 0.5, which would leave half the images at scale 1.
            A.RandomScale(scale_limit=(-0.5, 1.0), interpolation=cv2.INTER_LINEAR,
                          mask_interpolation=mask_nearest, p=1.0),
            # fill_mask defaults to 0, a real class id (road): the padding must be ignored instead
            A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT,
                          fill=0, fill_mask=IGNORE_INDEX),
            A.RandomCrop(height=h, width=w),
            A.HorizontalFlip(p=0.5),
            *jitter(0.2, hue=0.02, p=0.5),
        ],
    }[preset]
    return A.Compose(steps)


class JointAugment:
    """map_batches callable: augments every (image, mask) row of a batch with fresh parameters."""

    def __init__(self, image_size: Size, preset: str = "medium"):
        self.image_size = image_size
        self.shape = shape_of(image_size)
        self.preset = preset
        self.transform = train_augmentation(image_size, preset)
        if self.transform is None:
            raise ValueError("JointAugment needs a preset other than 'none' (leave the stage out instead)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, rows = len(batch["image"]), batch["image"].shape[1:3]
        if self.preset != "scale" and rows != self.shape:
            raise ValueError(f"rows are {rows}, preset {self.preset!r} expects {self.shape}: resize_pair them first")
        images = np.empty((n, *self.shape, *batch["image"].shape[3:]), dtype=batch["image"].dtype)
        masks = np.empty((n, *self.shape), dtype=batch["mask"].dtype)
        for i in range(n):
            out = self.transform(image=batch["image"][i], mask=batch["mask"][i])
            images[i], masks[i] = out["image"], out["mask"]
        return {"image": images, "mask": masks}


def resize_pair(photo: np.ndarray, ids: np.ndarray, size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Photo with area interpolation (no aliasing when shrinking), class ids with nearest neighbour.
    Pairs already at the size come back as they are (the same arrays)."""
    h, w = shape_of(size)
    if photo.shape[:2] != (h, w):
        photo = cv2.resize(photo, (w, h), interpolation=cv2.INTER_AREA)  # cv2 sizes are (width, height)
        ids = cv2.resize(ids, (w, h), interpolation=cv2.INTER_NEAREST)
    return photo, ids


__all__ = ["AUGMENT_PRESETS", "IGNORE_INDEX", "JointAugment", "resize_pair", "shape_of", "train_augmentation"]
