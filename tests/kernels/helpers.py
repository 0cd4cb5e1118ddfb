"""Test-side packers written from the documented layouts (independent of kernels/packing.py)."""
from __future__ import annotations

import torch


def pack_int4_by_hand(q: torch.Tensor) -> torch.Tensor:
    """Doc §2.4: column 8j+i → bits [4i, 4i+4) of word j as q + 8; pad with zeros; read as int32."""
    rows, cols = q.shape
    words = -(-cols // 8)
    out = torch.zeros(rows, words, dtype=torch.int64)
    for col in range(cols):
        out[:, col // 8] |= (q[:, col].to(torch.int64) + 8) << (4 * (col % 8))
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def meta_by_hand(positions: torch.Tensor) -> torch.Tensor:
    """kernels/packing.py docstring: compact column c's position in bits [2(c%16), +2) of word c//16."""
    rows, half = positions.shape
    out = torch.zeros(rows, -(-half // 16), dtype=torch.int64)
    for c in range(half):
        out[:, c // 16] |= positions[:, c].to(torch.int64) << (2 * (c % 16))
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def random_24_mask(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A random 2:4 keep-mask: exactly two of every four consecutive columns."""
    order = torch.rand(rows, cols // 4, 4, generator=generator).argsort(dim=2)[:, :, :2]
    return torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, order, True).reshape(rows, cols)


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, name: str = "") -> None:
    """Finite outputs and max |out - ref| ≤ rtol · max |ref| (plus a tiny absolute floor)."""
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite output"
    assert torch.isfinite(ref.float()).all(), f"{name}: non-finite reference"
    err = (out.float() - ref.float()).abs().max().item()
    bound = rtol * ref.float().abs().max().item() + 1e-6
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
