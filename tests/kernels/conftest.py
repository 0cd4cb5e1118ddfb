"""Kernel tests run the real Triton kernels: on CUDA when present, else on Triton's CPU interpreter."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is created (kernels import triton lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_path():
    """Force the Triton launchers even for CPU tensors (interpreter)."""
    from kernels._dispatch import force_triton

    with force_triton():
        yield
