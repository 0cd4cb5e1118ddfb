"""Which implementation a launcher runs: Triton on CUDA tensors, the torch reference elsewhere.

``COMPRESSOR_FORCE_TRITON=1`` (read at import) or :func:`force_triton` makes every launcher take the
Triton path even for CPU tensors; together with ``TRITON_INTERPRET=1`` (set before triton is
imported) that runs the real kernels on the CPU interpreter, which is how tests/kernels checks them.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_FORCE = os.environ.get("COMPRESSOR_FORCE_TRITON", "") == "1"


def interpreting() -> bool:
    """True when Triton runs on its CPU interpreter (no autotuning there: it would re-run every config)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton for CUDA tensors (or when forced), the torch reference otherwise."""
    if _FORCE:
        return True
    return all(t.is_cuda for t in tensors)


@contextlib.contextmanager
def force_triton(enabled: bool = True) -> Iterator[None]:
    """Temporarily force (or stop forcing) the Triton path regardless of the tensors' device."""
    global _FORCE
    previous, _FORCE = _FORCE, enabled
    try:
        yield
    finally:
        _FORCE = previous
