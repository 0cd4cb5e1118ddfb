"""Triton code of the 2:4 sparse GEMM over the compact layout (launcher and layout: kernels/sparse24.py)."""
from __future__ import annotations

import triton
import triton.language as tl

from kernels._gemm_triton import add_int4_tile, k_tile_range, store_tile, tile_offsets, x_tile

VALUES_16BIT = 0
VALUES_INT4 = 1
VALUES_FP8 = 2


@triton.jit
def sparse24_gemm_kernel(
    # pointers: x [M, K] (16-bit, or fp8 for VALUE_KIND 2), values (see launcher), meta [N, ceil(K/32)]
    # int32, w_scale (int4: [N, K/G]; fp8: [N] or [1]; unused for 16-bit), x_scale ([M] or [1], fp8 only),
    # out [M, N]
    x_ptr, v_ptr, meta_ptr, w_scale_ptr, x_scale_ptr, out_ptr,
    # sizes (M_BUCKET only keys the autotuner)
    M, N, K, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_vn, stride_mn, stride_sn, stride_sg, stride_om, stride_on,
    # meta-parameters
    VALUE_KIND: tl.constexpr,    # 0: 16-bit values, 1: INT4 values (packed, group scales), 2: FP8 values
    GROUP_SIZE: tl.constexpr,    # INT4 input columns per scale (K when per-channel)
    X_PER_TOKEN: tl.constexpr, W_PER_CHANNEL: tl.constexpr,  # FP8 scale shapes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,        # fp32 tl.dot for 16-bit operands: the CPU interpreter's bf16 dot is wrong
):
    offs_m, offs_n, mask_m, mask_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    first_tile, last_tile = k_tile_range(K, BLOCK_K, SPLIT_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(first_tile, last_tile):
        offs_k, mask_k, x = x_tile(x_ptr, offs_m, mask_m, t, K, stride_xm, stride_xk, BLOCK_K)
        # Rebuild the dense [BLOCK_K, BLOCK_N] weight tile in registers: input column k belongs to
        # group g = k // 4 at position j = k % 4; the group's kept values are compact columns 2g, 2g+1.
        group4 = offs_k[:, None] // 4
        pos = offs_k[:, None] % 4
        tile_mask = mask_n[None, :] & mask_k[:, None]
        meta = tl.load(meta_ptr + offs_n[None, :] * stride_mn + group4 // 8, mask=tile_mask, other=0)
        shift = (group4 % 8) * 4
        i0 = (meta >> shift) & 3
        i1 = (meta >> (shift + 2)) & 3
        if VALUE_KIND == 1:
            words = tl.load(v_ptr + offs_n[None, :] * stride_vn + group4 // 4, mask=tile_mask, other=0)
            nib = (group4 % 4) * 8
            c0 = ((words >> nib) & 0xF) - 8
            c1 = ((words >> (nib + 4)) & 0xF) - 8
            codes = tl.where(i0 == pos, c0, tl.where(i1 == pos, c1, 0))
            acc = add_int4_tile(acc, x, codes, w_scale_ptr, offs_n, mask_n, t, stride_sn, stride_sg,
                                BLOCK_K, GROUP_SIZE, UPCAST)
        else:
            v_row = v_ptr + offs_n[None, :] * stride_vn + group4 * 2
            v0 = tl.load(v_row, mask=tile_mask, other=0.0)
            v1 = tl.load(v_row + 1, mask=tile_mask, other=0.0)
            w = tl.where(i0 == pos, v0, tl.where(i1 == pos, v1, 0.0))
            if UPCAST and VALUE_KIND == 0:
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)

    if VALUE_KIND == 2:
        if X_PER_TOKEN:
            x_scale = tl.load(x_scale_ptr + offs_m, mask=mask_m, other=0.0)
        else:
            x_scale = tl.load(x_scale_ptr + offs_m * 0)
        if W_PER_CHANNEL:
            w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
        else:
            w_scale = tl.load(w_scale_ptr + offs_n * 0)
        acc = acc * x_scale.to(tl.float32)[:, None] * w_scale.to(tl.float32)[None, :]

    store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, SPLIT_K)
