"""A recipe with a distillation fine-tune stage: accepted when sound, refused before queueing with
the field named when it cannot run (no sparsity stage, dataset too small, budget over the worker's memory)."""
import json
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from jobs.models import Job, JobEvent

from .conftest import errors

pytestmark = pytest.mark.django_db

URL = "/api/jobs"
DATA = "calibration/self_instruct_seed_tasks.jsonl"
SPARSE = {"sparsity_stage": {"sparsity_modifiers": {"SparseGPTModifier": {"sparsity": 0.5, "mask_structure": "2:4"}}}}
QUANT = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"scheme": "FP8_DYNAMIC"}}}}


def _body(**finetune):
    args = {"dataset": DATA, "tokens": 4096, "batch_size": 1, "seq_len": 512, **finetune}
    ft = {"finetune_stage": {"finetune_modifiers": {"DistillationFinetuneModifier": {
        k: v for k, v in args.items() if v is not None}}}}
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


def _file_tokens() -> int:
    """The packed training tokens the worker gets from DATA with the demo model's tokenizer."""
    from django.conf import settings

    from compression.algorithms.distill import record_token_ids
    from compression.calibration import _local_records
    from tests.tiny import demo_tokenizer

    records = _local_records(Path(settings.COMPRESSOR_DATA_DIR) / DATA)
    return sum(len(record_token_ids(r, demo_tokenizer())) for r in records)


def test_a_local_dataset_is_counted_as_the_worker_packs_it(api, sent):
    """UTF-8 bytes would let this budget through (about 3x the real count); the model's tokenizer
    refuses exactly the budgets the worker would fail on, naming the budget field."""
    from django.conf import settings

    from compression.algorithms.distill import load_training_windows
    from compression.errors import CalibrationError
    from tests.tiny import demo_tokenizer

    fits = _file_tokens() // 512  # windows of 512 tokens the file fills
    too_many = _body(tokens=(fits + 1) * 512)
    response = api.post(URL, too_many, format="json")
    assert response.status_code == 400, response.content
    message = errors(response)["recipe.stages[1].modifiers[0].tokens"]
    assert f"holds {_file_tokens():,} tokens with the model's tokenizer" in message
    assert f"needs {(fits + 1) * 512:,}" in message
    response = api.post(URL, _body(tokens=None, steps=fits + 1), format="json")
    assert response.status_code == 400 and "recipe.stages[1].modifiers[0].steps" in errors(response)
    assert not Job.objects.exists() and sent == []
    with pytest.raises(CalibrationError):  # the worker agrees: one window more than the file holds
        load_training_windows(DATA, demo_tokenizer(), windows=fits + 1, seq_len=512,
                              data_dir=settings.COMPRESSOR_DATA_DIR)
    assert load_training_windows(DATA, demo_tokenizer(), windows=fits, seq_len=512,
                                 data_dir=settings.COMPRESSOR_DATA_DIR).shape == (fits, 512)
    response = api.post(URL, _body(tokens=fits * 512), format="json")
    assert response.status_code == 201, response.content
    assert len(sent) == 1 and not JobEvent.objects.filter(stage="queued").exists()  # nothing left unchecked


def _upload(api, records) -> str:
    content = "\n".join(json.dumps(r) for r in records).encode()
    response = api.post("/api/calibration-files", {"file": SimpleUploadedFile("train.jsonl", content)},
                        format="multipart")
    assert response.status_code == 201, response.content
    return response.json()["source"]


def test_an_uploaded_dataset_too_small_for_the_budget_is_refused(api, sent, upload_root):
    source = _upload(api, [{"text": f"Training sample {i}: the quick brown fox jumps over the lazy dog again."}
                           for i in range(20)])  # ~1,600 bytes, ~400 tokens
    field = "recipe.stages[1].modifiers[0].steps"
    response = api.post(URL, _body(dataset=source, tokens=None, steps=8, seq_len=512), format="json")
    assert response.status_code == 400 and "holds at most" in errors(response)[field]  # under the byte bound
    response = api.post(URL, _body(dataset=source, tokens=None, steps=16, seq_len=64), format="json")
    assert response.status_code == 400, response.content  # 1,024 tokens: under the bytes, over the tokens
    assert "with the model's tokenizer" in errors(response)[field]
    assert not Job.objects.exists() and sent == []
    response = api.post(URL, _body(dataset=source, tokens=None, steps=2, seq_len=64), format="json")
    assert response.status_code == 201, response.content


def test_a_hub_dataset_is_queued_with_a_note_that_the_worker_checks_its_size(api, sent):
    response = api.post(URL, _body(dataset="HuggingFaceH4/ultrachat_200k:train_sft", tokens=512_000),
                        format="json")
    assert response.status_code == 201, response.content
    (note,) = JobEvent.objects.filter(job=Job.objects.get(), stage="queued")
    assert "Hub dataset" in note.message and "512,000 tokens" in note.message and "worker checks" in note.message


def test_without_the_models_tokenizer_the_byte_bound_decides_and_the_log_says_so(api, sent, settings, tmp_path):
    from tests.tiny import tiny_llama

    tiny_llama(layers=2, vocab=1024, hidden=64, intermediate=128).save_pretrained(tmp_path / "no-tokenizer")
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    body = {**_body(tokens=(_file_tokens() // 512 + 1) * 512), "model": str(tmp_path / "no-tokenizer")}
    response = api.post(URL, body, format="json")
    assert response.status_code == 201, response.content  # the worker will count it exactly
    (note,) = JobEvent.objects.filter(job=Job.objects.get(), stage="queued")
    assert "upper bound" in note.message and "not with the model's tokenizer" in note.message
    response = api.post(URL, {**body, "recipe": _body(tokens=10_000_000)["recipe"]}, format="json")
    assert response.status_code == 400 and "holds at most" in errors(response)["recipe.stages[1].modifiers[0].tokens"]


def test_a_yaml_recipe_fine_tuning_before_any_pruning_is_refused(api, sent):
    yaml_recipe = f"""
finetune_stage:
  finetune_modifiers:
    DistillationFinetuneModifier: {{dataset: {DATA}, tokens: 4096}}
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier: {{sparsity: 0.5, mask_structure: "2:4"}}
"""
    response = api.post(URL, {**_body(), "recipe": {"yaml": yaml_recipe}}, format="json")
    assert response.status_code == 400, response.content
    assert "preceding sparsity stage" in errors(response)["recipe.yaml.stages[0].modifiers[0]"]
    assert not Job.objects.exists() and sent == []
