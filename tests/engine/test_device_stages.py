"""The job's device for every stage: where the dense model is evaluated, that it is freed before the
compressed model loads, what the results record; the WikiText-2 baseline cache.

CUDA cannot run here: the placement is exercised on the "meta" and "cpu" devices, and the one GPU
call (free memory) is replaced where a test needs a device that is too small.
"""
import gc
import weakref

import torch

from compression.model_io import placement as placement_mod
from compression.model_io.placement import place_for_eval
from tests.tiny import save_tiny_llama, tiny_llama


def test_a_model_that_fits_moves_whole_to_the_device():
    model = tiny_llama(vocab=512)
    placed = place_for_eval(model, "meta")  # free memory unknown on meta: it fits
    assert placed.as_dict() == {"device": "meta", "mode": "whole"}
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_a_model_that_does_not_fit_keeps_its_layers_home_and_moves_the_rest(monkeypatch):
    model = tiny_llama(vocab=512)
    monkeypatch.setattr(placement_mod, "device_free_bytes", lambda device: 1024)  # the GPU edge: a tiny device
    placed = place_for_eval(model, "meta")
    assert placed.mode == "layer-by-layer" and placed.device == "meta"
    assert model.model.embed_tokens.weight.is_meta and model.lm_head.weight.is_meta and model.model.norm.weight.is_meta
    assert all(p.device.type == "cpu" for p in model.model.layers.parameters())
    assert len(placed.handles) == 2 * len(model.model.layers)


def test_layer_by_layer_evaluation_gives_the_same_logits_and_restore_undoes_it():
    model = tiny_llama(vocab=512)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(ids).logits
    visits = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: visits.append(i))
    placed = place_for_eval(model, "cpu", free_bytes=1)  # forced: the CPU standing in for a small GPU
    assert placed.mode == "layer-by-layer"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, whole)
    assert visits == [0, 1]
    placed.restore(model)
    assert all(not layer._forward_pre_hooks or len(layer._forward_pre_hooks) == 1 for layer in model.model.layers)
    assert not any(layer._forward_hooks for layer in model.model.layers)
    assert place_for_eval(model, "cpu").as_dict() == {"device": "cpu", "mode": "cpu"}


def test_the_free_memory_question_goes_to_the_gpu_only_for_cuda(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (3 * 2 ** 30, 8 * 2 ** 30))
    assert placement_mod.device_free_bytes(torch.device("cuda", 0)) == 3 * 2 ** 30 and len(asked) == 1
    assert placement_mod.device_free_bytes(torch.device("meta")) is None and len(asked) == 1


def _spec(tmp_path, cache_dir):
    from django.conf import settings

    from compression.recipe import Recipe

    models = tmp_path / "models"
    model_dir = save_tiny_llama(models / "tiny")
    return {"job_id": "t", "model": str(model_dir), "recipe": Recipe.from_preset("FP8_DYNAMIC").to_dict(),
            "allowed_roots": [str(models)], "cache_dir": str(cache_dir),
            "evaluation": {"tasks": ["wikitext2_ppl"], "windows": 1, "seqlen": 32, "speed": False},
            "data_dir": settings.COMPRESSOR_DATA_DIR, "device": "cpu"}


def test_a_job_records_each_stages_device_frees_the_dense_model_and_caches_the_wikitext_baseline(
        tmp_path, monkeypatch):
    from compression.model_io import loading
    from compression import pipeline

    dense = {}
    real_load, real_compressed = loading.load_model, pipeline._compressed_model_for_eval

    def load_and_remember(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        dense["ref"] = weakref.ref(loaded.model)
        return loaded

    def compressed_after_free(*args, **kwargs):
        gc.collect()
        dense["alive_at_compressed_load"] = dense["ref"]() is not None
        return real_compressed(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model", load_and_remember)
    monkeypatch.setattr(pipeline, "_compressed_model_for_eval", compressed_after_free)
    spec = _spec(tmp_path, tmp_path / "cache")
    first = pipeline.run_job(spec, tmp_path / "out1")
    assert dense["alive_at_compressed_load"] is False
    assert first["devices"] == {"baseline_eval": {"device": "cpu", "mode": "cpu"}, "dense_speed": None,
                                "compress": "cpu", "compressed_eval": "cpu", "compressed_speed": None}
    baseline = first["evaluation"]["baseline"]["wikitext2_ppl"]["perplexity"]
    assert baseline["cache_hit"] is False
    assert first["evaluation"]["compressed"]["wikitext2_ppl"]["perplexity"]["cache_hit"] is False
    assert list((tmp_path / "cache").glob("*.json"))

    second = pipeline.run_job(spec, tmp_path / "out2")
    again = second["evaluation"]["baseline"]["wikitext2_ppl"]["perplexity"]
    assert again["cache_hit"] is True and again["value"] == baseline["value"]
    assert second["evaluation"]["compressed"]["wikitext2_ppl"]["perplexity"]["cache_hit"] is False
