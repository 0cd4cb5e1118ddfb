"""Plotly figures for the dashboard, built from plain Python data (no Django models here).

Every builder returns a JSON-serialisable dict ``{"data": [...], "layout": {...}}`` that the
page hands to ``Plotly.newPlot(el, fig.data, fig.layout)``. Charts are meant to be readable
without hovering: titles, axis titles with units and value labels on bars and points.
`plotly_js_path()` names the plotly.min.js shipped inside the installed plotly package, so the
web app serves it from its own static files (no CDN).

Inputs:
* `recovery_bars(rows)`: rows of `compression.evaluation.recovery.recovery_table`.
* `layer_loss(events)`: engine progress events
  ``{"stage": "compress", "layer": i, "layers": N, "module": "self_attn.q_proj", "loss": float}``.
* `compare_scatter(points)`: one dict per finished job of one base model:
  ``{"name": str, "recovery_pct": float, "size_mb": float, "speedup": float | None,
  "color": str, "eval_key": str, "eval_label": str}`` (``speedup`` = compressed decode tokens/s
  over dense; colour and evaluation group optional).
* `compare_bars(jobs)`: ``[{"name": recipe name, "rows": recovery_table rows, "color": str}, ...]``.
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
    extra.setdefault("legend", {"orientation": "h", "y": -0.2})
    fig.update_layout(title={"text": title, "x": 0.01}, template="plotly_white", margin={"t": 70, "l": 70, "r": 30,
                      "b": 70}, font={"size": 13}, **extra)


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
    """Bar colour by the row's recovery level (compression.evaluation.recovery.recovery_level): green, amber, red, grey."""
    level = row.get("level")
    if level is None:  # rows stored before levels existed
        from compression.evaluation.recovery import recovery_level

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


def job_colors(n: int) -> list[str]:
    """``n`` distinguishable colours: the palette first, then hues spread by the golden angle."""
    out = PALETTE[:n]
    for i in range(len(out), n):
        hue = (i * 137.508) % 360
        out.append(f"hsl({hue:.0f}, 65%, {42 + (i % 3) * 8}%)")
    return out


SYMBOLS = ["circle", "square", "diamond", "triangle-up", "cross", "star", "hexagon", "x"]


def compare_scatter(points: list[dict], title: str = "Recovery vs size") -> dict:
    """Every finished job of one base model as a point of its own colour (named in the legend, no
    text labels to overlap); one Pareto front per evaluation setting.

    Points may carry ``color`` (else one per job) and ``eval_key``/``eval_label`` (jobs evaluated
    differently are not comparable: each setting gets its own marker symbol and its own front).
    Left panel: recovery (%) against checkpoint size (MB), front = smallest size for its recovery.
    Right panel, only when some job has a measured ``speedup``: recovery against decode speed-up
    over the dense model, front = fastest for its recovery.
    """
    usable = [p for p in points if _finite(p.get("recovery_pct")) and _finite(p.get("size_mb"))]
    if not usable:
        return _empty(title, "No finished jobs with both a recovery and a size yet")
    colors = job_colors(len(usable))
    groups: list[str] = []
    for p in usable:
        if p.get("eval_key", "") not in groups:
            groups.append(p.get("eval_key", ""))
    with_speed = [p for p in usable if _finite(p.get("speedup"))]
    panels = [("size_mb", True, "checkpoint size (MB)")]
    if with_speed:
        panels.append(("speedup", False, "decode speed-up vs dense (×)"))
    fig = make_subplots(rows=1, cols=len(panels), horizontal_spacing=0.12,
                        subplot_titles=[f"Recovery vs {label.split(' (')[0]}" for _, _, label in panels])
    for col, (key, minimize, label) in enumerate(panels, start=1):
        for i, p in enumerate(usable):
            if key == "speedup" and not _finite(p.get("speedup")):
                continue
            symbol = SYMBOLS[groups.index(p.get("eval_key", "")) % len(SYMBOLS)]
            fig.add_trace(go.Scatter(
                name=str(p.get("name", f"job {i + 1}")), legendgroup=f"job{i}", showlegend=col == 1,
                x=[p[key]], y=[p["recovery_pct"]], mode="markers",
                marker={"size": 13, "color": p.get("color") or colors[i], "symbol": symbol,
                        "line": {"width": 1, "color": "#333"}},
                hovertemplate=(f"{p.get('name', '')}<br>{p.get('eval_label') or ''}<br>{label} %{{x:.3g}}"
                               "<br>recovery %{y:.1f}%<extra></extra>")), row=1, col=col)
        for g, group in enumerate(groups):
            members = [p for p in (usable if key == "size_mb" else with_speed) if p.get("eval_key", "") == group]
            front = pareto_front(members, key, "recovery_pct", minimize_x=minimize)
            if not front:
                continue
            suffix = f" · {members[0].get('eval_label')}" if len(groups) > 1 and members[0].get("eval_label") else ""
            fig.add_trace(go.Scatter(
                name=f"Pareto front{suffix}" + ("" if col == 1 else " (speed)"), showlegend=col == 1,
                legendgroup=f"front{g}", x=[p[key] for p in front], y=[p["recovery_pct"] for p in front],
                mode="lines", line={"color": FRONT_COLOR, "dash": ["dot", "dash", "dashdot", "longdash"][g % 4],
                                    "shape": "hv" if minimize else "vh"},
                hoverinfo="skip"), row=1, col=col)
        fig.update_xaxes(title_text=label, row=1, col=col)
        fig.update_yaxes(title_text="recovery (%)", row=1, col=col)
    _layout(fig, title, height=520, legend={"orientation": "v", "x": 1.02, "y": 1})
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
    colors = job_colors(len(jobs))
    for i, job in enumerate(jobs):
        by_task = {r["task"]: r for r in job.get("rows") or [] if r.get("primary", True) or r.get("task") == AVERAGE}
        values = [by_task.get(t, {}).get("recovery_pct") for t in tasks]
        values = [v if _finite(v) else None for v in values]
        top = max([top] + [v for v in values if v is not None])
        fig.add_trace(go.Bar(name=str(job.get("name", f"job {i + 1}")), x=tasks, y=values,
                             marker_color=job.get("color") or colors[i],
                             text=[f"{v:.1f}%" if v is not None else "n/a" for v in values],
                             textposition="outside", cliponaxis=False))
    fig.add_hline(y=100, line_dash="dash", line_color="#333", annotation_text="100% = no loss",
                  annotation_position="top left")
    fig.update_xaxes(title_text="task")
    fig.update_yaxes(title_text="recovery (%)", range=[0, top * 1.15])
    _layout(fig, title, barmode="group", height=480, legend={"orientation": "v", "x": 1.02, "y": 1})
    return _to_dict(fig)


# ------------------------------------------------------------------ recovery (issue 14): fine-tune and reconstruction
def finetune_loss(events: Iterable[dict], title: str = "Fine-tuning loss (distillation against the dense model)") -> dict:
    """The fine-tune's loss per optimiser step, from engine events
    ``{"stage": "finetune", "kind": "finetune", "step": int, "loss": float, "kl": float, "layer_loss": float,
    "tokens": int}`` (or a results ``loss_curve`` of ``[step, loss]`` pairs). The KL part is drawn too
    when a per-layer loss is mixed in; the hover text gives the tokens seen. A step reported twice
    (a resumed job) keeps its last value."""
    by_step: dict[int, dict] = {}
    for ev in events:
        if isinstance(ev, (list, tuple)) and len(ev) == 2:
            ev = {"kind": "finetune", "step": ev[0], "loss": ev[1]}
        if ev.get("kind") != "finetune" or not _finite(ev.get("loss")) or ev.get("step") is None:
            continue
        by_step[int(ev["step"])] = ev
    if not by_step:
        return _empty(title, "No fine-tuning steps reported yet")
    steps = sorted(by_step)
    fig = go.Figure()
    hover = [f"step {s}" + (f"<br>{by_step[s]['tokens']:,} tokens" if _finite(by_step[s].get("tokens")) else "")
             for s in steps]
    fig.add_trace(go.Scatter(name="loss", x=steps, y=[by_step[s]["loss"] for s in steps], mode="lines+markers",
                             line={"color": COMPRESSED_COLOR}, hovertext=hover,
                             hovertemplate="%{hovertext}<br>loss %{y:.4g}<extra></extra>"))
    if any(_finite(by_step[s].get("layer_loss")) and by_step[s]["layer_loss"] > 0 for s in steps):
        fig.add_trace(go.Scatter(name="KL part", x=steps, y=[by_step[s].get("kl") for s in steps],
                                 mode="lines", line={"color": FRONT_COLOR, "dash": "dot"}))
    fig.update_xaxes(title_text="optimiser step")
    fig.update_yaxes(title_text="loss (KL divergence to the dense model, per token)", rangemode="tozero")
    _layout(fig, title, height=420)
    return _to_dict(fig)


def reconstruction_error(events: Iterable[dict],
                         title: str = "Layer-wise reconstruction: output error before / after", *,
                         kind: str = "reconstruction",
                         labels: tuple[str, str] = ("after pruning (one-shot)", "after reconstruction")) -> dict:
    """Per decoder layer, the pruned layer's output error against the dense output before and after
    reconstruction, from engine events ``{"kind": "reconstruction", "layer": i, "layers": N,
    "error_before": float, "error_after": float, "relative_before", "relative_after"}`` (or the
    report's ``reconstruction`` list). Relative errors (MSE / mean square of the dense output) when
    every event has them, so layers of different scale compare; log axis when all are positive."""
    rows: dict[int, dict] = {}
    for ev in events:
        if ev.get("kind", kind) != kind or ev.get("layer") is None:
            continue
        if _finite(ev.get("error_before")) and _finite(ev.get("error_after")):
            rows[int(ev["layer"])] = ev
    if not rows:
        return _empty(title, f"No {labels[1].removeprefix('after ')} reported")
    layers = sorted(rows)
    relative = all(_finite(rows[i].get("relative_before")) and _finite(rows[i].get("relative_after")) for i in layers)
    before_key, after_key = ("relative_before", "relative_after") if relative else ("error_before", "error_after")
    before = [rows[i][before_key] for i in layers]
    after = [rows[i][after_key] for i in layers]
    fig = go.Figure()
    fig.add_trace(go.Bar(name=labels[0], x=layers, y=before, marker_color=BASELINE_COLOR))
    fig.add_trace(go.Bar(name=labels[1], x=layers, y=after, marker_color=RECOVERY_COLOR,
                         text=[f"−{(1 - a / b) * 100:.0f}%" if b > 0 and a <= b else "" for a, b in zip(after, before)],
                         textposition="outside", cliponaxis=False))
    positive = all(v > 0 for v in before + after)
    fig.update_xaxes(title_text="decoder layer", dtick=1 if len(layers) <= 40 else None)
    fig.update_yaxes(title_text=("relative output error (MSE / mean square of the dense output)" if relative
                                 else "output MSE vs the dense layer") + (", log scale" if positive else ""),
                     type="log" if positive else "linear")
    _layout(fig, title, barmode="group", height=440)
    return _to_dict(fig)


def autoround_error(events: Iterable[dict]) -> dict:
    """Per decoder layer, the quantized layer's output error against the dense output with plain
    round-to-nearest and with AutoRound's tuned rounding (engine events ``{"kind": "autoround", ...}``
    or the report's ``autoround`` list: error_rtn / error_tuned and their relative forms)."""
    rows = [{**ev, "error_before": ev.get("error_before", ev.get("error_rtn")),
             "error_after": ev.get("error_after", ev.get("error_tuned")),
             "relative_before": ev.get("relative_before", ev.get("relative_rtn")),
             "relative_after": ev.get("relative_after", ev.get("relative_tuned")), "kind": "autoround"}
            for ev in events]
    return reconstruction_error(rows, "AutoRound: layer output error, round-to-nearest vs tuned rounding",
                                kind="autoround", labels=("round-to-nearest", "after AutoRound"))
