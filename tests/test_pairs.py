from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from unet_ray import pairs, palette

from conftest import encode


def test_write_synthetic_layout_and_format(tmp_path):
    out = pairs.write_synthetic(tmp_path / "a", 3, 2, seed=0)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["1.jpg", "2.jpg", "3.jpg"]
    assert sorted(p.name for p in (out / "val").iterdir()) == ["1.jpg", "2.jpg"]
    for path in [*(out / "train").iterdir(), *(out / "val").iterdir()]:
        with Image.open(path) as img:
            assert img.format == "JPEG"
            assert img.mode == "RGB"
            assert img.size == (512, 256)
            assert JpegImagePlugin.get_sampling(img) == 2  # 4:2:0 chroma, like the users' files


def test_write_synthetic_is_deterministic(tmp_path):
    a = pairs.write_synthetic(tmp_path / "a", 2, 1, seed=5)
    b = pairs.write_synthetic(tmp_path / "b", 2, 1, seed=5)
    c = pairs.write_synthetic(tmp_path / "c", 2, 1, seed=6)
    for rel in ("train/1.jpg", "train/2.jpg", "val/1.jpg"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "train/1.jpg").read_bytes() != (c / "train/1.jpg").read_bytes()
    # train and val differ, and so do consecutive files
    assert (a / "train/1.jpg").read_bytes() != (a / "val/1.jpg").read_bytes()
    assert (a / "train/1.jpg").read_bytes() != (a / "train/2.jpg").read_bytes()


def test_write_synthetic_needs_one_pair_per_split(tmp_path):
    with pytest.raises(ValueError, match="at least 1 train and 1 val pair, got 0 and 1"):
        pairs.write_synthetic(tmp_path, 0, 1)
    with pytest.raises(ValueError, match="at least 1 train and 1 val pair, got 1 and 0"):
        pairs.write_synthetic(tmp_path, 1, 0)


def test_synthetic_mask_half_is_a_colour_mask(pairs_folder):
    for path in pairs.list_pairs(pairs_folder, "train"):
        arr = np.asarray(Image.open(path).convert("RGB"))
        ids, near = palette.decode_color_mask(np.ascontiguousarray(arr[:, 256:]))
        assert near >= 0.6
        assert (ids == 0).any(), f"{path}: no road pixels"
        assert (ids == 10).any(), f"{path}: no sky pixels"
        pair = pairs.read_pair(path)
        assert pair.photo.shape == (256, 256, 3) and pair.photo.dtype == np.uint8
        assert pair.train_ids.shape == (256, 256) and pair.train_ids.dtype == np.uint8
        assert np.array_equal(pair.train_ids, ids)


# --- bad inputs -------------------------------------------------------------------------------


def _expect_bad(path, *fragments):
    with pytest.raises(pairs.BadPairError) as info:
        pairs.read_pair(path)
    message = str(info.value)
    assert os.path.basename(str(path)) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_text("this is not an image\n")
    _expect_bad(path, "not a readable image")


def test_truncated_jpeg(tmp_path, pair_jpeg_bytes):
    path = tmp_path / "cut.jpg"
    path.write_bytes(pair_jpeg_bytes[: len(pair_jpeg_bytes) // 2])
    _expect_bad(path, "not a readable image")


def test_empty_file(tmp_path):
    path = tmp_path / "zero.jpg"
    path.write_bytes(b"")
    _expect_bad(path, "empty")


def test_wrong_size(tmp_path):
    path = tmp_path / "square.jpg"
    photo, _ = pairs.synth_scene(np.random.default_rng(0))
    path.write_bytes(encode(photo, quality=95))
    _expect_bad(path, "256x256")


def test_single_channel_pair(tmp_path, pair_jpeg_bytes):
    path = tmp_path / "gray.jpg"
    gray = Image.open(io.BytesIO(pair_jpeg_bytes)).convert("L")
    buf = io.BytesIO()
    gray.save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue())
    _expect_bad(path, "grayscale")


def test_rgba_png_named_jpg(tmp_path, pair_jpeg_bytes):
    path = tmp_path / "alpha.jpg"
    rgba = Image.open(io.BytesIO(pair_jpeg_bytes)).convert("RGBA")
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    _expect_bad(path, "RGBA")


def test_right_half_noise_is_not_a_colour_mask(tmp_path):
    rng = np.random.default_rng(1)
    photo, _ = pairs.synth_scene(rng)
    noise = rng.integers(0, 256, photo.shape, dtype=np.uint8)
    path = tmp_path / "noise.jpg"
    path.write_bytes(encode(np.concatenate([photo, noise], axis=1), quality=95))
    _expect_bad(path, "does not look like a Cityscapes colour mask")


def test_photo_repeated_is_not_a_colour_mask(tmp_path):
    photo, _ = pairs.synth_scene(np.random.default_rng(2))
    path = tmp_path / "twice.jpg"
    path.write_bytes(encode(np.concatenate([photo, photo], axis=1), quality=95))
    _expect_bad(path, "does not look like a Cityscapes colour mask")


def test_unreadable_path(tmp_path):
    path = tmp_path / "dangling.jpg"
    os.symlink(tmp_path / "does-not-exist.jpg", path)
    _expect_bad(path, "cannot be read")


def test_decode_pair_names_the_file():
    with pytest.raises(pairs.BadPairError, match="given-name.jpg"):
        pairs.decode_pair(b"garbage", "given-name.jpg")


# --- listing ----------------------------------------------------------------------------------


def test_list_pairs_missing_val(tmp_path):
    root = tmp_path / "pairs"
    (root / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        pairs.list_pairs(root, "val")
    assert str(root / "val") in str(info.value)


def test_list_pairs_empty_train(tmp_path):
    root = tmp_path / "pairs"
    (root / "train").mkdir(parents=True)
    (root / "train" / "notes.txt").write_text("not a pair")
    with pytest.raises(FileNotFoundError) as info:
        pairs.list_pairs(root, "train")
    assert str(root / "train") in str(info.value)


def test_list_pairs_numeric_order(tmp_path, pair_jpeg_bytes):
    folder = tmp_path / "pairs" / "train"
    folder.mkdir(parents=True)
    for name in ("10.jpg", "2.jpg", "1.jpg", "b.png", "a.jpeg", "readme.txt"):
        (folder / name).write_bytes(pair_jpeg_bytes)
    (folder / "sub.jpg").mkdir()  # a folder is not a pair file
    names = [p.name for p in pairs.list_pairs(tmp_path / "pairs", "train")]
    assert names == ["1.jpg", "2.jpg", "10.jpg", "a.jpeg", "b.png"]


def test_is_pairs_folder(tmp_path, pairs_folder):
    assert pairs.is_pairs_folder(pairs_folder)
    assert not pairs.is_pairs_folder(tmp_path / "elsewhere")
