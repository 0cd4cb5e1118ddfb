"""The card's "Alternatives considered" section: the quality benchmark's rows of the recipe's bit
budget (compression.recommend.alternatives_for, from the checked-in table) and why this recipe."""
from __future__ import annotations

import json

import pytest

from compression import recommend
from compression.card.model_card import build_model_card
from compression.recipe import Recipe
from tests.eval.facts import facts

W4_YAML = ("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      ignore: [lm_head]\n      config_groups:\n"
           "        group_0:\n          targets: [Linear]\n          weights: {num_bits: 4, type: int, symmetric: true, "
           "strategy: group, group_size: 64}\n")


def _row(name, preset, ratio, bits, yaml_text="", **options):
    return {"name": name, "preset": {"preset": preset, "options": options}, "weight_bits": bits,
            "recipe_yaml": yaml_text, "ours_ppl": 20 * ratio, "ours_ratio": ratio, "llmcompressor_ppl": 21.0,
            "llmcompressor_ratio": ratio + 0.05}


@pytest.fixture
def table(tmp_path, monkeypatch):
    data = {"source": {"model": "demo model", "metric": "held-out perplexity ratio", "windows": 8, "seqlen": 512,
                       "peer": "llm-compressor 0.14.0"},
            "rows": [_row("W4A16 g64 GPTQ", "W4A16", 1.25, 4.0, W4_YAML, group_size=64),
                     _row("W4A16_ASYM g64 AWQ", "AWQ+W4A16_ASYM", 1.08, 4.0, group_size=64),
                     _row("FP8_DYNAMIC", "FP8_DYNAMIC", 1.01, 8.0)]}
    path = tmp_path / "quality_table.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(recommend, "TABLE_PATH", path)
    return data


def test_a_benchmarked_recipe_that_is_not_the_best_says_which_was(table):
    alt = recommend.alternatives_for(Recipe.from_yaml(W4_YAML))
    assert alt["bits"] == 4.0 and alt["matched_row"] == "W4A16 g64 GPTQ"
    assert [r["name"] for r in alt["candidates"]] == ["W4A16_ASYM g64 AWQ", "W4A16 g64 GPTQ"]  # FP8 is 8 bits
    text = build_model_card(facts(alternatives=alt))
    section = text[text.index("## Alternatives considered"):text.index("## Deployment")]
    assert "| W4A16 g64 GPTQ (this recipe) | 1.250 | 1.300 |" in section
    assert "| W4A16_ASYM g64 AWQ | 1.080 | 1.130 |" in section and "FP8_DYNAMIC" not in section
    assert "the benchmark's best of this budget was W4A16_ASYM g64 AWQ (ratio 1.080)" in section


def test_the_best_recipe_by_preset_is_called_the_best(table):
    alt = recommend.alternatives_for(Recipe.from_preset("AWQ+W4A16_ASYM", group_size=64))
    assert alt["matched_row"] == "W4A16_ASYM g64 AWQ"
    text = build_model_card(facts(alternatives=alt))
    assert "Chosen: W4A16_ASYM g64 AWQ, the lowest perplexity ratio of its bit budget" in text


def test_an_unbenchmarked_recipe_and_a_budget_without_rows(table):
    alt = recommend.alternatives_for(Recipe.from_preset("NVFP4A16"))
    assert alt["matched_row"] is None
    assert "not one of the benchmarked recipes" in build_model_card(facts(alternatives=alt))
    assert recommend.alternatives_for(Recipe.from_preset("2:4+W4A16")) is None  # 2 bits: no row
    text = build_model_card(facts(alternatives=None))
    assert "## Alternatives considered" in text and "no alternative was compared" in text


def test_the_checked_in_table_is_generated_from_the_benchmark_results():
    """compression/quality_table.json holds exactly the rows of the benchmark's results file where
    this engine has a number (python bench/quality.py --table --out FILE; comparison-only rows without a preset are
    left out), not numbers typed in by hand."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    table_path = recommend.TABLE_PATH
    if not table_path.exists():
        pytest.skip("no quality table in this build")
    table = json.loads(table_path.read_text())
    results = json.loads((root / table["source"]["results_file"]).read_text())
    for row in table["rows"]:
        ours = results["rows"][row["name"]]["ours"]
        assert row["ours_ratio"] == ours["ratio"] and row["recipe_yaml"] == results["rows"][row["name"]]["recipe_yaml"]
        assert row["weight_bits"] == recommend.nominal_weight_bits(Recipe.from_yaml(row["recipe_yaml"]))
    assert table["source"]["windows"] == results["windows"]
