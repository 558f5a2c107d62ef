"""The dashboard page: one HTML template with its CSS and script inlined, in two modes.

- live (`unet-ray dashboard`): plotly.js from the server's own /static route; the script polls
  api/state and api/predictions.
- report (`unet-ray report`): the state, the predictions and plotly.js itself are inlined, so
  the file opens anywhere with no server and no network.
"""

from __future__ import annotations

import html
import re
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from unet_ray import jsonfile

STATIC = Path(__file__).parent / "static"
PLOTLY_ROUTE = "static/plotly.min.js"
REFRESH_SECONDS = 3.0
_PLACEHOLDER = re.compile(r"\{\{([A-Z]+)\}\}")


def to_json(value: Any) -> str:
    return jsonfile.dumps(value, separators=(",", ":"))


def script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: no '<', '>' or '&' that could end it."""
    return to_json(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """plotly.js as shipped inside the plotly Python package (never from a CDN)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _static(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _inline_script(code: str) -> str:
    # "</script" inside the code would end the element early; "<\/" means the same to JavaScript.
    return "<script>" + code.replace("</script", "<\\/script") + "</script>"


def render_page(name: str, mode: str = "live", data: dict[str, Any] | None = None, refresh_s: float = REFRESH_SECONDS) -> str:
    """The page's HTML. Report mode needs `data` = {"state": ..., "predictions": ...}."""
    if mode not in ("live", "report"):
        raise ValueError(f"mode {mode!r}: choose live or report")
    config = {"mode": mode, "refresh_s": refresh_s, "written": time.time()}
    parts = {
        "TITLE": html.escape(f"Tune results: {name}"),
        "NAME": html.escape(name),
        "STYLE": _static("dashboard.css"),
        "PLOTLY": f'<script src="{PLOTLY_ROUTE}"></script>' if mode == "live" else _inline_script(plotly_js()),
        "CONFIG": script_json(config),
        "DATA": script_json(data if mode == "report" else None),
        "SCRIPT": _static("dashboard.js").replace("</script", "<\\/script"),
    }
    # One pass: text put in (plotly.js, the data) is never searched for placeholders again.
    return _PLACEHOLDER.sub(lambda m: parts[m.group(1)], _static("page.html"))


def page_state(snapshot, version: str = "") -> dict[str, Any]:
    """What the page renders: the snapshot's data and its Plotly figures."""
    from unet_ray.dashboard.figures import build_figures

    return {**snapshot.to_dict(), "figures": build_figures(snapshot), "version": version}
