"""`unet-ray predict`: class masks for any number of photos or pair files, with Ray Data.

Driver: lists the input files, `ray.data.from_items` of their paths, `map_batches` through a pool
of model actors, then iterates the actors' small result rows, keeping only counters and summed
confusion matrices (and appending bad files to skipped.txt as they arrive): the driver's memory
stays flat however many photos there are.

Actors (`Predictor`) load the model once, read each file, predict at the model's square size and
write `<name>_mask.png` (class ids), `<name>_color.png` (Cityscapes colours) and optionally
`<name>_overlay.png` straight to the output folder. Nothing image-sized goes back to the driver.

Pair files (256x512 photo | colour mask) are predicted from their left half and scored against
their right half at the model's resolution, decoded exactly as `unet-ray evaluate` decodes them,
so the IoU printed here equals evaluate's on the same files.

Checkpoint, inputs and output folder may each be a local path or an object-storage URI
(storage.py). With URIs the driver only lists: each actor fetches the checkpoint into its node's
cache (checkpoint.fetch), reads its own input files' bytes (storage.read_bytes) and writes its
PNGs as single objects (storage.write_bytes); the driver writes skipped.txt as a stream and
summary.json at the end. Every path or URI printed or written is redacted (storage.redact).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np

from unet_ray import jsonfile, layouts, palette, storage
from unet_ray.pairs import PAIR_HEIGHT, PAIR_WIDTH, SPLITS, BadPairError, decode_pair, is_pairs_folder, list_pairs, uri_stem
from unet_ray.prepared_format import DataError

# What a plain photo folder is searched for (a pairs folder keeps pairs.IMAGE_SUFFIXES).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INPUT_KINDS = ("auto", "photo", "pair")
SKIPPED_FILE = "skipped.txt"
SUMMARY_FILE = "summary.json"
OUTPUT_SUFFIXES = ("_mask.png", "_color.png")
OVERLAY_SUFFIX = "_overlay.png"
OVERLAY_ALPHA = 0.5
# CPUs left free beside the actors, for Ray Data's own tasks and the driver.
RESERVE_CPUS = 0.5
MIN_ACTOR_CPUS = 0.25
MAX_BLOCKS = 2000
SKIPPED_SHOWN = 20  # bad files printed one by one; the rest are only in skipped.txt


class BadInputError(ValueError):
    """An input file that cannot be predicted; the message starts with the file's path."""


class PredictionFailed(RuntimeError):
    """The prediction run itself failed (not one bad input); the message says why."""


# ---------------------------------------------------------------------------------------------
# Listing inputs (driver)
# ---------------------------------------------------------------------------------------------


def list_inputs(
    inputs: list[str], kind: str = "auto", out: str | os.PathLike | None = None, classes: palette.ClassSet | None = None
) -> tuple[list[dict[str, str]], dict[str, str]]:
    """(one item {path, name, kind, split} per input file, with output names that never collide;
    {output name: input path} of the inputs whose names had to be told apart).

    - a pairs folder (with train/ and/or val/): all its pair files, read as pairs and named
      `<split>_<stem>`, so train/1.jpg and val/1.jpg give train_1_* and val_1_*;
    - any other folder: its image files, searched recursively, named by their relative path
      (prefixed with the folder's name when several inputs are given);
    - a Cityscapes or folders layout's root (layouts.py): its images with their masks, named
      `<split>_<path below the split>`, scored; their classes must be the model's `classes`;
    - a file: itself, named by its stem.
    Files under `out` are left out, so predicting into the input folder does not re-read masks.
    A name that is still taken gets -2, -3, ... appended; the second value then names the input of
    each of the names involved (the one that kept the name, too), so outputs can be traced back.
    Inputs may be URIs (storage.py): listed the same way, item paths are URIs, and the second
    value names them redacted.
    """
    if kind not in INPUT_KINDS:
        raise DataError(f"input kind {kind!r}: choose one of {', '.join(INPUT_KINDS)}")
    if not inputs:
        raise DataError("no inputs given")
    out_dir = None if out is None or storage.is_uri(out) else Path(out).expanduser().resolve()
    out_uri = os.fspath(out) if out is not None and storage.is_uri(out) else None
    items: list[dict[str, str]] = []
    taken: dict[str, str] = {}  # output name -> input path
    collisions: dict[str, str] = {}

    def add(path: Path | str, name: str, item_kind: str, split: str = "", mask: str = "", coding: str = "") -> None:
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        taken[unique] = storage.redact(str(path))
        if unique != name:
            collisions[name], collisions[unique] = taken[name], taken[unique]
        items.append({"path": str(path), "name": unique, "kind": item_kind, "split": split, "mask": mask or "", "coding": coding})

    for given in inputs:
        if storage.is_uri(given):
            _list_uri(given, kind, out_uri, len(inputs) > 1, add, classes)
            continue
        path = Path(given).expanduser().resolve()
        if not path.exists():
            raise DataError(f"input {given} does not exist")
        if path.is_file():
            add(path, path.stem, kind)
        elif _add_layout(path, add, classes):
            pass
        elif is_pairs_folder(path):
            for split in SPLITS:
                if not (path / split).is_dir():
                    continue
                try:
                    files = list_pairs(path, split)
                except FileNotFoundError:  # an empty split folder: nothing to predict there
                    files = []
                for file in files:
                    add(file, f"{split}_{file.stem}", "pair", split)
        else:
            files = sorted(
                p for p in path.rglob("*")
                if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file() and not _inside(p, out_dir)
            )
            # with several inputs, the folder's own name keeps a/1.jpg and b/1.jpg apart
            prefix = (path.name,) if len(inputs) > 1 else ()
            for file in files:
                add(file, "_".join(prefix + file.relative_to(path).with_suffix("").parts), kind)
    if not items:
        raise DataError(f"no image files ({', '.join(PHOTO_SUFFIXES)}) in {', '.join(storage.redact(i) for i in inputs)}")
    return items, collisions


def _add_layout(root: Path | str, add, classes: palette.ClassSet | None) -> bool:
    """A Cityscapes or folders layout's images with their masks, named <split>_<name> (the path
    below the split's folder, "/" -> "_"), to be predicted and scored against the model's
    `classes` (a DataError when they do not fit); False for other folders."""
    kind = layouts.kind_of(root)
    if kind not in ("cityscapes", "folders"):
        return False
    found = layouts.detect(root, kind)  # a bad classes.yaml is an error, not a folder of photos
    if classes is not None:
        layouts.check_model_classes(found, classes.label_set, classes.names)
    coding = found.coding.to_json()
    for split in SPLITS:
        try:
            items, problems = found.items(split)
        except DataError:  # an empty split: nothing to predict there
            continue
        if problems:
            raise DataError(f"{problems[0]}" + (f" (and {len(problems) - 1} more files without a partner)" if len(problems) > 1 else ""))
        for item in items:
            add(item.image, f"{split}_{item.name.replace('/', '_')}", "layout", split, mask=item.mask, coding=coding)
    return True


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def _list_uri(given: str, kind: str, out_uri: str | None, prefixed: bool, add, classes=None) -> None:
    """list_inputs for one input URI: a file, a pairs folder or a folder of photos (recursive),
    named as a local input of the same shape would be."""
    shown = storage.redact(given)
    if storage.is_file(given):
        add(given, uri_stem(given), kind)
        return
    if not storage.exists(given):
        raise DataError(f"input {shown} does not exist")
    if _add_layout(given, add, classes):
        return
    if is_pairs_folder(given):
        for split in SPLITS:
            try:
                files = list_pairs(given, split)
            except FileNotFoundError:  # no such split, or an empty one: nothing to predict there
                files = []
            for file in files:
                add(file, f"{split}_{uri_stem(file)}", "pair", split)
        return
    fs, base = storage.resolve(given)
    base = base.rstrip("/")
    out_path = None
    if out_uri is not None:
        out_fs, out_path = storage.resolve(out_uri)
        out_path = out_path.rstrip("/") if type(out_fs) is type(fs) else None
    # with several inputs, the folder's own name keeps a/1.jpg and b/1.jpg apart
    prefix = (base.rsplit("/", 1)[-1],) if prefixed else ()
    # list_files gives each file as the folder's URI (before its query) + "/" + the relative path
    # + the folder's query: the relative path is cut out of that, without resolving every file
    head, sep, query = given.partition("?")
    start, end = len(head.rstrip("/")) + 1, len(sep + query)
    for file in storage.list_files(given, PHOTO_SUFFIXES, recursive=True):
        relative = file[start : len(file) - end]
        if out_path is not None and f"{base}/{relative}".startswith(out_path + "/"):
            continue  # an earlier run's outputs inside the input folder
        add(file, "_".join(prefix + PurePosixPath(relative).with_suffix("").parts), kind)


# ---------------------------------------------------------------------------------------------
# Reading one input and writing its outputs (actors)
# ---------------------------------------------------------------------------------------------


def read_input(path: str, kind: str = "auto", mask: str = "", coding: str = "") -> tuple[np.ndarray, np.ndarray | None]:
    """(photo (H, W, 3) uint8, class ids of its mask (Cityscapes train ids for pairs) or None) of
    one file.

    kind "pair": must be a pair file; "photo": any image, used whole; "auto": a pair file when it is
    256x512 and its right half is a colour mask, else a photo; "layout": a photo with its `mask`
    file, read as layouts.read_item reads it with the MaskCoding `coding` (JSON). Raises BadInputError.
    """
    if kind == "layout":
        try:
            return layouts.read_item(layouts.Item(path, mask, uri_stem(path)), layouts.MaskCoding.from_json(coding))
        except BadPairError as e:
            raise BadInputError(str(e)) from None
    if storage.is_uri(path):  # read here, in the actor: the driver never holds the photos
        try:
            data = storage.read_bytes(path)
        except storage.StorageError as e:  # one line that starts with the redacted URI
            raise BadInputError(str(e)) from None
        path = storage.redact(path)
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BadInputError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not data:
        raise BadInputError(f"{path}: empty file (0 bytes)")
    if kind == "pair" or (kind == "auto" and _image_size(data) == (PAIR_WIDTH, PAIR_HEIGHT)):
        try:
            pair = decode_pair(data, path)
            return pair.photo, pair.train_ids
        except BadPairError as e:
            if kind == "pair":
                raise BadInputError(str(e)) from None
            # auto: a 512x256 image whose right half is no colour mask is a plain photo
    return decode_photo(data, path), None


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header only, or None when PIL cannot even open it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    # DecompressionBombError: a header claiming more than 2 x Image.MAX_IMAGE_PIXELS pixels (a
    # hostile or broken file); not an OSError, so it would otherwise stop the actor and the run.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # decode_photo reports why


def decode_photo(data: bytes, name: str) -> np.ndarray:
    """Image bytes -> RGB (H, W, 3) uint8, turned as its EXIF orientation says (as viewers show it)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a truncated file fails here, not at open
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadInputError(f"{name}: not a readable image ({e})") from None


def output_paths(out: str | os.PathLike, name: str, overlay: bool) -> list[Path] | list[str]:
    """The output files of input `name`: Paths in a local `out`, URIs in a URI `out`."""
    suffixes = OUTPUT_SUFFIXES + ((OVERLAY_SUFFIX,) if overlay else ())
    if storage.is_uri(out):
        return [storage.join(out, f"{name}{suffix}") for suffix in suffixes]
    return [Path(out) / f"{name}{suffix}" for suffix in suffixes]


def _is_file(path: Path | str) -> bool:
    return storage.is_file(path) if storage.is_uri(path) else Path(path).is_file()


def overlay_image(photo: np.ndarray, color: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The photo with the colour mask blended in. Black (background of the road task, ignored
    pixels) is left out of the blend: it would only darken the photo."""
    coloured = color.any(axis=2, keepdims=True)
    blended = photo.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha
    return np.where(coloured, np.rint(blended), photo).astype(np.uint8)


def save_png(array: np.ndarray, path: Path | str) -> None:
    """Written under a temporary name and renamed: a killed run never leaves a half PNG that
    --skip-existing would take for a finished one. To a URI: encoded in memory (the same bytes)
    and written as one object, which object storage makes visible whole or not at all."""
    from PIL import Image

    if storage.is_uri(path):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        storage.write_bytes(path, buffer.getvalue())
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def confusion_counts(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Flattened confusion matrix (truth t, predicted p at t*K+p), ignored pixels left out,
    exactly as metrics.ConfusionMatrix.update counts."""
    valid = truth != palette.IGNORE_INDEX
    index = truth[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes)


class Predictor:
    """map_batches class: one model per actor, loaded once; a batch of paths in, small rows out."""

    def __init__(
        self,
        checkpoint: str,
        out: str,
        overlay: bool,
        skip_existing: bool,
        device: str,
        torch_threads: int,
        flip_tta: bool = False,
    ):
        import torch

        from unet_ray.checkpoint import load_model

        torch.set_num_threads(torch_threads)
        self.device = torch.device(device)
        # one photo size per run: cuDNN picks its fastest convolution once and keeps it
        torch.backends.cudnn.benchmark = self.device.type == "cuda"
        self.model, cfg, _ = load_model(checkpoint, self.device)
        self.shape, self.label_set, self.num_classes = cfg.data.shape, cfg.data.classes, cfg.num_classes
        self.classes = cfg.class_set
        self.out = out if storage.is_uri(out) else Path(out)
        self.overlay, self.skip_existing = overlay, skip_existing
        self.flip_tta = flip_tta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, k = len(batch["path"]), self.num_classes
        status, errors = np.array(["ok"] * n, dtype=object), np.array([""] * n, dtype=object)
        confusion = np.zeros((n, k * k), dtype=np.int64)
        has_truth = np.zeros(n, dtype=bool)
        # (row, photo's (h, w), the photo itself only when an overlay needs it, photo at model size,
        # truth at model size or None): large photos are not kept a whole batch long without need
        loaded = []
        no_masks = np.array([""] * n, dtype=object)  # items of photos and pairs may leave these out
        columns = (batch["path"], batch["name"], batch["kind"], batch.get("mask", no_masks), batch.get("coding", no_masks))
        for i, (path, name, kind, mask, coding) in enumerate(zip(*columns)):
            if self.skip_existing and all(_is_file(p) for p in output_paths(self.out, name, self.overlay)):
                status[i] = "exists"
                continue
            try:
                photo, train_ids = read_input(path, kind, mask, coding)
            except BadInputError as e:
                status[i], errors[i] = "bad", str(e)
                continue
            small, truth = to_model_size(photo, train_ids, self.shape, self.label_set)
            loaded.append((i, photo.shape[:2], photo if self.overlay else None, small, truth))
        if loaded:
            logits = self._predict(np.stack([row[3] for row in loaded]))
            for (i, shape, photo, _, truth), one_logits in zip(loaded, logits):
                if truth is not None:
                    confusion[i], has_truth[i] = confusion_counts(truth, _classes(one_logits), k), True
                try:
                    self._write(batch["name"][i], _classes(one_logits, shape), photo)
                except (OSError, storage.StorageError) as e:
                    where, out = storage.redact(batch["path"][i]), storage.redact(str(self.out))
                    status[i], errors[i] = "unwritten", f"{where}: outputs cannot be written to {out} ({e})"
        return {
            "path": batch["path"],
            "split": batch["split"],
            "status": status,
            "error": errors,
            "has_truth": has_truth,
            "confusion": confusion,
        }

    def _predict(self, images: np.ndarray):
        """uint8 (N, H, W, 3) -> fp32 logits (N, K, H, W) on the CPU; fp32 also on GPUs, as evaluate runs."""
        import torch

        from unet_ray.engine import exact_fp32, predict_logits, to_model_input

        with torch.inference_mode(), exact_fp32(self.device):  # TF32 off on GPUs: the IoU equals evaluate's
            return predict_logits(self.model, to_model_input(torch.from_numpy(images), self.device), self.flip_tta).cpu()

    def _write(self, name: str, mask: np.ndarray, photo: np.ndarray | None) -> None:
        color = self.classes.colorize(mask)
        paths = output_paths(self.out, name, self.overlay)
        save_png(mask, paths[0])
        save_png(color, paths[1])
        if photo is not None:
            save_png(overlay_image(photo, color), paths[2])


def _classes(logits, shape: tuple[int, int] | None = None) -> np.ndarray:
    """One image's logits (K, h, w) -> class ids (uint8) at the model's size, or at `shape` (the
    photo's own size: the logits upsampled bilinearly first, as evaluate scores native sizes)."""
    import torch

    from unet_ray.engine import to_native_size
    from unet_ray.model import predict_classes

    with torch.inference_mode():
        logits = logits[None] if shape is None else to_native_size(logits[None], shape)
        return predict_classes(logits)[0].to(torch.uint8).numpy()


def to_model_size(photo: np.ndarray, train_ids: np.ndarray | None, size: int | tuple[int, int], label_set: str):
    """(photo at the model's (height, width), class ids of the label set at that size or None).

    Pairs go through transforms.resize_pair, as evaluate and prepare resize them; plain photos are
    shrunk the same way (area interpolation: no aliasing), whatever their aspect ratio.
    """
    import cv2

    from unet_ray.transforms import resize_pair

    if train_ids is not None:
        small, ids = resize_pair(photo, train_ids, size)
        return small, palette.to_label_set(ids, label_set)
    height, width = (size, size) if isinstance(size, int) else size
    if photo.shape[:2] != (height, width):
        photo = cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(photo), None


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def actor_resources(workers: int, gpu: bool, cluster: dict[str, float]) -> tuple[dict[str, Any], int, int]:
    """(map_batches resources, actors, torch threads per actor).

    CPU actors ask for a fraction of a CPU: whole CPUs would leave nothing for Ray Data's own
    tasks on a small machine, and the run would wait forever.
    """
    if workers < 1:
        raise DataError(f"--workers {workers}: must be >= 1")
    if gpu:
        gpus = int(cluster.get("GPU", 0))
        if gpus < 1:
            raise DataError("--gpu: the Ray cluster has no GPUs; leave out --gpu to predict on CPUs")
        # An actor decodes its photos and encodes its PNGs on one CPU, and the GPU waits meanwhile:
        # several actors share each GPU (a fraction each, packing evenly) so that one decodes
        # while another's batch runs on the GPU.
        per_gpu = math.ceil(workers / gpus)
        return {"num_gpus": 1 / per_gpu, "num_cpus": 1}, workers, 1
    cpus = max(MIN_ACTOR_CPUS, (cluster.get("CPU", 1) - RESERVE_CPUS) / workers)
    cpus = math.floor(cpus * 100) / 100
    return {"num_cpus": cpus}, workers, max(1, int(cpus + 0.5))


class _Tally:
    """What the driver keeps while results stream in: counters and summed confusion matrices."""

    def __init__(self, num_classes: int):
        # ok: written; bad: unreadable; unwritten: read but its PNGs failed; exists: --skip-existing
        self.counts = {"ok": 0, "bad": 0, "unwritten": 0, "exists": 0}
        self.pairs = 0
        self.confusion: dict[str, np.ndarray] = {}
        self.num_classes = num_classes

    def add(self, rows: dict[str, np.ndarray]) -> list[str]:
        """Count a batch of result rows; returns the error messages of its bad files."""
        for status in rows["status"]:
            self.counts[status] += 1
        truth = rows["has_truth"]
        self.pairs += int(truth.sum())
        for split in set(rows["split"][truth]):
            summed = rows["confusion"][truth & (rows["split"] == split)].sum(axis=0)
            self.confusion[split] = self.confusion.get(split, 0) + summed
        return [str(e) for e, s in zip(rows["error"], rows["status"]) if s in ("bad", "unwritten")]

    def skipped(self) -> int:
        return self.counts["bad"] + self.counts["unwritten"]

    def done(self) -> int:
        return sum(self.counts.values())

    def scores(self) -> dict[str, Any]:
        """IoU over all pair files, and per split when several splits were predicted."""
        if not self.confusion:
            return {}
        k = self.num_classes
        total = sum(self.confusion.values())
        result = {"metrics": scores_from_confusion(total, k)}
        result["iou"] = result["metrics"]["val_iou"]
        named = {s: m for s, m in self.confusion.items() if s}
        if len(named) > 1 or (named and len(named) != len(self.confusion)):
            result["by_split"] = {s: scores_from_confusion(named[s], k) for s in sorted(named)}
        return result


def scores_from_confusion(flat: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The metrics evaluate prints, from a flattened confusion matrix."""
    import torch

    from unet_ray import metrics

    scores = metrics.metrics_from_confusion(torch.from_numpy(np.asarray(flat).reshape(num_classes, num_classes)))
    return {
        **metrics.headline(scores, num_classes),
        "val_miou": scores["miou"],
        "val_pixel_accuracy": scores["pixel_accuracy"],
        "val_iou_per_class": scores["iou_per_class"],
        "val_pixels": int(np.asarray(flat).sum()),
    }


def predict(
    checkpoint: str | os.PathLike,
    inputs: list[str],
    out: str | os.PathLike,
    workers: int = 2,
    gpu: bool = False,
    overlay: bool = False,
    batch_size: int = 16,
    kind: str = "auto",
    skip_existing: bool = False,
    flip_tta: bool = False,
    progress=print,
) -> dict[str, Any]:
    """Predict every input file into `out`; returns (and writes to out/summary.json) the summary.
    Raises DataError when every input was skipped (the summary and skipped.txt are written first).
    `checkpoint`, each input and `out` may be local paths or URIs (see the module docstring)."""
    from unet_ray.checkpoint import load_model, locate
    from unet_ray.raysession import ensure_ray

    # Checked before anything starts: an impossible count should not wait for the model or Ray.
    if workers < 1:
        raise DataError(f"--workers {workers}: must be >= 1")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be >= 1")
    # Load once here so a bad checkpoint stops the run with a clear message before Ray starts. The
    # actors get its state.pt (a path, or a URI each one fetches), not a run folder's best.json,
    # which a training run still going may change meanwhile.
    state_file = locate(checkpoint)
    _, cfg, state = load_model(state_file)
    remote = storage.is_uri(out)
    out = os.fspath(out) if remote else Path(out).expanduser().resolve()
    shown_out, skipped_list = storage.redact(str(out)), storage.join(out, SKIPPED_FILE)
    items, name_collisions = list_inputs(inputs, kind, out, cfg.class_set)
    try:
        if remote:
            storage.write_text(skipped_list, "")  # also proves the folder is writable, before Ray starts
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / SKIPPED_FILE).write_text("")
    except OSError as e:
        raise DataError(f"output folder {out} cannot be written ({e.strerror or e})") from None
    except storage.StorageError as e:
        raise DataError(f"output folder cannot be written: {e}") from None
    total = len(items)
    progress(
        f"predict: {total} files -> {shown_out} (model {cfg.data.image_size}px, {cfg.data.classes}, "
        f"epoch {state['epoch']} of {storage.redact(state_file)})"
    )

    ensure_ray(progress)
    import ray
    from ray.data import DataContext

    # Our own line every few files shows progress; Ray Data's bars would interleave with it.
    DataContext.get_current().enable_progress_bars = False

    resources, actors, threads = actor_resources(workers, gpu, ray.cluster_resources())
    # One batch per block, so that every actor gets work early; at most MAX_BLOCKS blocks, as each
    # costs a little scheduling and metadata on the driver.
    rows_per_block = max(batch_size, math.ceil(total / MAX_BLOCKS))
    blocks = math.ceil(total / rows_per_block)
    actors = min(actors, blocks)  # an actor without a block would only load the model for nothing
    each = ", ".join(f"{k}={v:g}" for k, v in resources.items())
    progress(f"predict: {actors} model actor{'s' if actors != 1 else ''} ({each} each)")
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    del items  # the paths now live in Ray's object store, not in the driver
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "checkpoint": state_file,
            "out": str(out),
            "overlay": overlay,
            "skip_existing": skip_existing,
            "device": "cuda" if gpu else "cpu",
            "torch_threads": threads,
            "flip_tta": flip_tta,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        **resources,
    )

    tally = _Tally(cfg.num_classes)
    every = max(1, min(1000, total // 20))
    start = last_shown = time.perf_counter()
    shown_done = 0
    with _text_writer(skipped_list) as skipped_file:
        try:
            for rows in ds.iter_batches(batch_size=None, batch_format="numpy"):  # one block at a time
                for message in tally.add(rows):
                    skipped_file.write(message + "\n")
                    if tally.skipped() <= SKIPPED_SHOWN:
                        progress(f"skipped {message}")
                done = tally.done()
                if done - shown_done >= every or time.perf_counter() - last_shown > 30:
                    rate = done / max(time.perf_counter() - start, 1e-9)
                    progress(f"predict: {done}/{total} files ({rate:.1f}/s, ~{(total - done) / max(rate, 1e-9):.0f}s left)")
                    shown_done, last_shown = done, time.perf_counter()
        except Exception as e:  # Ray wraps actor errors; keep the user's message, not Ray's stack
            raise PredictionFailed(f"prediction failed: {_root_cause(e)}") from e
    seconds = time.perf_counter() - start

    skipped = tally.skipped()
    if skipped:
        more = f" ({skipped - SKIPPED_SHOWN} not shown above)" if skipped > SKIPPED_SHOWN else ""
        progress(f"skipped {skipped} of {total} files{more}; listed in {storage.redact(skipped_list)}")
    summary = {
        "checkpoint": storage.redact(state_file),
        "out": shown_out,
        "classes": cfg.data.classes,
        "image_size": cfg.data.image_size,
        "inputs": total,
        "read": tally.counts["ok"] + tally.counts["unwritten"],
        "written": tally.counts["ok"],
        "skipped": skipped,
        **({"existing": tally.counts["exists"]} if skip_existing else {}),
        # outputs named <name>-2, -3, ...: which input each of the colliding names came from
        **({"name_collisions": name_collisions} if name_collisions else {}),
        "pairs": tally.pairs,
        **tally.scores(),
        "skipped_list": storage.redact(skipped_list),
        "seconds": round(seconds, 2),
        "files_per_s": round(tally.done() / max(seconds, 1e-9), 2),
    }
    if remote:
        storage.write_text(storage.join(out, SUMMARY_FILE), jsonfile.dumps(summary, indent=2))
    else:
        (out / SUMMARY_FILE).write_text(jsonfile.dumps(summary, indent=2))
    if skipped == total:
        # Nothing came out: a job must end FAILED, not look like a finished run.
        raise DataError(
            f"none of the {total} files could be predicted; every one was skipped (reasons in {storage.redact(skipped_list)})"
        )
    return summary


class _StreamText:
    """write(str) onto a pyarrow output stream (object storage has no appending to a file)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        self.stream.write(text.encode("utf-8"))


def _unwritable(target: str, error: BaseException) -> DataError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(f"{storage.redact(target)} cannot be written ({reason})")


@contextlib.contextmanager
def _text_writer(target: Path | str) -> Iterator[Any]:
    """A text file written line by line as results arrive: a local file, or for a URI one object
    streamed (buffered, then a multipart upload past a few MB; complete when closed), so that the
    driver never holds all the lines."""
    if not storage.is_uri(target):
        with open(target, "w") as f:
            yield f
        return
    import pyarrow as pa

    fs, path = storage.resolve(target)
    try:
        stream = fs.open_output_stream(path)
    except (OSError, pa.ArrowException) as e:
        raise _unwritable(target, e) from None
    try:
        yield _StreamText(stream)
    except BaseException:
        with contextlib.suppress(OSError, pa.ArrowException):
            stream.close()  # what was written so far, as a local file keeps it
        raise
    try:
        stream.close()  # the upload completes here
    except (OSError, pa.ArrowException) as e:
        raise _unwritable(target, e) from None


def _root_cause(error: BaseException) -> str:
    from unet_ray.raysession import root_cause

    return root_cause(error)
