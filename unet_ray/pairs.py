"""Pair files: photo | colour mask, side by side in one 256x512 JPEG.

Reading, checking and splitting a pair, listing a pairs folder, and the synthetic pair generator
that writes files in exactly the users' format (it is the built-in default data and the tests' data).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from unet_ray import palette, storage

PAIR_HEIGHT, PAIR_WIDTH = 256, 512
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val")
# Below this fraction of palette-coloured pixels, the right half is not a colour mask.
MIN_PALETTE_FRACTION = 0.6


class BadPairError(ValueError):
    """A pair file that cannot be used; the message names the file and what is wrong."""


@dataclass
class Pair:
    photo: np.ndarray  # (256, 256, 3) uint8
    train_ids: np.ndarray  # (256, 256) uint8 Cityscapes train ids, 255 = ignored


def list_pairs(root: str | os.PathLike, split: str) -> list[Path] | list[str]:
    """The image files of `root/split`, sorted by name (numerically where names are numbers).
    `root`: a local folder (Paths back) or a URI of object storage (URIs back, storage.py)."""
    if storage.is_uri(root):
        folder = storage.join(root, split)
        try:
            files = storage.list_files(folder, IMAGE_SUFFIXES, recursive=False)
        except storage.StorageError:
            files = []
        if not files:
            raise FileNotFoundError(f"{storage.redact(folder)} holds no .jpg/.png pair files (a pairs folder needs {'/ and '.join(SPLITS)}/)")
        return sorted(files, key=lambda uri: _name_order(uri_stem(uri)))
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: a pairs folder needs {'/ and '.join(SPLITS)}/")
    # Dangling links stay in the list so that reading them reports the file instead of losing it
    # silently; folders and special files (a FIFO would block the reader) are left out.
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink())]
    if not files:
        raise FileNotFoundError(f"{folder} holds no .jpg/.png pair files")
    return sorted(files, key=lambda p: _name_order(p.stem))


def uri_stem(uri: str) -> str:
    """The file name of a URI (or path) without its suffix or query: s3://b/x/12.jpg -> "12"."""
    return PurePosixPath(str(uri).split("?")[0]).stem


def _name_order(stem: str) -> tuple[int, str]:
    return (len(stem), stem) if stem.isdigit() else (1 << 30, stem)


def is_pairs_folder(root: str | os.PathLike) -> bool:
    if storage.is_uri(root):
        return any(storage.is_dir(storage.join(root, split)) for split in SPLITS)
    return (Path(root) / "train").is_dir() or (Path(root) / "val").is_dir()


def decode_pair(data: bytes, name: str) -> Pair:
    """Decode one pair file's bytes; raise BadPairError naming `name` for anything unusable."""
    if not data:
        raise BadPairError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            mode, size = img.mode, img.size
            # The size before decoding: a damaged header may claim a huge image, whose decoding
            # would allocate gigabytes before failing.
            if size != (PAIR_WIDTH, PAIR_HEIGHT):
                raise BadPairError(
                    f"{name}: image is {size[0]}x{size[1]} (width x height); a pair is {PAIR_WIDTH}x{PAIR_HEIGHT}, "
                    "photo on the left half, colour mask on the right"
                )
            img.load()  # a truncated JPEG fails here, not at open
            if mode != "RGB":
                kind = {"L": "grayscale", "LA": "grayscale", "RGBA": "RGBA", "P": "palette"}.get(mode, mode)
                raise BadPairError(f"{name}: {kind} image (mode {mode}); a pair must be an RGB photo | colour mask")
            arr = np.asarray(img)
    except BadPairError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise BadPairError(f"{name}: not a readable image ({e})") from None
    half = PAIR_WIDTH // 2
    train_ids, near = palette.decode_color_mask(np.ascontiguousarray(arr[:, half:]))
    if near < MIN_PALETTE_FRACTION:
        raise BadPairError(
            f"{name}: the right half does not look like a Cityscapes colour mask "
            f"(only {near:.0%} of its pixels are near a palette colour)"
        )
    return Pair(photo=np.ascontiguousarray(arr[:, :half]), train_ids=train_ids)


def read_pair(path: str | os.PathLike) -> Pair:
    """Read and decode one pair file: a local path or a URI (storage.py; messages name it redacted)."""
    if storage.is_uri(path):
        try:
            data = storage.read_bytes(path)
        except storage.StorageError as e:  # its message starts with the redacted URI
            raise BadPairError(str(e)) from None
        return decode_pair(data, storage.redact(path))
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadPairError(f"{path}: cannot be read ({e.strerror or e})") from None
    return decode_pair(data, str(path))


# ---------------------------------------------------------------------------------------------
# Synthetic street scenes
# ---------------------------------------------------------------------------------------------

_COLOR = {lb.name: lb.color for lb in palette.LABELS}
_SCENE_CLASSES = ("sky", "building", "vegetation", "terrain", "sidewalk", "road", "car", "pole")


def _scene(rng: np.random.Generator, size: int = PAIR_HEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """Draw one street scene: the class of every pixel (as label names' palette colours) and a photo.

    Layout follows a dash-cam view: sky on top, buildings and trees at the horizon, a road wedge
    narrowing to a vanishing point with sidewalks beside it, cars on the road and poles at its
    edge. Photo colours are drawn per scene with texture and lighting noise, so the net has to
    learn shapes and colour ranges, not one exact value.
    """
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w]
    # class of every pixel as an index into _SCENE_CLASSES (an array of names was 6x slower)
    code = {name: np.uint8(i) for i, name in enumerate(_SCENE_CLASSES)}
    label = np.full((h, w), code["sky"], dtype=np.uint8)
    horizon = int(rng.uniform(0.35, 0.5) * h)
    vanish_x = rng.uniform(0.35, 0.65) * w

    # buildings: blocks of random height above the horizon
    x = 0
    while x < w:
        bw = int(rng.uniform(0.1, 0.3) * w)
        top = int(horizon - rng.uniform(0.1, 0.35) * h)
        kind = "vegetation" if rng.random() < 0.3 else "building"
        label[max(top, 0):horizon, x:x + bw] = code[kind]
        x += bw
    label[horizon:, :] = code["terrain"]

    # road wedge from the bottom edge to the vanishing point, sidewalks on both sides
    t = np.clip((yy - horizon) / max(h - horizon, 1), 0, 1)
    half_road = t * rng.uniform(0.45, 0.7) * w
    half_walk = half_road * rng.uniform(1.25, 1.5)
    centre = vanish_x + t * (w / 2 - vanish_x) * rng.uniform(0.5, 1.0)
    below = yy >= horizon
    label[below & (np.abs(xx - centre) < half_walk)] = code["sidewalk"]
    label[below & (np.abs(xx - centre) < half_road)] = code["road"]

    # cars on the road, perspective-scaled
    for _ in range(rng.integers(0, 4)):
        cy = int(rng.uniform(horizon + 0.1 * h, h - 5))
        row_t = (cy - horizon) / max(h - horizon, 1)
        cw = max(int(row_t * 0.35 * w), 4)
        ch = max(int(cw * 0.6), 3)
        cx = int(centre[cy, 0] + rng.uniform(-1, 1) * max(half_road[cy, 0] - cw / 2, 1))
        label[max(cy - ch, 0):cy, max(cx - cw // 2, 0):cx + cw // 2] = code["car"]

    # poles at the sidewalk edge
    for _ in range(rng.integers(0, 3)):
        px = int(rng.uniform(0, w - 3))
        ptop = int(rng.uniform(0.05, 0.3) * h)
        label[ptop:int(horizon + rng.uniform(0.05, 0.2) * h), px:px + 3] = code["pole"]

    names = sorted(_SCENE_CLASSES[i] for i in np.unique(label))  # colours are drawn in name order
    photo = np.zeros((h, w, 3), dtype=np.float32)
    mask = np.zeros((h, w, 3), dtype=np.uint8)
    base_photo_color = {
        "sky": (135, 170, 215), "building": (110, 100, 95), "vegetation": (60, 110, 50),
        "terrain": (120, 140, 80), "sidewalk": (170, 160, 150), "road": (80, 80, 85),
        "car": (40, 50, 120), "pole": (60, 60, 60),
    }
    for name in names:
        sel = label == code[name]
        jitter = rng.normal(0, 18, 3)
        photo[sel] = np.clip(np.array(base_photo_color[name]) + jitter, 0, 255)
        mask[sel] = _COLOR[name]
    photo += rng.normal(0, 10, (h, w, 1)) + rng.normal(0, 4, (h, w, 3))  # texture
    photo *= rng.uniform(0.7, 1.2) * (1 - 0.2 * (yy / h))[..., None]  # exposure, vignette
    return np.clip(photo, 0, 255).astype(np.uint8), mask


def synth_pair_bytes(rng: np.random.Generator, quality: int = 95) -> bytes:
    """One synthetic pair as JPEG bytes like the users' files: 256x512, photo | mask, 4:2:0 chroma."""
    photo, mask = _scene(rng)
    buf = io.BytesIO()
    Image.fromarray(np.concatenate([photo, mask], axis=1)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def synth_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(photo, exact colour mask) before JPEG, for tests of mask decoding."""
    return _scene(rng)


def write_synthetic(out: str | os.PathLike, n_train: int, n_val: int, seed: int = 0) -> Path:
    """Write `out/train/1.jpg..` and `out/val/1.jpg..`; the same seed gives the same files."""
    if n_train < 1 or n_val < 1:
        raise ValueError(f"synthetic data needs at least 1 train and 1 val pair, got {n_train} and {n_val}")
    out = Path(out)
    for split, n, split_seed in (("train", n_train, seed), ("val", n_val, seed + 1_000_003)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(split_seed)
        for i in range(1, n + 1):
            (folder / f"{i}.jpg").write_bytes(synth_pair_bytes(rng))
    return out
