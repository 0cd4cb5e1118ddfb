"""AutoRound (SignRound): tune each weight's rounding and its groups' clipping range, one decoder layer at a time.

For every quantized Linear of a decoder layer three sets of parameters are trained together, so that
the quantized layer's output matches the dense model's output of that layer (Cheng et al., "Optimize
weight rounding via signed gradient descent", EMNLP 2024 findings; llm-compressor's
``AutoRoundModifier``):

* ``v`` (shape of the weight, starts at 0): an offset added before rounding, ``q = round(w / s + v)``,
  kept in [-0.5, 0.5] — it can move each weight to the other neighbouring grid point;
* ``alpha`` / ``beta`` (one per scale entry, start at 1, kept in [0, 1]): they shrink the group's
  observed max / min before the scale (and zero point) is computed from them — a learned clip.

The quantized weight is ``(clamp(round(w / s + v) + zp) - zp) · s`` with the straight-through
estimator for the rounding (``round`` for integers, the FP8 / FP4 grid for float formats), so the
gradient reaches ``v`` and, through ``s`` and ``zp``, ``alpha`` and ``beta``. Symmetric integer weights
use AutoRound's full-range grid by default (``s = ±absmax / 2^(bits-1)``, see
``AutoRoundSettings.full_range``); every other scale is computed as the engine's observers compute it
(compressed-tensors' ``calculate_qparams``: asymmetric ``(max - min) / 15`` with an integer zero point,
NVFP4 under its global scale, symmetric ``absmax / 7.5`` with ``full_range: false``), each rounded to its
stored dtype, so the exported checkpoint dequantizes to exactly the weight that was tuned.

Optimiser (as AutoRound): signed gradient descent, ``p -= lr · sign(∂L/∂p)``, the learning rate
decaying linearly from ``lr`` (default ``1 / iters``) to 0 over ``iters`` steps; each step draws
``batch_size`` calibration samples at random (a seeded permutation, cycled), the loss is the mean
squared error between the quantized layer's output (on the compressed model's own inputs) and the
dense model's output of the layer (on the dense model's inputs: the second activation stream).
AutoRound keeps the parameters of the step with the lowest batch loss; a batch of easy samples can win
that, so here three candidates are scored by the output error over *all* calibration samples -- that
step, the last step (its learning rate has decayed to 0) and plain round-to-nearest -- and the best is
exported (``AutoRoundResult.kept`` is False when round-to-nearest won): tuning never makes a layer
worse on the calibration set. The clip factors' step defaults to ``1 / max(iters, 200)`` (AutoRound:
``1 / iters``, too coarse below 200 steps; see ``AutoRoundSettings.minmax_lr``). Activations are not quantized during tuning (their scales come from
the calibration statistics, as for GPTQ).

Plain functions; :func:`compression.sequential.compress_model` calls :func:`autoround_layer` once
per decoder layer for the modules an ``AutoRoundModifier`` quantizes.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.func import functional_call

from compression.algorithms.gptq import QuantResult, cpu_has_native
from compression.algorithms.quant import (FP8_DTYPE, FP8_MAX, QuantArgs, _clean_scale, _groups, _half_range,
                                          _q_range, _torch_dtype, dequantize, expand_scale, fp4_global_scale,
                                          full_range_scale, mx_scale,
                                          qparams_from_range, quantize, round_to_e2m1)
from compression.algorithms.reconstruction import _cast, _output, relative_mse

log = logging.getLogger(__name__)

LIMITS = {"iters": (0, 100_000), "batch_size": (1, 4096), "seed": (0, 2**31 - 1)}
LR_RANGE = (1e-8, 10.0)
COMPUTE = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class AutoRoundSettings:
    """The AutoRoundModifier's tuning options (llm-compressor's names)."""

    iters: int = 200
    lr: float | None = None  # None: 1 / iters (AutoRound's default)
    # None: lr when lr is given (AutoRound's rule), else 1 / max(iters, 200): AutoRound's 1 / iters moves the
    # clipping factors too far per step below 200 steps (demo model, layer 5, 50 steps: output error 0.47x
    # round-to-nearest's with a 0.02 step, 0.36x with 0.005, 0.38x without clip tuning)
    minmax_lr: float | None = None
    batch_size: int = 8
    enable_minmax_tuning: bool = True
    seed: int = 42
    # symmetric integer weights: AutoRound's own grid (scale = ±absmax / 2^(bits-1), the sign chosen so the
    # larger side lands on -2^(bits-1) exactly: all 16 INT4 levels, finer steps, negative scales in the
    # checkpoint, as llm-compressor's AutoRoundModifier writes them); False: compressed-tensors' observer
    # grid (scale = absmax / 7.5, positive). Demo model, layer 5, 50 steps: output error 0.0250 vs 0.0283
    # (round-to-nearest 0.0625 vs 0.0768)
    full_range: bool = True
    # the tuning forward/backward: "bfloat16" under autocast (AutoRound's amp), "float32", or "auto":
    # bfloat16 for a 16-bit model on a GPU or on a CPU with native bf16 matmuls, else float32
    compute: str = "auto"

    @property
    def round_lr(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)

    @property
    def clip_lr(self) -> float:
        if self.minmax_lr is not None:
            return self.minmax_lr
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 200)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AutoRoundResult:
    """Output MSE (vs the dense target, all calibration samples) of round-to-nearest and of the tuned layer."""

    error_rtn: float
    error_tuned: float
    iters: int
    best_iter: int
    seconds: float
    kept: bool  # True: the tuned rounding is exported; False: it did not beat round-to-nearest
    relative_rtn: float = 0.0
    relative_tuned: float = 0.0
    modules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"error_rtn": self.error_rtn, "error_tuned": self.error_tuned, "relative_rtn": self.relative_rtn,
                "relative_tuned": self.relative_tuned, "iters": self.iters, "best_iter": self.best_iter,
                "seconds": round(self.seconds, 3), "kept": self.kept, "modules": len(self.modules)}


def supports(args: QuantArgs) -> str | None:
    """None when AutoRound can tune weights of this scheme, else why not."""
    if args.strategy not in ("tensor", "channel", "group", "block", "tensor_group"):
        return f"weight strategy {args.strategy!r}"
    if args.actorder is not None:
        return "act-order (AutoRound keeps the columns in order; drop actorder)"
    return None


# differentiable rounding ---------------------------------------------------------------------------------
def _ste(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` in the forward pass, the identity's gradient in the backward pass."""
    return x + (rounded - x).detach()


def _grid(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Nearest representable value of the scheme's element grid (integers, FP8 E4M3 or FP4 E2M1), clamped."""
    qmin, qmax = _q_range(args)
    if args.type == "int":
        return torch.clamp(torch.round(x), qmin, qmax)
    if args.is_fp4:
        return round_to_e2m1(x)
    return torch.clamp(x, -FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()


def _ungroup(g: torch.Tensor, shape: tuple[int, int], args: QuantArgs) -> torch.Tensor:
    """Inverse of :func:`compression.algorithms.quant._groups`: [*scale_shape, n] back to ``shape``."""
    rows, cols = shape
    if args.strategy == "block":
        bo, bi = args.block_structure
        r, c = rows + (-rows) % bo, cols + (-cols) % bi
        return g.reshape(r // bo, c // bi, bo, bi).transpose(1, 2).reshape(r, c)[:rows, :cols]
    return g.reshape(rows, cols)


class _Tuned:
    """One Linear under tuning: its original weight, the observed group ranges and the tuned parameters."""

    def __init__(self, name: str, module: torch.nn.Linear, args: QuantArgs, mask: torch.Tensor | None,
                 storage: torch.dtype, minmax: bool, full_range: bool = False):
        self.name, self.module, self.args, self.mask, self.storage = name, module, args, mask, storage
        w = module.weight.detach().float()
        self.weight = w.masked_fill(mask, 0.0) if mask is not None else w
        groups = _groups(self.weight, args)
        self.lo = torch.clamp(groups.amin(dim=-1), max=0.0)
        self.hi = torch.clamp(groups.amax(dim=-1), min=0.0)
        self.global_scale = fp4_global_scale(self.weight) if args.has_global_scale else None
        self.v = torch.zeros_like(self.weight, requires_grad=True)
        tune_range = minmax and not args.is_mx  # MX scales are powers of two: no range to tune
        self.full_range = full_range and args.type == "int" and args.symmetric
        self.alpha = torch.ones_like(self.hi, requires_grad=tune_range)
        self.beta = torch.ones_like(self.lo, requires_grad=tune_range)

    def parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [self.v], [p for p in (self.alpha, self.beta) if p.requires_grad]

    def _qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Differentiable (effective scale, zero point) shaped like the scale; rounding through STE."""
        args = self.args
        lo, hi = self.lo * self.beta, self.hi * self.alpha
        if args.is_mx:
            return mx_scale(torch.maximum(lo.abs(), hi).detach(), args.num_bits), None
        qmin, qmax = _q_range(args)
        if self.full_range:
            scale, zp = full_range_scale(lo, hi, args.num_bits), None
        elif args.symmetric:
            scale, zp = torch.maximum(-lo, hi) / _half_range(args), None
        else:
            scale = ((hi - lo) / (qmax - qmin)).clamp_min(torch.finfo(torch.float32).eps)
            zp = torch.clamp(_ste(qmin - lo / scale, torch.round(qmin - lo / scale)), qmin, qmax)
        store = _torch_dtype(args.scale_dtype) or (FP8_DTYPE if args.is_fp4 else self.storage)
        if self.global_scale is not None:
            scale = scale * self.global_scale
        stored = _clean_scale(scale.detach(), store).float()
        scale = _ste(scale, stored)
        if self.global_scale is not None:
            scale = scale / self.global_scale
        return scale, zp

    def qdq(self) -> torch.Tensor:
        """The quantize-dequantized weight as a differentiable function of v, alpha and beta."""
        scale, zp = self._qparams()
        x = _groups(self.weight, self.args) / scale.unsqueeze(-1) + _groups(self.v, self.args)
        if zp is not None:
            x = x + zp.unsqueeze(-1)
        q = _ste(x, _grid(x.detach(), self.args))
        deq = (q - zp.unsqueeze(-1)) * scale.unsqueeze(-1) if zp is not None else q * scale.unsqueeze(-1)
        out = _ungroup(deq, tuple(self.weight.shape), self.args)
        return out.masked_fill(self.mask, 0.0) if self.mask is not None else out

    def clamp_(self) -> None:
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)
            if self.mask is not None:
                self.v.masked_fill_(self.mask, 0.0)
            self.alpha.clamp_(0.0, 1.0)
            self.beta.clamp_(0.0, 1.0)

    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.v.detach().clone(), self.alpha.detach().clone(), self.beta.detach().clone()

    def load(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        with torch.no_grad():
            for p, saved in zip((self.v, self.alpha, self.beta), state):
                p.copy_(saved)

    @torch.no_grad()
    def result(self, loss: float) -> QuantResult:
        """Codes, stored scale (and zero point / global scale) of the current parameters, as exported."""
        args = self.args
        if self.full_range:
            store = _torch_dtype(args.scale_dtype) or self.storage
            scale = _clean_scale(full_range_scale(self.lo * self.beta, self.hi * self.alpha, args.num_bits), store)
            zp = None
        else:
            scale, zp = qparams_from_range(self.lo * self.beta, self.hi * self.alpha, args, self.storage,
                                           global_scale=self.global_scale)
        effective = scale.float() / self.global_scale if self.global_scale is not None else scale.float()
        block = args.block_structure if args.strategy == "block" else None
        shifted = self.weight + self.v * expand_scale(effective, self.weight.shape, block=block)
        codes = quantize(shifted, scale, args, zero_point=zp, global_scale=self.global_scale)
        deq = dequantize(codes, scale, self.storage, args=args, zero_point=zp, global_scale=self.global_scale)
        if self.mask is not None:
            deq = deq.masked_fill(self.mask.to(deq.device), 0.0)
        return QuantResult(deq, codes, scale, loss, zero_point=zp, global_scale=self.global_scale)


# the tuning loop -----------------------------------------------------------------------------------------
Inputs = Sequence[tuple[torch.Tensor, dict]]


def _autocast(settings: AutoRoundSettings, device: torch.device, model_dtype: torch.dtype):
    compute = settings.compute
    if compute == "auto":
        sixteen = model_dtype in (torch.bfloat16, torch.float16)
        compute = "bfloat16" if sixteen and (device.type != "cpu" or cpu_has_native(torch.bfloat16)) else "float32"
    if compute == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _forward(layer, weights: dict[str, torch.Tensor], hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return _output(functional_call(layer, weights, (hidden.detach().float(),), _cast(kwargs, torch.float32)))


@torch.no_grad()
def _error(layer, inputs: Inputs, targets: Sequence[torch.Tensor], weights: dict[str, torch.Tensor],
           amp: Callable[[], Any]) -> tuple[float, float]:
    """(MSE, MSE / mean square of the targets) of the layer with ``weights`` over every sample, computed
    in the tuning's precision (``amp``: its autocast context)."""
    def outputs():
        for hidden, kwargs in inputs:
            with amp():
                out = _forward(layer, weights, hidden, kwargs)
            yield out  # relative_mse widens to float32
    return relative_mse(zip(outputs(), targets))


def autoround_layer(layer: torch.nn.Module, inputs: Inputs, targets: Sequence[torch.Tensor],
                    modules: dict[str, tuple[torch.nn.Linear, QuantArgs, torch.Tensor | None]],
                    settings: AutoRoundSettings = AutoRoundSettings(), *, storage: torch.dtype = torch.bfloat16,
                    should_stop: Callable[[], bool] | None = None) -> tuple[dict[str, QuantResult], AutoRoundResult]:
    """Tune the rounding and clipping of ``modules`` (local name → (Linear, weight scheme, pruning mask or
    None)) of ``layer`` so its outputs on ``inputs`` match ``targets``; see the module docstring.

    Does not change the layer: returns each module's :class:`QuantResult` (dequantized weight in
    ``storage`` dtype, codes, scale, zero point) and the errors before/after. ``should_stop`` is polled
    between steps (the tuning stops early; the caller raises ``JobCancelled`` at the layer boundary).
    """
    if len(inputs) != len(targets) or not inputs:
        raise ValueError(f"need as many targets as inputs (got {len(inputs)} inputs, {len(targets)} targets)")
    if not modules:
        raise ValueError("no quantized Linear in this layer to tune")
    started = time.perf_counter()
    device = targets[0].device
    tuned = [_Tuned(name, module, args, mask, storage, settings.enable_minmax_tuning, settings.full_range)
             for name, (module, args, mask) in modules.items()]
    requires = {id(p): p.requires_grad for p in layer.parameters()}
    dtype = next(layer.parameters()).dtype

    def amp():
        return _autocast(settings, device, dtype)
    if dtype != torch.float32:
        layer.float()
    try:
        for p in layer.parameters():
            p.requires_grad_(False)
        rtn = {f"{t.name}.weight": t.qdq().detach() for t in tuned}
        error_rtn, rel_rtn = _error(layer, inputs, targets, rtn, amp)
        best_iter, best_loss = 0, float("inf")
        best = [t.state() for t in tuned]
        if settings.iters > 0:
            round_params = [p for t in tuned for p in t.parameters()[0]]
            clip_params = [p for t in tuned for p in t.parameters()[1]]
            generator = torch.Generator().manual_seed(settings.seed)
            order = torch.randperm(len(inputs), generator=generator).tolist()
            batch = min(settings.batch_size, len(inputs))
            cursor = 0
            for step in range(settings.iters):
                if should_stop is not None and should_stop():
                    break
                picks = [order[(cursor + k) % len(order)] for k in range(batch)]
                cursor = (cursor + batch) % len(order)
                if cursor < batch:  # a new epoch: a new permutation
                    order = torch.randperm(len(inputs), generator=generator).tolist()
                tokens = sum(targets[i].numel() for i in picks)
                total = 0.0
                with torch.enable_grad():
                    weights = {f"{t.name}.weight": t.qdq() for t in tuned}
                    loss_sum = None
                    for i in picks:
                        hidden, kwargs = inputs[i]
                        with amp():
                            out = _forward(layer, weights, hidden, kwargs)
                        loss = ((out.float() - targets[i].float()) ** 2).sum() / tokens
                        loss_sum = loss if loss_sum is None else loss_sum + loss
                    loss_sum.backward()
                    total = float(loss_sum.detach())
                if total < best_loss:
                    best_loss, best_iter = total, step
                    best = [t.state() for t in tuned]
                decay = 1.0 - step / settings.iters  # LinearLR(1 → 0): the step-th learning rate
                with torch.no_grad():
                    for params, lr in ((round_params, settings.round_lr), (clip_params, settings.clip_lr)):
                        for p in params:
                            if p.grad is not None:
                                p.add_(torch.sign(p.grad), alpha=-lr * decay)
                                p.grad = None
                for t in tuned:
                    t.clamp_()
        # candidates, judged on every calibration sample: the step with the lowest batch loss (AutoRound's
        # choice; a batch of easy samples can win it) and the last step (the learning rate has decayed to 0)
        error_tuned, rel_tuned, chosen = float("inf"), float("inf"), None
        candidates = [("last", [t.state() for t in tuned])] if settings.iters > 0 else []
        if settings.iters > 0 and best_iter != settings.iters - 1:
            candidates.append(("best batch", best))
        for label, states in candidates:
            for t, state in zip(tuned, states):
                t.load(state)
            err, rel = _error(layer, inputs, targets, {f"{t.name}.weight": t.qdq().detach() for t in tuned}, amp)
            if err < error_tuned:
                error_tuned, rel_tuned, chosen = err, rel, (label, states)
        if chosen is not None:
            for t, state in zip(tuned, chosen[1]):
                t.load(state)
            if chosen[0] == "last":
                best_iter = settings.iters - 1
        kept = chosen is not None and error_tuned < error_rtn
        if not kept:
            error_tuned = error_rtn if chosen is None else error_tuned
            for t in tuned:
                t.load((torch.zeros_like(t.v), torch.ones_like(t.alpha), torch.ones_like(t.beta)))
            if settings.iters > 0:
                log.info("AutoRound did not lower the layer's output error (%.4g vs %.4g); round-to-nearest kept",
                         error_tuned, error_rtn)
        results = {t.name: t.result(error_tuned if kept else error_rtn) for t in tuned}
    finally:
        if dtype != torch.float32:
            layer.to(dtype)
        for p in layer.parameters():
            p.requires_grad_(requires.get(id(p), False))
    summary = AutoRoundResult(error_rtn, error_tuned if kept else error_rtn, settings.iters, best_iter,
                              time.perf_counter() - started, kept, rel_rtn, rel_tuned if kept else rel_rtn,
                              [t.name for t in tuned])
    return results, summary
