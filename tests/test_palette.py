from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from unet_ray import pairs, palette


def test_labels_match_official_cityscapes_table():
    official = pytest.importorskip("cityscapesscripts.helpers.labels").labels
    assert len(palette.LABELS) == len(official)
    for ours, ref in zip(palette.LABELS, official):
        assert (ours.name, ours.id, ours.train_id, ours.category, tuple(ours.color)) == (
            ref.name,
            ref.id,
            ref.trainId,
            ref.category,
            tuple(ref.color),
        )


def test_train_labels_are_the_19_classes_in_order():
    assert [lb.train_id for lb in palette.TRAIN_LABELS] == list(range(19))
    assert palette.TRAIN_LABELS[0].name == "road"
    assert len(palette.class_set("road")) == 2
    assert len(palette.class_set("cityscapes19")) == 19


def test_jpeg_noisy_masks_decode_to_drawn_classes():
    rng = np.random.default_rng(7)
    accuracies = []
    for _ in range(10):
        photo, mask = pairs.synth_scene(rng)
        exact, near = palette.decode_color_mask(mask)
        assert near == 1.0  # the exact mask is all palette colours
        buf = io.BytesIO()
        Image.fromarray(np.concatenate([photo, mask], axis=1)).save(buf, format="JPEG", quality=95)
        decoded = pairs.decode_pair(buf.getvalue(), "scene.jpg")
        assert decoded.train_ids.shape == exact.shape
        accuracies.append(float((decoded.train_ids == exact).mean()))
    assert np.mean(accuracies) >= 0.99, accuracies


def test_exact_palette_colours_decode_to_their_train_ids():
    # shared colours: polegroup is drawn like pole, license plate like car; the train class wins
    colors = np.array([[lb.color for lb in palette.TRAIN_LABELS]], dtype=np.uint8)
    ids, near = palette.decode_color_mask(colors)
    assert ids[0].tolist() == list(range(19))
    assert near == 1.0


def test_nearest_colour_shifted_road_is_road():
    mask = np.array([[[131, 61, 125], [128, 64, 128], [125, 67, 131]]], dtype=np.uint8)
    ids, near = palette.decode_color_mask(mask)
    assert ids.tolist() == [[0, 0, 0]]
    assert near == 1.0
    sky, _ = palette.decode_color_mask(np.array([[[72, 128, 183]]], dtype=np.uint8))
    assert sky.tolist() == [[10]]
    black, _ = palette.decode_color_mask(np.array([[[2, 1, 3]]], dtype=np.uint8))
    assert black.tolist() == [[palette.IGNORE_INDEX]]


def test_far_from_palette_fraction():
    # pure-ish green far from every palette colour counts as "not near"
    mask = np.zeros((2, 2, 3), dtype=np.uint8)
    mask[:] = (128, 64, 128)
    mask[0, 0] = (0, 255, 0)
    _, near = palette.decode_color_mask(mask)
    assert near == pytest.approx(0.75)


def test_decode_color_mask_rejects_wrong_shape_or_dtype():
    with pytest.raises(ValueError, match=re.escape("expected an (H, W, 3) uint8 colour mask, got (4, 4) uint8")):
        palette.decode_color_mask(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=re.escape("expected an (H, W, 3) uint8 colour mask, got (4, 4, 3) float32")):
        palette.decode_color_mask(np.zeros((4, 4, 3), dtype=np.float32))


def test_to_label_set():
    ids = np.array([[0, 1, 10], [255, 0, 18]], dtype=np.uint8)
    road = palette.to_label_set(ids, "road")
    assert road.dtype == np.uint8
    assert road.tolist() == [[1, 0, 0], [0, 1, 0]]
    assert np.array_equal(palette.to_label_set(ids, "cityscapes19"), ids)
    with pytest.raises(ValueError, match="unknown label set"):
        palette.to_label_set(ids, "pascal")


def test_colorize():
    road = palette.class_set("road").colorize(np.array([[1, 0]], dtype=np.uint8))
    assert road[0, 0].tolist() == [128, 64, 128]
    assert road[0, 1].tolist() == [0, 0, 0]
    full = palette.class_set("cityscapes19").colorize(np.array([[0, 10, 255]], dtype=np.uint8))
    assert full[0].tolist() == [[128, 64, 128], [70, 130, 180], [0, 0, 0]]
    with pytest.raises(ValueError, match="unknown label set 'nope'"):
        palette.class_set("nope").colorize(np.zeros((1, 1), dtype=np.uint8))


def test_colorize_then_decode_round_trips():
    ids = np.arange(19, dtype=np.uint8).reshape(1, 19)
    back, _ = palette.decode_color_mask(palette.class_set("cityscapes19").colorize(ids))
    assert np.array_equal(back, ids)
