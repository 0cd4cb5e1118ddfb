"""The per-layer smoothing step of the sequential pipeline: AWQModifier and SmoothQuantModifier.

``smooth_layer`` runs before the layer's statistics pass (so GPTQ / static scales see the smoothed
layer). Mappings are resolved inside the decoder layer (module names ``<layer prefix>.<local>``
matched against the mapping patterns, compressed-tensors style: exact name, class name or
``re:`` + re.match); a mapping whose smooth or balance layers do not exist in the layer is skipped,
as is one whose shapes do not line up (v_proj → o_proj under grouped-query attention, as in
llm-compressor). Folding scales into a norm keeps the model only when every module reading the norm's
output is rescaled: the first calibration call finds those readers (Linears and MoE routers); a
mapping whose norm does not feed its first balance layer (Gemma's post_attention_layernorm normalises
the attention output, not the MLP input), or a recipe mapping that leaves a reader out, is refused; a
family default that leaves one out is completed (:func:`_complete_readers`). Gemma-style
``1 + weight`` norms are folded as such.

Calibration inputs may be padded batches: the activation statistics and the AWQ output error count
the tokens only (the parent's calls are replayed with their token masks).
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any

import torch

from compression.algorithms import awq as awq_lib
from compression.algorithms import smoothquant as sq_lib
from compression.errors import RecipeError
from compression.model_io.moe import PerExpertLinears, router_names
from compression.model_io.walk import LayerInputs, masking, token_mask, valid_rows
from compression.recipe import Modifier, Recipe, class_names, matches_any

log = logging.getLogger(__name__)


def _named(layer: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    return {f"{prefix}.{n}": m for n, m in layer.named_modules() if n}


def _weighted(layer: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The modules of ``layer`` a smoothing scale can be folded into on the input side: its Linears and its
    MoE routers (transformers' TopKRouter modules: a [experts, hidden] weight, not a Linear)."""
    found = {id(m): m for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    for path in router_names(layer):
        router = layer.get_submodule(path)
        weight = getattr(router, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            found[id(router)] = router
    return found


def _in_features(module: torch.nn.Module) -> int:
    return module.weight.shape[1]


def _match(pattern: str, name: str, module: torch.nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern in (name, type(module).__name__)


def _default_mappings(modifier: Modifier, layer: torch.nn.Module) -> list:
    """The family's mappings for this decoder layer, told apart by its module names (a DeepSeek model's
    first dense layers get the dense MLP mappings, its MoE layers the router-and-experts ones)."""
    names = [n for n, _ in layer.named_modules()]

    def has(suffix: str) -> bool:
        return any(n.endswith(suffix) for n in names)
    experts = any(".experts." in n for n in names)
    mla, phi, gemma = has("kv_a_proj_with_mqa"), has("qkv_proj"), has("pre_feedforward_layernorm")
    if modifier.kind == "AWQModifier":
        attention = awq_lib.ATTENTION_MAPPINGS["mla" if mla else "phi3" if phi else
                                               "gemma3" if gemma and has("q_norm") else "default"]
        mlp = awq_lib.MLP_MAPPINGS["phi3" if phi else "gemma" if gemma else
                                   ("mixtral" if has(".w1") else "moe") if experts else "default"]
        return attention + mlp
    if phi:
        return sq_lib.PHI3_MAPPINGS
    if gemma:
        return sq_lib.GEMMA_MAPPINGS
    attention = sq_lib.MLA_MAPPINGS if mla else sq_lib.MOE_MAPPINGS
    return attention if experts else attention + sq_lib.DEFAULT_MAPPINGS[1:]


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


def mapping_targets(modifier: Modifier, spec) -> tuple[str, list[str]]:
    """(smooth layer pattern, balance layer patterns) of one mapping: AWQ writes {smooth_layer, balance_layers},
    SmoothQuant [[balance layers], smooth layer]."""
    if modifier.kind == "AWQModifier":
        return spec["smooth_layer"], list(spec["balance_layers"])
    balance_pats, smooth_pat = spec
    return smooth_pat, list(balance_pats)


def mapping_found(layer: torch.nn.Module, prefix: str, smooth: str, balance: list[str]) -> bool:
    """Whether one mapping finds a smooth layer and balance layers it can fold into in this decoder layer."""
    weighted = _weighted(layer)
    return any(any(id(m) in weighted for group in found[1:] for _, m in group)
               for found in match_sets(_named(layer, prefix), [smooth, *balance]))


def _resolve(modifier: Modifier, prefix: str, layer: torch.nn.Module, path: str) -> list[dict]:
    """[{smooth: (name, module), balance: [(name, module)], parent: (name, module)}] for this layer."""
    modules = _named(layer, prefix)
    weighted = _weighted(layer)
    raw = modifier.mappings if modifier.mappings is not None else _default_mappings(modifier, layer)
    resolved = []
    for spec in raw:
        smooth_pat, balance_pats = mapping_targets(modifier, spec)
        for found in match_sets(modules, [smooth_pat, *balance_pats]):
            smooth = found[0]
            balance = [(n, m) for group in found[1:] for n, m in group if id(m) in weighted]
            if not balance:
                continue
            if len(smooth) > 1:
                raise RecipeError(f"{path}.mappings", f"smooth_layer {smooth_pat!r} matches {len(smooth)} modules "
                                  f"together in {prefix} ({', '.join(n for n, _ in smooth[:3])}); it must match "
                                  "one per set of balance layers")
            s_name, s_mod = smooth[0]
            if modifier.ignore and matches_any(modifier.ignore, s_name, class_names(s_mod)):
                continue
            if not isinstance(getattr(s_mod, "weight", None), torch.Tensor):
                if modifier.mappings is not None:
                    raise RecipeError(f"{path}.mappings", f"{s_name} ({type(s_mod).__name__}) has no weight to fold "
                                      "smoothing scales into; map a norm or Linear that has one")
                continue  # a default mapping onto a norm without parameters (OLMo's LayerNorm): left out
            channels = s_mod.weight.shape[0]
            if any(_in_features(m) != channels for _, m in balance):
                if modifier.mappings is not None and not s_name.endswith(("v_proj", "qkv_proj")):
                    raise RecipeError(f"{path}.mappings", f"{s_name} has {channels} output channels but "
                                      f"{balance[0][0]} takes {_in_features(balance[0][1])} inputs")
                continue  # e.g. v_proj → o_proj with grouped-query attention
            resolved.append({"smooth": (s_name, s_mod), "balance": balance,
                             "parent": _parent(layer, prefix, [n for n, _ in balance])})
    return resolved


class _DoesNotFeed(Exception):
    """A default mapping whose norm's output is not what its balance layers read (Olmo 2/3 and EXAONE 4
    normalise after attention and after the MLP, so no norm precedes q/k/v or gate/up): left out, as
    llm-compressor's own mappings for those families leave it out."""


def _complete_readers(modifier: Modifier, prefix: str, layer: torch.nn.Module, path: str, mapping: dict,
                      readers: set[int]) -> bool:
    """Folding scales into a norm is exact only when every Linear reading its output is rescaled: check
    the mapping against the Linears that read the norm's output (:func:`_capture`; the experts of an MoE
    block read it when the block's router does, :func:`_expert_readers`). The first balance layer must be
    one of them (an expert outside a per-expert block is taken on trust); a reader left out is added to the
    balance layers (Qwen2-MoE's shared-expert gate reads the norm too; llm-compressor's own SmoothQuant recipes
    map the MLP's norm to gate/up only, leaving an MoE router reading rescaled activations): for a recipe's
    own mapping the added modules are listed in ``mapping["added"]`` (the report and the card say so). True
    when the mapping was extended."""
    s_name = mapping["smooth"][0]
    first_name, first = mapping["balance"][0]
    readers = readers | _expert_readers(layer, readers)
    if id(first) not in readers and ".experts." not in first_name:
        if modifier.mappings is None:  # a default that this family's layer does not fit (a post-norm block)
            raise _DoesNotFeed(f"{s_name} does not feed {first_name} in {type(layer).__name__}")
        raise RecipeError(f"{path}.mappings", f"{s_name} does not feed {first_name} in {type(layer).__name__} "
                          "(its output is not that layer's input): scaling it would change the model; map the norm "
                          "whose output the balance layers read")
    balanced = {id(m) for _, m in mapping["balance"]}
    missing = [(f"{prefix}.{n}", m) for n, m in layer.named_modules()
               if id(m) in readers and id(m) not in balanced]
    if not missing:
        return False
    if modifier.mappings is not None:
        mapping["added"] = [n for n, _ in missing]
    mapping["balance"] = mapping["balance"] + missing
    mapping["parent"] = _parent(layer, prefix, [n for n, _ in mapping["balance"]])
    return True


def _expert_readers(layer: torch.nn.Module, readers: set[int]) -> set[int]:
    """The experts' input projections (gate and up of every expert) of each MoE block whose router reads
    the norm's output: an expert sees only the tokens routed to it, so :func:`_capture` cannot see it
    reading the norm, but the block passes every expert the same hidden states its router reads."""
    feeding = {path.rpartition(".")[0] for path in router_names(layer)  # the router, or its Linear (gate.wg)
               if any(id(m) in readers for m in layer.get_submodule(path).modules())}
    found: set[int] = set()
    for name, block in layer.named_modules():
        if isinstance(block, PerExpertLinears) and name.rpartition(".")[0] in feeding:
            for e in range(block.num_experts):
                found.update(id(m) for m in block.expert(e).projections()[:2])
    return found


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
            cls = class_names(module)
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
    cls = class_names(module)
    for m in recipe.modifiers:
        if not m.quantizes or not m.config_groups:
            continue
        if matches_any(m.targets, name, cls) and not matches_any(m.ignore, name, cls):
            group = m.scheme_for(name, cls)
            if group is not None and group.weights is not None:
                return group.weights
    return None


def _same_data(produced: torch.Tensor, consumed: torch.Tensor) -> bool:
    """Whether ``consumed`` (a Linear's input) is ``produced`` (the smooth norm's output): the same memory,
    or the same values up to reshaping (an MoE router sees the tokens flattened) and a dtype cast."""
    if produced.numel() != consumed.numel():
        return False
    if produced.data_ptr() == consumed.data_ptr():
        return True
    a = produced.detach().reshape(-1).float()
    b = consumed.detach().reshape(-1).float()
    return bool(torch.allclose(a, b, rtol=1e-2, atol=1e-3 * float(a.abs().max().clamp_min(1e-30))))


@torch.no_grad()
def _capture(layer: torch.nn.Module, inputs: LayerInputs, index: int, parent: torch.nn.Module,
             first_balance: torch.nn.Module, want_parent: bool, smooth: torch.nn.Module | None = None
             ) -> tuple[list, torch.Tensor, torch.Tensor, Any, set[int]]:
    """Run the layer (decoder layer ``index``) on every sample: the parent's call arguments (with the
    call's token mask), Σ|x| / count, max|x| and max x - min x per channel of the balance layers'
    input tokens, and (``smooth``: a norm) the ids of the layer's Linears that read the norm's output
    in the first call (:func:`_same_data`; an expert reading a share of the tokens is not seen)."""
    calls: list = []
    stats: dict[str, Any] = {"sum": None, "count": 0, "absmax": None, "lo": None, "hi": None}
    feed: dict[str, Any] = {"out": None, "calls": 0}
    readers: set[int] = set()

    def parent_hook(module, args, kwargs):
        calls.append((args, dict(kwargs), token_mask()))

    def smooth_hook(module, args, out):
        feed["calls"] += 1
        feed["out"] = _first(out).detach() if feed["calls"] == 1 else None

    def reader_hook(module, args):
        if feed["out"] is not None and args and isinstance(args[0], torch.Tensor) and _same_data(feed["out"], args[0]):
            readers.add(id(module))

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
    if smooth is not None:
        handles.append(smooth.register_forward_hook(smooth_hook))
        handles.extend(m.register_forward_pre_hook(reader_hook) for m in _weighted(layer).values())
    if want_parent:
        handles.append(parent.register_forward_pre_hook(parent_hook, with_kwargs=True))
    try:
        inputs.forward(layer, index, keep=False)
    finally:
        for h in handles:
            h.remove()
    stats["range"] = stats["hi"] - stats["lo"] if stats["hi"] is not None else None
    return calls, stats["sum"] / max(stats["count"], 1), stats["absmax"], stats["range"], readers


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


class _Probed(Exception):
    """Stops a calibration pass after its first call (:func:`_probe`)."""


def _probe(layer: torch.nn.Module, inputs: LayerInputs, index: int) -> torch.Tensor:
    """The layer's output on its first calibration call."""
    outs: list[torch.Tensor] = []

    def run(*args, **kwargs):
        outs.append(_first(layer(*args, **kwargs)).detach().float().clone())
        raise _Probed

    try:
        inputs.forward(run, index, keep=False)
    except _Probed:
        pass
    return outs[0]


def _fold_drift(layer: torch.nn.Module, inputs: LayerInputs, index: int, smooth: torch.nn.Module,
                balance: list[torch.nn.Module]) -> float:
    """How far folding test scales (0.5 … 2 per channel) into ``smooth`` and its balance layers moves the
    layer's output on one calibration call, relative to the output's largest magnitude; the weights are
    restored. Exact smoothing moves it by rounding only. A layer that reads the smoothed output
    elsewhere moves: MiniMax keeps the normed hidden states as its residual, gpt-oss clamps its up
    projection, a family's own code may do anything the readers check (:func:`_capture`) cannot see."""
    params = [t for m in (smooth, *balance) for t in (getattr(m, "weight", None), getattr(m, "bias", None))
              if isinstance(t, torch.Tensor)]
    saved = [t.detach().clone() for t in params]
    channels = smooth.weight.shape[0]
    scales = torch.linspace(0.5, 2.0, channels)[torch.randperm(channels, generator=torch.Generator().manual_seed(0))]
    before = _probe(layer, inputs, index)
    try:
        with torch.no_grad():
            sq_lib.fold_scales(smooth, balance, scales)
        after = _probe(layer, inputs, index)
    finally:
        with torch.no_grad():
            for t, v in zip(params, saved):
                t.copy_(v)
    return float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))


def _fold_tolerance(layer: torch.nn.Module) -> float:
    """Rounding's share of :func:`_fold_drift` in the layer's compute dtype."""
    dtype = next((p.dtype for p in layer.parameters() if p.is_floating_point()), torch.float32)
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def _left_out(report, modifier: Modifier, index: int, s_name: str, why: str) -> None:
    """Record (``report.smoothing``, the card reads it) and log a default mapping this layer cannot take."""
    report.smoothing.append({"modifier": modifier.kind, "layer": index, "smooth_layer": s_name, "skipped": why})
    log.info("%s: default mapping left out: %s", modifier.kind, why)


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
                norm = None if isinstance(smooth, torch.nn.Linear) else smooth
                calls, x_mean, x_absmax, x_range, readers = _capture(layer, inputs, index, parent, balance[0],
                                                                     want_parent=awq, smooth=norm)
                try:
                    extended = norm is not None and _complete_readers(modifier, prefix, layer, path, mapping, readers)
                except _DoesNotFeed as exc:
                    _left_out(report, modifier, index, s_name, f"{exc}: its output is not those layers' input")
                    continue
                if extended:
                    balance = [m for _, m in mapping["balance"]]  # the added readers come last: same statistics
                    if awq and mapping["parent"][1] is not parent:  # AWQ replays the new parent's calls
                        p_name, parent = mapping["parent"]
                        calls = _capture(layer, inputs, index, parent, balance[0], want_parent=True)[0]
                drift = _fold_drift(layer, inputs, index, smooth, balance)
                if drift > _fold_tolerance(layer):
                    why = (f"folding scales into {s_name} changes {type(layer).__name__}'s output by {drift:.1%} of "
                           "its range (the smoothed output is also read where no balance layer rescales it: a "
                           "residual, a clamp, a gate)")
                    if modifier.mappings is not None:
                        raise RecipeError(f"{path}.mappings", f"{why}; remove that mapping")
                    _left_out(report, modifier, index, s_name, why)
                    continue
                entry = {"modifier": modifier.kind, "layer": index, "smooth_layer": s_name,
                         "balance_layers": [n for n, _ in mapping["balance"]], "fold_drift": drift}
                if mapping.get("added"):  # a recipe mapping completed with the other readers of its norm
                    entry["added_readers"] = mapping["added"]
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
