"""Recipes in llm-compressor 0.14's YAML shapes through the REST API and the new-job form: accepted
and stored (the pre-flight walks them against the model), or refused naming the field."""
import pytest
import torch
from django.urls import reverse
from safetensors.torch import save_file

from jobs.models import Job
from tests.tiny import tiny_family_config

from .conftest import errors

pytestmark = pytest.mark.django_db

URL = "/api/jobs"
EVALUATION = {"tasks": ["wikitext2_ppl"], "windows": 2}
CALIBRATION = {"samples": 16, "seqlen": 128}

# what llm-compressor writes as recipe.yaml next to a checkpoint (one default stage, serializer fields)
SAVED_BY_LLM_COMPRESSOR = """\
default_stage:
  default_modifiers:
    SmoothQuantModifier: {requires_calibration_data: true, smoothing_strength: 0.8, algorithm: smoothquant}
    GPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: W8A8
      bypass_divisibility_checks: false
      requires_calibration_data: true
      block_size: 128
      dampening_frac: 0.01
      actorder: static
      batched_quantization: auto
"""

MOE_NVFP4 = """\
quant_stage:
  run_type: oneshot
  quant_modifiers:
    QuantizationModifier:
      targets: Linear
      scheme: NVFP4
      ignore: [lm_head, 're:.*mlp.gate$']
"""


def test_the_api_stores_a_recipe_saved_by_llm_compressor(api, sent):
    body = {"model": "demo", "recipe": {"yaml": SAVED_BY_LLM_COMPRESSOR}, "calibration": CALIBRATION,
            "evaluation": EVALUATION}
    response = api.post(URL, body, format="json")
    assert response.status_code == 201, response.content
    job = Job.objects.get(pk=response.json()["id"])
    stages = job.recipe["stages"]["default_stage"]["default_modifiers"]
    assert list(stages) == ["SmoothQuantModifier", "GPTQModifier"]
    assert stages["GPTQModifier"]["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    assert stages["GPTQModifier"]["batched_quantization"] == "auto" and sent == [str(job.id)]


def test_the_api_runs_the_preflight_on_a_moe_recipe(api, sent, settings, tmp_path):
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    model = tmp_path / "qwen3-moe"
    tiny_family_config("qwen3_moe").save_pretrained(model)
    save_file({"placeholder": torch.zeros(1)}, str(model / "model.safetensors"))
    body = {"model": str(model), "recipe": {"yaml": MOE_NVFP4}, "evaluation": EVALUATION}
    response = api.post(URL, body, format="json")
    assert response.status_code == 201, response.content
    # W4A16's groups of 128 do not tile this model's 64-wide inputs: refused by the pre-flight, by field
    refused = api.post(URL, {**body, "recipe": {"yaml": MOE_NVFP4.replace("NVFP4", "W4A16")}}, format="json")
    assert refused.status_code == 400 and "128" in errors(refused)["recipe.group_size"]
    mx = api.post(URL, {**body, "recipe": {"yaml": MOE_NVFP4.replace("NVFP4", "MXFP4")}}, format="json")
    assert mx.status_code == 201, mx.content
    fp6 = api.post(URL, {**body, "recipe": {"yaml": MOE_NVFP4.replace("NVFP4", "MXFP6A16")}}, format="json")
    assert fp6.status_code == 400 and "FP6" in errors(fp6)["recipe.yaml.stages[0].modifiers[0].scheme"]
    assert Job.objects.count() == 2 and len(sent) == 2


def test_the_new_job_form_accepts_an_llm_compressor_yaml(client, owner, sent):
    client.force_login(owner)
    yaml_text = ("sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier: {sparsity: 0.5, mask_structure: "
                 "'2:4', targets: ['re:model.layers.\\d+$'], sequential_update: false}\n"
                 "quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {targets: Linear, scheme: FP8_DYNAMIC, "
                 "ignore: [lm_head]}\n")
    response = client.post(reverse("job-new"), {
        "model": "demo", "preset": "FP8_DYNAMIC", "group_size": "", "recipe_yaml": yaml_text,
        "calibration_samples": 16, "calibration_seqlen": 128, "eval_windows": 2})
    job = Job.objects.get()
    assert response.status_code == 302 and str(job.id) in response["Location"]
    assert list(job.recipe["stages"]) == ["sparsity_stage", "quant_stage"] and sent == [str(job.id)]


def test_an_llm_compressor_smoothquant_recipe_on_an_moe_model_is_queued_or_refused_by_its_mapping(
        api, sent, settings, tmp_path):
    """llm-compressor 0.14's own W8A8 test recipe maps the MLP's norm to gate_proj/up_proj. On Qwen3-MoE the
    experts have those names: queued (the router, which reads the norm too, is added to the mapping when the
    job runs). On Mixtral they are w1/w3: the mapping matches nothing, and is refused by its index (llm-compressor
    skips it without a word)."""
    recipe = ("quant_stage:\n  quant_modifiers:\n    SmoothQuantModifier:\n      smoothing_strength: 0.8\n"
              "      mappings:\n      - - ['re:.*q_proj', 're:.*k_proj', 're:.*v_proj']\n"
              "        - re:.*input_layernorm\n      - - ['re:.*gate_proj', 're:.*up_proj']\n"
              "        - re:.*post_attention_layernorm\n"
              "    GPTQModifier: {ignore: [lm_head], scheme: W8A8, targets: [Linear]}\n")
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    for family, status in (("qwen3_moe", 201), ("mixtral", 400)):
        model = tmp_path / family
        tiny_family_config(family).save_pretrained(model)
        save_file({"placeholder": torch.zeros(1)}, str(model / "model.safetensors"))
        response = api.post(URL, {"model": str(model), "recipe": {"yaml": recipe}, "evaluation": EVALUATION},
                            format="json")
        assert response.status_code == status, response.content
    message = errors(response)["recipe.stages[0].modifiers[0].mappings[1]"]  # pre-flight fields: recipe.<path>
    assert "matches no set of modules" in message and "experts.0.w1" in message
    assert Job.objects.count() == 1 and len(sent) == 1
