"""The job page's results table, made from the stored recovery rows (compression.evaluation.recovery).

Rows stored by older versions lack the stderr / level fields; they are recomputed here where the
values allow, so every page shows the same kind of table. Accuracies print as percentages with
lm-eval's standard error, perplexities as they are; a difference inside the noise is marked, poor
recovery coloured (the row's ``level``) and warned about above the table; a row without a usable
score says why instead of showing a number.
"""
from __future__ import annotations

from typing import Any

from compression.evaluation.recovery import (AVERAGE, PERPLEXITY, average_row, headline, noise_band, recovery_level, recovery_note,
                                  warnings)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _is_fraction(row: dict) -> bool:
    return row.get("higher_is_better", True) and all(
        not _finite(row.get(k)) or 0.0 <= row[k] <= 1.0 for k in ("baseline", "compressed"))


def _fmt(value: Any, se: Any, fraction: bool) -> str:
    if not _finite(value):
        return "n/a"
    text = f"{value * 100:.2f}" if fraction else (f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}")
    if _finite(se):
        text += f" ± {se * 100:.2f}" if fraction else f" ± {se:.3g}"
    return text


def complete_row(row: dict) -> dict:
    """``row`` with kind, difference, noise, within_noise, level and note filled in when missing."""
    row = dict(row)
    hib = row.get("higher_is_better", True)
    row.setdefault("kind", "accuracy" if hib else PERPLEXITY)
    b, c = row.get("baseline"), row.get("compressed")
    if "difference" not in row:
        row["difference"] = c - b if _finite(b) and _finite(c) else None
    if "within_noise" not in row:
        band = noise_band(row.get("baseline_stderr"), row.get("compressed_stderr"))
        row["within_noise"] = abs(row["difference"]) <= band if band is not None and row["difference"] is not None \
            else None
    row.setdefault("level", recovery_level(row.get("recovery_pct") if _finite(row.get("recovery_pct")) else None,
                                           row.get("within_noise")))
    if row.get("recovery_pct") is None and not row.get("note"):
        row["note"] = recovery_note(b, c, hib) or "recovery could not be computed"
    return row


def results_table(metrics: list[dict], identity: dict | None = None) -> dict:
    """Context for templates/jobs/_results.html: display rows, warnings, the headline, the baseline label."""
    from compression.card.facts import baseline_note

    rows = [r for r in metrics or [] if isinstance(r, dict)]
    if any(r.get("task") == AVERAGE and "kind" not in r for r in rows):
        # stored by an older version whose average mixed perplexity in: recompute it, accuracy only
        rows = [r for r in rows if r.get("task") != AVERAGE]
        if any(r.get("higher_is_better", True) for r in rows):
            rows.append(average_row(rows))
    rows = [complete_row(r) for r in rows]
    display = []
    for r in rows:
        fraction = _is_fraction(r)
        diff = r.get("difference")
        display.append({
            "task": r.get("task"), "metric": r.get("metric"), "kind": r.get("kind"),
            "average": r.get("task") == AVERAGE, "lower_is_better": not r.get("higher_is_better", True),
            "baseline": _fmt(r.get("baseline"), r.get("baseline_stderr"), fraction),
            "compressed": _fmt(r.get("compressed"), r.get("compressed_stderr"), fraction),
            "difference": "n/a" if diff is None else (f"{diff * 100:+.2f} pts" if fraction else f"{diff:+.4f}"),
            "samples": r.get("samples"), "n_shot": r.get("n_shot"),
            "recovery": None if r.get("recovery_pct") is None else f"{r['recovery_pct']:.2f}%",
            "within_noise": r.get("within_noise"), "level": r.get("level"), "note": r.get("note"),
        })
    name = (identity or {}).get("name")
    note = baseline_note(identity or {})
    return {"rows": display, "warnings": warnings(rows), "headline": headline(rows),
            "baseline_label": f"{name} ({note})" if name and note else name,
            "baseline_note": note, "no_score": bool(rows) and all(r.get("recovery_pct") is None for r in rows)}
