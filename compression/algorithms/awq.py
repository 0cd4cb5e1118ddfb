"""AWQ (Lin et al.) scale search as plain functions, following llm-compressor 0.14's AWQModifier.

One smoothing group = a smooth layer (norm or Linear) whose output feeds the balance Linears, and
the parent module whose output the search watches (the lowest common ancestor of the balance
layers: ``self_attn`` for q/k/v, ``mlp`` for gate/up, ``down_proj`` itself for up→down).

For every grid point ``ratio`` in [0, 1] the candidate per-input-channel scales are
``x_mean^ratio / (w_mean^(1-ratio) + 1e-4)`` (duo scaling) or ``x_mean^ratio`` (activations only),
normalised by ``sqrt(max · min)``; the balance weights become ``Q(W · s) / s`` (Q = round-to-nearest
with the balance layer's own quantization scheme, min-max scales) and the parent is re-run on the
cached calibration inputs. The scales with the smallest mean squared error against the float
parent output win and are folded into the smooth layer (÷ s) and the balance layers (× s).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from compression.algorithms.gptq import QuantResult, live_hessian, quantize_weight, refit_scales
from compression.algorithms.quant import (QuantArgs, clippable, compute_qparams, dequantize, fake_quantize,
                                          fp4_global_scale, observe, qparams_from_range)

def _awq(smooth: str, *balance: str) -> dict:
    return {"smooth_layer": f"re:.*{smooth}$", "balance_layers": [f"re:.*{b}$" for b in balance]}


# Default mappings, as llm-compressor 0.14's registry has them per architecture; the engine picks them per
# decoder layer from the module names it finds there (compression.algorithms.smoothing._default_mappings):
# an attention part and an MLP part.
ATTENTION_MAPPINGS = {
    "default": [_awq("input_layernorm", "q_proj", "k_proj", "v_proj"), _awq("v_proj", "o_proj")],
    "phi3": [_awq("input_layernorm", "qkv_proj"), _awq("qkv_proj", "o_proj")],
    # multi-head latent attention (DeepSeek V2/V3): the query may be low-rank (q_a_proj → q_a_layernorm → q_b_proj)
    "mla": [_awq("input_layernorm", "(q|q_a)_proj", "kv_a_proj_with_mqa"), _awq("q_a_layernorm", "q_b_proj"),
            _awq("kv_a_layernorm", "kv_b_proj")],
    # Gemma 3 normalises q and k after their projections (q_norm, k_norm); llm-compressor leaves
    # input_layernorm → q/k/v out for it (smoothing it scored worse than plain rounding: its issue 2522)
    "gemma3": [_awq("v_proj", "o_proj")],
}
MLP_MAPPINGS = {
    "default": [_awq("post_attention_layernorm", "gate_proj", "up_proj"), _awq("up_proj", "down_proj")],
    "phi3": [_awq("post_attention_layernorm", "gate_up_proj"), _awq("gate_up_proj", "down_proj")],
    # Gemma 2/3: the MLP reads pre_feedforward_layernorm (post_attention_layernorm normalises the attention
    # output before the residual add)
    "gemma": [_awq("pre_feedforward_layernorm", "gate_proj", "up_proj"), _awq("up_proj", "down_proj")],
    # MoE: the router reads the norm too and is rescaled with the experts (and any shared expert)
    "moe": [_awq("post_attention_layernorm", "mlp.gate", "gate_proj", "up_proj"), _awq("up_proj", "down_proj")],
    # Mixtral's experts: w1 (gate), w3 (up), w2 (down)
    "mixtral": [_awq("post_attention_layernorm", "mlp.gate", "experts.*.w1", "experts.*.w3"), _awq("w3", "w2")],
}


def grid_points(n_grid: int, duo_scaling: bool | str) -> list[tuple[float, bool]]:
    """(ratio, use duo scaling) pairs searched, as llm-compressor 0.14 orders them."""
    if duo_scaling == "both":
        n = n_grid // 2
        return [(i / (n - 1), duo) for i in range(n) for duo in (False, True)]
    if duo_scaling:
        return [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]
    return [(i / (n_grid - 1), False) for i in range(n_grid)]


def weight_means(weights: list[torch.Tensor], args: list[QuantArgs | None]) -> torch.Tensor:
    """Mean over all output rows of |W| normalised by its quantization group's max, per input channel."""
    total, rows = 0.0, 0
    for w, a in zip(weights, args):
        w = w.detach().float().abs()
        out_f, in_f = w.shape
        if a is None or a.strategy == "tensor":
            chunk = w.numel()
        elif a.strategy in ("group", "tensor_group"):
            chunk = a.group_size
        else:
            chunk = in_f
        g = w.reshape(-1, chunk)
        g = (g / (g.amax(dim=1, keepdim=True) + 1e-6)).reshape(out_f, in_f)
        total = total + g.sum(dim=0)
        rows += out_f
    return total / rows


def _fake_quant(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Round-to-nearest with min-max scales (the search's memoryless observer)."""
    minmax = QuantArgs(**{**args.to_dict(), "observer": "minmax", "actorder": None})
    g = fp4_global_scale(w) if minmax.has_global_scale else None
    scale, zp = compute_qparams(w, minmax, torch.float32, global_scale=g)
    return fake_quantize(w.float(), scale, minmax, zero_point=zp, global_scale=g)


@dataclass
class AWQResult:
    scales: torch.Tensor
    ratio: float
    duo: bool
    initial_error: float
    best_error: float


@torch.no_grad()
def awq_search(x_mean: torch.Tensor, balance: list[torch.nn.Linear], schemes: list[QuantArgs | None],
               run_parent: Callable[[], list[torch.Tensor]], *, n_grid: int = 20,
               duo_scaling: bool | str = True) -> AWQResult:
    """Grid-search the smoothing scales for one group; leaves the balance weights as they were.

    ``run_parent()`` re-runs the parent module on its cached inputs and returns its outputs.
    """
    originals = [layer.weight.data.clone() for layer in balance]
    float_out = [o.float() for o in run_parent()]
    w_mean = weight_means(originals, schemes) if duo_scaling else None
    x_mean = x_mean.float()
    best: AWQResult | None = None
    initial = None
    try:
        for ratio, duo in grid_points(n_grid, duo_scaling):
            if duo:
                scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            else:
                scales = x_mean.pow(ratio).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            scales[~torch.isfinite(scales)] = 1.0
            for layer, w, args in zip(balance, originals, schemes):
                scaled = w.float() * scales.to(w.device).unsqueeze(0)
                q = _fake_quant(scaled, args) if args is not None else scaled
                layer.weight.data = (q / scales.to(w.device).unsqueeze(0)).to(w.dtype)
            out = run_parent()
            err_sum = sum(float((o.float() - f).pow(2).sum()) for o, f in zip(out, float_out))
            error = err_sum / max(sum(f.numel() for f in float_out), 1)
            if initial is None:
                initial = error
            if best is None or error < best.best_error:
                best = AWQResult(scales.clone(), ratio, duo, initial, error)
    finally:
        for layer, w in zip(balance, originals):
            layer.weight.data = w
    if best is None or not torch.isfinite(best.scales).all():
        raise ValueError("AWQ found no finite loss: the parent module produced NaN/inf on the calibration data")
    best.initial_error = initial
    return best


# AWQ's weight clipping (Lin et al., section 3; AutoAWQ's ``apply_clip``): 20 shrink factors of the
# group's range, down to half of it
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5


def _group_errors(delta: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """δ_g H_gg δ_gᵀ per row and scale group: delta [rows, groups, size], blocks [groups, size, size]."""
    return torch.einsum("rgi,gij,rgj->rg", delta, blocks, delta)


@torch.no_grad()
def clip_qparams(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, dtype: torch.dtype, *,
                 n_grid: int = CLIP_GRID, max_shrink: float = CLIP_MAX_SHRINK,
                 rows_per_step: int = 4096) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AWQ's activation-aware clipping: per row and scale group, the range [p·min, p·max] (p = 1,
    1 - 1/n_grid, ... down to 1 - max_shrink) whose round-to-nearest error on the calibration inputs,
    δ_g H_gg δ_gᵀ with H = (2/n) Σ XᵀX and δ = dequantized - original weight, is smallest.

    A group's error counts its own inputs only (H's diagonal block; the whole H for channel scales):
    the rows' outputs are sums over groups, and AutoAWQ's search scores each group alone the same way,
    from 512 sampled tokens where this uses all of them. Ties keep the wider range (p = 1 first: plain
    min-max). Returns (scale, zero point or None) in the storage dtype, like
    :func:`~compression.algorithms.quant.compute_qparams`.
    """
    assert clippable(args), args
    rows, cols = weight.shape
    size = args.group_size if args.strategy == "group" else cols
    n_groups = cols // size
    h = hessian.float()
    blocks = torch.stack([h[g * size:(g + 1) * size, g * size:(g + 1) * size] for g in range(n_groups)])
    diagonals = torch.diagonal(blocks, dim1=1, dim2=2)  # dead inputs: weight-space error (gptq.live_hessian)
    diagonals[diagonals == 0] = 1.0
    w = weight.float()
    lo, hi = observe(w, args)  # [rows, groups]
    best_scale, best_zp = qparams_from_range(lo, hi, args, dtype)
    shrinks = [1 - i / n_grid for i in range(1, int(max_shrink * n_grid) + 1)]
    for start in range(0, rows, rows_per_step):  # bounds the [rows, cols] temporaries on wide layers
        part = slice(start, min(rows, start + rows_per_step))
        wp = w[part]

        def error(scale, zp):
            deq = fake_quantize(wp, scale, args, zero_point=zp)
            return _group_errors((deq - wp).reshape(wp.shape[0], n_groups, size), blocks)

        best_err = error(best_scale[part], None if best_zp is None else best_zp[part])
        for p in shrinks:
            scale, zp = qparams_from_range(lo[part] * p, hi[part] * p, args, dtype)
            err = error(scale, zp)
            better = err < best_err
            if bool(better.any()):
                best_err = torch.where(better, err, best_err)
                best_scale[part] = torch.where(better, scale, best_scale[part])
                if best_zp is not None:
                    best_zp[part] = torch.where(better, zp, best_zp[part])
    return best_scale, best_zp


# AutoAWQ leaves the attention's query and key projections unclipped: their errors pass through the
# softmax, which an output-error search does not see (its rule: "q_", "k_", "query", "key" or a fused
# qkv in the module's name; "kv_" adds the joint key/value projections of multi-head latent attention)
_UNCLIPPED = ("q_", "k_", "kv_", "query", "key", "qkv")


def clips_module(name: str) -> bool:
    """Whether AWQ's clipping may touch the Linear ``name`` (not a query / key projection)."""
    last = name.rsplit(".", 1)[-1].lower()
    return not any(part in last for part in _UNCLIPPED)


def clip_quantize(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, dtype: torch.dtype,
                  mask: torch.Tensor | None = None) -> QuantResult:
    """Round-to-nearest on AWQ's clipped ranges (:func:`clip_qparams`), then each row's scales re-fitted by
    least squares in the Hessian metric with the codes held fixed (:func:`~compression.algorithms.gptq.
    refit_scales`, as GPTQ does here; a row keeps its clipped scales unless the fit lowers its error).
    ``mask`` (True = pruned) keeps those weights at exactly zero."""
    if mask is not None:
        weight = weight.masked_fill(mask, 0.0)
    scale, zp = clip_qparams(weight, hessian, args, dtype)
    rounded = quantize_weight(weight, args, dtype, qparams=(scale, zp))
    scale = refit_scales(weight.float(), rounded.codes, scale, zp, live_hessian(hessian)[0], args)
    deq = dequantize(rounded.codes, scale, weight.dtype, args=args, zero_point=zp)
    return QuantResult(deq, rounded.codes, scale, 0.0, zero_point=zp)
