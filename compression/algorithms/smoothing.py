"""The per-layer smoothing step of the sequential pipeline: AWQModifier and SmoothQuantModifier.

``smooth_layer`` runs before the layer's statistics pass (so GPTQ / static scales see the smoothed
layer). Mappings are resolved inside the decoder layer (module names ``<layer prefix>.<local>``
matched against the mapping patterns, compressed-tensors style: exact name, class name or
``re:`` + re.match); a mapping whose smooth or balance layers do not exist in the layer is skipped,
as is one whose shapes do not line up (v_proj → o_proj under grouped-query attention, as in
llm-compressor). A mapping is refused when its smooth layer is a norm we cannot fold into
(Gemma-style ``1 + weight`` norms).

One layer forward records every mapping of a modifier (parent calls, balance-input statistics, the
Gram matrix of a Linear parent), as llm-compressor does: folding a mapping keeps the float function,
so the later mappings' inputs are what was recorded up to rounding. A mapping fed directly by an
earlier mapping's smooth output (the same tensor storage) is recorded again after that fold.

Calibration inputs may be padded batches: the activation statistics and the AWQ output error count
the tokens only (the parent's calls are replayed with their token masks).
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterator
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


def _gram_parent(mapping: dict) -> bool:
    """Whether AWQ can score this mapping from its input Gram matrix: the parent is the one balance
    Linear (up_proj → down_proj), so its output error is a quadratic form in the weight change."""
    parent, balance = mapping["parent"][1], [m for _, m in mapping["balance"]]
    return len(balance) == 1 and parent is balance[0] and type(parent) is torch.nn.Linear


class _Captured:
    """What one layer forward recorded for one mapping."""

    def __init__(self, need: set[str]):
        self.need = need
        self.calls: list = []  # the parent's (args, kwargs, token mask) per layer call
        self.sum = self.absmax = self.lo = self.hi = self.gram = None
        self.count = 0
        self.stale = False  # its inputs are an earlier mapping's smooth output: recapture after that fold

    @property
    def x_mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def range(self) -> torch.Tensor | None:
        return self.hi - self.lo if self.hi is not None else None

    def add(self, x: torch.Tensor) -> None:
        """One call's balance input tokens ``[N, C]``."""
        need = self.need
        if "sum" in need:
            part = x.float().abs().sum(0)
            self.sum = part if self.sum is None else self.sum + part
        if "absmax" in need or "range" in need:
            lo, hi = torch.aminmax(x, dim=0)
            lo, hi = lo.float(), hi.float()
            if "absmax" in need:
                amax = torch.maximum(lo.abs(), hi)
                self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
            if "range" in need:
                self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
                self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if "gram" in need:
            xf = x.float()
            self.gram = xf.t() @ xf if self.gram is None else self.gram.addmm_(xf.t(), xf)
        self.count += x.shape[0]


def _storage(t: Any) -> int | None:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


@torch.no_grad()
def _capture(layer: torch.nn.Module, inputs: LayerInputs, index: int, mappings: list[dict],
             needs: list[set[str]]) -> list[_Captured]:
    """Run the layer (decoder layer ``index``) once on every sample and record, for every mapping,
    what ``needs`` asks: ``"calls"`` the parent's call arguments (with the call's token mask),
    ``"sum"`` Σ|x| per channel of the balance layers' input tokens (with their count),
    ``"absmax"`` max|x|, ``"range"`` max x - min x, ``"gram"`` Σ xᵀx.

    One forward serves every mapping (as in llm-compressor): folding a mapping's scales keeps the
    float function, so the later mappings' inputs stay what was recorded up to rounding. The
    exception is a mapping fed directly by an earlier mapping's smooth output (the same tensor);
    it is marked ``stale`` and the caller records it again after that fold."""
    captured = [_Captured(need) for need in needs]
    smooth_out: dict[int, int] = {}  # storage of a smooth layer's output this call → earliest mapping
    held: list[torch.Tensor] = []  # those outputs, alive until the call ends (their storage is not reused)

    def fresh_call(module, args, kwargs):
        smooth_out.clear()
        held.clear()

    def smooth_hook(k):
        def hook(module, args, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            ptr = _storage(out)
            if ptr is not None:
                smooth_out.setdefault(ptr, k)
                held.append(out)
        return hook

    def check(k, tensor):
        owner = smooth_out.get(_storage(tensor), k)
        if owner < k:
            captured[k].stale = True

    def parent_hook(k):
        def hook(module, args, kwargs):
            check(k, args[0] if args else kwargs.get("hidden_states"))
            captured[k].calls.append((args, dict(kwargs), token_mask()))
        return hook

    def input_hook(k):
        def hook(module, args, out):
            check(k, args[0])
            captured[k].add(valid_rows(args[0].detach())[0])  # the token rows (a padded batch's pad rows left out)
        return hook

    handles = [layer.register_forward_pre_hook(fresh_call, with_kwargs=True)]
    try:
        for k, (mapping, need) in enumerate(zip(mappings, needs)):
            handles.append(mapping["smooth"][1].register_forward_hook(smooth_hook(k)))
            handles.append(mapping["balance"][0][1].register_forward_hook(input_hook(k)))
            if "calls" in need:
                handles.append(mapping["parent"][1].register_forward_pre_hook(parent_hook(k), with_kwargs=True))
        inputs.forward(layer, index, keep=False)
    finally:
        for h in handles:
            h.remove()
        held.clear()
    return captured


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _replay(parent: torch.nn.Module, calls: list) -> Iterator[torch.Tensor]:
    """The parent's outputs on its recorded calls, one call at a time; of a padded call only the token rows."""
    for args, kwargs, mask in calls:
        with masking(mask):
            out = _first(parent(*args, **kwargs))
            out = out if mask is None else valid_rows(out)[0]
        yield out


def _needs(modifier: Modifier, mapping: dict) -> set[str]:
    if modifier.kind == "AWQModifier":
        return {"sum", "gram"} if _gram_parent(mapping) else {"sum", "calls"}
    return {"range"} if modifier.algorithm == "log_equalization" else {"absmax"}


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
            pending = list(mappings)
            while pending:  # one layer forward records every pending mapping (see _capture)
                t0 = time.perf_counter()
                captured = _capture(layer, inputs, index, pending, [_needs(modifier, m) for m in pending])
                usable = next((k for k, c in enumerate(captured) if c.stale), len(pending))
                done, pending = pending[:usable], pending[usable:]
                for mapping, cap in zip(done, captured):
                    _smooth_mapping(recipe, modifier, prefix, mapping, cap, report, emit, index, layers, t0)
                    cap.calls, cap.gram = [], None  # this mapping's recorded inputs are no longer needed
                    t0 = time.perf_counter()


def _smooth_mapping(recipe: Recipe, modifier: Modifier, prefix: str, mapping: dict, cap: _Captured, report, emit,
                    index: int, layers: int, t0: float) -> None:
    """Search (AWQ) or compute (SmoothQuant) one mapping's scales from its capture and fold them."""
    s_name, smooth = mapping["smooth"]
    balance = [m for _, m in mapping["balance"]]
    p_name, parent = mapping["parent"]
    entry = {"modifier": modifier.kind, "layer": index, "smooth_layer": s_name,
             "balance_layers": [n for n, _ in mapping["balance"]]}
    if modifier.kind == "AWQModifier":
        schemes = [_scheme_for(recipe, n, m) for n, m in mapping["balance"]]
        if cap.gram is not None:
            run_parent, gram = None, (cap.gram, cap.count)
        else:
            def run_parent(parent=parent, calls=cap.calls):
                return _replay(parent, calls)
            gram = None
        result = awq_lib.awq_search(cap.x_mean, balance, schemes, run_parent, n_grid=modifier.n_grid,
                                    duo_scaling=modifier.duo_scaling, gram=gram)
        scales = result.scales
        entry.update(parent=p_name, ratio=round(result.ratio, 4), duo_scaling=result.duo,
                     initial_error=result.initial_error, best_error=result.best_error)
        loss, what = result.best_error, (f"AWQ {s_name.rsplit('.', 1)[-1]} → "
                                        f"{'/'.join(n.rsplit('.', 1)[-1] for n, _ in mapping['balance'])}"
                                        f" (ratio {result.ratio:.2f}, error ×"
                                        f"{result.best_error / max(result.initial_error, 1e-30):.3f})")
    elif modifier.algorithm == "log_equalization":
        scales = sq_lib.log_equalization_scales(cap.range)
        loss = float(scales.max() / scales.min())
        entry.update(algorithm="log_equalization", scale_range=loss)
        what = f"log equalization {s_name.rsplit('.', 1)[-1]} (scale range {loss:.1f})"
    else:
        scales = sq_lib.smoothquant_scales(cap.absmax, [m.weight for m in balance], modifier.smoothing_strength)
        loss = float(scales.max() / scales.min())
        entry.update(strength=modifier.smoothing_strength, scale_range=loss)
        what = f"SmoothQuant {s_name.rsplit('.', 1)[-1]} (scale range {loss:.1f})"
    sq_lib.fold_scales(smooth, balance, scales)
    report.smoothing.append(entry)
    emit({"stage": "compress", "layer": index, "layers": layers, "module": s_name[len(prefix) + 1:],
          "loss": loss, "seconds": time.perf_counter() - t0, "memory_mb": 0.0, "message": what})
