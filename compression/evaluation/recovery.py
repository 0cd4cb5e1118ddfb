"""Accuracy recovery: how much of the dense model's score the compressed model keeps, and how sure we are.

Recovery is a percentage where 100 means "as good as the baseline":

* higher-is-better metrics (accuracy, exact match): ``compressed / baseline * 100``;
* lower-is-better metrics (perplexity, bits per byte): ``baseline / compressed * 100``, so a
  perplexity that rises from 10 to 12.5 recovers 80%.

Undefined cases return ``None`` instead of a number that would mislead (`recovery_note` says why):
* either value missing (``None``) or not finite;
* higher-is-better with a baseline of 0 (any ratio to zero is meaningless; a random model
  scoring 0 on GSM8K is the usual case);
* lower-is-better with a compressed value of 0 (or a baseline of 0), or any negative value
  for a lower-is-better metric (perplexities are positive by definition).

Accuracy and perplexity are kept apart: the "Average" row averages the accuracy tasks only (one
primary metric per task); perplexities are shown in their own rows and never enter it. Each row
carries lm-eval's standard errors and the number of documents scored, the difference between the
two models and whether it lies inside the noise (|difference| <= 1.96 * sqrt(se_b^2 + se_c^2), a
95% band that treats the two runs as independent, so it is conservative for paired runs on the
same documents), and a `level` ("ok", "warn", "poor", "unknown") that pages and cards colour by.
"""
from __future__ import annotations

import math
from typing import Any

AVERAGE = "Average"
ACCURACY, PERPLEXITY = "accuracy", "perplexity"
RECOVERY_OK = 97.0  # at or above: fine
RECOVERY_POOR = 90.0  # below: poor; in between: a warning
Z95 = 1.96


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


def recovery_note(baseline: Any, compressed: Any, higher_is_better: bool = True) -> str | None:
    """Why `recovery` is undefined for these values (None when it is defined)."""
    b, c = _number(baseline), _number(compressed)
    if b is None and c is None:
        return "neither evaluation produced a usable score"
    if b is None:
        return "the baseline evaluation produced no usable score"
    if c is None:
        return "the compressed model's evaluation produced no usable score"
    if higher_is_better and b == 0:
        return "the baseline scored 0, so no ratio can be formed"
    if not higher_is_better and (b <= 0 or c <= 0):
        return "a perplexity must be positive; this one is not"
    return None


def recovery_level(pct: float | None, within_noise: bool | None = None) -> str:
    """"ok", "warn" or "poor" for a recovery percentage ("unknown" when there is none). A difference
    inside the evaluation noise is never flagged."""
    if pct is None:
        return "unknown"
    if pct >= RECOVERY_OK or within_noise:
        return "ok"
    return "warn" if pct >= RECOVERY_POOR else "poor"


def noise_band(base_se: Any, comp_se: Any) -> float | None:
    """Half-width of the 95% band of a difference of two scores with these standard errors."""
    b, c = _number(base_se), _number(comp_se)
    if b is None or c is None:
        return None
    return Z95 * math.sqrt(b * b + c * c)


def _metrics(result: dict, task: str) -> dict[str, dict]:
    return (result.get("tasks", {}).get(task) or {}).get("metrics", {}) or {}


def _task_samples(result: dict, task: str) -> int | None:
    n = (result.get("tasks", {}).get(task) or {}).get("samples")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _task_shots(result: dict, task: str) -> int | None:
    n = (result.get("tasks", {}).get(task) or {}).get("n_shot")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _finish_row(row: dict) -> dict:
    """Add difference, noise band, within_noise, level and note to a row holding the values."""
    b, c = row["baseline"], row["compressed"]
    row["difference"] = c - b if b is not None and c is not None else None
    row["noise"] = noise_band(row.get("baseline_stderr"), row.get("compressed_stderr"))
    row["within_noise"] = (abs(row["difference"]) <= row["noise"]
                           if row["difference"] is not None and row["noise"] is not None else None)
    row["level"] = recovery_level(row["recovery_pct"], row["within_noise"])
    row["note"] = None if row["recovery_pct"] is not None else (
        recovery_note(b, c, row["higher_is_better"]) or "recovery could not be computed")
    return row


def recovery_table(baseline_result: dict, compressed_result: dict) -> list[dict]:
    """Rows comparing two `compression.evaluation.harness.evaluate` results, plus an accuracy average row.

    One row per (task, metric) present in both results, in the baseline's order::

        {"task", "metric", "kind": "accuracy" | "perplexity", "baseline", "compressed",
         "baseline_stderr", "compressed_stderr", "samples" (documents scored), "n_shot",
         "recovery_pct", "higher_is_better", "primary", "difference", "noise", "within_noise",
         "level", "note"}

    ``primary`` marks the one metric per task that summaries use (`primary_metric`). When some
    task is an accuracy task, the last row has ``task == "Average"``: the mean over the primary
    accuracy rows whose recovery is defined (``"rows"`` of them) of their recovery, scores and
    standard errors (se of a mean of independent scores). Perplexity rows never enter it.
    """
    rows: list[dict] = []
    for task in baseline_result.get("tasks", {}):
        base_metrics, comp_metrics = _metrics(baseline_result, task), _metrics(compressed_result, task)
        primary = primary_metric({m: v for m, v in base_metrics.items() if m in comp_metrics})
        samples = _task_samples(compressed_result, task) or _task_samples(baseline_result, task)
        for metric, base in base_metrics.items():
            comp = comp_metrics.get(metric)
            if comp is None:
                continue
            hib = bool(base.get("higher_is_better", True))
            rows.append(_finish_row({
                "task": task, "metric": metric, "kind": ACCURACY if hib else PERPLEXITY,
                "baseline": _number(base.get("value")), "compressed": _number(comp.get("value")),
                "baseline_stderr": _number(base.get("stderr")), "compressed_stderr": _number(comp.get("stderr")),
                "samples": samples, "n_shot": _task_shots(compressed_result, task),
                "recovery_pct": recovery(base.get("value"), comp.get("value"), hib),
                "higher_is_better": hib, "primary": metric == primary,
            }))
    if any(r["kind"] == ACCURACY and r["primary"] for r in rows):
        rows.append(average_row(rows))
    return rows


def average_row(rows: list[dict]) -> dict:
    """The "Average" row of `recovery_table`: primary accuracy rows with a defined recovery only."""
    used = [r for r in rows if r.get("task") != AVERAGE and r.get("primary", True)
            and r.get("higher_is_better", True) and r.get("recovery_pct") is not None]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    def mean_se(key: str) -> float | None:
        ses = [_number(r.get(key)) for r in used]
        if not ses or any(s is None for s in ses):
            return None
        return math.sqrt(sum(s * s for s in ses)) / len(ses)

    samples = [r.get("samples") for r in used]
    row = {
        "task": AVERAGE, "metric": f"mean accuracy of {len(used)} task(s)", "kind": ACCURACY,
        "baseline": mean([r["baseline"] for r in used]), "compressed": mean([r["compressed"] for r in used]),
        "baseline_stderr": mean_se("baseline_stderr"), "compressed_stderr": mean_se("compressed_stderr"),
        "samples": sum(samples) if samples and all(isinstance(n, int) for n in samples) else None,
        "n_shot": None, "recovery_pct": mean([r["recovery_pct"] for r in used]),
        "higher_is_better": True, "primary": True, "rows": len(used),
    }
    _finish_row(row)
    if not used:
        row["note"] = "no accuracy task produced a usable score, so there is no average"
    return row


def headline(rows: list[dict]) -> dict | None:
    """The one recovery a summary shows: the accuracy average, else the first primary perplexity row.
    ``{"kind", "recovery_pct", "level", "label", "note", "within_noise"}``; None without rows."""
    # an "Average" row without "kind" was stored by an older version that averaged perplexities in too
    avg = next((r for r in rows if r.get("task") == AVERAGE and "kind" in r), None)
    body = [r for r in rows if r.get("task") != AVERAGE]
    if avg is None and any(r.get("higher_is_better", True) for r in body):
        avg = average_row(body)  # rows stored without (a trustworthy) average row
    if avg is not None:
        return {"kind": ACCURACY, "recovery_pct": avg.get("recovery_pct"), "level": avg.get("level"),
                "label": "accuracy recovery (mean of the accuracy tasks)", "note": avg.get("note"),
                "within_noise": avg.get("within_noise")}
    ppl = next((r for r in body if r.get("primary", True) and not r.get("higher_is_better", True)), None)
    if ppl is None:
        return None
    return {"kind": PERPLEXITY, "recovery_pct": ppl.get("recovery_pct"), "level": ppl.get("level"),
            "label": f"perplexity recovery ({ppl['task']}, baseline / compressed)", "note": ppl.get("note"),
            "within_noise": ppl.get("within_noise")}


def warnings(rows: list[dict]) -> list[str]:
    """Plain-language warnings for poor or weak recovery and for scores that could not be computed."""
    out = []
    for r in rows:
        if r.get("task") != AVERAGE and not r.get("primary", True):
            continue
        if r.get("task") == AVERAGE and r.get("rows") == 1 and not r.get("note"):
            continue  # the one task's own warning says it already
        name = "the accuracy average" if r.get("task") == AVERAGE else f"{r['task']} ({r['metric']})"
        if r.get("note"):
            out.append(f"{name}: {r['note']}.")
        elif r.get("level") == "poor":
            out.append(f"{name}: the compressed model keeps only {r['recovery_pct']:.1f}% of the baseline — "
                       "poor recovery; this recipe loses much of the model's quality.")
        elif r.get("level") == "warn":
            noise = ("beyond the evaluation noise" if r.get("within_noise") is False
                     else "(no standard error was measured, so the noise is unknown)")
            out.append(f"{name}: {r['recovery_pct']:.1f}% recovery, a noticeable loss {noise}.")
    return out


def primary_metric(metrics: dict[str, dict]) -> str | None:
    """The metric a one-number summary of a task should use (acc_norm > acc > exact_match > ppl)."""
    for name in ("acc_norm", "acc", "exact_match,strict-match", "exact_match", "word_perplexity", "perplexity"):
        if name in metrics:
            return name
    return next(iter(metrics), None)
