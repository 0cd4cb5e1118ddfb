"""Load a compressed-tensors checkpoint into a model whose quantized Linears are ``kernels`` modules.

The model skeleton is built with parameters on the meta device (buffers such as rotary frequencies
are computed for real), every targeted Linear is replaced by a compressed module filled straight from
the safetensors shards, and the remaining tensors (embeddings, norms, ignored Linears such as
``lm_head``) are loaded as ordinary parameters. Dense weights of compressed layers are only ever
decoded on the CPU (2:4 compaction); the GPU receives compressed buffers only.

MoE checkpoints hold one Linear per expert under the family's names (see :mod:`compression.model_io.moe`);
the skeleton's fused experts are split into per-expert Linears first, so each expert becomes its
own compressed module, and checkpoint names are mapped to module paths by the same
:class:`~compression.model_io.moe.CheckpointNames` the exporter used.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from compression.model_io.moe import CheckpointNames, unfuse_experts
from kernels.modules import Sparse24Linear, W4A16Linear, W8A8Linear
from kernels.packing import is_24_sparse, unpack_int4

log = logging.getLogger(__name__)

_OTHER_WEIGHT_FILES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack")
_LINEAR_SUFFIXES = ("weight", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                    "weight_g_idx", "weight_global_scale", "input_scale", "input_zero_point", "input_global_scale",
                    "bias")


class DequantLinear(nn.Module):
    """A format with no kernel on this device (zero points, act-order g_idx, NVFP4, FP8 block scales,
    INT8 weight-only, asymmetric or grouped activations): the weight is dequantized once at load time
    (exactly what compressed-tensors' decompression computes) and the activations are
    fake-quantized per the scheme, so the numerics equal the deployed format's."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, acts=None, input_scale=None,
                 input_zero_point=None, input_global_scale=None, kind: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", bias)
        self.acts, self.kind = acts, kind
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("input_zero_point", input_zero_point)
        self.register_buffer("input_global_scale", input_global_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.acts is not None:
            from compression.algorithms.quant import fake_quantize_activation

            x = fake_quantize_activation(x, self.acts, self.input_scale, self.input_zero_point,
                                         self.input_global_scale)
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dequantized from {self.kind}"


def _quant_args(raw: dict | None):
    """compressed-tensors QuantizationArgs dict → our QuantArgs (None stays None)."""
    if not raw:
        return None
    from compression.algorithms.quant import QuantArgs

    dynamic = raw.get("dynamic", False)
    return QuantArgs(num_bits=int(raw.get("num_bits", 8)), type=raw.get("type", "int"),
                     symmetric=bool(raw.get("symmetric", True)), strategy=raw.get("strategy") or "tensor",
                     group_size=raw.get("group_size"), dynamic=dynamic if dynamic == "local" else bool(dynamic),
                     block_structure=raw.get("block_structure"),
                     scale_dtype=(raw.get("scale_dtype") or "").removeprefix("torch.") or None)


def _needs_dequant(scheme: dict | None, t: dict[str, torch.Tensor]) -> str | None:
    """Why no kernel module fits this Linear (then it is dequantized), or None."""
    weights = (scheme or {}).get("weights") or {}
    acts = (scheme or {}).get("input_activations") or {}
    if "weight_zero_point" in t:
        return "asymmetric weights (zero points)"
    if "weight_g_idx" in t:
        return "act-order g_idx"
    if str(weights.get("scale_dtype") or "").endswith("uint8"):
        return "MX (E8M0 scales)"
    if "weight_global_scale" in t or (weights.get("type") == "float" and weights.get("num_bits") == 4):
        return "NVFP4"
    if weights.get("strategy") == "block":
        return "FP8 block scales"
    if "weight_packed" in t and weights.get("num_bits", 4) != 4:
        return f"pack-quantized INT{weights.get('num_bits')}"
    if acts and (not acts.get("symmetric", True) or acts.get("strategy") in ("group", "tensor_group")):
        return "asymmetric or grouped activations"
    if "weight" in t and (weights.get("num_bits", 8) != 8 or weights.get("strategy") in ("group", "block")):
        return f"{weights.get('num_bits', 8)}-bit {weights.get('strategy')} weights"
    if acts and acts.get("dynamic", False) and acts.get("strategy") not in ("token", None):
        return f"dynamic per-{acts.get('strategy')} activations"
    if acts and (acts.get("num_bits", 8) != 8 or acts.get("type", "int") != weights.get("type", "int")):
        return f"{acts.get('type', 'int')}{acts.get('num_bits', 8)} activations with {weights.get('type', 'int')} weights"
    if "weight" in t and t["weight"].dtype in (torch.float8_e4m3fn, torch.int8) and not acts:
        return "8-bit weight-only"
    if "weight" in t and t["weight"].dtype == torch.int8 and acts and not acts.get("dynamic", False):
        return "static INT8 activations"
    return None


def _dequantized_linear(name: str, scheme: dict, t: dict[str, torch.Tensor], dtype: torch.dtype,
                        why: str) -> DequantLinear:
    from compression.algorithms.quant import dequantize, mx_from_exponents, unpack_fp4
    from kernels.packing import unpack_int

    args = _quant_args(scheme.get("weights"))
    if args is None:
        raise CheckpointError(f"{name}: quantized tensors but no weights scheme in quantization_config")
    scale = t["weight_scale"]
    zp = t.get("weight_zero_point")
    g_idx = t.get("weight_g_idx")
    if args.is_mx:
        codes = unpack_fp4(t["weight_packed"]) if args.is_fp4 else t["weight"]
        weight = dequantize(codes, mx_from_exponents(scale), torch.float32, args=args)
    elif args.is_fp4:
        codes = unpack_fp4(t["weight_packed"])
        weight = dequantize(codes, scale.float(), torch.float32, args=args,
                            global_scale=t["weight_global_scale"].float())
    else:
        if "weight_packed" in t:
            out_f, in_f = (int(v) for v in t["weight_shape"])
            codes = unpack_int(t["weight_packed"], in_f, args.num_bits)
            if zp is not None:  # packed along the output dimension
                zp = unpack_int(zp.t().contiguous(), out_f, args.num_bits).t()
        else:
            codes = t["weight"]
        weight = dequantize(codes, scale.float(), torch.float32, args=args, zero_point=zp, g_idx=g_idx)
    bias = t["bias"].to(dtype) if "bias" in t else None
    acts = _quant_args(scheme.get("input_activations"))
    return DequantLinear(weight.to(dtype), bias, acts, t.get("input_scale"), t.get("input_zero_point"),
                         t.get("input_global_scale"), why)


class CheckpointError(ValueError):
    """The directory is not a checkpoint this loader can run (message says what to do)."""


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    others = sorted(p.name for pattern in _OTHER_WEIGHT_FILES for p in root.glob(pattern))
    if others:
        raise CheckpointError(f"{root} holds {', '.join(others)}: only safetensors checkpoints are supported; "
                              "re-save the model with save_pretrained(..., safe_serialization=True)")
    raise CheckpointError(f"{root} has no *.safetensors weight files")


def _matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    """compressed-tensors target matching: class name, exact module name, or ``re:`` regex (re.match)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == name or pattern == type(module).__name__ or (pattern == "Linear" and isinstance(module, nn.Linear)):
            return True
    return False


def _scheme(name: str, module: nn.Module, qconfig: dict | None) -> dict | None:
    """The config group (scheme dict) that quantizes this module, or None (not targeted / ignored)."""
    if not qconfig or _matches(name, module, qconfig.get("ignore") or []):
        return None
    for group_name, group in (qconfig.get("config_groups") or {}).items():
        if isinstance(group, list):  # preset form {"W4A16": ["Linear"]}: weights-only INT4 preset
            raise CheckpointError(f"config group {group_name!r} uses the preset-name form; write the full scheme")
        if _matches(name, module, group.get("targets") or []):
            return group
    return None


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if attr in parent._parameters:
        parent._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in parent._buffers:
        parent._buffers[attr] = tensor
    else:
        raise CheckpointError(f"checkpoint tensor {name!r} has no place in the model built from config.json")


def _build_linear(name: str, linear: nn.Linear, scheme: dict | None, t: dict[str, torch.Tensor],
                  dtype: torch.dtype) -> nn.Module | None:
    """A compressed replacement for one Linear from its checkpoint tensors, or None to keep it dense."""
    bias = t["bias"].to(dtype) if "bias" in t else None
    why = _needs_dequant(scheme, t)
    if why is not None:
        return _dequantized_linear(name, scheme or {}, t, dtype, why)
    if "weight_packed" in t:
        weights = (scheme or {}).get("weights") or {}
        bits = weights.get("num_bits", 4)
        if bits != 4:
            raise CheckpointError(f"{name}: pack-quantized {bits}-bit weights are not supported (only INT4)")
        k = int(t["weight_shape"][1]) if "weight_shape" in t else linear.in_features
        scale = t["weight_scale"]  # kept in its stored dtype; the kernels read it as fp32
        if k % 4 == 0:
            codes = unpack_int4(t["weight_packed"], k)
            if is_24_sparse(codes):
                return Sparse24Linear.from_int4_codes(codes, scale, bias)
        return W4A16Linear(t["weight_packed"], scale, k, bias)
    weight = t["weight"]
    if weight.dtype in (torch.float8_e4m3fn, torch.int8):
        acts = (scheme or {}).get("input_activations")
        if acts is None:
            raise CheckpointError(f"{name}: 8-bit weights without activation quantization (W8A16) are not "
                                  "supported; use FP8_DYNAMIC, FP8 or W8A8")
        if not acts.get("dynamic", False) and "input_scale" not in t:
            raise CheckpointError(f"{name}: static activation quantization but no input_scale tensor")
        input_scale = None if acts.get("dynamic", False) else t["input_scale"]
        if weight.dtype == torch.float8_e4m3fn and is_24_sparse(weight):
            return Sparse24Linear.from_fp8(weight, t["weight_scale"], input_scale, bias)
        return W8A8Linear(weight, t["weight_scale"], input_scale, bias)
    if weight.is_floating_point() and is_24_sparse(weight):
        return Sparse24Linear.from_dense(weight.to(dtype), bias)
    return None


def load_compressed_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None) -> nn.Module:
    """Build an eval-mode causal LM from a compressed-tensors checkpoint, Linears as kernels modules.

    ``dtype`` (default: the config's dtype, else float32) applies to activations and to every
    unquantized tensor. 2:4 sparsity is detected from the weights (every group of four input columns
    with at most two non-zeros) and turned into the compact form, for dense, INT4 and FP8 weights.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    from compression.model_io.loading import auto_model_class

    root = Path(checkpoint_dir)
    if not (root / "config.json").exists():
        raise CheckpointError(f"{root} has no config.json; point at a checkpoint directory")
    raw = json.loads((root / "config.json").read_text())
    qconfig = raw.get("quantization_config")
    if qconfig and qconfig.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"quant_method {qconfig.get('quant_method')!r} is not supported; "
                              "only compressed-tensors checkpoints load here")
    if qconfig and qconfig.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError("quantization_status must be 'compressed' (packed weights), "
                              f"got {qconfig.get('quantization_status')!r}")
    files = _weight_files(root)
    config = AutoConfig.from_pretrained(root)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # we build the quantized modules ourselves
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    from accelerate import init_empty_weights  # parameters on meta, buffers (rotary freqs) real

    with init_empty_weights(include_buffers=False):
        model = auto_model_class(config).from_config(config, dtype=dtype)
    names = CheckpointNames.for_model(model)
    unfuse_experts(model, names)  # MoE: per-expert Linears under the checkpoint's per-expert names

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    location = {key: h for h in handles for key in h.keys()}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    consumed: set[str] = set()
    kv_scales: dict[str, torch.Tensor] = {}
    kinds: dict[str, int] = {}
    for name, linear in linears.items():
        cname = names.checkpoint(name)
        tensors = {s: location[f"{cname}.{s}"].get_tensor(f"{cname}.{s}")
                   for s in _LINEAR_SUFFIXES if f"{cname}.{s}" in location}
        if not tensors:
            continue
        replacement = _build_linear(cname, linear, _scheme(cname, linear, qconfig), tensors, dtype)
        if replacement is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacement.to(device))
        consumed.update(f"{cname}.{s}" for s in tensors)
        kind = type(replacement).__name__ + (f"[{replacement.value_kind}]" if isinstance(replacement, Sparse24Linear)
                                             else f"[{replacement.kind}]" if isinstance(replacement, DequantLinear)
                                             else "")
        kinds[kind] = kinds.get(kind, 0) + 1

    for key, handle in location.items():
        if key in consumed:
            continue
        if key.endswith((".k_scale", ".v_scale")):
            kv_scales[key] = handle.get_tensor(key)  # FP8 KV cache: simulated by compression.algorithms.kvcache
            continue
        tensor = handle.get_tensor(key)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        _set_tensor(model, names.module(key), tensor.to(device))

    if getattr(config, "tie_word_embeddings", False):
        output = model.get_output_embeddings()
        if isinstance(output, nn.Linear):  # a compressed lm_head cannot share the embedding
            output.weight = model.get_input_embeddings().weight
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    model.to(device)
    if kv_scales:
        from compression.algorithms.kvcache import attach_all

        attach_all(model, kv_scales)
        kinds["FP8 KV cache (simulated)"] = len(kv_scales) // 2
    model.eval()
    log.info("loaded %s on %s: %s", root, device, ", ".join(f"{v}× {k}" for k, v in sorted(kinds.items())) or "dense")
    return model
