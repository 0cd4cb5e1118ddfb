"""Collect the facts of a finished job for compression.card.model_card.build_model_card.

Kept apart from the card text so the card never guesses: everything here is read off the recipe,
the loaded model and the measured results.
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Any

from compression.recipe import Recipe


def scheme_summary(recipe: Recipe) -> dict[str, Any]:
    """The recipe's properties the card's prose needs, from its last quantizing modifier."""
    summary: dict[str, Any] = {"preset": recipe.preset, "weight_bits": None, "weight_type": None,
                               "activation_bits": None, "activation_type": None, "granularity": None,
                               "group_size": None, "symmetric": None, "activation_dynamic": None,
                               "activation_granularity": None, "sparsity": None, "algorithm": None,
                               "damping": None, "targets": None, "ignore": None}
    algorithms = []
    for modifier in recipe.modifiers:
        if getattr(modifier, "finetune", None) is not None:  # a training stage: nothing to summarise here
            continue
        if modifier.transforms:  # a smoothing step before the quantizer: named in the algorithm
            algorithms.append("AWQ" if modifier.kind == "AWQModifier" else
                              "logarithmic equalization" if modifier.algorithm == "log_equalization" else "SmoothQuant")
            if modifier.kind == "AWQModifier":
                summary["awq_clip"] = recipe.awq_clipped(modifier)
            continue
        summary["targets"], summary["ignore"] = list(modifier.targets), list(modifier.ignore)
        if modifier.prunes:
            summary["sparsity"] = modifier.mask_structure if modifier.mask_structure != "0:0" \
                else f"{modifier.sparsity:.0%} unstructured"
            if modifier.kind == "SparseGPTModifier":
                summary["damping"] = modifier.dampening_frac
            algorithms.append("SparseGPT" if modifier.kind == "SparseGPTModifier" else "Wanda")
            continue
        algorithms.append("GPTQ" if modifier.kind == "GPTQModifier" else
                          "AutoRound" if modifier.autoround is not None else "round-to-nearest")
        if modifier.kind == "GPTQModifier":
            summary["damping"] = modifier.dampening_frac
        if modifier.autoround is not None:
            summary["autoround_iters"] = modifier.autoround.iters
        group = next(iter(modifier.config_groups.values()), None)
        if group is None:
            continue
        if group.weights is not None:
            w = group.weights
            summary.update(weight_bits=w.num_bits, weight_type=w.type, granularity=w.strategy,
                           group_size=w.group_size, symmetric=w.symmetric)
            summary["full_range"] = modifier.full_range_grid(group)
        if group.input_activations is not None:
            a = group.input_activations
            summary.update(activation_bits=a.num_bits, activation_type=a.type,
                           activation_dynamic=bool(a.dynamic), activation_granularity=a.strategy)
    summary["algorithm"] = " + ".join(dict.fromkeys(algorithms)) or None
    return summary


def collect_facts(*, spec: dict, recipe: Recipe, model, identity: dict, evaluation: dict,
                  baseline: dict, compressed: dict, size: dict, artifact_dir: str,
                  calibration: dict | None, bits_per_param: dict | None) -> dict:
    """The `facts` dict of compression.card.model_card (see its docstring for the shape)."""
    base = identity.get("name") or spec["model"]
    short = base.rstrip("/").split("/")[-1]
    suffix = recipe.preset or "compressed"
    config = getattr(model, "config", None)
    return {
        "model_name": f"{short}-{suffix.replace(':', 'of').replace('+', '-')}",
        "model_id": None,
        "base_model": base,
        "baseline_note": baseline_note(identity),
        "base_model_revision": identity.get("revision"),
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "license": spec.get("license"),
        "language": spec.get("language"),
        "developers": spec.get("developers"),
        "version": "1.0",
        "created": dt.date.today().isoformat(),
        "recipe": recipe.to_dict(),
        "recipe_yaml": recipe.to_yaml(),
        "scheme": scheme_summary(recipe),
        "calibration": calibration,
        "size": size,
        "bits_per_param": bits_per_param,
        "eval": {"baseline": as_eval_result(baseline, evaluation),
                 "compressed": as_eval_result(compressed, evaluation)},
        "speed": spec.get("speed"),
        "command": f"python -m compression run --model {portable_model(spec['model'])} --recipe recipe.yaml "
                   "--out OUTPUT_DIR",
        "alternatives": _alternatives(recipe),
    }


def _alternatives(recipe: Recipe) -> dict | None:
    """The quality benchmark's rows of this recipe's bit budget (compression.recommend); None when
    the build has no table. A broken table must not cost the job its card."""
    from compression.recommend import alternatives_for

    try:
        return alternatives_for(recipe)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def baseline_note(identity: dict) -> str | None:
    """How the baseline differs from the published base model, when it does: the demo model is
    dequantized from a GGUF file (its revision names the file's quantization), not the Hub's weights."""
    revision = str(identity.get("revision") or "")
    match = re.search(r"GGUF\s*([A-Za-z0-9_]+)?", revision)
    if not match:
        return None
    quant = f" {match.group(1)}" if match.group(1) else ""
    return f"dequantized from its GGUF{quant} file"


def portable_model(model: str) -> str:
    """The model argument as a reader elsewhere can use it: a server directory becomes a placeholder."""
    if model.startswith(("/", "~", ".")):
        return f"PATH/TO/{model.rstrip('/').rsplit('/', 1)[-1]}"
    return model


def as_eval_result(results: dict, evaluation: dict) -> dict:
    """Our per-task metrics in the shape of compression.evaluation.harness.evaluate's result."""
    lm = results.get("_lm_eval", {})
    tasks = {}
    for task, metrics in results.items():
        if task.startswith("_"):
            continue
        source = lm.get("sources", {}).get(task, (results.get("_perplexity") or {}).get("source", "local")
                                            if task == "wikitext2_ppl" else None)
        shots = (lm.get("num_fewshot") or {}).get(task)
        if shots is None:  # the job's setting, else the local tasks' own 0-shot definition
            shots = (lm.get("settings") or {}).get("num_fewshot")
            shots = 0 if shots is None and source == "local" and task != "wikitext2_ppl" else shots
        samples = (lm.get("samples") or {}).get(task)
        if task == "wikitext2_ppl":
            samples = evaluation.get("windows")  # windows of `seqlen` tokens, not documents
        tasks[task] = {"source": source, "metrics": metrics, "samples": samples, "n_shot": shots}
    settings = dict(lm.get("settings") or {})
    settings.setdefault("perplexity_windows", evaluation.get("windows"))
    settings.setdefault("perplexity_seqlen", evaluation.get("seqlen"))
    return {"tasks": tasks, "settings": settings, "lm_eval_version": lm.get("lm_eval_version")}
