"""Quantization arithmetic as pure functions (compressed-tensors conventions, reference doc §2.4).

Every quantizer comes as a pair ``quantize_*`` / ``dequantize_*`` that asserts its own
preconditions. Weights are ``[out, in]``; a scale is ``[1]`` (tensor), ``[out, 1]`` (channel)
or ``[out, in // group_size]`` (group). Only symmetric schemes are implemented: zero points are
always 0 and never stored.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
STRATEGIES = ("tensor", "channel", "group", "token")


@dataclass(frozen=True)
class QuantArgs:
    """One QuantizationArgs entry (the subset of compressed-tensors fields we implement)."""

    num_bits: int = 8
    type: str = "int"  # "int" | "float"
    symmetric: bool = True
    strategy: str = "channel"
    group_size: int | None = None
    dynamic: bool = False
    actorder: str | None = None
    observer: str = "minmax"  # "minmax" | "mse"

    def to_dict(self) -> dict:
        return asdict(self)

    def checkpoint_dict(self) -> dict:
        """The minimal QuantizationArgs fields valid for compressed-tensors 0.11 → 0.20 (doc §2.8)."""
        return {"num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric,
                "strategy": self.strategy, "group_size": self.group_size, "dynamic": self.dynamic,
                "actorder": self.actorder, "observer": self.observer, "observer_kwargs": {}}


def int_range(bits: int) -> tuple[int, int]:
    """Signed range of a b-bit integer: int4 → (-8, 7), int8 → (-128, 127)."""
    assert 2 <= bits <= 8, bits
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _half_range(args: QuantArgs) -> float:
    if args.type == "float":
        assert args.num_bits == 8, "only FP8 E4M3 floats are implemented"
        return FP8_MAX
    qmin, qmax = int_range(args.num_bits)
    return (qmax - qmin) / 2  # int4: 7.5, int8: 127.5


def _grouped_absmax(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """absmax of w per tensor / row / group, shaped like the scale."""
    w = w.float().abs()
    if args.strategy == "tensor":
        return w.amax().reshape(1)
    if args.strategy == "channel":
        return w.amax(dim=1, keepdim=True)
    if args.strategy == "group":
        rows, cols = w.shape
        g = args.group_size
        assert g and cols % g == 0, f"group_size {g} must divide in-features {cols}"
        return w.reshape(rows, cols // g, g).amax(dim=2)
    raise ValueError(f"weight strategy {args.strategy!r} not supported")


def expand_scale(scale: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Broadcast a tensor/channel/group scale to a full ``[out, in]`` weight shape."""
    rows, cols = shape
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(rows, cols)
    if scale.shape[1] == 1:
        return scale.expand(rows, cols)
    group = cols // scale.shape[1]
    return scale.repeat_interleave(group, dim=1)


def _clean_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to the storage dtype and replace zero scales by that dtype's eps (doc §2.4)."""
    scale = scale.to(dtype)
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(dtype).eps), scale)


def minmax_scale(w: torch.Tensor, args: QuantArgs, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Symmetric scale from the absolute maximum: absmax / 7.5 (int4), / 127.5 (int8), / 448 (FP8)."""
    assert args.symmetric, "asymmetric quantization is not implemented"
    return _clean_scale(_grouped_absmax(w, args) / _half_range(args), dtype or w.dtype)


def mse_scale(w: torch.Tensor, args: QuantArgs, dtype: torch.dtype | None = None, *,
              grid: int = 20, max_shrink: float = 0.8, norm: float = 2.4) -> torch.Tensor:
    """Symmetric scale minimizing |w - fq(w)|^norm per scale entry over shrunk absmax ranges.

    Candidates: absmax · (1 - i/grid) for i < max_shrink·grid (default: 1.0, 0.95, …, 0.25); the
    largest candidate wins ties. Exact, but cheap: a candidate is scored only on the scale entries
    (rows / groups) it could still win. Its clipping error alone, Σ (|w| - qmax·s)^norm over the
    clipped weights among the 32 largest of the entry, is a lower bound of its error; where that
    bound already reaches the best error so far the entry is skipped. For FP8 the full-range
    candidate usually wins outright, so most entries are scored once instead of 16 times.
    """
    dtype = dtype or w.dtype
    rows, cols = w.shape
    absmax = _grouped_absmax(w, args)  # [1] | [rows, 1] | [rows, groups]
    if args.strategy == "tensor":
        entries, width = 1, rows * cols
    else:
        entries, width = absmax.numel(), cols // absmax.shape[1]
    shrink = 1 - torch.arange(int(max_shrink * grid), device=w.device, dtype=torch.float32) / grid
    candidates = _clean_scale(absmax.reshape(1, -1) * shrink.view(-1, 1) / _half_range(args), dtype)  # [C, E]
    wf = w.float().reshape(entries, width)
    # the largest magnitudes of each entry: summing only these clipped terms still bounds from below
    largest = torch.topk(wf.abs(), min(width, 32), dim=1, sorted=False).values
    clip_at = FP8_MAX if args.type == "float" else float(2 ** (args.num_bits - 1))  # |q·s| never exceeds
    best_err = _entry_errors(wf, candidates[0].float(), args, norm)
    best = torch.zeros(entries, dtype=torch.long, device=w.device)
    for i in range(1, candidates.shape[0]):
        scale = candidates[i].float()
        bound = (largest - (clip_at * scale).unsqueeze(1)).clamp_min_(0).pow_(norm).sum(dim=1)
        open_entries = torch.nonzero(bound * (1 - 1e-6) < best_err).flatten()
        if open_entries.numel() == 0:
            continue
        err = _entry_errors(wf[open_entries], scale[open_entries], args, norm)
        better = err < best_err[open_entries]
        winners = open_entries[better]
        best_err[winners] = err[better]
        best[winners] = i
    chosen = torch.gather(candidates, 0, best.unsqueeze(0))[0]
    return chosen.reshape(absmax.shape)


def _entry_errors(w: torch.Tensor, scale: torch.Tensor, args: QuantArgs, norm: float) -> torch.Tensor:
    """Σ |w - fq(w)|^norm per row of w [E, width] with one scale per row (scale [E], fp32)."""
    s = scale.unsqueeze(1)
    x = w / s
    if args.type == "float":
        x = x.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
    else:
        qmin, qmax = int_range(args.num_bits)
        x = x.round_().clamp_(qmin, qmax)
    return x.mul_(s).sub_(w).abs_().pow_(norm).sum(dim=1)


def _reduce_like_scale(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    if args.strategy == "tensor":
        return x.sum().reshape(1)
    if args.strategy == "channel":
        return x.sum(dim=1, keepdim=True)
    rows, cols = x.shape
    return x.reshape(rows, cols // args.group_size, args.group_size).sum(dim=2)


def compute_scale(w: torch.Tensor, args: QuantArgs, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight scale chosen by ``args.observer`` ("minmax" or "mse"), in ``dtype``."""
    if args.observer == "mse":
        return mse_scale(w, args, dtype)
    return minmax_scale(w, args, dtype)


def quantize_int(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(w / scale), qmin, qmax) as int8; ``scale`` broadcastable or tensor/channel/group."""
    assert w.dim() == 2 and w.is_floating_point(), (w.shape, w.dtype)
    qmin, qmax = int_range(bits)
    s = expand_scale(scale, w.shape)
    return torch.clamp(torch.round(w.float() / s.float()), qmin, qmax).to(torch.int8)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(q - 0) · scale, computed in the scale's dtype like compressed-tensors does."""
    assert q.dtype in (torch.int8, torch.int32), q.dtype
    s = expand_scale(scale, q.shape)
    return (q.to(s.dtype) * s).to(dtype or s.dtype)


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn(clamp(w / scale, ±448))."""
    assert w.dim() == 2 and w.is_floating_point(), (w.shape, w.dtype)
    s = expand_scale(scale, w.shape)
    return torch.clamp(w.float() / s.float(), -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """q · scale in the scale's dtype."""
    assert q.dtype == FP8_DTYPE, q.dtype
    s = expand_scale(scale, q.shape)
    return (q.to(s.dtype) * s).to(dtype or s.dtype)


def quantize(w: torch.Tensor, scale: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Integer (int8 container) or float8 codes of ``w``."""
    if args.type == "float":
        return quantize_fp8(w, scale)
    return quantize_int(w, scale, args.num_bits)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    if q.dtype == FP8_DTYPE:
        return dequantize_fp8(q, scale, dtype)
    return dequantize_int(q, scale, dtype)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """dequantize(quantize(w)) in ``w``'s dtype."""
    return dequantize(quantize(w, scale, args), scale, w.dtype)


def fake_quantize_activation(x: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """Quantize-dequantize an activation: dynamic per token / per tensor, or static with ``input_scale``."""
    half = _half_range(args)
    if args.dynamic:
        if args.strategy == "token":
            absmax = x.abs().amax(dim=-1, keepdim=True)
        else:
            absmax = x.abs().amax()
        scale = absmax / half
        scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(x.dtype).eps), scale)
    else:
        assert input_scale is not None, "static activation quantization needs an input_scale"
        scale = input_scale.to(device=x.device, dtype=x.dtype)
    if args.type == "float":
        q = torch.clamp(x / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    else:
        qmin, qmax = int_range(args.num_bits)
        q = torch.clamp(torch.round(x / scale), qmin, qmax)
    return q.to(x.dtype) * scale
