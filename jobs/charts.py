"""Plotly figures for the dashboard, built from plain Python data (no Django models here).

Every builder returns a JSON-serialisable dict ``{"data": [...], "layout": {...}}`` that the
page hands to ``Plotly.newPlot(el, fig.data, fig.layout)``. Charts are meant to be readable
without hovering: titles, axis titles with units and value labels on bars and points.
`plotly_js_path()` names the plotly.min.js shipped inside the installed plotly package, so the
web app serves it from its own static files (no CDN).

Inputs:
* `recovery_bars(rows)`: rows of `compression.recovery.recovery_table`.
* `layer_loss(events)`: engine progress events
  ``{"stage": "compress", "layer": i, "layers": N, "module": "self_attn.q_proj", "loss": float}``.
* `compare_scatter(points)`: one dict per finished job of one base model:
  ``{"name": str, "recovery_pct": float, "size_mb": float, "speedup": float | None}``
  (``speedup`` = compressed decode tokens/s over dense; optional).
* `compare_bars(jobs)`: ``[{"name": recipe name, "rows": recovery_table rows}, ...]``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import plotly.graph_objects as go
from plotly.subplots import make_subplots

BASELINE_COLOR = "#9aa5b1"
COMPRESSED_COLOR = "#2f6fdb"
RECOVERY_COLOR = "#1f9d55"
AVERAGE_COLOR = "#0b5d3b"
FRONT_COLOR = "#d9480f"
LEVEL_COLORS = {"ok": RECOVERY_COLOR, "warn": "#e8a317", "poor": "#c92a2a", "unknown": "#adb5bd"}
PALETTE = ["#2f6fdb", "#d9480f", "#1f9d55", "#7048e8", "#e8590c", "#0c8599", "#c2255c", "#5c940d"]
AVERAGE = "Average"  # task name of recovery_table's last row


def plotly_js_path() -> Path:
    """Path of plotly.min.js inside the installed plotly package (served as a static file)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js not found at {path}; is the plotly package complete?")
    return path


def _to_dict(fig: go.Figure) -> dict:
    """Plain JSON types only (plotly may hold numpy arrays internally)."""
    return json.loads(fig.to_json())


def _layout(fig: go.Figure, title: str, **extra: Any) -> None:
    fig.update_layout(title={"text": title, "x": 0.01}, template="plotly_white", margin={"t": 70, "l": 70, "r": 30,
                      "b": 70}, legend={"orientation": "h", "y": -0.2}, font={"size": 13}, **extra)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _row_label(row: dict) -> str:
    return AVERAGE if row.get("task") == AVERAGE else f"{row['task']} · {row['metric']}"


def _empty(title: str, message: str) -> dict:
    fig = go.Figure()
    _layout(fig, title)
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 15})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _to_dict(fig)


def _recovery_panel(fig: Any, rows: list[dict], row: int) -> None:
    """Every row's recovery % as a bar labelled with its value, and a dashed line at 100%."""
    rec_labels = [_row_label(r) for r in rows]
    rec = [r.get("recovery_pct") if _finite(r.get("recovery_pct")) else None for r in rows]
    hover = [f"baseline {r.get('baseline')!s} → compressed {r.get('compressed')!s}"
             + (" (difference within noise)" if r.get("within_noise") else "")
             + (f"<br>{r['note']}" if r.get("note") else "") for r in rows]

    def label(r: dict, v: float | None) -> str:
        if v is None:
            return "n/a"
        return f"{v:.1f}%" + (" ≈" if r.get("within_noise") else " ⚠" if r.get("level") == "poor" else "")

    fig.add_trace(go.Bar(
        name="Recovery % (green ok / amber below 97% / red below 90%; ≈ within noise)", x=rec_labels, y=rec,
        hovertext=hover, marker_color=[recovery_color(r) for r in rows],
        marker_line={"color": [AVERAGE_COLOR if r.get("task") == AVERAGE else "rgba(0,0,0,0)" for r in rows],
                     "width": 2},
        text=[label(r, v) for r, v in zip(rows, rec)], textposition="outside", cliponaxis=False,
    ), row=row, col=1)
    fig.add_hline(y=100, line_dash="dash", line_color="#333", annotation_text="100% = no loss",
                  annotation_position="top left", row=row, col=1)
    top = max([v for v in rec if v is not None] + [100.0])
    fig.update_yaxes(title_text="recovery (%)", range=[0, top * 1.15], row=row, col=1)
    fig.update_xaxes(title_text="task · metric", row=row, col=1)


def recovery_color(row: dict) -> str:
    """Bar colour by the row's recovery level (compression.recovery.recovery_level): green, amber, red, grey."""
    level = row.get("level")
    if level is None:  # rows stored before levels existed
        from compression.recovery import recovery_level

        level = recovery_level(row.get("recovery_pct") if _finite(row.get("recovery_pct")) else None,
                               row.get("within_noise"))
    return LEVEL_COLORS.get(level, LEVEL_COLORS["unknown"])


def recovery_bars(rows: list[dict], title: str = "Accuracy: baseline vs compressed") -> dict:
    """Two panels: scores of baseline and compressed side by side, and recovery % per metric.

    Top: grouped bars for the higher-is-better metrics, in percent (accuracy-like scores in
    [0, 1] are scaled by 100). Perplexity-like metrics are on another scale, so they appear only
    in the bottom panel, where every row's recovery is a bar labelled with its percentage and a
    dashed line marks 100% (no loss). Rows with no defined recovery are drawn empty and labelled
    "n/a". With no higher-is-better metric at all (perplexity only) the score panel is left out.
    """
    if not rows:
        return _empty(title, "No evaluation results yet")
    scores = [r for r in rows if r.get("task") != AVERAGE and r.get("higher_is_better", True)]
    if not scores:  # perplexity only: no score panel to show, just the recovery
        fig = make_subplots(rows=1, cols=1, subplot_titles=("Recovery (compressed vs baseline)",))
        _recovery_panel(fig, rows, row=1)
        _layout(fig, "Quality: baseline vs compressed", barmode="group", height=380)
        return _to_dict(fig)
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.22,
                        subplot_titles=("Score (higher is better)", "Recovery (compressed vs baseline)"))

    def pct(v: Any) -> float | None:
        return (v * 100 if 0.0 <= v <= 1.0 else v) if _finite(v) else None

    labels = [_row_label(r) for r in scores]
    for name, key, color in (("Baseline", "baseline", BASELINE_COLOR), ("Compressed", "compressed", COMPRESSED_COLOR)):
        values = [pct(r.get(key)) for r in scores]
        errors = [pct(r.get(f"{key}_stderr")) if _finite(r.get(f"{key}_stderr")) else 0 for r in scores]
        fig.add_trace(go.Bar(name=f"{name} (± standard error)", x=labels, y=values, marker_color=color,
                             error_y={"type": "data", "array": errors, "visible": True, "color": "#555"},
                             text=[f"{v:.1f}" if v is not None else "n/a" for v in values],
                             textposition="outside", cliponaxis=False), row=1, col=1)
    fig.update_yaxes(title_text="score (%)", rangemode="tozero", row=1, col=1)
    _recovery_panel(fig, rows, row=2)
    _layout(fig, title, barmode="group", height=640)
    return _to_dict(fig)


def layer_loss(events: Iterable[dict], title: str = "Compression loss per layer") -> dict:
    """One line per module type: the reconstruction loss the engine reported for each layer.

    Events other than ``stage == "compress"`` with a finite ``loss`` are ignored; a module
    reported twice for a layer keeps its last value. The y axis is logarithmic when every
    loss is positive, since losses of different modules span orders of magnitude.
    """
    losses: dict[str, dict[int, float]] = {}
    total_layers = 0
    for ev in events:
        if ev.get("stage") != "compress" or not _finite(ev.get("loss")) or ev.get("layer") is None:
            continue
        module = str(ev.get("module") or "layer")
        losses.setdefault(module, {})[int(ev["layer"])] = float(ev["loss"])
        total_layers = max(total_layers, int(ev.get("layers") or 0), int(ev["layer"]) + 1)
    if not losses:
        return _empty(title, "No per-layer losses reported yet")
    fig = go.Figure()
    for i, (module, by_layer) in enumerate(losses.items()):
        layers = sorted(by_layer)
        fig.add_trace(go.Scatter(name=module, x=layers, y=[by_layer[k] for k in layers], mode="lines+markers",
                                 line={"color": PALETTE[i % len(PALETTE)]},
                                 hovertemplate=f"{module}<br>layer %{{x}}<br>loss %{{y:.3g}}<extra></extra>"))
    positive = all(v > 0 for by_layer in losses.values() for v in by_layer.values())
    fig.update_xaxes(title_text=f"decoder layer (0 … {total_layers - 1})", dtick=1 if total_layers <= 40 else None,
                     range=[-0.5, total_layers - 0.5])
    fig.update_yaxes(title_text="reconstruction loss (squared error, log scale)" if positive
                     else "reconstruction loss (squared error)", type="log" if positive else "linear")
    _layout(fig, title, height=460)
    return _to_dict(fig)


def pareto_front(points: list[dict], x_key: str, y_key: str, *, minimize_x: bool) -> list[dict]:
    """Points not beaten on both axes: y (recovery) higher is better, x lower (size) or higher (speed).

    Returned sorted by x. A point is dominated when another is at least as good on both axes
    and strictly better on one; points missing either value are skipped.
    """
    usable = [p for p in points if _finite(p.get(x_key)) and _finite(p.get(y_key))]

    def better_x(a: float, b: float) -> bool:
        return a < b if minimize_x else a > b

    front = []
    for p in usable:
        dominated = any(
            (q[y_key] >= p[y_key] and (q[x_key] == p[x_key] or better_x(q[x_key], p[x_key])))
            and (q[y_key] > p[y_key] or better_x(q[x_key], p[x_key]))
            for q in usable if q is not p)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p[x_key])


def compare_scatter(points: list[dict], title: str = "Recovery vs size") -> dict:
    """Every finished job of one base model as a point; the Pareto front drawn as a line.

    Left panel: recovery (%) against checkpoint size (MB), front = smallest size for its
    recovery. Right panel, only when some job has a measured ``speedup``: recovery against
    decode speed-up over the dense model, front = fastest for its recovery.
    """
    usable = [p for p in points if _finite(p.get("recovery_pct")) and _finite(p.get("size_mb"))]
    if not usable:
        return _empty(title, "No finished jobs with both a recovery and a size yet")
    with_speed = [p for p in usable if _finite(p.get("speedup"))]
    panels = [("size_mb", True, "checkpoint size (MB)")]
    if with_speed:
        panels.append(("speedup", False, "decode speed-up vs dense (×)"))
    fig = make_subplots(rows=1, cols=len(panels), horizontal_spacing=0.12,
                        subplot_titles=[f"Recovery vs {label.split(' (')[0]}" for _, _, label in panels])
    for col, (key, minimize, label) in enumerate(panels, start=1):
        pts = usable if key == "size_mb" else with_speed
        fig.add_trace(go.Scatter(
            name="jobs" if col == 1 else "jobs (speed measured)", x=[p[key] for p in pts],
            y=[p["recovery_pct"] for p in pts], mode="markers+text", text=[str(p.get("name", "")) for p in pts],
            textposition="top center", marker={"size": 11, "color": COMPRESSED_COLOR},
            hovertemplate="%{text}<br>" + label + " %{x:.3g}<br>recovery %{y:.1f}%<extra></extra>"),
            row=1, col=col)
        front = pareto_front(pts, key, "recovery_pct", minimize_x=minimize)
        fig.add_trace(go.Scatter(
            name="Pareto front" if col == 1 else "Pareto front (speed)", x=[p[key] for p in front],
            y=[p["recovery_pct"] for p in front], mode="lines+markers",
            line={"color": FRONT_COLOR, "dash": "dot", "shape": "hv" if minimize else "vh"},
            marker={"size": 15, "symbol": "circle-open", "color": FRONT_COLOR, "line": {"width": 2}},
            hoverinfo="skip"), row=1, col=col)
        fig.update_xaxes(title_text=label, row=1, col=col)
        fig.update_yaxes(title_text="recovery (%)", row=1, col=col)
    _layout(fig, title, height=480)
    return _to_dict(fig)


def compare_bars(jobs: list[dict], title: str = "Recovery per task and recipe") -> dict:
    """Grouped bars: for each task (its primary metric) one bar per recipe, labelled in percent.

    The x axis holds the tasks in first-seen order plus "Average"; a dashed line marks 100%.
    """
    tasks: list[str] = []
    for job in jobs:
        for r in job.get("rows") or []:
            if (r.get("primary", True) or r.get("task") == AVERAGE) and r.get("task") not in tasks:
                tasks.append(r["task"])
    if not tasks:
        return _empty(title, "No evaluated jobs to compare yet")
    tasks = [t for t in tasks if t != AVERAGE] + ([AVERAGE] if AVERAGE in tasks else [])
    fig = go.Figure()
    top = 100.0
    for i, job in enumerate(jobs):
        by_task = {r["task"]: r for r in job.get("rows") or [] if r.get("primary", True) or r.get("task") == AVERAGE}
        values = [by_task.get(t, {}).get("recovery_pct") for t in tasks]
        values = [v if _finite(v) else None for v in values]
        top = max([top] + [v for v in values if v is not None])
        fig.add_trace(go.Bar(name=str(job.get("name", f"job {i + 1}")), x=tasks, y=values,
                             marker_color=PALETTE[i % len(PALETTE)],
                             text=[f"{v:.1f}%" if v is not None else "n/a" for v in values],
                             textposition="outside", cliponaxis=False))
    fig.add_hline(y=100, line_dash="dash", line_color="#333", annotation_text="100% = no loss",
                  annotation_position="top left")
    fig.update_xaxes(title_text="task")
    fig.update_yaxes(title_text="recovery (%)", range=[0, top * 1.15])
    _layout(fig, title, barmode="group", height=480)
    return _to_dict(fig)
