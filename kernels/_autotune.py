"""Small helpers shared by the launchers: autotune config lists and the M bucket key."""
from __future__ import annotations

import itertools

DECODE_MAX_M = 16


def m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two, capped, so prefill lengths share tuned configs."""
    return min(1 << max(m - 1, 0).bit_length(), 4096)


def decode_configs(split_k: bool = True) -> list[dict]:
    """Skinny-M tiles (BLOCK_M = 16, the smallest tl.dot accepts) with split-K for M ≤ 16."""
    splits = (1, 2, 4, 8, 16) if split_k else (1,)
    return [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, GROUP_M=8, num_warps=w, num_stages=s)
            for bn, bk, sk, w, s in itertools.product((32, 64, 128), (64, 128, 256), splits, (4,), (2, 4))]


def prefill_configs() -> list[dict]:
    """Large tiles for M in the hundreds and thousands (compute bound)."""
    shapes = [(64, 64, 64, 4), (64, 128, 64, 4), (128, 64, 64, 4), (128, 128, 64, 8),
              (128, 128, 32, 8), (128, 256, 64, 8), (64, 256, 32, 4), (32, 64, 128, 4)]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, GROUP_M=8, num_warps=w, num_stages=s)
            for (bm, bn, bk, w), s in itertools.product(shapes, (3, 4))]


def interpreter_config(m: int, block_k: int = 32) -> dict:
    """One small config for the CPU interpreter (autotuning there would re-run every config)."""
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, SPLIT_K=2 if m <= DECODE_MAX_M else 1,
                GROUP_M=4, num_warps=4, num_stages=1)
