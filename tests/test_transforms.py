from __future__ import annotations

import cv2
import numpy as np
import pytest

from unet_ray.transforms import AUGMENT_PRESETS, JointAugment, resize_pair, shape_of, train_augmentation


def _rect_batch(n=8, size=64, seed=0):
    """Masks of random 0/1 rectangles; the image is white where mask == 1, black elsewhere."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        for _ in range(rng.integers(2, 5)):
            y0, x0 = rng.integers(0, size - 8, 2)
            h, w = rng.integers(6, size // 2, 2)
            masks[i, y0:y0 + h, x0:x0 + w] = 1
        masks[i, :, : size // 8] = 0  # left stripe always background: flips must move it along
    images = np.repeat((masks * 255)[..., None], 3, axis=-1).astype(np.uint8)
    return {"image": images, "mask": masks}


def test_augment_keeps_image_and_mask_aligned():
    aug = JointAugment(64)
    batch = _rect_batch()
    for _ in range(5):  # several draws, so flips and crops both happen
        out = aug(batch)
        for i in range(len(out["image"])):
            agree = ((out["image"][i].mean(-1) > 127) == (out["mask"][i] == 1)).mean()
            # Edge pixels of an up-to-1.4x zoom are interpolated; over 2400 draws the worst row
            # agreed on 97.8 % of pixels (0.13 % of rows fell below 98 %). A misaligned mask
            # (a flip or crop applied to one side only) agrees on far less.
            assert agree >= 0.97, (i, agree)
        assert set(np.unique(out["mask"]).tolist()) <= {0, 1}  # nearest neighbour: ids stay ids


@pytest.mark.parametrize("preset", ["medium", "scale"])
def test_augment_has_no_systematic_subpixel_shift(preset):
    """Mean centroid offset of mask vs image over many draws stays well below a pixel's fraction.

    (With cv2.INTER_NEAREST for the mask and INTER_LINEAR for the image, crops shifted the mask
    by ~0.3 px down-right on average; "scale"'s rescale, ~0.3 px down.)
    """
    aug = JointAugment(64, preset)
    batch = _rect_batch()
    yy, xx = np.mgrid[0:64, 0:64]
    shifts = []
    for _ in range(30):
        out = aug(batch)
        for image, mask in zip(out["image"], out["mask"]):
            img = (image.mean(-1) > 127).astype(float)  # threshold: colour jitter lifts black
            m = (mask == 1).astype(float)
            if m.sum() == 0 or img.sum() == 0:
                continue
            shifts.append(((yy * m).sum() / m.sum() - (yy * img).sum() / img.sum(),
                           (xx * m).sum() / m.sum() - (xx * img).sum() / img.sum()))
    mean_shift = np.abs(np.mean(shifts, axis=0))
    assert (mean_shift < 0.1).all(), mean_shift


def test_augment_keeps_shapes_and_dtypes():
    batch = _rect_batch(n=4)
    out = JointAugment(64)(batch)
    assert out["image"].shape == (4, 64, 64, 3) and out["image"].dtype == np.uint8
    assert out["mask"].shape == (4, 64, 64) and out["mask"].dtype == np.uint8
    # the input batch is not modified in place
    assert np.array_equal(batch["mask"], _rect_batch(n=4)["mask"])


def test_augment_differs_between_calls():
    aug = JointAugment(64)
    batch = _rect_batch()
    a, b = aug(batch), aug(batch)
    assert not np.array_equal(a["image"], b["image"])
    assert not np.array_equal(a["mask"], b["mask"])


def test_augment_keeps_ignore_index():
    """Ignored pixels (the top 8 rows here) stay 255 and stay where they were: a band of whole
    rows at the top of each augmented mask (flips keep rows, crops cut the band or scale it)."""
    batch = _rect_batch(n=8)
    batch["mask"][:, :8] = 255
    out = JointAugment(64)(batch)
    assert set(np.unique(out["mask"]).tolist()) <= {0, 1, 255}
    # a crop that starts below row 8 drops the band: ~14 % of rows, so all 8 at once ~1e-7
    assert (out["mask"] == 255).any()
    for i, mask in enumerate(out["mask"]):
        ignored = mask == 255
        band = int(ignored.all(axis=1).sum())  # whole rows ignored
        assert ignored[:band].all() and not ignored[band:].any(), (i, band)


def test_resize_pair_keeps_ids():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    ids = rng.choice(np.array([0, 10, 13, 255], dtype=np.uint8), (256, 256))
    p, m = resize_pair(photo, ids, 64)
    assert p.shape == (64, 64, 3) and p.dtype == np.uint8
    assert m.shape == (64, 64) and m.dtype == np.uint8
    assert set(np.unique(m).tolist()) == {0, 10, 13, 255}
    # each output pixel is the id of a photo pixel in its 4x4 block (nearest neighbour, no blend)
    blocks = ids.reshape(64, 4, 64, 4).transpose(0, 2, 1, 3).reshape(64, 64, 16)
    assert (blocks == m[..., None]).any(axis=-1).all()
    same_p, same_m = resize_pair(photo, ids, 256)
    assert same_p is photo and same_m is ids


def test_shape_of():
    assert shape_of(64) == (64, 64)
    assert shape_of((32, 96)) == (32, 96) and shape_of([32, 96]) == (32, 96)  # a list: sizes read from JSON
    assert shape_of(np.int64(8)) == (8, 8)
    for bad in (0, -4, 1.5, "64", True, (32,), (32, 64, 3), (32, 0), (32.0, 64), None):
        with pytest.raises(ValueError, match="image size"):
            shape_of(bad)


def test_bad_sizes_raise():
    photo, ids = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match=r"image size \(8, 0\)"):
        resize_pair(photo, ids, (8, 0))
    with pytest.raises(ValueError, match="image size '64'"):
        JointAugment("64", "scale")
    with pytest.raises(ValueError, match="image size"):
        train_augmentation((1, 2, 3), "medium")


def test_resize_pair_non_square():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (128, 512, 3), dtype=np.uint8)  # h x w
    ids = rng.choice(np.array([0, 10, 13, 255], dtype=np.uint8), (128, 512))
    p, m = resize_pair(photo, ids, (32, 64))  # (h, w): 4x down in height, 8x in width
    assert p.shape == (32, 64, 3) and m.shape == (32, 64) and m.dtype == np.uint8
    blocks = ids.reshape(32, 4, 64, 8).transpose(0, 2, 1, 3).reshape(32, 64, 32)
    assert (blocks == m[..., None]).any(axis=-1).all()  # each id comes from its own 4x8 block
    # the photo is the block mean (area interpolation), so height and width were not swapped
    means = photo.reshape(32, 4, 64, 8, 3).mean(axis=(1, 3))
    assert np.abs(p - means).max() <= 1
    same_p, same_m = resize_pair(photo, ids, (128, 512))
    assert same_p is photo and same_m is ids


def _id_image_pair(h, w, seed=0, cell=8):
    """Ids 1-4 in cells of `cell` px, and an image whose every channel is 10 * id (0 only in padding)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(1, 5, (-(-h // cell), -(-w // cell)), dtype=np.uint8)
    mask = np.kron(cells, np.ones((cell, cell), np.uint8))[:h, :w]
    return np.repeat((mask * 10)[..., None], 3, axis=-1), mask


@pytest.mark.parametrize("preset", [p for p in AUGMENT_PRESETS if p != "none"])
def test_every_preset_gives_the_non_square_size(preset):
    image, mask = _id_image_pair(48, 96)
    batch = {"image": np.stack([image] * 4), "mask": np.stack([mask] * 4)}
    for _ in range(3):
        out = JointAugment((48, 96), preset)(batch)
        assert out["image"].shape == (4, 48, 96, 3) and out["mask"].shape == (4, 48, 96)
        assert out["image"].dtype == np.uint8 and out["mask"].dtype == np.uint8


def test_scale_preset_gives_the_size_from_any_input_and_others_refuse():
    for h, w in ((100, 300), (30, 50), (48, 96)):  # larger, smaller (padded), equal
        image, mask = _id_image_pair(h, w)
        out = JointAugment((48, 96), "scale")({"image": image[None], "mask": mask[None]})
        assert out["image"].shape == (1, 48, 96, 3) and out["mask"].shape == (1, 48, 96)
    with pytest.raises(ValueError, match="resize_pair"):
        JointAugment((48, 96), "light")({"image": image[None, :, :48], "mask": mask[None, :, :48]})


def test_scale_preset_pads_with_ignore_and_keeps_ids():
    """Padding (255) appears exactly when the drawn scale is below 1; ids stay the input's ids."""
    import albumentations as A  # after train_augmentation: it turns off the import's PyPI check

    geometric = train_augmentation((64, 128), "scale", color=False)
    traced = A.Compose(geometric.transforms, save_applied_params=True)
    image, mask = _id_image_pair(64, 128)
    shrunk = 0
    for _ in range(40):  # P(no scale < 1 in 40 draws) = (2/3)^40 ~ 1e-7
        out = traced(image=image, mask=mask)
        scale = dict(out["applied_transforms"])["RandomScale"]["scale"]
        assert 0.5 <= scale <= 2.0
        padded = out["mask"] == 255
        assert padded.any() == (scale < 1), scale
        assert (out["image"][padded] == 0).all()  # the photo is padded with 0 in the same place
        assert set(np.unique(out["mask"]).tolist()) <= {1, 2, 3, 4, 255}
        shrunk += scale < 1
    assert shrunk > 0
    # with colour jitter too: the ids never change
    for _ in range(10):
        ids = set(np.unique(train_augmentation((64, 128), "scale")(image=image, mask=mask)["mask"]).tolist())
        assert ids <= {1, 2, 3, 4, 255}


def test_scale_preset_keeps_image_and_mask_aligned():
    """Away from region edges (where bilinear blends neighbours) and from the crop's border (whose
    neighbours outside the crop are not seen), every pixel is 10 * its id."""
    augment = train_augmentation((64, 128), "scale", color=False)
    image, mask = _id_image_pair(96, 160, seed=1, cell=16)  # cells of 8-32 px after the rescale
    kernel = np.ones((5, 5), np.uint8)
    for _ in range(20):
        out = augment(image=image, mask=mask)
        img, m = out["image"][..., 0].astype(int), out["mask"]
        interior = cv2.erode(m, kernel) == cv2.dilate(m, kernel)  # 5x5 neighbourhood of one id
        interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = False, False, False, False
        assert (interior & (m != 255)).mean() > 0.1  # enough of the classes checked (2000 draws: >= 0.15)
        expected = np.where(m == 255, 0, 10 * m.astype(int))
        assert (img[interior] == expected[interior]).all()
