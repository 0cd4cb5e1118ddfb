"""compress_model: layer walk, progress events, cancellation, fallbacks, unsupported models."""
import pytest
import torch

from compression.algorithms import gptq as gptq_mod
from compression.errors import CalibrationError, JobCancelled, RecipeError, UnsupportedModelError
from compression.recipe import Recipe
from compression.sequential import compress_model
from compression.model_io.walk import capture_layer_inputs
from tests.engine.conftest import random_calibration


def test_layer_inputs_include_hidden_states_and_position_embeddings(model, calibration):
    captured = capture_layer_inputs(model, model.model.layers, calibration, "cpu")
    assert len(captured) == len(calibration)
    hidden, kwargs = captured.pairs(0)[0]
    assert hidden.shape == (1, 24, 128)
    cos, sin = kwargs["position_embeddings"]
    assert cos.shape[-2] == 24
    _, kwargs1 = captured.pairs(1)[0]
    assert kwargs1["position_embeddings"] is kwargs["position_embeddings"]  # one copy per attention type


def test_progress_reports_every_module_and_layer(model, calibration):
    events = []
    report = compress_model(model, Recipe.from_preset("W4A16", group_size=32), calibration, progress=events.append)
    modules = [e for e in events if "module" in e]
    layers = [e for e in events if "module" not in e]
    assert len(modules) == 14 and len(layers) == 2
    assert modules[0]["module"] == "self_attn.q_proj" and modules[0]["layer"] == 0 and modules[0]["layers"] == 2
    assert all(e["loss"] >= 0 and e["seconds"] >= 0 and e["memory_mb"] > 0 for e in modules)
    assert modules[0]["loss"] == report.modules["model.layers.0.self_attn.q_proj"].losses["gptq"]
    assert report.fallbacks == [] and report.samples == 4


def test_the_model_keeps_fake_quantized_weights_that_differ_from_dense(model, calibration):
    dense = model.model.layers[1].mlp.up_proj.weight.clone()
    report = compress_model(model, Recipe.from_preset("W4A16", group_size=32), calibration)
    w = model.model.layers[1].mlp.up_proj.weight
    rec = report.modules["model.layers.1.mlp.up_proj"]
    assert not torch.equal(w, dense)
    assert torch.equal(w, rec.codes.float() * rec.scale.repeat_interleave(32, dim=1))
    assert "lm_head" not in report.modules


def test_should_stop_cancels_between_layers(model, calibration):
    events = []
    with pytest.raises(JobCancelled):
        compress_model(model, Recipe.from_preset("2:4"), calibration, progress=events.append,
                       should_stop=lambda: True)
    assert {e["layer"] for e in events} == {0}


def test_a_cholesky_failure_is_recorded_as_a_fallback(model, calibration, monkeypatch):
    def always_fails(hessian, frac):
        raise gptq_mod.CholeskyFailed("not positive-definite (test)")

    monkeypatch.setattr(gptq_mod, "inverse_hessian_upper", always_fails)
    report = compress_model(model, Recipe.from_preset("W8A8"), calibration)
    assert len(report.fallbacks) == 14
    assert "round-to-nearest" in report.fallbacks[0]["reason"]
    assert report.summary()["fallbacks"][0]["module"] == "model.layers.0.self_attn.q_proj"


def test_24_plus_w4a16_keeps_the_pattern_through_both_stages(model, calibration):
    report = compress_model(model, Recipe.from_preset("2:4+W4A16"), calibration)
    stats = report.sparsity_stats()
    assert stats["sparsity_structure"] == "2:4" and stats["global_sparsity"] == pytest.approx(0.5)
    rec = report.modules["model.layers.0.mlp.gate_proj"]
    assert set(rec.losses) == {"sparsegpt", "gptq"}
    assert ((rec.codes != 0).reshape(256, -1, 4).sum(-1) <= 2).all()


def test_fp8_static_calibrates_per_tensor_input_scales(model, calibration):
    report = compress_model(model, Recipe.from_preset("FP8"), calibration)
    rec = report.modules["model.layers.0.self_attn.q_proj"]
    assert rec.input_scale.shape == (1,) and rec.input_scale.item() > 0 and rec.scale.shape == (1,)


def test_calibrated_recipes_need_samples(model):
    with pytest.raises(CalibrationError):
        compress_model(model, Recipe.from_preset("W4A16"), [])
    compress_model(model, Recipe.from_preset("FP8_DYNAMIC"), None)  # no calibration needed


def test_lm_head_left_in_is_compressed_after_the_layers_but_not_when_streamed(model, calibration):
    # llm-compressor's ignore [] compresses lm_head too (tests/engine/test_peer_recipe_shapes.py has more)
    with pytest.raises(RecipeError) as exc:
        compress_model(model, Recipe.from_preset("FP8_DYNAMIC", ignore=[]), calibration, layer_io=object())
    assert exc.value.field == "stages[0].modifiers[0].ignore" and "lm_head" in exc.value.message
    report = compress_model(model, Recipe.from_preset("FP8_DYNAMIC", ignore=[]), calibration)
    assert report.modules["lm_head"].codes is not None


def test_it_fails_clearly_on_a_model_it_cannot_walk():
    with pytest.raises(UnsupportedModelError):
        compress_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), Recipe.from_preset("FP8_DYNAMIC"), None)



def _layer0_stats(model, calibration, batch_tokens):
    from compression.model_io.moe import CheckpointNames
    from compression.sequential import _collect_statistics, _plan_layer
    from compression.model_io.walk import decoder_layers

    recipe = Recipe.from_preset("W4A16", group_size=64)
    prefix, layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, calibration, "cpu")
    inputs.batch_tokens = batch_tokens
    plans = _plan_layer(recipe, f"{prefix}.0", layers[0], CheckpointNames.for_model(model))
    return inputs, _collect_statistics(layers[0], 0, plans, inputs)


def test_modules_with_one_input_share_one_hessian_and_batching_changes_nothing(model):
    """q/k/v and gate/up get one accumulator each; equal unpadded samples run through a layer as one
    batch and give the same Hessians (up to float rounding) and outputs as one sample at a time."""
    calibration = random_calibration(n=5, length=24) + random_calibration(n=2, length=17, seed=2)
    padded = random_calibration(n=1, length=24, seed=3)
    padded[0]["attention_mask"][0, -3:] = 0
    calibration += padded
    batched_inputs, batched = _layer0_stats(model, calibration, batch_tokens=4096)
    single_inputs, single = _layer0_stats(model, calibration, batch_tokens=1)
    assert sorted(map(len, batched_inputs.batches())) == [1, 2, 5]  # the padded sample runs alone
    assert all(len(g) == 1 for g in single_inputs.batches())
    hessian = {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]: entry["hessian"]
               for name, entry in batched.items()}
    assert hessian["self_attn.q_proj"] is hessian["self_attn.k_proj"] is hessian["self_attn.v_proj"]
    assert hessian["mlp.gate_proj"] is hessian["mlp.up_proj"]
    assert hessian["self_attn.o_proj"] is not hessian["self_attn.q_proj"]
    assert hessian["mlp.down_proj"] is not hessian["mlp.up_proj"]
    for name, entry in batched.items():
        assert entry["hessian"].samples == len(calibration)
        torch.testing.assert_close(entry["hessian"].hessian, single[name]["hessian"].hessian, rtol=1e-4, atol=1e-5)
    from compression.model_io.walk import decoder_layers

    layer = decoder_layers(model)[1][0]
    for a, b in zip(batched_inputs.forward(layer, 0), single_inputs.forward(layer, 0)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_statistics_pass_stops_each_call_after_its_last_statistic(model, calibration):
    from compression.model_io.moe import CheckpointNames
    from compression.sequential import _collect_statistics, _plan_layer

    recipe = Recipe.from_preset("W4A16", group_size=32)
    layer = model.model.layers[0]
    inputs = capture_layer_inputs(model, model.model.layers, calibration, "cpu", batch_tokens=0)
    plans = _plan_layer(recipe, "model.layers.0", layer, CheckpointNames.for_model(model))
    seen, ran = {}, []  # every Linear's inputs over a full layer call, and how often down_proj ran
    handles = [p.module.register_forward_hook(
        lambda m, a, o, name=p.name: seen.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for p in plans]
    inputs.forward(layer, 0, keep=False)
    for h in handles:
        h.remove()
    handle = layer.mlp.down_proj.register_forward_hook(lambda *_: ran.append(1))
    stats = _collect_statistics(layer, 0, plans, inputs)
    handle.remove()
    assert len(ran) == 1 < len(calibration)  # only the first call runs the down projection
    for name, xs in seen.items():
        x = torch.cat(xs)
        torch.testing.assert_close(stats[name]["hessian"].hessian, 2 * x.t() @ x / len(calibration),
                                   rtol=1e-5, atol=1e-5)


def _gptq_yaml(extra: str = "", activations: str = "") -> str:
    return ("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      ignore: [lm_head]\n" + extra
            + "      config_groups:\n        group_0:\n          targets: [Linear]\n"
            "          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 32}\n"
            + activations)


def test_gptq_uses_full_range_scales_for_symmetric_weight_only_groups_unless_turned_off(calibration):
    from tests.tiny import tiny_llama

    def scales(recipe_text):
        model = tiny_llama()
        report = compress_model(model, Recipe.from_yaml(recipe_text), calibration)
        rec = report.modules["model.layers.1.mlp.up_proj"]
        w = model.model.layers[1].mlp.up_proj.weight
        assert torch.equal(w, rec.codes.float() * rec.scale.repeat_interleave(32, dim=1))
        return torch.cat([r.scale.flatten() for r in report.modules.values() if r.scale is not None])

    full = scales(_gptq_yaml())
    assert (full < 0).any() and (full > 0).any()  # the sign picks the side that maps to -8
    assert (scales(_gptq_yaml("      full_range: false\n")) > 0).all()
    # quantized activations keep min-max weight scales (W4A8: int8 dynamic per-token inputs)
    acts = "          input_activations: {num_bits: 8, type: int, symmetric: true, strategy: token, dynamic: true}\n"
    assert (scales(_gptq_yaml(activations=acts)) > 0).all()
