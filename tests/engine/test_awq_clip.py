"""AWQ's weight clipping (AWQModifier apply_clip): the search, its refit, the recipe option and the pipeline."""
from __future__ import annotations

import pytest
import torch

from compression.algorithms.awq import clip_qparams, clip_quantize, clips_module
from compression.algorithms.gptq import HessianAccumulator, quadratic_loss, quantize_weight
from compression.algorithms.quant import QuantArgs, compute_qparams, int_range
from compression.errors import RecipeError
from compression.recipe import APPLY_CLIP_NOTE, Recipe
from compression.sequential import compress_model
from tests.engine.conftest import correlated_inputs, random_calibration
from tests.tiny import tiny_family_model, tiny_llama

SCHEMES = {
    "asym g16": QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=16),
    "sym g16": QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16),
    "asym channel": QuantArgs(num_bits=4, symmetric=False, strategy="channel"),
    "sym int8 channel": QuantArgs(num_bits=8, symmetric=True, strategy="channel"),
}


def _problem(seed: int = 0, rows: int = 48, cols: int = 64):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    w[3, 7] = 0.9  # an outlier weight: min-max spends the group's range on it
    w[10, 40] = -0.7
    acc = HessianAccumulator(cols)
    acc.add(correlated_inputs(tokens=512, cols=cols, seed=seed))
    return w, acc.hessian


def _group_losses(w, deq, h, args):
    size = args.group_size or w.shape[1]
    d = (deq - w).reshape(w.shape[0], -1, size)
    blocks = torch.stack([h[g * size:(g + 1) * size, g * size:(g + 1) * size] for g in range(d.shape[1])])
    return torch.einsum("rgi,gij,rgj->rg", d, blocks, d)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_clipping_never_raises_a_groups_output_error_and_lowers_the_layer_error(scheme):
    args = SCHEMES[scheme]
    w, h = _problem()
    plain = quantize_weight(w, args, torch.float32)
    scale, zp = clip_qparams(w, h, args, torch.float32)
    clipped = quantize_weight(w, args, torch.float32, qparams=(scale, zp))
    assert scale.shape == plain.scale.shape and (zp is None) == (plain.zero_point is None)
    before, after = _group_losses(w, plain.weight, h, args), _group_losses(w, clipped.weight, h, args)
    assert bool((after <= before * (1 + 1e-5) + 1e-9).all())
    if args.num_bits == 4:  # at 8 bits the outliers' clipping costs more than the finer steps win here
        assert float(after.sum()) < float(before.sum())
    # the ranges only ever shrink: at most min-max's scale (in magnitude), never below half of it
    ratio = scale.abs() / plain.scale.abs()
    assert bool((ratio <= 1 + 1e-6).all()) and bool((ratio >= 0.5 - 1e-6).all())
    qmin, qmax = int_range(args.num_bits)
    assert int(clipped.codes.min()) >= qmin and int(clipped.codes.max()) <= qmax


def test_the_refit_after_clipping_lowers_the_error_further_and_keeps_pruned_zeros():
    args = SCHEMES["asym g16"]
    w, h = _problem(seed=3)
    scale, zp = clip_qparams(w, h, args, torch.bfloat16)
    only_clip = quantize_weight(w, args, torch.bfloat16, qparams=(scale, zp))
    full = clip_quantize(w, h, args, torch.bfloat16)
    assert torch.equal(full.codes, only_clip.codes) and torch.equal(full.zero_point, zp)
    assert full.scale.dtype == torch.bfloat16
    assert quadratic_loss(full.weight - w, h) < quadratic_loss(only_clip.weight - w, h)
    assert quadratic_loss(full.weight - w, h) < quadratic_loss(quantize_weight(w, args, torch.bfloat16).weight - w, h)

    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[:, ::2] = True
    pruned = clip_quantize(w, h, args, torch.bfloat16, mask=mask)
    assert bool((pruned.weight[mask] == 0).all())


def test_inputs_no_token_reached_still_get_finite_scales():
    args = SCHEMES["asym g16"]
    w, h = _problem()
    h[:16, :] = 0
    h[:, :16] = 0  # the first group's inputs are dead
    result = clip_quantize(w, h, args, torch.float32)
    assert bool(torch.isfinite(result.scale).all()) and bool(torch.isfinite(result.weight).all())


def test_query_and_key_projections_stay_unclipped():
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.0.self_attn.qkv_proj",
                 "transformer.h.0.attention.query_key_value", "model.layers.1.self_attn.q_a_proj",
                 "model.layers.1.self_attn.kv_a_proj_with_mqa", "model.layers.1.self_attn.kv_b_proj"):
        assert not clips_module(name), name
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                 "model.layers.2.mlp.experts.3.up_proj", "model.layers.0.mlp.gate_up_proj"):
        assert clips_module(name), name


AWQ_RTN = ("quant_stage:\n  quant_modifiers:\n    AWQModifier: {{duo_scaling: true{extra}}}\n"
           "    QuantizationModifier:\n      ignore: [lm_head]\n      config_groups:\n        g:\n"
           "          targets: [Linear]\n          weights: {{num_bits: 4, type: int, symmetric: false, "
           "strategy: group, group_size: 32}}\n")
AWQ_GPTQ = ("quant_stage:\n  quant_modifiers:\n    AWQModifier: {apply_clip: true}\n    GPTQModifier:\n"
            "      ignore: [lm_head]\n      targets: [Linear]\n      scheme: W4A16_ASYM\n")


def test_apply_clip_is_on_by_default_written_only_when_off_and_checked():
    on = Recipe.from_yaml(AWQ_RTN.format(extra=""))
    awq, rtn = on.modifiers
    assert awq.apply_clip and on.awq_clip(rtn, rtn.config_groups["g"].weights)
    assert "apply_clip" not in on.to_yaml() and "weight clipping" in on.describe()
    off = Recipe.from_yaml(AWQ_RTN.format(extra=", apply_clip: false"))
    assert not off.awq_clip(off.modifiers[1], off.modifiers[1].config_groups["g"].weights)
    assert "apply_clip: false" in off.to_yaml() and "weight clipping" not in off.describe()
    again = Recipe.from_yaml(off.to_yaml())
    assert not again.modifiers[0].apply_clip
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(AWQ_RTN.format(extra=", apply_clip: sometimes"))
    assert err.value.field == "stages[0].modifiers[0].apply_clip"
    # GPTQ chooses its own rounding: an explicit apply_clip: true there is said to change nothing
    gptq = Recipe.from_yaml(AWQ_GPTQ)
    assert APPLY_CLIP_NOTE in gptq.notes
    assert not any(gptq.awq_clip(m, g.weights) for m in gptq.modifiers if m.quantizes
                   for g in m.config_groups.values())
    assert APPLY_CLIP_NOTE not in on.notes


def _logits_error(model, reference, calib):
    with torch.no_grad():
        return sum(float((model(**s).logits - reference(**s).logits).pow(2).mean()) for s in calib)


def test_the_pipeline_clips_every_rounded_projection_but_query_and_key():
    calib = random_calibration(n=4, length=16, vocab=2048)
    reference = tiny_llama(vocab=2048)
    reports, errors = {}, {}
    for extra in ("", ", apply_clip: false"):
        model = tiny_llama(vocab=2048)
        events = []
        reports[extra] = compress_model(model, Recipe.from_yaml(AWQ_RTN.format(extra=extra)), calib,
                                        progress=events.append)
        errors[extra] = _logits_error(model, reference, calib)
    clipped = {n for n, r in reports[""].modules.items() if "awq-clip" in r.losses}
    rounded = {n for n, r in reports[""].modules.items() if "rtn" in r.losses}
    assert clipped and all(n.endswith(("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) for n in clipped)
    assert rounded == {n for n in reports[""].modules if n.endswith(("q_proj", "k_proj"))}
    assert not any("awq-clip" in r.losses for r in reports[", apply_clip: false"].modules.values())
    assert errors[""] < errors[", apply_clip: false"]


@pytest.mark.usefixtures("one_torch_thread")
def test_experts_are_clipped_on_their_own_tokens():
    model = tiny_family_model("qwen3_moe")
    calib = random_calibration(n=4, length=16, vocab=256)
    report = compress_model(model, Recipe.from_yaml(AWQ_RTN.format(extra="")), calib)
    experts = [r for n, r in report.modules.items() if ".experts." in n]
    assert experts and any("awq-clip" in r.losses for r in experts)
    # an expert that saw too few tokens has no Hessian: it keeps plain min-max round-to-nearest
    assert all(("awq-clip" in r.losses) != ("rtn" in r.losses) for r in experts)
