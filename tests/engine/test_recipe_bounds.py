"""A recipe cannot tie up the process that reads it: `re:` patterns are matched with a time limit,
YAML has no aliases and bounded nesting, and every part of a recipe is capped in size."""
from __future__ import annotations

import pytest

from compression.errors import RecipeError
from compression.preflight import preflight
from compression.recipe import (MAX_PATTERN_CHARS, PatternTooSlow, Recipe, matches_any, pattern_matches,
                                pattern_time_budget)
from tests.tiny import tiny_llama_config

# Nested repetition over overlapping alternatives: Python's `re` needs far longer than a minute on a
# 20-character module name; `regex` alone needs seconds on a real one.
CATASTROPHIC = r"(?:(?:[a-z]|[a-z][a-z]|[a-z][a-z][a-z]|\.|_|[0-9])+)+[0-9]$"
NAME = "model.layers.10.self_attn.q_proj"


def quant_yaml(ignore: str) -> str:
    return ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      targets: [Linear]\n"
            f"      ignore: {ignore}\n      scheme: FP8_DYNAMIC\n")


@pytest.mark.timeout(60)
def test_a_catastrophic_pattern_is_stopped_not_run_to_the_end():
    with pytest.raises(PatternTooSlow) as caught:
        matches_any([f"re:{CATASTROPHIC}"], NAME, "Linear")
    assert caught.value.field == "recipe" and "takes too long to match module names" in caught.value.message


@pytest.mark.timeout(60)
def test_preflight_of_a_recipe_with_such_a_pattern_fails_with_a_recipe_error():
    recipe = Recipe.from_yaml(quant_yaml(f"['re:{CATASTROPHIC}']"))
    with pytest.raises(RecipeError, match="takes too long"), pattern_time_budget(1.0):
        preflight(tiny_llama_config(layers=12), recipe)


def test_ordinary_patterns_still_match_like_re():
    assert pattern_matches(r".*\.q_proj$", NAME) and not pattern_matches(r"lm_head", NAME)
    assert matches_any(["re:model\\.layers\\.1\\d\\..*"], NAME, "Linear")


def test_the_budget_covers_all_matching_inside_it():
    with pytest.raises(PatternTooSlow), pattern_time_budget(0):
        pattern_matches(".*", NAME)
    assert pattern_matches(".*", NAME)  # outside the block only the per-match limit applies


def test_the_budget_counts_matching_time_not_the_blocks_wall_clock():
    """Submission builds the model's meta skeleton inside the budget (a 235B MoE takes a while on a busy
    host): that time is not the patterns' to lose, while their own matching still is."""
    import time

    with pattern_time_budget(0.25):
        time.sleep(0.3)
        assert pattern_matches(r".*\.q_proj$", NAME)
        recipe = Recipe.from_yaml(quant_yaml("['re:.*mlp.gate$', 're:.*down_proj$']"))
        preflight(tiny_llama_config(layers=12), recipe)
        with pytest.raises(PatternTooSlow):
            matches_any([f"re:{CATASTROPHIC}"], NAME, "Linear")


@pytest.mark.parametrize("ignore, message", [
    (f"['re:{'a' * (MAX_PATTERN_CHARS + 1)}']", "at most 256 characters"),
    ("['re:(unclosed']", "bad regular expression"),
    ("['re:\\p{L}+']", "bad regular expression"),  # `regex` syntax that Python's re (vLLM) refuses
    ("[" + ", ".join(f"m{i}" for i in range(300)) + "]", "at most 256 entries"),
    (f"['{'x' * 400}']", "at most 259 characters"),
])
def test_patterns_and_names_are_capped(ignore, message):
    with pytest.raises(RecipeError) as caught:
        Recipe.from_yaml(quant_yaml(ignore))
    assert message in caught.value.message and caught.value.field.endswith(".ignore")


def test_yaml_aliases_are_refused_before_they_expand():
    laughs = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    laughs += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
               f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
    with pytest.raises(RecipeError, match="anchors and aliases"):
        Recipe.from_yaml("\n".join(laughs))
    # a merge key is an alias too
    with pytest.raises(RecipeError, match=r"anchors and aliases .* \(line 1\)"):
        Recipe.from_yaml("base: &base {targets: [Linear]}\nquant_stage: {quant_modifiers: {QuantizationModifier: "
                         "{<<: *base, scheme: FP8_DYNAMIC}}}")


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 300)),
                                  "{a: " * 3000 + "1" + "}" * 3000])
def test_deeply_nested_yaml_is_refused(text):
    with pytest.raises(RecipeError, match="nested more than"):
        Recipe.from_yaml(text)


def test_integers_too_long_to_convert_are_a_recipe_error():
    with pytest.raises(RecipeError) as caught:
        Recipe.from_yaml("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W4A16\n"
                         f"      block_size: {'9' * 5000}\n")
    assert caught.value.field == "recipe"
    with pytest.raises(RecipeError, match="between 4 and"):
        Recipe.from_yaml("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W4A16\n"
                         f"      block_size: {2 ** 40}\n")


def test_deeply_nested_dicts_and_oversized_yaml_are_refused():
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(RecipeError, match="nested more than"):
        Recipe.from_dict(deep)
    with pytest.raises(RecipeError, match="longer than 100000 characters"):
        Recipe.from_yaml("# padding\n" * 20_000)
