"""Recommend: which presets and group sizes a model's shapes allow, and which recipe the
side-by-side quality benchmark found best for each bit budget.

Inputs:

* the model's config, walked on the meta device by :func:`compression.preflight.model_layout`
  once; every preset (and, for the presets that take one, every group size the form offers) is
  then checked by :func:`compression.preflight.preflight` against that layout, so "allowed"
  here means exactly "a job with this preset passes the pre-flight";
* ``compression/quality_table.json``: generated from ``bench/results/quality.json`` by
  ``python bench/quality.py --table`` (never edited by hand; no numbers live in this module).

A recipe's *bit budget* is its nominal stored bits per dense weight of the compressed Linears:
the weight format's bits (16 when the weights stay unquantized), halved by 2:4 sparsity (scales,
zero points and the sparsity metadata are left out, so W4A16 g64 and 2:4 + FP8 are both "4").
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from compression.recipe import PRESET_GROUP_SIZES, PRESETS, Recipe, RecipeError, presets_with_option

TABLE_PATH = Path(__file__).with_name("quality_table.json")
# presets whose form / API options take a group size (see compression.recipe._PRESET_OPTIONS)
GROUP_SIZE_PRESETS = tuple(presets_with_option("group_size"))


def nominal_weight_bits(recipe: Recipe) -> float:
    """Stored bits per dense weight of the compressed Linears (see module doc)."""
    bits = 16.0
    keep = 1.0
    for modifier in recipe.modifiers:
        if modifier.prunes:
            keep = 1.0 - float(modifier.sparsity or 0.0)
        elif modifier.quantizes:
            for group in modifier.config_groups.values():
                if group.weights is not None:
                    bits = float(group.weights.num_bits)
    return round(bits * keep, 3)


@functools.lru_cache(maxsize=4)
def _read_table(path: str, mtime: float) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def quality_table(path: Path | None = None) -> dict | None:
    """The checked-in table generated from the quality benchmark, or None when there is none."""
    path = path or TABLE_PATH
    if not path.is_file():
        return None
    return _read_table(str(path), path.stat().st_mtime)


def _budget_label(bits: float) -> str:
    return f"{bits:g} bits per weight"


def allowed_schemes(model_config: Any, *, trust_remote_code: bool = False, layout=None) -> list[dict]:
    """Every preset: whether this model's shapes allow it (and why not), and its allowed group sizes."""
    from compression.preflight import model_layout

    layout = layout or model_layout(model_config, trust_remote_code=trust_remote_code)
    out = []
    for name, description in PRESETS.items():
        entry: dict[str, Any] = {"preset": name, "description": description, "allowed": True, "reason": None,
                                 "bits": nominal_weight_bits(Recipe.from_preset(name))}
        if name in GROUP_SIZE_PRESETS:
            sizes, reasons = [], []
            candidates = list(PRESET_GROUP_SIZES) + (["channel"] if name in ("W4A16", "2:4+W4A16") else [])
            for size in candidates:
                reason = _refusal(model_config, Recipe.from_preset(name, group_size=size), layout,
                                  trust_remote_code)
                if reason is None:
                    sizes.append(size)
                else:
                    reasons.append(f"group size {size}: {reason}")
            entry["group_sizes"] = sizes
            if not sizes:
                entry.update(allowed=False, reason="; ".join(reasons))
        else:
            reason = _refusal(model_config, Recipe.from_preset(name), layout, trust_remote_code)
            if reason is not None:
                entry.update(allowed=False, reason=reason)
        out.append(entry)
    return out


def _refusal(model_config: Any, recipe: Recipe, layout, trust_remote_code: bool) -> str | None:
    from compression.preflight import preflight

    try:
        preflight(model_config, recipe, trust_remote_code=trust_remote_code, layout=layout)
    except RecipeError as exc:
        return f"{exc.field}: {exc.message}"
    return None


def _row_allowed(row: dict, schemes: dict[str, dict]) -> tuple[bool, str | None]:
    preset = (row.get("preset") or {}).get("preset")
    scheme = schemes.get(preset)
    if scheme is None:
        return False, f"preset {preset!r} is not offered here"
    if not scheme["allowed"]:
        return False, scheme["reason"]
    size = (row.get("preset") or {}).get("options", {}).get("group_size")
    if size is not None and size not in scheme.get("group_sizes", []):
        return False, f"group size {size} does not divide this model's input widths"
    return True, None


def best_by_budget(schemes: list[dict] | None = None, table: dict | None = None) -> list[dict]:
    """Per bit budget: the benchmark's rows ranked by our perplexity ratio to dense (lower is better),
    each marked allowed or not for this model; ``best`` is the best allowed row (None if none)."""
    table = table if table is not None else quality_table()
    if not table:
        return []
    by_name = {s["preset"]: s for s in schemes} if schemes is not None else None
    budgets: dict[float, list[dict]] = {}
    for row in table.get("rows", []):
        if row.get("ours_ratio") is None:
            continue
        allowed, reason = _row_allowed(row, by_name) if by_name is not None else (True, None)
        budgets.setdefault(float(row["weight_bits"]), []).append({**row, "allowed": allowed, "reason": reason})
    out = []
    for bits in sorted(budgets):
        ranked = sorted(budgets[bits], key=lambda r: r["ours_ratio"])
        best = next((r for r in ranked if r["allowed"]), None)
        out.append({"bits": bits, "label": _budget_label(bits), "best": best, "candidates": ranked})
    return out


def recommend(model_config: Any, *, trust_remote_code: bool = False, table: dict | None = None) -> dict:
    """The recommendation for one model (what GET /api/recommend returns, less the model name)."""
    from compression.preflight import model_layout

    layout = model_layout(model_config, trust_remote_code=trust_remote_code)
    widths = sorted({s.in_features for s in layout.linears if s.layer is not None})
    schemes = allowed_schemes(model_config, trust_remote_code=trust_remote_code, layout=layout)
    table = table if table is not None else quality_table()
    return {
        "architecture": layout.architecture, "layers": layout.layers, "input_widths": widths,
        "schemes": schemes, "budgets": best_by_budget(schemes, table),
        "benchmark": (table or {}).get("source"),
    }


def alternatives_for(recipe: Recipe, table: dict | None = None) -> dict | None:
    """For the model card: the benchmark's rows of this recipe's bit budget, and where the chosen
    recipe stands among them (None when the table has no row of that budget)."""
    table = table if table is not None else quality_table()
    if not table:
        return None
    bits = nominal_weight_bits(recipe)
    budget = next((b for b in best_by_budget(None, table) if b["bits"] == bits), None)
    if budget is None:
        return None
    chosen = recipe.to_dict().get("stages")
    match = None
    for row in budget["candidates"]:
        try:
            if Recipe.from_yaml(row["recipe_yaml"]).to_dict()["stages"] == chosen:
                match = row["name"]
                break
        except RecipeError:
            continue
    if match is None and recipe.preset:
        options = recipe.preset_options or {}
        match = next((row["name"] for row in budget["candidates"]
                      if (row.get("preset") or {}).get("preset") == recipe.preset
                      and (row.get("preset") or {}).get("options", {}) == options), None)
    return {"bits": bits, "label": budget["label"], "candidates": budget["candidates"],
            "best": budget["best"], "matched_row": match, "source": table.get("source")}
