"""SparseGPT (Frantar & Alistarh) pruning as a plain function: N:M (2:4, ...) or unstructured, with compensation.

Same Hessian, dampening and Cholesky machinery as GPTQ (:mod:`compression.algorithms.gptq`); the per-column
"quantize" step becomes "zero the masked entries" (reference doc §3.3).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compression.algorithms.gptq import (CholeskyFailed, cached_inverse, disable_tf32, prepare_hessian, quadratic_loss,
                              sweep_threads)

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """Pruned + compensated weight, its mask (True = pruned) and the reconstruction loss."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    dead_columns: int = 0
    dampening_frac: float | None = None
    fallback: str | None = None

    @property
    def sparsity(self) -> float:
        return float(self.mask.float().mean())


def nm_pattern(mask_structure: str) -> tuple[int, int]:
    """'N:M' → (N, M): N of every M consecutive input columns are pruned; '0:0' → (0, 0) (unstructured)."""
    n, m = (int(v) for v in mask_structure.split(":"))
    assert (n, m) == (0, 0) or 0 < n < m, mask_structure
    return n, m


def magnitude_mask_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M mask by magnitude: in every group of ``m`` input columns prune the ``n`` smallest |w|."""
    rows, cols = weight.shape
    groups = weight.abs().reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def magnitude_mask_24(weight: torch.Tensor) -> torch.Tensor:
    """2:4 mask by magnitude: in every group of 4 input columns prune the 2 smallest |w|."""
    return magnitude_mask_nm(weight, 2, 4)


def _magnitude_mask(w: torch.Tensor, sparsity: float, nm: tuple[int, int]) -> torch.Tensor:
    if nm[1]:
        return magnitude_mask_nm(w, *nm)
    k = int(w.numel() * sparsity)
    thresh = torch.kthvalue(w.abs().flatten(), max(k, 1)).values
    return w.abs() <= thresh


def magnitude_prune(weight: torch.Tensor, *, sparsity: float = 0.5, mask_structure: str = "2:4") -> PruneResult:
    """Prune by |w| alone (no Hessian, no compensation): the fallback for weights without statistics,
    e.g. an MoE expert the router sent too few calibration tokens. Loss is the mean squared change."""
    w = weight.float()
    mask = _magnitude_mask(w, sparsity, nm_pattern(mask_structure))
    pruned = w.masked_fill(mask, 0.0).to(weight.dtype)
    return PruneResult(pruned, mask, float(torch.mean((pruned.float() - w) ** 2)))


def wanda_prune(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float = 0.5,
                mask_structure: str = "0:0") -> PruneResult:
    """Wanda (Sun et al., llm-compressor's WandaPruningModifier): score |W_ij| · ||X_j||₂ (the input
    column norms from the Hessian's diagonal), prune the lowest ``sparsity`` of each output row, or
    ``n`` of every ``m`` columns for an N:M mask; no weight update."""
    n, m = nm_pattern(mask_structure)
    w = weight.float()
    score = w.abs() * torch.diag(hessian.float()).clamp_min(0).sqrt().unsqueeze(0)
    if m:
        mask = magnitude_mask_nm(score, n, m)
    else:
        k = int(w.shape[1] * sparsity)
        mask = torch.zeros_like(w, dtype=torch.bool)
        if k:
            mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
    pruned = w.masked_fill(mask, 0.0).to(weight.dtype)
    return PruneResult(pruned, mask, quadratic_loss(pruned.float() - w, hessian.float()))


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float = 0.5,
                    mask_structure: str = "2:4", block_size: int = 128,
                    dampening_frac: float = 0.01, preserve: torch.Tensor | None = None,
                    inverses: dict | None = None) -> PruneResult:
    """Prune ``weight`` [out, in] to ``mask_structure`` ("N:M" such as "2:4", or "0:0" = unstructured at ``sparsity``).

    N:M: when the sweep reaches column i (i % M == 0), each row prunes the N of columns i..i+M-1 with
    the smallest w²/U_jj² (current, already compensated values). Unstructured: at each block start
    prune the ``sparsity`` fraction with the smallest saliency over the whole block. Pruned
    weights are exactly +0.0. Falls back to magnitude pruning if the Cholesky inverse fails.
    ``preserve`` (llm-compressor's ``preserve_sparsity_mask``): entries that are pruned already and
    stay pruned; the mask is extended around them to reach the target. ``inverses``: as in
    :func:`compression.algorithms.gptq.gptq_quantize` (the modules sharing this Hessian share its inverse).
    """
    assert weight.dim() == 2 and hessian.shape == (weight.shape[1],) * 2, (weight.shape, hessian.shape)
    nm = nm_pattern(mask_structure)
    rows, cols = weight.shape
    if nm[1]:
        assert cols % nm[1] == 0, f"{mask_structure} needs in-features divisible by {nm[1]}, got {cols}"
        assert block_size % nm[1] == 0, f"block_size must be a multiple of {nm[1]}"
    disable_tf32()
    h, w, n_dead = prepare_hessian(hessian, weight)
    try:
        upper, used = cached_inverse(inverses, h, dampening_frac)
    except CholeskyFailed as exc:
        mask = _magnitude_mask(w.masked_fill(preserve, 0.0) if preserve is not None else w, sparsity, nm)
        pruned = w.masked_fill(mask, 0.0).to(weight.dtype)
        reason = f"SparseGPT Cholesky failed ({exc}); used magnitude pruning without compensation"
        return PruneResult(pruned, mask, quadratic_loss(pruned.float() - weight.float(), h), n_dead, None, reason)

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    losses = torch.zeros(rows, device=w.device)
    with sweep_threads(w.device):
        _sweep(w, upper, mask, losses, sparsity, nm, block_size, preserve)
    pruned = w.masked_fill(mask, 0.0).to(weight.dtype)  # +0.0, never -0.0
    return PruneResult(pruned, mask, float(losses.sum()), n_dead, used, None)


def _sweep(w: torch.Tensor, upper: torch.Tensor, mask: torch.Tensor, losses: torch.Tensor, sparsity: float,
           nm: tuple[int, int], block_size: int, preserve: torch.Tensor | None = None) -> None:
    """The blocked SparseGPT column loop (in place on ``w``, ``mask``, ``losses``).

    Each block is held transposed (column i of the block is the contiguous row i), as in
    :func:`compression.algorithms.gptq._gptq_sweep`: a column costs err = (pruned part) / U_ii,
    zeroing its pruned entries and the rank-1 update w -= err · u of the block's later columns (the
    same weights and masks bit for bit as before); the loss Σ err² / 2 is summed once per block.
    """
    cols = w.shape[1]
    n, m = nm
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].t().contiguous()  # [block, rows]
        u1 = upper[i1:i2, i1:i2]
        diag = torch.diag(u1)
        diag_sq = diag ** 2
        err1 = torch.empty_like(w1)
        prod = torch.empty_like(w1)
        ucols = u1.unsqueeze(2)  # u1[i, j] as a [.., 1] column against err's row
        zero = w1.new_zeros(())
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        keep1 = preserve[:, i1:i2] if preserve is not None else None
        if not m:
            saliency = w1.t() ** 2 / diag_sq.unsqueeze(0)
            if keep1 is not None:
                saliency = saliency.masked_fill(keep1, -1.0)  # already pruned: always below the threshold
            k = int(saliency.numel() * sparsity)
            if k > 0:
                thresh = torch.sort(saliency.flatten())[0][k - 1]
                mask1 = (saliency <= thresh).t().contiguous()
        last = i2 - i1 - 1
        for i, d in enumerate(diag.tolist()):
            if m and i % m == 0:
                saliency = (w1[i:i + m].t() ** 2 / diag_sq[i:i + m].unsqueeze(0)).contiguous()  # [rows, m]
                if keep1 is not None:
                    saliency = saliency.masked_fill(keep1[:, i:i + m], -1.0)
                idx = torch.topk(saliency, n, dim=1, largest=False).indices
                mask1[i:i + m].t().scatter_(1, idx, True)
            col, pruned, err = w1[i], mask1[i], err1[i]
            torch.where(pruned, col, zero, out=err).div_(d)  # (w - q) / d, q = w with the pruned entries zeroed
            col.masked_fill_(pruned, 0.0)
            if i < last:  # w -= err * u, as two ops (addr_ fuses them and rounds differently)
                w1[i + 1:].sub_(torch.mul(ucols[i, i + 1:], err, out=prod[i + 1:]))
        w[:, i1:i2] = w1.t()
        mask[:, i1:i2] = mask1.t()
        losses += err1.square().sum(0).mul_(0.5)
        if i2 < cols:
            w[:, i2:] -= err1.t().contiguous() @ upper[i1:i2, i2:]
