"""W8A8: dynamic per-token (or static per-tensor) activation quantization + scaled 8-bit GEMM.

FP8 (compressed-tensors ``float-quantized``) and INT8 (``int-quantized``) share both kernels::

    x        [M, K]  bf16 / fp16 / fp32, contiguous
    q        [M, K]  float8_e4m3fn (scale = absmax_row / 448) or int8 (scale = absmax_row / 127.5,
                     q = clamp(round_half_even(x / scale), -128, 127)); all-zero rows get scale = eps
    x_scale  [M, 1]  fp32 per token (dynamic)  or  [1] fp32, the stored static ``input_scale``
    weight   [N, K]  same 8-bit dtype as q (the exported ``weight``, rows = output features)
    w_scale  [N, 1]  per channel  or  [1] per tensor
    out      [M, N]  = (q @ weight.T) · x_scale · w_scale.T, accumulated in fp32 (fp8) or int32 (int8)
"""
from __future__ import annotations

import torch

from kernels._autotune import DECODE_MAX_M, m_bucket
from kernels._dispatch import use_triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_HALF_RANGE = 127.5
_EPS = torch.finfo(torch.float32).eps


def _qmax(qdtype: torch.dtype) -> float:
    assert qdtype in (FP8_DTYPE, torch.int8), f"activation dtype must be float8_e4m3fn or int8, got {qdtype}"
    return FP8_MAX if qdtype == FP8_DTYPE else INT8_HALF_RANGE


def _check_quant(x: torch.Tensor, input_scale: torch.Tensor | None, qdtype: torch.dtype) -> None:
    assert x.dim() == 2 and x.is_floating_point() and x.element_size() >= 2, (x.shape, x.dtype)
    assert input_scale is None or input_scale.numel() == 1, "a static input_scale is one number"
    _qmax(qdtype)


def quantize_per_token_reference(x: torch.Tensor, input_scale: torch.Tensor | None = None,
                                 qdtype: torch.dtype = FP8_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`quantize_per_token`: (q [M, K] qdtype, scale [M, 1] or [1] fp32)."""
    _check_quant(x, input_scale, qdtype)
    qmax = _qmax(qdtype)
    xf = x.float()
    if input_scale is None:
        scale = xf.abs().amax(dim=1, keepdim=True) / qmax
        scale = torch.where(scale == 0, torch.full_like(scale, _EPS), scale)
    else:
        scale = input_scale.float().reshape(1)
    y = xf / scale
    if qdtype == FP8_DTYPE:
        q = y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    else:
        q = torch.round(y).clamp(-128, 127).to(torch.int8)
    return q, scale


def quantize_per_token(x: torch.Tensor, input_scale: torch.Tensor | None = None,
                       qdtype: torch.dtype = FP8_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per token (dynamic) or with a static per-tensor ``input_scale``."""
    if not use_triton(x):
        return quantize_per_token_reference(x, input_scale, qdtype)
    import triton

    from kernels._w8a8_triton import quantize_per_token_kernel

    _check_quant(x, input_scale, qdtype)
    assert x.is_contiguous(), "x must be contiguous"
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=qdtype)
    if input_scale is None:
        scale = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    else:
        scale = input_scale.to(device=x.device, dtype=torch.float32).reshape(1)
    block_k = min(triton.next_power_of_2(max(k, 16)), 4096)
    if m:
        quantize_per_token_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0),
                                        QMAX=_qmax(qdtype), IS_FP8=qdtype == FP8_DTYPE,
                                        STATIC=input_scale is not None, EPS=_EPS, BLOCK_K=block_k)
    return q, scale


def _check_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> None:
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1], (a.shape, b.shape)
    assert a.dtype == b.dtype and a.dtype in (FP8_DTYPE, torch.int8), (a.dtype, b.dtype)
    assert a_scale.numel() in (1, a.shape[0]), f"a_scale must be [M, 1] or [1], got {tuple(a_scale.shape)}"
    assert b_scale.numel() in (1, b.shape[0]), f"b_scale must be [N, 1] or [1], got {tuple(b_scale.shape)}"


def scaled_mm_reference(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                        out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Torch reference of :func:`scaled_mm` (int8 products summed exactly in float64)."""
    _check_mm(a, a_scale, b, b_scale)
    compute = torch.float64 if a.dtype == torch.int8 else torch.float32
    acc = a.to(compute) @ b.to(compute).T
    a_s = a_scale.to(compute).reshape(-1, 1)
    b_s = b_scale.to(compute).reshape(1, -1)
    return (acc * a_s * b_s).to(out_dtype)


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """out [M, N] = (a [M, K] @ b [N, K].T) · a_scale · b_scale.T for fp8 or int8 operands."""
    if not use_triton(a, b):
        return scaled_mm_reference(a, a_scale, b, b_scale, out_dtype)
    from kernels._launch import grid, tuned

    _check_mm(a, a_scale, b, b_scale)
    assert a.is_contiguous() and b.is_contiguous(), "a and b must be contiguous"
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, device=a.device, dtype=out_dtype)
    a_scale = a_scale.float().contiguous()
    b_scale = b_scale.float().contiguous()
    kernel, fixed = tuned("scaled_mm", "decode" if m <= DECODE_MAX_M else "prefill", k, k)
    args = (a, b, a_scale, b_scale, out, m, n, k, m_bucket(m),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    flags = dict(GROUP_SIZE=k, A_PER_TOKEN=a_scale.numel() == m and m > 1, B_PER_CHANNEL=b_scale.numel() == n and n > 1)
    if fixed is None:
        kernel[lambda meta: grid(m, n, meta)](*args, **flags)
    else:
        kernel[grid(m, n, fixed)](*args, **flags, **fixed)
    return out


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize x [M, K] like ``weight`` (fp8 or int8) and multiply: the whole W8A8 Linear (no bias)."""
    q, x_scale = quantize_per_token(x, input_scale, weight.dtype)
    return scaled_mm(q, x_scale, weight, weight_scale, out_dtype or x.dtype)


def w8a8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          input_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch reference of :func:`w8a8_linear`."""
    q, x_scale = quantize_per_token_reference(x, input_scale, weight.dtype)
    return scaled_mm_reference(q, x_scale, weight, weight_scale, out_dtype or x.dtype)
