"""`unet-ray report`: the dashboard page as one self-contained HTML file.

The same template and script as the live page, with the experiment's state, the predictions
(PNG data URIs) and plotly.js inlined: the file opens from disk on a machine with no network.
"""

from __future__ import annotations

import os
from pathlib import Path

from unet_ray.dashboard.page import page_state, render_page
from unet_ray.dashboard.predictions import best_predictions
from unet_ray.dashboard.results import DashboardError, read_experiment


def write_report(experiment: str | os.PathLike, out: str | os.PathLike) -> Path:
    snapshot = read_experiment(experiment)
    data = {"state": page_state(snapshot), "predictions": best_predictions(snapshot.best, snapshot.prepared)}
    html = render_page(snapshot.name, "report", data)
    out = Path(out).expanduser()
    if out.is_dir():
        raise DashboardError(f"--out {out} is a folder; give a file name such as {out / 'report.html'}")
    if not out.parent.is_dir():
        raise DashboardError(f"--out {out}: folder {out.parent} does not exist")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, out)  # a reader never sees half a report
    finally:
        tmp.unlink(missing_ok=True)
    return out
