"""Layer-wise reconstruction after SparseGPT: the fit, the held mask, the recipe option, the hook."""
import pytest
import torch

from compression.errors import JobCancelled, RecipeError
from kernels.packing import is_24_sparse as check_24_pattern
from compression.algorithms.reconstruction import (ReconstructionSettings, layer_outputs, output_error, reconstruct_layer)
from compression.recipe import Recipe
from compression.sequential import compress_model
from compression.algorithms.sparsegpt import magnitude_mask_24
from tests.engine.conftest import random_calibration
from compression.model_io.walk import capture_layer_inputs
from tests.tiny import tiny_llama


def _pruned_layer(model, calibration):
    """Layer 0 of ``model`` magnitude-pruned to 2:4, its inputs, dense targets and masks."""
    layer = model.model.layers[0]
    inputs = capture_layer_inputs(model, model.model.layers, calibration, "cpu").pairs(0)
    targets = layer_outputs(layer, inputs)
    weights = {}
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            mask = magnitude_mask_24(module.weight.data)
            module.weight.data.masked_fill_(mask, 0.0)
            weights[name] = (module, mask)
    return layer, inputs, targets, weights


def test_reconstruction_lowers_the_output_error_and_holds_the_mask(model, calibration):
    layer, inputs, targets, weights = _pruned_layer(model, calibration)
    norm_before = layer.input_layernorm.weight.detach().clone()
    before, _ = output_error(layer, inputs, targets)
    result = reconstruct_layer(layer, inputs, targets, weights, ReconstructionSettings(steps=20, lr=1e-3))
    assert result.kept and result.steps == 20
    assert result.error_before == pytest.approx(before)
    assert result.error_after < 0.8 * result.error_before
    assert output_error(layer, inputs, targets)[0] == pytest.approx(result.error_after, rel=1e-5)
    for module, mask in weights.values():
        w = module.weight.data
        assert torch.equal(w[mask], torch.zeros_like(w[mask]))  # exactly +0.0, sign included
        assert not torch.signbit(w[mask]).any()
        assert check_24_pattern(w)
    assert torch.equal(layer.input_layernorm.weight, norm_before)  # only the pruned Linears move
    assert not any(p.requires_grad for p in layer.parameters()) or all(p.requires_grad for p in layer.parameters())


def test_a_fit_that_does_not_help_restores_the_pruned_weights(model, calibration):
    layer, inputs, targets, weights = _pruned_layer(model, calibration)
    saved = {n: m.weight.detach().clone() for n, (m, _) in weights.items()}
    result = reconstruct_layer(layer, inputs, targets, weights, ReconstructionSettings(steps=3, lr=0.1))
    assert not result.kept and result.error_after == result.error_before
    for name, (module, _) in weights.items():
        assert torch.equal(module.weight, saved[name])


def test_should_stop_ends_the_fit_between_steps(model, calibration):
    layer, inputs, targets, weights = _pruned_layer(model, calibration)
    calls = []
    result = reconstruct_layer(layer, inputs, targets, weights, ReconstructionSettings(steps=50, lr=1e-4),
                               should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert result.steps == 2


def test_a_bfloat16_layer_is_fitted_in_float32_and_stays_bfloat16(calibration):
    model = tiny_llama(dtype=torch.bfloat16)
    layer, inputs, targets, weights = _pruned_layer(model, calibration)
    result = reconstruct_layer(layer, inputs, targets, weights, ReconstructionSettings(steps=10, lr=1e-3))
    assert result.error_after <= result.error_before
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert all(check_24_pattern(m.weight.data) for m, _ in weights.values())


def _final_hidden_error(dense, sparse, calibration) -> float:
    err = 0.0
    with torch.no_grad():
        for sample in calibration:
            a = dense(input_ids=sample["input_ids"], output_hidden_states=True).hidden_states[-1]
            b = sparse(input_ids=sample["input_ids"], output_hidden_states=True).hidden_states[-1]
            err += float(((a - b) ** 2).mean())
    return err


@pytest.mark.parametrize("target", ["dense", "layer"])
def test_compress_model_reconstructs_every_pruned_layer(calibration, target):
    dense, oneshot, fitted = tiny_llama(), tiny_llama(), tiny_llama()
    compress_model(oneshot, Recipe.from_preset("2:4", reconstruction=False), calibration)
    events = []
    recipe = Recipe.from_preset("2:4", reconstruction={"steps": 8, "lr": 2e-3, "target": target})
    report = compress_model(fitted, recipe, calibration, progress=events.append)
    recon = [e for e in events if e.get("kind") == "reconstruction"]
    assert [e["layer"] for e in recon] == [0, 1]
    assert all(e["error_after"] < e["error_before"] and e["steps"] == 8 for e in recon)
    assert sorted(report.reconstruction) == [0, 1]
    assert [r["layer"] for r in report.summary()["reconstruction"]] == [0, 1]
    for name, record in report.modules.items():
        assert record.sparsity == 0.5
        assert check_24_pattern(dict(fitted.named_modules())[name].weight.data)
    # the reconstructed model's final hidden states are closer to the dense model's than one-shot's
    assert _final_hidden_error(dense, fitted, calibration) < _final_hidden_error(dense, oneshot, calibration)


def test_reconstruction_runs_between_pruning_and_quantization(calibration):
    model = tiny_llama()
    events = []
    recipe = Recipe.from_preset("2:4+W4A16", group_size=32, reconstruction={"steps": 2, "lr": 1e-3})
    report = compress_model(model, recipe, calibration, progress=events.append)
    kinds = [e.get("kind") or e["message"].split()[0] for e in events if e["layer"] == 0]
    first_recon = kinds.index("reconstruction")
    assert all(k == "SparseGPTModifier" for k in kinds[:first_recon])
    assert "GPTQModifier" in kinds[first_recon:]
    for name, record in report.modules.items():
        w = dict(model.named_modules())[name].weight.data
        assert check_24_pattern(w)
        assert torch.equal(w, record.codes.float() * record.scale.repeat_interleave(32, dim=1))  # the quantized grid holds the zeros


def test_cancel_during_reconstruction_stops_at_the_layer(calibration):
    model = tiny_llama()
    recipe = Recipe.from_preset("2:4", reconstruction={"steps": 1000})
    with pytest.raises(JobCancelled):
        compress_model(model, recipe, calibration, should_stop=lambda: True)


def test_recipe_option_round_trips_and_is_on_in_the_24_presets_unless_turned_off():
    for preset in ("2:4", "2:4+FP8_DYNAMIC", "2:4+W4A16"):
        on = Recipe.from_preset(preset).modifiers[0].reconstruction
        assert on == ReconstructionSettings(steps=4, batch_size=2, lr=3e-4, target="dense"), preset
        assert Recipe.from_yaml(Recipe.from_preset(preset).to_yaml()).modifiers[0].reconstruction == on
        assert Recipe.from_preset(preset, reconstruction=False).modifiers[0].reconstruction is None
    assert Recipe.from_yaml("s:\n  sparsity_modifiers:\n    SparseGPTModifier: {}\n").modifiers[0].reconstruction is None
    recipe = Recipe.from_yaml("""
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      reconstruction: {steps: 16, lr: 1e-4, batch_size: 2}
""")
    settings = recipe.modifiers[0].reconstruction
    assert settings == ReconstructionSettings(steps=16, lr=1e-4, batch_size=2)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    on = Recipe.from_yaml("s:\n  sparsity_modifiers:\n    SparseGPTModifier: {reconstruction: true}\n")
    assert on.modifiers[0].reconstruction == ReconstructionSettings()
    assert Recipe.from_preset("2:4+FP8_DYNAMIC", reconstruction=True).modifiers[0].reconstruction is not None


@pytest.mark.parametrize("value, field", [
    ({"steps": 0}, "reconstruction.steps"),
    ({"steps": 10**6}, "reconstruction.steps"),
    ({"lr": 5}, "reconstruction.lr"),
    ({"lr": "fast"}, "reconstruction.lr"),
    ({"optimizer": "sgd"}, "reconstruction.optimizer"),
    ({"target": "teacher"}, "reconstruction.target"),
    ({"epochs": 3}, "reconstruction.epochs"),
    ("yes please", "reconstruction"),
])
def test_bad_reconstruction_settings_name_the_field(value, field):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"s": {"sparsity_modifiers": {"SparseGPTModifier": {"reconstruction": value}}}})
    assert info.value.field == f"stages[0].modifiers[0].{field}"
