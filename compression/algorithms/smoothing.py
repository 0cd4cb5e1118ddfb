"""The per-layer smoothing step of the sequential pipeline: AWQModifier and SmoothQuantModifier.

``smooth_layer`` runs before the layer's statistics pass (so GPTQ / static scales see the smoothed
layer). Mappings are resolved inside the decoder layer (module names ``<layer prefix>.<local>``
matched against the mapping patterns, compressed-tensors style: exact name, class name or
``re:`` + re.match); a mapping whose smooth or balance layers do not exist in the layer is skipped,
as is one whose shapes do not line up (v_proj → o_proj under grouped-query attention, as in
llm-compressor). A mapping is refused when its smooth layer is a norm we cannot fold into
(Gemma-style ``1 + weight`` norms).

Calibration inputs may be padded batches: the activation statistics and the AWQ output error count
the tokens only (the parent's calls are replayed with their token masks).
"""
from __future__ import annotations

import re
import time
from typing import Any

import torch

from compression.algorithms import awq as awq_lib
from compression.algorithms import smoothquant as sq_lib
from compression.errors import RecipeError, UnsupportedModelError
from compression.model_io.walk import LayerInputs, masking, token_mask, valid_rows
from compression.recipe import Modifier, Recipe, matches_any


def _named(layer: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    return {f"{prefix}.{n}": m for n, m in layer.named_modules() if n}


def _match(pattern: str, name: str, module: torch.nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern in (name, type(module).__name__)


def _default_mappings(modifier: Modifier, layer: torch.nn.Module) -> list:
    has_experts = any(".experts." in n for n, _ in layer.named_modules())
    is_phi = any(n.endswith("qkv_proj") for n, _ in layer.named_modules())
    if modifier.kind == "AWQModifier":
        return awq_lib.PHI3_MAPPINGS if is_phi else awq_lib.MOE_MAPPINGS if has_experts else awq_lib.DEFAULT_MAPPINGS
    return sq_lib.PHI3_MAPPINGS if is_phi else sq_lib.DEFAULT_MAPPINGS


def _common_prefix(a: str, b: str | None) -> str:
    if b is None:
        return a
    parts = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts)


def match_sets(modules: dict[str, torch.nn.Module], targets: list[str]) -> list[list[list[tuple[str, Any]]]]:
    """compressed-tensors' ``match_modules_set`` over one decoder layer: walking the modules in order,
    collect matches of every target; once each target has one, a match outside the current common
    parent starts a new set. So up_proj → down_proj pairs expert by expert, while a norm → every
    expert's gate/up is one set. An incomplete last set (e.g. a norm this layer lacks) is dropped."""
    sets: list = []
    matches: dict[int, list] = {}
    parent: str | None = None
    unmatched = set(range(len(targets)))
    for name, module in modules.items():
        for t, target in enumerate(targets):
            if not _match(target, name, module):
                continue
            new_parent = _common_prefix(name, parent)
            if not unmatched and new_parent != parent:
                sets.append([matches.get(i, []) for i in range(len(targets))])
                matches, new_parent, unmatched = {}, name, set(range(len(targets)))
            matches.setdefault(t, []).append((name, module))
            parent = new_parent
            unmatched.discard(t)
    if matches and not unmatched:
        sets.append([matches.get(i, []) for i in range(len(targets))])
    return sets


def _resolve(modifier: Modifier, prefix: str, layer: torch.nn.Module, path: str) -> list[dict]:
    """[{smooth: (name, module), balance: [(name, module)], parent: (name, module)}] for this layer."""
    modules = _named(layer, prefix)
    raw = modifier.mappings if modifier.mappings is not None else _default_mappings(modifier, layer)
    resolved = []
    for spec in raw:
        if modifier.kind == "AWQModifier":
            smooth_pat, balance_pats = spec["smooth_layer"], spec["balance_layers"]
        else:
            balance_pats, smooth_pat = spec
        for found in match_sets(modules, [smooth_pat, *balance_pats]):
            smooth = found[0]
            balance = [(n, m) for group in found[1:] for n, m in group if isinstance(m, torch.nn.Linear)]
            if not balance:
                continue
            if len(smooth) > 1:
                raise RecipeError(f"{path}.mappings", f"smooth_layer {smooth_pat!r} matches {len(smooth)} modules "
                                  f"together in {prefix} ({', '.join(n for n, _ in smooth[:3])}); it must match "
                                  "one per set of balance layers")
            s_name, s_mod = smooth[0]
            if modifier.ignore and matches_any(modifier.ignore, s_name, type(s_mod).__name__):
                continue
            channels = s_mod.weight.shape[0]
            if any(m.in_features != channels for _, m in balance):
                if modifier.mappings is not None and not s_name.endswith(("v_proj", "qkv_proj")):
                    raise RecipeError(f"{path}.mappings", f"{s_name} has {channels} output channels but "
                                      f"{balance[0][0]} takes {balance[0][1].in_features} inputs")
                continue  # e.g. v_proj → o_proj with grouped-query attention
            if "Gemma" in type(s_mod).__name__ and not isinstance(s_mod, torch.nn.Linear):
                raise UnsupportedModelError(f"{s_name}: {type(s_mod).__name__} scales by (1 + weight); smoothing "
                                            "cannot be folded into it")
            resolved.append({"smooth": (s_name, s_mod), "balance": balance,
                             "parent": _parent(layer, prefix, [n for n, _ in balance])})
    return resolved


def _check_not_quantized_before(recipe: Recipe, position: int, path: str, mapping: dict) -> None:
    """A transform placed after quantization modifiers may only rescale modules none of them quantizes
    (rescaling a quantized weight would move it off its grid)."""
    rescaled = list(mapping["balance"])
    if isinstance(mapping["smooth"][1], torch.nn.Linear):
        rescaled.append(mapping["smooth"])
    for k, q in enumerate(recipe.modifiers[:position]):
        if not q.quantizes:
            continue
        for name, module in rescaled:
            cls = type(module).__name__
            group = q.scheme_for(name, cls) if q.matches(name, cls) else None
            if group is not None and group.weights is not None:
                raise RecipeError(f"{path}.mappings", f"{name} is quantized by an earlier modifier ({q.kind}) "
                                  f"before this {recipe.modifiers[position].kind} would rescale it; map only "
                                  "modules quantized after it, or move it before the quantization modifiers")


def _parent(layer: torch.nn.Module, prefix: str, names: list[str]) -> tuple[str, torch.nn.Module]:
    """Lowest common ancestor of the balance layers inside the decoder layer (never a ModuleList)."""
    parts = [n[len(prefix) + 1:].split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    while common:
        module = layer.get_submodule(".".join(common))
        if not isinstance(module, torch.nn.ModuleList):
            return f"{prefix}.{'.'.join(common)}", module
        common.pop()
    return prefix, layer


def _scheme_for(recipe: Recipe, name: str, module: torch.nn.Module):
    """The weight scheme the first quantizing modifier will apply to ``name`` (None if not targeted)."""
    cls = type(module).__name__
    for m in recipe.modifiers:
        if not m.quantizes or not m.config_groups:
            continue
        if matches_any(m.targets, name, cls) and not matches_any(m.ignore, name, cls):
            group = m.scheme_for(name, cls)
            if group is not None and group.weights is not None:
                return group.weights
    return None


@torch.no_grad()
def _capture(layer: torch.nn.Module, inputs: LayerInputs, index: int, parent: torch.nn.Module,
             first_balance: torch.nn.Module, want_parent: bool) -> tuple[list, torch.Tensor, torch.Tensor, Any]:
    """Run the layer (decoder layer ``index``) on every sample: the parent's call arguments (with the
    call's token mask), and Σ|x| / count, max|x| and max x - min x per channel of the balance layers'
    input tokens."""
    calls: list = []
    stats: dict[str, Any] = {"sum": None, "count": 0, "absmax": None, "lo": None, "hi": None}

    def parent_hook(module, args, kwargs):
        calls.append((args, dict(kwargs), token_mask()))

    def input_hook(module, args, out):
        signed = valid_rows(args[0].detach())[0].float()  # the token rows (a padded batch's pad rows left out)
        x = signed.abs()
        stats["sum"] = x.sum(0) if stats["sum"] is None else stats["sum"] + x.sum(0)
        stats["absmax"] = x.amax(0) if stats["absmax"] is None else torch.maximum(stats["absmax"], x.amax(0))
        lo, hi = signed.amin(0), signed.amax(0)
        stats["lo"] = lo if stats["lo"] is None else torch.minimum(stats["lo"], lo)
        stats["hi"] = hi if stats["hi"] is None else torch.maximum(stats["hi"], hi)
        stats["count"] += x.shape[0]

    handles = [first_balance.register_forward_hook(input_hook)]
    if want_parent:
        handles.append(parent.register_forward_pre_hook(parent_hook, with_kwargs=True))
    try:
        inputs.forward(layer, index, keep=False)
    finally:
        for h in handles:
            h.remove()
    stats["range"] = stats["hi"] - stats["lo"] if stats["hi"] is not None else None
    return calls, stats["sum"] / max(stats["count"], 1), stats["absmax"], stats["range"]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _replay(parent: torch.nn.Module, calls: list) -> list[torch.Tensor]:
    """The parent's outputs on its recorded calls; of a padded call only the token rows."""
    outs = []
    for args, kwargs, mask in calls:
        with masking(mask):
            out = _first(parent(*args, **kwargs))
            outs.append(out if mask is None else valid_rows(out)[0])
    return outs


def smooth_layer(recipe: Recipe, prefix: str, layer: torch.nn.Module, inputs: LayerInputs, report, emit,
                 index: int, layers: int) -> None:
    """Apply every AWQModifier / SmoothQuantModifier of ``recipe`` to one decoder layer, in recipe order."""
    if not inputs:
        return
    position = -1
    for i, stage in enumerate(recipe.stages):
        for j, modifier in enumerate(stage.modifiers):
            position += 1
            if not modifier.transforms:
                continue
            path = f"stages[{i}].modifiers[{j}]"
            mappings = _resolve(modifier, prefix, layer, path)
            for mapping in mappings:
                _check_not_quantized_before(recipe, position, path, mapping)
            for mapping in mappings:
                t0 = time.perf_counter()
                s_name, smooth = mapping["smooth"]
                balance = [m for _, m in mapping["balance"]]
                p_name, parent = mapping["parent"]
                awq = modifier.kind == "AWQModifier"
                calls, x_mean, x_absmax, x_range = _capture(layer, inputs, index, parent, balance[0],
                                                            want_parent=awq)
                entry = {"modifier": modifier.kind, "layer": index, "smooth_layer": s_name,
                         "balance_layers": [n for n, _ in mapping["balance"]]}
                if awq:
                    schemes = [_scheme_for(recipe, n, m) for n, m in mapping["balance"]]

                    def run_parent(parent=parent, calls=calls):
                        return _replay(parent, calls)

                    result = awq_lib.awq_search(x_mean, balance, schemes, run_parent, n_grid=modifier.n_grid,
                                                duo_scaling=modifier.duo_scaling)
                    scales = result.scales
                    entry.update(parent=p_name, ratio=round(result.ratio, 4), duo_scaling=result.duo,
                                 initial_error=result.initial_error, best_error=result.best_error)
                    loss, what = result.best_error, (f"AWQ {s_name.rsplit('.', 1)[-1]} → "
                                                    f"{'/'.join(n.rsplit('.', 1)[-1] for n, _ in mapping['balance'])}"
                                                    f" (ratio {result.ratio:.2f}, error ×"
                                                    f"{result.best_error / max(result.initial_error, 1e-30):.3f})")
                elif modifier.algorithm == "log_equalization":
                    scales = sq_lib.log_equalization_scales(x_range)
                    loss = float(scales.max() / scales.min())
                    entry.update(algorithm="log_equalization", scale_range=loss)
                    what = f"log equalization {s_name.rsplit('.', 1)[-1]} (scale range {loss:.1f})"
                else:
                    scales = sq_lib.smoothquant_scales(x_absmax, [m.weight for m in balance],
                                                       modifier.smoothing_strength)
                    loss = float(scales.max() / scales.min())
                    entry.update(strength=modifier.smoothing_strength, scale_range=loss)
                    what = f"SmoothQuant {s_name.rsplit('.', 1)[-1]} (scale range {loss:.1f})"
                sq_lib.fold_scales(smooth, balance, scales)
                report.smoothing.append(entry)
                emit({"stage": "compress", "layer": index, "layers": layers, "module": s_name[len(prefix) + 1:],
                      "loss": loss, "seconds": time.perf_counter() - t0, "memory_mb": 0.0, "message": what})
