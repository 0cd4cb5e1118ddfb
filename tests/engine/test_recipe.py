"""Recipe schema: presets, YAML, validation errors with field paths."""
import re
from pathlib import Path

import pytest

from compression.recipe import PRESETS, Recipe, RecipeError

CARDS = Path("/work/shared/reference/model-cards")


def card_recipe(name: str) -> str:
    text = (CARDS / name).read_text()
    yaml_text = re.search(r'recipe = """(.*?)"""', text, re.S).group(1)
    # The cards were flattened to one line; rebuild the YAML indentation from the known nesting.
    tokens = yaml_text.split()
    return " ".join(tokens)


def _405b_yaml() -> str:
    return """
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: ["lm_head"]
      config_groups:
        group_0:
          weights:
            num_bits: 8
            type: float
            strategy: tensor
            dynamic: false
            symmetric: true
          input_activations:
            num_bits: 8
            type: float
            strategy: tensor
            dynamic: false
            symmetric: true
          targets: ["Linear"]
"""


def test_the_405b_card_recipe_parses_as_static_fp8():
    # The card text is the same recipe flattened onto one line; check we transcribed it faithfully.
    assert card_recipe("meta-llama-3.1-405b-fp8.txt") == " ".join(_405b_yaml().split())
    recipe = Recipe.from_yaml(_405b_yaml())
    group = recipe.modifiers[0].config_groups["group_0"]
    assert group.weights.type == "float" and group.weights.strategy == "tensor"
    assert group.input_activations.dynamic is False
    assert recipe.needs_calibration and recipe.modifiers[0].ignore == ["lm_head"]
    assert recipe.stage_dict() == Recipe.from_preset("FP8").stage_dict()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_dict_and_yaml(name):
    recipe = Recipe.from_preset(name)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_yaml(recipe.to_yaml()).stage_dict() == recipe.stage_dict()
    assert recipe.preset == name and recipe.describe().startswith(name)


def test_presets_say_whether_they_need_calibration():
    data_free = ("FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16")  # weights-only RTN or dynamic activations
    assert not any(Recipe.from_preset(n).needs_calibration for n in data_free)
    assert all(Recipe.from_preset(n).needs_calibration for n in PRESETS if n not in data_free)


def test_w4a16_group_size_and_solver_options_are_selectable():
    recipe = Recipe.from_preset("W4A16", group_size=64, dampening_frac=0.1, block_size=64)
    m = recipe.modifiers[0]
    assert m.config_groups["group_0"].weights.group_size == 64
    assert (m.dampening_frac, m.block_size, m.actorder) == (0.1, 64, "static")
    per_channel = Recipe.from_preset("W4A16", group_size="channel").modifiers[0].config_groups["group_0"].weights
    assert per_channel.strategy == "channel" and per_channel.group_size is None
    assert Recipe.from_preset("W4A16").modifiers[0].config_groups["group_0"].weights.group_size == 128


def test_24_plus_w4a16_prunes_then_quantizes_per_channel():
    recipe = Recipe.from_preset("2:4+W4A16")
    sparse, gptq = recipe.modifiers
    assert sparse.kind == "SparseGPTModifier" and sparse.mask_structure == "2:4" and sparse.sparsity == 0.5
    assert gptq.kind == "GPTQModifier" and gptq.config_groups["group_0"].weights.strategy == "channel"


def test_it_rejects_bad_group_size():
    with pytest.raises(RecipeError) as exc:
        Recipe.from_preset("W4A16", group_size=100)
    assert exc.value.field == "group_size" and "32, 64, 128" in exc.value.message


def test_it_rejects_options_a_preset_does_not_have():
    with pytest.raises(RecipeError) as exc:
        Recipe.from_preset("FP8_DYNAMIC", group_size=64)
    assert exc.value.field == "group_size" and "allowed: ignore" in exc.value.message
    with pytest.raises(RecipeError) as exc:
        Recipe.from_preset("W5A5")
    assert exc.value.field == "preset"


@pytest.mark.parametrize("kind", ["MadeUpModifier", "MagnitudePruningModifier"])  # (Wanda is supported now)
def test_it_rejects_unknown_modifiers(kind):
    with pytest.raises(RecipeError) as exc:
        Recipe.from_yaml(f"s:\n  m_modifiers:\n    {kind}: {{sparsity: 0.5}}\n")
    assert exc.value.field == "stages[0].modifiers[0]"
    assert "GPTQModifier" in exc.value.message and str(exc.value).startswith("stages[0].modifiers[0]: ")


def test_it_rejects_unknown_fields_with_their_path():
    text = _405b_yaml().replace("symmetric: true\n          input", "symmetric: true\n            colour: red\n          input")
    with pytest.raises(RecipeError) as exc:
        Recipe.from_yaml(text)
    assert exc.value.field == "stages[0].modifiers[0].config_groups.group_0.weights.colour"
    with pytest.raises(RecipeError) as exc:
        Recipe.from_yaml("q:\n  q_modifiers:\n    GPTQModifier: {scheme: W4A16, damp: 0.1}\n")
    assert exc.value.field == "stages[0].modifiers[0].damp" and "dampening_frac" in exc.value.message


@pytest.mark.parametrize("yaml_args,field,hint", [
    ("{scheme: W4A16, actorder: sideways}", "actorder", "static"),
    ("{scheme: W9}", "scheme", "W4A16"),
    ("{config_groups: {g: {targets: [Linear], weights: {num_bits: 4, strategy: group}}}}",
     "config_groups.g.weights.group_size", "group_size"),
    ("{config_groups: {g: {targets: [Linear], weights: {num_bits: 8, type: float, symmetric: false}}}}",
     "config_groups.g.weights.symmetric", "integer-only"),
    ("{scheme: W4A16, targets: ['re:(']}", "targets", "regular expression"),
    ("{scheme: W4A16, block_size: 30}", "block_size", "multiple of 4"),
])
def test_it_rejects_bad_gptq_arguments(yaml_args, field, hint):
    with pytest.raises(RecipeError) as exc:
        Recipe.from_yaml(f"q:\n  q_modifiers:\n    GPTQModifier: {yaml_args}\n")
    assert exc.value.field == f"stages[0].modifiers[0].{field}"
    assert hint in exc.value.message


def test_it_rejects_pruning_after_quantization():
    text = ("q:\n  q_modifiers:\n    QuantizationModifier: {scheme: FP8_DYNAMIC}\n"
            "s:\n  s_modifiers:\n    SparseGPTModifier: {sparsity: 0.5, mask_structure: '2:4'}\n")
    with pytest.raises(RecipeError) as exc:
        Recipe.from_yaml(text)
    assert exc.value.field == "stages[1].modifiers[0]" and "before" in exc.value.message


def test_it_rejects_24_with_a_sparsity_other_than_half():
    with pytest.raises(RecipeError) as exc:
        Recipe.from_yaml("s:\n  s_modifiers:\n    SparseGPTModifier: {sparsity: 0.7, mask_structure: '2:4'}\n")
    assert exc.value.field == "stages[0].modifiers[0].sparsity"


def test_scheme_shorthand_and_regex_ignore_are_accepted():
    recipe = Recipe.from_yaml("q:\n  q_modifiers:\n    GPTQModifier:\n      scheme: W8A8\n"
                              "      ignore: [lm_head, 're:.*down_proj']\n")
    m = recipe.modifiers[0]
    assert m.ignore == ["lm_head", "re:.*down_proj"] and m.targets == ["Linear"]
    assert m.config_groups["group_0"].input_activations.strategy == "token"


def test_gptq_full_range_is_on_by_default_and_round_trips_when_turned_off():
    text = ("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W4A16\n      targets: [Linear]\n"
            "      ignore: [lm_head]\n")
    on = Recipe.from_yaml(text)
    assert on.modifiers[0].full_range and "full_range" not in on.to_yaml()  # llm-compressor has no such field
    off = Recipe.from_yaml(text + "      full_range: false\n")
    assert not off.modifiers[0].full_range and Recipe.from_yaml(off.to_yaml()) == off
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(text + "      full_range: sometimes\n")
    assert err.value.field == "stages[0].modifiers[0].full_range"


@pytest.mark.parametrize("weights,activations,noted", [
    ("{num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}", "", False),
    ("{num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 64}", "", True),
    ("{num_bits: 8, type: float, symmetric: true, strategy: channel}", "", True),
    ("{num_bits: 8, type: int, symmetric: true, strategy: channel}",
     "\n          input_activations: {num_bits: 8, type: int, symmetric: true, strategy: token, dynamic: true}", True),
])
def test_an_explicit_full_range_that_cannot_apply_is_noted_not_silently_ignored(weights, activations, noted):
    text = ("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      ignore: [lm_head]\n      full_range: true\n"
            "      config_groups:\n        group_0:\n          targets: [Linear]\n          weights: " + weights
            + activations + "\n")
    recipe = Recipe.from_yaml(text)
    assert any("full_range: true changes nothing" in n for n in recipe.notes) is noted
    # the default (not written) is never noted
    assert not any("full_range" in n for n in Recipe.from_yaml(text.replace("      full_range: true\n", "")).notes)


def test_an_awq_modifier_with_its_own_scheme_runs_as_awq_plus_quantization():
    """llm-compressor's old AWQ API (AWQModifier holding scheme/config_groups, what older saved recipes
    carry): split as llm-compressor 0.14's compatibility shim splits it, with a note; a bad value in the
    quantization part is reported under the recipe's own modifier path."""
    from compression.recipe import LEGACY_AWQ_NOTE

    recipe = Recipe.from_yaml("default_stage:\n  default_modifiers:\n    AWQModifier:\n      ignore: [lm_head]\n"
                              "      scheme: W4A16_ASYM\n      targets: [Linear]\n      duo_scaling: both\n")
    awq, quant = recipe.modifiers
    assert (awq.kind, awq.duo_scaling, quant.kind, quant.ignore) == ("AWQModifier", "both", "QuantizationModifier",
                                                                      ["lm_head"])
    weights = next(iter(quant.config_groups.values())).weights
    assert (weights.num_bits, weights.symmetric, weights.group_size) == (4, False, 128)
    assert LEGACY_AWQ_NOTE in recipe.notes
    again = Recipe.from_yaml(recipe.to_yaml())
    assert [m.kind for m in again.modifiers] == ["AWQModifier", "QuantizationModifier"]
    groups = Recipe.from_yaml(
        "s:\n  m_modifiers:\n    AWQModifier:\n      config_groups:\n        g:\n          targets: [Linear]\n"
        "          weights: {num_bits: 4, symmetric: true, strategy: group, group_size: 64}\n")
    assert [m.kind for m in groups.modifiers] == ["AWQModifier", "QuantizationModifier"]
    with pytest.raises(RecipeError) as exc:
        Recipe.from_yaml("s:\n  m_modifiers:\n    AWQModifier: {scheme: W9A16}\n")
    assert exc.value.field == "stages[0].modifiers[0].scheme"
    # without a scheme it stays the transform alone, and its unknown fields are refused as before
    assert [m.kind for m in Recipe.from_yaml("s:\n  m_modifiers:\n    AWQModifier: {duo_scaling: true}\n"
                                             "    QuantizationModifier: {scheme: W4A16, targets: [Linear]}\n"
                                             ).modifiers] == ["AWQModifier", "QuantizationModifier"]
