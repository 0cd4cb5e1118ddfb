"""Evaluation backend selection on CPU (the vLLM run itself needs a GPU worker with the vLLM image)."""
from __future__ import annotations

import pytest

from compression.card.model_card import build_model_card
from compression.evaluation.backend import BackendError, number_sources, select_backend
from compression.pipeline import run_job
from compression.recipe import Recipe
from tests.eval.facts import facts
from tests.hub_fixtures import go_online, point_hub_at_fixtures
from tests.tiny import save_tiny_llama


def test_a_cpu_worker_keeps_todays_path_and_says_why():
    choice = select_backend("cpu", "auto")
    assert choice.name == "hf" and choice.reason == "the worker evaluates on CPU"


@pytest.mark.parametrize("cuda, vllm, name, reason", [
    (True, True, "vllm", "CUDA worker with vLLM installed"),
    (True, False, "hf", "vLLM is not installed in this worker's environment (use the vLLM worker image)"),
    (False, True, "hf", "no CUDA device is visible"),
])
def test_vllm_is_chosen_only_on_a_cuda_worker_that_has_it(cuda, vllm, name, reason):
    choice = select_backend("cuda", "auto", cuda=cuda, vllm=vllm)  # the GPU is the one thing replaced here
    assert (choice.name, choice.reason) == (name, reason)


def test_hf_can_be_forced_and_a_forced_vllm_without_it_names_the_setting(monkeypatch):
    assert select_backend("cuda", "hf", cuda=True, vllm=True).name == "hf"
    with pytest.raises(BackendError) as caught:
        select_backend("cpu", "vllm")
    assert "COMPRESSOR_EVAL_BACKEND=vllm" in str(caught.value) and "CPU" in str(caught.value)
    monkeypatch.setenv("COMPRESSOR_EVAL_BACKEND", "tpu")
    with pytest.raises(BackendError, match="must be one of auto, hf, vllm"):
        select_backend("cpu")


def test_each_number_names_the_engine_that_produced_it():
    cpu = number_sources(["wikitext2_ppl", "arc_easy"], select_backend("cpu", "auto"))
    assert cpu["wikitext2_ppl"]["compressed"] == "our perplexity loop on the compressed runtime (kernels/)"
    assert cpu["arc_easy"]["baseline"] == "transformers (lm-eval HFLM) on the dense model"
    assert "vllm" not in cpu["arc_easy"]
    gpu = number_sources(["arc_easy"], select_backend("cuda", "auto", cuda=True, vllm=True), ["arc_easy"])
    assert gpu["arc_easy"]["vllm"] == "lm-eval vLLM backend on the exported checkpoint"


def test_the_card_says_whether_the_checkpoint_loaded_in_vllm():
    loaded = build_model_card({**facts(), "vllm": {"load": {"loaded": True, "vllm_version": "0.33.0",
                                                             "gpu": "NVIDIA H200"}}})
    assert "Loaded in vLLM 0.33.0 on NVIDIA H200" in loaded
    cpu = build_model_card({**facts(), "vllm": {"backend": {"name": "hf", "reason": "the worker evaluates on CPU"}}})
    assert "Not loaded in vLLM by the compressing worker (the worker evaluates on CPU)" in cpu


def test_a_cpu_job_records_its_backend_and_the_source_of_every_number(tmp_path, monkeypatch):
    """No data directory, worker online: WikiText-2 comes from the Hub (its download pointed at a fixture)."""
    monkeypatch.delenv("COMPRESSOR_EVAL_BACKEND", raising=False)
    go_online(monkeypatch)
    calls = point_hub_at_fixtures(monkeypatch)
    model_dir = save_tiny_llama(tmp_path / "m")
    spec = {"model": str(model_dir), "allowed_roots": [str(tmp_path)], "device": "cpu", "data_dir": "",
            "recipe": Recipe.from_preset("FP8_DYNAMIC").to_dict(),
            "evaluation": {"tasks": ["wikitext2_ppl"], "windows": 2, "seqlen": 16, "speed": False}}
    results = run_job(spec, tmp_path / "out")
    assert ("Salesforce/wikitext", "wikitext-2-raw-v1", "test") in calls
    assert results["evaluation"]["baseline"]["_perplexity"] == {"source": "hub"}
    assert results["evaluation"]["backend"] == {"name": "hf", "reason": "the worker evaluates on CPU"}
    assert results["evaluation"]["vllm"] is None
    assert results["evaluation"]["number_sources"]["wikitext2_ppl"]["compressed"] == \
        "our perplexity loop on the compressed runtime (kernels/)"
    assert "Not loaded in vLLM by the compressing worker (the worker evaluates on CPU)" in results["model_card"]


def test_a_job_forced_onto_vllm_on_a_cpu_worker_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_EVAL_BACKEND", "vllm")
    spec = {"model": "demo", "device": "cpu", "recipe": Recipe.from_preset("FP8_DYNAMIC").to_dict()}
    with pytest.raises(BackendError):
        run_job(spec, tmp_path / "out")
    assert not list(tmp_path.iterdir())  # nothing written
