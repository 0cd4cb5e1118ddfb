"""Layer-wise reconstruction after pruning: fit one decoder layer's kept weights to the dense output.

After SparseGPT has pruned every targeted Linear of a decoder layer, the layer's remaining
(unpruned) weights are optimised so that the sparse layer's output matches the dense layer's
output on the calibration activations:

    minimise  mean over samples of  || layer_sparse(x) - y_dense ||²        (per-element MSE)

* ``x`` are the inputs the layer sees in the compressed model (the previous layers already pruned
  and reconstructed); ``y_dense`` is the dense target. With ``target="dense"`` (the default) the
  target is the *dense model's* output of this layer (a second, dense activation stream is carried
  through the layers, so the fit also corrects the error the earlier layers let through); with
  ``target="layer"`` it is the dense layer applied to the same ``x``.
* Only the weights of the pruned Linears move; norms and everything else stay fixed.
* The mask is held exactly: gradients of pruned positions are zeroed before every optimiser step
  and the weights are re-masked after it, so pruned entries stay ``+0.0`` (2:4 pattern kept).
* Optimiser: Adam (β = 0.9, 0.999, no weight decay) with learning rate ``lr``, ``steps`` steps of
  ``batch_size`` calibration samples each (cycled in order), math in float32 whatever the model's
  dtype. A fixed, stated budget: ``steps × batch_size`` sample passes forward and backward.
* Never worse: the error on all calibration samples is measured before and after; if the fit did
  not lower it, the pruned (SparseGPT) weights are restored and the result says so.

Plain functions; :func:`compression.sequential.compress_model` calls :func:`reconstruct_layer`
between the sparsity and the quantization steps of each layer when the SparseGPTModifier has a
``reconstruction`` option.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

TARGETS = ("dense", "layer")
OPTIMIZERS = ("adam",)
LIMITS = {"steps": (1, 10_000), "batch_size": (1, 1024)}
LR_RANGE = (1e-8, 1e-1)


@dataclass(frozen=True)
class ReconstructionSettings:
    """Budget and optimiser of one layer's reconstruction (the recipe's ``reconstruction`` option)."""

    steps: int = 32
    lr: float = 1e-4
    batch_size: int = 4
    optimizer: str = "adam"
    target: str = "dense"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReconstructionResult:
    """Mean squared error of the layer output vs the dense target before and after the fit."""

    error_before: float
    error_after: float
    steps: int
    seconds: float
    kept: bool  # False when the fit did not help and the pruned weights were restored
    relative_before: float = 0.0  # error / mean square of the target
    relative_after: float = 0.0

    def to_dict(self) -> dict:
        return {"error_before": self.error_before, "error_after": self.error_after,
                "relative_before": self.relative_before, "relative_after": self.relative_after,
                "steps": self.steps, "seconds": round(self.seconds, 3), "kept": self.kept}


Inputs = Sequence[tuple[torch.Tensor, dict]]


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """Floating tensors inside ``obj`` (kwargs: position embeddings, masks) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


@torch.no_grad()
def layer_outputs(layer: torch.nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    """The layer's output hidden states for every (hidden, kwargs) input, in the layer's dtype."""
    return [_output(layer(hidden, **kwargs)).detach() for hidden, kwargs in inputs]


def relative_mse(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(MSE, MSE / mean square of the references) over (output, reference) pairs, accumulated in float32."""
    sq_err = sq_ref = 0.0
    count = 0
    for out, ref in pairs:
        out, ref = out.float(), ref.float()
        sq_err += float(((out - ref) ** 2).sum())
        sq_ref += float((ref ** 2).sum())
        count += ref.numel()
    return sq_err / max(count, 1), (sq_err / sq_ref if sq_ref > 0 else float("inf"))


@torch.no_grad()
def output_error(layer: torch.nn.Module, inputs: Inputs, targets: Sequence[torch.Tensor],
                 dtype: torch.dtype | None = None) -> tuple[float, float]:
    """(MSE, MSE / mean square of the targets) of the layer's outputs against ``targets``."""
    if len(inputs) != len(targets) or not inputs:
        raise ValueError(f"need as many targets as inputs (got {len(inputs)} inputs, {len(targets)} targets)")

    def outputs():
        for hidden, kwargs in inputs:
            if dtype is not None:
                hidden, kwargs = hidden.to(dtype), _cast(kwargs, dtype)
            yield _output(layer(hidden, **kwargs))
    return relative_mse(zip(outputs(), targets))


def apply_masks(masks: dict[torch.nn.Parameter, torch.Tensor]) -> None:
    """Set every pruned position (mask True) to +0.0."""
    with torch.no_grad():
        for param, mask in masks.items():
            param.data.masked_fill_(mask, 0.0)


def mask_gradients(masks: dict[torch.nn.Parameter, torch.Tensor]) -> None:
    """Zero the gradient of every pruned position so the optimiser never moves it."""
    for param, mask in masks.items():
        if param.grad is not None:
            param.grad.masked_fill_(mask, 0.0)


def reconstruct_layer(layer: torch.nn.Module, inputs: Inputs, targets: Sequence[torch.Tensor],
                      weights: dict[str, tuple[torch.nn.Linear, torch.Tensor]],
                      settings: ReconstructionSettings = ReconstructionSettings(), *,
                      should_stop: Callable[[], bool] | None = None) -> ReconstructionResult:
    """Fit ``layer`` in place so its outputs on ``inputs`` match ``targets``; see the module docstring.

    ``weights`` maps a name to (Linear, mask) for every pruned Linear of the layer (mask True =
    pruned, same shape as the weight). Only those weights are trained. ``should_stop`` is polled
    between steps; when it turns true the fit stops early (the caller raises ``JobCancelled`` at the
    layer boundary). Returns errors on all of ``inputs`` before and after.
    """
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {settings.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    if not weights:
        raise ValueError("no pruned Linear in this layer to reconstruct")
    started = time.perf_counter()
    params = [module.weight for module, _ in weights.values()]
    dtype = params[0].dtype
    masks = {module.weight: mask.to(module.weight.device, torch.bool) for module, mask in weights.values()}
    for param, mask in masks.items():
        if mask.shape != param.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight {tuple(param.shape)}")
    original = [p.detach().clone() for p in params]
    requires = {id(p): p.requires_grad for p in layer.parameters()}
    if dtype != torch.float32:
        layer.float()
    try:
        error_before, rel_before = output_error(layer, inputs, targets, torch.float32)
        for p in layer.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=settings.lr, betas=(0.9, 0.999), weight_decay=0.0)
        order = list(range(len(inputs)))
        cursor = steps = 0
        with torch.enable_grad():
            for _ in range(settings.steps):
                if should_stop is not None and should_stop():
                    break
                optimizer.zero_grad(set_to_none=True)
                batch = [order[(cursor + k) % len(order)] for k in range(min(settings.batch_size, len(order)))]
                cursor = (cursor + len(batch)) % len(order)
                tokens = sum(targets[i].numel() for i in batch)
                for i in batch:
                    hidden, kwargs = inputs[i]
                    out = _output(layer(hidden.float(), **_cast(kwargs, torch.float32)))
                    loss = ((out - targets[i].float()) ** 2).sum() / tokens
                    loss.backward()
                mask_gradients(masks)
                optimizer.step()
                apply_masks(masks)
                steps += 1
        for p in layer.parameters():
            p.requires_grad_(False)
        error_after, rel_after = output_error(layer, inputs, targets, torch.float32)
        kept = error_after < error_before
        if not kept:
            with torch.no_grad():
                for p, saved in zip(params, original):
                    p.data.copy_(saved.float())
            error_after, rel_after = error_before, rel_before
            log.info("reconstruction did not lower the error (%.4g); pruned weights restored", error_before)
    finally:
        if dtype != torch.float32:
            layer.to(dtype)
        apply_masks(masks)
        for p in layer.parameters():
            p.requires_grad_(requires.get(id(p), False))
    return ReconstructionResult(error_before, error_after, steps, time.perf_counter() - started, kept,
                                rel_before, rel_after)
