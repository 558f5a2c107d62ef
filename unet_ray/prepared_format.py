"""The prepared format (see prepare.py for its layout): reading a prepared folder's rows as uint8
arrays and checking its meta.json. Plain pyarrow and NumPy, no Ray: `evaluate`, the dashboard and
the training driver read prepared data through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from unet_ray.pairs import PAIR_HEIGHT, SPLITS

META_FILE = "meta.json"
SKIPPED_FILE = "skipped.txt"
FORMAT = "unet_ray.prepared/2"  # /2: val rows carry mask_native
NATIVE_SIZE = PAIR_HEIGHT  # each half of a pair is 256x256


class DataError(ValueError):
    """Input data that cannot be used; the message names the file or folder."""


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
