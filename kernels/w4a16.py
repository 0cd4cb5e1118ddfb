"""W4A16 GEMM: 16-bit activations × INT4 weights exactly as exported (compressed-tensors pack-quantized).

Layout read by the kernel (doc §2.4; packer in kernels/packing.py)::

    x             [M, K]            bf16 / fp16, contiguous
    weight_packed [N, ceil(K/8)]    int32; column 8j+i of row n = bits [4i, 4i+4) of word j, stored
                                    as the unsigned nibble q + 8 (q ∈ [-8, 7]), words read as signed
    weight_scale  [N, K/G] (group)  or [N, 1] (per-channel); symmetric, no zero point
    out           [M, N]            x.dtype;  out = x @ ((q) · scale).T accumulated in fp32

M ≤ 16 uses split-K tiles with fp32 atomics (decode is bound by reading the weights); larger M uses
big tiles (prefill is compute bound). The group scale is multiplied into each K tile's fp32 partial
product, so a K tile never straddles two groups.
"""
from __future__ import annotations

import torch

from kernels._autotune import DECODE_MAX_M, m_bucket
from kernels._dispatch import interpreting, use_triton
from kernels.packing import unpack_int4

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # fp32: CPU models


def _check(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> int:
    """Assert shapes/dtypes; returns the group size (K for per-channel scales)."""
    assert x.dim() == 2 and x.dtype in ACTIVATION_DTYPES, (x.shape, x.dtype)
    assert weight_packed.dim() == 2 and weight_packed.dtype == torch.int32, (weight_packed.shape, weight_packed.dtype)
    m, k = x.shape
    n = weight_packed.shape[0]
    assert weight_packed.shape[1] == -(-k // 8), f"weight_packed {tuple(weight_packed.shape)} does not fit K={k}"
    assert weight_scale.dim() == 2 and weight_scale.shape[0] == n, (weight_scale.shape, n)
    groups = weight_scale.shape[1]
    assert k % groups == 0, f"{groups} scale groups do not divide K={k}"
    return k // groups


def w4a16_gemm_reference(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Torch reference: unpack, dequantize in fp32, fp32 matmul, cast to x.dtype."""
    group = _check(x, weight_packed, weight_scale)
    k = x.shape[1]
    codes = unpack_int4(weight_packed, k).float()
    w = codes * weight_scale.float().repeat_interleave(group, dim=1)
    return (x.float() @ w.T).to(x.dtype)


def w4a16_gemm(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """out [M, N] = x [M, K] @ dequant(weight_packed, weight_scale).T; Triton on CUDA, else the reference."""
    if not use_triton(x, weight_packed, weight_scale):
        return w4a16_gemm_reference(x, weight_packed, weight_scale)
    from kernels._launch import grid, tuned

    group = _check(x, weight_packed, weight_scale)
    assert x.is_contiguous() and weight_packed.is_contiguous(), "x and weight_packed must be contiguous"
    m, k = x.shape
    n = weight_packed.shape[0]
    decode = m <= DECODE_MAX_M
    kernel, fixed = tuned("w4a16", "decode" if decode else "prefill", group, k)
    split = decode and (fixed is None or fixed["SPLIT_K"] > 1)
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if split else torch.empty(m, n, device=x.device, dtype=x.dtype)
    args = (x, weight_packed, weight_scale, out, m, n, k, m_bucket(m),
            x.stride(0), x.stride(1), weight_packed.stride(0), weight_packed.stride(1),
            weight_scale.stride(0), weight_scale.stride(1), out.stride(0), out.stride(1))
    if fixed is None:
        kernel[lambda meta: grid(m, n, meta)](*args, GROUP_SIZE=group, UPCAST=False)
    else:
        kernel[grid(m, n, fixed)](*args, GROUP_SIZE=group, UPCAST=interpreting(), **fixed)
    return out.to(x.dtype) if split else out
