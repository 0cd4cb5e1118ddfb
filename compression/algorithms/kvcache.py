"""FP8 KV cache simulation (``kv_cache_scheme``): the key/value states an attention module hands to
its cache are quantize-dequantized with the calibrated per-tensor (or per-KV-head, ``strategy: attn_head``) ``k_scale`` / ``v_scale``, the
way compressed-tensors' QuantizedKVCache does and vLLM's FP8 cache stores them. Used on the
in-memory model after compression and by the compressed runtime, so the evaluated quality includes
the KV-cache quantization a deployment gets.
"""
from __future__ import annotations

from typing import Any

import torch

from compression.algorithms.quant import FP8_DTYPE, FP8_MAX


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.to(device=x.device, dtype=x.dtype)
    return (torch.clamp(x / s, -FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(x.dtype) * s)


class FP8KVCache:
    """Stands in for the attention's ``past_key_values``: quantizes K/V, then forwards to the real cache."""

    def __init__(self, k_scale: torch.Tensor, v_scale: torch.Tensor, inner: Any = None):
        self.k_scale, self.v_scale, self.inner = k_scale, v_scale, inner

    def update(self, key_states, value_states, *args, **kwargs):
        key_states = fake_quantize_fp8(key_states, self.k_scale)
        value_states = fake_quantize_fp8(value_states, self.v_scale)
        if self.inner is None:
            return key_states, value_states
        return self.inner.update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self, *args, **kwargs) -> int:
        inner = self.__dict__.get("inner")
        return 0 if inner is None else inner.get_seq_length(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def cache_parameter(module: torch.nn.Module) -> str:
    """The name under which a decoder layer or its attention takes the KV cache: ``past_key_values``
    (transformers 5), or ``layer_past`` / ``past_key_value`` in older families (Falcon, GPT-J, MPT)."""
    import inspect

    from compression.model_io.walk import CACHE_KWARGS

    parameters = inspect.signature(module.forward).parameters
    return next((p for p in CACHE_KWARGS if p in parameters), CACHE_KWARGS[0])


def attach_kv_quant(attention: torch.nn.Module, k_scale: torch.Tensor, v_scale: torch.Tensor):
    """Pre-hook on an attention module wrapping its ``past_key_values``; returns the hook handle."""
    # per tensor ([1]) or per KV head ([heads, 1, 1], broadcast over [batch, heads, tokens, head dim])
    k_scale, v_scale = (s.detach().float().reshape(1) if s.numel() == 1 else s.detach().float().reshape(-1, 1, 1)
                        for s in (k_scale, v_scale))

    key = cache_parameter(attention)

    def hook(module, args, kwargs):
        kwargs[key] = FP8KVCache(k_scale, v_scale, kwargs.get(key))
        return args, kwargs

    return attention.register_forward_pre_hook(hook, with_kwargs=True)


def attach_all(model: torch.nn.Module, scales: dict[str, torch.Tensor]) -> list:
    """Hooks for every ``<attention>.k_scale`` / ``.v_scale`` pair in ``scales``."""
    handles = []
    for name in sorted(n[: -len(".k_scale")] for n in scales if n.endswith(".k_scale")):
        handles.append(attach_kv_quant(model.get_submodule(name), scales[f"{name}.k_scale"],
                                       scales[f"{name}.v_scale"]))
    return handles
