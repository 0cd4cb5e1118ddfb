"""A recipe with a distillation fine-tune stage: accepted when sound, refused before queueing with
the field named when it cannot run (no sparsity stage, dataset too small, budget over the worker's memory)."""
import pytest

from jobs.models import Job

from .conftest import errors

pytestmark = pytest.mark.django_db

URL = "/api/jobs"
DATA = "calibration/self_instruct_seed_tasks.jsonl"
SPARSE = {"sparsity_stage": {"sparsity_modifiers": {"SparseGPTModifier": {"sparsity": 0.5, "mask_structure": "2:4"}}}}
QUANT = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"scheme": "FP8_DYNAMIC"}}}}


def _body(**finetune):
    ft = {"finetune_stage": {"finetune_modifiers": {"DistillationFinetuneModifier": {
        "dataset": DATA, "tokens": 4096, "batch_size": 1, "seq_len": 512, **finetune}}}}
    return {"model": "demo", "recipe": {"recipe": {**SPARSE, **ft, **QUANT}},
            "calibration": {"samples": 16, "seqlen": 128}, "evaluation": {"tasks": ["wikitext2_ppl"], "windows": 2}}


def test_a_prune_finetune_quantize_recipe_is_queued(api, sent):
    response = api.post(URL, _body(), format="json")
    assert response.status_code == 201, response.content
    job = Job.objects.get()
    assert "DistillationFinetuneModifier" in job.recipe["stages"]["finetune_stage"]["finetune_modifiers"]
    assert sent == [str(job.id)]


@pytest.mark.parametrize("body, field, words", [
    ({"model": "demo", "recipe": {"recipe": {"finetune_stage": {"finetune_modifiers": {
        "DistillationFinetuneModifier": {"dataset": DATA, "tokens": 4096}}}, **QUANT}}},
     "recipe.stages[0].modifiers[0]", "preceding sparsity stage"),
    (_body(tokens=10_000_000), "recipe.stages[1].modifiers[0].tokens", "holds at most"),
    (_body(dataset="../../etc/passwd"), "recipe.stages[1].modifiers[0].dataset", ""),
    (_body(dataset="upload:999999"), "recipe.stages[1].modifiers[0].dataset", "none of your uploaded"),
])
def test_bad_fine_tune_input_is_refused_before_queueing(api, sent, body, field, words):
    response = api.post(URL, body, format="json")
    assert response.status_code == 400, response.content
    assert words in errors(response)[field]
    assert not Job.objects.exists() and sent == []


def test_a_budget_over_the_workers_memory_is_refused(api, sent, settings):
    settings.COMPRESSOR_WORKER_MEMORY_GB = 1
    response = api.post(URL, _body(batch_size=32, seq_len=2048, tokens=65536), format="json")
    assert response.status_code == 400, response.content
    message = errors(response)["recipe.stages[1].modifiers[0].gradient_checkpointing"]
    assert "GiB" in message and "worker has 1.0 GiB" in message
    assert not Job.objects.exists() and sent == []
