"""Autotuned kernel handles, built lazily so that importing a launcher never imports triton."""
from __future__ import annotations

import functools
from collections.abc import Callable

from kernels._autotune import decode_configs, interpreter_config, prefill_configs
from kernels._dispatch import interpreting


def _valid_block_k(block_k: int, group_size: int, k: int) -> bool:
    """A K tile must not straddle two scale groups (the scale is applied once per tile)."""
    if group_size >= k:  # per-channel: one group spans all of K
        return block_k <= max(16, 1 << (k - 1).bit_length())
    return group_size % block_k == 0


def _largest_block_k(group_size: int, k: int) -> int:
    if group_size >= k:
        return 32
    block = 16
    while group_size % (block * 2) == 0 and block < 128:
        block *= 2
    if group_size % block:
        raise ValueError(f"group_size {group_size} must be a multiple of 16 for the Triton kernels")
    return block


@functools.lru_cache(maxsize=None)
def tuned(kernel_name: str, family: str, group_size: int, k: int) -> tuple[Callable, dict | None]:
    """(callable kernel, fixed meta-parameters or None when autotuned) for one kernel and shape family.

    ``family`` is "decode" (M ≤ 16, split-K allowed, output accumulated with fp32 atomics) or
    "prefill". Under the interpreter one small config is returned instead of an autotuner.
    """
    import triton

    from kernels import _sparse24_triton, _w4a16_triton, _w8a8_triton

    kernel = {"w4a16": _w4a16_triton.w4a16_gemm_kernel,
              "scaled_mm": _w8a8_triton.scaled_mm_kernel,
              "sparse24": _sparse24_triton.sparse24_gemm_kernel}[kernel_name]
    split_ok = kernel_name != "scaled_mm"
    if interpreting():
        config = interpreter_config(1 if family == "decode" else 64, min(32, _largest_block_k(group_size, k)))
        if not split_ok:
            config["SPLIT_K"] = 1
        return kernel, config
    raw = decode_configs(split_ok) if family == "decode" else prefill_configs()
    configs = [c for c in raw if _valid_block_k(c["BLOCK_K"], group_size, k)]
    if not configs:
        bk = _largest_block_k(group_size, k)
        configs = [dict(c, BLOCK_K=bk) for c in raw[:4]]
    triton_configs = []
    for c in configs:
        meta = {key: v for key, v in c.items() if key not in ("num_warps", "num_stages")}
        triton_configs.append(triton.Config(meta, num_warps=c["num_warps"], num_stages=c["num_stages"]))
    reset = ["out_ptr"] if family == "decode" and split_ok else None
    return triton.autotune(configs=triton_configs, key=["M_BUCKET", "N", "K"], reset_to_zero=reset)(kernel), None


def grid(m: int, n: int, meta: dict) -> tuple[int, int]:
    """Programs: one per output tile along axis 0, one per K split along axis 1."""
    tiles = -(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"])
    return tiles, meta.get("SPLIT_K", 1)
