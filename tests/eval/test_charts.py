"""Plotly figure builders: the right traces and values from plain data, JSON-ready."""
from __future__ import annotations

import json

import pytest

from compression.evaluation.recovery import recovery_table
from jobs import charts
from tests.eval.facts import BASELINE, COMPRESSED


def test_recovery_bars_show_scores_side_by_side_and_recovery_with_a_100_percent_line():
    rows = recovery_table(BASELINE, COMPRESSED)
    fig = charts.recovery_bars(rows)
    json.dumps(fig)
    baseline, compressed, rec = fig["data"]
    assert [t["type"] for t in fig["data"]] == ["bar", "bar", "bar"]
    assert baseline["name"].startswith("Baseline") and compressed["name"].startswith("Compressed")
    assert baseline["y"] == pytest.approx([50.0, 45.0, 80.0, 70.0])  # accuracies in percent, no perplexity
    assert baseline["error_y"]["array"] == pytest.approx([1.0] * 4)  # lm-eval's stderr, in points
    assert rec["x"][-2:] == ["wikitext · word_perplexity", "Average"]
    assert rec["y"][-2] == pytest.approx(80.0) and rec["text"][-2] == "80.0% ⚠"
    # poor recovery is red, a difference inside the noise green and marked
    colors = dict(zip(rec["x"], rec["marker"]["color"]))
    assert colors["wikitext · word_perplexity"] == charts.LEVEL_COLORS["poor"]
    assert colors["arc_easy · acc_norm"] == charts.LEVEL_COLORS["ok"] and rec["text"][1].endswith("≈")
    assert colors["arc_easy · acc"] == charts.LEVEL_COLORS["warn"]
    shapes = fig["layout"]["shapes"]
    assert any(s.get("y0") == 100 and s.get("y1") == 100 for s in shapes)
    assert fig["layout"]["title"]["text"] and fig["layout"]["yaxis"]["title"]["text"] == "score (%)"


def test_recovery_bars_for_perplexity_alone_show_only_the_recovery_panel():
    rows = [{"task": "wikitext2_ppl", "metric": "perplexity", "baseline": 29.8, "compressed": 31.1,
             "recovery_pct": 95.8, "higher_is_better": False},
            {"task": "Average", "metric": "recovery", "baseline": None, "compressed": None,
             "recovery_pct": 95.8, "higher_is_better": True}]
    fig = charts.recovery_bars(rows)
    json.dumps(fig)
    (rec,) = fig["data"]  # no empty score panel
    assert rec["name"].startswith("Recovery %") and rec["y"] == pytest.approx([95.8, 95.8])
    assert rec["marker"]["color"][0] == charts.LEVEL_COLORS["warn"]  # old rows without a level get one
    assert "yaxis2" not in fig["layout"] and fig["layout"]["yaxis"]["title"]["text"] == "recovery (%)"
    assert any(s.get("y0") == 100 for s in fig["layout"]["shapes"])


def test_layer_loss_draws_one_line_per_module_over_layers():
    events = [{"stage": "compress", "layer": i, "layers": 3, "module": m, "loss": (i + 1) * s}
              for i in range(3) for m, s in (("self_attn.q_proj", 0.1), ("mlp.down_proj", 2.0))]
    events += [{"stage": "calibrate", "message": "x"}, {"stage": "compress", "layer": 0, "module": "x", "loss": None}]
    fig = charts.layer_loss(events)
    assert [t["name"] for t in fig["data"]] == ["self_attn.q_proj", "mlp.down_proj"]
    assert fig["data"][1]["x"] == [0, 1, 2] and fig["data"][1]["y"] == pytest.approx([2.0, 4.0, 6.0])
    assert fig["layout"]["yaxis"]["type"] == "log"
    assert "decoder layer" in fig["layout"]["xaxis"]["title"]["text"]


def test_layer_loss_without_events_is_an_empty_figure_with_a_message():
    fig = charts.layer_loss([])
    assert fig["data"] == [] and "No per-layer losses" in fig["layout"]["annotations"][0]["text"]


POINTS = [
    {"name": "FP8", "recovery_pct": 99.5, "size_mb": 150.0, "speedup": 1.3},
    {"name": "W4A16", "recovery_pct": 97.0, "size_mb": 90.0, "speedup": 1.8},
    {"name": "W4A16-g32", "recovery_pct": 96.0, "size_mb": 95.0, "speedup": 1.7},  # dominated by W4A16
    {"name": "2:4+W4A16", "recovery_pct": 91.0, "size_mb": 70.0},  # speed not measured
]


def test_pareto_front_keeps_only_undominated_points():
    front = charts.pareto_front(POINTS, "size_mb", "recovery_pct", minimize_x=True)
    assert [p["name"] for p in front] == ["2:4+W4A16", "W4A16", "FP8"]
    fast = charts.pareto_front(POINTS, "speedup", "recovery_pct", minimize_x=False)
    assert [p["name"] for p in fast] == ["FP8", "W4A16"]


def test_compare_scatter_gives_every_job_its_own_colour_and_legend_entry_without_text_labels():
    fig = charts.compare_scatter(POINTS)
    json.dumps(fig)
    size_points = [t for t in fig["data"] if t["mode"] == "markers" and t.get("xaxis", "x") == "x"]
    assert [t["name"] for t in size_points] == ["FP8", "W4A16", "W4A16-g32", "2:4+W4A16"]
    colors = [t["marker"]["color"] for t in size_points]
    assert len(set(colors)) == 4  # distinct
    assert all("text" not in t or not t["text"] for t in fig["data"])  # nothing to overlap
    (front,) = [t for t in fig["data"] if t["mode"] == "lines" and t.get("xaxis", "x") == "x"]
    assert front["x"] == [70.0, 90.0, 150.0] and front["y"] == [91.0, 97.0, 99.5]
    speed_points = [t for t in fig["data"] if t["mode"] == "markers" and t.get("xaxis") == "x2"]
    assert [t["x"][0] for t in speed_points] == [1.3, 1.8, 1.7]  # only jobs with a measured speed
    (front_speed,) = [t for t in fig["data"] if t["mode"] == "lines" and t.get("xaxis") == "x2"]
    assert front_speed["x"] == [1.3, 1.8]
    assert fig["layout"]["xaxis"]["title"]["text"] == "checkpoint size (MB)"
    assert "speed-up" in fig["layout"]["xaxis2"]["title"]["text"]


def test_jobs_with_different_evaluation_settings_get_their_own_front_and_symbol():
    points = [dict(p, eval_key="a", eval_label="wikitext2_ppl") for p in POINTS[:2]] + \
             [dict(p, eval_key="b", eval_label="arc_easy · limit 20") for p in POINTS[2:]]
    fig = charts.compare_scatter([{**p, "speedup": None} for p in points])
    fronts = [t for t in fig["data"] if t["mode"] == "lines"]
    assert len(fronts) == 2 and "arc_easy · limit 20" in fronts[1]["name"]
    symbols = [t["marker"]["symbol"] for t in fig["data"] if t["mode"] == "markers"]
    assert symbols[0] == symbols[1] != symbols[2] == symbols[3]


def test_job_colours_stay_distinct_past_the_palette():
    colors = charts.job_colors(30)
    assert len(set(colors)) == 30 and colors[:8] == charts.PALETTE


def test_compare_scatter_without_speed_has_only_the_size_panel():
    fig = charts.compare_scatter([{**p, "speedup": None} for p in POINTS])
    assert len(fig["data"]) == 5 and "xaxis2" not in fig["layout"]


def test_compare_bars_groups_primary_recovery_per_task_by_recipe():
    rows = recovery_table(BASELINE, COMPRESSED)
    other = [dict(r, recovery_pct=r["recovery_pct"] - 1 if r["recovery_pct"] else None) for r in rows]
    fig = charts.compare_bars([{"name": "W4A16", "rows": rows}, {"name": "FP8", "rows": other}])
    a, b = fig["data"]
    assert a["name"] == "W4A16" and b["name"] == "FP8"
    assert a["x"] == ["arc_easy", "piqa", "wikitext", "Average"]
    assert a["y"][0] == pytest.approx(0.44 / 0.45 * 100) and b["y"][0] == pytest.approx(a["y"][0] - 1)
    assert a["text"][2] == "80.0%" and fig["layout"]["barmode"] == "group"


def test_plotly_js_ships_with_the_package():
    path = charts.plotly_js_path()
    assert path.name == "plotly.min.js" and path.stat().st_size > 1_000_000
