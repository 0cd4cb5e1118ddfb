"""2:4 sparse GEMM that reads the compact form built at load time (kernels/packing.py:compress_24).

Operands (K % 4 == 0; compact column c = kept value c of its row; group g = input columns 4g..4g+3)::

    x           [M, K]            bf16/fp16 (16-bit and INT4 values) or float8_e4m3fn (FP8 values)
    values      16-bit:  [N, K/2]          bf16/fp16, the kept weights
                INT4:    [N, ceil(K/16)]   int32, the kept codes packed 8 per word along the compact
                                           dimension (code c in bits [4(c%8), 4(c%8)+4) of word c//8,
                                           stored as q + 8) — the exported INT4 layout, on half the columns
                FP8:     [N, K/2]          float8_e4m3fn
    meta        [N, ceil(K/32)]   int32, 2-bit in-group position of compact column c in bits
                                  [2(c%16), 2(c%16)+2) of word c//16  (so group g: i0 at bit 4(g%8),
                                  i1 at bit 4(g%8)+2 of word g//8, with i0 < i1)
    weight_scale INT4: [N, K/G] or [N, 1];  FP8: [N, 1] or [1];  16-bit: None
    x_scale     FP8 only: [M, 1] (per token) or [1] (static)
    out         [M, N]            fp32 accumulation, cast to out_dtype (default x.dtype, bf16 for FP8)

Triton exposes no sparse tensor-core instruction, so the kernel rebuilds each dense weight tile in
registers and runs a dense tl.dot: the gain is the halved weight traffic (memory-bound M), not FLOPs.
"""
from __future__ import annotations

import torch

from kernels._autotune import DECODE_MAX_M, m_bucket
from kernels._dispatch import interpreting, use_triton
from kernels.packing import decompress_24, unpack_int4

FP8_DTYPE = torch.float8_e4m3fn


def _kind(values: torch.Tensor) -> int:
    if values.dtype == torch.int32:
        return 1
    if values.dtype == FP8_DTYPE:
        return 2
    assert values.dtype in (torch.bfloat16, torch.float16, torch.float32), f"unsupported 2:4 value dtype {values.dtype}"
    return 0


def _check(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, weight_scale: torch.Tensor | None,
           x_scale: torch.Tensor | None) -> tuple[int, int]:
    """Assert shapes/dtypes; returns (value kind, INT4 group size or K)."""
    assert x.dim() == 2 and values.dim() == 2 and meta.dim() == 2, (x.shape, values.shape, meta.shape)
    m, k = x.shape
    n = values.shape[0]
    kind = _kind(values)
    assert k % 4 == 0, f"2:4 needs K divisible by 4, got {k}"
    assert meta.dtype == torch.int32 and tuple(meta.shape) == (n, -(-k // 32)), (meta.shape, meta.dtype, n, k)
    group = k
    if kind == 1:
        assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
        assert values.shape[1] == -(-k // 16), (values.shape, k)
        assert weight_scale is not None and weight_scale.dim() == 2 and weight_scale.shape[0] == n, weight_scale
        assert k % weight_scale.shape[1] == 0, (weight_scale.shape, k)
        group = k // weight_scale.shape[1]
    else:
        assert values.shape[1] * 2 == k, (values.shape, k)
    if kind == 2:
        assert x.dtype == FP8_DTYPE and x_scale is not None and weight_scale is not None, "FP8 values need fp8 x + scales"
        assert x_scale.numel() in (1, m) and weight_scale.numel() in (1, n), (x_scale.shape, weight_scale.shape)
    if kind == 0:
        assert x.dtype == values.dtype, (x.dtype, values.dtype)
    return kind, group


def sparse24_gemm_reference(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                            weight_scale: torch.Tensor | None = None, x_scale: torch.Tensor | None = None,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch reference: decompress to dense, dequantize, fp32 matmul."""
    kind, group = _check(x, values, meta, weight_scale, x_scale)
    k = x.shape[1]
    out_dtype = out_dtype or (torch.bfloat16 if kind == 2 else x.dtype)
    if kind == 1:
        w = decompress_24(unpack_int4(values, k // 2), meta, k).float()
        w = w * weight_scale.float().repeat_interleave(group, dim=1)
        return (x.float() @ w.T).to(out_dtype)
    w = decompress_24(values, meta, k).float()
    out = x.float() @ w.T
    if kind == 2:
        out = out * x_scale.float().reshape(-1, 1) * weight_scale.float().reshape(1, -1)
    return out.to(out_dtype)


def sparse24_gemm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                  weight_scale: torch.Tensor | None = None, x_scale: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out [M, N] = x @ W.T with W the 2:4 weight in compact form; Triton on CUDA, else the reference."""
    if not use_triton(x, values, meta):
        return sparse24_gemm_reference(x, values, meta, weight_scale, x_scale, out_dtype)
    from kernels._launch import grid, tuned

    kind, group = _check(x, values, meta, weight_scale, x_scale)
    for name, t in (("x", x), ("values", values), ("meta", meta)):
        assert t.is_contiguous(), f"{name} must be contiguous"
    m, k = x.shape
    n = values.shape[0]
    out_dtype = out_dtype or (torch.bfloat16 if kind == 2 else x.dtype)
    decode = m <= DECODE_MAX_M
    kernel, fixed = tuned("sparse24", "decode" if decode else "prefill", group, k)
    split = decode and (fixed is None or fixed["SPLIT_K"] > 1)
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if split else torch.empty(m, n, device=x.device, dtype=out_dtype)
    dummy = meta  # any tensor: pointers of unused operands are never read
    w_scale = weight_scale if weight_scale is not None else dummy
    if kind == 2:
        w_scale = w_scale.float().contiguous()
    xs = x_scale.float().contiguous() if x_scale is not None else dummy
    s_strides = (w_scale.stride(0), w_scale.stride(1)) if kind == 1 else (0, 0)
    args = (x, values, meta, w_scale, xs, out, m, n, k, m_bucket(m),
            x.stride(0), x.stride(1), values.stride(0), meta.stride(0), *s_strides, out.stride(0), out.stride(1))
    flags = dict(VALUE_KIND=kind, GROUP_SIZE=group, X_PER_TOKEN=xs.numel() == m and m > 1,
                 W_PER_CHANNEL=w_scale.numel() == n and n > 1, UPCAST=interpreting())
    if fixed is None:
        kernel[lambda meta_: grid(m, n, meta_)](*args, **flags)
    else:
        kernel[grid(m, n, fixed)](*args, **flags, **fixed)
    return out.to(out_dtype) if split else out
