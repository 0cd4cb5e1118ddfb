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
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import regex
import yaml

from compression.errors import RecipeError
from compression.quant import QuantArgs
from compression.distill import MODIFIER as FINETUNE, FinetuneSettings, parse_settings as _parse_finetune
from compression.reconstruction import LIMITS as RECON_LIMITS, LR_RANGE, OPTIMIZERS, TARGETS, ReconstructionSettings

__all__ = ["PRESETS", "Modifier", "Recipe", "RecipeError", "SchemeGroup", "SCHEME_PRESETS"]

PRESETS: dict[str, str] = {
    "FP8_DYNAMIC": "FP8 E4M3 weights per output channel (MSE scales), FP8 per-token dynamic activations; no calibration",
    "FP8": "FP8 E4M3 per-tensor weights and static per-tensor activations calibrated on data",
    "W4A16": "INT4 symmetric weights with GPTQ (group 128 default, act-order static), 16-bit activations",
    "2:4": "SparseGPT 50% sparsity in the 2:4 pattern, weights stay 16-bit",
    "2:4+FP8_DYNAMIC": "SparseGPT 2:4, then FP8 per-channel weights with per-token dynamic FP8 activations",
    "2:4+W4A16": "SparseGPT 2:4, then per-channel INT4 GPTQ that keeps every pruned weight at zero",
    "W8A8": "INT8 per-channel weights with GPTQ, INT8 per-token dynamic activations",
}

_FP8_W = dict(num_bits=8, type="float", symmetric=True)
SCHEME_PRESETS: dict[str, dict[str, dict | None]] = {
    "W4A16": {"weights": dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128),
              "input_activations": None},
    "W8A16": {"weights": dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
              "input_activations": None},
    "W8A8": {"weights": dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
             "input_activations": dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)},
    "FP8": {"weights": dict(_FP8_W, strategy="tensor"),
            "input_activations": dict(_FP8_W, strategy="tensor", dynamic=False)},
    "FP8_DYNAMIC": {"weights": dict(_FP8_W, strategy="channel"),
                    "input_activations": dict(_FP8_W, strategy="token", dynamic=True)},
}

MODIFIER_FIELDS = {
    "QuantizationModifier": {"targets", "ignore", "scheme", "config_groups"},
    "GPTQModifier": {"targets", "ignore", "scheme", "config_groups", "block_size", "dampening_frac", "actorder"},
    "SparseGPTModifier": {"targets", "ignore", "sparsity", "mask_structure", "block_size", "dampening_frac"},
}
MODIFIER_FIELDS["SparseGPTModifier"] = MODIFIER_FIELDS["SparseGPTModifier"] | {"reconstruction"}
MODIFIER_FIELDS[FINETUNE] = set(FinetuneSettings.__dataclass_fields__)  # its own stage; see compression.distill
ARGS_FIELDS = {"num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "actorder",
               "observer", "observer_kwargs", "block_structure", "scale_dtype", "zp_dtype"}
GROUP_FIELDS = {"targets", "weights", "input_activations", "output_activations", "format"}
PRESET_GROUP_SIZES = (32, 64, 128)


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

    @property
    def quantizes(self) -> bool:
        return self.kind in ("QuantizationModifier", "GPTQModifier")

    def scheme_for(self, name: str, class_name: str) -> SchemeGroup | None:
        """The config group whose targets match this module (first match wins)."""
        for group in self.config_groups.values():
            if matches_any(group.targets, name, class_name):
                return group
        return None

    def to_dict(self) -> dict:
        if self.finetune is not None:
            return self.finetune.to_dict()
        out: dict[str, Any] = {"targets": list(self.targets), "ignore": list(self.ignore)}
        if self.quantizes:
            out["config_groups"] = {k: g.to_dict() for k, g in self.config_groups.items()}
        if self.kind in ("GPTQModifier", "SparseGPTModifier"):
            out["block_size"] = self.block_size
            out["dampening_frac"] = self.dampening_frac
        if self.kind == "GPTQModifier":
            out["actorder"] = self.actorder
        if self.kind == "SparseGPTModifier":
            out["sparsity"] = self.sparsity
            out["mask_structure"] = self.mask_structure
            if self.reconstruction is not None:
                out["reconstruction"] = self.reconstruction.to_dict()
        return out


@dataclass
class Stage:
    name: str
    group: str  # the "<x>_modifiers" key under the stage
    modifiers: list[Modifier]


def matches_any(patterns: list[str], name: str, class_name: str) -> bool:
    """compressed-tensors target matching: a class name, an exact module name, or ``re:<regex>``."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if pattern_matches(pattern[3:], name):
                return True
        elif pattern in (name, class_name):
            return True
    return False


# -- bounded pattern matching ---------------------------------------------------------------------
# `re:` patterns come from users and run against module names inside a web request (pre-flight) and
# in the worker. Python's `re` backtracks without limit (one pattern held a request for 32 s), so
# they are short, matched with the `regex` engine under a per-match timeout, and, inside
# `pattern_time_budget`, under a total deadline too.
MAX_PATTERN_CHARS = 256
PATTERN_MATCH_TIMEOUT_S = 0.05
_pattern_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("pattern_deadline", default=None)


class PatternTooSlow(RecipeError):
    def __init__(self, pattern: str):
        super().__init__("recipe", f"the pattern 're:{pattern}' takes too long to match module names "
                                   "(nested repetition?); use a simpler pattern or list the module names")


@functools.lru_cache(maxsize=512)
def _compiled_pattern(pattern: str) -> Any:
    return regex.compile(pattern)


def pattern_matches(pattern: str, name: str) -> bool:
    """``re.match(pattern, name)``, but never longer than PATTERN_MATCH_TIMEOUT_S (nor past the
    current `pattern_time_budget`); a pattern that needs more raises PatternTooSlow."""
    timeout = PATTERN_MATCH_TIMEOUT_S
    deadline = _pattern_deadline.get()
    if deadline is not None:
        timeout = min(timeout, deadline - time.monotonic())
        if timeout <= 0:
            raise PatternTooSlow(pattern)
    try:
        return _compiled_pattern(pattern).match(name, timeout=timeout) is not None
    except TimeoutError:
        raise PatternTooSlow(pattern) from None


@contextlib.contextmanager
def pattern_time_budget(seconds: float) -> Iterator[None]:
    """All pattern matching inside the block together may take at most ``seconds``."""
    token = _pattern_deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _pattern_deadline.reset(token)


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
        for i, (stage_name, body) in enumerate(data.items()):
            path = f"stages[{i}]"
            if not isinstance(body, dict) or len(body) != 1:
                raise RecipeError(path, f"stage {stage_name!r} must hold exactly one '<name>_modifiers' mapping")
            group_name, mods = next(iter(body.items()))
            if not str(group_name).endswith("_modifiers") or not isinstance(mods, dict) or not mods:
                raise RecipeError(path, f"expected '<name>_modifiers: {{ModifierName: {{...}}}}', got {group_name!r}")
            modifiers = [_parse_modifier(kind, args, f"{path}.modifiers[{j}]")
                         for j, (kind, args) in enumerate(mods.items())]
            stages.append(Stage(str(stage_name), str(group_name), modifiers))
        recipe = cls(stages, preset=preset, preset_options=preset_options)
        recipe._validate_order()
        return recipe

    # outputs ----------------------------------------------------------------------------
    def stage_dict(self) -> dict:
        return {s.name: {s.group: {m.kind: m.to_dict() for m in s.modifiers}} for s in self.stages}

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

    @property
    def needs_calibration(self) -> bool:
        for m in self.modifiers:
            if m.kind in ("GPTQModifier", "SparseGPTModifier"):
                return True
            if any(g.input_activations and not g.input_activations.dynamic for g in m.config_groups.values()):
                return True
        return False

    def describe(self) -> str:
        parts = []
        for m in self.modifiers:
            if m.finetune is not None:
                parts.append(m.finetune.describe())
                continue
            if m.kind == "SparseGPTModifier":
                parts.append((f"SparseGPT {m.mask_structure} ({m.sparsity:.0%})" if m.mask_structure != "0:0"
                              else f"SparseGPT unstructured {m.sparsity:.0%}")
                             + (" + layer-wise reconstruction" if m.reconstruction else ""))
                continue
            for g in m.config_groups.values():
                parts.append(("GPTQ " if m.kind == "GPTQModifier" else "") + _describe_group(g, m))
        text = " → ".join(parts)
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
        for i, stage in enumerate(self.stages):
            for j, m in enumerate(stage.modifiers):
                if m.quantizes:
                    seen_quant = True
                elif seen_quant:
                    raise RecipeError(f"stages[{i}].modifiers[{j}]",
                                      "SparseGPTModifier must come before quantization modifiers "
                                      "(pruning quantized weights would move them off the grid)")


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


def _validate_finetune_order(recipe: "Recipe") -> None:
    """A fine-tune stage: its own stage, once, after a sparsity modifier and before any quantization."""
    seen_sparsity = seen_quant = found = False
    for i, stage in enumerate(recipe.stages):
        for j, m in enumerate(stage.modifiers):
            path = f"stages[{i}].modifiers[{j}]"
            if m.kind != FINETUNE:
                seen_sparsity |= m.kind == "SparseGPTModifier"
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
        kind = "FP8" if w.type == "float" else f"INT{w.num_bits}"
        gran = f"group {w.group_size}" if w.strategy == "group" else f"per-{w.strategy}"
        text = f"{kind} weights ({gran}"
        if m.kind == "GPTQModifier" and m.actorder:
            text += f", act-order {m.actorder}"
        text += ")"
    a = g.input_activations
    if a:
        kind = "FP8" if a.type == "float" else f"INT{a.num_bits}"
        text += f", {kind} activations ({'dynamic' if a.dynamic else 'static'} per-{a.strategy})"
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
    m.targets = _str_list(args.get("targets", ["Linear"]), f"{path}.targets")
    m.ignore = _str_list(args.get("ignore", ["lm_head"]), f"{path}.ignore")
    if "block_size" in args:
        m.block_size = _int(args["block_size"], f"{path}.block_size", lo=4)
        if m.block_size % 4:
            raise RecipeError(f"{path}.block_size", "must be a multiple of 4 (2:4 groups may not straddle blocks)")
    if "dampening_frac" in args:
        m.dampening_frac = _float(args["dampening_frac"], f"{path}.dampening_frac", 0.0, 1.0)
    if kind == "GPTQModifier":
        m.actorder = _actorder(args.get("actorder", "static"), f"{path}.actorder")
    if kind == "SparseGPTModifier":
        m.mask_structure = str(args.get("mask_structure", "2:4"))
        if m.mask_structure == "unstructured":
            m.mask_structure = "0:0"
        if m.mask_structure not in ("2:4", "0:0"):
            raise RecipeError(f"{path}.mask_structure", "allowed: '2:4' or '0:0' (unstructured)")
        m.sparsity = _float(args.get("sparsity", 0.5), f"{path}.sparsity", 0.0, 1.0)
        if m.mask_structure == "2:4" and m.sparsity != 0.5:
            raise RecipeError(f"{path}.sparsity", "must be 0.5 with mask_structure '2:4'")
        if not 0 < m.sparsity < 1:
            raise RecipeError(f"{path}.sparsity", "must be strictly between 0 and 1")
        m.reconstruction = _parse_reconstruction(args.get("reconstruction"), f"{path}.reconstruction")
    if m.quantizes:
        has_scheme, has_groups = "scheme" in args, "config_groups" in args
        if has_scheme == has_groups:
            raise RecipeError(path, f"{kind} needs exactly one of 'scheme' (a preset name: "
                              f"{', '.join(SCHEME_PRESETS)}) or 'config_groups'")
        if has_scheme:
            m.config_groups = _scheme_groups(args["scheme"], m.targets, f"{path}.scheme")
        else:
            groups = args["config_groups"]
            if not isinstance(groups, dict) or not groups:
                raise RecipeError(f"{path}.config_groups", "must be a non-empty mapping group_0: {...}")
            m.config_groups = {str(k): _parse_group(v, f"{path}.config_groups.{k}") for k, v in groups.items()}
        for gname, g in m.config_groups.items():
            gpath = f"{path}.config_groups.{gname}"
            if kind == "GPTQModifier" and (g.weights is None or g.weights.type != "int"):
                raise RecipeError(f"{gpath}.weights", "GPTQModifier needs integer weights (num_bits 4 or 8, "
                                  "type int); use QuantizationModifier for FP8")
            if kind == "QuantizationModifier" and g.weights and g.weights.actorder:
                raise RecipeError(f"{gpath}.weights.actorder", "act-order only applies to GPTQModifier")
            if kind == "GPTQModifier" and g.weights and g.weights.actorder is None and m.actorder:
                g.weights = _replace(g.weights, actorder=m.actorder)
    return m


def _parse_reconstruction(raw: Any, path: str) -> ReconstructionSettings | None:
    """SparseGPTModifier ``reconstruction``: null/false (off), true (defaults) or a mapping of
    steps, lr, batch_size, optimizer, target (see compression.reconstruction)."""
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
    if isinstance(values["lr"], str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            values["lr"] = float(values["lr"])
        except ValueError:
            pass
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


def _scheme_groups(scheme: Any, targets: list[str], path: str) -> dict[str, SchemeGroup]:
    if isinstance(scheme, str):
        if scheme not in SCHEME_PRESETS:
            raise RecipeError(path, f"unknown scheme {scheme!r}; allowed: {', '.join(SCHEME_PRESETS)}")
        return {"group_0": _preset_group(scheme, targets)}
    if isinstance(scheme, dict) and scheme:
        out = {}
        for i, (name, tgts) in enumerate(scheme.items()):
            if name not in SCHEME_PRESETS:
                raise RecipeError(f"{path}.{name}", f"unknown scheme; allowed: {', '.join(SCHEME_PRESETS)}")
            out[f"group_{i}"] = _preset_group(name, _str_list(tgts, f"{path}.{name}"))
        return out
    raise RecipeError(path, "must be a scheme name or a mapping {scheme name: [targets]}")


def _preset_group(name: str, targets: list[str]) -> SchemeGroup:
    p = SCHEME_PRESETS[name]
    return SchemeGroup(list(targets), QuantArgs(**p["weights"]) if p["weights"] else None,
                       QuantArgs(**p["input_activations"]) if p["input_activations"] else None)


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
    if weights is None:
        raise RecipeError(f"{path}.weights", "weights must be quantized (activation-only schemes are not supported)")
    return SchemeGroup(targets, weights, acts)


def _parse_args(raw: Any, path: str, *, weights: bool) -> QuantArgs | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RecipeError(path, "must be a mapping of QuantizationArgs or null")
    unknown = sorted(set(raw) - ARGS_FIELDS)
    if unknown:
        raise RecipeError(f"{path}.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(ARGS_FIELDS))}")
    for key in ("block_structure", "scale_dtype", "zp_dtype"):
        if raw.get(key) is not None:
            raise RecipeError(f"{path}.{key}", "not supported by this engine; use null")
    if raw.get("observer_kwargs"):
        raise RecipeError(f"{path}.observer_kwargs", "observer options are not supported; use {}")
    typ = raw.get("type", "int")
    if typ not in ("int", "float"):
        raise RecipeError(f"{path}.type", "allowed: 'int' or 'float'")
    bits = _int(raw.get("num_bits", 8), f"{path}.num_bits", lo=1)
    if typ == "float" and bits != 8:
        raise RecipeError(f"{path}.num_bits", "float quantization supports only 8 bits (FP8 E4M3)")
    if typ == "int" and bits not in ((4, 8) if weights else (8,)):
        raise RecipeError(f"{path}.num_bits", "allowed: 4 or 8 for int weights, 8 for int activations")
    if raw.get("symmetric", True) is not True:
        raise RecipeError(f"{path}.symmetric", "only symmetric quantization is supported; use true")
    group_size = raw.get("group_size")
    strategy = raw.get("strategy")
    if strategy is None:
        strategy = "tensor" if group_size is None else ("channel" if group_size == -1 else "group")
    if group_size == -1:
        group_size = None
    allowed = ("tensor", "channel", "group") if weights else ("tensor", "token")
    if strategy not in allowed:
        raise RecipeError(f"{path}.strategy", f"allowed: {', '.join(allowed)}")
    if strategy == "group":
        group_size = _int(group_size, f"{path}.group_size", lo=1) if group_size is not None else None
        if group_size is None:
            raise RecipeError(f"{path}.group_size", "strategy 'group' needs a positive group_size (32, 64 or 128)")
        if typ == "float":
            raise RecipeError(f"{path}.strategy", "FP8 weights support 'tensor' or 'channel' only")
    elif group_size is not None:
        raise RecipeError(f"{path}.group_size", f"only used with strategy 'group' (strategy is {strategy!r})")
    dynamic = raw.get("dynamic", False)
    if dynamic not in (True, False):
        raise RecipeError(f"{path}.dynamic", "must be true or false")
    if weights and dynamic:
        raise RecipeError(f"{path}.dynamic", "weights are always static; use false")
    if strategy == "token" and not dynamic:
        raise RecipeError(f"{path}.dynamic", "strategy 'token' requires dynamic: true")
    if not weights and not dynamic and (typ != "float"):
        raise RecipeError(f"{path}.dynamic", "static activation quantization is only supported for FP8")
    actorder = raw.get("actorder")
    if actorder is not None and not weights:
        raise RecipeError(f"{path}.actorder", "actorder only applies to weights")
    actorder = _actorder(actorder, f"{path}.actorder")
    observer = raw.get("observer") or "minmax"
    if observer not in ("minmax", "mse"):
        raise RecipeError(f"{path}.observer", "allowed: 'minmax' or 'mse'")
    return QuantArgs(num_bits=bits, type=typ, symmetric=True, strategy=strategy, group_size=group_size,
                     dynamic=bool(dynamic), actorder=actorder, observer=observer)


def _actorder(value: Any, path: str) -> str | None:
    if value in (None, False):
        return None
    if value in ("static", "weight"):
        return "static"
    raise RecipeError(path, "allowed: 'static' (groups stay in column order) or null; "
                      "'group'/'dynamic' act-order (g_idx) is not supported")


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
}


PRESET_RECONSTRUCTION = False  # 2:4 presets: layer-wise reconstruction unless the option says otherwise


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
