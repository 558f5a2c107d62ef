"""Pairs folder -> prepared Parquet, decoded by Ray Data tasks (in the calling process for a few
hundred pairs or fewer: IN_PROCESS_MAX_PAIRS). Reading and checking a prepared folder, without
Ray, is prepared_format.py.

Layout of a prepared folder:
    meta.json         format marker, image size, label set, class names, row counts, training
                      pixels per class, bytes, skipped files
    train/*.parquet   columns id (file stem), split, image (raw uint8 S*S*3), mask (raw uint8 S*S);
                      rows in a fixed random order, part files of ~16 MB in row groups of 64 rows
    val/*.parquet     the same, plus mask_native (raw uint8 256*256: the mask at the pair's own
                      resolution, for the native-size IoU users compare against)
    skipped.txt       files left out with --skip-bad-files, one "path: reason" per line

Images are stored decoded, resized and with class ids already computed, so a training epoch only
reads bytes: no JPEG decoding and no palette matching per epoch.
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

from unet_ray import palette, storage
from unet_ray.console import CountProgress
from unet_ray.pairs import SPLITS, BadPairError, list_pairs, read_pair, uri_stem
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


def decode_batch(batch: dict[str, np.ndarray], image_size: int, label_set: str) -> dict[str, Any]:
    """map_batches function: pair paths -> prepared rows. A bad file gives a row with `error` set."""
    ids, images, masks, native_masks, errors = [], [], [], [], []
    for path, split in zip(batch["path"], batch["split"]):
        try:
            pair = read_pair(path)
            photo, train_ids = resize_pair(pair.photo, pair.train_ids, image_size)
            images.append(photo.tobytes())
            masks.append(palette.to_label_set(train_ids, label_set).tobytes())
            native_masks.append(palette.to_label_set(pair.train_ids, label_set).tobytes() if split == "val" else b"")
            errors.append("")
        except BadPairError as e:
            images.append(b"")
            masks.append(b"")
            native_masks.append(b"")
            errors.append(str(e))
        ids.append(uri_stem(path))
    return {
        "id": np.array(ids, dtype=object),
        "split": batch["split"],
        "path": batch["path"],
        "image": np.array(images, dtype=object),
        "mask": np.array(masks, dtype=object),
        "mask_native": np.array(native_masks, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def list_source(src: str | Path) -> dict[str, list]:
    """The pair files of train/ and val/; a DataError when either is missing or empty."""
    files: dict[str, list[Path]] = {}
    for split in SPLITS:
        try:
            files[split] = list_pairs(src, split)
        except FileNotFoundError as e:
            raise DataError(str(e)) from None
    return files


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    image_size: int = 128,
    label_set: str = "road",
    skip_bad_files: bool = False,
    progress=print,
) -> dict[str, Any]:
    """Prepare `src` (train/ and val/ of pair JPEGs) into `out`; returns the meta written.

    Without skip_bad_files any bad file stops the run with a DataError listing the bad files and
    nothing is written. With it, bad files are left out, listed in skipped.txt and counted.
    Rows are written as they are decoded, a part file at a time: memory does not grow with the
    data set. Needs a running Ray (`ray.init`) only for more than IN_PROCESS_MAX_PAIRS files
    (`needs_ray`).
    """
    palette.check_label_set(label_set)
    src = src if storage.is_uri(src) else Path(src).expanduser().resolve()
    out = out if storage.is_uri(out) else Path(out).expanduser().resolve()
    shown_src, shown_out = storage.redact(src), storage.redact(out)
    files = list_source(src)
    total = sum(len(v) for v in files.values())
    progress(f"prepare: {total} pair files in {shown_src} ({', '.join(f'{s} {len(files[s])}' for s in SPLITS)})")

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
        meta, bad = _decode_and_write(files, shown_src, fs, work, image_size, label_set, progress)
        if bad and not skip_bad_files:
            listing = "\n  ".join(r["error"] for r in bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise DataError(
                f"{len(bad)} of {total} pair files in {shown_src} cannot be used:\n  {listing}{more}\n"
                "Fix or remove them, or pass --skip-bad-files to leave them out (they are listed in "
                f"{SKIPPED_FILE} next to the output)."
            )
        if bad:
            _write_text(fs, f"{work}/{SKIPPED_FILE}", "".join(f"{r['path']}: {r['error']}\n" for r in bad))
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


def rows_per_part_file(image_size: int) -> int:
    """Rows of one Parquet part file: about PART_FILE_BYTES, whole row groups where they fit."""
    row_bytes = image_size * image_size * 4 + NATIVE_SIZE * NATIVE_SIZE  # image, mask (, val's native mask)
    rows = max(1, PART_FILE_BYTES // row_bytes)
    return rows - rows % ROW_GROUP_ROWS if rows >= ROW_GROUP_ROWS else rows


def _decode_and_write(files, shown_src: str, fs, work: str, image_size: int, label_set: str, progress):
    """Decode every pair file and write the good rows into work/<split>/part-*.parquet (on the
    filesystem `fs`) as they come; returns (meta, bad files)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    # Train rows in a random order (fixed: the same data set gives the same files). The files are
    # in city order, and both ingest paths mix rows only within blocks of rows read together
    # (data.py): a block of file-ordered rows would hold one or two cities.
    order = np.random.default_rng(PREPARE_SEED).permutation(len(files["train"]))
    items = [{"path": str(files["train"][i]), "split": "train"} for i in order]
    items += [{"path": str(p), "split": "val"} for p in files["val"]]
    decode_args = {"image_size": image_size, "label_set": label_set}
    meter = CountProgress("prepare: decoding", len(items), "pairs", printer=progress)
    writers = {split: _PartWriter(fs, f"{work}/{split}", rows_per_part_file(image_size), keep_native=split == "val")
               for split in SPLITS}  # fmt: skip
    class_pixels = np.zeros(256, np.int64)
    bad: list[dict[str, str]] = []
    for batch in _decoded_batches(items, decode_args):
        failed = batch.filter(pc.not_equal(batch["error"], ""))
        bad += [{"path": p, "error": e} for p, e in zip(failed["path"].to_pylist(), failed["error"].to_pylist())]
        good = batch.filter(pc.equal(batch["error"], "")).drop_columns(["error", "path"])
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
            raise DataError(f"{storage.join(shown_src, split)}: no usable pair files (all {len(files[split])} were bad)")
    names = palette.class_names(label_set)
    meta = {
        "format": FORMAT,
        "image_size": image_size,
        "classes": label_set,
        "native_size": NATIVE_SIZE,
        "class_names": names,
        "counts": counts,
        # training pixels per class (ignored pixels left out): what class weights are computed from,
        # without reading every mask again
        "class_pixels": [int(c) for c in class_pixels[: len(names)]],
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
            columns = {key: np.array([item[key] for item in chunk], dtype=object) for key in ("path", "split")}
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


def needs_ray(src: str | os.PathLike) -> bool:
    """Whether `prepare(src, ...)` decodes with Ray Data tasks (and so needs Ray started)."""
    src = src if storage.is_uri(src) else Path(src).expanduser()
    return sum(len(v) for v in list_source(src).values()) > IN_PROCESS_MAX_PAIRS
