"""Pairs folder -> prepared Parquet, decoded by Ray Data tasks (in the calling process for a few
hundred pairs or fewer: IN_PROCESS_MAX_PAIRS).

Layout of a prepared folder:
    meta.json         format marker, image size, label set, class names, row counts, skipped files
    train/*.parquet   columns id (file stem), split, image (raw uint8 S*S*3), mask (raw uint8 S*S)
    val/*.parquet     the same, plus mask_native (raw uint8 256*256: the mask at the pair's own
                      resolution, for the native-size IoU users compare against)
    skipped.txt       files left out with --skip-bad-files, one "path: reason" per line

Images are stored decoded, resized and with class ids already computed, so a training epoch only
reads bytes: no JPEG decoding and no palette matching per epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from unet_ray import palette
from unet_ray.console import CountProgress
from unet_ray.pairs import PAIR_HEIGHT, SPLITS, BadPairError, list_pairs, read_pair
from unet_ray.transforms import resize_pair

META_FILE = "meta.json"
SKIPPED_FILE = "skipped.txt"
FORMAT = "unet_ray.prepared/2"  # /2: val rows carry mask_native
NATIVE_SIZE = PAIR_HEIGHT  # each half of a pair is 256x256
# Ray Data tasks ask for a quarter CPU: on a 2-CPU machine they must still fit beside training
# workers (a task asking for a whole CPU would wait forever once workers hold the CPUs).
DATA_TASK_CPUS = 0.25
# Up to this many pair files are decoded in the calling process rather than by Ray Data tasks:
# starting the tasks' worker processes costs ~9 s on a 2-core VM, while one process decodes 128
# pairs in 1.7 s (measured). The built-in synthetic data (128 pairs) and small tests stay in
# process; a real data set (thousands of pairs) is decoded in parallel across the cluster.
IN_PROCESS_MAX_PAIRS = 256
DECODE_BATCH = 32  # pairs per decode batch (a Ray task's batch, or a progress step in process)
ROWS_PER_FILE = 512  # Parquet part files of a split: a few hundred rows each, read back as one table


class DataError(ValueError):
    """Input data that cannot be used; the message names the file or folder."""


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
        ids.append(Path(path).stem)
    return {
        "id": np.array(ids, dtype=object),
        "split": batch["split"],
        "path": batch["path"],
        "image": np.array(images, dtype=object),
        "mask": np.array(masks, dtype=object),
        "mask_native": np.array(native_masks, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def prepared_arrays(rows: Any, image_size: int, source: str | os.PathLike) -> dict[str, np.ndarray]:
    """Prepared rows (an Arrow table or record batch) -> {"image": (N,S,S,3), "mask": (N,S,S)} uint8,
    and "mask_native" (N,256,256) when the rows have it (val).

    The arrays are read-only views of the Arrow buffers, not copies: for the full data set at
    256 px a per-row conversion would hold the 600 MB of pixels two or three times over.
    """
    import pyarrow as pa

    shapes = {"image": (image_size, image_size, 3), "mask": (image_size, image_size)}
    if "mask_native" in rows.column_names:
        shapes["mask_native"] = (NATIVE_SIZE, NATIVE_SIZE)
    arrays = {}
    for name, shape in shapes.items():
        column = rows.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()  # one buffer (copies only when several files were read)
        n, row_bytes = len(column), int(np.prod(shape))
        if n == 0:
            arrays[name] = np.empty((0, *shape), np.uint8)
            continue
        offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
        offsets = np.frombuffer(column.buffers()[1], offset_type)[column.offset : column.offset + n + 1]
        if column.null_count or not np.all(np.diff(offsets) == row_bytes):
            raise DataError(
                f"{source}: {name} rows are not {image_size}x{image_size} uint8 pixels as meta.json says; "
                "prepare the data again"
            )
        values = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
        values.flags.writeable = False  # a write would change the Arrow table underneath
        arrays[name] = values.reshape(n, *shape)
    return arrays


def read_prepared_split(prepared: str | os.PathLike, split: str, image_size: int) -> dict[str, np.ndarray]:
    """One split of a prepared folder as uint8 arrays (see `prepared_arrays`), read in this
    process with pyarrow: no Ray tasks (training reads it in the driver, evaluate without Ray)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(prepared) / split
    try:
        columns = ["image", "mask"] + (["mask_native"] if split == "val" else [])
        table = pq.read_table(folder, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{folder}: cannot read the prepared Parquet files ({e}); prepare the data again") from None
    # A lost or truncated part file would otherwise train or score on fewer rows, silently.
    meta_file = Path(prepared) / META_FILE
    expected = json.loads(meta_file.read_text()).get("counts", {}).get(split) if meta_file.is_file() else None
    if expected is not None and table.num_rows != expected:
        raise DataError(
            f"{folder} holds {table.num_rows} rows but {meta_file} records {expected}: "
            "part files are missing or damaged; prepare the data again"
        )
    return prepared_arrays(table, image_size, folder)


def list_source(src: Path) -> dict[str, list[Path]]:
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
    Needs a running Ray (`ray.init`) only for more than IN_PROCESS_MAX_PAIRS files (`needs_ray`).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    palette.check_label_set(label_set)
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    files = list_source(src)
    total = sum(len(v) for v in files.values())
    progress(f"prepare: {total} pair files in {src} ({', '.join(f'{s} {len(files[s])}' for s in SPLITS)})")

    start = time.perf_counter()
    items = [{"path": str(p), "split": s} for s in SPLITS for p in files[s]]
    decode_args = {"image_size": image_size, "label_set": label_set}
    meter = CountProgress("prepare: decoding", total, "pairs", printer=progress)
    batches = []
    if total <= IN_PROCESS_MAX_PAIRS:
        for offset in range(0, total, DECODE_BATCH):
            chunk = items[offset : offset + DECODE_BATCH]
            columns = {key: np.array([item[key] for item in chunk], dtype=object) for key in ("path", "split")}
            batches.append(pa.table(decode_batch(columns, **decode_args)))
            meter.update(len(chunk))
    else:
        import ray

        decoded = ray.data.from_items(items, override_num_blocks=max(1, min(64, total // DECODE_BATCH))).map_batches(
            decode_batch, fn_kwargs=decode_args, batch_size=DECODE_BATCH, num_cpus=DATA_TASK_CPUS
        )
        # Streamed to the driver rather than materialized: the driver counts rows as they arrive
        # and prints progress, and writes the Parquet files itself (no second pass of Ray tasks).
        for batch in decoded.iter_batches(batch_size=None, batch_format="pyarrow"):
            batches.append(batch)
            meter.update(batch.num_rows)
    rows = pa.concat_tables(batches)

    failed = rows.filter(pc.not_equal(rows["error"], ""))
    bad = [{"path": p, "error": e} for p, e in zip(failed["path"].to_pylist(), failed["error"].to_pylist())]
    if bad and not skip_bad_files:
        listing = "\n  ".join(r["error"] for r in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(
            f"{len(bad)} of {total} pair files in {src} cannot be used:\n  {listing}{more}\n"
            "Fix or remove them, or pass --skip-bad-files to leave them out (they are listed in "
            f"{SKIPPED_FILE} next to the output)."
        )

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    good = rows.filter(pc.equal(rows["error"], "")).drop_columns(["error", "path"])
    counts = {}
    for split in SPLITS:
        part = good.filter(pc.equal(good["split"], split))
        if split != "val":
            part = part.drop_columns(["mask_native"])
        counts[split] = part.num_rows
        if counts[split] == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"{src / split}: no usable pair files (all {len(files[split])} were bad)")
        (tmp / split).mkdir()
        for index, offset in enumerate(range(0, part.num_rows, ROWS_PER_FILE)):
            pq.write_table(part.slice(offset, ROWS_PER_FILE), tmp / split / f"part-{index:05d}.parquet")
    if bad:
        (tmp / SKIPPED_FILE).write_text("".join(f"{r['path']}: {r['error']}\n" for r in bad))
    meta = {
        "format": FORMAT,
        "image_size": image_size,
        "classes": label_set,
        "native_size": NATIVE_SIZE,
        "class_names": palette.class_names(label_set),
        "counts": counts,
        "skipped": len(bad),
        "source": str(src),
        "source_files": {s: len(files[s]) for s in SPLITS},
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    progress(
        f"prepare: wrote {counts['train']} train and {counts['val']} val rows to {out} "
        f"in {time.perf_counter() - start:.1f}s" + (f"; skipped {len(bad)} bad files (see {out / SKIPPED_FILE})" if bad else "")
    )
    return meta


def needs_ray(src: str | os.PathLike) -> bool:
    """Whether `prepare(src, ...)` decodes with Ray Data tasks (and so needs Ray started)."""
    return sum(len(v) for v in list_source(Path(src).expanduser()).values()) > IN_PROCESS_MAX_PAIRS


def looks_prepared(folder: str | os.PathLike) -> bool:
    """A meta.json, or Parquet files where pairs would be: treat as prepared (read_meta checks it)."""
    folder = Path(folder)
    return (folder / META_FILE).is_file() or any(folder.glob("*.parquet")) or any(
        any((folder / split).glob("*.parquet")) for split in SPLITS  # inner any(): a generator is always truthy
    )


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a prepared folder, or a DataError saying why the folder is not one."""
    folder = Path(folder).expanduser()
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        if any(folder.rglob("*.parquet")):
            raise DataError(
                f"{folder} holds Parquet files but no {META_FILE}: it was not written by `unet-ray prepare`. "
                "Point --data at a pairs folder (train/ and val/ JPEGs) or at a prepared folder."
            )
        raise DataError(f"{folder} is neither a pairs folder (train/, val/) nor a prepared folder ({META_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as e:
        raise DataError(f"{meta_file} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{meta_file} was not written by this version of `unet-ray prepare` (format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    for split in SPLITS:
        if not any((folder / split).glob("*.parquet")):
            raise DataError(f"{folder / split} holds no Parquet files: the prepared folder is incomplete; prepare it again")
    return meta


def check_compatible(meta: dict[str, Any], folder: str | os.PathLike, label_set: str, image_size: int) -> None:
    """Refuse prepared data whose label set or image size differs from what the run asks for."""
    if meta["classes"] != label_set:
        raise DataError(
            f"{folder} was prepared for label set {meta['classes']!r}, but this run trains {label_set!r}. "
            f"Prepare it again with --classes {label_set}, or train with --classes {meta['classes']}."
        )
    if meta["image_size"] != image_size:
        raise DataError(
            f"{folder} was prepared at image size {meta['image_size']}, but this run asks for {image_size}. "
            f"Prepare it again with --image-size {image_size}, or train with --image-size {meta['image_size']}."
        )
