"""SmoothQuant (Xiao et al.) as plain functions: per-channel smoothing scales and their folding.

For a smoothing group (one norm or Linear whose output feeds the balance Linears) with per-input-
channel activation absmax ``a`` and weight absmax ``w`` (max over the balance layers):
``s = a^α / w^(1-α)``; the smooth layer's output is divided by ``s`` and the balance layers' input
columns multiplied by ``s``, so the float model computes exactly the same function while the
activation outliers move into the weights (where per-channel weight scales absorb them).
"""
from __future__ import annotations

import torch

DEFAULT_MAPPINGS = [
    [["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"], "re:.*input_layernorm$"],
    [["re:.*gate_proj$", "re:.*up_proj$"], "re:.*post_attention_layernorm$"],
]
PHI3_MAPPINGS = [
    [["re:.*qkv_proj$"], "re:.*input_layernorm$"],
    [["re:.*gate_up_proj$"], "re:.*post_attention_layernorm$"],
]
# Gemma 2/3 normalise the attention output (post_attention_layernorm) before the residual add; the MLP
# reads pre_feedforward_layernorm. (llm-compressor 0.14 maps post_attention_layernorm → gate/up for
# Gemma too, which rescales a norm that does not feed them.)
GEMMA_MAPPINGS = [DEFAULT_MAPPINGS[0], [DEFAULT_MAPPINGS[1][0], "re:.*pre_feedforward_layernorm$"]]
# MoE layers smooth the attention inputs only (llm-compressor's Mixtral / Qwen-MoE convention: one scale
# across all experts unbalances them); multi-head latent attention reads input_layernorm in q(_a)_proj and
# kv_a_proj_with_mqa
MOE_MAPPINGS = [DEFAULT_MAPPINGS[0]]
MLA_MAPPINGS = [[["re:.*(q|q_a)_proj$", "re:.*kv_a_proj_with_mqa$"], "re:.*input_layernorm$"]]


def adds_one(norm: torch.nn.Module) -> bool:
    """Whether ``norm`` scales by (1 + weight), as the RMSNorms of Gemma, Qwen3-Next and Qwen3.5 do (their
    weight starts at zero). Told by running it once with its weight (and bias) zeroed: a plain norm then
    outputs zeros, a (1 + weight) norm the normalised input. A norm that cannot be called on a plain
    tensor is told by its class name."""
    if isinstance(norm, torch.nn.Linear):
        return False
    name = type(norm).__name__
    by_name = "Gemma" in name and "Norm" in name
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.is_meta:
        return by_name
    bias = getattr(norm, "bias", None)
    saved = weight.data.clone(), None if bias is None else bias.data.clone()
    probe = torch.linspace(-1.0, 1.0, weight.numel(), dtype=weight.dtype, device=weight.device).unsqueeze(0)
    try:
        with torch.no_grad():
            weight.data.zero_()
            if bias is not None:
                bias.data.zero_()
            out = norm(probe)
        return bool(torch.as_tensor(out).float().abs().amax() > 0)
    except Exception:  # noqa: BLE001 -- a norm with another call signature (a gated norm)
        return by_name
    finally:
        weight.data.copy_(saved[0])
        if bias is not None:
            bias.data.copy_(saved[1])


def smoothquant_scales(act_absmax: torch.Tensor, balance_weights: list[torch.Tensor], strength: float
                       ) -> torch.Tensor:
    """s = act_absmax^α / weight_absmax^(1-α) per input channel (1 where either side is all zero)."""
    assert 0.0 <= strength <= 1.0, strength
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in balance_weights]).amax(dim=0)
    a = act_absmax.float()
    scales = a.pow(strength) / w_absmax.pow(1 - strength)
    ok = (a > 0) & (w_absmax > 0) & torch.isfinite(scales)
    return torch.where(ok, scales, torch.ones_like(scales)).clamp_min(1e-5)


def log_equalization_scales(act_range: torch.Tensor) -> torch.Tensor:
    """Logarithmic activation equalization (Feng et al., llm-compressor's ``algorithm: log_equalization``):
    s = r / log2(2 + r) per channel, r = the channel's observed output range (max - min); 1 where r is 0."""
    r = act_range.float()
    scales = r / torch.log2(2 + r)
    return torch.where((r > 0) & torch.isfinite(scales), scales, torch.ones_like(scales)).clamp_min(1e-5)


@torch.no_grad()
def fold_scales(smooth: torch.nn.Module, balance: list[torch.nn.Linear], scales: torch.Tensor) -> None:
    """Divide the smooth layer's output channels by ``scales`` and multiply the balance layers' input
    columns by them (a norm's weight -- of a Gemma-style norm, its 1 + weight --, or a Linear's output
    rows and bias)."""
    s = scales.to(smooth.weight.device, torch.float32)
    if isinstance(smooth, torch.nn.Linear):
        smooth.weight.data = (smooth.weight.data.float() / s.unsqueeze(1)).to(smooth.weight.dtype)
    elif adds_one(smooth):  # (1 + w') = (1 + w) / s
        smooth.weight.data = ((1.0 + smooth.weight.data.float()) / s - 1.0).to(smooth.weight.dtype)
    else:  # RMSNorm / LayerNorm: one weight per channel
        smooth.weight.data = (smooth.weight.data.float() / s).to(smooth.weight.dtype)
    if getattr(smooth, "bias", None) is not None:
        smooth.bias.data = (smooth.bias.data.float() / s).to(smooth.bias.dtype)
    for layer in balance:
        layer.weight.data = (layer.weight.data.float() * s.to(layer.weight.device).unsqueeze(0)).to(
            layer.weight.dtype)
