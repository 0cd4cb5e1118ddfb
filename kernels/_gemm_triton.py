"""Triton code shared by the GEMM kernels: tile order and offsets, the K split,
the x tile, the group-scaled INT4 product, the store.

Each GEMM program owns one [BLOCK_M, BLOCK_N] output tile (axis 0 of the grid, see
kernels/_launch.py:grid) and, when K is split, one contiguous run of K tiles (axis 1). Triton inlines
these helpers into the kernels that call them.
"""
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
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(offs_m, offs_n, mask_m, mask_n): this program's output rows and columns and which are in bounds."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    return offs_m, offs_n, mask_m, mask_n


@triton.jit
def k_tile_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """(first, last): the K tiles [first, last) of this program's split (grid axis 1)."""
    pid_k = tl.program_id(1)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first_tile = pid_k * tiles_per_split
    last_tile = min(first_tile + tiles_per_split, k_tiles)
    return first_tile, last_tile


@triton.jit
def x_tile(x_ptr, offs_m, mask_m, t, K, stride_xm, stride_xk, BLOCK_K: tl.constexpr):
    """(offs_k, mask_k, x): the columns of K tile ``t`` and the [BLOCK_M, BLOCK_K] activation tile
    (zeros outside M and K)."""
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    return offs_k, mask_k, x


@triton.jit
def add_int4_tile(acc, x, codes, s_ptr, offs_n, mask_n, t, stride_sn, stride_sg,
                  BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + (x @ codes) · scale of K tile ``t``'s group, for INT4 codes (-8..7) [BLOCK_K, BLOCK_N].

    Codes are exact in bf16/fp16, so the tensor-core product is exact; the group scale is applied once
    per tile (a tile never straddles two groups: kernels/_launch.py picks BLOCK_K). UPCAST: fp32 tl.dot,
    since the CPU interpreter computes bf16 x bf16 dots wrongly.
    """
    if UPCAST:
        partial = tl.dot(x.to(tl.float32), codes.to(tl.float32))
    else:
        partial = tl.dot(x, codes.to(x.dtype))
    group = (t * BLOCK_K) // GROUP_SIZE
    scale = tl.load(s_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0.0)
    return acc + partial * scale.to(tl.float32)[None, :]


@triton.jit
def store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, SPLIT_K: tl.constexpr):
    """Write the fp32 tile: cast to the output dtype, or (K split) atomically add the fp32 partial."""
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
