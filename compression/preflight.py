"""Check a recipe against a model's transformers config before any weights are loaded.

The model is built from its config on the meta device (no memory, no weights) and walked the way
the engine will walk it (:mod:`compression.model_io.walk`, :mod:`compression.model_io.moe`): a model whose decoder
layers or experts the engine cannot walk is refused here, naming what is missing. Every Linear of
the decoder layers (fused projections such as Phi-3's ``qkv_proj`` are one Linear; each MoE expert
contributes its own gate/up/down; routers never count) is matched by its checkpoint name against
each modifier's ``targets``/``ignore``: a modifier that matches nothing, or a target outside the
decoder layers, is refused. Shapes: every targeted Linear's input width must be divisible by the
group size (INT4/INT8 group quantization) and by 4 (2:4 sparsity).

Estimates (rough, for planning only):

* host memory (:func:`host_memory_estimates`; the worker holds weights in float32 on a CPU, bfloat16
  when it computes on a GPU): in memory ≈ process base + dense weights + 1 byte/param of codes + the
  export's copy in the storage dtype + workspace; streamed (:mod:`compression.model_io.streaming`)
  ≈ process base + the tensors outside the decoder layers + two copies of the largest layer + one
  export shard + workspace. Both add the captured activations (samples · seqlen · hidden · 4 B: each
  layer's outputs overwrite its inputs; twice that when a reconstruction or AWQ/SmoothQuant needs a
  second stream) when the compute device is the CPU. The workspace (CPU only) is what one layer's step allocates:
  fp32 copies of the one Linear the solver works on (3 for round-to-nearest, 5 for GPTQ/SparseGPT),
  the Hessians of the layer's Linears and an inverse, and one calibration batch
  (min(4096, samples · seqlen) tokens) through the MLP (3 · tokens · intermediate · 4 B; none for a
  data-free recipe). The in-memory terms are summed although compression and export do not overlap:
  the heap is trimmed after each layer (``streaming.release_heap``) and large blocks are mmapped
  (``map_large_blocks``), but fragmentation still keeps part of what a layer freed resident.
  Checked against ``bench/memory.py`` (docs/benchmarks.md);
* device memory ≈ the largest decoder layer's weights + activations (as above, one or two sets)
  + the fp32 Hessians of that layer's targeted Linears (Σ in² · 4 B) + GPTQ's float64 scale refit of
  the largest integer Linear (its Hessian, codes and products: (in² + 3 · out · in) · 8 B) + a 1.5x
  workspace factor (the refit's temporaries are added to the CPU workspace too);
* time ≈ (forward FLOPs: 2 passes · 2 · layer params · samples · seqlen · layers
  + solver FLOPs: Σ over Linears of (in³/3 + 2·out·in²) for GPTQ/SparseGPT) / throughput,
  throughput 2e10 FLOP/s on "cpu" and 2e13 FLOP/s on "cuda".
"""
from __future__ import annotations

import re
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from compression.algorithms.gptq import default_resweeps, refittable
from compression.errors import RecipeError, UnsupportedModelError
from compression.model_io.moe import (CheckpointNames, check_fused_experts, experts_stored_fused, in_router,
                                      is_fused_experts, router_weight_names, split_fused_experts, transposed_layout,
                                      unsplittable_experts)
from compression.recipe import (FINETUNE, PRESET_GROUP_SIZES, Recipe, bounded_match, matches_any, module_names,
                                outside_decoder_message, pattern_matches)

THROUGHPUT = {"cpu": 2e10, "cuda": 2e13}
MAX_LAYERS = 4096


@dataclass
class PreflightReport:
    """Shapes checked and resource estimates for one model + recipe."""

    layers: int
    params: int
    targeted_modules: int
    peak_host_mb: float
    peak_device_mb: float
    estimated_seconds: float
    warnings: list[str] = field(default_factory=list)
    architecture: str = ""
    experts: int = 0  # per-expert modules (experts × MoE layers)
    routers: int = 0
    peak_host_streaming_mb: float = 0.0  # the same job streamed layer by layer from the shards
    activation_mb: float = 0.0  # captured calibration activations (one set, two with a second stream)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LinearSlot:
    """One Linear the engine may compress: checkpoint name, decoder layer (None outside), shape."""

    name: str
    layer: int | None
    local: str
    out_features: int
    in_features: int
    path: str = ""  # the module path in the transformers model, where it differs from ``name``

    head: bool = False  # the output head: it also answers to "lm_head" wherever it sits

    @property
    def names(self) -> tuple[str, ...]:
        found = module_names(self.name, self.path or self.name, head=self.head)
        return (found,) if isinstance(found, str) else found


@dataclass
class ModelLayout:
    architecture: str
    layers: int
    params: int
    linears: list[LinearSlot]
    routers: list[str]
    experts: int
    layer_params: list[int] = field(default_factory=list)  # every parameter of each decoder layer
    layer_class: str = ""  # the decoder layer's class (a pruning modifier may target it)
    embeddings: list[str] = field(default_factory=list)  # nn.Embedding modules (checkpoint names)
    head: str | None = None  # the LM head's checkpoint name when the engine can compress it (see sequential.output_head)
    # the family's checkpoints hold its MoE experts fused, as in memory (moe.experts_stored_fused: Llama 4, gpt-oss)
    experts_stored_fused: bool = False
    # one decoder layer of each distinct structure, as the engine walks it (meta tensors, fused experts split),
    # with its module path: what a recipe's own AWQ / SmoothQuant mappings are resolved against
    sample_layers: list[tuple[str, torch.nn.Module]] = field(default_factory=list, repr=False, compare=False)


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _as_config(model_config: Any) -> Any:
    if not isinstance(model_config, dict):
        return model_config
    from transformers import AutoConfig

    values = dict(model_config)
    model_type = values.pop("model_type", None) or "llama"  # a bare dict of sizes: a Llama-style model
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as exc:
        raise RecipeError("model", f"unknown model_type {model_type!r}: {exc}") from exc


def model_layout(model_config: Any, *, trust_remote_code: bool = False) -> ModelLayout:
    """Build the model on the meta device and list what the engine would walk (see module doc)."""
    from compression.model_io.loading import auto_model_class

    config = _as_config(model_config)
    n_layers = int(_cfg(getattr(config, "get_text_config", lambda: config)(), "num_hidden_layers") or 0)
    if not 0 < n_layers <= MAX_LAYERS:  # every module name below is listed (and matched) one by one
        raise RecipeError("model", f"the config's num_hidden_layers ({n_layers}) is outside 1..{MAX_LAYERS}")
    try:
        with torch.device("meta"):
            model = auto_model_class(config).from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        kind = getattr(config, "model_type", type(config).__name__)
        raise RecipeError("model", f"transformers cannot build a causal LM from this config (model_type "
                          f"{kind!r}): {exc}") from exc
    from compression.model_io.walk import decoder_layers

    try:
        prefix, layers = decoder_layers(model)
        names = CheckpointNames.for_model(model)
        slots: list[LinearSlot] = []
        routers: list[str] = []
        experts = 0
        for index, layer in enumerate(layers):
            base = f"{prefix}.{index}"
            router_weights = set(router_weight_names(layer))
            for local, module in layer.named_modules():
                if in_router(layer, local):  # a router, or the Linear that holds its weight, stays 16-bit
                    if local in router_weights:
                        routers.append(names.checkpoint(f"{base}.{local}"))
                elif isinstance(module, torch.nn.Linear):
                    slots.append(LinearSlot(names.checkpoint(f"{base}.{local}"), index, local,
                                            module.out_features, module.in_features, f"{base}.{local}"))
                elif (reason := unsplittable_experts(f"{base}.{local}", module)) is not None:
                    raise UnsupportedModelError(reason)
                elif is_fused_experts(module):
                    check_fused_experts(f"{base}.{local}", module)
                    slots.extend(_expert_slots(module, base, local, index, names))
                    experts += int(module.down_proj.shape[0])
    except UnsupportedModelError as exc:
        raise RecipeError("model", str(exc)) from exc
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith(prefix + "."):
            slots.append(LinearSlot(names.checkpoint(name), None, name, module.out_features, module.in_features,
                                    name))
    stored_fused = experts_stored_fused(model)
    params = sum(p.numel() for p in model.parameters())
    embeddings = [names.checkpoint(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    from compression.sequential import output_head

    head = output_head(model, prefix)
    slots = [dataclasses.replace(s, head=True) if head is not None and s.layer is None and s.path == head else s
             for s in slots]
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    return ModelLayout(type(model).__name__, len(layers), params, slots, routers, experts, layer_params,
                       type(layers[0]).__name__ if len(layers) else "", embeddings,
                       names.checkpoint(head) if head else None, stored_fused,
                       _sample_layers(prefix, layers, names))  # last: it splits the skeleton's experts in place


def _sample_layers(prefix: str, layers, names: CheckpointNames) -> list[tuple[str, torch.nn.Module]]:
    """The first decoder layer of each distinct structure (hybrid and interleaved-MoE models alternate),
    fused experts replaced by the per-expert modules the engine compresses (the model is thrown away)."""
    seen: dict[tuple, tuple[str, torch.nn.Module]] = {}
    for index, layer in enumerate(layers):
        key = tuple((local, type(m).__name__) for local, m in layer.named_modules())
        if key in seen:
            continue
        split_fused_experts(layer, names)
        seen[key] = (f"{prefix}.{index}", layer)
    return list(seen.values())


def _expert_slots(module: torch.nn.Module, base: str, local: str, index: int,
                  names: CheckpointNames) -> list[LinearSlot]:
    e_count, *_ = module.down_proj.shape
    down = module.down_proj.shape[1:]
    if transposed_layout(module):
        down = down[::-1]
    hidden, inter = down  # down: [H, I]
    gate, up, down_name = names.projections
    out = []
    for e in range(e_count):
        for proj, (o, i) in ((gate, (inter, hidden)), (up, (inter, hidden)), (down_name, (hidden, inter))):
            path = f"{local}.{e}.{proj}"
            out.append(LinearSlot(names.checkpoint(f"{base}.{path}"), index, path, o, i, f"{base}.{path}"))
    return out


def preflight(model_config: Any, recipe: Recipe, *, samples: int = 128, seqlen: int = 512,
              device: str = "cpu", trust_remote_code: bool = False,
              layout: ModelLayout | None = None) -> PreflightReport:
    """Raise ``RecipeError`` for an unwalkable model, targets that match nothing, or incompatible
    shapes; otherwise return estimates (see module doc). ``layout``: this config's
    :func:`model_layout`, when the caller checks several recipes against one model."""
    layout = layout or model_layout(model_config, trust_remote_code=trust_remote_code)
    _check_kv_cache(model_config, recipe)
    _check_mappings(recipe, layout)
    config = _as_config(model_config)
    text = getattr(config, "get_text_config", lambda: config)()
    hidden = int(_cfg(text, "hidden_size") or 0)
    dtype_bytes = 2 if str(_cfg(config, "torch_dtype", "") or _cfg(config, "dtype", "")).endswith(
        ("bfloat16", "float16")) else 4

    targeted: dict[str, LinearSlot] = {}
    hessian_bytes: dict[int, float] = {}
    refit_bytes = 0.0  # GPTQ's float64 scale refit of the largest integer-quantized Linear
    layer_params: dict[int, int] = {}
    solver_flops = 0.0
    for slot in layout.linears:
        if slot.layer is not None:
            layer_params[slot.layer] = layer_params.get(slot.layer, 0) + slot.out_features * slot.in_features
    matcher = _NameMatcher(list(dict.fromkeys(n for s in layout.linears for n in s.names)))
    containers = _NameMatcher(sorted({s.name.rsplit(".", k)[0] for s in layout.linears
                                      for k in range(1, s.name.count(".") + 1)}))
    for path, m in _modifiers(recipe):
        hits = [s for s in layout.linears
                if (matcher.any(m.targets, s.names) or (m.prunes and _in_target(containers, m.targets, s, layout)))
                and not matcher.any(m.ignore, s.names)]
        outside = [s for s in hits if s.layer is None and s.name != layout.head]
        if outside and recipe.preset is not None:  # a preset compresses the language model's decoder layers
            hits = [s for s in hits if s not in outside]
        elif outside:
            inside = next((s for s in layout.linears if s.layer is not None), None)
            prefix = inside.name.split(f".{inside.layer}.")[0] if inside is not None else ""
            raise RecipeError(f"{path}.ignore", outside_decoder_message(outside[0].name, prefix))
        if not hits:
            examples = ", ".join(example_names([s.name for s in layout.linears if s.layer is not None]))
            raise RecipeError(f"{path}.targets", f"{m.targets} (ignoring {m.ignore}) matches no Linear of the "
                              f"decoder layers of {layout.architecture}, e.g. {examples}")
        for s in hits:
            every = int(m.mask_structure.split(":")[1]) if m.prunes else 0
            if every and s.in_features % every:
                raise RecipeError("recipe.mask_structure", f"{m.mask_structure} sparsity needs input widths "
                                  f"divisible by {every}; {s.local} has {s.in_features}")
            group = next((g for g in m.config_groups.values() if matcher.any(g.targets, s.names)), None) \
                if m.quantizes else None
            if group is not None and group.weights is not None and group.weights.strategy == "group" \
                    and s.in_features % group.weights.group_size:
                raise RecipeError("recipe.group_size", _group_message(group.weights.group_size, hits, s))
            if group is not None and group.weights is not None:
                _check_parity_shapes(group, s.local, s.in_features)
            targeted[s.name] = s
            # AWQ's clipping rounds on ranges chosen by the calibration inputs' Hessian, and refits the scales
            clip = m.quantizes and group is not None and recipe.awq_clip(m, group.weights, s.name)
            if m.kind == "GPTQModifier" or m.prunes or clip:
                hessian_bytes[s.layer] = hessian_bytes.get(s.layer, 0) + s.in_features ** 2 * 4
            refit = m.kind == "GPTQModifier" and group is not None and group.weights is not None \
                and refittable(group.weights)
            if m.kind in ("GPTQModifier", "SparseGPTModifier"):
                # a sweep is 2·out·in² flops; a refitted scheme runs up to default_resweeps more (gptq.gptq_quantize)
                sweeps = 1 + (default_resweeps(group.weights) if refit else 0)
                solver_flops += s.in_features ** 3 / 3 + sweeps * 2 * s.out_features * s.in_features ** 2
            if refit or clip:
                # the Hessian, the codes, their products and the weight in float64 (gptq.refit_scales)
                refit_bytes = max(refit_bytes, 8.0 * (s.in_features ** 2 + 3 * s.out_features * s.in_features))
        if m.quantizes:
            _check_embeddings(path, m, layout)
    calib = recipe.needs_calibration
    biggest_layer = max(layer_params.values(), default=0)
    act_bytes = samples * seqlen * hidden * 4 if calib else 0
    # each layer's outputs overwrite its inputs (LayerInputs.forward in_place), so one set of activations
    # is held; two where a reconstruction keeps the dense model's stream or AWQ/SmoothQuant (or OWL) replay them
    streams = 2 if any(m.transforms or m.owl is not None or (m.prunes and m.reconstruction is not None)
                       or m.autoround is not None for m in recipe.modifiers) else 1
    # AutoRound keeps one batch's autograd activations (attention and MLP intermediates, float32) and, in
    # float32, the layer, a copy of its weights, their rounding offsets, the offsets' gradients and the
    # quantized weights (5 x 4 bytes per parameter)
    tuning = [m.autoround for m in recipe.modifiers if m.autoround is not None and m.autoround.iters > 0] \
        if calib else []
    intermediate = int(_cfg(text, "intermediate_size") or 0)
    tuning_bytes = max((min(t.batch_size, samples) * seqlen * (12 * hidden + 4 * (intermediate or 4 * hidden)) * 4
                        + 5 * biggest_layer * 4 for t in tuning), default=0)
    device_bytes = 1.5 * (biggest_layer * dtype_bytes + streams * act_bytes + max(hessian_bytes.values(), default=0)
                          + tuning_bytes + refit_bytes)
    from compression.model_io.walk import BATCH_TOKENS

    host_bytes, streaming_bytes = host_memory_estimates(
        layout, device=device, storage_bytes=dtype_bytes, activation_bytes=streams * act_bytes,
        hessian_bytes=max(hessian_bytes.values(), default=0), intermediate=intermediate,
        batch_tokens=min(BATCH_TOKENS, samples * seqlen) if calib else 0, refit_bytes=refit_bytes)
    layer_forward = 2 * sum(layer_params.values()) * samples * seqlen  # every calibration token through every layer
    forward_flops = 2 * layer_forward if calib else 0
    # AutoRound: per step a forward and backward (3 forwards) of batch_size samples through each layer, plus
    # the dense targets and three error passes over every sample
    tuning_flops = sum(2 * sum(layer_params.values()) * seqlen * 3 * (t.iters * min(t.batch_size, samples) + samples)
                       for t in tuning)
    # AWQ / SmoothQuant: one statistics forward of the layer per mapping; AWQ then runs each mapping's parent
    # once per grid point (the default four parents -- attention, o_proj, MLP, down_proj -- hold about 1.35x
    # the layer's parameters together, so a quarter of that per mapping; measured on the demo model, the grid is
    # most of an AWQ job's time)
    smoothing_flops = 0.0
    for m in (recipe.modifiers if calib else []):
        if not m.transforms:
            continue
        awq = m.kind == "AWQModifier"
        mappings = len(m.mappings) if m.mappings is not None else (4 if awq else 2)
        smoothing_flops += mappings * layer_forward
        if awq:
            smoothing_flops += m.n_grid * mappings * 1.35 / 4 * layer_forward
    seconds = (forward_flops + solver_flops + tuning_flops + smoothing_flops) / THROUGHPUT.get(device.split(":")[0], THROUGHPUT["cpu"])
    warnings = []
    if calib and samples < 64:
        warnings.append(f"only {samples} calibration samples; 128-512 are usual")
    return PreflightReport(layers=layout.layers, params=int(layout.params), targeted_modules=len(targeted),
                           peak_host_mb=round(host_bytes / 2 ** 20, 1), peak_device_mb=round(device_bytes / 2 ** 20, 1),
                           estimated_seconds=round(seconds, 1), warnings=warnings, architecture=layout.architecture,
                           experts=layout.experts, routers=len(layout.routers),
                           peak_host_streaming_mb=round(streaming_bytes / 2 ** 20, 1),
                           activation_mb=round(streams * act_bytes / 2 ** 20, 1))


PROCESS_BASE_BYTES = 600 * 2 ** 20  # python + torch + transformers + tokenizer, measured by bench/memory.py


def host_memory_estimates(layout: ModelLayout, *, device: str, storage_bytes: int, activation_bytes: int,
                          hessian_bytes: float, intermediate: int, batch_tokens: int = 0,
                          refit_bytes: float = 0.0) -> tuple[float, float]:
    """(in memory, streamed) peak host bytes of a job (see the module doc). ``batch_tokens``: tokens of
    one calibration batch through a layer (0: a data-free recipe runs no calibration forward pass).
    ``refit_bytes``: the float64 temporaries of GPTQ's scale refit for the largest Linear."""
    from compression.model_io.export import DEFAULT_SHARD_BYTES

    compute = 2 if device.startswith("cuda") else 4
    params = layout.params
    layer = max(layout.layer_params, default=0)
    outside = max(0, params - sum(layout.layer_params))
    on_cpu = not device.startswith("cuda")
    workspace = 0.0
    if on_cpu:
        # The solver works on one Linear at a time, in fp32: round-to-nearest holds the scaled and clamped
        # weight and the dequantized result (3 copies); GPTQ/SparseGPT the weight, its reference, the
        # quantized result and the expanded scales (5), plus the Hessians of the layer's Linears and an inverse.
        largest = max((s.out_features * s.in_features for s in layout.linears if s.layer is not None), default=0)
        solver = 2 * hessian_bytes + (5 if hessian_bytes else 3) * largest * 4 + refit_bytes
        # one calibration batch through the layer's MLP: gate, up and their product (fp32)
        forward = 3 * batch_tokens * max(intermediate, 1) * 4
        workspace = solver + forward
    activations = activation_bytes if on_cpu else 0
    in_memory = PROCESS_BASE_BYTES + params * (compute + 1 + storage_bytes) + activations + workspace
    # the shard being filled: about one dense layer (at least 64 MiB), never more than the whole export
    shard = min(DEFAULT_SHARD_BYTES, max(64 * 2 ** 20, layer * storage_bytes), params * storage_bytes)
    streamed = PROCESS_BASE_BYTES + activations + max(
        outside * compute + 2 * layer * compute + workspace + shard,  # compressing a layer
        outside * (compute + storage_bytes) + shard)  # writing the tensors outside the layers
    return float(in_memory), float(streamed)


# A `re:` pattern made of these pieces only cannot match across a line break, so matching it once
# over all names joined by newlines (MULTILINE, one C-level scan) finds exactly the names
# `re.match` would: tens of thousands of expert names stay within the request's pattern budget.
_LINE_SAFE_ESCAPES = set("\\.dwb-_$*+?()[]{}|^/:")


def _line_safe(pattern: str) -> bool:
    if "(?" in pattern or "[^" in pattern or any(ord(c) < 0x20 for c in pattern):
        return False
    i = pattern.find("\\")
    while i != -1:
        if i + 1 >= len(pattern) or pattern[i + 1] not in _LINE_SAFE_ESCAPES:
            return False
        i = pattern.find("\\", i + 2)
    return True


class _NameMatcher:
    """compressed-tensors matching (class name ``Linear``, exact name, ``re:``) over a fixed name list,
    each ``re:`` pattern evaluated once for all names."""

    def __init__(self, names: list[str]):
        self.names = names
        self.text = "\n".join(names)
        self.starts: dict[int, str] = {}
        offset = 0
        for name in names:
            self.starts[offset] = name
            offset += len(name) + 1
        self.cache: dict[str, set[str]] = {}

    def matching(self, pattern: str) -> set[str]:
        if pattern not in self.cache:
            if _line_safe(pattern):
                import regex

                compiled = regex.compile(f"(?m)^(?:{pattern})")
                self.cache[pattern] = bounded_match(
                    pattern, lambda timeout: {self.starts[m.start()] for m in compiled.finditer(self.text,
                                                                                                timeout=timeout)}, 1.0)
            else:
                self.cache[pattern] = {n for n in self.names if pattern_matches(pattern, n)}
        return self.cache[pattern]

    def any(self, patterns: list[str], names: str | tuple[str, ...]) -> bool:
        names = (names,) if isinstance(names, str) else names
        for pattern in patterns:
            if pattern.startswith("re:"):
                if any(n in self.matching(pattern[3:]) for n in names):
                    return True
            elif pattern == "Linear" or pattern in names:
                return True
        return False


def example_names(names: list[str], limit: int = 8) -> list[str]:
    """One name per kind (layer and expert numbers aside), for error messages."""
    seen: dict[str, str] = {}
    for name in names:
        seen.setdefault(re.sub(r"\.\d+\.", ".N.", name), name)
    return list(seen.values())[:limit]


def _modifiers(recipe: Recipe):
    """(path, modifier) of the modifiers that target modules (a fine-tune stage trains them all;
    AWQ / SmoothQuant resolve their own mappings per layer)."""
    for i, stage in enumerate(recipe.stages):
        for j, m in enumerate(stage.modifiers):
            if m.kind != FINETUNE and not m.transforms:
                yield f"stages[{i}].modifiers[{j}]", m


def _group_message(size: int, hits: list[LinearSlot], slot: LinearSlot) -> str:
    widths = sorted({s.in_features for s in hits})
    working = [g for g in PRESET_GROUP_SIZES if all(w % g == 0 for w in widths)]
    options = ", ".join(str(g) for g in working) + (" or " if working else "") + "per-channel"
    return (f"group size {size} does not divide the input width {slot.in_features} of {slot.local}; "
            f"group sizes that work for this model: {options}")


def _in_target(containers: "_NameMatcher", targets: list[str], slot: LinearSlot, layout: ModelLayout) -> bool:
    """A pruning modifier's targets may name a module holding the Linear (llm-compressor prunes every
    Linear inside ``re:model.layers.\\d+$`` or a decoder layer class)."""
    if slot.layer is not None and layout.layer_class in targets:
        return True
    return any(containers.any([t], slot.name.rsplit(".", k)[0]) for t in targets if t != "Linear"
               for k in range(1, slot.name.count(".") + 1))


def _check_embeddings(path: str, m, layout: ModelLayout) -> None:
    """A config group targeting an Embedding: llm-compressor quantizes it; this engine quantizes Linears only."""
    for name in layout.embeddings:
        if matches_any(m.ignore, name, "Embedding"):
            continue
        for gname, g in m.config_groups.items():
            if g.weights is not None and matches_any(g.targets, name, "Embedding"):
                raise RecipeError(f"{path}.config_groups.{gname}.targets", f"{name} is an Embedding: this engine "
                                  "quantizes Linear layers only (vLLM's compressed-tensors loader reads quantized Linear, "
                                  "attention and MoE weights, never an embedding); drop the Embedding target or add "
                                  "it to ignore")


def _check_parity_shapes(g, local: str, in_f: int) -> None:
    """NVFP4 groups of 16 and per-token-group activation scales (FP8_BLOCK) must tile the input width."""
    if g.weights.strategy == "tensor_group" and in_f % g.weights.group_size:
        raise RecipeError("recipe.group_size", f"NVFP4 groups of {g.weights.group_size} do not divide the input "
                          f"width {in_f} of {local}; use an FP8 or INT scheme for this model (or ignore {local})")
    acts = g.input_activations
    if acts is not None and acts.strategy in ("group", "tensor_group") and in_f % acts.group_size:
        raise RecipeError("recipe.input_activations.group_size",
                          f"activation groups of {acts.group_size} do not divide the input width {in_f} of "
                          f"{local}; FP8_BLOCK needs input widths that are multiples of {acts.group_size}")


def _check_mappings(recipe: Recipe, layout: ModelLayout) -> None:
    """A recipe's own AWQ / SmoothQuant mapping must find its smooth layer and balance layers together in
    at least one decoder layer; one that matches nowhere would leave the modifier a silent no-op
    (llm-compressor skips it without a word). Default mappings are the engine's to leave out (the card says so)."""
    from compression.algorithms.smoothing import mapping_found, mapping_targets

    if not layout.sample_layers:
        return
    for i, stage in enumerate(recipe.stages):
        for j, m in enumerate(stage.modifiers):
            if not m.transforms or m.mappings is None:
                continue
            for k, spec in enumerate(m.mappings):
                smooth, balance = mapping_targets(m, spec)
                if any(mapping_found(layer, base, smooth, balance) for base, layer in layout.sample_layers):
                    continue
                base, layer = layout.sample_layers[-1]  # the last structure: an MoE layer where some are dense
                names = example_names([f"{base}.{n}" for n, mod in layer.named_modules()
                                       if n and isinstance(getattr(mod, "weight", None), torch.Tensor)], limit=16)
                raise RecipeError(f"stages[{i}].modifiers[{j}].mappings[{k}]",
                                  f"smooth_layer {smooth!r} with balance_layers {balance} matches no set of modules "
                                  f"in any decoder layer of {layout.architecture} (a decoder layer holds e.g. "
                                  f"{', '.join(names)}); fix the patterns or remove the mapping")


def _check_kv_cache(model_config: Any, recipe: Recipe) -> None:
    """kv_cache_scheme needs decoder attention with a KV cache (not an attention-free or encoder model)."""
    if recipe.kv_cache is None:
        return
    config = _as_config(model_config)
    text = getattr(config, "get_text_config", lambda: config)()
    model_type = str(_cfg(text, "model_type", "") or _cfg(config, "model_type", "") or "")
    no_cache = model_type in ("mamba", "mamba2", "falcon_mamba", "rwkv", "bert", "roberta", "t5encoder")
    layer_types = _cfg(text, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and layer_types and not any(
            "attention" in str(t) and "linear" not in str(t) for t in layer_types):
        no_cache = True  # a hybrid config whose layers are all linear attention / state space
    if no_cache or _cfg(text, "use_cache", True) is False or not _cfg(text, "num_attention_heads"):
        raise RecipeError("recipe.kv_cache_scheme", f"this model ({model_type or 'unknown type'}) has no attention "
                          "KV cache to quantize; remove kv_cache_scheme")
