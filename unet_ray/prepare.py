"""Pairs folder -> prepared Parquet, decoded by Ray Data tasks (in the calling process for a few
hundred pairs or fewer: IN_PROCESS_MAX_PAIRS). Reading and checking a prepared folder, without
Ray, is prepared_format.py.

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
from unet_ray.pairs import SPLITS, BadPairError, list_pairs, read_pair
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
ROWS_PER_FILE = 512  # Parquet part files of a split: a few hundred rows each, read back as one table


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
    try:
        meta = _write_prepared(tmp, out, rows, bad, files, src, image_size, label_set)
    except OSError as e:  # a full disk, say: the half-written folder goes, the output is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        reason = os.strerror(e.errno) if e.errno else str(e)  # pyarrow's own text hides it in a "Detail"
        raise DataError(f"cannot write the prepared data to {out}: {reason}; nothing was written there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = meta["counts"]
    progress(
        f"prepare: wrote {counts['train']} train and {counts['val']} val rows to {out} "
        f"in {time.perf_counter() - start:.1f}s" + (f"; skipped {len(bad)} bad files (see {out / SKIPPED_FILE})" if bad else "")
    )
    return meta


def _write_prepared(tmp: Path, out: Path, rows, bad: list[dict[str, str]], files, src: Path, image_size: int, label_set: str):
    """Write the prepared folder into `tmp`, then rename it to `out`: a reader sees the whole folder
    or none of it (meta.json, which readers check first, is written last)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    good = rows.filter(pc.equal(rows["error"], "")).drop_columns(["error", "path"])
    counts = {}
    for split in SPLITS:
        part = good.filter(pc.equal(good["split"], split))
        if split != "val":
            part = part.drop_columns(["mask_native"])
        counts[split] = part.num_rows
        if counts[split] == 0:  # the caller removes tmp
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
    return meta


def needs_ray(src: str | os.PathLike) -> bool:
    """Whether `prepare(src, ...)` decodes with Ray Data tasks (and so needs Ray started)."""
    return sum(len(v) for v in list_source(Path(src).expanduser()).values()) > IN_PROCESS_MAX_PAIRS
