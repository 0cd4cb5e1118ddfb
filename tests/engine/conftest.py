"""Shared fixtures: tiny random Llama models and short random calibration samples."""
from __future__ import annotations

import pytest
import torch

from tests.tiny import tiny_llama


def same_module_records(a: list[dict], b: list[dict], rel: float = 1e-5) -> bool:
    """Two jobs' ``compression.modules`` records agree: every field equal, the losses to ``rel`` (an expert's
    weights sliced from a fused tensor or read contiguous sum their error in another order)."""
    import math

    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if {k: v for k, v in x.items() if k != "losses"} != {k: v for k, v in y.items() if k != "losses"}:
            return False
        lx, ly = x.get("losses") or {}, y.get("losses") or {}
        if lx.keys() != ly.keys() or not all(math.isclose(lx[k], ly[k], rel_tol=rel) for k in lx):
            return False
    return True


def read_safetensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder`` (an export, or a saved source model)."""
    from pathlib import Path

    from safetensors import safe_open

    tensors = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def random_calibration(n: int = 4, length: int = 24, seed: int = 1, vocab: int = 49152) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


@pytest.fixture
def calibration() -> list[dict]:
    return random_calibration()


@pytest.fixture
def model():
    return tiny_llama()


def correlated_inputs(tokens: int = 512, cols: int = 64, seed: int = 0) -> torch.Tensor:
    """Inputs with unequal, correlated columns (a realistic, well-conditioned Hessian)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) * 0.3 + torch.eye(cols)
    scales = torch.linspace(0.2, 3.0, cols)
    return (torch.randn(tokens, cols, generator=gen) * scales) @ mix


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test (tiny-model tests are thousands of tiny ops: OpenMP hand-offs
    on a busy machine cost 10x more than the math). Opt in with pytest.mark.usefixtures."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
