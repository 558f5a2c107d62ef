"""Tune results dashboard: a live web page over a sweep's experiment folder, and the same page as
one self-contained HTML report.

    results.py      reads the folder (Tune's files + each trial's history.jsonl) into plain data
    figures.py      Plotly figures built from that data (rendered by plotly.js in the page)
    predictions.py  the best checkpoint's masks for a few validation pairs, as PNG data URIs
    page.py         the HTML page: one template, served live or written as a report
    server.py       `unet-ray dashboard`: a small http.server app bound to 127.0.0.1
    report.py       `unet-ray report`: the page with its data, plotly.js and images inlined

Nothing here imports Ray; torch is imported only when predictions are computed.
"""

from unet_ray.dashboard.results import DashboardError

__all__ = ["DashboardError"]
