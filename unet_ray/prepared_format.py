"""The prepared format (see prepare.py for its layout): reading a prepared folder's rows as uint8
arrays and checking its meta.json, on a local path or a URI (storage.py). Plain pyarrow and
NumPy, no Ray: `evaluate`, the dashboard and the training driver read prepared data through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from unet_ray import storage
from unet_ray.config import image_shape, image_size_value
from unet_ray.pairs import PAIR_HEIGHT, SPLITS

META_FILE = "meta.json"
SKIPPED_FILE = "skipped.txt"
# /2: val rows carry mask_native; /3: shuffled train rows, class_pixels; /4: layouts, HxW sizes, class colours
FORMAT = "unet_ray.prepared/4"
NATIVE_SIZE = PAIR_HEIGHT  # each half of a pair is 256x256


class DataError(ValueError):
    """Input data that cannot be used; the message names the file or folder."""


def prepared_arrays(rows: Any, image_size: int | str | tuple[int, int], source: str | os.PathLike) -> dict[str, np.ndarray]:
    """Prepared rows (an Arrow table or record batch) -> {"image": (N,H,W,3), "mask": (N,H,W)} uint8,
    and "mask_native" (N,256,256) when the rows have it (val of pairs).

    The arrays are read-only views of the Arrow buffers, not copies: for the full data set at
    256 px a per-row conversion would hold the 600 MB of pixels two or three times over.
    """
    import pyarrow as pa

    height, width = image_shape(image_size)
    shapes = {"image": (height, width, 3), "mask": (height, width)}
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
                f"{source}: {name} rows are not {height}x{width} uint8 pixels as meta.json says; "
                "prepare the data again"
            )
        values = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
        values.flags.writeable = False  # a write would change the Arrow table underneath
        arrays[name] = values.reshape(n, *shape)
    return arrays


def read_prepared_split(prepared: str | os.PathLike, split: str, image_size: int | str | tuple[int, int]) -> dict[str, np.ndarray]:
    """One split of a prepared folder (a local path or a URI) as uint8 arrays (see
    `prepared_arrays`), read in this process with pyarrow: no Ray tasks (the in-memory ingest path
    reads it in the driver, evaluate without Ray)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = storage.join(prepared, split)
    try:
        fs, path = storage.resolve(folder)
        table = pq.read_table(path, filesystem=fs)  # val of pairs has mask_native, other val rows not
    except (pa.ArrowException, OSError) as e:
        reason = storage.redact(str(e))
        raise DataError(f"{storage.redact(folder)}: cannot read the prepared Parquet files ({reason}); prepare the data again") from None
    # A lost or truncated part file would otherwise train or score on fewer rows, silently.
    meta_file = storage.join(prepared, META_FILE)
    expected = json.loads(storage.read_text(meta_file)).get("counts", {}).get(split) if storage.is_file(meta_file) else None
    if expected is not None and table.num_rows != expected:
        raise DataError(
            f"{storage.redact(folder)} holds {table.num_rows} rows but {storage.redact(meta_file)} records {expected}: "
            "part files are missing or damaged; prepare the data again"
        )
    return prepared_arrays(table, image_size, storage.redact(folder))


def _parquet_files(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    try:
        return storage.list_files(folder, ".parquet", recursive=recursive)
    except storage.StorageError:  # no such folder
        return []


def looks_prepared(folder: str | os.PathLike) -> bool:
    """A meta.json, or Parquet files where pairs would be: treat as prepared (read_meta checks it).
    `folder`: a local path or a URI."""
    return storage.is_file(storage.join(folder, META_FILE)) or bool(_parquet_files(folder)) or any(
        _parquet_files(storage.join(folder, split)) for split in SPLITS
    )


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a prepared folder (a local path or a URI), or a DataError saying why the
    folder is not one."""
    folder = folder if storage.is_uri(folder) else Path(folder).expanduser()
    shown = storage.redact(folder)
    meta_file = storage.join(folder, META_FILE)
    if not storage.is_file(meta_file):
        if _parquet_files(folder, recursive=True):
            raise DataError(
                f"{shown} holds Parquet files but no {META_FILE}: it was not written by `unet-ray prepare`. "
                "Point --data at a pairs folder (train/ and val/ JPEGs) or at a prepared folder."
            )
        raise DataError(f"{shown} is neither a pairs folder (train/, val/) nor a prepared folder ({META_FILE})")
    shown_meta = storage.redact(meta_file)
    try:
        meta = json.loads(storage.read_text(meta_file))
    except ValueError as e:
        raise DataError(f"{shown_meta} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{shown_meta} was not written by this version of `unet-ray prepare` (format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    for split in SPLITS:
        if not _parquet_files(storage.join(folder, split)):
            raise DataError(f"{storage.redact(storage.join(folder, split))} holds no Parquet files: the prepared folder is incomplete; prepare it again")
    return meta


def check_compatible(meta: dict[str, Any], folder: str | os.PathLike, label_set: str, image_size: int | str) -> None:
    """Refuse prepared data whose label set or image size differs from what the run asks for
    ("auto" takes the prepared data's label set)."""
    if label_set != "auto" and meta["classes"] != label_set:
        raise DataError(
            f"{folder} was prepared for label set {meta['classes']!r}, but this run trains {label_set!r}. "
            f"Prepare it again with --classes {label_set}, or train with --classes {meta['classes']}."
        )
    wanted = image_size_value(image_size, bounded=False)
    if image_size_value(meta["image_size"], bounded=False) != wanted:
        raise DataError(
            f"{folder} was prepared at image size {meta['image_size']}, but this run asks for {wanted}. "
            f"Prepare it again with --image-size {wanted}, or train with --image-size {meta['image_size']}."
        )
