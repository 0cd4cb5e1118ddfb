"""POST /api/jobs with local models of other families: pre-flight walks them (MoE included) and
refuses, naming the field, a model the engine cannot walk or a recipe that targets nothing."""
import pytest
import torch
from safetensors.torch import save_file

from jobs.models import Job
from tests.tiny import tiny_family_config

from .conftest import errors

pytestmark = pytest.mark.django_db

URL = "/api/jobs"
EVALUATION = {"tasks": ["wikitext2_ppl"], "windows": 2}


def _model_dir(root, name, config):
    path = root / name
    config.save_pretrained(path)
    save_file({"placeholder": torch.zeros(1)}, str(path / "model.safetensors"))  # pre-flight reads the config only
    return str(path)


def test_it_accepts_a_moe_model_and_refuses_a_recipe_that_targets_nothing(api, sent, settings, tmp_path):
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    model = _model_dir(tmp_path, "mixtral", tiny_family_config("mixtral"))
    ok = api.post(URL, {"model": model, "recipe": {"preset": "FP8_DYNAMIC"}, "evaluation": EVALUATION}, format="json")
    assert ok.status_code == 201, ok.content
    nothing = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {
        "targets": ["re:.*experts\\.gate_up_proj$"], "ignore": ["lm_head"], "scheme": "FP8_DYNAMIC"}}}}
    refused = api.post(URL, {"model": model, "recipe": {"recipe": nothing}, "evaluation": EVALUATION},
                       format="json")
    assert refused.status_code == 400
    message = errors(refused)["recipe.stages[0].modifiers[0].targets"]
    assert "matches no Linear" in message and "block_sparse_moe.experts.0.w1" in message
    assert Job.objects.count() == 1 and len(sent) == 1


def test_it_refuses_a_model_whose_experts_it_cannot_split(api, sent, settings, tmp_path):
    from transformers import NemotronHConfig  # its experts have no gate projection (up, then down)

    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    config = NemotronHConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=256)
    model = _model_dir(tmp_path, "nemotron-h", config)
    response = api.post(URL, {"model": model, "recipe": {"preset": "FP8_DYNAMIC"}, "evaluation": EVALUATION},
                        format="json")
    assert response.status_code == 400
    assert "without a gated MLP" in errors(response)["model"]
    assert not Job.objects.exists() and sent == []


def test_calibrate_all_experts_is_a_calibration_option_checked_by_type(api, sent, settings, tmp_path):
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    model = _model_dir(tmp_path, "qwen3-moe", tiny_family_config("qwen3_moe"))
    body = {"model": model, "recipe": {"preset": "W4A16", "group_size": 32}, "evaluation": EVALUATION,
            "calibration": {"samples": 16, "seqlen": 64, "calibrate_all_experts": "maybe"}}
    refused = api.post(URL, body, format="json")
    assert refused.status_code == 400 and "calibration.calibrate_all_experts" in errors(refused)
    body["calibration"]["calibrate_all_experts"] = True
    ok = api.post(URL, body, format="json")
    assert ok.status_code == 201, ok.content
    assert Job.objects.get(pk=ok.json()["id"]).calibration["calibrate_all_experts"] is True
