"""JSON that strict readers accept, written atomically. Plain Python: the driver imports it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def json_ready(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None. Python writes NaN, which is not
    JSON: jq and JavaScript's JSON.parse refuse it. A class absent from both truth and prediction
    has IoU NaN, which is always the case for some of the 19 classes on a small split."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps of json_ready(value); other objects (paths) as their str."""
    return json.dumps(json_ready(value), allow_nan=False, default=str, **kwargs)


def write_atomic(path: str | os.PathLike, value: Any) -> None:
    """Write `value` as indented JSON to `path` through a temporary file and a rename, so that a
    reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(value, indent=2))
    os.replace(tmp, path)
