"""Mixture-of-experts layers as per-expert Linears, and the module names a family's checkpoints use.

transformers 5 keeps the experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ... as one module
holding fused 3-D parameters (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]), not as
``nn.Linear``s. :func:`unfuse_experts` swaps each such module for :class:`PerExpertLinears`: the
same forward signature ``(hidden_states, top_k_index, top_k_weights)`` and routing (or Llama 4's
pre-routed ``(hidden_states)``), the fused layout read off the shapes (transposed or not, gate/up rows
concatenated or interleaved as gpt-oss keeps them), but one ``gate``/``up``/``down`` ``nn.Linear`` per
expert, so

* forward hooks on an expert's Linears see exactly the tokens the router sent to that expert
  (per-expert GPTQ/SparseGPT statistics), or, with ``calibrate_all_experts``, every token while
  the layer output still uses only the routed ones (llm-compressor's ``calibrate_all_experts``);
* every expert is a separate target that recipes match by name and export writes under the
  per-expert names of the family's own checkpoints and vLLM's loaders.

Names: a module path in our model (``model.layers.0.mlp.experts.3.w1``) becomes a checkpoint name
by transformers' own conversion mapping for the family, reversed, the way ``save_pretrained``
writes it (Mixtral: ``.mlp.`` → ``.block_sparse_moe.``); the per-expert projection names come
from the same mapping's expert converters (Mixtral ``w1``/``w3``/``w2``, the Qwen-MoE family
``gate_proj``/``up_proj``/``down_proj``). See :class:`CheckpointNames`.

Routers (the ``gate`` next to ``experts``, Qwen2-MoE's ``shared_expert_gate``) stay 16-bit:
:func:`is_router` names them for the planner and the export's ``ignore``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compression.errors import UnsupportedModelError

DEFAULT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: 3-D ``down_proj`` parameter (one slice per expert)."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.dim() == 3


def check_fused_experts(name: str, module: nn.Module) -> None:
    """Raise ``UnsupportedModelError`` naming what a fused experts module lacks for :class:`PerExpertLinears`."""
    cls = type(module).__name__
    problems = []
    gate_up = getattr(module, "gate_up_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3):
        problems.append("a 3-D gate_up_proj parameter (experts without a gated MLP)")
    elif transposed_layout(module) is None:
        problems.append(f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(module.down_proj.shape)} "
                        "shaped as [E, 2I, H] and [E, H, I] (or both transposed)")
    if getattr(module, "has_post_expert_norm", False):
        problems.append("no per-expert output norm")
    if not callable(getattr(module, "act_fn", None)) and not hasattr(module, "_apply_gate"):
        problems.append("an act_fn")
    if problems:
        raise UnsupportedModelError(f"cannot split the experts of {name} ({cls}) into per-expert Linears: "
                                    f"the engine needs {'; '.join(problems)}")


def transposed_layout(fused: nn.Module) -> bool | None:
    """Whether the fused weights are stored transposed ([E, H, 2I] / [E, I, H], as Llama 4 and gpt-oss do)
    rather than [E, 2I, H] / [E, H, I]; read off the shapes (``is_transposed`` is not set on every
    family's class), None when they fit neither."""
    gate_up, down = fused.gate_up_proj.shape, fused.down_proj.shape
    plain = gate_up[2] == down[1] and gate_up[1] == 2 * down[2]
    transposed = gate_up[1] == down[2] and gate_up[2] == 2 * down[1]
    if plain and transposed:  # only when H == 2I == I: impossible for I > 0; trust the class
        return bool(getattr(fused, "is_transposed", False))
    return True if transposed else False if plain else None


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))`` with checkpoint-named Linears."""

    def __init__(self, names: tuple[str, str, str], gate: nn.Linear, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.names = names
        for attr, linear in zip(names, (gate, up, down)):
            self.add_module(attr, linear)

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return tuple(getattr(self, n) for n in self.names)  # type: ignore[return-value]


class PerExpertLinears(nn.Module):
    """Stand-in for a fused experts module; children ``"0"``..``"E-1"`` are :class:`ExpertMLP`."""

    def __init__(self, fused: nn.Module, names: tuple[str, str, str]):
        super().__init__()
        self.num_experts = int(fused.down_proj.shape[0])
        self.act_fn = getattr(fused, "act_fn", None)
        # the family's own gating (transformers' experts classes define ``_apply_gate(self, gate_up_out)``)
        self._apply_gate_impl = getattr(type(fused), "_apply_gate", None)
        self.calibrate_all_experts = False
        self.routed_tokens = torch.zeros(self.num_experts, dtype=torch.long)  # per expert, since reset
        self.tokens = 0  # tokens that entered the block since reset
        # the family's own scalars its gating reads (gpt-oss: ``alpha``, ``limit``)
        for key, value in vars(fused).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float)) and not hasattr(self, key):
                setattr(self, key, value)
        gate_up, down = fused.gate_up_proj, fused.down_proj
        self.fused_transposed = bool(transposed_layout(fused))  # how the fused tensors lie (streaming.FusedExpertsReader)
        if self.fused_transposed:  # [E, H, 2I] / [E, I, H]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        # gate and up rows: concatenated [gate; up] (most families) or interleaved (gpt-oss: gate even, up odd)
        self.concatenated = bool(getattr(fused, "is_concatenated", True))
        inter = gate_up.shape[1] // 2
        rows = ((slice(0, inter), slice(inter, None)) if self.concatenated else
                (slice(0, None, 2), slice(1, None, 2)))
        gate_up_bias = getattr(fused, "gate_up_proj_bias", None)
        down_bias = getattr(fused, "down_proj_bias", None)
        for e in range(self.num_experts):
            linears = []
            for weight, bias in ((gate_up[e, rows[0]], None if gate_up_bias is None else gate_up_bias[e, rows[0]]),
                                 (gate_up[e, rows[1]], None if gate_up_bias is None else gate_up_bias[e, rows[1]]),
                                 (down[e], None if down_bias is None else down_bias[e])):
                linears.append(_linear(weight, bias))
            self.add_module(str(e), ExpertMLP(names, *linears))

    def reset_counts(self) -> None:
        self.routed_tokens.zero_()
        self.tokens = 0

    def seen_tokens(self, index: int) -> int:
        """Calibration tokens expert ``index``'s statistics saw since the last reset."""
        return self.tokens if self.calibrate_all_experts else int(self.routed_tokens[index])

    def expert(self, index: int) -> ExpertMLP:
        return getattr(self, str(index))

    def _gated(self, gate_out: torch.Tensor, up_out: torch.Tensor) -> torch.Tensor:
        if self._apply_gate_impl is not None:  # in the fused layout the family's gating reads
            gate_up = (torch.cat([gate_out, up_out], dim=-1) if self.concatenated else
                       torch.stack([gate_out, up_out], dim=-1).flatten(-2))
            return self._apply_gate_impl(self, gate_up)
        return self.act_fn(gate_out) * up_out

    def run_expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.expert(index).projections()
        return down(self._gated(gate(x), up(x)))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if top_k_index is None:
            return self._forward_prerouted(hidden_states)
        _refuse_padding()
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hits = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).sum(dim=(0, 1))
            self.routed_tokens += hits.to(self.routed_tokens.device, torch.long)
            self.tokens += int(hidden_states.shape[0])
        for e in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == e)
            if self.calibrate_all_experts:
                # every token reaches the hooks; only the routed rows count in the output
                expert_out = self.run_expert(e, hidden_states)[token_idx]
            elif token_idx.numel() == 0:
                continue
            else:
                expert_out = self.run_expert(e, hidden_states[token_idx])
            weighted = expert_out * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, weighted.to(out.dtype))
        return out

    def _forward_prerouted(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Llama 4's experts call: ``hidden_states`` is [E x T, H], expert ``e``'s block of T rows already
        scaled by its router score (all-zero rows for the tokens not routed to it). Each expert runs on
        its routed rows (an expert without biases maps a zero row to zero), or with
        ``calibrate_all_experts`` on its whole block, so its hooks see every token."""
        _refuse_padding()
        blocks = hidden_states.reshape(self.num_experts, -1, hidden_states.shape[-1])
        out = torch.zeros_like(blocks)
        routed = blocks.detach().abs().amax(dim=-1) > 0  # [E, T]
        with torch.no_grad():
            self.routed_tokens += routed.sum(dim=1).to(self.routed_tokens.device, torch.long)
            self.tokens += int(blocks.shape[1])
        for e in range(self.num_experts):
            if self.calibrate_all_experts:
                out[e] = self.run_expert(e, blocks[e]).to(out.dtype)
                continue
            rows = torch.where(routed[e])[0]
            if rows.numel():
                out[e, rows] = self.run_expert(e, blocks[e, rows]).to(out.dtype)
        return out.reshape(hidden_states.shape)


def _refuse_padding() -> None:
    """compress_model never pads an MoE model's calibration batches: an expert's statistics would count pad
    tokens routed to it."""
    from compression.model_io.walk import PaddingMismatch, token_mask

    if token_mask() is not None:
        raise PaddingMismatch("MoE experts cannot leave the pad positions of a padded calibration batch "
                              "out of their token counts; run such models one sample per call")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone() if not weight.is_meta else
                                 torch.empty_like(weight, device="meta"), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone() if not bias.is_meta else
                                   torch.empty_like(bias, device="meta"), requires_grad=False)
    return linear


def unsplittable_experts(name: str, module: nn.Module) -> str | None:
    """Why ``module`` (at ``name``) holds expert weights the engine can neither split nor leave alone
    safely, or None: a 3-D weight outside a convolution that is not a transformers 5 fused-experts module
    (JetMoE's ``ParallelExperts``). Compressing around it would leave most of the model 16-bit while its
    routers, plain Linears not next to an ``experts`` module, were quantized."""
    if is_fused_experts(module) or isinstance(module, nn.modules.conv._ConvNd):
        return None
    for pname, param in module.named_parameters(recurse=False):
        if param.dim() == 3 and param.shape[0] > 1:
            return (f"{name} ({type(module).__name__}) holds 3-D weights ({pname} {tuple(param.shape)}), experts "
                    "the engine cannot split into per-expert Linears")
    return None


def unfuse_experts(model: nn.Module, names: "CheckpointNames | None" = None) -> list[str]:
    """Replace every fused experts module of ``model`` by :class:`PerExpertLinears` (in place).

    Returns the module paths replaced. Works on the meta device too (for pre-flight checks and the
    compressed runtime's skeleton).
    """
    from compression.model_io.walk import decoder_layers

    names = names or CheckpointNames.for_model(model)
    try:
        prefix, layers = decoder_layers(model)
    except UnsupportedModelError:
        prefix, layers = "", []
    for index, layer in enumerate(layers):  # the decoder's own modules (a vision tower's may hold 3-D weights)
        for n, m in layer.named_modules():
            reason = unsplittable_experts(f"{prefix}.{index}.{n}".rstrip("."), m)
            if reason:
                raise UnsupportedModelError(reason)
    return split_fused_experts(model, names)


def split_fused_experts(root: nn.Module, names: "CheckpointNames") -> list[str]:
    """Replace the fused experts modules under ``root`` (a model, or one decoder layer) by
    :class:`PerExpertLinears`, in place; returns their paths under ``root``."""
    fused = [(n, m) for n, m in root.named_modules() if is_fused_experts(m)]
    for name, module in fused:
        check_fused_experts(name, module)
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, PerExpertLinears(module, names.projections))
        del module
    return [n for n, _ in fused]


def per_expert_modules(model: nn.Module) -> list[tuple[str, PerExpertLinears]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PerExpertLinears)]


def is_router(parent: nn.Module | None, attr: str) -> bool:
    """A router/gate of an MoE block: named ``gate``/``router``/``shared_expert_gate`` next to experts."""
    return parent is not None and attr in ROUTER_NAMES and hasattr(parent, "experts")


def in_router(root: nn.Module, path: str) -> bool:
    """Whether the module at ``path`` under ``root`` is a router or lies inside one (HunYuan's ``gate.wg``)."""
    parts = path.split(".")
    module = root
    for part in parts:
        if is_router(module, part):
            return True
        module = getattr(module, part, None)
        if module is None:
            return False
    return False


def router_names(model: nn.Module) -> list[str]:
    """Module paths of every MoE router in ``model`` (Linear or not)."""
    found = []
    for name, module in model.named_modules():
        for attr in ROUTER_NAMES:
            if is_router(module, attr) and isinstance(getattr(module, attr, None), nn.Module):
                found.append(f"{name}.{attr}" if name else attr)
    return found


def router_weight_names(model: nn.Module) -> list[str]:
    """What a checkpoint's ``ignore`` must name to keep every router 16-bit: the router itself when it
    holds its weight (a Linear, a TopKRouter), else the Linears inside it (HunYuan's ``gate.wg``)."""
    found = []
    for path in router_names(model):
        router = model.get_submodule(path)
        inner = [f"{path}.{n}" for n, m in router.named_modules() if n and isinstance(m, nn.Linear)]
        found.extend(inner if inner and not isinstance(router, nn.Linear) else [path])
    return found


@dataclass
class CheckpointNames:
    """Module path ↔ checkpoint name for one model family, from transformers' conversion mapping."""

    to_checkpoint_renamings: list[Any]
    to_module_renamings: list[Any]
    projections: tuple[str, str, str] = DEFAULT_PROJECTIONS

    @classmethod
    def for_model(cls, model: nn.Module) -> "CheckpointNames":
        conversions = _conversions(model)
        forward = [c for c in conversions if type(c).__name__ == "WeightRenaming"]
        reverse = [c.reverse_transform() for c in forward[::-1]]
        return cls(reverse, forward, _expert_projection_names(conversions))

    def checkpoint(self, module_key: str) -> str:
        """``model.layers.0.mlp.experts.3.w1.weight`` → ``model.layers.0.block_sparse_moe.experts.3.w1.weight``."""
        return _rename(module_key, self.to_checkpoint_renamings)

    def module(self, checkpoint_key: str) -> str:
        """Inverse of :meth:`checkpoint`."""
        return _rename(checkpoint_key, self.to_module_renamings)


def _rename(key: str, renamings: list[Any]) -> str:
    for renaming in renamings:
        key, _ = renaming.rename_source_key(key)
    return key


def _conversions(model: nn.Module) -> list[Any]:
    if not hasattr(model, "config"):
        return []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # pragma: no cover - transformers < 5 has no conversion mapping
        return []
    conversions = get_model_conversion_mapping(model, add_legacy=False)
    # a model built from a config (not from_pretrained) must not gain a prefix, as in save_pretrained
    return [c for c in conversions if not isinstance(c, PrefixChange)]


def experts_stored_fused(model: nn.Module) -> bool:
    """Whether this family's checkpoints store its fused MoE experts as they are in memory (gpt-oss,
    Llama 4): transformers' conversion mapping has no converter merging per-expert tensors into them."""
    if not any(is_fused_experts(m) for m in model.modules()):
        return False
    return not any(any(t.endswith("experts.gate_up_proj") for t in targets)
                   for targets, _ in _weight_converters(_conversions(model)))


def _weight_converters(conversions: list[Any]) -> list[tuple[list[str], list[str]]]:
    """(target patterns, source patterns) of transformers' WeightConverters (the ones that merge tensors on load)."""
    return [([str(t) for t in getattr(c, "target_patterns", [])],
             [str(p) for p in getattr(c, "_original_source_patterns", getattr(c, "source_patterns", []))])
            for c in conversions if type(c).__name__ == "WeightConverter"]


_EXPERT_SOURCE = re.compile(r"experts\.\*\.([A-Za-z0-9_]+)\.weight$")


def _expert_projection_names(conversions: list[Any]) -> tuple[str, str, str]:
    """(gate, up, down) per-expert names from the converters that fuse them into ``gate_up_proj`` / ``down_proj``."""
    gate_up: list[str] = []
    down: list[str] = []
    for targets, patterns in _weight_converters(conversions):
        sources = [m.group(1) for s in patterns if (m := _EXPERT_SOURCE.search(s.replace("\\", "")))]
        if any(t.endswith("experts.gate_up_proj") for t in targets) and len(sources) == 2:
            gate_up = sources
        elif any(t.endswith("experts.down_proj") for t in targets) and len(sources) == 1:
            down = sources
    if gate_up and down:
        return gate_up[0], gate_up[1], down[0]
    return DEFAULT_PROJECTIONS
