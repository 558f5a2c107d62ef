"""A data folder in any layout (layouts.py) -> prepared Parquet, decoded by Ray Data tasks (in the
calling process for a few hundred files or fewer: IN_PROCESS_MAX_PAIRS). Reading and checking a
prepared folder, without Ray, is prepared_format.py.

Layout of a prepared folder:
    meta.json         format marker, image size, source layout, label set, class names and colours,
                      row counts, training pixels per class, bytes, skipped files
    train/*.parquet   columns id (the item's name), split, image (raw uint8 H*W*3), mask (raw uint8
                      H*W); rows in a fixed random order, part files of ~16 MB in row groups of 64 rows
    val/*.parquet     the same; for pairs also mask_native (raw uint8 256*256: the mask at the pair's
                      own resolution, for the native-size IoU users compare against)
    skipped.txt       files left out with --skip-bad-files, one "path: reason" per line

Images are stored decoded, resized and with class ids already computed, so a training epoch only
reads bytes: no image decoding and no label mapping per epoch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from unet_ray import layouts, palette, storage
from unet_ray.config import image_shape, image_size_value
from unet_ray.console import CountProgress
from unet_ray.layouts import Item, Layout, MaskCoding
from unet_ray.pairs import SPLITS, BadPairError
from unet_ray.prepared_format import FORMAT, META_FILE, NATIVE_SIZE, SKIPPED_FILE, DataError
from unet_ray.transforms import resize_pair

# Ray Data tasks ask for a quarter CPU: on a 2-CPU machine they must still fit beside training
# workers (a task asking for a whole CPU would wait forever once workers hold the CPUs).
DATA_TASK_CPUS = 0.25
# Up to this many pair files are decoded in the calling process rather than by Ray Data tasks:
# starting the tasks' worker processes costs ~9 s on a 2-core VM, while one process decodes 128
# pairs in 1.7 s (measured). The built-in synthetic data (128 pairs) and small tests stay in
# process; a real data set (thousands of pairs) is decoded in parallel across the cluster.
IN_PROCESS_MAX_PAIRS = 256
DECODE_BATCH = 32  # pairs per decode batch (a Ray task's batch, or a progress step in process)
# Part files of about 16 MB, in row groups of 64 rows: a streaming read task reads a row group
# at a time (one Ray Data block of a few MB), and file-level shuffling (data.py) has a few dozen
# files to draw from per GB.
PART_FILE_BYTES = 16 * 2**20
ROW_GROUP_ROWS = 64
PREPARE_SEED = 0  # the prepared train rows' random order


def decode_batch(batch: dict[str, np.ndarray], image_size: int | str, label_set: str, coding: MaskCoding) -> dict[str, Any]:
    """map_batches function: items (image, mask, name, split) -> prepared rows. A bad file gives a
    row with `error` set. Val rows of pairs keep the mask at the pair's own 256x256 as well."""
    shape = image_shape(image_size)
    ids, images, masks, native_masks, errors = [], [], [], [], []
    for image, mask, name, split in zip(batch["image"], batch["mask"], batch["name"], batch["split"]):
        try:
            photo, class_ids = layouts.read_item(Item(image, mask or None, name), coding)
            small, small_ids = resize_pair(photo, class_ids, shape)
            images.append(small.tobytes())
            masks.append(palette.to_label_set(small_ids, label_set).tobytes())
            keep_native = split == "val" and coding.layout == "pairs"
            native_masks.append(palette.to_label_set(class_ids, label_set).tobytes() if keep_native else b"")
            errors.append("")
        except BadPairError as e:
            images.append(b"")
            masks.append(b"")
            native_masks.append(b"")
            errors.append(str(e))
        ids.append(name)
    return {
        "id": np.array(ids, dtype=object),
        "split": batch["split"],
        "image": np.array(images, dtype=object),
        "mask": np.array(masks, dtype=object),
        "mask_native": np.array(native_masks, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def source_layout(src: str | os.PathLike, layout: str = "auto", val_fraction: float = 0.2) -> Layout:
    """The layout of `src` with every split listed; a DataError when a split is missing or empty."""
    found = layouts.detect(src, layout, val_fraction)
    for split in SPLITS:
        found.items(split)
    return found


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    image_size: int | str = 128,
    label_set: str = "auto",
    skip_bad_files: bool = False,
    progress=print,
    layout: str = "auto",
    val_fraction: float = 0.2,
    found: Layout | None = None,
) -> dict[str, Any]:
    """Prepare the data folder `src` (any of layouts.LAYOUTS; `layout` forces one) into `out`;
    returns the meta written. `label_set`: "auto" (the layout's own), "road", "cityscapes19", "custom".

    Without skip_bad_files any bad file (one that cannot be read or checked, an image without its
    mask and the like) stops the run with a DataError listing the bad files and nothing is written.
    With it, bad files are left out, listed in skipped.txt and counted.
    Rows are written as they are decoded, a part file at a time: memory does not grow with the
    data set. Needs a running Ray (`ray.init`) only for more than IN_PROCESS_MAX_PAIRS files
    (`needs_ray`). `found`: `src` already listed (source_layout), so that a caller that has listed
    it (a bucket of thousands of files, say) does not list it again.
    """
    src = src if storage.is_uri(src) else Path(src).expanduser().resolve()
    out = out if storage.is_uri(out) else Path(out).expanduser().resolve()
    image_size = image_size_value(image_size, bounded=False)
    shown_src, shown_out = storage.redact(src), storage.redact(out)
    found = found or source_layout(src, layout, val_fraction)
    label_set = layouts.check_classes(found, label_set)
    unpaired = found.check_paired(skip_bad_files)
    files = {split: found.items(split)[0] for split in SPLITS}
    total = sum(len(v) for v in files.values())
    progress(
        f"prepare: {total} images in {shown_src}, {layouts.describe(found)} "
        f"({', '.join(f'{s} {len(files[s])}' for s in SPLITS)})" + (f"; {len(unpaired)} files without a partner left out" if unpaired else "")
    )

    start = time.perf_counter()
    # A local output is written beside it and renamed into place: a reader sees all of it or
    # none. Object storage has no rename: the output's objects are replaced in place, meta.json
    # (which readers check first) last, and removed again if anything fails.
    in_place = storage.is_uri(out)
    fs, target = storage.resolve(out)
    work = target if in_place else str(out.with_name(f".{out.name}.tmp-{os.getpid()}"))

    def remove_work() -> None:
        with contextlib.suppress(OSError):
            fs.delete_dir(work)

    remove_work()
    try:
        meta, bad = _decode_and_write(files, shown_src, fs, work, image_size, label_set, found, progress)
        bad = unpaired + bad  # each "path: what is wrong"
        meta["skipped"] = len(bad)
        if bad and not skip_bad_files:
            listing = "\n  ".join(bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise DataError(
                f"{len(bad)} of {total} files in {shown_src} cannot be used:\n  {listing}{more}\n"
                "Fix or remove them, or pass --skip-bad-files to leave them out (they are listed in "
                f"{SKIPPED_FILE} next to the output)."
            )
        if bad:
            _write_text(fs, f"{work}/{SKIPPED_FILE}", "".join(f"{problem}\n" for problem in bad))
        _write_text(fs, f"{work}/{META_FILE}", json.dumps(meta, indent=2))
        if not in_place:
            if out.exists():
                shutil.rmtree(out)
            os.replace(work, out)
    except OSError as e:  # a full disk, say: the half-written folder goes, the output is untouched
        remove_work()
        reason = os.strerror(e.errno) if e.errno else storage.redact(str(e))  # pyarrow's own text hides it in a "Detail"
        raise DataError(f"cannot write the prepared data to {shown_out}: {reason}; nothing was written there") from None
    except BaseException:
        remove_work()
        raise
    counts = meta["counts"]
    progress(
        f"prepare: wrote {counts['train']} train and {counts['val']} val rows to {shown_out} "
        f"in {time.perf_counter() - start:.1f}s"
        + (f"; skipped {len(bad)} bad files (see {storage.join(shown_out, SKIPPED_FILE)})" if bad else "")
    )
    return meta


def _write_text(fs, path: str, text: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def rows_per_part_file(image_size: int | str, native: bool = True) -> int:
    """Rows of one Parquet part file: about PART_FILE_BYTES, whole row groups where they fit."""
    height, width = image_shape(image_size)
    row_bytes = height * width * 4 + (NATIVE_SIZE * NATIVE_SIZE if native else 0)  # image, mask (, pairs' native val mask)
    rows = max(1, PART_FILE_BYTES // row_bytes)
    return rows - rows % ROW_GROUP_ROWS if rows >= ROW_GROUP_ROWS else rows


def _decode_and_write(files: dict[str, list[Item]], shown_src: str, fs, work: str, image_size, label_set: str, found: Layout, progress):
    """Decode every item and write the good rows into work/<split>/part-*.parquet (on the
    filesystem `fs`) as they come; returns (meta, bad files)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    # Train rows in a random order (fixed: the same data set gives the same files). The files are
    # in city order, and both ingest paths mix rows only within blocks of rows read together
    # (data.py): a block of file-ordered rows would hold one or two cities.
    order = np.random.default_rng(PREPARE_SEED).permutation(len(files["train"]))
    chosen = [(files["train"][i], "train") for i in order] + [(item, "val") for item in files["val"]]
    items = [{"image": item.image, "mask": item.mask or "", "name": item.name, "split": split} for item, split in chosen]
    decode_args = {"image_size": image_size, "label_set": label_set, "coding": found.coding}
    meter = CountProgress("prepare: decoding", len(items), "images", printer=progress)
    pairs_layout = found.kind == "pairs"
    writers = {split: _PartWriter(fs, f"{work}/{split}", rows_per_part_file(image_size, pairs_layout), keep_native=split == "val" and pairs_layout)
               for split in SPLITS}  # fmt: skip
    class_pixels = np.zeros(256, np.int64)
    bad: list[str] = []  # each message names its file: "path: what is wrong"
    for batch in _decoded_batches(items, decode_args):
        failed = batch.filter(pc.not_equal(batch["error"], ""))
        bad += failed["error"].to_pylist()
        good = batch.filter(pc.equal(batch["error"], "")).drop_columns(["error"])
        for split in SPLITS:
            part = good.filter(pc.equal(good["split"], split))
            if part.num_rows:
                writers[split].add(part)
                if split == "train":
                    masks = pa.concat_arrays(part["mask"].chunks) if part["mask"].num_chunks != 1 else part["mask"].chunk(0)
                    offsets = np.frombuffer(masks.buffers()[1], np.int32)[masks.offset : masks.offset + len(masks) + 1]
                    pixels = np.frombuffer(masks.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
                    class_pixels += np.bincount(pixels, minlength=256)
        meter.update(batch.num_rows)
    counts = {}
    for split in SPLITS:
        counts[split] = writers[split].close()
        if counts[split] == 0:  # the caller removes tmp
            raise DataError(f"{storage.join(shown_src, split)}: no usable images (all {len(files[split])} were bad)")
    classes = found.classes if label_set == "custom" else palette.class_set(label_set)
    meta = {
        "format": FORMAT,
        "image_size": image_size,
        "layout": found.kind,
        "classes": label_set,
        "native_size": NATIVE_SIZE if pairs_layout else None,
        "class_names": list(classes.names),
        "class_colors": [palette.color_hex(c) for c in classes.colors],
        "counts": counts,
        # training pixels per class (ignored pixels left out): what class weights are computed from,
        # without reading every mask again
        "class_pixels": [int(c) for c in class_pixels[: len(classes)]],
        "bytes": sum(writer.bytes for writer in writers.values()),
        "skipped": len(bad),
        "source": str(shown_src),
        "source_files": {s: len(files[s]) for s in SPLITS},
    }
    return meta, bad


def _decoded_batches(items: list[dict[str, str]], decode_args: dict[str, Any]):
    """Decoded rows (pyarrow tables) in the order of `items`: in this process for a few files,
    by Ray Data tasks across the cluster for more."""
    import pyarrow as pa

    if len(items) <= IN_PROCESS_MAX_PAIRS:
        for offset in range(0, len(items), DECODE_BATCH):
            chunk = items[offset : offset + DECODE_BATCH]
            columns = {key: np.array([item[key] for item in chunk], dtype=object) for key in ("image", "mask", "name", "split")}
            yield pa.table(decode_batch(columns, **decode_args))
        return
    import ray

    decoded = ray.data.from_items(items, override_num_blocks=max(1, min(64, len(items) // DECODE_BATCH))).map_batches(
        decode_batch, fn_kwargs=decode_args, batch_size=DECODE_BATCH, num_cpus=DATA_TASK_CPUS
    )
    # In order (the train rows' random order is the prepared data's), streamed to the driver
    # rather than materialized: it counts rows as they arrive and writes the part files itself.
    decoded.context.execution_options.preserve_order = True
    yield from decoded.iter_batches(batch_size=None, batch_format="pyarrow")


class _PartWriter:
    """Rows of one split into part-00000.parquet, ... of `rows_per_file` rows each, in row groups of
    ROW_GROUP_ROWS (what a Ray Data read task turns into one block); holds at most one file's rows."""

    def __init__(self, fs, folder: str, rows_per_file: int, keep_native: bool):
        self.fs, self.folder, self.rows_per_file, self.keep_native = fs, folder, rows_per_file, keep_native
        self.pending: list[Any] = []
        self.pending_rows = self.written = self.files = self.bytes = 0
        fs.create_dir(folder, recursive=True)

    def add(self, rows) -> None:
        if not self.keep_native:
            rows = rows.drop_columns(["mask_native"])
        self.pending.append(rows)
        self.pending_rows += rows.num_rows
        while self.pending_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def close(self) -> int:
        if self.pending_rows:
            self._flush(self.pending_rows)
        return self.written

    def _flush(self, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.concat_tables(self.pending)
        path = f"{self.folder}/part-{self.files:05d}.parquet"
        pq.write_table(table.slice(0, n), path, row_group_size=ROW_GROUP_ROWS, filesystem=self.fs)
        self.bytes += self.fs.get_file_info(path).size
        rest = table.slice(n)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        self.written += n
        self.files += 1


def needs_ray(found: Layout) -> bool:
    """Whether `prepare` of the listed data folder `found` (source_layout) decodes with Ray Data
    tasks (and so needs Ray started)."""
    return sum(len(found.items(split)[0]) for split in SPLITS) > IN_PROCESS_MAX_PAIRS
