"""A small compressed-tensors checkpoint writer for the runtime tests (doc §2), independent of the engine.

``write_checkpoint`` quantizes a tiny Llama's Linears (lm_head stays dense) for one scheme and
returns a *reference* model: the same network with the dequantized weights and, for W8A8 schemes,
activations fake-quantized per token / per tensor exactly as the runtime does.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kernels.w8a8 import FP8_DTYPE, quantize_per_token_reference
from tests.kernels.helpers import pack_int4_by_hand

SCHEMES = ["FP8_DYNAMIC", "FP8", "W4A16", "W4A16-channel", "W8A8", "2:4", "2:4+FP8_DYNAMIC", "2:4+W4A16"]
GROUP = 32
STATIC_INPUT_SCALE = 6.0 / 448.0


def _args(num_bits: int, kind: str, strategy: str, dynamic: bool = False, group_size: int | None = None) -> dict:
    return {"num_bits": num_bits, "type": kind, "symmetric": True, "strategy": strategy,
            "group_size": group_size, "dynamic": dynamic, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}


def _scheme(name: str) -> tuple[str, dict] | None:
    """(format, config group) per doc §2.5, or None for a dense (2:4 only) checkpoint."""
    base = name.removeprefix("2:4+")
    if base == "2:4":
        return None
    if base == "FP8_DYNAMIC":
        return "float-quantized", {"weights": _args(8, "float", "channel"),
                                   "input_activations": _args(8, "float", "token", dynamic=True)}
    if base == "FP8":
        return "float-quantized", {"weights": _args(8, "float", "tensor"),
                                   "input_activations": _args(8, "float", "tensor")}
    if base == "W4A16":
        return "pack-quantized", {"weights": _args(4, "int", "group", group_size=GROUP), "input_activations": None}
    if base == "W4A16-channel":
        return "pack-quantized", {"weights": _args(4, "int", "channel"), "input_activations": None}
    if base == "W8A8":
        return "int-quantized", {"weights": _args(8, "int", "channel"),
                                 "input_activations": _args(8, "int", "token", dynamic=True)}
    raise ValueError(name)


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the two largest-magnitude weights of every four input columns."""
    rows, cols = w.shape
    groups = w.reshape(rows, cols // 4, 4)
    keep = groups.abs().topk(2, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True)
    return (groups * mask).reshape(rows, cols) + 0.0


def _quantize(base: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(checkpoint tensors without the prefix, dequantized fp32 weight)."""
    if base in ("W4A16", "W4A16-channel"):
        rows, cols = w.shape
        g = GROUP if base == "W4A16" else cols
        scale = w.reshape(rows, cols // g, g).abs().amax(dim=2) / 7.5
        q = torch.round(w / scale.repeat_interleave(g, dim=1)).clamp(-8, 7).to(torch.int8)
        deq = q.float() * scale.repeat_interleave(g, dim=1)
        return {"weight_packed": pack_int4_by_hand(q), "weight_scale": scale,
                "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}, deq
    if base == "W8A8":
        scale = w.abs().amax(dim=1, keepdim=True) / 127.5
        q = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
        return {"weight": q, "weight_scale": scale}, q.float() * scale
    per_tensor = base == "FP8"
    scale = (w.abs().amax().reshape(1) if per_tensor else w.abs().amax(dim=1, keepdim=True)) / 448.0
    q = (w / scale.reshape(-1, 1) if not per_tensor else w / scale).clamp(-448, 448).to(FP8_DTYPE)
    tensors = {"weight": q, "weight_scale": scale}
    if per_tensor:
        tensors["input_scale"] = torch.tensor([STATIC_INPUT_SCALE])
    return tensors, q.float() * (scale.reshape(-1, 1) if not per_tensor else scale)


def _act_quant_hook(qdtype: torch.dtype, input_scale: torch.Tensor | None):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        q, s = quantize_per_token_reference(x.reshape(-1, x.shape[-1]), input_scale, qdtype)
        return ((q.float() * s).to(x.dtype).reshape(x.shape),)
    return hook


def write_checkpoint(model: nn.Module, scheme: str, out_dir: Path, ignore: tuple[str, ...] = ()) -> nn.Module:
    """Save ``model`` compressed with ``scheme`` into ``out_dir`` (two shards + index); return the reference."""
    sparse = scheme.startswith("2:4")
    base = scheme.removeprefix("2:4+")
    fmt_group = _scheme(scheme)
    reference = copy.deepcopy(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in out_dir.glob("*.safetensors*"):
        f.unlink()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # as save_pretrained does for tied weights
    ignored = ["lm_head", *ignore]
    for name, module in reference.named_modules():
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        if any(re.match(p[3:], name) if p.startswith("re:") else p == name for p in ignore):
            continue
        w = module.weight.detach().float()
        if sparse:
            w = prune_24(w)
        del state[f"{name}.weight"]
        if fmt_group is None:
            tensors, deq = {"weight": w}, w
        else:
            tensors, deq = _quantize(base, w)
            acts = fmt_group[1]["input_activations"]
            if acts is not None:
                qdtype = FP8_DTYPE if acts["type"] == "float" else torch.int8
                module.register_forward_pre_hook(_act_quant_hook(qdtype, tensors.get("input_scale")))
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
        module.weight.data.copy_(deq)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, names in shards.items():
        save_file({k: state[k] for k in names}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = json.loads((out_dir / "config.json").read_text())
    if fmt_group is not None:
        fmt, group = fmt_group
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], **group, "output_activations": None}},
            "ignore": ignored, "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}, "version": "tests-writer"}
    if sparse:
        config["compressor"] = {"sparsity_structure": "2:4"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return reference.eval()
