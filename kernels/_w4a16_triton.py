"""Triton code of the W4A16 GEMM (launcher and layout: kernels/w4a16.py)."""
from __future__ import annotations

import triton
import triton.language as tl

from kernels._gemm_triton import add_int4_tile, k_tile_range, store_tile, tile_offsets, x_tile


@triton.jit
def w4a16_gemm_kernel(
    # pointers: x [M, K] 16-bit, w [N, ceil(K/8)] int32, s [N, n_groups], out [M, N]
    x_ptr, w_ptr, s_ptr, out_ptr,
    # sizes (M_BUCKET only keys the autotuner)
    M, N, K, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_om, stride_on,
    # meta-parameters
    GROUP_SIZE: tl.constexpr,   # input columns per scale (K for per-channel scales)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,      # > 1: programs along axis 1 share K and atomically add fp32 partials
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,       # fp32 tl.dot: the CPU interpreter computes bf16 x bf16 dots wrongly
):
    offs_m, offs_n, mask_m, mask_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    first_tile, last_tile = k_tile_range(K, BLOCK_K, SPLIT_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(first_tile, last_tile):
        offs_k, mask_k, x = x_tile(x_ptr, offs_m, mask_m, t, K, stride_xm, stride_xk, BLOCK_K)
        # [BLOCK_K, BLOCK_N] tile of words: eight consecutive k share one word (served from cache).
        words = tl.load(w_ptr + offs_n[None, :] * stride_wn + (offs_k[:, None] // 8) * stride_wk,
                        mask=mask_n[None, :] & mask_k[:, None], other=0)
        codes = ((words >> ((offs_k[:, None] % 8) * 4)) & 0xF) - 8
        acc = add_int4_tile(acc, x, codes, s_ptr, offs_n, mask_n, t, stride_sn, stride_sg, BLOCK_K, GROUP_SIZE, UPCAST)

    store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, SPLIT_K)
