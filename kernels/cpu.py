"""CPU paths of the compressed Linears: torch's own int4 / int8 CPU matmuls, else weights dequantized once.

The kernels' torch references dequantize every weight on every call, which made a CPU job's
speed measurement (and its compressed evaluation) slower than the dense model by an order of
magnitude. On the CPU each compressed module therefore builds, on its first forward, a cache
that it keeps until it is moved (``CompressedLinear._apply`` drops it):

======================  ==========================================================================
INT4 (W4A16)            ``torch._weight_int4pack_mm_for_cpu``: the codes repacked once by
                        ``torch._convert_weight_to_int4pack_for_cpu`` (real 4-bit weights in
                        memory, dequantized inside torch's kernel); group sizes 32/64/128/256,
                        output features a multiple of 16.
                        Per-channel scales or a torch without the op: dequantized fp32 weight.
INT8 (W8A8)             activations quantized per token exactly as on the GPU, then
                        ``torch._weight_int8pack_mm`` on the int8 weight with per-channel scales.
FP8 (W8A8), 2:4         no CPU kernel in torch: the weight dequantized once (fp32) and kept; FP8
                        activations are still quantized per token, so the numbers stay those of
                        the compressed model.
======================  ==========================================================================

Caches are plain attributes, not buffers: ``weights_gb`` in speed results counts the compressed
buffers, and the card says the CPU run holds these copies too.
"""
from __future__ import annotations

import logging

import torch

from kernels.packing import decompress_24, unpack_int4

log = logging.getLogger(__name__)

INT4_CPU_GROUPS = (32, 64, 128, 256)


def int4_cpu_cache(weight_packed: torch.Tensor, weight_scale: torch.Tensor, k: int) -> dict:
    """{"packed", "scale_zeros", "group"} for torch's CPU int4 matmul, or {"weight"} (dequantized fp32)."""
    codes = unpack_int4(weight_packed, k)  # int8 [N, K] in [-8, 7]
    n, groups = weight_scale.shape
    group = k // groups
    pack = getattr(torch, "_convert_weight_to_int4pack_for_cpu", None)
    if pack is not None and group in INT4_CPU_GROUPS and n % 16 == 0 and k % 16 == 0:
        try:
            packed = pack((codes.to(torch.int32) + 8).contiguous(), 2)
            scale = weight_scale.float().t().contiguous()  # [K/G, N]
            # torch's int4 dequantization is (u - 8) · scale + zero; symmetric codes need zero = 0
            scale_zeros = torch.stack([scale, torch.zeros_like(scale)], dim=-1).contiguous()
            return {"packed": packed, "scale_zeros": scale_zeros, "group": group}
        except RuntimeError as exc:  # an unsupported shape: fall back to the dequantized weight
            log.info("int4 CPU pack refused %s: %s", tuple(codes.shape), exc)
    return {"weight": (codes.float() * weight_scale.float().repeat_interleave(group, dim=1)).contiguous()}


def int4_cpu_mm(x: torch.Tensor, cache: dict) -> torch.Tensor:
    """x [M, K] @ dequant(W).T with a cache from :func:`int4_cpu_cache`, in x.dtype."""
    if "weight" in cache:
        return (x.float() @ cache["weight"].T).to(x.dtype)
    xf = x.float()
    return torch._weight_int4pack_mm_for_cpu(xf, cache["packed"], cache["group"], cache["scale_zeros"]).to(x.dtype)


def int8_cpu_cache(weight: torch.Tensor, weight_scale: torch.Tensor) -> dict:
    """int8 [N, K] weight + [N, 1] / [1] scale → {"int8", "scales" [N] fp32} or {"weight"} without the op."""
    n = weight.shape[0]
    scales = weight_scale.float().reshape(-1).expand(n).contiguous()
    if hasattr(torch, "_weight_int8pack_mm"):
        return {"int8": weight.contiguous(), "scales": scales}
    return {"weight": (weight.float() * scales.unsqueeze(1)).contiguous()}


def int8_cpu_mm(x_dequantized: torch.Tensor, cache: dict) -> torch.Tensor:
    """Float activations [M, K] (already quantize-dequantized) @ (int8 · scale).T in fp32."""
    xf = x_dequantized.float().contiguous()
    if "weight" in cache:
        return xf @ cache["weight"].T
    return torch._weight_int8pack_mm(xf, cache["int8"], cache["scales"])


def dequantized_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """FP8 / INT8 weight [N, K] with a [N, 1] or [1] scale → fp32 [N, K]."""
    return (weight.float() * weight_scale.float().reshape(-1, 1)).contiguous()


def sparse24_dense_weight(values: torch.Tensor, meta: torch.Tensor, k: int, weight_scale: torch.Tensor | None
                          ) -> torch.Tensor:
    """Compact 2:4 (16-bit, INT4 or FP8 values) → the dense fp32 weight [N, K] with its scale applied."""
    if values.dtype == torch.int32:  # INT4 values packed along the compact dimension
        w = decompress_24(unpack_int4(values, k // 2), meta, k).float()
        group = k // weight_scale.shape[1]
        return (w * weight_scale.float().repeat_interleave(group, dim=1)).contiguous()
    w = decompress_24(values, meta, k).float()
    if weight_scale is not None:
        w = w * weight_scale.float().reshape(-1, 1)
    return w.contiguous()
