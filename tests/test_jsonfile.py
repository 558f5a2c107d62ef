"""JSON files and output that strict readers accept (no NaN), written atomically."""

from __future__ import annotations

import json
import math

from unet_ray import jsonfile


def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_become_null():
    value = {"iou": [0.5, math.nan, math.inf], "nested": ({"x": -math.inf},), "n": 3, "s": "nan"}
    assert _strict_loads(jsonfile.dumps(value)) == {"iou": [0.5, None, None], "nested": [{"x": None}], "n": 3, "s": "nan"}


def test_write_atomic_leaves_only_the_file(tmp_path):
    jsonfile.write_atomic(tmp_path / "best.json", {"val_iou": math.nan, "path": tmp_path})
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]
    assert _strict_loads((tmp_path / "best.json").read_text()) == {"val_iou": None, "path": str(tmp_path)}
