"""The sweep's charts as Plotly figures, built here and drawn by plotly.js in the page.

Each figure goes to the page as Plotly's JSON ({data, layout}); the page calls `Plotly.react`,
which redraws in place on every refresh. `uirevision` keeps the user's zoom and legend clicks
across refreshes.
"""

from __future__ import annotations

import json
import math
from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative

from unet_ray.dashboard.results import Snapshot, Trial

TRIAL_COLORS = qualitative.Plotly + qualitative.D3[1::2] + qualitative.Dark24
HEIGHT = 380
LOG_SPAN = 100.0  # a positive parameter spanning more than two decades gets a log axis
MAX_DISCRETE = 10  # a colour key with at most this many values gets one colour per value
CHART_IDS = ("curve_iou", "curve_loss", "lr_scatter", "parallel")
RUN_CHART_IDS = ("curve_iou", "curve_loss", "class_iou", "val_metrics")  # a train run: nothing was searched
VAL_METRICS = {"val_iou": "IoU", "val_miou": "mIoU", "val_dice": "Dice", "val_pixel_accuracy": "pixel accuracy"}


def build_figures(snapshot: Snapshot) -> dict[str, dict[str, Any]]:
    """{chart id: Plotly figure JSON} for every chart of the page, in page order."""
    figures = {
        "curve_iou": curves(snapshot, "val_iou", "Validation IoU per epoch"),
        "curve_loss": curves(snapshot, "train_loss", "Training loss per epoch"),
    }
    if snapshot.kind == "run":
        figures.update(class_iou=class_iou(snapshot), val_metrics=val_metrics(snapshot))
    else:
        figures.update(lr_scatter=param_scatter(snapshot), parallel=parallel_coordinates(snapshot))
    # to_json applies Plotly's own encoder (NumPy values, NaN); the page gets plain JSON.
    return {name: json.loads(fig.to_json()) for name, fig in figures.items()}


def _layout(fig: go.Figure, title: str, **kwargs: Any) -> go.Figure:
    layout = {
        "title": {"text": title, "x": 0.01, "font": {"size": 15}},
        "template": "plotly_white",
        "height": HEIGHT,
        "margin": {"l": 60, "r": 20, "t": 45, "b": 50},
        "uirevision": "keep",
    }
    fig.update_layout({**layout, **kwargs})
    return fig


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font={"size": 14})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _params_text(trial: Trial) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in trial.params.items())


def trial_colors(snapshot: Snapshot) -> dict[str, str]:
    """One colour per trial, by trial id, so a trial keeps its colour as the ranking changes."""
    ids = sorted(t.trial_id for t in snapshot.trials)
    return {trial_id: TRIAL_COLORS[i % len(TRIAL_COLORS)] for i, trial_id in enumerate(ids)}


def curves(snapshot: Snapshot, metric: str, title: str) -> go.Figure:
    with_points = [t for t in snapshot.trials if any(p[metric] is not None for p in t.curve)]
    if not with_points:
        return _empty(title, "no epochs reported yet")
    best_id = snapshot.best["trial_id"] if snapshot.best else None
    colors = trial_colors(snapshot)
    fig = go.Figure()
    # Best trial last: drawn on top of the others.
    for trial in sorted(with_points, key=lambda t: t.trial_id == best_id):
        is_best = trial.trial_id == best_id
        points = [p for p in trial.curve if p[metric] is not None]
        fig.add_trace(
            go.Scatter(
                x=[p["epoch"] for p in points],
                y=[p[metric] for p in points],
                mode="lines+markers",
                name=f"{trial.trial_id} (best)" if is_best else trial.trial_id,
                legendgroup=trial.trial_id,
                line={"color": colors[trial.trial_id], "width": 4 if is_best else 1.5},
                marker={"size": 9 if is_best else 6},
                opacity=1.0 if is_best else 0.55,
                hovertemplate=f"<b>{trial.trial_id}</b> ({trial.status})<br>epoch %{{x}}<br>{metric} %{{y:.4f}}"
                f"<br>{_params_text(trial)}<extra></extra>",
            )
        )
    max_epoch = max(p["epoch"] for t in with_points for p in t.curve)
    return _layout(
        fig, title, xaxis={"title": {"text": "epoch"}, "dtick": 1 if max_epoch <= 20 else None},
        yaxis={"title": {"text": metric}}, legend={"font": {"size": 11}},
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _wants_log(values: list[Any], key: str) -> bool:
    numbers = [v for v in values if _is_number(v)]
    if not numbers or len(numbers) != len(values) or min(numbers) <= 0:
        return False
    return key == "lr" or max(numbers) / min(numbers) > LOG_SPAN


def param_scatter(snapshot: Snapshot) -> go.Figure:
    """Best val_iou of each trial against lr (log axis), coloured by depth (or the sweep's first
    and second searched keys when lr or depth were not searched)."""
    keys = snapshot.param_keys
    x_key = "lr" if "lr" in keys else (keys[0] if keys else None)
    others = [k for k in keys if k != x_key]
    color_key = "depth" if "depth" in others else (others[0] if others else None)
    title = f"Best val_iou against {x_key}" + (f", coloured by {color_key}" if color_key else "")
    scored = [t for t in snapshot.trials if t.best_val_iou is not None and x_key in t.params]
    if not scored:
        return _empty(title, "no val_iou reported yet")
    fig = go.Figure()
    color_values = [t.params.get(color_key) for t in scored]
    discrete = color_key is None or len(set(map(str, color_values))) <= MAX_DISCRETE

    def hover(trial: Trial) -> str:
        return f"<b>{trial.trial_id}</b> ({trial.status})<br>best val_iou {trial.best_val_iou:.4f}<br>{_params_text(trial)}"

    if discrete:
        groups: dict[str, list[Trial]] = {}
        for trial in scored:
            groups.setdefault(format_value(trial.params.get(color_key)), []).append(trial)
        for i, (value, members) in enumerate(sorted(groups.items(), key=lambda kv: _sort_key(kv[1][0].params.get(color_key)))):
            fig.add_trace(
                go.Scatter(
                    x=[t.params[x_key] for t in members], y=[t.best_val_iou for t in members], mode="markers",
                    name=f"{color_key}={value}" if color_key else "trials",
                    marker={"size": 12, "color": qualitative.Set1[i % len(qualitative.Set1)], "line": {"width": 1, "color": "white"}},
                    text=[hover(t) for t in members], hovertemplate="%{text}<extra></extra>",
                )
            )
    else:
        fig.add_trace(
            go.Scatter(
                x=[t.params[x_key] for t in scored], y=[t.best_val_iou for t in scored], mode="markers", name="trials",
                marker={"size": 12, "color": color_values, "colorscale": "Viridis", "showscale": True,
                        "colorbar": {"title": {"text": color_key}}},
                text=[hover(t) for t in scored], hovertemplate="%{text}<extra></extra>",
            )
        )
    if snapshot.best and snapshot.best["trial_id"] in {t.trial_id for t in scored}:
        best = next(t for t in scored if t.trial_id == snapshot.best["trial_id"])
        fig.add_trace(
            go.Scatter(
                x=[best.params[x_key]], y=[best.best_val_iou], mode="markers", name=f"best: {best.trial_id}",
                marker={"size": 22, "symbol": "circle-open", "color": "black", "line": {"width": 2}},
                hoverinfo="skip",
            )
        )
    log = _wants_log([t.params[x_key] for t in scored], x_key)
    return _layout(
        fig, title,
        xaxis={"title": {"text": x_key + (" (log scale)" if log else "")}, "type": "log" if log else "-", "exponentformat": "e"},
        yaxis={"title": {"text": "best val_iou"}},
    )


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if _is_number(value) else (1, str(value))


def _dimension(key: str, values: list[Any]) -> dict[str, Any]:
    """One parallel-coordinates axis: numbers as they are (log10 with readable ticks when they span
    decades), anything else as categories."""
    if all(_is_number(v) for v in values):
        if _wants_log(values, key):
            low, high = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
            ticks = list(range(low, high + 1))
            return {
                "label": f"{key} (log)", "values": [math.log10(v) for v in values], "range": [low, high],
                "tickvals": ticks, "ticktext": [f"1e{t}" for t in ticks],
            }
        distinct = sorted(set(values))
        if len(distinct) <= MAX_DISCRETE and all(float(v).is_integer() for v in distinct):
            # depth, batch size, ...: ticks at the values tried, not at 2.2, 2.4, ...
            return {"label": key, "values": values, "tickvals": distinct, "ticktext": [format_value(v) for v in distinct]}
        return {"label": key, "values": values}
    categories = sorted({str(v) for v in values})
    index = {c: i for i, c in enumerate(categories)}
    return {
        "label": key, "values": [index[str(v)] for v in values],
        "tickvals": list(range(len(categories))), "ticktext": categories,
    }


def parallel_coordinates(snapshot: Snapshot) -> go.Figure:
    title = "All searched keys and best val_iou"
    keys = snapshot.param_keys
    scored = [t for t in snapshot.trials if t.best_val_iou is not None and all(k in t.params for k in keys)]
    if not scored:
        return _empty(title, "no val_iou reported yet")
    ious = [t.best_val_iou for t in scored]
    dimensions = [_dimension(k, [t.params[k] for t in scored]) for k in keys]
    dimensions.append({"label": "best val_iou", "values": ious})
    fig = go.Figure(
        go.Parcoords(
            line={"color": ious, "colorscale": "Viridis", "showscale": True, "colorbar": {"title": {"text": "val_iou"}}},
            dimensions=dimensions,
        )
    )
    return _layout(fig, title, margin={"l": 70, "r": 60, "t": 95, "b": 30})


def class_iou(snapshot: Snapshot) -> go.Figure:
    """A train run's validation IoU per class at its best (and last) epoch."""
    title = "Validation IoU per class"
    per_class = snapshot.per_class
    if not per_class:
        return _empty(title, "no epoch reported yet")
    fig = go.Figure()
    for i, epoch in enumerate(per_class["epochs"]):
        fig.add_trace(
            go.Bar(
                x=per_class["names"], y=[v if _is_number(v) else None for v in epoch["iou"]], name=epoch["label"],
                marker={"color": qualitative.Plotly[i]}, hovertemplate="%{x}: IoU %{y:.4f}<extra>" + epoch["label"] + "</extra>",
            )
        )
    return _layout(fig, title, barmode="group", yaxis={"title": {"text": "IoU"}, "range": [0, 1]}, legend={"font": {"size": 11}})


def val_metrics(snapshot: Snapshot) -> go.Figure:
    """A train run's validation metrics per epoch, side by side."""
    title = "Validation metrics per epoch"
    points = snapshot.trials[0].curve if snapshot.trials else []
    if not points:
        return _empty(title, "no epoch reported yet")
    fig = go.Figure()
    for i, (metric, label) in enumerate(VAL_METRICS.items()):
        shown = [p for p in points if p.get(metric) is not None]
        if shown:
            fig.add_trace(
                go.Scatter(
                    x=[p["epoch"] for p in shown], y=[p[metric] for p in shown], mode="lines+markers", name=label,
                    line={"color": qualitative.Plotly[i]}, hovertemplate=f"epoch %{{x}}<br>{label} %{{y:.4f}}<extra></extra>",
                )
            )
    return _layout(fig, title, xaxis={"title": {"text": "epoch"}, "dtick": 1 if len(points) <= 20 else None},
                   yaxis={"title": {"text": "value"}}, legend={"font": {"size": 11}})
