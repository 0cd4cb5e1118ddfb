"""Triton code of the W4A16 GEMM (launcher and layout: kernels/w4a16.py)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("swizzled") tile order so consecutive programs reuse the same weight columns in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    return pid_m, pid_n


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
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first_tile = pid_k * tiles_per_split
    last_tile = min(first_tile + tiles_per_split, k_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(first_tile, last_tile):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # [BLOCK_K, BLOCK_N] tile of words: eight consecutive k share one word (served from cache).
        words = tl.load(w_ptr + offs_n[None, :] * stride_wn + (offs_k[:, None] // 8) * stride_wk,
                        mask=mask_n[None, :] & mask_k[:, None], other=0)
        codes = ((words >> ((offs_k[:, None] % 8) * 4)) & 0xF) - 8
        # Codes -8..7 are exact in bf16/fp16, so the tensor-core product is exact; the group
        # scale is applied once per tile (a tile never straddles two groups, see the launcher).
        if UPCAST:
            partial = tl.dot(x.to(tl.float32), codes.to(tl.float32))
        else:
            partial = tl.dot(x, codes.to(x.dtype))
        group = (t * BLOCK_K) // GROUP_SIZE
        scale = tl.load(s_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0.0)
        acc += partial * scale.to(tl.float32)[None, :]

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
