"""The one recipe schema: presets, llm-compressor-style YAML, validation with field paths.

A recipe is an ordered list of stages, each an ordered list of modifiers
(``QuantizationModifier``, ``GPTQModifier``, ``SparseGPTModifier``). YAML looks like
llm-compressor's::

    sparsity_stage:
      sparsity_modifiers:
        SparseGPTModifier: {sparsity: 0.5, mask_structure: "2:4", targets: [Linear], ignore: [lm_head]}
    quant_stage:
      quant_modifiers:
        GPTQModifier: {scheme: W4A16, targets: [Linear], ignore: [lm_head]}

Unknown modifiers and unknown fields are errors (``RecipeError`` with the dotted path).
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import regex
import yaml

from compression.errors import RecipeError
from compression.algorithms.quant import QuantArgs, clippable, uses_full_range
from compression.algorithms.distill import MODIFIER as FINETUNE, FinetuneSettings, parse_settings as _parse_finetune
from compression.algorithms.reconstruction import LIMITS as RECON_LIMITS, LR_RANGE, OPTIMIZERS, TARGETS, ReconstructionSettings
from compression.algorithms import autoround as _autoround
from compression.algorithms.awq import clips_module

__all__ = ["PRESETS", "Modifier", "Recipe", "RecipeError", "SchemeGroup", "SCHEME_PRESETS"]

PRESETS: dict[str, str] = {
    "FP8_DYNAMIC": "FP8 E4M3 weights per output channel (MSE scales), FP8 per-token dynamic activations; no calibration",
    "FP8": "FP8 E4M3 per-tensor weights and static per-tensor activations calibrated on data",
    "W4A16": "INT4 symmetric weights with GPTQ (group 128 default, act-order static), 16-bit activations",
    "2:4": "SparseGPT 50% sparsity in the 2:4 pattern, weights stay 16-bit",
    "2:4+FP8_DYNAMIC": "SparseGPT 2:4, then FP8 per-channel weights with per-token dynamic FP8 activations",
    "2:4+W4A16": "SparseGPT 2:4, then per-channel INT4 GPTQ that keeps every pruned weight at zero",
    "W8A8": "INT8 per-channel weights with GPTQ, INT8 per-token dynamic activations",
    "W4A16_ASYM": "INT4 asymmetric weights (zero points, MSE scales) with GPTQ, group 128 default, 16-bit activations",
    "AWQ+W4A16_ASYM": "AWQ activation-aware scaling and clipping, then INT4 asymmetric group weights (group 128 default)",
    "AutoRound+W4A16": "INT4 symmetric group weights whose rounding and clipping AutoRound tunes against each "
                       "layer's dense output (200 steps per layer default)",
    "AutoRound+W4A16_ASYM": "INT4 asymmetric group weights (zero points) whose rounding and clipping AutoRound "
                            "tunes against each layer's dense output (200 steps per layer default)",
    "SQ+W8A8": "SmoothQuant (strength 0.8) moves activation outliers into weights, then INT8 W8A8 with GPTQ",
    "FP8+KV_FP8": "FP8 per-tensor weights and static activations, plus an FP8 KV cache with calibrated K/V scales",
    "FP8_BLOCK": "FP8 weights in 128x128 blocks, FP8 dynamic activations per 128-channel token group; no calibration",
    "NVFP4": "FP4 E2M1 weights and activations in groups of 16 with FP8 scales and a global scale (Blackwell)",
    "NVFP4A16": "FP4 E2M1 weights in groups of 16 with FP8 scales and a global scale, 16-bit activations",
}

_FP8_W = dict(num_bits=8, type="float", symmetric=True)
_NVFP4_W = dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                scale_dtype="float8_e4m3fn")


def _int_group(bits: int, symmetric: bool = True) -> dict:
    return dict(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=128)


def _int_token(bits: int) -> dict:
    return dict(num_bits=bits, type="int", symmetric=True, strategy="token", dynamic=True)


# compressed-tensors' preset schemes (llm-compressor 0.14's `scheme:` names), as it defines them
SCHEME_PRESETS: dict[str, dict[str, dict | None]] = {
    "W4A16": {"weights": _int_group(4), "input_activations": None},
    "W4A16_ASYM": {"weights": _int_group(4, symmetric=False), "input_activations": None},
    "W8A16": {"weights": _int_group(8), "input_activations": None},
    "W8A8": {"weights": dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
             "input_activations": _int_token(8)},
    "W4A8": {"weights": _int_group(4), "input_activations": _int_token(8)},
    "W4A4": {"weights": _int_group(4), "input_activations": _int_token(4)},
    "W4AFP8": {"weights": _int_group(4), "input_activations": dict(_FP8_W, strategy="token", dynamic=True)},
    **{f"W{b}A16": {"weights": _int_group(b), "input_activations": None} for b in (2, 3, 5, 6, 7)},
    **{f"W{b}A8": {"weights": _int_group(b), "input_activations": _int_token(8)} for b in (2, 3, 5, 6, 7)},
    **{f"W{b}A4": {"weights": _int_group(b), "input_activations": _int_token(4)} for b in (2, 3)},
    "FP8": {"weights": dict(_FP8_W, strategy="tensor"),
            "input_activations": dict(_FP8_W, strategy="tensor", dynamic=False)},
    "FP8_DYNAMIC": {"weights": dict(_FP8_W, strategy="channel"),
                    "input_activations": dict(_FP8_W, strategy="token", dynamic=True)},
    "FP8_BLOCK": {"weights": dict(_FP8_W, strategy="block", block_structure=[128, 128]),
                  "input_activations": dict(_FP8_W, strategy="group", group_size=128, dynamic=True)},
    "NVFP4A16": {"weights": dict(_NVFP4_W), "input_activations": None},
    "NVFP4": {"weights": dict(_NVFP4_W), "input_activations": dict(_NVFP4_W, dynamic="local")},
    "UNQUANTIZED": {"weights": None, "input_activations": None},
}
SCHEME_ALIASES = {"INT8": "W8A8"}
_MX = dict(type="float", symmetric=True, strategy="group", group_size=32, scale_dtype="uint8")
SCHEME_PRESETS.update({
    "MXFP4A16": {"weights": dict(_MX, num_bits=4), "input_activations": None},
    "MXFP4": {"weights": dict(_MX, num_bits=4), "input_activations": dict(_MX, num_bits=4, dynamic=True)},
    "MXFP4XFP8": {"weights": dict(_MX, num_bits=4),
                  "input_activations": dict(_FP8_W, strategy="group", group_size=128, dynamic=True)},
    "MXFP8A16": {"weights": dict(_MX, num_bits=8), "input_activations": None},
    "MXFP8": {"weights": dict(_MX, num_bits=8), "input_activations": dict(_MX, num_bits=8, dynamic=True)},
})
# compressed-tensors presets this engine does not implement, with the reason (refused by name)
UNSUPPORTED_SCHEMES = {
    name: "FP6 (E2M3) values are not implemented by this engine; use MXFP8, MXFP4 or NVFP4"
    for name in ("MXFP6A16", "MXFP6A8")}
KV_CACHE_FIELDS = {"num_bits", "type", "symmetric", "strategy", "dynamic", "group_size", "observer",
                   "observer_kwargs", "scale_dtype", "zp_dtype", "block_structure", "actorder"}

IGNORED_TOP_LEVEL = ("args", "metadata", "version")
# llm-compressor's Modifier base fields: a training schedule (start/end/update), bookkeeping (index,
# group) and the serializer's requires_calibration_data. One-shot compression applies each modifier
# once, in recipe order, whatever they say; they are kept for the round trip.
BASE_FIELDS = {"index", "group", "start", "end", "update", "requires_calibration_data"}
SCHEDULE_NOTE = ("start/end/update/index are training-schedule fields; one-shot compression applies each "
                 "modifier once, in recipe order (as llm-compressor's oneshot does)")
_QUANT_MIXIN = {"targets", "ignore", "scheme", "config_groups", "kv_cache_scheme", "weight_observer",
                "input_observer", "output_observer", "observer", "bypass_divisibility_checks"}
_SMOOTHQUANT = {"smoothing_strength", "mappings", "ignore", "num_calibration_steps", "calibration_function",
                "algorithm"}
MODIFIER_FIELDS = {
    "QuantizationModifier": set(_QUANT_MIXIN),
    # (plus full_range, the engine's: compression.algorithms.gptq.gptq_quantize)
    "GPTQModifier": _QUANT_MIXIN | {"block_size", "dampening_frac", "actorder", "batched_quantization",
                                    "sequential_targets", "offload_hessians", "full_range"},
    "SparseGPTModifier": {"targets", "ignore", "sparsity", "mask_structure", "block_size", "dampening_frac",
                          "preserve_sparsity_mask", "sequential_targets", "offload_hessians", "sequential_update",
                          "sparsity_profile", "owl_m", "owl_lmbda"},
    # llm-compressor's SparsityModifierBase fields; Wanda scores |W|·‖X‖ and updates no weights
    "WandaPruningModifier": {"targets", "ignore", "sparsity", "mask_structure", "sequential_update",
                             "sparsity_profile", "owl_m", "owl_lmbda"},
    # (plus apply_clip, the engine's: AWQ's weight clipping, compression.algorithms.awq.clip_quantize)
    "AWQModifier": {"mappings", "duo_scaling", "n_grid", "offload_device", "ignore", "sequential_targets",
                    "apply_clip"},
    # llm-compressor 0.14's AutoRoundModifier fields, plus AutoRound's own minmax_lr, enable_minmax_tuning
    # and seed, and full_range (compression.algorithms.autoround)
    "AutoRoundModifier": _QUANT_MIXIN | {"iters", "batch_size", "lr", "minmax_lr", "enable_minmax_tuning", "seed",
                                         "full_range",
                                         "enable_torch_compile", "device_ids", "disable_opt_rtn",
                                         "sequential_targets"},
    "SmoothQuantModifier": set(_SMOOTHQUANT),
    # llm-compressor 0.14 keeps it as an alias of SmoothQuantModifier(algorithm="log_equalization")
    "LogarithmicEqualizationModifier": set(_SMOOTHQUANT),
}
MODIFIER_FIELDS["SparseGPTModifier"] = MODIFIER_FIELDS["SparseGPTModifier"] | {"reconstruction"}
for _kind in MODIFIER_FIELDS:
    MODIFIER_FIELDS[_kind] |= BASE_FIELDS
MODIFIER_FIELDS[FINETUNE] = set(FinetuneSettings.__dataclass_fields__)  # its own stage; see compression.algorithms.distill
TRANSFORMS = ("AWQModifier", "SmoothQuantModifier", "LogarithmicEqualizationModifier")
QUANTIZERS = ("QuantizationModifier", "GPTQModifier", "AutoRoundModifier")
PRUNERS = ("SparseGPTModifier", "WandaPruningModifier")
# llm-compressor 0.14 modifiers this engine does not run, with the reason (refused by name)
UNSUPPORTED_MODIFIERS = {
    "MagnitudePruningModifier": "gradual magnitude pruning needs a training loop; use SparseGPTModifier",
    "ConstantPruningModifier": "it holds masks during training; one-shot compression has no training loop",
    "QuIPModifier": "QuIP rotations (transform_config) are not implemented",
    "SpinQuantModifier": "SpinQuant rotations (transform_config) are not implemented",
    "REAPPruningModifier": "REAP expert pruning is not implemented",
}
ARGS_FIELDS = {"num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "actorder",
               "observer", "observer_kwargs", "block_structure", "scale_dtype", "zp_dtype"}
OBSERVERS = {"minmax": "minmax", "static_minmax": "minmax", "memoryless_minmax": "minmax",
             "memoryless": "minmax", "mse": "mse", "memoryless_mse": "mse",
             # llm-compressor 0.14: the importance-weighted MSE search (E[x²] per input channel) and the NVFP4
             # "range expansion" variants, which search from 1.8x the observed range down to 0.8x
             "imatrix_mse": "imatrix_mse", "nvfp4_expanded_mse": "mse", "fouroversix": "mse",
             "nvfp4_expanded_imatrix": "imatrix_mse"}
_EXPANDED = {"expand": 1.8, "maxshrink": 1 - 0.8 / 1.8, "grid": 200.0, "patience": 1000}
# the search settings a named observer implies (llm-compressor's defaults for it), under the recipe's own kwargs
OBSERVER_PRESETS = {"nvfp4_expanded_mse": _EXPANDED, "fouroversix": _EXPANDED,
                    "nvfp4_expanded_imatrix": {**_EXPANDED, "norm": 2.4}}
OBSERVER_KWARGS = {"maxshrink", "grid", "norm", "patience", "averaging_constant", "expand", "strict",
                   "triton_error_buffer"}
TRITON_BUFFER_NOTE = ("observer_kwargs.triton_error_buffer has no effect here: it tunes llm-compressor's Triton "
                      "search kernel's early stop; this engine's search runs every group to the same patience")
OBSERVER_KWARG_MAX = {"grid": 1000, "norm": 16, "expand": 16, "averaging_constant": 1, "patience": 100_000,
                      "triton_error_buffer": 100}
INPUT_OBSERVER_NOTE = ("static input-activation scales here always come from the calibration inputs' min/max range "
                       "(an MSE or imatrix input observer searches nothing for them)")
SCALE_DTYPES = ("float8_e4m3fn", "float16", "bfloat16", "float32")
# sequential_targets: the engine always works one decoder layer at a time, so only the decoder
# layer classes of the supported families are honoured (anything else is refused).
DECODER_LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                         "Qwen2MoeDecoderLayer", "Qwen3MoeDecoderLayer", "MixtralDecoderLayer",
                         "Gemma2DecoderLayer", "Gemma3DecoderLayer", "Phi3DecoderLayer")
GROUP_FIELDS = {"targets", "weights", "input_activations", "output_activations", "format"}
PRESET_GROUP_SIZES = (32, 64, 128)
_NOTES: set[str] = set()  # filled while one recipe is parsed (see Recipe.from_dict), then moved to .notes


@dataclass
class SchemeGroup:
    """One ``config_groups`` entry: which modules, and how their weights/activations are quantized."""

    targets: list[str]
    weights: QuantArgs | None
    input_activations: QuantArgs | None = None

    def to_dict(self) -> dict:
        return {"targets": list(self.targets),
                "weights": self.weights.to_dict() if self.weights else None,
                "input_activations": self.input_activations.to_dict() if self.input_activations else None,
                "output_activations": None}


@dataclass
class Modifier:
    """One modifier of a stage; ``kind`` is the llm-compressor class name."""

    kind: str
    targets: list[str] = field(default_factory=lambda: ["Linear"])
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    config_groups: dict[str, SchemeGroup] = field(default_factory=dict)
    block_size: int = 128
    dampening_frac: float = 0.01
    actorder: str | None = None
    sparsity: float = 0.5
    mask_structure: str = "2:4"
    reconstruction: ReconstructionSettings | None = None  # SparseGPTModifier: layer-wise fit after pruning
    finetune: FinetuneSettings | None = None  # DistillationFinetuneModifier's arguments
    autoround: "_autoround.AutoRoundSettings | None" = None  # AutoRoundModifier's tuning options
    kv_cache: QuantArgs | None = None  # kv_cache_scheme: FP8 per-tensor K/V scales
    preserve_sparsity_mask: bool = False
    sequential_targets: list[str] | None = None
    inherits_scheme: bool = False  # GPTQModifier without a scheme: the preceding QuantizationModifier's
    superseded_by: "Modifier | None" = field(default=None, repr=False, compare=False)  # that QM: GPTQ solves
    extra: dict = field(default_factory=dict)  # accepted options kept for the round trip (see _parse_extra)
    group_key: str | None = None  # the stage's '<x>_modifiers' key holding it, when not the stage's first
    mappings: list | None = None  # AWQ: [{smooth_layer, balance_layers}], SmoothQuant: [[balance], smooth]
    duo_scaling: bool | str = True
    n_grid: int = 20
    apply_clip: bool = True  # AWQModifier: AWQ's clipping search for the weights a later QuantizationModifier rounds
    apply_clip_given: bool = False  # AWQModifier: apply_clip was written in the recipe
    smoothing_strength: float = 0.5
    algorithm: str = "smoothquant"  # SmoothQuant's scales, or "log_equalization" (s = r / log2(2 + r))
    sparsity_list: list[float] | None = None  # SparseGPT: one sparsity per target module (in model order)
    owl: tuple[float, float] | None = None  # SparseGPT sparsity_profile "owl": (owl_m, owl_lmbda)
    full_range: bool = True  # GPTQModifier: full-range scales for symmetric integer weight-only groups / channels
    full_range_given: bool = False  # GPTQModifier: full_range was written in the recipe
    actorder_given: bool = False  # GPTQModifier: actorder was set (llm-compressor refuses a clash with a group's)
    lm_head_defaulted: bool = False  # ignore was not given and the targets reach lm_head (see _default_ignore)

    @property
    def quantizes(self) -> bool:
        return self.kind in QUANTIZERS

    @property
    def transforms(self) -> bool:
        return self.kind in TRANSFORMS

    @property
    def prunes(self) -> bool:
        return self.kind in PRUNERS

    def matches(self, name: str, class_name: str, ancestors: tuple = ()) -> bool:
        """Whether this modifier applies to the Linear ``name``: its targets match it and its ignore does
        not. A pruning modifier's targets may also name a module containing it (``ancestors``: (name,
        class name) pairs), as llm-compressor's ``targets: ["re:model.layers.\\d+$"]`` prunes every
        Linear inside those layers."""
        if matches_any(self.ignore, name, class_name):
            return False
        if matches_any(self.targets, name, class_name):
            return True
        return self.prunes and any(matches_any(self.targets, a, c) for a, c in ancestors)

    def scheme_for(self, name: str, class_name: str) -> SchemeGroup | None:
        """The config group whose targets match this module (first match wins)."""
        for group in self.config_groups.values():
            if matches_any(group.targets, name, class_name):
                return group
        return None

    def full_range_grid(self, group: SchemeGroup) -> bool:
        """Whether this modifier puts ``group``'s weights on the full-range symmetric integer grid
        (:func:`compression.algorithms.quant.full_range_scale`): GPTQ with its ``full_range`` option, for the
        weight-only schemes :func:`~compression.algorithms.quant.uses_full_range` accepts; AutoRound with its
        own ``full_range`` setting, for any symmetric integer weights (``autoround._Tuned``)."""
        w = group.weights
        if w is None:
            return False
        if self.kind == "GPTQModifier":
            return self.full_range and group.input_activations is None and uses_full_range(w)
        if self.autoround is not None:
            return self.autoround.full_range and w.type == "int" and w.symmetric
        return False

    def to_dict(self) -> dict:
        if self.finetune is not None:
            return self.finetune.to_dict()
        if self.transforms:
            return _transform_dict(self)
        out: dict[str, Any] = {"targets": list(self.targets), "ignore": list(self.ignore)}
        if self.quantizes and not self.inherits_scheme and self.config_groups:
            out["config_groups"] = {k: g.to_dict() for k, g in self.config_groups.items()}
        if self.kv_cache is not None:
            out["kv_cache_scheme"] = self.kv_cache.to_dict()
        if self.preserve_sparsity_mask:
            out["preserve_sparsity_mask"] = True
        if self.sequential_targets:
            out["sequential_targets"] = list(self.sequential_targets)
        out.update(copy.deepcopy(self.extra))
        if self.kind in ("GPTQModifier", "SparseGPTModifier"):
            out["block_size"] = self.block_size
            out["dampening_frac"] = self.dampening_frac
        if self.kind == "GPTQModifier":
            out["actorder"] = self.actorder
            if not self.full_range:  # the engine's option; written only when off (llm-compressor has no such field)
                out["full_range"] = False
        if self.autoround is not None:
            out.update({k: v for k, v in self.autoround.to_dict().items() if k != "compute"})
        if self.prunes:
            out["sparsity"] = list(self.sparsity_list) if self.sparsity_list is not None else self.sparsity
            out["mask_structure"] = self.mask_structure
            if self.owl is not None:
                out.update(sparsity_profile="owl", owl_m=self.owl[0], owl_lmbda=self.owl[1])
            if self.reconstruction is not None:
                out["reconstruction"] = self.reconstruction.to_dict()
        return out


@dataclass
class Stage:
    name: str
    group: str  # the "<x>_modifiers" key under the stage
    modifiers: list[Modifier]


def matches_any(patterns: list[str], name: str | tuple[str, ...], class_name: str | tuple[str, ...]) -> bool:
    """compressed-tensors target matching: a class name (``class_name``: one, or every class a module is
    an instance of, :func:`class_names`), an exact module name, or ``re:<regex>``. ``name``: the module's
    checkpoint name, or (checkpoint name, module path) where the two differ (:func:`module_names`)."""
    classes = (class_name,) if isinstance(class_name, str) else class_name
    names = (name,) if isinstance(name, str) else name
    for pattern in patterns:
        if pattern.startswith("re:"):
            if any(pattern_matches(pattern[3:], n) for n in names):
                return True
        elif pattern in names or pattern in classes:
            return True
    return False


def module_names(checkpoint_name: str, module_path: str, *, head: bool = False) -> str | tuple[str, ...]:
    """What recipe patterns are matched against: the checkpoint name (what vLLM and our export use) and,
    where it differs, the module path in the loaded transformers model (what llm-compressor matches: a
    multimodal model's ``model.language_model.layers.0...`` and ``lm_head`` against its checkpoint's
    ``language_model.model.layers.0...`` and ``language_model.lm_head``). The output head (``head``) also
    answers to ``lm_head`` wherever it sits (Llama 4's ``language_model.lm_head``)."""
    names = tuple(dict.fromkeys((checkpoint_name, module_path) + (("lm_head",) if head else ())))
    return names[0] if len(names) == 1 else names


def outside_decoder_message(name: str, decoder_prefix: str) -> str:
    """The refusal for a targeted Linear outside the decoder layers, with the ``ignore`` entry that leaves out
    its whole container (a vision tower, a projector) rather than that one Linear."""
    parts, ours = name.split("."), decoder_prefix.split(".")
    common = 0
    while common < len(parts) - 1 and common < len(ours) and parts[common] == ours[common]:
        common += 1
    container = ".".join(parts[:common + 1])
    hint = name if container == name else f"re:{container}.*"
    return (f"{name} lies outside the decoder layers and cannot be compressed; add {hint!r} to ignore "
            "(the presets leave out everything outside the language model's decoder layers)")


def class_names(module: Any) -> tuple[str, ...]:
    """The names of every module class ``module`` is an instance of, most derived first: as in
    compressed-tensors, ``Linear`` matches a subclass of ``nn.Linear`` (Falcon's ``FalconLinear``) and vLLM's
    ``LinearBase``."""
    import torch

    names = [c.__name__ for c in type(module).__mro__ if isinstance(c, type) and issubclass(c, torch.nn.Module)]
    if "LinearBase" in names and "Linear" not in names:
        names.append("Linear")
    return tuple(names)


# -- bounded pattern matching ---------------------------------------------------------------------
# `re:` patterns come from users and run against module names inside a web request (pre-flight) and
# in the worker. Python's `re` backtracks without limit (one pattern held a request for 32 s), so
# they are short, matched with the `regex` engine under a per-match timeout, and, inside
# `pattern_time_budget`, under a total budget too: the time spent matching, not the wall clock of the
# block (building a 235B MoE's meta skeleton on a busy host must not use up the patterns' budget).
MAX_PATTERN_CHARS = 256
PATTERN_MATCH_TIMEOUT_S = 0.05
_pattern_budget: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("pattern_budget", default=None)
T = TypeVar("T")


class PatternTooSlow(RecipeError):
    def __init__(self, pattern: str):
        super().__init__("recipe", f"the pattern 're:{pattern}' takes too long to match module names "
                                   "(nested repetition?); use a simpler pattern or list the module names")


@functools.lru_cache(maxsize=512)
def _compiled_pattern(pattern: str) -> Any:
    return regex.compile(pattern)


def bounded_match(pattern: str, run: Callable[[float], T], limit: float) -> T:
    """``run(timeout)`` -- a `regex` call given ``timeout`` seconds -- with the timeout capped by what is left
    of the current `pattern_time_budget`, whose remainder it is charged; PatternTooSlow when it runs out."""
    budget = _pattern_budget.get()
    timeout = limit if budget is None else min(limit, budget[0])
    if timeout <= 0:
        raise PatternTooSlow(pattern)
    started = time.monotonic()
    try:
        return run(timeout)
    except TimeoutError:
        raise PatternTooSlow(pattern) from None
    finally:
        if budget is not None:
            budget[0] -= time.monotonic() - started


def pattern_matches(pattern: str, name: str) -> bool:
    """``re.match(pattern, name)``, but never longer than PATTERN_MATCH_TIMEOUT_S (nor past what is left
    of the current `pattern_time_budget`); a pattern that needs more raises PatternTooSlow."""
    compiled = _compiled_pattern(pattern)
    return bounded_match(pattern, lambda timeout: compiled.match(name, timeout=timeout) is not None,
                         PATTERN_MATCH_TIMEOUT_S)


@contextlib.contextmanager
def pattern_time_budget(seconds: float) -> Iterator[None]:
    """All pattern matching inside the block together may take at most ``seconds`` (of matching)."""
    token = _pattern_budget.set([seconds])
    try:
        yield
    finally:
        _pattern_budget.reset(token)


def check_pattern(value: str, path: str) -> None:
    """A ``re:`` target: short, and valid for both Python's `re` (what vLLM and compressed-tensors
    will use on the exported config) and `regex` (what we match with)."""
    body = value[3:]
    if len(body) > MAX_PATTERN_CHARS:
        raise RecipeError(path, f"a 're:' pattern may have at most {MAX_PATTERN_CHARS} characters")
    try:
        re.compile(body)
        _compiled_pattern(body)
    except (re.error, regex.error, RecursionError, OverflowError) as exc:
        raise RecipeError(path, f"bad regular expression {value!r}: {exc}") from None


class Recipe:
    """An ordered list of stages of modifiers. Build with ``from_preset``/``from_yaml``/``from_dict``."""

    def __init__(self, stages: list[Stage], preset: str | None = None, preset_options: dict | None = None):
        self.stages = stages
        self.preset = preset
        self.preset_options = dict(preset_options or {})
        self.notes: list[str] = []  # how accepted llm-compressor options were mapped (shown in describe())

    # constructors -----------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **options: Any) -> "Recipe":
        """A preset recipe; options: group_size, actorder, dampening_frac, block_size, ignore."""
        if name not in PRESETS:
            raise RecipeError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict(_preset_stages(name, options), preset=name, preset_options=options)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        return cls.from_dict(load_recipe_yaml(text))

    @classmethod
    def from_dict(cls, data: Any, *, preset: str | None = None, preset_options: dict | None = None) -> "Recipe":
        """Parse an llm-compressor stage dict, or our ``to_dict()`` form ({preset, preset_options, stages})."""
        check_shape(data)
        if isinstance(data, dict) and isinstance(data.get("stages"), dict) and set(data) <= {
                "preset", "preset_options", "stages"}:
            preset, preset_options = data.get("preset"), data.get("preset_options") or {}
            if preset is not None and preset not in PRESETS:
                raise RecipeError("preset", f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
            data = data["stages"]
        if not isinstance(data, dict) or not data:
            raise RecipeError("recipe", "must be a mapping of stages, e.g. quant_stage: {quant_modifiers: {...}}")
        stages: list[Stage] = []
        _NOTES.clear()
        index = 0
        for stage_name, body in data.items():
            if stage_name in IGNORED_TOP_LEVEL or not isinstance(body, dict):
                # llm-compressor 0.14 reads only '<name>_stage' mappings and ignores every other key
                _NOTES.add(f"top-level key {stage_name!r} ignored (it holds no modifiers; llm-compressor "
                           "ignores it too)")
                continue
            path = f"stages[{index}]"
            groups = [(str(k), v) for k, v in body.items() if str(k).endswith("_modifiers")]
            for key, value in body.items():
                if str(key).endswith("_modifiers"):
                    if not isinstance(value, dict) or not value:
                        raise RecipeError(f"{path}.{key}", "must be a mapping {ModifierName: {...}}")
                elif isinstance(value, (dict, list)):
                    raise RecipeError(f"{path}.{key}", f"stage {stage_name!r}: expected '<name>_modifiers: "
                                      "{ModifierName: {...}}' mappings; this entry is neither that nor a setting")
                else:
                    _NOTES.add(f"stage setting {key}: {value} has no effect: every stage runs one-shot, in "
                               "recipe order (as llm-compressor's oneshot does)")
            if not groups:
                raise RecipeError(path, f"stage {stage_name!r} must hold a '<name>_modifiers' mapping, e.g. "
                                  "quant_modifiers: {GPTQModifier: {...}}")
            modifiers = []
            for group_name, mods in groups:
                for kind, args in mods.items():
                    mpath = f"{path}.modifiers[{len(modifiers)}]"
                    parsed = [_parse_modifier(k, a, mpath) for k, a in _split_legacy_awq(kind, args)]
                    for m in parsed:
                        m.group_key = group_name if group_name != groups[0][0] else None
                        modifiers.append(m)
            modifiers = _prune_before_quantize(modifiers, str(stage_name))
            stages.append(Stage(str(stage_name), groups[0][0], modifiers))
            index += 1
        if not stages:
            raise RecipeError("recipe", "holds no stage; write e.g. quant_stage: {quant_modifiers: {...}}")
        recipe = cls(stages, preset=preset, preset_options=preset_options)
        recipe._validate_order()
        recipe.notes = sorted(_NOTES)
        _NOTES.clear()
        return recipe

    # outputs ----------------------------------------------------------------------------
    def stage_dict(self) -> dict:
        out: dict[str, dict] = {}
        for s in self.stages:
            groups = out.setdefault(s.name, {})
            for m in s.modifiers:
                groups.setdefault(m.group_key or s.group, {})[m.kind] = m.to_dict()
        return out

    def to_dict(self) -> dict:
        return {"preset": self.preset, "preset_options": copy.deepcopy(self.preset_options),
                "stages": self.stage_dict()}

    def to_yaml(self) -> str:
        header = f"# Compressor preset: {self.preset} {self.preset_options or ''}\n" if self.preset else ""
        return header + yaml.safe_dump(self.stage_dict(), sort_keys=False)

    # queries ----------------------------------------------------------------------------
    @property
    def modifiers(self) -> list[Modifier]:
        return [m for s in self.stages for m in s.modifiers]

    def awq_clip(self, quantizer: Modifier, weights: QuantArgs | None, name: str | None = None) -> bool:
        """Whether AWQ's weight clipping (``AWQModifier.apply_clip``) chooses the ranges of ``weights`` that
        ``quantizer`` rounds (in the Linear ``name``, when given): an earlier AWQModifier asks for it,
        ``quantizer`` is a QuantizationModifier (GPTQ and AutoRound choose their own roundings), the scheme
        is one :func:`~compression.algorithms.quant.clippable` accepts, and the module is not a query / key
        projection (:func:`compression.algorithms.awq.clips_module`). Read by the pipeline, the preflight
        and the card."""
        if quantizer.kind != "QuantizationModifier" or weights is None or not clippable(weights):
            return False
        if name is not None and not clips_module(name):
            return False
        for m in self.modifiers:
            if m is quantizer:
                return False
            if m.kind == "AWQModifier" and m.apply_clip:
                return True
        return False

    def awq_clipped(self, awq: Modifier) -> bool:
        """Whether the clipping of ``awq`` (an AWQModifier) reaches any scheme of a later modifier."""
        position = next((i for i, m in enumerate(self.modifiers) if m is awq), len(self.modifiers))
        return awq.apply_clip and any(self.awq_clip(q, g.weights) for q in self.modifiers[position + 1:]
                                      if q.quantizes for g in q.config_groups.values())

    @property
    def needs_calibration(self) -> bool:
        for m in self.modifiers:
            if (m.kind == "GPTQModifier" or (m.autoround is not None and m.autoround.iters > 0) or m.prunes
                    or m.transforms or m.kv_cache is not None):
                return True
            if any(g.input_activations and (not g.input_activations.dynamic or g.input_activations.has_global_scale)
                   for g in m.config_groups.values()):
                return True
            if any(g.weights is not None and g.weights.observer == "imatrix_mse" for g in m.config_groups.values()):
                return True  # the importance-weighted observer reads E[x²] of each input channel
        return False

    def describe(self) -> str:
        parts = []
        for m in self.modifiers:
            if m.finetune is not None:
                parts.append(m.finetune.describe())
                continue
            if m.kind == "AWQModifier":
                parts.append(f"AWQ scaling (duo_scaling {m.duo_scaling}, {m.n_grid}-point grid"
                             + (", weight clipping" if m.apply_clip and self.awq_clipped(m) else "") + ")")
                continue
            if m.transforms and m.algorithm == "log_equalization":
                parts.append("logarithmic activation equalization")
                continue
            if m.transforms:
                parts.append(f"SmoothQuant (strength {m.smoothing_strength:g})")
                continue
            if m.kv_cache is not None:
                parts.append("FP8 KV cache (" + ("per-head" if m.kv_cache.strategy == "attn_head" else "per-tensor")
                             + " K/V scales)")
            if m.superseded_by is not None:
                continue  # its scheme is solved by the GPTQModifier that follows
            if m.prunes:
                how = "SparseGPT" if m.kind == "SparseGPTModifier" else "Wanda"
                amount = ("per-layer sparsities" if m.sparsity_list else
                          f"{m.sparsity:.0%}" + (" (OWL per-layer)" if m.owl else ""))
                parts.append((f"{how} {m.mask_structure} ({m.sparsity:.0%})" if m.mask_structure != "0:0"
                              else f"{how} unstructured {amount}")
                             + (" + layer-wise reconstruction" if m.reconstruction else ""))
                continue
            for g in m.config_groups.values():
                parts.append(("GPTQ " if m.kind == "GPTQModifier" else
                              f"AutoRound ({m.autoround.iters} iters) " if m.autoround is not None else "")
                             + _describe_group(g, m))
        text = " → ".join(parts) + "".join(f" [{n}]" for n in self.notes)
        return f"{self.preset}: {text}" if self.preset else text

    def _validate_finetune(self) -> None:
        _validate_finetune_order(self)

    def __repr__(self) -> str:
        return f"Recipe({self.describe()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()

    def _validate_order(self) -> None:
        self._validate_finetune()
        seen_quant = False
        last_quant: Modifier | None = None
        flat = [(f"stages[{i}].modifiers[{j}]", m) for i, stage in enumerate(self.stages)
                for j, m in enumerate(stage.modifiers)]
        for k, (path, m) in enumerate(flat):
            if m.quantizes:
                if m.inherits_scheme:
                    _inherit_scheme(m, last_quant, path)
                seen_quant = True
                last_quant = m
            elif seen_quant and m.prunes:
                raise RecipeError(path, f"{m.kind} must come before quantization modifiers "
                                  "(pruning quantized weights would move them off the grid)")
            elif seen_quant and m.transforms and m.mappings is None:
                # with explicit mappings the engine checks, per layer, that none of the modules it
                # rescales was quantized by an earlier modifier (compression.algorithms.smoothing)
                raise RecipeError(path, f"{m.kind} after a quantization modifier needs explicit 'mappings' "
                                  "that leave the modules quantized before it alone (its default mappings "
                                  "rescale every projection); or move it before the quantization modifiers")
            if m.kind == "AWQModifier" and m.apply_clip and m.apply_clip_given and not self.awq_clipped(m):
                _NOTES.add(APPLY_CLIP_NOTE)
            if m.kind == "AWQModifier" and not any(q.quantizes and q.config_groups for _, q in flat[k + 1:]):
                raise RecipeError(path, "AWQModifier only rescales weights for a quantization scheme: add a "
                                  "QuantizationModifier or GPTQModifier after it")
        for path, m in flat:
            source = next((q for _, q in flat if q.superseded_by is m), None) if m.inherits_scheme else None
            if m.lm_head_defaulted and (source is None or source.lm_head_defaulted):
                _NOTES.add(LM_HEAD_NOTE)  # (a GPTQModifier reusing a scheme reuses its ignore list too)
            if m.kind == "QuantizationModifier" and m.superseded_by is None and any(
                    g.weights is not None and g.weights.actorder for g in m.config_groups.values()):
                _NOTES.add(ACTORDER_RTN_NOTE)
        kv = [m for m in self.modifiers if m.kv_cache is not None]
        if len(kv) > 1 and any(k.kv_cache != kv[0].kv_cache for k in kv):
            raise RecipeError("kv_cache_scheme", "two modifiers set different kv_cache_scheme values; set it once")

    @property
    def kv_cache(self) -> QuantArgs | None:
        """The recipe's kv_cache_scheme (FP8 per-tensor K/V scales), if any."""
        return next((m.kv_cache for m in self.modifiers if m.kv_cache is not None), None)


def _inherit_scheme(m: Modifier, source: Modifier | None, path: str) -> None:
    """GPTQModifier without a scheme reuses the preceding QuantizationModifier's (llm-compressor
    applies the earlier scheme to the modules and GPTQ then solves for them)."""
    if source is None or not source.config_groups:
        raise RecipeError(path, "GPTQModifier needs 'scheme' or 'config_groups' (or a preceding "
                          "QuantizationModifier whose scheme it reuses)")
    m.config_groups = {k: SchemeGroup(list(g.targets), g.weights, g.input_activations)
                       for k, g in source.config_groups.items()}
    if source.kind == "QuantizationModifier":
        source.superseded_by = m
    if not m.targets or m.targets == ["Linear"]:
        m.targets = list(source.targets)
    m.ignore = list(dict.fromkeys(list(m.ignore) + list(source.ignore)))
    _check_groups(m, path)


def _finetune_modifier(args: dict, path: str) -> Modifier:
    """A DistillationFinetuneModifier: no targets of its own (it trains the whole decoder, mask held)."""
    return Modifier(FINETUNE, targets=[], ignore=[], finetune=_parse_finetune(args, path))


def finetune_split(recipe: "Recipe") -> tuple["Recipe | None", Modifier | None, "Recipe | None"]:
    """(stages before the fine-tune stage, its modifier, stages after) — (recipe, None, None) without one."""
    for i, stage in enumerate(recipe.stages):
        if stage.modifiers[0].kind == FINETUNE:
            before = Recipe(recipe.stages[:i]) if i else None
            after = Recipe(recipe.stages[i + 1:]) if i + 1 < len(recipe.stages) else None
            return before, stage.modifiers[0], after
    return recipe, None, None


def _prune_before_quantize(modifiers: list["Modifier"], stage: str) -> list["Modifier"]:
    """One stage listing a pruning modifier after a quantizing one (llm-compressor's own test recipes do,
    e.g. ``GPTQModifier`` then ``SparseGPTModifier``): the pruning modifiers move, in their order, to just
    before the first quantizing modifier, and a note says so. Pruning already quantized weights would
    move the kept ones off the grid; masked GPTQ after pruning keeps both. Across stages the order
    stays the user's (and :meth:`Recipe._validate_order` refuses prune-after-quantize there)."""
    first = next((i for i, m in enumerate(modifiers) if m.quantizes), len(modifiers))
    late = [m for m in modifiers[first + 1:] if m.prunes]
    if not late:
        return modifiers
    quant = modifiers[first]
    _NOTES.add(f"stage {stage!r}: {', '.join(m.kind for m in late)} listed after {quant.kind} runs before it "
               "(prune, then quantize with the mask held)")
    rest = [m for m in modifiers if not any(m is x for x in late)]
    return rest[:first] + late + rest[first:]


def _validate_finetune_order(recipe: "Recipe") -> None:
    """A fine-tune stage: its own stage, once, after a sparsity modifier and before any quantization."""
    seen_sparsity = seen_quant = found = False
    for i, stage in enumerate(recipe.stages):
        for j, m in enumerate(stage.modifiers):
            path = f"stages[{i}].modifiers[{j}]"
            if m.kind != FINETUNE:
                seen_sparsity |= m.prunes
                seen_quant |= m.quantizes
                continue
            if len(stage.modifiers) != 1:
                raise RecipeError(path, f"{FINETUNE} must be the only modifier of its stage "
                                  "(e.g. finetune_stage: {finetune_modifiers: {DistillationFinetuneModifier: {...}}})")
            if found:
                raise RecipeError(path, f"only one {FINETUNE} stage per recipe")
            if not seen_sparsity:
                raise RecipeError(path, f"{FINETUNE} needs a preceding sparsity stage (SparseGPTModifier): it "
                                  "recovers the quality a pruned model lost, holding the pruning mask")
            if seen_quant:
                raise RecipeError(path, f"{FINETUNE} must come before quantization modifiers "
                                  "(training would move quantized weights off their grid)")
            found = True


def _describe_group(g: SchemeGroup, m: Modifier) -> str:
    w = g.weights
    text = "weights unquantized"
    if w:
        kind = (("MX" if w.is_mx else "NV") + "FP4" if w.is_fp4 else "MXFP8" if w.is_mx else "FP8") \
            if w.type == "float" else f"INT{w.num_bits}"
        if w.type == "int" and not w.symmetric:
            kind += " asymmetric"
        gran = (f"group {w.group_size}" if w.strategy in ("group", "tensor_group") else
                f"{w.block_structure[0]}x{w.block_structure[1]} blocks" if w.strategy == "block" else
                f"per-{w.strategy}")
        text = f"{kind} weights ({gran}"
        if m.kind == "GPTQModifier" and m.actorder:
            text += f", act-order {m.actorder}"
        if w.observer != "minmax" and m.autoround is None:
            text += ", importance-weighted MSE scales" if w.observer == "imatrix_mse" else ", MSE scales"
        text += ")"
    a = g.input_activations
    if a:
        kind = ("MX" if a.is_mx else "") + ("FP4" if a.is_fp4 else "FP8") if a.type == "float" else f"INT{a.num_bits}"
        if not a.symmetric:
            kind += " asymmetric"
        gran = f"per-{a.group_size} group" if a.strategy in ("group", "tensor_group") else f"per-{a.strategy}"
        text += f", {kind} activations ({'dynamic' if a.dynamic else 'static'} {gran})"
    else:
        text += ", 16-bit activations"
    return text


# bounded input ----------------------------------------------------------------------------
# A recipe is small: a few stages of a few modifiers, about seven levels deep. Everything it may
# hold is capped, so neither parsing it nor storing it (Job.recipe) can grow without bound.
MAX_YAML_CHARS = 100_000
MAX_DEPTH = 16
MAX_VALUES = 5_000
MAX_LIST_ITEMS = 256
MAX_NAME_CHARS = MAX_PATTERN_CHARS + 3  # "re:" + pattern
MAX_INT = 2 ** 31 - 1
MAX_RAW_STRING = 1_000  # check_shape's backstop; the parser's own limits above are tighter and name the field
MAX_RAW_LIST = 1_000


class _RecipeYamlLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader without anchors or aliases (an 18 KB file of aliases expanded into 40 MB)
    and without nesting deeper than MAX_DEPTH (its composer recurses once per level)."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            line = event.start_mark.line + 1
            raise RecipeError("recipe", f"YAML anchors and aliases (&, *) are not allowed (line {line}); "
                                        "write each value out")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise RecipeError("recipe", f"the YAML is nested more than {MAX_DEPTH} levels deep "
                                        f"(line {event.start_mark.line + 1})")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_recipe_yaml(text: str) -> Any:
    """The data of a YAML recipe, bounded (size, nesting, no aliases); errors are RecipeErrors."""
    if not isinstance(text, str):
        raise RecipeError("recipe", "must be YAML text")
    if len(text) > MAX_YAML_CHARS:
        raise RecipeError("recipe", f"the YAML is longer than {MAX_YAML_CHARS} characters")
    try:
        return yaml.load(text, Loader=_RecipeYamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise RecipeError("recipe", f"not valid YAML: {exc}") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. an integer of 5,000 digits
        raise RecipeError("recipe", f"not a usable YAML value: {exc}") from None


def check_shape(data: Any, path: str = "recipe") -> None:
    """Refuse data nested deeper than MAX_DEPTH, with more than MAX_VALUES values, lists longer than
    MAX_RAW_LIST or strings (keys included) longer than MAX_RAW_STRING. Iterative: no recursion."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    values = 0
    while stack:
        value, depth = stack.pop()
        values += 1
        if depth > MAX_DEPTH:
            raise RecipeError(path, f"nested more than {MAX_DEPTH} levels deep")
        if values > MAX_VALUES:
            raise RecipeError(path, f"holds more than {MAX_VALUES} values")
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and len(key) > MAX_RAW_STRING:
                    raise RecipeError(path, f"a key is longer than {MAX_RAW_STRING} characters")
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            if len(value) > MAX_RAW_LIST:
                raise RecipeError(path, f"a list has more than {MAX_RAW_LIST} entries")
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str) and len(value) > MAX_RAW_STRING:
            raise RecipeError(path, f"a value is longer than {MAX_RAW_STRING} characters")


# parsing ----------------------------------------------------------------------------------
def _parse_modifier(kind: Any, args: Any, path: str) -> Modifier:
    if kind in UNSUPPORTED_MODIFIERS:
        raise RecipeError(path, f"{kind} is not supported ({UNSUPPORTED_MODIFIERS[kind]}); allowed: "
                          f"{', '.join(MODIFIER_FIELDS)}")
    if kind not in MODIFIER_FIELDS:
        raise RecipeError(path, f"unknown modifier {kind!r}; allowed: {', '.join(MODIFIER_FIELDS)}")
    args = {} if args is None else args
    if not isinstance(args, dict):
        raise RecipeError(path, f"{kind} arguments must be a mapping")
    unknown = sorted(set(args) - MODIFIER_FIELDS[kind])
    if unknown:
        raise RecipeError(f"{path}.{unknown[0]}",
                          f"unknown field for {kind}; allowed: {', '.join(sorted(MODIFIER_FIELDS[kind]))}")
    if kind == FINETUNE:
        return _finetune_modifier(args, path)
    m = Modifier(kind)
    _parse_base_fields(m, args, path)
    if kind in TRANSFORMS:
        return _parse_transform(m, args, path)
    m.targets = _str_list(args.get("targets", ["Linear"]), f"{path}.targets")
    m.ignore = _default_ignore(args, m.targets, f"{path}.ignore")
    m.lm_head_defaulted = "ignore" not in args and _reaches_lm_head(m.targets)
    _parse_extra(m, args, path)
    if "block_size" in args:
        m.block_size = _int(args["block_size"], f"{path}.block_size", lo=4)
        if m.block_size % 4:
            raise RecipeError(f"{path}.block_size", "must be a multiple of 4 (2:4 groups may not straddle blocks)")
    if args.get("dampening_frac") is not None:
        m.dampening_frac = _float(args["dampening_frac"], f"{path}.dampening_frac", 0.0, 1.0)
    if kind == "GPTQModifier":
        if args.get("actorder") in ("group", "dynamic", True):
            _NOTES.add(ACTORDER_GROUP_NOTE)
        m.actorder = _actorder(args.get("actorder", "static"), f"{path}.actorder")
        m.actorder_given = "actorder" in args
        if args.get("full_range") is not None:
            m.full_range = _bool(args["full_range"], f"{path}.full_range")
            m.full_range_given = True
    if m.prunes:
        _parse_sparsity(m, args, path)
    if kind == "AutoRoundModifier":
        m.autoround = _parse_autoround(m, args, path)
    if m.quantizes:
        has_scheme, has_groups = args.get("scheme") is not None, args.get("config_groups") is not None
        if has_scheme and has_groups:
            raise RecipeError(path, f"{kind} takes one of 'scheme' or 'config_groups', not both")
        if not (has_scheme or has_groups):
            if kind == "QuantizationModifier" and args.get("kv_cache_scheme") is None:
                raise RecipeError(path, f"{kind} needs 'scheme' (a preset name: {', '.join(SCHEME_PRESETS)}), "
                                  "'config_groups' or 'kv_cache_scheme'")
            if kind == "AutoRoundModifier":
                raise RecipeError(path, "AutoRoundModifier needs 'scheme' (a preset name) or 'config_groups'")
            m.inherits_scheme = kind == "GPTQModifier"  # resolved against the preceding QuantizationModifier
        elif has_scheme:
            m.config_groups = _scheme_groups(args["scheme"], m.targets, f"{path}.scheme")
        else:
            groups = args["config_groups"]
            if not isinstance(groups, dict) or not groups:
                raise RecipeError(f"{path}.config_groups", "must be a non-empty mapping group_0: {...}")
            m.config_groups = {str(k): _parse_group(v, f"{path}.config_groups.{k}") for k, v in groups.items()}
        _apply_observers(m, args, path)
        if kind == "AutoRoundModifier" and any(g.weights is not None and g.weights.observer != "minmax"
                                               for g in m.config_groups.values()):
            _NOTES.add(AUTOROUND_OBSERVER_NOTE)
        if args.get("kv_cache_scheme") is not None:
            m.kv_cache = _parse_kv_cache(args["kv_cache_scheme"], f"{path}.kv_cache_scheme")
        _check_groups(m, path)
    return m


# llm-compressor's old AWQModifier API carried its own quantization scheme; 0.14's Python shim
# (llmcompressor.modifiers.awq.AWQModifier) splits it into AWQModifier + QuantizationModifier by these keys
LEGACY_AWQ_QUANT_KEYS = ("config_groups", "targets", "ignore", "scheme", "kv_cache_scheme", "weight_observer",
                         "input_observer", "output_observer", "observer", "bypass_divisibility_checks")
LEGACY_AWQ_NOTE = ("AWQModifier with its own scheme (llm-compressor's old API) "
                   "ran as AWQModifier + QuantizationModifier, the split llm-compressor 0.14's compatibility shim makes")


def _split_legacy_awq(kind: str, args: Any) -> list[tuple[str, Any]]:
    """[(kind, args)]: an AWQModifier holding a scheme / config_groups becomes the AWQ transform and a
    QuantizationModifier with the quantization keys (both parsed under the recipe's own path)."""
    if kind != "AWQModifier" or not isinstance(args, dict) or not any(
            args.get(k) is not None for k in ("scheme", "config_groups")):
        return [(kind, args)]
    _NOTES.add(LEGACY_AWQ_NOTE)
    quant = {k: v for k, v in args.items() if k in LEGACY_AWQ_QUANT_KEYS}
    awq = {k: v for k, v in args.items() if k not in LEGACY_AWQ_QUANT_KEYS}
    return [(kind, awq), ("QuantizationModifier", quant)]


def _parse_base_fields(m: Modifier, args: dict, path: str) -> None:
    """llm-compressor's Modifier fields (BASE_FIELDS): checked for type, kept for the round trip."""
    for key in ("index", "start", "end", "update"):
        value = args.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}.{key}", "must be a number or null")
        m.extra[key] = value
        _NOTES.add(SCHEDULE_NOTE)
    if args.get("group") is not None:
        if not isinstance(args["group"], str) or len(args["group"]) > MAX_NAME_CHARS:
            raise RecipeError(f"{path}.group", "must be a short string (a modifier group name)")
        m.extra["group"] = args["group"]
    if "requires_calibration_data" in args:  # written by llm-compressor's serializer; derived, not a setting
        _bool(args["requires_calibration_data"], f"{path}.requires_calibration_data")


def _default_ignore(args: dict, targets: list[str], path: str) -> list[str]:
    """``ignore`` as given (null = []), else ["lm_head"]: a recipe that does not mention it keeps the LM
    head 16-bit, where llm-compressor (default ignore []) would also compress it; LM_HEAD_NOTE says so."""
    if "ignore" in args:
        return _str_list(args["ignore"] if args["ignore"] is not None else [], path)
    return ["lm_head"]


def _reaches_lm_head(targets: list[str]) -> bool:
    return any(t in ("Linear", "lm_head") or (t.startswith("re:") and pattern_matches(t[3:], "lm_head"))
               for t in targets)


LM_HEAD_NOTE = ("ignore not given: lm_head is kept 16-bit here, where llm-compressor's default ignore [] "
                "would compress it too; write ignore: [] (or target lm_head) to compress it")


def _mask_structure(raw: Any, path: str) -> str:
    """'0:0' (unstructured, llm-compressor's default) or 'N:M' (N of every M input columns pruned)."""
    if raw is None:
        return "0:0"
    value = str(raw).strip()
    if value.lower() == "unstructured":
        return "0:0"
    match = re.fullmatch(r"(\d{1,3}):(\d{1,3})", value)
    if not match:
        raise RecipeError(path, "allowed: '0:0' (unstructured) or 'N:M' (N of every M weights pruned, e.g. '2:4')")
    n, m = int(match.group(1)), int(match.group(2))
    if (n, m) != (0, 0) and not 0 < n < m:
        raise RecipeError(path, f"{value!r}: N:M needs 0 < N < M (N of every M weights pruned), or '0:0'")
    return f"{n}:{m}"


def _parse_sparsity(m: Modifier, args: dict, path: str) -> None:
    """SparseGPTModifier's mask structure, sparsity (a number, or one per target layer) and OWL profile."""
    m.mask_structure = _mask_structure(args.get("mask_structure"), f"{path}.mask_structure")
    n, every = (int(v) for v in m.mask_structure.split(":"))
    raw = args.get("sparsity")
    if isinstance(raw, list):
        if every:
            raise RecipeError(f"{path}.sparsity", f"one sparsity per layer applies to unstructured pruning "
                              f"(mask_structure '0:0'); {m.mask_structure} prunes {n} of every {every}")
        if not raw or len(raw) > MAX_LIST_ITEMS:
            raise RecipeError(f"{path}.sparsity", f"a list needs 1 to {MAX_LIST_ITEMS} values")
        m.sparsity_list = [_float(v, f"{path}.sparsity[{i}]", 0.0, 1.0) for i, v in enumerate(raw)]
        if not all(0 < v < 1 for v in m.sparsity_list):
            raise RecipeError(f"{path}.sparsity", "every value must be strictly between 0 and 1")
        m.sparsity = sum(m.sparsity_list) / len(m.sparsity_list)
    else:
        m.sparsity = _float(raw if raw is not None else (n / every if every else 0.5), f"{path}.sparsity", 0.0, 1.0)
        if m.mask_structure == "2:4" and m.sparsity != 0.5:
            raise RecipeError(f"{path}.sparsity", "must be 0.5 with mask_structure '2:4'")
        if every and abs(m.sparsity - n / every) > 1e-9:
            raise RecipeError(f"{path}.sparsity", f"must be {n / every:g} with mask_structure '{m.mask_structure}' "
                              f"({n} of every {every} weights pruned)")
        if not 0 < m.sparsity < 1:
            raise RecipeError(f"{path}.sparsity", "must be strictly between 0 and 1")
    profile = args.get("sparsity_profile")
    owl_args = (profile is not None, args.get("owl_m") is not None, args.get("owl_lmbda") is not None)
    if any(owl_args) and not all(owl_args):
        raise RecipeError(f"{path}.sparsity_profile", "OWL needs all of sparsity_profile: owl, owl_m and owl_lmbda")
    if all(owl_args):
        if str(profile).lower() != "owl":
            raise RecipeError(f"{path}.sparsity_profile", "allowed: 'owl' or null")
        if every or m.sparsity_list is not None:
            raise RecipeError(f"{path}.sparsity_profile", "OWL sets one sparsity per layer from a single "
                              "target sparsity: use it with mask_structure '0:0' and a number for sparsity")
        owl_m = _float(args["owl_m"], f"{path}.owl_m", 1e-6, 1e6)
        lmbda = _float(args["owl_lmbda"], f"{path}.owl_lmbda", 0.0, 1.0)
        if 2 * lmbda >= min(m.sparsity, 1 - m.sparsity):
            raise RecipeError(f"{path}.owl_lmbda", f"must be below {min(m.sparsity, 1 - m.sparsity) / 2:g} so every "
                              "layer's sparsity stays between 0 and 1")
        m.owl = (owl_m, lmbda)
    if m.kind == "SparseGPTModifier":
        m.reconstruction = _parse_reconstruction(args.get("reconstruction"), f"{path}.reconstruction")
        m.preserve_sparsity_mask = _bool(args.get("preserve_sparsity_mask", False), f"{path}.preserve_sparsity_mask")


AUTOROUND_TORCH_COMPILE_NOTE = ("AutoRound enable_torch_compile has no effect here: the tuning runs eagerly")
AUTOROUND_DEVICE_NOTE = "AutoRound device_ids has no effect here: each layer is tuned on the job's device"
AUTOROUND_OBSERVER_NOTE = ("AutoRound tunes each group's range from its min/max itself (as llm-compressor's "
                           "AutoRoundModifier does); the scheme's weight observer has no effect on it")
AUTOROUND_RTN_NOTE = ("AutoRound iters 0 is plain round-to-nearest here (AutoRound's optimised RTN is not "
                      "implemented)")


def _parse_autoround(m: Modifier, args: dict, path: str) -> "_autoround.AutoRoundSettings":
    """AutoRoundModifier options (llm-compressor's: iters, batch_size, lr; AutoRound's: minmax_lr,
    enable_minmax_tuning, seed). enable_torch_compile, device_ids and disable_opt_rtn are accepted,
    kept for the round trip, and a note says what they do here."""
    values: dict[str, Any] = {}
    for key, (lo, hi) in _autoround.LIMITS.items():
        if args.get(key) is not None:
            values[key] = _int(args[key], f"{path}.{key}", lo=lo, hi=hi)
    for key in ("lr", "minmax_lr"):
        if args.get(key) is not None:
            values[key] = _float(args[key], f"{path}.{key}", *_autoround.LR_RANGE)
    for key in ("enable_minmax_tuning", "full_range"):
        if args.get(key) is not None:
            values[key] = _bool(args[key], f"{path}.{key}")
    for key in ("enable_torch_compile", "disable_opt_rtn"):
        if args.get(key) is not None:
            m.extra[key] = _bool(args[key], f"{path}.{key}")
    if m.extra.get("enable_torch_compile"):
        _NOTES.add(AUTOROUND_TORCH_COMPILE_NOTE)
    if args.get("device_ids") is not None:
        ids = args["device_ids"]
        if not isinstance(ids, str) or len(ids) > MAX_NAME_CHARS:
            raise RecipeError(f"{path}.device_ids", "must be a short string such as '0,1' or 'auto'")
        m.extra["device_ids"] = ids
        _NOTES.add(AUTOROUND_DEVICE_NOTE)
    settings = _autoround.AutoRoundSettings(**values)
    if settings.iters == 0:
        _NOTES.add(AUTOROUND_RTN_NOTE)
    return settings


def _parse_reconstruction(raw: Any, path: str) -> ReconstructionSettings | None:
    """SparseGPTModifier ``reconstruction``: null/false (off), true (defaults) or a mapping of
    steps, lr, batch_size, optimizer, target (see compression.algorithms.reconstruction)."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return ReconstructionSettings()
    if not isinstance(raw, dict):
        raise RecipeError(path, "must be true, false/null or a mapping of steps, lr, batch_size, optimizer, target")
    defaults = ReconstructionSettings().to_dict()
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise RecipeError(f"{path}.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(defaults))}")
    values = {**defaults, **raw}
    for key, (lo, hi) in RECON_LIMITS.items():
        values[key] = _int(values[key], f"{path}.{key}", lo=lo)
        if values[key] > hi:
            raise RecipeError(f"{path}.{key}", f"must be an integer between {lo} and {hi}")
    values["lr"] = _float(values["lr"], f"{path}.lr", *LR_RANGE)
    if values["optimizer"] not in OPTIMIZERS:
        raise RecipeError(f"{path}.optimizer", f"allowed: {', '.join(OPTIMIZERS)}")
    if values["target"] not in TARGETS:
        raise RecipeError(f"{path}.target", "allowed: 'dense' (the dense model's layer output) or "
                          "'layer' (the dense layer on the pruned model's inputs)")
    return ReconstructionSettings(**values)


def _check_groups(m: Modifier, path: str) -> None:
    for gname, g in m.config_groups.items():
        if m.autoround is not None and g.weights is not None:
            why = _autoround.supports(g.weights)
            if why:
                raise RecipeError(f"{path}.config_groups.{gname}.weights", f"AutoRound cannot tune {why}")
        if g.weights is None or m.kind != "GPTQModifier":
            continue  # an UNQUANTIZED group leaves its modules 16-bit
        if g.weights.actorder is not None and m.actorder_given and g.weights.actorder != m.actorder:
            raise RecipeError(f"{path}.actorder", f"{m.actorder!r} clashes with config_groups.{gname}.weights."
                              f"actorder {g.weights.actorder!r} (llm-compressor refuses this too); set it in one place")
        if g.weights.actorder is None and m.actorder:
            g.weights = _replace(g.weights, actorder=m.actorder)
    if m.kind == "GPTQModifier" and m.full_range and m.full_range_given and m.config_groups and not any(
            m.full_range_grid(g) for g in m.config_groups.values()):
        _NOTES.add(FULL_RANGE_NOTE)


APPLY_CLIP_NOTE = ("apply_clip: true changes nothing here: AWQ's clipping chooses the ranges of integer group/channel "
                   "min-max weights that a later QuantizationModifier rounds to nearest; GPTQ and AutoRound choose "
                   "their own, and other schemes keep their observer's scales")
FULL_RANGE_NOTE = ("full_range: true changes nothing here: the full-range grid replaces min-max scales of symmetric "
                   "integer weight-only group/channel schemes; this scheme keeps its observer's scales")
ACTORDER_RTN_NOTE = ("act-order in a QuantizationModifier's scheme has no effect without a GPTQModifier: "
                     "round-to-nearest has no column order")


def _parse_extra(m: Modifier, args: dict, path: str) -> None:
    """Options that are accepted but change nothing in the result; kept so the recipe round-trips."""
    for key in ("batched_quantization", "offload_hessians", "sequential_update", "bypass_divisibility_checks"):
        if key not in args:
            continue
        value = args[key]
        if key == "bypass_divisibility_checks" and value:
            raise RecipeError(f"{path}.{key}", "the engine cannot bypass divisibility checks; use false")
        if key == "sequential_update" and value not in (None, False, True):
            raise RecipeError(f"{path}.{key}", "must be true or false")
        if key == "batched_quantization" and value is not None and value != "auto" and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise RecipeError(f"{path}.{key}", "allowed: 'auto', a positive integer or null")
        if key == "offload_hessians" and value not in (None, False, True):
            raise RecipeError(f"{path}.{key}", "must be true or false")
        m.extra[key] = value
    if args.get("sequential_targets") is not None:
        targets = _str_list(args["sequential_targets"], f"{path}.sequential_targets")
        bad = [t for t in targets if t not in DECODER_LAYER_CLASSES and not re.fullmatch(r"[A-Za-z0-9]+DecoderLayer", t)]
        if bad:
            raise RecipeError(f"{path}.sequential_targets",
                              f"{bad[0]!r}: the engine compresses one decoder layer at a time; allowed: the "
                              f"decoder layer class ({', '.join(DECODER_LAYER_CLASSES)}, ...)")
        m.sequential_targets = targets


def _apply_observers(m: Modifier, args: dict, path: str) -> None:
    """llm-compressor's weight_observer / input_observer / observer {weights: .., input: ..} overrides."""
    chosen: dict[str, str] = {}
    obs = args.get("observer")
    if obs is not None:
        if not isinstance(obs, dict) or not set(obs) <= {"weights", "input", "output"}:
            raise RecipeError(f"{path}.observer", "must be a mapping {weights: <observer>, input: <observer>}")
        chosen.update({k: v for k, v in obs.items() if v is not None})
    for key, role in (("weight_observer", "weights"), ("input_observer", "input"), ("output_observer", "output")):
        if args.get(key) is not None:
            chosen[role] = args[key]
    for role, name in chosen.items():
        field_path = f"{path}.{'observer.' + role if obs and role in obs else role.rstrip('s') + '_observer'}"
        if role == "output":
            raise RecipeError(field_path, "output activations are not quantized here; use null")
        if name not in OBSERVERS:
            raise RecipeError(field_path, f"allowed: {', '.join(OBSERVERS)}")
        for g in m.config_groups.values():
            if role == "weights" and g.weights is not None:
                g.weights = _replace(g.weights, observer=OBSERVERS[name], observer_kwargs={
                    **OBSERVER_PRESETS.get(name, {}), **g.weights.observer_kwargs})
            elif role == "input" and g.input_activations is not None and not g.input_activations.dynamic:
                g.input_activations = _replace(g.input_activations, observer=OBSERVERS[name])
                if OBSERVERS[name] != "minmax":
                    _NOTES.add(INPUT_OBSERVER_NOTE)
    for key in ("observer", "weight_observer", "input_observer"):
        if args.get(key) is not None:
            m.extra[key] = copy.deepcopy(args[key])


def _observer_kwargs(observer: str, raw: Any, path: str) -> dict:
    """The observer's search settings: a named variant's presets under the recipe's ``observer_kwargs``."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(path, "must be a mapping")
    bad = sorted(set(raw) - OBSERVER_KWARGS)
    if bad:
        raise RecipeError(f"{path}.{bad[0]}", f"allowed: {', '.join(sorted(OBSERVER_KWARGS))}")
    for key, value in raw.items():
        if key == "strict":
            if not isinstance(value, bool):
                raise RecipeError(f"{path}.strict", "must be true or false")
            continue
        low = 0 if key == "patience" else None  # patience 0: search every step
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                value < low if low is not None else value <= 0):
            raise RecipeError(f"{path}.{key}", "must be a non-negative number" if low is not None
                              else "must be a positive number")
    if raw.get("maxshrink", 0) >= 1:
        raise RecipeError(f"{path}.maxshrink", "must be below 1 (the share of the range to search)")
    for key, top in OBSERVER_KWARG_MAX.items():  # every candidate is a pass over the weight: bounded work
        if key in raw and raw[key] > top:
            raise RecipeError(f"{path}.{key}", f"must be at most {top:g}")
    if "triton_error_buffer" in raw:
        _NOTES.add(TRITON_BUFFER_NOTE)
    if raw.get("expand", 1.0) < 1.0:
        raise RecipeError(f"{path}.expand", "must be at least 1.0 (the search starts at expand x the observed range)")
    return {**OBSERVER_PRESETS.get(observer, {}), **raw}


def _parse_kv_cache(raw: Any, path: str) -> QuantArgs:
    """kv_cache_scheme: FP8 E4M3 (or INT8) per-tensor static K/V scales, the form vLLM reads."""
    if not isinstance(raw, dict):
        raise RecipeError(path, "must be a mapping of QuantizationArgs, e.g. {num_bits: 8, type: float, "
                          "strategy: tensor, dynamic: false, symmetric: true}")
    unknown = sorted(set(raw) - KV_CACHE_FIELDS)
    if unknown:
        raise RecipeError(f"{path}.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(KV_CACHE_FIELDS))}")
    if raw.get("type", "int") != "float" or raw.get("num_bits", 8) != 8:
        raise RecipeError(f"{path}.type", "only FP8 KV caches are supported: num_bits 8, type float")
    strategy = raw.get("strategy") or "tensor"
    if strategy not in ("tensor", "attn_head"):
        raise RecipeError(f"{path}.strategy", "K/V scales are per-tensor ('tensor') or per KV head ('attn_head')")
    if raw.get("dynamic", False) is not False:
        raise RecipeError(f"{path}.dynamic", "K/V scales are calibrated on data; use false")
    if raw.get("symmetric", True) is not True:
        raise RecipeError(f"{path}.symmetric", "FP8 K/V scales are symmetric; use true")
    for key in ("group_size", "block_structure", "actorder", "zp_dtype"):
        if raw.get(key) is not None:
            raise RecipeError(f"{path}.{key}", "not used by per-tensor K/V scales; use null")
    observer = raw.get("observer") or "minmax"
    if observer not in OBSERVERS or OBSERVERS[observer] != "minmax":
        raise RecipeError(f"{path}.observer", "K/V scales use the min-max observer; allowed: minmax, static_minmax")
    return QuantArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=False,
                     scale_dtype=_scale_dtype(raw.get("scale_dtype"), f"{path}.scale_dtype"))


def _parse_transform(m: Modifier, args: dict, path: str) -> Modifier:
    """AWQModifier / SmoothQuantModifier: mappings (or the family defaults) and their options."""
    m.targets = []
    m.ignore = _str_list(args.get("ignore") or [], f"{path}.ignore") if args.get("ignore") else []
    if m.kind == "AWQModifier":
        _parse_extra(m, args, path)
        if "offload_device" in args:
            m.extra["offload_device"] = args["offload_device"]
        duo = args.get("duo_scaling", True)
        if duo not in (True, False, "both"):
            raise RecipeError(f"{path}.duo_scaling", "allowed: true, false or 'both'")
        m.duo_scaling = duo
        m.n_grid = _int(args.get("n_grid", 20), f"{path}.n_grid", lo=2)
        if args.get("apply_clip") is not None:
            m.apply_clip = _bool(args["apply_clip"], f"{path}.apply_clip")
            m.apply_clip_given = True
        raw = args.get("mappings")
        if raw is not None:
            if not isinstance(raw, list) or not raw:
                raise RecipeError(f"{path}.mappings", "must be a list of {smooth_layer, balance_layers}")
            mappings = []
            for i, item in enumerate(raw):
                ipath = f"{path}.mappings[{i}]"
                if not isinstance(item, dict) or not {"smooth_layer", "balance_layers"} <= set(item) or not set(
                        item) <= {"smooth_layer", "balance_layers", "activation_hook_target"}:
                    raise RecipeError(ipath, "must be a mapping with smooth_layer and balance_layers")
                if item.get("activation_hook_target") is not None:
                    raise RecipeError(f"{ipath}.activation_hook_target",
                                      "parallel-block hook targets are not supported; use null")
                smooth = _str_list(item["smooth_layer"], f"{ipath}.smooth_layer")
                if len(smooth) != 1:
                    raise RecipeError(f"{ipath}.smooth_layer", "must be one name or 're:' pattern")
                mappings.append({"smooth_layer": smooth[0],
                                 "balance_layers": _str_list(item["balance_layers"], f"{ipath}.balance_layers")})
            m.mappings = mappings
    else:
        m.smoothing_strength = _float(args.get("smoothing_strength", 0.5), f"{path}.smoothing_strength", 0.0, 1.0)
        default = "log_equalization" if m.kind == "LogarithmicEqualizationModifier" else "smoothquant"
        m.algorithm = args.get("algorithm") or default
        if m.algorithm not in ("smoothquant", "log_equalization"):
            raise RecipeError(f"{path}.algorithm", "allowed: 'smoothquant' or 'log_equalization'")
        if args.get("calibration_function") is not None:
            raise RecipeError(f"{path}.calibration_function", "a Python callable cannot come from a recipe; the "
                              "engine observes each smooth layer's output range; use null")
        if args.get("num_calibration_steps") is not None:
            m.extra["num_calibration_steps"] = _int(args["num_calibration_steps"], f"{path}.num_calibration_steps",
                                                    lo=1)
        raw = args.get("mappings")
        if raw is not None:
            if not isinstance(raw, list) or not raw:
                raise RecipeError(f"{path}.mappings", "must be a list of [[balance layers], smooth layer]")
            mappings = []
            for i, item in enumerate(raw):
                ipath = f"{path}.mappings[{i}]"
                if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[1], str):
                    raise RecipeError(ipath, "must be [[balance layers], smooth layer]")
                mappings.append([_str_list(item[0], f"{ipath}[0]"), _str_list(item[1], f"{ipath}[1]")[0]])
            m.mappings = mappings
    return m


def _transform_dict(m: Modifier) -> dict:
    out: dict[str, Any] = {}
    if m.kind == "AWQModifier":
        out.update({"duo_scaling": m.duo_scaling, "n_grid": m.n_grid})
        if not m.apply_clip:  # the engine's option; written only when off (llm-compressor has no such field)
            out["apply_clip"] = False
        if m.mappings is not None:
            out["mappings"] = copy.deepcopy(m.mappings)
        if m.sequential_targets:
            out["sequential_targets"] = list(m.sequential_targets)
    else:
        out["smoothing_strength"] = m.smoothing_strength
        if m.algorithm != "smoothquant":
            out["algorithm"] = m.algorithm
        if m.mappings is not None:
            out["mappings"] = [[list(b), s] for b, s in m.mappings]
    if m.ignore:
        out["ignore"] = list(m.ignore)
    out.update(copy.deepcopy(m.extra))
    return out


def _bool(value: Any, path: str) -> bool:
    if value not in (True, False):
        raise RecipeError(path, "must be true or false")
    return bool(value)


def _scale_dtype(value: Any, path: str) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name == "uint8":
        raise RecipeError(path, "uint8 (E8M0) scales are the MX formats': float weights, strategy group, group_size 32")
    if name not in SCALE_DTYPES:
        raise RecipeError(path, f"allowed: {', '.join(SCALE_DTYPES)} (or null for the model dtype)")
    return name


def _scheme_name(name: Any, path: str) -> str:
    key = SCHEME_ALIASES.get(str(name).upper(), str(name).upper())
    if key in UNSUPPORTED_SCHEMES:
        raise RecipeError(path, f"scheme {name!r} is not supported: {UNSUPPORTED_SCHEMES[key]}")
    if key not in SCHEME_PRESETS:
        raise RecipeError(path, f"unknown scheme {name!r}; allowed: {', '.join(SCHEME_PRESETS)}")
    return key


def _scheme_groups(scheme: Any, targets: list[str], path: str) -> dict[str, SchemeGroup]:
    """``scheme``: a preset name, {preset name: [targets]}, or a QuantizationScheme body
    ({weights: ..., input_activations: ...}) applied to the modifier's targets."""
    if isinstance(scheme, str):
        return {"group_0": _preset_group(_scheme_name(scheme, path), targets)}
    if isinstance(scheme, dict) and scheme and set(scheme) <= GROUP_FIELDS - {"targets"}:
        return {"group_0": _parse_group({**scheme, "targets": list(targets)}, path)}
    if isinstance(scheme, dict) and scheme:
        out = {}
        for i, (name, tgts) in enumerate(scheme.items()):
            key = _scheme_name(name, f"{path}.{name}")
            out[f"group_{i}"] = _preset_group(key, _str_list(tgts, f"{path}.{name}"))
        return out
    raise RecipeError(path, "must be a scheme name, a mapping {scheme name: [targets]}, or "
                      "{weights: ..., input_activations: ...}")


def _preset_group(name: str, targets: list[str]) -> SchemeGroup:
    p = SCHEME_PRESETS[name]
    return SchemeGroup(list(targets), QuantArgs(**p["weights"]) if p["weights"] else None,
                       QuantArgs(**p["input_activations"]) if p["input_activations"] else None)


def checkpoint_format(weights: QuantArgs, acts: QuantArgs | None) -> str:
    """compressed-tensors' format for one scheme (its infer_module_format priority: nvfp4-pack,
    int-quantized, pack-quantized, float-quantized, naive-quantized)."""
    if weights.is_mx:
        return "mxfp4-pack-quantized" if weights.is_fp4 else "mxfp8-quantized"
    if weights.is_fp4:
        return "nvfp4-pack-quantized"
    if weights.type == "int":
        return "int-quantized" if acts is not None else "pack-quantized"
    return "float-quantized" if acts is not None else "naive-quantized"


def _parse_group(raw: Any, path: str) -> SchemeGroup:
    if not isinstance(raw, dict):
        raise RecipeError(path, "must be a mapping with targets, weights, input_activations")
    unknown = sorted(set(raw) - GROUP_FIELDS)
    if unknown:
        raise RecipeError(f"{path}.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(GROUP_FIELDS))}")
    if raw.get("output_activations") is not None:
        raise RecipeError(f"{path}.output_activations", "output activation quantization is not supported; use null")
    targets = _str_list(raw.get("targets", ["Linear"]), f"{path}.targets")
    weights = _parse_args(raw.get("weights"), f"{path}.weights", weights=True)
    acts = _parse_args(raw.get("input_activations"), f"{path}.input_activations", weights=False)
    if weights is None and acts is not None:
        raise RecipeError(f"{path}.weights", "activation-only schemes (e.g. attention query/key/value "
                          "quantization) are not supported; quantize the weights too, or use kv_cache_scheme")
    if weights is not None and acts is not None and acts.is_fp4 != weights.is_fp4 and not (
            weights.is_mx and acts.type == "float"):  # MXFP4 weights may take FP8 activations (MXFP4XFP8)
        raise RecipeError(f"{path}.input_activations", "FP4 activations go with FP4 (NVFP4/MXFP4) weights only")
    if weights is not None and acts is not None and acts.is_mx and not weights.is_mx:
        raise RecipeError(f"{path}.input_activations", "MX activations go with MX weights (MXFP4, MXFP8)")
    fmt = raw.get("format")
    if fmt is not None:
        expected = checkpoint_format(weights, acts) if weights is not None else "dense"
        if fmt != expected:
            raise RecipeError(f"{path}.format", f"this scheme is written as {expected!r} (compressed-tensors' "
                              f"format for it); {fmt!r} is not what the engine writes; use {expected!r} or null")
    return SchemeGroup(targets, weights, acts)


def _parse_args(raw: Any, path: str, *, weights: bool) -> QuantArgs | None:
    """One QuantizationArgs mapping, checked against what the engine and its export implement."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RecipeError(path, "must be a mapping of QuantizationArgs or null")
    unknown = sorted(set(raw) - ARGS_FIELDS)
    if unknown:
        raise RecipeError(f"{path}.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(ARGS_FIELDS))}")
    mx = str(raw.get("scale_dtype") or "").removeprefix("torch.") == "uint8"  # MX: E8M0 scales per 32 values
    typ = raw.get("type", "int")
    if typ not in ("int", "float"):
        raise RecipeError(f"{path}.type", "allowed: 'int' or 'float'")
    bits = _int(raw.get("num_bits", 8), f"{path}.num_bits", lo=1)
    if typ == "float" and bits not in (4, 8):
        raise RecipeError(f"{path}.num_bits", "float quantization is FP8 E4M3 (8) or FP4 E2M1 (4, NVFP4)")
    if typ == "int" and not 2 <= bits <= 8:
        raise RecipeError(f"{path}.num_bits", "integer quantization takes 2 to 8 bits")
    fp4 = typ == "float" and bits == 4
    if mx and typ != "float":
        raise RecipeError(f"{path}.scale_dtype", "uint8 (E8M0) scales belong to the MX float formats (MXFP4, MXFP8)")
    symmetric = raw.get("symmetric", True)
    if symmetric not in (True, False):
        raise RecipeError(f"{path}.symmetric", "must be true or false")
    if not symmetric and typ != "int":
        raise RecipeError(f"{path}.symmetric", "asymmetric (zero-point) quantization is integer-only; use true")
    group_size = raw.get("group_size")
    strategy = raw.get("strategy")
    if strategy is None:
        strategy = "tensor" if group_size is None else ("channel" if group_size == -1 else "group")
    if group_size == -1:
        group_size = None
    allowed = ("tensor", "channel", "group", "block", "tensor_group") if weights else (
        "tensor", "token", "group", "tensor_group")
    if strategy not in allowed:
        raise RecipeError(f"{path}.strategy", f"allowed: {', '.join(allowed)}")
    if mx and strategy != "group":
        raise RecipeError(f"{path}.strategy", "MX formats use strategy 'group' (group 32, E8M0 scales)")
    if fp4 and not mx and strategy != "tensor_group":
        raise RecipeError(f"{path}.strategy", "FP4 (NVFP4) uses strategy 'tensor_group' (group 16 + a global scale); "
                          "MXFP4 uses 'group' with group_size 32 and scale_dtype uint8")
    if strategy == "tensor_group" and not fp4:
        raise RecipeError(f"{path}.strategy", "'tensor_group' is NVFP4's strategy: num_bits 4, type float")
    block = raw.get("block_structure")
    if strategy == "block":
        if not (isinstance(block, (list, tuple)) and len(block) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in block)):
            raise RecipeError(f"{path}.block_structure", "strategy 'block' needs [rows, cols], e.g. [128, 128]")
        if typ != "float":
            raise RecipeError(f"{path}.strategy", "block scales are implemented for FP8 weights (FP8_BLOCK)")
    elif block is not None:
        raise RecipeError(f"{path}.block_structure", f"only used with strategy 'block' (strategy is {strategy!r})")
    if strategy in ("group", "tensor_group"):
        group_size = _int(group_size, f"{path}.group_size", lo=1) if group_size is not None else None
        if group_size is None:
            raise RecipeError(f"{path}.group_size", f"strategy '{strategy}' needs a positive group_size")
        if mx and group_size != 32:
            raise RecipeError(f"{path}.group_size", "MX formats use group_size 32 (one E8M0 scale per 32 values)")
        if fp4 and not mx and group_size != 16:
            raise RecipeError(f"{path}.group_size", "NVFP4 uses group_size 16 (FP8 scale per 16 values)")
        if weights and typ == "float" and not fp4 and not mx:
            raise RecipeError(f"{path}.strategy", "FP8 weights support 'tensor', 'channel' or 'block'")
    elif group_size is not None:
        raise RecipeError(f"{path}.group_size", f"only used with strategy 'group' (strategy is {strategy!r})")
    dynamic = raw.get("dynamic", False)
    if dynamic not in (True, False, "local"):
        raise RecipeError(f"{path}.dynamic", "must be true, false or 'local' (NVFP4 activations)")
    if weights and dynamic:
        raise RecipeError(f"{path}.dynamic", "weights are always static; use false")
    if not weights:
        if dynamic == "local" and not fp4:
            raise RecipeError(f"{path}.dynamic", "'local' is only for NVFP4 (tensor_group) activations")
        if fp4 and not mx and dynamic != "local":
            raise RecipeError(f"{path}.dynamic", "NVFP4 activations use dynamic: local (group scales per token, "
                              "a calibrated global scale)")
        if mx and dynamic is not True:
            raise RecipeError(f"{path}.dynamic", "MX activations take their E8M0 scales per token group: use true")
        if strategy == "token" and not dynamic:
            raise RecipeError(f"{path}.dynamic", "strategy 'token' requires dynamic: true")
        if strategy == "group" and not dynamic:
            raise RecipeError(f"{path}.dynamic", "per-token-group activation scales are dynamic; use true")
    actorder = raw.get("actorder")
    if actorder is not None and not weights:
        raise RecipeError(f"{path}.actorder", "actorder only applies to weights")
    if actorder in ("group", "dynamic", True):
        _NOTES.add(ACTORDER_GROUP_NOTE)
    actorder = _actorder(actorder, f"{path}.actorder")
    observer = raw.get("observer") or "minmax"
    if observer not in OBSERVERS:
        raise RecipeError(f"{path}.observer", f"allowed: {', '.join(OBSERVERS)}")
    kwargs = _observer_kwargs(observer, raw.get("observer_kwargs"), f"{path}.observer_kwargs")
    if not weights and OBSERVERS[observer] != "minmax" and not dynamic:
        _NOTES.add(INPUT_OBSERVER_NOTE)
    scale_dtype = "uint8" if mx else _scale_dtype(raw.get("scale_dtype"), f"{path}.scale_dtype")
    if fp4 and not mx and scale_dtype not in (None, "float8_e4m3fn"):
        raise RecipeError(f"{path}.scale_dtype", "NVFP4 group scales are float8_e4m3fn")
    if fp4 and not mx:
        scale_dtype = "float8_e4m3fn"
    zp_dtype = raw.get("zp_dtype")
    if zp_dtype is not None:
        name = str(zp_dtype).removeprefix("torch.")
        if symmetric:  # no zero point is stored; compressed-tensors still fills in the dtype one would have
            implied = "uint8" if mx else "float8_e4m3fn" if typ == "float" else "int8"
            if name != implied:
                raise RecipeError(f"{path}.zp_dtype", f"a symmetric scheme stores no zero point; use null (or "
                                  f"{implied}, the dtype compressed-tensors records for this scheme)")
            zp_dtype = None
        elif name != "int8":
            raise RecipeError(f"{path}.zp_dtype", "integer zero points are stored as int8")
        else:
            zp_dtype = "int8"
    return QuantArgs(num_bits=bits, type=typ, symmetric=bool(symmetric), strategy=strategy, group_size=group_size,
                     dynamic=dynamic if dynamic == "local" else bool(dynamic), actorder=actorder,
                     observer=OBSERVERS[observer], block_structure=tuple(block) if strategy == "block" else None,
                     scale_dtype=scale_dtype, zp_dtype=zp_dtype if not symmetric else None,
                     observer_kwargs=dict(kwargs))


ACTORDER_GROUP_NOTE = ("actorder 'group' ran as 'weight' (static) ordering: compressed-tensors 0.20 removed "
                       "g_idx group ordering, so a g_idx checkpoint would not load in vLLM/transformers")


def _actorder(value: Any, path: str) -> str | None:
    """'static'/'weight': visit columns by decreasing activation energy, groups stay in column order.

    'group'/'dynamic'/true are mapped to that same 'weight' ordering (stated in ``describe()``):
    compressed-tensors 0.20 (what llm-compressor 0.14 writes with) refuses g_idx group ordering.
    The engine's ``gptq_quantize(actorder="group")`` can still produce g_idx, and the runtime
    loads older g_idx checkpoints."""
    if value in (None, False):
        return None
    if value in ("static", "weight", "group", "dynamic", True):
        return "static"
    raise RecipeError(path, "allowed: 'static'/'weight', 'group'/'dynamic' (run as 'weight'; compressed-tensors "
                      "0.20 removed g_idx groups) or null")


def _str_list(value: Any, path: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RecipeError(path, "must be a list of module names, class names or 're:' patterns")
    if len(value) > MAX_LIST_ITEMS:
        raise RecipeError(path, f"at most {MAX_LIST_ITEMS} entries")
    for v in value:
        if v.startswith("re:"):
            check_pattern(v, path)
        elif len(v) > MAX_NAME_CHARS:
            raise RecipeError(path, f"a module or class name may have at most {MAX_NAME_CHARS} characters")
    return list(value)


def _int(value: Any, path: str, *, lo: int, hi: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RecipeError(path, f"must be an integer between {lo} and {hi}")
    return value


def _float(value: Any, path: str, lo: float, hi: float) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string; pydantic would coerce it too
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RecipeError(path, f"must be a number between {lo} and {hi}")
    return float(value)


def _replace(args: QuantArgs, **changes: Any) -> QuantArgs:
    return QuantArgs(**{**args.to_dict(), **changes})


# presets ----------------------------------------------------------------------------------
_PRESET_OPTIONS = {
    "FP8_DYNAMIC": {"ignore"},
    "FP8": {"ignore"},
    "W4A16": {"ignore", "group_size", "actorder", "dampening_frac", "block_size"},
    "2:4": {"ignore", "dampening_frac", "block_size", "reconstruction"},
    "2:4+FP8_DYNAMIC": {"ignore", "dampening_frac", "block_size", "reconstruction"},
    "2:4+W4A16": {"ignore", "group_size", "actorder", "dampening_frac", "block_size", "reconstruction"},
    "W8A8": {"ignore", "actorder", "dampening_frac", "block_size"},
    "W4A16_ASYM": {"ignore", "group_size", "actorder", "dampening_frac", "block_size"},
    "AWQ+W4A16_ASYM": {"ignore", "group_size", "duo_scaling"},
    "AutoRound+W4A16": {"ignore", "group_size", "iters", "batch_size"},
    "AutoRound+W4A16_ASYM": {"ignore", "group_size", "iters", "batch_size"},
    "SQ+W8A8": {"ignore", "smoothing_strength", "actorder", "dampening_frac", "block_size"},
    "FP8+KV_FP8": {"ignore"},
    "FP8_BLOCK": {"ignore"},
    "NVFP4": {"ignore"},
    "NVFP4A16": {"ignore"},
}
def presets_with_option(option: str) -> list[str]:
    """Preset names that take ``option`` (e.g. "group_size"), in PRESETS order."""
    return [name for name in PRESETS if option in _PRESET_OPTIONS.get(name, ())]


PARITY_PRESETS = ("W4A16_ASYM", "AWQ+W4A16_ASYM", "AutoRound+W4A16", "AutoRound+W4A16_ASYM", "SQ+W8A8", "FP8+KV_FP8",
                  "FP8_BLOCK", "NVFP4", "NVFP4A16")
_KV_FP8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def _group_weights(scheme: str, group_size: Any, default: int = 128) -> dict:
    weights = dict(SCHEME_PRESETS[scheme]["weights"])
    group_size = default if group_size is None else group_size
    if group_size in ("channel", -1):
        weights.update(strategy="channel", group_size=None)
    elif group_size in PRESET_GROUP_SIZES:
        weights.update(strategy="group", group_size=group_size)
    else:
        raise RecipeError("group_size", "allowed: 32, 64, 128 or 'channel' (one scale per output row)")
    return weights


def _parity_preset_stages(name: str, options: dict) -> dict:
    """Stages of the presets that mirror llm-compressor's newer examples (AWQ, SmoothQuant, zero
    points, KV cache, FP8 blocks, NVFP4)."""
    common = {"targets": ["Linear"], "ignore": options.get("ignore", ["lm_head"])}
    solver = {k: options[k] for k in ("dampening_frac", "block_size") if k in options}

    def quant(kind: str, weights: dict, acts: dict | None, **extra: Any) -> dict:
        group = {"targets": ["Linear"], "weights": weights, "input_activations": acts}
        return {kind: {**common, **extra, "config_groups": {"group_0": group}}}

    if name == "W4A16_ASYM":
        weights = dict(_group_weights("W4A16_ASYM", options.get("group_size")), observer="mse")
        mods = quant("GPTQModifier", weights, None, **solver, actorder=options.get("actorder", "static"))
    elif name == "AWQ+W4A16_ASYM":
        duo = options.get("duo_scaling", True)
        mods = {"AWQModifier": {"duo_scaling": duo},
                **quant("QuantizationModifier", _group_weights("W4A16_ASYM", options.get("group_size")), None)}
    elif name in ("AutoRound+W4A16", "AutoRound+W4A16_ASYM"):
        tuning = {k: options[k] for k in ("iters", "batch_size") if k in options}
        mods = quant("AutoRoundModifier", _group_weights(name.split("+")[1], options.get("group_size")), None,
                     **tuning)
    elif name == "SQ+W8A8":
        strength = options.get("smoothing_strength", 0.8)
        p = SCHEME_PRESETS["W8A8"]
        mods = {"SmoothQuantModifier": {"smoothing_strength": strength},
                **quant("GPTQModifier", dict(p["weights"]), dict(p["input_activations"]), **solver,
                        actorder=options.get("actorder", "static"))}
    elif name == "FP8+KV_FP8":
        p = SCHEME_PRESETS["FP8"]
        mods = quant("QuantizationModifier", dict(p["weights"]), dict(p["input_activations"]),
                     kv_cache_scheme=dict(_KV_FP8))
    else:  # FP8_BLOCK, NVFP4, NVFP4A16: the compressed-tensors preset schemes as they are
        p = SCHEME_PRESETS[name]
        mods = quant("QuantizationModifier", dict(p["weights"]),
                     dict(p["input_activations"]) if p["input_activations"] else None)
    return {"quant_stage": {"quant_modifiers": mods}}


# 2:4 presets: layer-wise reconstruction unless the option says otherwise (reconstruction: false turns it off).
# These are the settings bench/recovery.py measured: held-out ppl ratio 3.21 vs 3.67 one-shot (docs/benchmarks.md).
PRESET_RECONSTRUCTION = {"steps": 4, "batch_size": 2, "lr": 3e-4, "optimizer": "adam", "target": "dense"}


def _preset_reconstruction(options: dict) -> dict:
    """The SparseGPTModifier ``reconstruction`` entry of a 2:4 preset (option ``reconstruction``:
    true/false or a settings mapping; default PRESET_RECONSTRUCTION)."""
    value = options.get("reconstruction", PRESET_RECONSTRUCTION)
    if value is True:
        value = ReconstructionSettings().to_dict()
    return {"reconstruction": value} if value else {}


def _preset_stages(name: str, options: dict) -> dict:
    unknown = sorted(set(options) - _PRESET_OPTIONS[name])
    if unknown:
        raise RecipeError(unknown[0], f"not an option of preset {name}; allowed: "
                          f"{', '.join(sorted(_PRESET_OPTIONS[name]))}")
    if name in PARITY_PRESETS:
        return _parity_preset_stages(name, options)
    ignore = options.get("ignore", ["lm_head"])
    common = {"targets": ["Linear"], "ignore": ignore}
    solver = {k: options[k] for k in ("dampening_frac", "block_size") if k in options}
    stages: dict = {}
    if name.startswith("2:4"):
        stages["sparsity_stage"] = {"sparsity_modifiers": {"SparseGPTModifier": {
            **common, "sparsity": 0.5, "mask_structure": "2:4", **solver,
            **_preset_reconstruction(options)}}}
    quant = name.split("+")[-1]
    if quant == "2:4":
        return stages
    if quant in ("FP8_DYNAMIC", "FP8"):
        weights = dict(SCHEME_PRESETS[quant]["weights"])
        if quant == "FP8_DYNAMIC":
            weights["observer"] = "mse"  # the sparse FP8-dynamic card: scales by minimizing MSE
            weights["observer_kwargs"] = {"grid": 20, "maxshrink": 0.8, "patience": 1000}  # 1.0 … 0.25 · absmax
        group = {"targets": ["Linear"], "weights": weights,
                 "input_activations": SCHEME_PRESETS[quant]["input_activations"]}
        stages["quant_stage"] = {"quant_modifiers": {"QuantizationModifier": {
            **common, "config_groups": {"group_0": group}}}}
        return stages
    weights = dict(SCHEME_PRESETS[quant]["weights"])
    if quant == "W4A16":
        default_group = None if name == "2:4+W4A16" else 128
        group_size = options.get("group_size", default_group)
        if group_size in (None, "channel", -1):
            weights.update(strategy="channel", group_size=None)
        elif group_size in PRESET_GROUP_SIZES:
            weights.update(strategy="group", group_size=group_size)
        else:
            raise RecipeError("group_size", "allowed: 32, 64, 128 or 'channel' (one scale per output row)")
    actorder = options.get("actorder", "static")
    stages["quant_stage"] = {"quant_modifiers": {"GPTQModifier": {
        **common, **solver, "actorder": actorder,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": SCHEME_PRESETS[quant]["input_activations"]}}}}}
    return stages
