"""What a data folder is, and reading its items as (photo, class-id mask): three layouts.

pairs       train/*.jpg and val/*.jpg: 256x512 JPEGs, photo | Cityscapes colour mask (pairs.py).
cityscapes  the official layout, as unpacked from leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip:
            leftImg8bit/<split>/<city>/<key>_leftImg8bit.png beside
            gtFine/<split>/<city>/<key>_gtFine_labelTrainIds.png where present (made by
            cityscapesscripts' createTrainIdLabelImgs), else <key>_gtFine_labelIds.png, whose label
            ids are mapped to the 19 training classes with the official table (palette.LABELS).
folders     train/images + train/masks and val/images + val/masks, or one images/ + masks/ split
            by data.val_fraction; an image and its mask share their path below images/ and masks/
            without the suffix (a/b.jpg <-> a/b.png). Masks are 8-bit PNGs of class ids (or palette
            PNGs, VOC-style) or RGB PNGs in the classes' colours; classes.yaml beside them:
                classes:
                  - {name: background, color: [0, 0, 0]}
                  - {name: building, color: [230, 25, 75]}
                ignore_index: 255          # optional, the default
                ignore_color: [255, 255, 255]   # optional: RGB masks' colour of ignored pixels

Listing (`Layout.items`) pairs images with masks by name and reports every image without its mask
and mask without its image; reading (`read_item`) checks each file (sizes that differ, 16-bit or
RGB masks where ids are expected, ids outside the classes) and raises BadPairError naming it. Both
work on local paths and URIs (storage.py). Plain NumPy/PIL: prepare's Ray tasks, evaluate and
predict all read items through here.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from unet_ray import palette, storage
from unet_ray.pairs import SPLITS, BadPairError, is_pairs_folder, list_pairs, read_pair, uri_stem
from unet_ray.prepared_format import DataError

LAYOUTS = ("pairs", "cityscapes", "folders")
CLASSES_FILE = "classes.yaml"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CITYSCAPES_IMAGE = "_leftImg8bit.png"
CITYSCAPES_MASKS = ("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png")  # preferred first
VAL_SPLIT_SEED = 0  # which files of one images/ + masks/ folder are held out for val


@dataclass(frozen=True)
class Item:
    """One training example: its photo, its mask (None for a pair file: both are in one) and its
    name (path below the split's folder, without suffix: "aachen/aachen_000000_000019")."""

    image: str
    mask: str | None
    name: str


@dataclass(frozen=True)
class MaskCoding:
    """How a layout's mask files become class ids (small and picklable: Ray tasks get it)."""

    layout: str
    num_classes: int = 19
    ignore_index: int = palette.IGNORE_INDEX  # in the files; rows always store IGNORE_INDEX
    colors: tuple[tuple[int, int, int], ...] = ()  # folders: RGB masks' colour of each class id
    ignore_color: tuple[int, int, int] | None = None

    def to_json(self) -> str:
        """As a string (a column value of predict's items)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "MaskCoding":
        values = json.loads(text)
        colors, ignore = values.pop("colors"), values.pop("ignore_color")
        return cls(**values, colors=tuple(tuple(c) for c in colors), ignore_color=tuple(ignore) if ignore else None)


@dataclass
class Layout:
    kind: str  # one of LAYOUTS
    root: str | Path
    coding: MaskCoding
    classes: palette.ClassSet | None = None  # the layout's own classes (None for pairs: road or 19)
    val_fraction: float = 0.2
    # per split: (items, problems). A problem is "path: what is wrong" for a file left without its
    # partner; callers stop on them or, with --skip-bad-files, list them as skipped.
    _listed: dict[str, tuple[list[Item], list[str]]] = field(default_factory=dict, repr=False)

    @property
    def shown(self) -> str:
        return storage.redact(self.root)

    def items(self, split: str) -> tuple[list[Item], list[str]]:
        """(items of `split` in a fixed order, files that cannot be paired); a DataError when the
        split has nothing at all."""
        if split not in self._listed:
            if self.kind == "pairs":
                try:
                    listed = ([Item(str(p), None, uri_stem(p)) for p in list_pairs(self.root, split)], [])
                except FileNotFoundError as e:
                    raise DataError(str(e)) from None
                self._listed[split] = listed
            elif self.kind == "cityscapes":
                self._listed[split] = _cityscapes_items(self.root, split)
            else:
                for listed_split, listed in _folders_items(self.root, split, self.val_fraction).items():
                    self._listed.setdefault(listed_split, listed)
        return self._listed[split]

    def check_paired(self, skip_bad_files: bool) -> list[str]:
        """Every split's unpaired files: a DataError listing them, or (skip_bad_files) the list."""
        problems = [p for split in SPLITS for p in self.items(split)[1]]
        if problems and not skip_bad_files:
            listing = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            raise DataError(
                f"{len(problems)} files in {self.shown} ({self.kind} layout) have no partner:\n  {listing}\n"
                "Add the missing files, or pass --skip-bad-files to leave these out (they are listed in skipped.txt)."
            )
        return problems


# ---------------------------------------------------------------------------------------------
# Detecting a layout
# ---------------------------------------------------------------------------------------------


def detect(root: str | os.PathLike, forced: str = "auto", val_fraction: float = 0.2) -> Layout:
    """The layout of the data folder `root` (a local path or a URI): `forced` if not "auto"
    (checked to fit), else the first that fits; a DataError saying what was looked for otherwise."""
    root = root if storage.is_uri(root) else Path(root).expanduser().resolve()
    shown = storage.redact(root)
    wanted = {
        "cityscapes": "leftImg8bit/ and gtFine/",
        "folders": "train/images/ + train/masks/ (and val/...), or images/ + masks/, with classes.yaml",
        "pairs": "train/ and val/ of 256x512 pair JPEGs",
    }
    if forced not in ("auto", *LAYOUTS):
        raise DataError(f"--layout {forced}: choose one of auto, {', '.join(LAYOUTS)}")
    kind = kind_of(root) if forced == "auto" else forced if _has_layout(root, forced) else None
    if kind is None:
        if forced != "auto":
            raise DataError(f"{shown} is not in the {forced} layout: it needs {wanted[forced]}")
        looked = "; ".join(f"{k}: {w}" for k, w in wanted.items())
        raise DataError(f"{shown} is in none of the data layouts ({looked}), nor a prepared folder (meta.json)")
    if kind == "pairs":
        return Layout("pairs", root, MaskCoding("pairs"))
    if kind == "cityscapes":
        classes = palette.class_set("cityscapes19")
        return Layout("cityscapes", root, MaskCoding("cityscapes", len(classes)), classes)
    classes, coding = read_classes_file(root)
    return Layout("folders", root, coding, classes, val_fraction)


def kind_of(root: str | os.PathLike) -> str | None:
    """The layout whose folders `root` has (cityscapes first, then folders, then pairs), or None;
    nothing is read or checked (detect does that)."""
    return next((kind for kind in ("cityscapes", "folders", "pairs") if _has_layout(root, kind)), None)


def _has_layout(root, kind: str) -> bool:
    """Whether `root` has the folders of layout `kind` (a folders tree also looks like pairs:
    kind_of asks in order)."""
    if kind == "cityscapes":
        return _is_dir(root, "leftImg8bit") and _is_dir(root, "gtFine")
    if kind == "folders":
        return (_is_dir(root, "images") and _is_dir(root, "masks")) or any(_is_dir(root, split, "images") for split in SPLITS)
    return is_pairs_folder(root)


def _is_dir(root, *parts: str) -> bool:
    return storage.is_dir(storage.join(root, *parts))


def read_classes_file(root: str | Path) -> tuple[palette.ClassSet, MaskCoding]:
    """classes.yaml of a folders layout -> (its ClassSet, its MaskCoding); a DataError naming the
    file and the entry for anything wrong."""
    path = storage.join(root, CLASSES_FILE)
    shown = storage.redact(path)
    example = "classes:\n  - {name: background, color: [0, 0, 0]}\n  - {name: building, color: [230, 25, 75]}\nignore_index: 255"
    if not storage.is_file(path):
        raise DataError(f"{shown} is missing: a folders layout names its classes there, for example\n{example}")
    try:
        values = yaml.safe_load(storage.read_text(path))
    except yaml.YAMLError as e:
        raise DataError(f"{shown}: not valid YAML ({e})") from None
    entries = values.get("classes") if isinstance(values, dict) else None
    if not isinstance(entries, list) or len(entries) < 2:
        raise DataError(f"{shown}: needs a list `classes:` of 2 or more classes, for example\n{example}")
    unknown = set(values) - {"classes", "ignore_index", "ignore_color"}
    if unknown:
        raise DataError(f"{shown}: unknown keys {', '.join(sorted(unknown))}; known: classes, ignore_index, ignore_color")
    names, colors, given = [], [], []
    for i, entry in enumerate(entries):
        name, color = (entry, None) if isinstance(entry, str) else (entry.get("name"), entry.get("color")) if isinstance(entry, dict) else (None, None)
        if not isinstance(name, str) or not name:
            raise DataError(f"{shown}: class {i} ({entry!r}) needs a name: `- name` or `- {{name: ..., color: [r, g, b]}}`")
        try:
            colors.append(palette.parse_color(color) if color is not None else palette.DEFAULT_COLORS[i % len(palette.DEFAULT_COLORS)])
        except ValueError as e:
            raise DataError(f"{shown}: class {i} ({name}): {e}") from None
        names.append(name)
        given.append(color is not None)
    if len(set(names)) != len(names):
        raise DataError(f"{shown}: class names must differ ({', '.join(names)})")
    ignore = values.get("ignore_index", palette.IGNORE_INDEX)
    if not isinstance(ignore, int) or not len(names) <= ignore <= 255:
        raise DataError(f"{shown}: ignore_index={ignore!r} must be an id from {len(names)} to 255 (ids 0-{len(names) - 1} are classes)")
    ignore_color = values.get("ignore_color")
    try:
        ignore_color = palette.parse_color(ignore_color) if ignore_color is not None else None
    except ValueError as e:
        raise DataError(f"{shown}: ignore_color: {e}") from None
    if any(given) and not all(given):
        raise DataError(f"{shown}: give a colour to every class or to none")
    if all(given) and len(set(colors)) != len(colors):
        raise DataError(f"{shown}: two classes share a colour; RGB masks could not tell them apart")
    coding = MaskCoding("folders", len(names), ignore, tuple(colors) if all(given) else (), ignore_color)
    return palette.class_set("custom", names, colors), coding


# ---------------------------------------------------------------------------------------------
# Listing items
# ---------------------------------------------------------------------------------------------


def _relative_key(path: str, folder: str, ending: str) -> str:
    """path below folder, without `ending` (a suffix like "_leftImg8bit.png" or ".png") and
    without a URI's query (storage.list_files keeps the folder's on every file)."""
    path, folder = path.split("?", 1)[0], folder.split("?", 1)[0]
    rel = path[len(folder) :].lstrip("/").replace(os.sep, "/")
    return rel[: len(rel) - len(ending)] if ending and rel.lower().endswith(ending.lower()) else rel


def _list(folder: str, suffixes) -> list[str]:
    try:
        return storage.list_files(folder, suffixes, recursive=True)
    except storage.StorageError:
        return []


def _cityscapes_items(root, split: str) -> tuple[list[Item], list[str]]:
    images_dir, masks_dir = (os.fspath(storage.join(root, top, split)) for top in ("leftImg8bit", "gtFine"))
    images = {_relative_key(p, images_dir, CITYSCAPES_IMAGE): p for p in _list(images_dir, CITYSCAPES_IMAGE)}
    if not images:
        raise DataError(f"{storage.redact(images_dir)} holds no *{CITYSCAPES_IMAGE} files (the {split} split is empty)")
    masks: dict[str, str] = {}
    for ending in reversed(CITYSCAPES_MASKS):  # labelTrainIds, listed last, wins where both exist
        masks.update({_relative_key(p, masks_dir, ending): p for p in _list(masks_dir, ending)})
    items = [Item(images[k], masks[k], k) for k in sorted(images) if k in masks]
    problems = [
        f"{storage.redact(images[k])}: no mask (expected {storage.redact(storage.join(masks_dir, k + CITYSCAPES_MASKS[1]))})"
        for k in sorted(images) if k not in masks
    ]
    problems += [f"{storage.redact(masks[k])}: no image (expected {storage.redact(storage.join(images_dir, k + CITYSCAPES_IMAGE))})"
                 for k in sorted(masks) if k not in images]  # fmt: skip
    return items, problems


def _folders_items(root, split: str, val_fraction: float) -> dict[str, tuple[list[Item], list[str]]]:
    """{split: (items, problems)} of `split`'s own folders, or of both splits when one images/ +
    masks/ is split by `val_fraction` (listed once for both)."""
    if _is_dir(root, split, "images"):
        items, problems = _match(os.fspath(storage.join(root, split, "images")), os.fspath(storage.join(root, split, "masks")))
        if not items:
            raise DataError(f"{storage.redact(storage.join(root, split, 'images'))}: the {split} split has no image with its mask")
        return {split: (items, problems)}
    if not (_is_dir(root, "images") and _is_dir(root, "masks")):
        raise DataError(f"{storage.redact(root)}: no {split}/images/ (nor one images/ + masks/ to split)")
    items, problems = _match(os.fspath(storage.join(root, "images")), os.fspath(storage.join(root, "masks")))
    if len(items) < 2:
        raise DataError(f"{storage.redact(storage.join(root, 'images'))}: {len(items)} images with masks; splitting into train and val needs 2 or more")
    # A fixed random subset for val, the same on every run (files are often in capture order).
    order = np.random.default_rng(VAL_SPLIT_SEED).permutation(len(items))
    n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
    return {  # the unpaired files are reported once, with train
        "train": ([items[i] for i in sorted(order[n_val:])], problems),
        "val": ([items[i] for i in sorted(order[:n_val])], []),
    }


def _files_by_key(folder: str) -> dict[str, list[str]]:
    """The image files below `folder` by their path below it without suffix (several: a clash)."""
    found: dict[str, list[str]] = {}
    for p in _list(folder, PHOTO_SUFFIXES):
        found.setdefault(_relative_key(p, folder, os.path.splitext(p)[1]), []).append(p)
    return found


def _match(images_dir: str, masks_dir: str) -> tuple[list[Item], list[str]]:
    """Images and masks matched by their path below their folder without suffix."""
    images, masks = _files_by_key(images_dir), _files_by_key(masks_dir)
    items, problems = [], []
    for key in sorted(images):
        if len(images[key]) > 1 or len(masks.get(key, [])) > 1:
            both = images[key] + masks.get(key, [])
            problems.append(f"{storage.redact(both[0])}: the name {key} is taken by several files ({', '.join(storage.redact(p) for p in both[1:])})")
        elif key not in masks:
            problems.append(f"{storage.redact(images[key][0])}: no mask (expected {storage.redact(storage.join(masks_dir, key + '.png'))})")
        else:
            items.append(Item(images[key][0], masks[key][0], key))
    problems += [f"{storage.redact(masks[k][0])}: no image (expected {storage.redact(storage.join(images_dir, k))}.jpg or .png)"
                 for k in sorted(masks) if k not in images]  # fmt: skip
    return items, problems


# ---------------------------------------------------------------------------------------------
# Reading an item
# ---------------------------------------------------------------------------------------------


def read_item(item: Item, coding: MaskCoding) -> tuple[np.ndarray, np.ndarray]:
    """(photo (H, W, 3) uint8, class ids (H, W) uint8 with 255 = ignored): Cityscapes train ids
    for pairs and cityscapes, the classes.yaml ids for folders. BadPairError names a bad file."""
    if item.mask is None:
        pair = read_pair(item.image)
        return pair.photo, pair.train_ids
    photo = _open(item.image, "image", _photo_array)
    ids = _open(item.mask, "mask", lambda img, name: _mask_ids(img, name, coding))
    if photo.shape[:2] != ids.shape:
        raise BadPairError(
            f"{storage.redact(item.mask)}: mask is {ids.shape[1]}x{ids.shape[0]} (width x height) but its image "
            f"{storage.redact(item.image)} is {photo.shape[1]}x{photo.shape[0]}"
        )
    return photo, ids


def _open(path: str, what: str, convert):
    name = storage.redact(path)
    try:
        data = storage.read_bytes(path) if storage.is_uri(path) else Path(path).read_bytes()
    except storage.StorageError as e:
        raise BadPairError(str(e)) from None
    except OSError as e:
        raise BadPairError(f"{name}: cannot be read ({e.strerror or e})") from None
    if not data:
        raise BadPairError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return convert(img, name)
    except BadPairError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise BadPairError(f"{name}: not a readable {what} ({e})") from None


def _photo_array(img: Image.Image, name: str) -> np.ndarray:
    if img.mode not in ("RGB", "L", "RGBA", "P", "LA"):
        raise BadPairError(f"{name}: an image of mode {img.mode} (16-bit or float); photos must be 8-bit RGB or grayscale")
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img)


@lru_cache(maxsize=4)
def _color_table(colors: tuple[tuple[int, int, int], ...], ignore_color) -> np.ndarray:
    """Class id of every 24-bit colour: -1 for colours of no class (16M int16: 32 MB, built once)."""
    table = np.full(1 << 24, -1, np.int16)
    for class_id, (r, g, b) in enumerate(colors):
        table[(r << 16) | (g << 8) | b] = class_id
    if ignore_color is not None:
        r, g, b = ignore_color
        table[(r << 16) | (g << 8) | b] = palette.IGNORE_INDEX
    return table


_CITYSCAPES_ID_TO_TRAIN = np.full(256, -1, np.int16)
for _label in palette.LABELS:
    if _label.id >= 0:
        _CITYSCAPES_ID_TO_TRAIN[_label.id] = _label.train_id if 0 <= _label.train_id < 255 else palette.IGNORE_INDEX


def _mask_ids(img: Image.Image, name: str, coding: MaskCoding) -> np.ndarray:
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise BadPairError(f"{name}: a 16-bit or float mask (mode {mode}); class ids must be saved as an 8-bit PNG")
    if mode in ("RGB", "RGBA"):
        if coding.layout == "cityscapes" or not coding.colors:
            expected = (
                "Cityscapes label ids (the *_gtFine_labelIds.png, not *_color.png)" if coding.layout == "cityscapes"
                else "class ids (classes.yaml gives no colours to map RGB masks through)"
            )
            raise BadPairError(f"{name}: an RGB mask where single-channel {expected} are expected")
        rgb = np.asarray(img.convert("RGB") if mode == "RGBA" else img).astype(np.int32)
        ids = _color_table(coding.colors, coding.ignore_color)[(rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]]
        if (ids < 0).any():
            bad = rgb[ids < 0]
            colours, counts = np.unique(bad, axis=0, return_counts=True)
            shown = ", ".join(f"{tuple(int(v) for v in c)} ({n} px)" for c, n in sorted(zip(colours, counts), key=lambda x: -x[1])[:3])
            raise BadPairError(f"{name}: colours that are no class in {CLASSES_FILE}: {shown}" + (" ..." if len(colours) > 3 else ""))
        return ids.astype(np.uint8)
    if mode not in ("L", "P", "1"):
        raise BadPairError(f"{name}: a mask of mode {mode}; masks must be 8-bit class ids (mode L or P) or RGB colours")
    ids = np.asarray(img).astype(np.uint8)
    if coding.layout == "cityscapes":
        if name.endswith(CITYSCAPES_MASKS[0]):  # labelTrainIds
            bad = np.unique(ids[(ids >= coding.num_classes) & (ids != palette.IGNORE_INDEX)])
            if bad.size:
                raise BadPairError(f"{name}: train ids {_listing(bad)} are neither 0-{coding.num_classes - 1} nor 255")
            return ids
        mapped = _CITYSCAPES_ID_TO_TRAIN[ids]
        if (mapped < 0).any():
            raise BadPairError(f"{name}: label ids {_listing(np.unique(ids[mapped < 0]))} are not in the Cityscapes label table (0-33)")
        return mapped.astype(np.uint8)
    bad = np.unique(ids[(ids >= coding.num_classes) & (ids != coding.ignore_index)])
    if bad.size:
        raise BadPairError(
            f"{name}: class ids {_listing(bad)} are neither classes of {CLASSES_FILE} (0-{coding.num_classes - 1}) "
            f"nor its ignore_index {coding.ignore_index}"
        )
    if coding.ignore_index != palette.IGNORE_INDEX:
        ids = np.where(ids == coding.ignore_index, palette.IGNORE_INDEX, ids).astype(np.uint8)
    return ids


def _listing(values: np.ndarray) -> str:
    shown = ", ".join(str(int(v)) for v in values[:8])
    return shown + (" ..." if len(values) > 8 else "")


def val_photos(root: str | os.PathLike) -> str | None:
    """The folder of the val photos of the data folder `root` (what `predict --input` takes to
    write masks for them); <root>/val, as pairs, when `root` is in no layout (yet)."""
    try:
        kind = detect(root).kind
    except DataError:
        kind = "pairs"
    if kind == "pairs":
        return os.fspath(storage.join(root, "val"))
    if kind == "cityscapes":
        return os.fspath(storage.join(root, "leftImg8bit", "val"))
    split_folder = storage.join(root, "val", "images")
    return os.fspath(split_folder if storage.is_dir(split_folder) else storage.join(root, "images"))


def describe(layout: Layout) -> str:
    """One line for the console: the layout and its classes."""
    classes = f"; {len(layout.classes)} classes ({', '.join(layout.classes.names[:6])}{', ...' if len(layout.classes) > 6 else ''})" if layout.classes and layout.kind == "folders" else ""
    return f"{layout.kind} layout{classes}"


def check_classes(layout: Layout, label_set: str) -> str:
    """data.classes for this layout: "auto" resolved, or a DataError when it does not fit."""
    fits = {"pairs": ("road", "cityscapes19"), "cityscapes": ("road", "cityscapes19"), "folders": ("custom",)}[layout.kind]
    if label_set == "auto":
        return {"pairs": "road", "cityscapes": "cityscapes19", "folders": "custom"}[layout.kind]
    if label_set not in fits:
        hint = f"its classes come from {CLASSES_FILE}; leave --classes out" if layout.kind == "folders" else "choose road or cityscapes19"
        raise DataError(f"--classes {label_set} does not fit {layout.shown} ({layout.kind} layout): {hint}")
    return label_set


def check_model_classes(layout: Layout, label_set: str, names=None) -> None:
    """A DataError unless a model of `label_set` (for "custom": of the classes `names`, in order)
    can be scored on `layout`'s masks: pairs and Cityscapes masks give road or the 19 classes, a
    folders layout's masks the classes of its classes.yaml (evaluate and predict of a checkpoint)."""
    if layout.kind == "folders":
        own = list(layout.classes.names)
        fits = label_set == "custom" and (names is None or list(names) == own)
        what = f"{layout.kind} layout, classes {', '.join(own)}"
    else:
        fits, what = label_set in palette.LABEL_SETS, f"{layout.kind} layout"
    if not fits:
        model = f"{label_set}: {', '.join(names)}" if names else label_set
        raise DataError(f"{layout.shown} ({what}) does not fit the checkpoint's classes ({model})")
