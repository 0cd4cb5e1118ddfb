"""GET /api/recommend?model=...: the presets and group sizes a model's shapes allow, and the quality
benchmark's best recipe per bit budget; the model checked exactly as on job submission."""
import json

import pytest
import torch
from rest_framework.test import APIClient
from safetensors.torch import save_file

from compression import recommend
from jobs.models import Job
from tests.tiny import tiny_family_config, tiny_llama_config

from .conftest import errors

pytestmark = pytest.mark.django_db

URL = "/api/recommend"


def _model_dir(root, name, config):
    path = root / name
    config.save_pretrained(path)
    save_file({"placeholder": torch.zeros(1)}, str(path / "model.safetensors"))  # pre-flight reads the config only
    return str(path)


def _row(name, preset, ratio, bits=4.0, **options):
    return {"name": name, "preset": {"preset": preset, "options": options}, "weight_bits": bits,
            "recipe_yaml": "", "ours_ppl": 20 * ratio, "ours_ratio": ratio, "llmcompressor_ppl": None,
            "llmcompressor_ratio": ratio + 0.01}


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A quality table whose best 4-bit row uses group 128 (which the demo's width 576 refuses)."""
    data = {"source": {"model": "demo", "metric": "ppl ratio", "windows": 8, "seqlen": 512, "peer": "llmc"},
            "rows": [_row("W4A16 g128", "W4A16", 1.10, group_size=128),
                     _row("W4A16_ASYM g64", "W4A16_ASYM", 1.20, group_size=64),
                     _row("W4A16 g64", "W4A16", 1.30, group_size=64),
                     _row("FP8_BLOCK", "FP8_BLOCK", 1.01, bits=8.0),
                     _row("FP8_DYNAMIC", "FP8_DYNAMIC", 1.02, bits=8.0)]}
    path = tmp_path / "quality_table.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(recommend, "TABLE_PATH", path)
    return data


def test_it_needs_a_user():
    response = APIClient().get(URL, {"model": "demo"})
    assert response.status_code in (401, 403) and response.json()["errors"]


def test_it_names_the_model_field_when_the_model_is_missing_or_not_allowed(api, settings, tmp_path):
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    assert "model" in errors(api.get(URL))
    for model, words in (("/etc", "outside the allowed model directories"), ("/etc/../etc", "'..' is not allowed"),
                         (str(tmp_path / "missing"), "")):
        response = api.get(URL, {"model": model})
        assert response.status_code == 400, (model, response.content)
        assert words in errors(response)["model"]
    response = api.get(URL, {"model": "x" * 501})
    assert response.status_code == 400 and "model" in errors(response)
    response = api.get(URL, {"model": "demo", "other": "1"})
    assert response.status_code == 400 and "other" in errors(response)
    assert not Job.objects.exists()


def test_a_model_the_engine_cannot_walk_is_a_400_on_model(api, settings, tmp_path):
    from transformers import NemotronHConfig  # its experts have no gate projection (up, then down)

    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    config = NemotronHConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=256)
    response = api.get(URL, {"model": _model_dir(tmp_path, "nemotron-h", config)})
    assert response.status_code == 400 and "without a gated MLP" in errors(response)["model"]


def test_the_demo_model_allows_what_its_widths_divide_and_the_best_allowed_row_wins(api, table):
    data = api.get(URL, {"model": "demo"}).json()
    assert data["model"] == "demo" and data["architecture"] == "LlamaForCausalLM" and data["layers"] == 30
    assert data["input_widths"] == [576, 1536]
    schemes = {s["preset"]: s for s in data["schemes"]}
    assert schemes["W4A16"]["allowed"] and schemes["W4A16"]["group_sizes"] == [32, 64, "channel"]
    assert schemes["W4A16_ASYM"]["group_sizes"] == [32, 64]
    block = schemes["FP8_BLOCK"]
    assert not block["allowed"] and "576" in block["reason"] and "group_size" in block["reason"]
    assert schemes["FP8_DYNAMIC"]["allowed"] and schemes["FP8_DYNAMIC"]["bits"] == 8.0
    budgets = {b["bits"]: b for b in data["budgets"]}
    assert set(budgets) == {4.0, 8.0}
    four = budgets[4.0]
    assert [c["name"] for c in four["candidates"]] == ["W4A16 g128", "W4A16_ASYM g64", "W4A16 g64"]
    assert not four["candidates"][0]["allowed"] and "group size 128" in four["candidates"][0]["reason"]
    assert four["best"]["name"] == "W4A16_ASYM g64"  # g128 measured better, but 576 % 128 != 0
    assert budgets[8.0]["best"]["name"] == "FP8_DYNAMIC"  # FP8_BLOCK refused for this model
    assert data["benchmark"]["windows"] == 8


def test_a_tiny_random_model_allows_every_group_size(api, table, settings, tmp_path):
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    model = _model_dir(tmp_path, "tiny", tiny_llama_config())
    data = api.get(URL, {"model": model}).json()
    assert data["input_widths"] == [128, 256] and data["layers"] == 2
    schemes = {s["preset"]: s for s in data["schemes"]}
    assert schemes["W4A16"]["group_sizes"] == [32, 64, 128, "channel"]
    assert schemes["FP8_BLOCK"]["allowed"]
    budgets = {b["bits"]: b for b in data["budgets"]}
    assert budgets[4.0]["best"]["name"] == "W4A16 g128" and budgets[8.0]["best"]["name"] == "FP8_BLOCK"


def test_nvfp4_and_group_sizes_refused_where_the_widths_do_not_divide(api, table, settings,
                                                                                         tmp_path):
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    model = _model_dir(tmp_path, "odd", tiny_llama_config(hidden=72, intermediate=144, heads=4, kv_heads=2))
    schemes = {s["preset"]: s for s in api.get(URL, {"model": model}).json()["schemes"]}
    assert not schemes["NVFP4"]["allowed"] and "groups of 16" in schemes["NVFP4"]["reason"]
    assert schemes["W4A16"]["group_sizes"] == ["channel"]  # 72 is a multiple of none of 32, 64, 128
    assert not schemes["W4A16_ASYM"]["allowed"] and "group size 32" in schemes["W4A16_ASYM"]["reason"]


# issue 13's bad-input clause, on job submission: refused before queueing, the field named
def test_a_job_mixing_options_the_model_cannot_honour_is_refused_before_queueing(api, sent, settings, tmp_path):
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    evaluation = {"tasks": ["wikitext2_ppl"], "windows": 2}
    odd = _model_dir(tmp_path, "odd", tiny_llama_config(hidden=72, intermediate=144, heads=4, kv_heads=2))
    response = api.post("/api/jobs", {"model": odd, "recipe": {"preset": "NVFP4"}, "evaluation": evaluation},
                        format="json")
    assert response.status_code == 400
    assert "72" in errors(response)["recipe.group_size"] and "NVFP4" in errors(response)["recipe.group_size"]
    config = tiny_llama_config()
    config.use_cache = False  # an attention model saved without a KV cache
    no_cache = _model_dir(tmp_path, "no-cache", config)
    yaml_text = ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      targets: [Linear]\n"
                 "      ignore: [lm_head]\n      scheme: FP8_DYNAMIC\n"
                 "      kv_cache_scheme: {num_bits: 8, type: float, symmetric: true, strategy: tensor}\n")
    response = api.post("/api/jobs", {"model": no_cache, "recipe": {"yaml": yaml_text}, "evaluation": evaluation},
                        format="json")
    assert response.status_code == 400 and "no attention KV cache" in errors(response)["recipe.kv_cache_scheme"]
    assert not Job.objects.exists() and sent == []


def test_without_a_table_the_schemes_still_come(api, tmp_path, monkeypatch):
    monkeypatch.setattr(recommend, "TABLE_PATH", tmp_path / "none.json")
    data = api.get(URL, {"model": "demo"}).json()
    assert data["budgets"] == [] and data["benchmark"] is None and len(data["schemes"]) > 10


def test_the_moe_family_is_walked_too(api, table, settings, tmp_path):
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    data = api.get(URL, {"model": _model_dir(tmp_path, "mixtral", tiny_family_config("mixtral"))}).json()
    assert data["architecture"] == "MixtralForCausalLM" and data["schemes"]
