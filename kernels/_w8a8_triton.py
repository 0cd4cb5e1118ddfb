"""Triton code of the W8A8 path: per-token activation quantization and the scaled 8-bit GEMM.

Launchers and layouts: kernels/w8a8.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels._gemm_triton import store_tile, tile_offsets

_RNE_MAGIC = 12582912.0  # 1.5 · 2^23: (y + m) - m rounds |y| < 2^22 to the nearest integer, ties to even


@triton.jit
def _round_to_fp8_grid(y):
    """Round fp32 y (|y| ≤ 448) to the nearest float8_e4m3fn value, ties to even, still in fp32.

    Done by hand so the final cast is exact: the interpreter's fp32→fp8 cast mis-rounds values
    whose mantissa carries into the exponent (e.g. 31.7 → 16), and this also pins GPU rounding.
    """
    bits = y.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)       # e4m3 subnormals below 2^-6
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    return ((y / step + _RNE_MAGIC) - _RNE_MAGIC) * step


@triton.jit
def quantize_per_token_kernel(
    # pointers: x [M, K] 16/32-bit, q [M, K] fp8/int8, scale [M] fp32 (read when STATIC, else written)
    x_ptr, q_ptr, scale_ptr,
    # sizes
    K,
    # strides
    stride_xm, stride_qm,
    # meta-parameters
    QMAX: tl.constexpr,      # 448.0 (fp8 e4m3) or 127.5 (int8, compressed-tensors convention)
    IS_FP8: tl.constexpr,
    STATIC: tl.constexpr,    # one stored per-tensor scale instead of the row's absmax
    EPS: tl.constexpr,       # replaces a zero scale (all-zero row)
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    if STATIC:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.max(amax, axis=0) / QMAX
        scale = tl.where(scale == 0.0, EPS, scale)
        tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        y = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.math.div_rn(y, scale)  # IEEE division, as the torch reference does
        if IS_FP8:
            y = _round_to_fp8_grid(tl.minimum(tl.maximum(y, -QMAX), QMAX))
            tl.store(q_ptr + row * stride_qm + offs, y.to(q_ptr.dtype.element_ty), mask=mask)
        else:
            y = tl.minimum(tl.maximum((y + _RNE_MAGIC) - _RNE_MAGIC, -128.0), 127.0)
            tl.store(q_ptr + row * stride_qm + offs, y.to(tl.int8), mask=mask)


@triton.jit
def scaled_mm_kernel(
    # pointers: a [M, K] fp8/int8, b [N, K] same dtype, a_scale [M] or [1], b_scale [N] or [1], out [M, N]
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, out_ptr,
    # sizes (M_BUCKET only keys the autotuner)
    M, N, K, M_BUCKET,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
    # meta-parameters
    GROUP_SIZE: tl.constexpr,    # unused (one launcher helper for every GEMM); K
    A_PER_TOKEN: tl.constexpr, B_PER_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,       # always 1 here
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    is_int: tl.constexpr = a_ptr.dtype.element_ty == tl.int8
    acc_dtype: tl.constexpr = tl.int32 if is_int else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=acc_dtype)
    if A_PER_TOKEN:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    else:
        a_scale = tl.load(a_scale_ptr + offs_m * 0).to(tl.float32)
    if B_PER_CHANNEL:
        b_scale = tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        b_scale = tl.load(b_scale_ptr + offs_n * 0).to(tl.float32)
    result = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    store_tile(out_ptr, result, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, 1)
