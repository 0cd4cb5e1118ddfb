"""Accuracy recovery: how much of the dense model's score the compressed model keeps.

Recovery is a percentage where 100 means "as good as the baseline":

* higher-is-better metrics (accuracy, exact match): ``compressed / baseline * 100``;
* lower-is-better metrics (perplexity, bits per byte): ``baseline / compressed * 100``, so a
  perplexity that rises from 10 to 12.5 recovers 80%.

Undefined cases return ``None`` instead of a number that would mislead:
* either value missing (``None``) or not finite;
* higher-is-better with a baseline of 0 (any ratio to zero is meaningless; a random model
  scoring 0 on GSM8K is the usual case);
* lower-is-better with a compressed value of 0 (or a baseline of 0), or any negative value
  for a lower-is-better metric (perplexities are positive by definition).

Rows with a ``None`` recovery are shown in the tables but left out of the average.
"""
from __future__ import annotations

import math
from typing import Any

AVERAGE = "Average"


def _number(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def recovery(baseline: float | None, compressed: float | None, higher_is_better: bool = True) -> float | None:
    """Percent of the baseline score the compressed model keeps (see the module docstring)."""
    b, c = _number(baseline), _number(compressed)
    if b is None or c is None:
        return None
    if higher_is_better:
        return None if b == 0 else c / b * 100.0
    if b <= 0 or c <= 0:
        return None
    return b / c * 100.0


def _metrics(result: dict, task: str) -> dict[str, dict]:
    return (result.get("tasks", {}).get(task) or {}).get("metrics", {}) or {}


def recovery_table(baseline_result: dict, compressed_result: dict) -> list[dict]:
    """Rows comparing two `compression.evaluation.evaluate` results, plus an average row.

    One row per (task, metric) present in both results, in the baseline's order:
    ``{"task", "metric", "baseline", "compressed", "recovery_pct", "higher_is_better", "primary"}``
    where ``primary`` marks the one metric per task that summaries use (`primary_metric`).
    The last row has ``task == "Average"`` and ``metric == "recovery"``. It averages over the
    primary rows only (so a task with acc and acc_norm, or wikitext's three perplexities, counts
    once) whose recovery is defined: their recovery, and the baseline and compressed values of
    the higher-is-better ones (a perplexity is on another scale and would swamp a mean of
    accuracies, so it only counts towards the recovery average). ``"rows"`` says how many
    rows it averages.
    """
    rows: list[dict] = []
    for task in baseline_result.get("tasks", {}):
        base_metrics, comp_metrics = _metrics(baseline_result, task), _metrics(compressed_result, task)
        primary = primary_metric({m: v for m, v in base_metrics.items() if m in comp_metrics})
        for metric, base in base_metrics.items():
            comp = comp_metrics.get(metric)
            if comp is None:
                continue
            hib = bool(base.get("higher_is_better", True))
            rows.append({
                "task": task, "metric": metric,
                "baseline": _number(base.get("value")), "compressed": _number(comp.get("value")),
                "recovery_pct": recovery(base.get("value"), comp.get("value"), hib),
                "higher_is_better": hib, "primary": metric == primary,
            })
    if rows:
        rows.append(average_row(rows))
    return rows


def average_row(rows: list[dict]) -> dict:
    """The "Average" row of `recovery_table` for `rows` (ignores an existing average row)."""
    defined = [r for r in rows if r.get("task") != AVERAGE and r.get("primary", True)
               and r.get("recovery_pct") is not None]
    scores = [r for r in defined if r.get("higher_is_better", True)]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "task": AVERAGE, "metric": "recovery",
        "baseline": mean([r["baseline"] for r in scores]),
        "compressed": mean([r["compressed"] for r in scores]),
        "recovery_pct": mean([r["recovery_pct"] for r in defined]),
        "higher_is_better": True, "primary": True,
        "rows": len(defined),
    }


def primary_metric(metrics: dict[str, dict]) -> str | None:
    """The metric a one-number summary of a task should use (acc_norm > acc > exact_match > ppl)."""
    for name in ("acc_norm", "acc", "exact_match,strict-match", "exact_match", "word_perplexity", "perplexity"):
        if name in metrics:
            return name
    return next(iter(metrics), None)
