"""Layer-by-layer compression with forward hooks only (no tracing).

0. Fused MoE experts (transformers 5's 3-D parameters) become per-expert Linears
   (:mod:`compression.model_io.moe`); targets, ``ignore`` and report names are the family's checkpoint names.
1. Capture the inputs of every decoder layer (:func:`compression.model_io.walk.capture_layer_inputs`): the
   hidden states entering layer 0, and per layer the mask and position embeddings of its own
   attention type (Gemma 2/3 sliding vs full, Gemma 3 local vs global RoPE).
2. For each decoder layer: move it to ``device``; hooks on its targeted Linears accumulate fp32
   Hessians (and absmax for static FP8 input scales) — an expert's hooks see the tokens routed to
   it; compress each module, stage by stage (an expert that received fewer than
   ``min_expert_tokens`` falls back to round-to-nearest / magnitude pruning, recorded in the
   report); re-run the compressed layer on the same inputs to get the next layer's inputs; move it back.

Calibration samples run through each layer in batches of at most ``BATCH_TOKENS`` tokens. On an
accelerator, samples of similar length run as right-padded batches (≤ 25% padding) whose masks and
positions the model builds itself at capture; every statistic skips the pad positions
(:func:`walk.valid_rows`). On a CPU (where a call is matmul-bound already at one sample's tokens
and pad positions cost more than fewer calls save), and where padding cannot be honoured exactly
(:func:`padded_batching`), only samples of the same length share a call.

Only one decoder layer and its activations live on the compute device at a time. The model is
left holding fake-quantized weights, with activation fake-quant pre-hooks attached for schemes
that quantize activations, so it can be evaluated directly.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from compression.errors import CalibrationError, JobCancelled, RecipeError, SparsityPatternError
from compression.algorithms.gptq import (HessianAccumulator, QuantResult, cpu_has_native, disable_tf32, gptq_quantize,
                                       quadratic_loss, quantize_weight)
from compression.model_io.moe import (CheckpointNames, in_router, is_fused_experts, per_expert_modules, router_names,
                                      router_weight_names, unfuse_experts)
from compression.algorithms.quant import (QuantArgs, fake_quantize_activation, fp4_global_scale, qparams_from_range,
                                         usable_importance)
from compression.algorithms.reconstruction import ReconstructionSettings, layer_outputs, reconstruct_layer
from compression.algorithms.autoround import AutoRoundSettings, autoround_layer
from compression.recipe import (FINETUNE, Modifier, Recipe, SchemeGroup, class_names, matches_any, module_names,
                                outside_decoder_message)
from compression.algorithms.kvcache import cache_parameter as kv_cache_parameter
from compression.algorithms.sparsegpt import magnitude_prune, sparsegpt_prune, wanda_prune
from compression.algorithms.awq import clip_quantize
from compression.model_io.streaming import map_large_blocks, release_heap
from compression.model_io.walk import (BATCH_TOKENS, MAX_PADDING, LayerInputs, capture_layer_inputs, decoder_layers,
                                       token_mask, valid_rows)
from kernels.packing import is_24_sparse, pack_int, unpack_int

__all__ = ["CompressionReport", "ModuleRecord", "compress_model", "decoder_layers"]

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]
MIN_EXPERT_TOKENS = 16  # an MoE expert routed fewer calibration tokens falls back to RTN / magnitude


@dataclass
class ModuleRecord:
    """Everything export needs about one compressed Linear (checkpoint module name ``name``)."""

    name: str
    shape: tuple[int, int]
    weights: QuantArgs | None = None
    input_activations: QuantArgs | None = None
    # the codes (see ``codes``): int codes of fewer than 8 bits are held packed (int32 words, 8x smaller
    # than int8 for INT4, what export writes as weight_packed), every other kind as it is
    packed: torch.Tensor | None = field(default=None, repr=False)
    _codes: torch.Tensor | None = field(default=None, repr=False)
    scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None  # asymmetric int weights, shaped like scale (int8)
    global_scale: torch.Tensor | None = None  # NVFP4 weights (float32 [1])
    g_idx: torch.Tensor | None = None  # act-order "group": column → scale column (int32 [in])
    input_zero_point: torch.Tensor | None = None  # static asymmetric activations
    input_global_scale: torch.Tensor | None = None  # NVFP4 activations (float32 [1])
    mask_structure: str | None = None
    sparsity: float | None = None
    losses: dict[str, float] = field(default_factory=dict)
    dead_columns: int = 0
    fallback: str | None = None
    written: bool = False  # streaming export: its tensors are in a shard already and were dropped here

    @property
    def codes(self) -> torch.Tensor | None:
        """int8 (int schemes), float8_e4m3fn, or E2M1 values (NVFP4), [out, in]; int codes held packed are
        unpacked on each access (exactly: :func:`kernels.packing.unpack_int` inverts ``pack_int``)."""
        if self._codes is None and self.packed is not None:
            return unpack_int(self.packed, self.shape[1], self.weights.num_bits)
        return self._codes

    @codes.setter
    def codes(self, value: torch.Tensor | None) -> None:
        """Set after ``weights``: int8 codes of a scheme of fewer than 8 bits are packed right away
        (a compressed model holds one int8 code per weight otherwise, until the export)."""
        self.packed = self._codes = None
        w = self.weights
        if (value is not None and value.dtype == torch.int8 and value.dim() == 2 and w is not None
                and w.type == "int" and w.num_bits < 8 and tuple(value.shape) == tuple(self.shape)):
            self.packed = pack_int(value, w.num_bits)
        else:
            self._codes = value

    def summary(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "losses": self.losses,
                "sparsity": self.sparsity, "mask_structure": self.mask_structure,
                "dead_columns": self.dead_columns, "fallback": self.fallback}


@dataclass
class CompressionReport:
    """Result of :func:`compress_model`: per-module records, fallbacks, timing."""

    modules: dict[str, ModuleRecord] = field(default_factory=dict)
    layers: int = 0
    samples: int = 0
    seconds: float = 0.0
    routers: list[str] = field(default_factory=list)  # MoE routers/gates, kept 16-bit (checkpoint names)
    experts: int = 0  # per-expert modules (MoE experts × layers)
    layer_batches: int = 0  # calibration batches per layer call round (samples when run one at a time)
    batching: str = ""  # how samples were batched through the layers, and why not padded
    calibrate_all_experts: bool = False
    hooks: list = field(default_factory=list, repr=False)
    reconstruction: dict[int, dict] = field(default_factory=dict)  # layer index -> ReconstructionResult.to_dict()
    autoround: dict[int, dict] = field(default_factory=dict)  # layer index -> AutoRoundResult.to_dict()
    kv_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # "<attention>.k_scale" → [1]
    smoothing: list[dict] = field(default_factory=list)  # AWQ / SmoothQuant per mapping

    @property
    def fallbacks(self) -> list[dict]:
        return [{"module": r.name, "reason": r.fallback} for r in self.modules.values() if r.fallback]

    def sparsity_stats(self) -> dict | None:
        sparse = [r for r in self.modules.values() if r.sparsity is not None]
        if not sparse:
            return None
        total = sum(r.shape[0] * r.shape[1] for r in sparse)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in sparse)
        return {"sparsity_structure": sparse[0].mask_structure, "global_sparsity": zeros / total,
                "modules": len(sparse)}

    def summary(self) -> dict:
        """JSON-able digest (no tensors) for job results and model cards."""
        return {"layers": self.layers, "samples": self.samples, "seconds": round(self.seconds, 3),
                "fallbacks": self.fallbacks, "sparsity": self.sparsity_stats(), "routers": list(self.routers),
                "experts": self.experts, "calibrate_all_experts": self.calibrate_all_experts,
                "smoothing": self.smoothing,
                "kv_cache_scales": {k: float(v.float().max()) for k, v in self.kv_scales.items()},
                "modules": [r.summary() for r in self.modules.values()],
                **({"reconstruction": [{"layer": i, **r} for i, r in sorted(self.reconstruction.items())]}
                   if self.reconstruction else {}),
                **({"autoround": [{"layer": i, **r} for i, r in sorted(self.autoround.items())]}
                   if self.autoround else {})}

    def remove_activation_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()


def _memory_mb(device: torch.device | str) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2 ** 20
    except ImportError:  # pragma: no cover - psutil is a dependency
        return 0.0


@dataclass
class _Plan:
    """Which modifiers (in recipe order) touch one Linear, with the config group that applies."""

    name: str  # checkpoint name (what targets/ignore match, what export writes)
    local: str  # path inside the decoder layer
    module: torch.nn.Linear
    steps: list[tuple[str, Modifier, SchemeGroup | None]]
    fallback: str | None = None  # set for an expert that saw too few calibration tokens
    sparsity: dict[int, float] = field(default_factory=dict)  # id(pruning modifier) → this module's sparsity
    clip: bool = False  # AWQ's clipping chooses its round-to-nearest ranges (Recipe.awq_clip)

    @property
    def needs_hessian(self) -> bool:
        return self.clip or any(m.kind == "GPTQModifier" or m.prunes for _, m, _ in self.steps)

    @property
    def needs_importance(self) -> bool:
        """The "imatrix_mse" weight observer weighs errors by E[x²] per input channel (from H where GPTQ has it)."""
        return not self.needs_hessian and any(g is not None and g.weights is not None
                                              and g.weights.observer == "imatrix_mse" for _, _, g in self.steps)

    @property
    def needs_absmax(self) -> bool:
        """Static activation scales (or NVFP4's static global input scale) need the input range."""
        return any(g is not None and g.input_activations is not None
                   and (not g.input_activations.dynamic or g.input_activations.has_global_scale)
                   for _, _, g in self.steps)


def _linears(root: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    """Every Linear under ``root`` except MoE routers/gates (they stay 16-bit)."""
    for local, module in root.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if in_router(root, local):
            continue
        yield local, module


def ancestors(root: torch.nn.Module, path: str, name: str) -> tuple[tuple[str, str], ...]:
    """(checkpoint name, class name) of every module containing the module at ``path`` under ``root``,
    outermost first; ``name`` is that module's checkpoint name (its prefixes name the containers)."""
    parts, cparts = path.split("."), name.split(".")
    out = []
    for k in range(1, len(cparts)):
        cls = ""
        if len(parts) == len(cparts):
            try:
                cls = type(root.get_submodule(".".join(parts[:k]))).__name__
            except AttributeError:
                pass
        out.append((".".join(cparts[:k]), cls))
    return tuple(out)


def _steps(recipe: Recipe, name: str, cls: str, parents: tuple = (), path: str | None = None, head: bool = False
           ) -> list[tuple[str, Modifier, SchemeGroup | None]]:
    """The modifiers that act on the Linear ``name`` (its checkpoint name; ``path``: its module path, matched
    too where it differs), in recipe order, with the config group each quantizer applies. The output head
    (``head``) also answers to ``lm_head`` wherever it sits (Llama 4's ``language_model.lm_head``)."""
    matched = name if path is None else module_names(name, path, head=head)
    steps = []
    for i, stage in enumerate(recipe.stages):
        for j, m in enumerate(stage.modifiers):
            if m.transforms:
                continue  # AWQ / SmoothQuant act on whole layers (compression.algorithms.smoothing)
            if not m.matches(matched, cls, parents):
                continue
            group = m.scheme_for(matched, cls) if m.quantizes else None
            if m.quantizes and (group is None or group.weights is None):
                continue  # no config group, or an UNQUANTIZED one: the module stays 16-bit
            steps.append((f"stages[{i}].modifiers[{j}]", m, group))
    # a QuantizationModifier whose scheme a later GPTQModifier reuses: GPTQ alone quantizes the module
    solvers = {id(m) for _, m, _ in steps}
    steps = [st for st in steps if st[1].superseded_by is None or id(st[1].superseded_by) not in solvers]
    if sum(1 for _, m, _ in steps if m.quantizes) > 1:
        raise RecipeError(steps[-1][0], f"{name} would be quantized twice; target each module once")
    if sum(1 for _, m, _ in steps if m.prunes) > 1:
        raise RecipeError(steps[-1][0], f"{name} would be pruned twice; target each module once")
    return steps


def _plan_layer(recipe: Recipe, prefix: str, layer: torch.nn.Module, names: CheckpointNames,
                root: torch.nn.Module | None = None, sparsities: dict | None = None) -> list[_Plan]:
    """The plans of one decoder layer's Linears; ``root`` (the model) names the containers a pruning
    modifier's targets may match; ``sparsities``: {(id(modifier), name): sparsity} set per module."""
    plans = []
    for local, module in _linears(layer):
        name = names.checkpoint(f"{prefix}.{local}")
        parents = ancestors(root, f"{prefix}.{local}", name) if root is not None else ()
        steps = _steps(recipe, name, class_names(module), parents, path=f"{prefix}.{local}")
        if steps:
            plan = _Plan(name, local, module, steps)
            for _, m, group in steps:
                if m.prunes and sparsities and (id(m), name) in sparsities:
                    plan.sparsity[id(m)] = sparsities[(id(m), name)]
                if m.quantizes and recipe.awq_clip(m, group.weights, name):
                    plan.clip = True
            plans.append(plan)
    return plans


def check_targets(model: torch.nn.Module, recipe: Recipe, prefix: str, names: CheckpointNames) -> int:
    """Before any work: no targeted Linear outside the decoder layers, every modifier matches
    something inside them, no Embedding targeted, N:M widths and group sizes that fit.
    Returns the number of targeted Linears."""
    matched = [0] * len(recipe.modifiers)
    targeted = 0
    head = output_head(model, prefix)
    for name, module in _linears(model):
        cname, cls = names.checkpoint(name), class_names(module)
        inside = name.startswith(prefix + ".") or name == head
        parents = ancestors(model, name, cname)
        hit = False
        for k, m in enumerate(recipe.modifiers):
            if m.matches(module_names(cname, name, head=name == head), cls, parents):
                if not inside and recipe.preset is not None:
                    continue  # a preset compresses the language model's decoder layers (not a vision tower)
                if not inside:
                    raise RecipeError(f"{_modifier_path(recipe, k)}.ignore",
                                      outside_decoder_message(cname, names.checkpoint(prefix)))
                _check_shapes(recipe, k, m, cname, cls, module)
                matched[k] += 1
                hit = True
        targeted += hit
    for k, count in enumerate(matched):
        # fine-tuning trains every layer; AWQ / SmoothQuant resolve their own mappings
        if not count and recipe.modifiers[k].kind != FINETUNE and not recipe.modifiers[k].transforms:
            m = recipe.modifiers[k]
            raise RecipeError(f"{_modifier_path(recipe, k)}.targets",
                              f"{m.targets} (ignoring {m.ignore}) matches no Linear of the decoder layers of "
                              f"{type(model).__name__}, e.g. {_example_names(model, prefix, names)}")
    _check_embeddings(model, recipe, names)
    return targeted


def output_head(model: torch.nn.Module, prefix: str) -> str | None:
    """Module path of the LM head (the output embedding Linear) when the engine can compress it: the
    module holding the decoder layers has a final norm that feeds it. None otherwise."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or _final_norm(model, prefix) is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _final_norm(model: torch.nn.Module, prefix: str) -> torch.nn.Module | None:
    parent = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
    return next((getattr(parent, a) for a in ("norm", "final_layernorm", "ln_f")
                 if isinstance(getattr(parent, a, None), torch.nn.Module)), None)


class _Head(torch.nn.Module):
    """Final norm + LM head as one 'layer' of the sequential loop (its kwargs, masks and rotary
    tables, are not needed)."""

    def __init__(self, norm: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.head(self.norm(hidden))


def _head_plans(model: torch.nn.Module, recipe: Recipe, prefix: str, names: CheckpointNames) -> list[_Plan]:
    head = output_head(model, prefix)
    if head is None:
        return []
    module = model.get_submodule(head)
    name = names.checkpoint(head)
    steps = _steps(recipe, name, class_names(module), ancestors(model, head, name), path=head, head=True)
    return [_Plan(name, head, module, steps)] if steps else []


def _untie_head(model: torch.nn.Module, head: torch.nn.Linear) -> None:
    """A compressed LM head cannot share its weight with the input embedding (llm-compressor unties it too)."""
    embedding = model.get_input_embeddings()
    if embedding is not None and head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def _check_shapes(recipe: Recipe, k: int, m: Modifier, name: str, cls: str, module: torch.nn.Linear) -> None:
    """An N:M mask needs the input width (and block_size) divisible by M; group scales need the
    width divisible by the group size (llm-compressor refuses both too)."""
    path = _modifier_path(recipe, k)
    every = int(m.mask_structure.split(":")[1]) if m.prunes else 0
    if every and module.in_features % every:
        raise RecipeError(f"{path}.mask_structure", f"{m.mask_structure} sparsity needs input widths divisible by "
                          f"{every}; {name} has {module.in_features}")
    if every and m.kind == "SparseGPTModifier" and m.block_size % every:
        raise RecipeError(f"{path}.block_size", f"must be a multiple of {every} for mask_structure "
                          f"{m.mask_structure} (N:M groups may not straddle blocks)")
    group = m.scheme_for(name, cls) if m.quantizes else None
    if group is None or group.weights is None:
        return
    from compression.preflight import _check_parity_shapes

    w = group.weights
    if w.strategy == "group" and module.in_features % w.group_size:
        raise RecipeError("recipe.group_size", f"group size {w.group_size} does not divide the input width "
                          f"{module.in_features} of {name}; choose one that divides it, or per-channel")
    _check_parity_shapes(group, name, module.in_features)


def _check_embeddings(model: torch.nn.Module, recipe: Recipe, names: CheckpointNames) -> None:
    """llm-compressor quantizes an Embedding a config group targets; this engine quantizes Linears only."""
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Embedding):
            continue
        cname = names.checkpoint(name)
        for k, m in enumerate(recipe.modifiers):
            if not m.quantizes or matches_any(m.ignore, cname, "Embedding"):
                continue
            for gname, g in m.config_groups.items():
                if g.weights is not None and matches_any(g.targets, cname, "Embedding"):
                    raise RecipeError(f"{_modifier_path(recipe, k)}.config_groups.{gname}.targets",
                                      f"{cname} is an Embedding: this engine quantizes Linear layers only; drop "
                                      "the Embedding target or add it to ignore")


def _group_field(path: str, modifier: Modifier, group: SchemeGroup | None, leaf: str) -> str:
    """The recipe field ``leaf`` of the config group ``group`` of the modifier at ``path``."""
    name = next((key for key, g in modifier.config_groups.items() if g is group), None)
    return f"{path}.config_groups.{name}.{leaf}" if name else f"{path}.{leaf}"


def _modifier_path(recipe: Recipe, flat_index: int) -> str:
    k = 0
    for i, stage in enumerate(recipe.stages):
        for j, _ in enumerate(stage.modifiers):
            if k == flat_index:
                return f"stages[{i}].modifiers[{j}]"
            k += 1
    raise IndexError(flat_index)


def _example_names(model: torch.nn.Module, prefix: str, names: CheckpointNames) -> str:
    from compression.preflight import example_names

    return ", ".join(example_names([names.checkpoint(n) for n, _ in _linears(model) if n.startswith(prefix + ".")]))


def _attach_activation_quant(module: torch.nn.Linear, args: QuantArgs, input_scale: torch.Tensor | None,
                             input_zero_point: torch.Tensor | None = None,
                             global_scale: torch.Tensor | None = None):
    def hook(mod, inputs):
        return (fake_quantize_activation(inputs[0], args, input_scale, input_zero_point, global_scale),) + tuple(
            inputs[1:])

    return module.register_forward_pre_hook(hook)


@torch.no_grad()
def compress_model(model: torch.nn.Module, recipe: Recipe, calibration: list[dict] | None, *,
                   device: torch.device | str = "cpu", progress: Progress | None = None,
                   should_stop: Callable[[], bool] | None = None, calibrate_all_experts: bool = False,
                   min_expert_tokens: int = MIN_EXPERT_TOKENS,
                   held_masks: dict[str, torch.Tensor] | None = None,
                   layer_io: Any = None, offload_activations: bool = False,
                   batch_calibration: bool = True, max_padding: float | None = None) -> CompressionReport:
    """Compress ``model`` in place according to ``recipe``; see the module docstring.

    ``held_masks`` ({module name: bool mask, True = pruned}) are sparsity masks of an earlier
    compression pass (e.g. 2:4 pruning before a fine-tuning stage): quantization keeps those
    positions at zero, as it does for a mask pruned in the same pass.

    ``calibration``: list of {"input_ids": LongTensor[1, T], "attention_mask": LongTensor[1, T]}
    (may be empty/None when ``recipe.needs_calibration`` is false). Raises ``JobCancelled`` when
    ``should_stop()`` turns true between layers, ``UnsupportedModelError`` for models without a
    decoder layer list, ``RecipeError`` when a modifier targets nothing or something outside the
    decoder layers, ``SparsityPatternError`` if a 2:4 weight loses its pattern.
    ``calibrate_all_experts``: every MoE expert's statistics see every token (the layer output
    still uses the router's choice); otherwise an expert sees the tokens routed to it, and one that
    got fewer than ``min_expert_tokens`` is rounded to nearest / pruned by magnitude (a fallback).
    ``layer_io`` (:class:`compression.model_io.streaming.StreamedModel`): the decoder layers live on
    disk; ``layer_io.load(index, layer, device)`` brings one in instead of ``layer.to(device)`` and
    ``layer_io.done(index, layer, report)`` writes its compressed tensors and releases it instead of
    ``layer.to(home)``.
    ``offload_activations``: the calibration activations stay in host memory and each batch visits
    ``device`` for its layer call (a device too small for them all); refused (``calibration.samples``)
    for recipes that replay them outside a plain layer call (KV-cache scales, AWQ/SmoothQuant, reconstruction).
    ``batch_calibration``: run samples through each layer in batches (padded ones where
    :func:`padded_batching` allows); False runs every sample alone (the reference the batched
    statistics equal up to float rounding). ``max_padding``: the largest fraction of pad positions in
    a padded batch (default: ``MAX_PADDING`` on an accelerator, no padded batches on a CPU).
    """
    disable_tf32()
    if torch.device(device).type == "cpu" or offload_activations:
        map_large_blocks()  # the layers' large host temporaries do not fragment the heap (host peak)
    started = time.perf_counter()
    prefix, layers = decoder_layers(model)
    names = CheckpointNames.for_model(model)
    unfuse_experts(model, names)
    check_targets(model, recipe, prefix, names)
    sparsities = _listed_sparsities(model, recipe, prefix, names)
    head_plans = _head_plans(model, recipe, prefix, names)
    if head_plans and layer_io is not None:
        raise RecipeError(f"{head_plans[0].steps[0][0]}.ignore", f"{head_plans[0].name} is compressed after the "
                          "decoder layers, which a model streamed from disk cannot do; add it to ignore (or use "
                          "streaming: never)")
    if layer_io is not None and any(m.owl is not None for m in recipe.modifiers):
        raise RecipeError(_owl_path(recipe), "OWL measures every layer of the dense model before pruning; a "
                          "model streamed from disk layer by layer cannot run it (use streaming: never)")
    calibration = list(calibration or [])
    if offload_activations and not offloadable(recipe):
        raise RecipeError("calibration.samples", "the calibration activations do not fit the device and this "
                          "recipe (KV-cache scales, AWQ/SmoothQuant or reconstruction) cannot keep them in host "
                          "memory; use fewer or shorter calibration samples")
    if recipe.needs_calibration and not calibration:
        raise CalibrationError("this recipe needs calibration samples (GPTQ, pruning, AWQ/SmoothQuant, static "
                               "activation scales, KV-cache scales or the imatrix_mse observer)")
    report = CompressionReport(layers=len(layers), samples=len(calibration),
                               routers=[names.checkpoint(r) for r in router_weight_names(model)],
                               calibrate_all_experts=calibrate_all_experts)
    emit = progress or (lambda event: None)
    home = next(model.parameters()).device
    storage = next(model.parameters()).dtype
    wide = compute_dtype(model, device)
    use_model_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    experts = [m for _, m in per_expert_modules(model)]
    report.experts = sum(m.num_experts for m in experts)
    try:
        for m in experts:
            m.calibrate_all_experts = calibrate_all_experts
        why_not, batch_tokens, max_padding = batching_plan(model, recipe, device, batch_calibration, max_padding)
        inputs = (capture_layer_inputs(model, layers, calibration, "cpu" if offload_activations else device,
                                       padding=why_not is None, batch_tokens=batch_tokens, max_padding=max_padding)
                  if recipe.needs_calibration else LayerInputs([], []))
        if inputs:
            report.layer_batches = len(inputs.batches())
            report.batching = ("padded batches" if why_not is None else
                               ("one sample per call" if batch_tokens <= 0 else "equal-length samples batched")
                               + f" ({why_not})")
            log.info("calibration: %d samples in %d batches per layer: %s", len(calibration), report.layer_batches,
                     report.batching)
        if offload_activations:
            inputs.compute_device = device
        if wide is not None and inputs:
            inputs = inputs.cast(wide)
        inputs.consolidate()  # one buffer, written over by each layer's outputs (LayerInputs.forward in_place)
        release_heap()  # the captured per-sample copies are gone
        # the dense model's activation stream (layer-wise reconstruction, target "dense"); only kept when
        # a layer needs it: it holds a second copy of the calibration activations
        dense_inputs = inputs if _keeps_dense_stream(recipe) else None
        if inputs and any(m.owl is not None for m in recipe.modifiers):
            sparsities.update(_owl_sparsities(model, recipe, prefix, layers, names, inputs, device, wide, home,
                                              storage, emit))
        for index, layer in enumerate(layers):
            layer_start = time.perf_counter()
            if layer_io is None:
                layer.to(device, dtype=wide) if wide is not None else layer.to(device)
            else:
                layer_io.load(index, layer, device)
                if wide is not None:
                    layer.to(dtype=wide)
            plans = _plan_layer(recipe, f"{prefix}.{index}", layer, names, root=model, sparsities=sparsities)
            if inputs and any(m.transforms for m in recipe.modifiers):
                from compression.algorithms.smoothing import smooth_layer

                smooth_layer(recipe, f"{prefix}.{index}", layer, inputs, report, emit, index, len(layers))
            kv = _KVRecorder(recipe.kv_cache, f"{prefix}.{index}", layer) if recipe.kv_cache is not None else None
            if kv is not None and kv.attention is None and _other_mixer(layer):
                kv = None  # a hybrid model's linear-attention / state-space layer: it keeps no K/V to quantize
            stats = _collect_statistics(layer, index, plans, inputs, kv=kv)
            if kv is not None and inputs:
                layer_kv = kv.scales()
                report.kv_scales.update(layer_kv)
                from compression.algorithms.kvcache import attach_all

                report.hooks.extend(attach_all(model, layer_kv))  # FP8 K/V from here on, like a deployment
            _expert_fallbacks(layer, plans, stats, min_expert_tokens)
            recon = _reconstruction_settings(plans) if inputs else None
            rounding = _autoround_settings(plans) if inputs else None
            # the dense layer's outputs, taken before it is compressed: on the dense stream whenever it is kept
            # (every layer advances it, fitted or not), else on the compressed model's inputs for AutoRound
            fit_layer = recon is not None and recon.target == "layer"
            dense_out = (layer_outputs(layer, (dense_inputs or inputs).pairs(index))
                         if dense_inputs is not None or rounding or (recon and not fit_layer) else None)
            targets = layer_outputs(layer, inputs.pairs(index)) if fit_layer else dense_out
            masks = {p.name: held_masks[p.name].to(device) for p in plans if p.name in (held_masks or {})}
            staged = recon is not None or rounding is not None  # pruning first, then the layer-level fit
            for plan in plans:
                _compress_module(plan, stats.get(plan.name, {}), report, emit, index, len(layers), device,
                                 masks=masks, only=_is_sparsity if staged else None, storage_dtype=storage)
            if recon:
                _reconstruct(layer, plans, masks, inputs.pairs(index), targets, recon, report, emit, index,
                             len(layers), should_stop)
            tuned = (_autoround(layer, plans, masks, inputs.pairs(index), dense_out, rounding, report, emit, index,
                                len(layers), storage, should_stop) if rounding else None)
            if dense_inputs is not None:
                dense_inputs = dense_inputs.advanced(dense_out)
            if staged:
                for plan in plans:
                    _compress_module(plan, stats.get(plan.name, {}), report, emit, index, len(layers), device,
                                     masks=masks, only=lambda m: not _is_sparsity(m), storage_dtype=storage,
                                     tuned=tuned)
            for plan in plans:
                record = report.modules[plan.name]
                if record.input_activations is not None:
                    report.hooks.append(_attach_activation_quant(
                        plan.module, record.input_activations, record.input_scale, record.input_zero_point,
                        record.input_global_scale))
            del stats
            if inputs and (index + 1 < len(layers) or head_plans):  # the outputs feed the next layer / the head
                # the outputs overwrite the inputs batch by batch (unless the dense stream is this very
                # object): one set of calibration activations is held, not two
                inputs = inputs.advanced(inputs.forward(layer, index, in_place=inputs is not dense_inputs))
            layer.to(home, dtype=storage) if wide is not None else layer.to(home)
            if layer_io is not None:
                layer_io.done(index, layer, report)
            else:
                release_heap()  # the layer's activations and solver temporaries are freed; give them back
            # layer-end events carry no "module" key (the pipeline uses that to tell them apart)
            emit({"stage": "compress", "layer": index, "layers": len(layers),
                  "seconds": time.perf_counter() - layer_start, "memory_mb": _memory_mb(device),
                  "message": f"layer {index + 1}/{len(layers)} done"})
            if should_stop is not None and should_stop():
                raise JobCancelled(f"cancelled after layer {index + 1}/{len(layers)}")
        if head_plans:
            _compress_head(model, prefix, head_plans, inputs, report, emit, len(layers), device, wide, home, storage)
        if recipe.kv_cache is not None and inputs and not report.kv_scales:
            raise RecipeError("kv_cache_scheme", f"no decoder layer of {type(model).__name__} has an attention KV "
                              "cache to quantize; remove kv_cache_scheme")
    finally:
        for m in experts:
            m.calibrate_all_experts = False
        if use_model_cache is not None:
            model.config.use_cache = use_model_cache
    report.seconds = time.perf_counter() - started
    if report.fallbacks:
        log.warning("%d modules fell back to round-to-nearest/magnitude: %s", len(report.fallbacks),
                    [f["module"] for f in report.fallbacks])
    return report


def _keeps_dense_stream(recipe: Recipe) -> bool:
    """Whether some layer-wise reconstruction fits the pruned layer to the dense model's own stream
    (or AutoRound tunes the quantized layer against it)."""
    return any(m.autoround is not None or m.prunes and m.reconstruction is not None and m.reconstruction.target == "dense"
               for m in recipe.modifiers)


def _compress_head(model, prefix: str, plans: list[_Plan], inputs: LayerInputs, report: CompressionReport,
                   emit: Progress, layers: int, device, wide, home, storage) -> None:
    """The LM head (targeted when ``ignore`` leaves it out): its inputs are the last decoder layer's
    outputs through the final norm; statistics, compression and activation hooks as for a layer's Linears."""
    plan = plans[0]
    _untie_head(model, plan.module)
    plan.module = model.get_submodule(plan.local)
    wrapper = _Head(_final_norm(model, prefix), plan.module)
    wrapper.to(device, dtype=wide) if wide is not None else wrapper.to(device)
    stats = _collect_statistics(wrapper, layers - 1, plans, inputs)
    _compress_module(plan, stats.get(plan.name, {}), report, emit, layers - 1, layers, device, storage_dtype=storage)
    record = report.modules[plan.name]
    if record.input_activations is not None:
        report.hooks.append(_attach_activation_quant(plan.module, record.input_activations, record.input_scale,
                                                     record.input_zero_point, record.input_global_scale))
    wrapper.to(home, dtype=storage) if wide is not None else wrapper.to(home)


def _owl_path(recipe: Recipe) -> str:
    k = next(k for k, m in enumerate(recipe.modifiers) if m.owl is not None)
    return f"{_modifier_path(recipe, k)}.sparsity_profile"


def _listed_sparsities(model: torch.nn.Module, recipe: Recipe, prefix: str,
                       names: CheckpointNames) -> dict[tuple[int, str], float]:
    """{(id(modifier), Linear name): sparsity} for pruning modifiers given one sparsity per target:
    llm-compressor pairs the list with the modules its targets match, in model order (a Linear takes
    the value of the first, outermost target module holding it); the lengths must agree."""
    out: dict[tuple[int, str], float] = {}
    for k, m in enumerate(recipe.modifiers):
        if not m.prunes or m.sparsity_list is None:
            continue
        found = [names.checkpoint(n) for n, mod in model.named_modules()
                 if n and matches_any(m.targets, names.checkpoint(n), class_names(mod))]
        if len(found) != len(m.sparsity_list):
            raise RecipeError(f"{_modifier_path(recipe, k)}.sparsity",
                              f"{len(m.sparsity_list)} sparsities for {len(found)} modules matched by targets "
                              f"{m.targets} (e.g. {', '.join(found[:3]) or 'none'}); give one per module")
        for name, module in _linears(model):
            cname = names.checkpoint(name)
            i = next((i for i, t in enumerate(found) if cname == t or cname.startswith(t + ".")), None)
            if i is not None:
                out[(id(m), cname)] = m.sparsity_list[i]
    return out


@torch.no_grad()
def _owl_sparsities(model, recipe: Recipe, prefix: str, layers, names: CheckpointNames, inputs: LayerInputs,
                    device, wide, home, storage, emit: Progress) -> dict[tuple[int, str], float]:
    """OWL (outlier-weighted layer-wise sparsity, llm-compressor's ``sparsity_profile: owl``): one pass
    of the calibration data through the dense model; per decoder layer, the share of the scores
    |W_ij| · ‖X_j‖₂ (every Linear of the layer) above ``owl_m`` × their mean is the layer's outlier
    ratio r; ratios are scaled to [0, 2·owl_lmbda] and a layer's sparsity is s - (r - mean r), so
    layers with more outliers are pruned less and the mean sparsity stays s."""
    stream = inputs
    scores: list[torch.Tensor] = []
    for index, layer in enumerate(layers):
        layer.to(device, dtype=wide) if wide is not None else layer.to(device)
        norms: dict[str, torch.Tensor] = {}
        handles = []
        for local, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                def hook(mod, args, out, local=local):
                    n = valid_rows(args[0].detach())[0].float().pow(2).sum(0).sqrt()  # token rows only
                    norms[local] = norms[local] + n if local in norms else n
                handles.append(module.register_forward_hook(hook))
        try:
            outputs = stream.forward(layer, index)
        finally:
            for h in handles:
                h.remove()
        z = [(layer.get_submodule(local).weight.detach().float().abs() * n.unsqueeze(0)).flatten().cpu()
             for local, n in norms.items()]
        scores.append(torch.cat(z) if z else torch.zeros(1))
        if index + 1 < len(layers):
            stream = stream.advanced(outputs)
        layer.to(home, dtype=storage) if wide is not None else layer.to(home)
        emit({"stage": "compress", "layer": index, "layers": len(layers), "kind": "owl",
              "message": f"OWL: outlier scores of layer {index + 1}/{len(layers)}"})
    out: dict[tuple[int, str], float] = {}
    for m in recipe.modifiers:
        if m.owl is None:
            continue
        owl_m, lmbda = m.owl
        ratios = torch.tensor([100.0 * float((z > z.mean() * owl_m).float().mean()) for z in scores])
        spread = float(ratios.max() - ratios.min())
        ratios = (ratios - ratios.min()) * (2 * lmbda / spread) if spread > 0 else torch.zeros_like(ratios)
        per_layer = [1.0 - (float(r - ratios.mean()) + (1.0 - m.sparsity)) for r in ratios]
        for index, layer in enumerate(layers):
            for local, _ in _linears(layer):
                out[(id(m), names.checkpoint(f"{prefix}.{index}.{local}"))] = per_layer[index]
    return out


def _batch_dependent(recipe: Recipe) -> bool:
    """Whether a layer's output depends on which samples share its call: dynamic per-tensor
    activation scales (one scale over the whole call's tokens)."""
    return any(g.input_activations is not None and g.input_activations.dynamic is True
               and g.input_activations.strategy == "tensor"
               for m in recipe.modifiers if m.quantizes for g in m.config_groups.values())


def padded_batching(model: torch.nn.Module, recipe: Recipe) -> str | None:
    """None when samples of different lengths can share a layer call as a right-padded batch with
    every statistic exact, else why not (those samples then run one per call)."""
    if per_expert_modules(model) or router_names(model) or any(is_fused_experts(m) for m in model.modules()):
        return "MoE experts: pad tokens would be routed into the expert statistics"
    if any(m.prunes and m.reconstruction is not None for m in recipe.modifiers):
        return "layer-wise reconstruction fits one sample at a time"
    if any(m.autoround is not None for m in recipe.modifiers):
        return "AutoRound draws its batches from single samples"
    if _batch_dependent(recipe):
        return "dynamic per-tensor activation scales depend on the batch"
    return None


def batching_plan(model: torch.nn.Module, recipe: Recipe, device: torch.device | str, batch_calibration: bool = True,
                  max_padding: float | None = None) -> tuple[str | None, int, float]:
    """(why samples run without padded batches, or None; tokens per layer call, 0 = one sample per
    call; the padding bound) for :func:`compress_model`."""
    why_not = padded_batching(model, recipe) if batch_calibration else "batching turned off"
    if why_not is None and max_padding is None and torch.device(device).type == "cpu":
        why_not = "a CPU: pad positions cost more time than fewer layer calls save"
    batch_tokens = (BATCH_TOKENS if batch_calibration and not _batch_dependent(recipe)
                    and not any(m.autoround is not None for m in recipe.modifiers) else 0)
    return why_not, batch_tokens, MAX_PADDING if max_padding is None else max_padding


def _expert_fallbacks(layer: torch.nn.Module, plans: list[_Plan], stats: dict[str, dict], min_tokens: int) -> None:
    """Mark the plans of experts whose statistics saw fewer than ``min_tokens`` calibration tokens.

    Their weights get round-to-nearest (no GPTQ) / magnitude pruning (no SparseGPT), and a static
    input scale is the largest one of the same projection among this layer's other experts.
    """
    by_local = {p.local: p for p in plans}
    for path, experts in per_expert_modules(layer):
        seen = [experts.seen_tokens(e) for e in range(experts.num_experts)]
        for e, tokens in enumerate(seen):
            if tokens >= min_tokens:
                continue
            for proj in experts.expert(e).names:
                plan = by_local.get(f"{path}.{e}.{proj}")
                if plan is None:
                    continue
                plan.fallback = (f"expert {e} received {tokens} calibration tokens (< {min_tokens}): "
                                 "round-to-nearest weights / magnitude pruning, without GPTQ/SparseGPT compensation")
                entry = stats.get(plan.name, {})
                entry.pop("hessian", None)
                if "absmax" in entry:
                    peers = [stats[p.name]["absmax"] for k in range(len(seen)) if k != e and seen[k] >= min_tokens
                             and (p := by_local.get(f"{path}.{k}.{proj}")) is not None and "absmax" in stats.get(p.name, {})]
                    if peers:
                        entry["absmax"] = torch.stack(peers).amax()
                        plan.fallback += "; static input scale from the layer's other experts"
        experts.reset_counts()


def _other_mixer(layer: torch.nn.Module) -> bool:
    """Whether a decoder layer mixes tokens with something other than attention (Qwen3-Next's
    ``linear_attn``, Jamba's ``mamba``): hybrid models interleave such layers with attention layers."""
    return any(n.split(".")[-1] in ("linear_attn", "mamba", "mixer", "conv", "ssm") for n, _ in layer.named_modules())


class _KVRecorder:
    """A stand-in for the layer's KV cache during the statistics pass: the attention hands it the
    key/value states (after RoPE, as vLLM caches them) and it records their absmax."""

    def __init__(self, kv_args: QuantArgs | None, prefix: str, layer: torch.nn.Module):
        self.args, self.prefix = kv_args, prefix
        self.key_absmax = self.value_absmax = None
        self.attention = next((n for n, m in layer.named_modules() if n.split(".")[-1] in (
            "self_attn", "attention", "attn", "self_attention")), None)

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        # [batch, kv heads, tokens, head dim]: one absmax per tensor, or per KV head ("attn_head")
        per_head = self.args is not None and self.args.strategy == "attn_head"
        k, v = _token_absmax(key_states, per_head), _token_absmax(value_states, per_head)
        self.key_absmax = k if self.key_absmax is None else torch.maximum(self.key_absmax, k)
        self.value_absmax = v if self.value_absmax is None else torch.maximum(self.value_absmax, v)
        return key_states, value_states

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0

    def scales(self) -> dict[str, torch.Tensor]:
        prefix = self.prefix
        if self.key_absmax is None or self.attention is None:
            raise RecipeError("kv_cache_scheme", f"{prefix} never wrote a KV cache during calibration: this "
                              "model has no attention KV cache to quantize; remove kv_cache_scheme")
        from compression.algorithms.quant import FP8_MAX

        tiny = torch.finfo(torch.float32).tiny
        shape = (-1, 1, 1) if self.args.strategy == "attn_head" else (1,)  # compressed-tensors' [heads, 1, 1]
        return {f"{prefix}.{self.attention}.k_scale": (self.key_absmax.clamp_min(tiny) / FP8_MAX).reshape(shape).cpu(),
                f"{prefix}.{self.attention}.v_scale": (self.value_absmax.clamp_min(tiny) / FP8_MAX).reshape(shape).cpu()}


def _token_absmax(states: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """max |x| of key/value states ``[B, kv heads, T, D]`` over the tokens of the call (the pad
    positions of a padded batch left out): one value, or with ``per_head`` one per KV head."""
    states = states.detach().abs()
    mask = token_mask()
    if mask is not None:
        if states.dim() != 4 or tuple(states.shape[:1] + states.shape[2:3]) != tuple(mask.shape):
            from compression.model_io.walk import PaddingMismatch

            raise PaddingMismatch(f"key/value states of shape {tuple(states.shape)} in a padded batch of shape "
                                  f"{tuple(mask.shape)} are not laid out [batch, heads, tokens, head dim]")
        states = states.masked_fill(~mask[:, None, :, None].to(states.device), 0)
    return (states.amax(dim=(0, 2, 3)) if per_head else states.amax()).float()


class _StatisticsDone(Exception):
    """Raised by the statistics hook of the module that runs last in a layer call."""


def _collect_statistics(layer: torch.nn.Module, index: int, plans: list[_Plan],
                        inputs: LayerInputs, kv: "_KVRecorder | None" = None) -> dict[str, dict]:
    """Run every sample through the (still uncompressed) layer; hooks record H and input ranges,
    and (kv_cache_scheme) a recorder standing in for the KV cache sees the key/value states."""
    for _, experts in per_expert_modules(layer):
        experts.reset_counts()
    wanted = [p for p in plans if p.needs_hessian or p.needs_absmax or p.needs_importance]
    want_kv = kv is not None and kv.args is not None
    if (not wanted and not want_kv) or not inputs:
        return {}
    stats: dict[str, dict] = {}
    # One Hessian per distinct input tensor: q/k/v (and gate/up) receive the very same tensor, so
    # the first of them accumulates it and the others adopt that accumulator. The inputs of the
    # current layer call are held here (so no id is reused) and dropped when the call ends.
    call_inputs: dict[int, tuple[torch.Tensor, list[HessianAccumulator]]] = {}
    # The rest of a layer call after its last statistic is not needed (in a dense layer, the down
    # projection and the residual): once the first call has shown every hooked module running exactly
    # once, later calls stop after the one that ran last. Not with a KV-cache recorder or MoE experts
    # (their counts), where the layer's own forward order decides what runs.
    order: list[int] = []  # hooked modules in the order they ran in this call
    last: list[int | None] = [None]  # the module that ends a call, once known
    early = kv is None and not per_expert_modules(layer)

    def start(*_):
        call_inputs.clear()
        order.clear()

    def end(*_):
        call_inputs.clear()
        if early and last[0] is None and sorted(order) == sorted(id(p.module) for p in wanted):
            last[0] = order[-1]

    handles = [layer.register_forward_pre_hook(start), layer.register_forward_hook(end)]
    for plan in wanted:
        entry: dict[str, Any] = {}
        if plan.needs_hessian:
            entry["hessian"] = HessianAccumulator(plan.module.in_features, plan.module.weight.device)
        if plan.needs_importance:
            entry["squares"] = torch.zeros(plan.module.in_features, device=plan.module.weight.device)
        if plan.needs_absmax:
            entry["absmax"] = torch.zeros((), device=plan.module.weight.device)
            entry["lo"] = torch.zeros((), device=plan.module.weight.device)  # zero-point schemes
            entry["hi"] = torch.zeros((), device=plan.module.weight.device)
        stats[plan.name] = entry

        def hook(mod, args, entry=entry):
            x = args[0]
            if "hessian" in entry:
                _add_shared(entry, x, call_inputs)
            rows = valid_rows(x.detach())[0] if "squares" in entry or "absmax" in entry else None
            if "squares" in entry:  # Σ x² per input channel over the token rows (E[x²] up to a constant)
                entry["squares"] += rows.float().pow(2).sum(0)
            if "absmax" in entry:
                entry["absmax"] = torch.maximum(entry["absmax"], rows.abs().amax().float())
                entry["lo"] = torch.minimum(entry["lo"], rows.amin().float())
                entry["hi"] = torch.maximum(entry["hi"], rows.amax().float())
            order.append(id(mod))
            if last[0] == id(mod):
                raise _StatisticsDone

        handles.append(plan.module.register_forward_pre_hook(hook))

    def run(*args, **kwargs):
        try:
            return layer(*args, **kwargs)
        except _StatisticsDone:
            call_inputs.clear()
            return None
    try:
        inputs.forward(run, index, extra=None if kv is None else {kv_cache_parameter(layer): kv}, keep=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def _add_shared(entry: dict, x: torch.Tensor, call_inputs: dict) -> None:
    """Feed ``x`` to the module's Hessian once per layer call; a module whose first input is a tensor
    another module already fed adopts that module's accumulator (q/k/v, gate/up)."""
    _, fed = call_inputs.setdefault(id(x), (x, []))
    acc = entry["hessian"]
    if acc.samples == 0 and fed and not entry.get("fed"):
        acc = entry["hessian"] = fed[0]
        acc.shared = True
    entry["fed"] = True
    if any(a is acc for a in fed):
        return
    if getattr(acc, "shared", False) and any(a is acc for key, (_, other) in call_inputs.items()
                                             if key != id(x) for a in other):
        raise RuntimeError("modules that shared an input tensor received different inputs in one layer call")
    rows, sequences = valid_rows(x)  # a padded batch: its pad rows left out, its samples counted
    acc.add(rows, sequences=sequences)
    fed.append(acc)


def _input_qparams(record: ModuleRecord, acts: QuantArgs | None, stats: dict, name: str,
                   dtype: torch.dtype) -> None:
    """Static input scale / zero point, or NVFP4's global input scale, from the observed input range."""
    if acts is None or (acts.dynamic and not acts.has_global_scale):
        return
    if "absmax" not in stats:
        raise CalibrationError(f"{name}: static activation scales need calibration samples")
    # "absmax" may come from the layer's other experts (an under-used expert's fallback)
    absmax = stats["absmax"].float().reshape(1)
    lo, hi = stats.get("lo", -absmax).float().reshape(1), stats.get("hi", absmax).float().reshape(1)
    if acts.has_global_scale:
        record.input_global_scale = fp4_global_scale(absmax).cpu()
        return
    tiny = torch.finfo(torch.float32).tiny
    if acts.symmetric:
        lo, hi = -absmax, absmax.clamp_min(tiny)
    scale, zp = qparams_from_range(lo, hi.clamp_min(tiny), acts, torch.float32)
    record.input_scale = scale.reshape(1).to(dtype).cpu()
    record.input_zero_point = None if zp is None else zp.reshape(1).cpu()


def offloadable(recipe: Recipe) -> bool:
    """Whether ``compress_model(offload_activations=True)`` can run ``recipe``: every use of the
    activations is a plain layer call (no KV-cache recorder, smoothing or reconstruction replay)."""
    return recipe.kv_cache is None and not any(
        m.transforms or m.owl is not None or (m.kind == "SparseGPTModifier" and m.reconstruction is not None)
        or m.autoround is not None for m in recipe.modifiers)


def compute_dtype(model: torch.nn.Module, device: torch.device | str) -> torch.dtype | None:
    """The dtype a layer is calibrated and compressed in when it differs from the model's: float32 for
    a 16-bit model on a CPU without native matmul for that dtype (on an AVX2 CPU a bf16 decoder layer
    runs ~3x slower than float32; AMX / AVX512-BF16 CPUs run bf16 natively), None elsewhere. One layer
    at a time is widened, so host memory stays that of the 16-bit model."""
    dtype = next(model.parameters()).dtype
    if torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16) \
            and not cpu_has_native(dtype):
        return torch.float32
    return None


def _compress_module(plan: _Plan, stats: dict, report: CompressionReport, emit: Progress,
                     index: int, layers: int, device: torch.device | str, *,
                     masks: dict[str, torch.Tensor] | None = None,
                     only: Callable[[Modifier], bool] | None = None, storage_dtype: torch.dtype | None = None,
                     tuned: dict[str, QuantResult] | None = None) -> None:
    """Run the plan's steps (those ``only`` accepts) on one Linear; a pruning mask is kept in ``masks``.

    The layer may compute in a wider dtype than the model stores (``storage_dtype``, see
    :func:`compute_dtype`): scales are made in the storage dtype and every written weight is rounded
    through it, so the later layers calibrate on exactly the weights the checkpoint holds."""
    module = plan.module
    compute = module.weight.dtype
    dtype = storage_dtype or compute

    def stored(weight: torch.Tensor) -> torch.Tensor:
        return weight.to(dtype).to(compute)
    record = report.modules.setdefault(plan.name, ModuleRecord(plan.name, tuple(module.weight.shape)))
    hessian = stats["hessian"].hessian if "hessian" in stats else None
    inverses = stats["hessian"].inverses if "hessian" in stats else None  # shared by the modules sharing H
    masks = {} if masks is None else masks
    mask = masks.get(plan.name)
    for path, modifier, group in plan.steps:
        if only is not None and not only(modifier):
            continue
        t0 = time.perf_counter()
        weight = module.weight.data
        sparsity = plan.sparsity.get(id(modifier), modifier.sparsity)
        if modifier.prunes and hessian is None:
            result = magnitude_prune(weight, sparsity=sparsity, mask_structure=modifier.mask_structure)
            _store_weight(module, stored(result.weight))
            mask = masks[plan.name] = result.mask
            record.mask_structure, record.sparsity = modifier.mask_structure, result.sparsity
            loss, fallback, kind = result.loss, plan.fallback, "magnitude"
        elif modifier.kind == "WandaPruningModifier":
            result = wanda_prune(weight, hessian, sparsity=sparsity, mask_structure=modifier.mask_structure)
            _store_weight(module, stored(result.weight))
            mask = masks[plan.name] = result.mask
            record.mask_structure, record.sparsity = modifier.mask_structure, result.sparsity
            loss, fallback, kind = result.loss, None, "wanda"
        elif modifier.kind == "SparseGPTModifier":
            result = sparsegpt_prune(weight, hessian, sparsity=sparsity,
                                     mask_structure=modifier.mask_structure, block_size=modifier.block_size,
                                     dampening_frac=modifier.dampening_frac,
                                     preserve=(weight == 0) if modifier.preserve_sparsity_mask else None,
                                     inverses=inverses)
            _store_weight(module, stored(result.weight))
            mask = masks[plan.name] = result.mask
            record.mask_structure, record.sparsity = modifier.mask_structure, result.sparsity
            loss, fallback, record.dead_columns = result.loss, result.fallback, result.dead_columns
            kind = "sparsegpt"
        else:
            args = group.weights
            record.weights, record.input_activations = args, group.input_activations
            if modifier.kind == "AutoRoundModifier" and tuned is not None and plan.name in tuned:
                result = tuned[plan.name]
                loss, fallback, kind = result.loss, None, "autoround"
            elif modifier.kind == "GPTQModifier" and hessian is not None:
                result = gptq_quantize(weight, hessian, args, block_size=modifier.block_size,
                                       dampening_frac=modifier.dampening_frac,
                                       actorder=args.actorder or modifier.actorder, mask=mask, scale_dtype=dtype,
                                       full_range=modifier.full_range_grid(group),
                                       inverses=inverses)
                loss, fallback = result.loss, result.fallback
                record.dead_columns = max(record.dead_columns, result.dead_columns)
                kind = "gptq"
            elif plan.clip and hessian is not None:
                result = clip_quantize(weight, hessian, args, dtype, mask)
                loss, fallback, kind = quadratic_loss(result.weight.float() - weight.float(), hessian), None, "awq-clip"
            else:
                importance = None
                if args.observer == "imatrix_mse":  # E[x²] per input channel, up to a constant
                    importance = stats["squares"] if "squares" in stats else (
                        torch.diag(hessian) if hessian is not None else None)
                    if args.observer_kwargs.get("strict") and usable_importance(importance, weight.shape[1]) is None:
                        raise CalibrationError(f"{plan.name}: the imatrix_mse observer (strict: true) has no usable "
                                               "activation statistics for it (it saw no calibration tokens)",
                                               field=_group_field(path, modifier, group,
                                                                  "weights.observer_kwargs.strict"))
                result = quantize_weight(weight, args, dtype, mask, importance=importance)
                loss = quadratic_loss(result.weight.float() - weight.float(), hessian) if hessian is not None else float(
                    torch.mean((result.weight.float() - weight.float()) ** 2))
                fallback, kind = (plan.fallback if modifier.kind == "GPTQModifier" else None), "rtn"
            _store_weight(module, stored(result.weight))
            record.codes, record.scale = result.codes.cpu(), result.scale.cpu()
            record.zero_point = None if result.zero_point is None else result.zero_point.cpu()
            record.global_scale = None if result.global_scale is None else result.global_scale.cpu()
            record.g_idx = None if result.g_idx is None else result.g_idx.cpu()
            _input_qparams(record, group.input_activations, stats, plan.name, dtype)
        if fallback and fallback != record.fallback:
            record.fallback = fallback if not record.fallback else f"{record.fallback}; {fallback}"
        record.losses[kind] = loss
        if mask is not None and record.mask_structure == "2:4" and not is_24_sparse(module.weight.data):
            raise SparsityPatternError(f"{plan.name} lost its 2:4 pattern after {modifier.kind} ({path})")
        emit({"stage": "compress", "layer": index, "layers": layers, "module": plan.local, "loss": loss,
              "seconds": time.perf_counter() - t0, "memory_mb": _memory_mb(device),
              "message": f"{modifier.kind} {plan.local}" + (f" (fallback: {fallback})" if fallback else "")})


def _store_weight(module: torch.nn.Module, new: torch.Tensor) -> None:
    """Write a compressed weight into the parameter's own storage where shape, dtype and device agree.

    Assigning a new tensor would leave the loaded one's memory in place: transformers maps a
    safetensors file privately and each tensor's pages stay resident until every tensor of the
    file is freed, so a model compressed in memory would hold two copies of every weight until the
    job ends. Not for a view into a larger storage (unfused experts, tied slices): that is replaced."""
    old = module.weight.data
    if (old.shape == new.shape and old.dtype == new.dtype and old.device == new.device and old.is_contiguous()
            and old.untyped_storage().nbytes() == old.numel() * old.element_size()):
        if new.data_ptr() != old.data_ptr():
            old.copy_(new)
    else:
        module.weight.data = new


# layer-wise reconstruction (compression/algorithms/reconstruction.py) -----------------------------------------
def _is_sparsity(modifier: Modifier) -> bool:
    return modifier.prunes


def _reconstruction_settings(plans: list[_Plan]) -> ReconstructionSettings | None:
    """The reconstruction option of the SparseGPTModifier that prunes this layer (first one wins)."""
    for plan in plans:
        for _, modifier, _ in plan.steps:
            if _is_sparsity(modifier) and modifier.reconstruction is not None:
                return modifier.reconstruction
    return None


def _reconstruct(layer, plans, masks, inputs, targets, settings, report, emit, index, layers, should_stop) -> None:
    weights = {plan.name: (plan.module, masks[plan.name]) for plan in plans if plan.name in masks}
    if not weights:
        return
    result = reconstruct_layer(layer, inputs, targets, weights, settings, should_stop=should_stop)
    for name, (module, _) in weights.items():
        record = report.modules[name]
        if record.mask_structure == "2:4" and not is_24_sparse(module.weight.data):
            raise SparsityPatternError(f"{name} lost its 2:4 pattern in layer-wise reconstruction")
    report.reconstruction[index] = result.to_dict()
    emit(_fit_event("reconstruction", index, layers, (result.error_before, result.error_after),
                    (result.relative_before, result.relative_after), result.steps, result.seconds, result.kept,
                    f"reconstruction: output MSE {result.error_before:.4g} → {result.error_after:.4g} "
                    f"({result.steps} Adam steps, lr {settings.lr:g})"
                    + ("" if result.kept else "; no gain, pruned weights kept")))


def _fit_event(kind: str, index: int, layers: int, errors: tuple[float, float], relative: tuple[float, float],
               steps: int, seconds: float, kept: bool, message: str) -> dict:
    """The progress event of a layer-level fit (reconstruction, AutoRound): output error before / after."""
    return {"stage": "compress", "kind": kind, "layer": index, "layers": layers,
            "error_before": errors[0], "error_after": errors[1], "relative_before": relative[0],
            "relative_after": relative[1], "steps": steps, "seconds": seconds, "kept": kept,
            "message": f"layer {index + 1}/{layers} {message}"}


# AutoRound (compression/algorithms/autoround.py) ----------------------------------------------------------
def _autoround_settings(plans: list[_Plan]) -> AutoRoundSettings | None:
    """The settings of the AutoRoundModifier that quantizes this layer (first one wins)."""
    for plan in plans:
        for _, modifier, _ in plan.steps:
            if modifier.autoround is not None:
                return modifier.autoround
    return None


def _autoround(layer, plans, masks, inputs, targets, settings, report, emit, index, layers, storage,
               should_stop) -> dict[str, QuantResult]:
    """Tune every Linear of the layer an AutoRoundModifier quantizes, together; {checkpoint name: result}."""
    chosen = {plan.local: (plan, group) for plan in plans for _, m, group in plan.steps if m.autoround is not None}
    modules = {local: (plan.module, group.weights, masks.get(plan.name)) for local, (plan, group) in chosen.items()}
    results, summary = autoround_layer(layer, inputs, targets, modules, settings, storage=storage,
                                       should_stop=should_stop)
    report.autoround[index] = summary.to_dict()
    emit(_fit_event("autoround", index, layers, (summary.error_rtn, summary.error_tuned),
                    (summary.relative_rtn, summary.relative_tuned), summary.iters, summary.seconds, summary.kept,
                    f"AutoRound: output MSE {summary.error_rtn:.4g} (round-to-nearest) → {summary.error_tuned:.4g} "
                    f"({summary.iters} sign-SGD steps, best at {summary.best_iter})"
                    + ("" if summary.kept else "; no gain, round-to-nearest kept")))
    return {chosen[local][0].name: result for local, result in results.items()}


def sparsity_masks(model: torch.nn.Module, report: CompressionReport, *,
                   by_module: bool = False) -> dict[str, torch.Tensor]:
    """{name: weight == 0} of every Linear ``report`` pruned (the masks a later pass must hold), keyed
    by the report's (checkpoint) name, or with ``by_module`` by the module path in ``model``."""
    names = CheckpointNames.for_model(model)
    modules = dict(model.named_modules())
    out = {}
    for name, record in report.modules.items():
        path = names.module(name)
        module = modules.get(path) or modules.get(name)
        if record.sparsity is not None and module is not None:
            out[(path if path in modules else name) if by_module else name] = (module.weight.data == 0).cpu()
    return out


def merge_reports(first: CompressionReport, second: CompressionReport) -> CompressionReport:
    """One report for two passes over the same model (prune, fine-tune, then quantize): the second
    pass's records keep the first pass's sparsity, losses and fallbacks."""
    merged = CompressionReport(layers=max(first.layers, second.layers), samples=max(first.samples, second.samples),
                               seconds=first.seconds + second.seconds, hooks=second.hooks,
                               reconstruction={**first.reconstruction, **second.reconstruction})
    for name in list(first.modules) + [n for n in second.modules if n not in first.modules]:
        a, b = first.modules.get(name), second.modules.get(name)
        if a is None or b is None:
            merged.modules[name] = a or b
            continue
        b.mask_structure, b.sparsity = a.mask_structure, a.sparsity
        b.dead_columns = max(a.dead_columns, b.dead_columns)
        b.losses = {**a.losses, **b.losses}
        b.fallback = "; ".join(f for f in (a.fallback, b.fallback) if f) or None
        merged.modules[name] = b
    return merged
