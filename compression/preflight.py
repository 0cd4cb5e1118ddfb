"""Check a recipe against a model's transformers config before any weights are loaded.

Shapes: every targeted Linear's input width must be divisible by the group size (INT4/INT8
group quantization) and by 4 (2:4 sparsity). Estimates (rough, for planning only):

* host memory  ≈ dense weights (params · bytes/param) + 1 byte/param of compressed codes
  + captured activations (samples · seqlen · hidden · 4 B) when the compute device is the CPU;
* device memory ≈ one decoder layer's weights + activations (samples · seqlen · hidden · 4 B)
  + the fp32 Hessians of that layer's targeted Linears (Σ in² · 4 B) + a 1.5x workspace factor;
* time ≈ (forward FLOPs: 2 passes · 2 · layer params · samples · seqlen · layers
  + solver FLOPs: Σ over Linears of (in³/3 + 2·out·in²) for GPTQ/SparseGPT) / throughput,
  throughput 2e10 FLOP/s on "cpu" and 2e13 FLOP/s on "cuda".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from compression.errors import RecipeError
from compression.recipe import PRESET_GROUP_SIZES, Recipe, matches_any

THROUGHPUT = {"cpu": 2e10, "cuda": 2e13}
MAX_LAYERS = 4096


@dataclass
class PreflightReport:
    """Shapes checked and resource estimates for one model + recipe."""

    layers: int
    params: int
    targeted_modules: int
    peak_host_mb: float
    peak_device_mb: float
    estimated_seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def layer_linears(config: Any) -> dict[str, tuple[int, int]]:
    """Llama/Mistral/Qwen2-style Linears of one decoder layer: local name → (out, in)."""
    hidden = _cfg(config, "hidden_size")
    inter = _cfg(config, "intermediate_size")
    heads = _cfg(config, "num_attention_heads")
    if not (hidden and inter and heads):
        raise RecipeError("model", "config lacks hidden_size / intermediate_size / num_attention_heads; "
                          "only Llama/Mistral/Qwen2-style decoder models are supported")
    kv = _cfg(config, "num_key_value_heads") or heads
    head_dim = _cfg(config, "head_dim") or hidden // heads
    return {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
            "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}


def preflight(model_config: Any, recipe: Recipe, *, samples: int = 128, seqlen: int = 512,
              device: str = "cpu") -> PreflightReport:
    """Raise ``RecipeError`` for incompatible shapes; otherwise return estimates (see module doc)."""
    n_layers = int(_cfg(model_config, "num_hidden_layers") or 0)
    if not 0 <= n_layers <= MAX_LAYERS:  # the module names below are listed (and matched) one by one
        raise RecipeError("model", f"the config's num_hidden_layers ({n_layers}) is outside 0..{MAX_LAYERS}")
    linears = layer_linears(model_config)
    hidden = _cfg(model_config, "hidden_size")
    vocab = _cfg(model_config, "vocab_size") or 0
    tied = bool(_cfg(model_config, "tie_word_embeddings", False))
    layer_params = sum(o * i for o, i in linears.values()) + 2 * hidden
    params = n_layers * layer_params + vocab * hidden * (1 if tied else 2) + hidden
    dtype_bytes = 2 if str(_cfg(model_config, "torch_dtype", "") or _cfg(model_config, "dtype", "")).endswith(
        ("bfloat16", "float16")) else 4

    targeted: set[str] = set()
    hessian_cols: dict[str, int] = {}
    solver_flops = 0.0
    for m in recipe.modifiers:
        for local, (out_f, in_f) in linears.items():
            name = f"model.layers.0.{local}"
            names = [f"model.layers.{i}.{local}" for i in range(n_layers)] or [name]
            hit = [n for n in names if matches_any(m.targets, n, "Linear") and not matches_any(m.ignore, n, "Linear")]
            if not hit:
                continue
            if m.kind == "SparseGPTModifier" and m.mask_structure == "2:4" and in_f % 4:
                raise RecipeError("recipe.mask_structure", f"2:4 sparsity needs input widths divisible by 4; "
                                  f"{local} has {in_f}")
            for g in (m.config_groups.values() if m.quantizes else ()):
                if not matches_any(g.targets, name, "Linear") or g.weights is None:
                    continue
                size = g.weights.group_size
                if g.weights.strategy == "group" and in_f % size:
                    raise RecipeError("recipe.group_size", _group_message(size, linears, local, in_f))
            targeted.update(hit)
            if m.kind in ("GPTQModifier", "SparseGPTModifier"):
                hessian_cols[local] = in_f
                solver_flops += len(hit) * (in_f ** 3 / 3 + 2 * out_f * in_f ** 2)
    calib = recipe.needs_calibration
    act_bytes = samples * seqlen * hidden * 4 if calib else 0
    hess_bytes = sum(c * c * 4 for c in hessian_cols.values())
    device_bytes = 1.5 * (layer_params * dtype_bytes + 2 * act_bytes + hess_bytes)
    host_bytes = params * dtype_bytes + params  # dense weights + 1 byte/param of codes
    if device == "cpu":
        host_bytes += device_bytes
    forward_flops = (2 * 2 * layer_params * samples * seqlen * n_layers) if calib else 0
    seconds = (forward_flops + solver_flops) / THROUGHPUT.get(device.split(":")[0], THROUGHPUT["cpu"])
    warnings = []
    if calib and samples < 64:
        warnings.append(f"only {samples} calibration samples; 128-512 are usual")
    return PreflightReport(layers=n_layers, params=int(params), targeted_modules=len(targeted),
                           peak_host_mb=round(host_bytes / 2 ** 20, 1), peak_device_mb=round(device_bytes / 2 ** 20, 1),
                           estimated_seconds=round(seconds, 1), warnings=warnings)


def _group_message(size: int, linears: dict[str, tuple[int, int]], local: str, in_f: int) -> str:
    widths = sorted({i for _, i in linears.values()})
    working = [g for g in PRESET_GROUP_SIZES if all(w % g == 0 for w in widths)]
    options = ", ".join(str(g) for g in working) + (" or " if working else "") + "per-channel"
    return (f"group size {size} does not divide the input width {in_f} of {local}; "
            f"group sizes that work for this model: {options}")
