"""AWQ and SmoothQuant on every decoder family: the default mappings fold into the float model exactly
(the model's function is unchanged: every Linear reading a smoothed norm is rescaled), Gemma's
(1 + weight) norms included, and a recipe mapping whose norm does not feed its balance layers, or that
leaves out a layer reading the norm, is refused with the field named."""
from __future__ import annotations

import pytest
import torch

from compression.algorithms.smoothing import smooth_layer
from compression.errors import RecipeError
from compression.model_io.moe import unfuse_experts
from compression.model_io.walk import capture_layer_inputs, decoder_layers
from compression.recipe import Recipe
from compression.sequential import CompressionReport
from tests.engine.conftest import random_calibration
from tests.tiny import FAMILIES, tiny_family_model

AWQ = ("q:\n  q_modifiers:\n    AWQModifier: {{duo_scaling: true{mappings}}}\n    QuantizationModifier:\n"
       "      ignore: [lm_head]\n      config_groups:\n        g:\n          targets: [Linear]\n"
       "          weights: {{num_bits: 4, symmetric: false, strategy: group, group_size: 32}}\n")
SQ = ("q:\n  q_modifiers:\n    SmoothQuantModifier: {{smoothing_strength: 0.8{mappings}}}\n    GPTQModifier:\n"
      "      ignore: [lm_head]\n      targets: [Linear]\n      scheme: W8A8\n")


def _smooth_all(model, recipe: Recipe, calib) -> CompressionReport:
    """Only the smoothing step of every decoder layer (no quantization): the float model, rescaled."""
    prefix, layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, list(layers), calib, "cpu")
    report = CompressionReport()
    for index, layer in enumerate(layers):
        smooth_layer(recipe, f"{prefix}.{index}", layer, inputs, report, lambda e: None, index, len(layers))
        inputs = inputs.advanced(inputs.forward(layer, index))
    return report


def _outlier_model(family: str):
    model = tiny_family_model(family)
    unfuse_experts(model)
    with torch.no_grad():  # norms that are not all ones (Gemma's start at zero), so a wrong fold shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.rand_like(p) * 0.5)
    return model


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["AWQ", "SQ"])
def test_default_mappings_keep_the_float_model(family, kind):
    calib = random_calibration(n=2, length=12, vocab=256)
    model, reference = _outlier_model(family), _outlier_model(family)
    report = _smooth_all(model, Recipe.from_yaml((AWQ if kind == "AWQ" else SQ).format(mappings="")), calib)
    assert report.smoothing, "no mapping applied"
    with torch.no_grad():
        for sample in calib:
            got, want = model(**sample).logits, reference(**sample).logits
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), family
    if family in ("gemma2", "gemma3_text"):
        assert any(e["smooth_layer"].endswith("pre_feedforward_layernorm") for e in report.smoothing)
        assert not any(e["smooth_layer"].endswith("post_attention_layernorm") for e in report.smoothing)


def test_qwen2_moe_shared_expert_gate_is_rescaled_with_the_experts():
    """The norm before Qwen2-MoE's MLP feeds the router, every expert, the shared expert and its gate."""
    calib = random_calibration(n=2, length=12, vocab=256)
    report = _smooth_all(_outlier_model("qwen2_moe"), Recipe.from_yaml(AWQ.format(mappings="")), calib)
    mlp = [e for e in report.smoothing if e["smooth_layer"].endswith("post_attention_layernorm")]
    assert mlp and all(any(b.endswith("mlp.shared_expert_gate") for b in e["balance_layers"]) for e in mlp)
    assert all(any(b.endswith("mlp.gate") for b in e["balance_layers"]) for e in mlp)


def test_a_recipe_mapping_whose_norm_does_not_feed_its_balance_layers_is_refused():
    # Gemma: post_attention_layernorm normalises the attention output, the MLP reads pre_feedforward_layernorm
    mappings = (", mappings: [{smooth_layer: 're:.*post_attention_layernorm$', balance_layers: ['re:.*gate_proj$', "
                "'re:.*up_proj$']}]")
    calib = random_calibration(n=2, length=12, vocab=256)
    with pytest.raises(RecipeError) as err:
        _smooth_all(_outlier_model("gemma2"), Recipe.from_yaml(AWQ.format(mappings=mappings)), calib)
    assert err.value.field.endswith(".mappings") and "does not feed" in err.value.message


def _same_logits(model, reference, calib) -> None:
    with torch.no_grad():
        for sample in calib:
            got, want = model(**sample).logits, reference(**sample).logits
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("family, kind", [("gemma2", "AWQ"), ("qwen3_moe", "SQ"), ("mixtral", "AWQ"),
                                          ("qwen3_moe", "AWQ")])
def test_a_recipe_mapping_missing_readers_of_its_norm_is_completed_and_keeps_the_model(family, kind):
    """input_layernorm feeds q, k and v: a mapping naming q and k alone would rescale v's input without
    compensating it. llm-compressor's own SmoothQuant test recipes map the MLP's norm to gate/up only, which on an
    MoE model leaves the router (and, naming expert 0 alone, the other experts) reading rescaled activations:
    llm-compressor folds them anyway and changes the routing. Here the mapping is completed with every module
    that reads the norm -- the recipe runs unchanged, the float model is kept -- and the report says which."""
    gate, up = ("w1", "w3") if family == "mixtral" else ("gate_proj", "up_proj")
    if family == "gemma2":
        mappings = (", mappings: [{smooth_layer: 're:.*input_layernorm$', balance_layers: ['re:.*q_proj$', "
                    "'re:.*k_proj$']}]")
        added = "v_proj"
    elif kind == "SQ":  # llm-compressor 0.14's tests/e2e/recipes/INT8/recipe_w8a8_dynamic_asym.yaml mapping
        mappings = f", mappings: [[['re:.*{gate}', 're:.*{up}'], 're:.*post_attention_layernorm']]"
        added = "mlp.gate"
    else:  # the router and expert 0 only
        mappings = (", mappings: [{smooth_layer: 're:.*post_attention_layernorm$', balance_layers: "
                    f"['re:.*mlp\\.gate$', 're:.*experts\\.0\\.{gate}$', 're:.*experts\\.0\\.{up}$']}}]")
        added = f"experts.1.{gate}"
    calib = random_calibration(n=2, length=12, vocab=256)
    model, reference = _outlier_model(family), _outlier_model(family)
    report = _smooth_all(model, Recipe.from_yaml((AWQ if kind == "AWQ" else SQ).format(mappings=mappings)), calib)
    completed = [e for e in report.smoothing if e.get("added_readers")]
    assert completed and any(n.endswith(added) for e in completed for n in e["added_readers"]), report.smoothing
    assert all(n in e["balance_layers"] for e in completed for n in e["added_readers"])
    _same_logits(model, reference, calib)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "mixtral", "deepseek_v3"])
def test_pre_flight_refuses_a_recipe_mapping_that_matches_nowhere(family):
    """A recipe's own mapping is resolved in pre-flight against the decoder layers as the engine walks them
    (fused experts split, each distinct layer of a model whose first layers are dense): one that finds its
    modules somewhere passes, one that finds them nowhere is refused by its index instead of leaving the
    modifier a silent no-op (llm-compressor skips it without a word)."""
    from compression.preflight import preflight
    from tests.tiny import tiny_family_config

    config = tiny_family_config(family)
    up, down = ("w3", "w2") if family == "mixtral" else ("up_proj", "down_proj")
    expert_up = (", mappings: [{smooth_layer: 're:.*input_layernorm$', balance_layers: ['re:.*q_proj$', "
                 f"'re:.*k_proj$', 're:.*v_proj$']}}, {{smooth_layer: 're:.*experts\\.\\d+\\.{up}$', "
                 f"balance_layers: ['re:.*experts\\.\\d+\\.{down}$']}}]")
    if family in ("llama", "deepseek_v3"):  # dense MLPs (DeepSeek's first layer) have the same names
        expert_up = expert_up.replace("experts\\.\\d+\\.", "")
    if family == "deepseek_v3":  # multi-head latent attention: no q/k/v projections
        expert_up = expert_up.replace("'re:.*input_layernorm$', balance_layers: ['re:.*q_proj$', "
                                      "'re:.*k_proj$', 're:.*v_proj$']",
                                      "'re:.*input_layernorm$', balance_layers: ['re:.*q_a_proj$', "
                                      "'re:.*kv_a_proj_with_mqa$']")
    preflight(config, Recipe.from_yaml(AWQ.format(mappings=expert_up)))
    preflight(config, Recipe.from_yaml(SQ.format(mappings=", mappings: [[['re:.*gate_proj$', 're:.*up_proj$'], "
                                                 "'re:.*post_attention_layernorm$']]").replace(
        "gate_proj", "w1" if family == "mixtral" else "gate_proj").replace(
        "up_proj", "w3" if family == "mixtral" else "up_proj")))
    wrong = expert_up.replace("balance_layers: ['re:.*q", "balance_layers: ['re:.*query")
    for recipe, index in ((AWQ.format(mappings=wrong), "[0]"),
                          (SQ.format(mappings=", mappings: [[['re:.*o_proj$'], 're:.*post_attention_layernorm$'], "
                                              "[['re:.*gate_proj$'], 're:.*no_such_norm$']]"), "[1]")):
        with pytest.raises(RecipeError) as err:
            preflight(config, Recipe.from_yaml(recipe))
        assert err.value.field == f"stages[0].modifiers[0].mappings{index}"
        assert "matches no set of modules" in err.value.message
