"""AutoRound (sign-SGD rounding and clipping per decoder layer): the fit, its formats, the recipe, the export."""
import json

import pytest
import torch

from compression.algorithms.autoround import AutoRoundSettings, _Tuned, autoround_layer
from compression.algorithms.gptq import quantize_weight
from compression.algorithms.quant import QuantArgs, dequantize
from compression.algorithms.reconstruction import layer_outputs, output_error
from compression.errors import RecipeError
from compression.model_io.export import export_checkpoint
from compression.model_io.runtime import load_compressed_model
from compression.model_io.walk import capture_layer_inputs
from compression.recipe import Recipe
from compression.sequential import compress_model
from tests.engine.conftest import random_calibration
from tests.tiny import FAMILIES, demo_tokenizer, tiny_family_model, tiny_llama

W4G32 = QuantArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
SCHEMES = {
    "int4 sym group": W4G32,
    "int4 asym group": QuantArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32),
    "int8 channel": QuantArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
    "fp8 block": QuantArgs(num_bits=8, type="float", strategy="block", block_structure=(32, 32)),
    "nvfp4": QuantArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16),
}


def _recipe(weights: str, extra: str = "iters: 40, batch_size: 2") -> Recipe:
    return Recipe.from_yaml("quant_stage:\n  quant_modifiers:\n    AutoRoundModifier:\n"
                            f"      {{{extra}, ignore: [lm_head],\n"
                            f"       config_groups: {{group_0: {{targets: [Linear], weights: {weights}}}}}}}\n")


def _layer_case(model, calibration):
    layer = model.model.layers[0]
    inputs = capture_layer_inputs(model, model.model.layers, calibration, "cpu").pairs(0)
    targets = layer_outputs(layer, inputs)
    return layer, inputs, targets


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_untuned_parameters_reproduce_round_to_nearest_exactly(scheme):
    """v = 0, alpha = beta = 1 is the engine's round-to-nearest: same codes, scales and zero points."""
    args = SCHEMES[scheme]
    linear = torch.nn.Linear(64, 48, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.05)
    tuned = _Tuned("x", linear, args, None, torch.float32, minmax=True)
    rtn = quantize_weight(linear.weight.detach().float(), args, torch.float32)
    mine = tuned.result(0.0)
    assert torch.equal(mine.scale.float(), rtn.scale.float())
    assert torch.equal(mine.codes.float(), rtn.codes.float())
    if args.symmetric:
        assert mine.zero_point is None
    else:
        assert torch.equal(mine.zero_point, rtn.zero_point)
    torch.testing.assert_close(tuned.qdq(), rtn.weight.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_tuning_lowers_the_layer_error_and_the_export_dequantizes_to_the_tuned_weight(scheme):
    args = SCHEMES[scheme]
    model = tiny_llama()
    layer, inputs, targets = _layer_case(model, random_calibration(n=6, length=32))
    modules = {n: (m, args, None) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    before = {n: m.weight.detach().clone() for n, (m, _, _) in modules.items()}
    results, summary = autoround_layer(layer, inputs, targets, modules, AutoRoundSettings(iters=30, batch_size=2),
                                       storage=torch.float32)
    assert summary.error_tuned <= summary.error_rtn  # never worse than round-to-nearest
    if scheme.startswith("int4"):  # 4-bit rounding leaves room; FP8 / int8 rounding error is already tiny
        assert summary.kept and summary.error_tuned < 0.9 * summary.error_rtn
    for name, (module, _, _) in modules.items():
        assert torch.equal(module.weight, before[name])  # the layer itself is not changed
        r = results[name]
        deq = dequantize(r.codes, r.scale, torch.float32, args=args, zero_point=r.zero_point,
                         global_scale=r.global_scale)
        assert torch.equal(deq, r.weight)
    # the exported weights, put in the layer, give exactly the reported error
    for name, (module, _, _) in modules.items():
        module.weight.data = results[name].weight.clone()
    with torch.no_grad():
        outs = [layer(h, **k) for h, k in inputs]
    outs = [o[0] if isinstance(o, tuple) else o for o in outs]
    err = sum(float((o - t).pow(2).sum()) for o, t in zip(outs, targets)) / sum(t.numel() for t in targets)
    assert err == pytest.approx(summary.error_tuned, rel=1e-3)


def test_rounding_offsets_stay_in_half_a_step_and_clips_in_unit_range(model, calibration):
    layer, inputs, targets = _layer_case(model, calibration)
    linear = layer.mlp.down_proj
    t = _Tuned("mlp.down_proj", linear, W4G32, None, torch.float32, minmax=True)
    with torch.no_grad():
        t.v.fill_(0.9)
        t.alpha.fill_(1.7)
        t.beta.fill_(-0.2)
    t.clamp_()
    assert float(t.v.max()) == 0.5 and float(t.alpha.max()) == 1.0 and float(t.beta.min()) == 0.0


def test_a_tuning_that_does_not_help_keeps_round_to_nearest(model, calibration):
    layer, inputs, targets = _layer_case(model, calibration)
    modules = {"mlp.down_proj": (layer.mlp.down_proj, W4G32, None)}
    results, summary = autoround_layer(layer, inputs, targets, modules,
                                       AutoRoundSettings(iters=3, lr=5.0, minmax_lr=5.0, batch_size=1),
                                       storage=torch.float32)
    assert not summary.kept and summary.error_tuned == summary.error_rtn
    # round-to-nearest on the default (full-range) grid: v = 0, alpha = beta = 1
    rtn = _Tuned("mlp.down_proj", layer.mlp.down_proj, W4G32, None, torch.float32, minmax=True,
                 full_range=True).result(0.0)
    assert torch.equal(results["mlp.down_proj"].codes, rtn.codes)
    assert torch.equal(results["mlp.down_proj"].scale, rtn.scale)


def test_a_pruned_weight_stays_pruned():
    model = tiny_llama()
    layer, inputs, targets = _layer_case(model, random_calibration(n=4, length=24))
    linear = layer.self_attn.o_proj
    mask = torch.zeros_like(linear.weight, dtype=torch.bool)
    mask[:, ::2] = True
    modules = {"self_attn.o_proj": (linear, SCHEMES["int4 asym group"], mask)}
    results, _ = autoround_layer(layer, inputs, targets, modules, AutoRoundSettings(iters=10, batch_size=2),
                                 storage=torch.float32)
    w = results["self_attn.o_proj"].weight
    assert torch.equal(w[mask], torch.zeros_like(w[mask]))


def test_should_stop_ends_the_tuning_between_steps(model, calibration):
    layer, inputs, targets = _layer_case(model, calibration)
    calls = []
    modules = {"mlp.up_proj": (layer.mlp.up_proj, W4G32, None)}
    autoround_layer(layer, inputs, targets, modules, AutoRoundSettings(iters=100, batch_size=1),
                    storage=torch.float32, should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert len(calls) == 4


def test_the_pipeline_tunes_every_layer_and_the_checkpoint_loads_with_the_same_logits(tmp_path):
    model = tiny_llama(vocab=2048, dtype=torch.bfloat16)
    reference = tiny_llama(vocab=2048, dtype=torch.bfloat16)
    calibration = random_calibration(n=8, length=32, vocab=2048)
    recipe = _recipe("{num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 32}")
    assert recipe.needs_calibration and "AutoRound (40 iters)" in recipe.describe()
    events = []
    report = compress_model(model, recipe, calibration, progress=events.append)
    tuned = [e for e in events if e.get("kind") == "autoround"]
    assert [e["layer"] for e in tuned] == [0, 1]
    assert all(e["error_after"] <= e["error_before"] for e in tuned)
    assert any(e["error_after"] < 0.9 * e["error_before"] for e in tuned)
    assert report.summary()["autoround"][0]["iters"] == 40
    assert report.modules["model.layers.0.mlp.down_proj"].losses.get("autoround") is not None
    # the model holds the exported weights; its output beats plain round-to-nearest on held-out text
    rtn = tiny_llama(vocab=2048, dtype=torch.bfloat16)
    compress_model(rtn, _recipe("{num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 32}",
                                "iters: 0"), None)
    held_out = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref, ours, plain = (m(held_out).logits.float() for m in (reference, model, rtn))
    assert float((ours - ref).pow(2).mean()) < float((plain - ref).pow(2).mean())
    export_checkpoint(model, demo_tokenizer(), recipe, report, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["symmetric"] is False
    loaded = load_compressed_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(held_out).logits.float(), ours, rtol=2e-2, atol=2e-2)


def test_autoround_after_2_4_pruning_keeps_the_pattern():
    from kernels.packing import is_24_sparse

    model = tiny_llama()
    recipe = Recipe.from_yaml(
        "sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier: {sparsity: 0.5, mask_structure: '2:4'}\n"
        "quant_stage:\n  quant_modifiers:\n    AutoRoundModifier: {scheme: W4A16, iters: 5, batch_size: 2}\n")
    compress_model(model, recipe, random_calibration(n=4, length=16))
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert is_24_sparse(module.weight.data), name


def test_llm_compressor_autoround_recipes_parse_and_round_trip():
    """The YAML of llm-compressor's AutoRoundModifier docstring and examples' options."""
    recipe = Recipe.from_yaml(
        "test_stage:\n  quant_modifiers:\n    AutoRoundModifier:\n      iters: 200\n      batch_size: 8\n"
        "      enable_torch_compile: true\n      device_ids: '0,1'\n      config_groups:\n        group_0:\n"
        "          targets: ['Linear']\n          input_activations: null\n          output_activations: null\n"
        "          weights: {num_bits: 4, type: 'int', symmetric: true, strategy: group, group_size: 128}\n")
    m = recipe.modifiers[0]
    assert m.autoround == AutoRoundSettings(iters=200, batch_size=8)
    assert m.autoround.round_lr == pytest.approx(1 / 200)
    assert any("enable_torch_compile" in n for n in recipe.notes)
    assert any("device_ids" in n for n in recipe.notes)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again.modifiers[0].autoround == m.autoround and again.modifiers[0].extra["device_ids"] == "0,1"
    preset = Recipe.from_yaml("s:\n  quant_modifiers:\n    AutoRoundModifier: {scheme: W4A16, lr: 5e-3, iters: 0}\n")
    assert preset.modifiers[0].autoround.round_lr == 5e-3
    assert any("round-to-nearest" in n for n in preset.notes)


@pytest.mark.parametrize("body, field, hint", [
    ("{iters: -1, scheme: W4A16}", "iters", "between"),
    ("{iters: 10, batch_size: 0, scheme: W4A16}", "batch_size", "between"),
    ("{lr: fast, scheme: W4A16}", "lr", "number"),
    ("{iters: 10}", "modifiers[0]", "scheme"),
    ("{scheme: W4A16, enable_minmax_tuning: maybe}", "enable_minmax_tuning", ""),
    ("{scheme: W4A16, momentum: 0.9}", "momentum", "allowed"),
    ("{config_groups: {g: {targets: [Linear], weights: {num_bits: 4, type: int, strategy: group, "
     "group_size: 32, actorder: group}}}}", "config_groups.g.weights", "act-order"),
])
def test_options_autoround_cannot_honour_are_refused_with_the_field(body, field, hint):
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(f"s:\n  quant_modifiers:\n    AutoRoundModifier: {body}\n")
    assert field in err.value.field and hint in str(err.value)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_is_tuned_exported_and_loads_with_the_same_logits(family, tmp_path):
    """Dense, sliding-window, fused-projection, MLA and MoE layers (experts unfused; an expert no token
    reaches keeps round-to-nearest): every targeted Linear is tuned in its layer and exported."""
    model = tiny_family_model(family)
    recipe = Recipe.from_preset("AutoRound+W4A16", group_size=32, iters=4, batch_size=2)
    report = compress_model(model, recipe, random_calibration(n=4, length=16, vocab=256))
    rows = report.summary()["autoround"]
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(r["error_tuned"] <= r["error_rtn"] for r in rows)
    assert all(m.losses.get("autoround") is not None for m in report.modules.values())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids).logits
    export_checkpoint(model, None, recipe, report, tmp_path)
    loaded = load_compressed_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours, rtol=2e-2, atol=2e-2)


def test_the_full_range_grid_puts_each_groups_larger_side_on_minus_8_and_beats_the_observer_grid():
    linear = torch.nn.Linear(64, 48, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.05)
    full = _Tuned("x", linear, W4G32, None, torch.float32, minmax=True, full_range=True).result(0.0)
    observer = _Tuned("x", linear, W4G32, None, torch.float32, minmax=True, full_range=False).result(0.0)
    w = linear.weight.detach()
    assert full.zero_point is None and int(full.codes.min()) == -8 and int(full.codes.max()) <= 7
    assert (full.scale < 0).any() and (full.scale > 0).any()  # the sign follows the larger side
    groups = w.reshape(48, 2, 32)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    codes = full.codes.reshape(48, 2, 32).float()
    assert torch.equal(codes.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1),
                       torch.full_like(extreme, -8.0))
    assert torch.equal(full.weight, dequantize(full.codes, full.scale, torch.float32))
    assert float((full.weight - w).pow(2).mean()) < float((observer.weight - w).pow(2).mean())


def test_full_range_can_be_turned_off_in_the_recipe():
    recipe = _recipe("{num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 32}",
                     "iters: 10, full_range: false")
    assert recipe.modifiers[0].autoround.full_range is False
    assert Recipe.from_yaml(recipe.to_yaml()).modifiers[0].autoround.full_range is False
    assert _recipe("{num_bits: 4, type: int, strategy: group, group_size: 32}").modifiers[0].autoround.full_range


def test_a_layer_after_untuned_layers_is_tuned_against_its_own_dense_output():
    """With AutoRound on the last layer only, the dense stream must still advance through the layers before
    it: the reported round-to-nearest error is that of the last layer against its own dense output."""
    model = tiny_llama(layers=3)
    reference = tiny_llama(layers=3)
    calibration = random_calibration(n=6, length=32)
    scheme = "{num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 32}"
    recipe = Recipe.from_yaml("quant_stage:\n  quant_modifiers:\n    AutoRoundModifier:\n"
                              "      {iters: 5, batch_size: 2, ignore: [lm_head, 're:model\\.layers\\.[01]\\..*'],\n"
                              f"       config_groups: {{group_0: {{targets: [Linear], weights: {scheme}}}}}}}\n")
    report = compress_model(model, recipe, calibration)
    assert sorted(report.autoround) == [2]
    # the expected value, computed by hand on the dense model: layer 2's inputs, its outputs, and the
    # error of its round-to-nearest copy
    layers = reference.model.layers
    inputs = capture_layer_inputs(reference, layers, calibration, "cpu").pairs(0)
    for layer in layers[:2]:
        inputs = [(out, kwargs) for out, (_, kwargs) in zip(layer_outputs(layer, inputs), inputs)]
    targets = layer_outputs(layers[2], inputs)
    args = QuantArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    with torch.no_grad():
        for module in layers[2].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(quantize_weight(module.weight.detach().float(), args, torch.float32).weight)
    mse, relative = output_error(layers[2], inputs, targets)
    got = report.autoround[2]
    assert got["error_rtn"] == pytest.approx(mse, rel=1e-3)
    assert got["relative_rtn"] == pytest.approx(relative, rel=1e-3)
    assert got["relative_rtn"] < 0.05


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("full_range", [False, True])
def test_small_scales_in_a_16_bit_model_are_not_clamped(storage, full_range):
    """Scales stored in bf16/fp16 keep their value however small (only a zero becomes eps): clamping them
    at the dtype's eps (0.0078 in bf16) once made every group of small weights coarse."""
    linear = torch.nn.Linear(128, 64, bias=False).to(storage)
    torch.nn.init.normal_(linear.weight, std=0.002)
    for args in (W4G32, SCHEMES["int4 asym group"]):
        tuned = _Tuned("x", linear, args, None, storage, minmax=True, full_range=full_range)
        weight = linear.weight.detach().float()
        rtn = quantize_weight(weight, args, storage)
        mine = tuned.result(0.0)
        assert float(mine.scale.float().abs().max()) < 0.003
        if not tuned.full_range:
            assert torch.equal(mine.scale, rtn.scale)
        err = float((mine.weight.float() - weight).pow(2).mean())
        assert err <= 1.02 * float((rtn.weight.float() - weight).pow(2).mean())
        torch.testing.assert_close(tuned.qdq().detach(), mine.weight.float(), rtol=1e-2, atol=1e-5)


def test_the_asymmetric_preset_builds_zero_point_group_weights_with_the_tuning_options():
    recipe = Recipe.from_preset("AutoRound+W4A16_ASYM", group_size=64, iters=7, batch_size=4)
    (modifier,) = recipe.modifiers
    assert modifier.kind == "AutoRoundModifier"
    assert modifier.autoround.iters == 7 and modifier.autoround.batch_size == 4
    stage = recipe.stage_dict()
    text = json.dumps(stage)
    assert '"symmetric": false' in text and '"group_size": 64' in text
    assert Recipe.from_yaml(recipe.to_yaml()).stage_dict() == stage
    with pytest.raises(RecipeError, match="group_size"):
        Recipe.from_preset("AutoRound+W4A16_ASYM", group_size=48)
