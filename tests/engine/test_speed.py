"""Speed and memory in a job: measured for the dense and the compressed model, stored, carded."""
from __future__ import annotations

import math

import pytest
import torch

from compression.evaluation.speed import measure_speed, speed_summary, weight_bytes
from tests.tiny import save_tiny_llama, tiny_llama


def test_measure_speed_gives_finite_rates_and_the_weights_in_memory():
    model = tiny_llama()
    row = measure_speed(model, prompt_tokens=16, decode_tokens=4, repeats=2)
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
    assert math.isfinite(row["prefill_tok_s"]) and math.isfinite(row["decode_tok_s"])
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert params <= weight_bytes(model) <= params + sum(b.numel() * b.element_size() for b in model.buffers())
    assert row["weights_gb"] == round(weight_bytes(model) / 1e9, 6)
    assert row["peak_mem_gb"] is None  # CPU: no resettable high-water mark
    assert model.training is False and (row["prompt_tokens"], row["decode_tokens"]) == (16, 4)


def test_measure_speed_refuses_empty_runs():
    with pytest.raises(ValueError, match="at least 1"):
        measure_speed(tiny_llama(), decode_tokens=0)


def test_speed_summary_reports_ratios_only_when_both_sides_exist():
    dense = {"prefill_tok_s": 100.0, "decode_tok_s": 10.0, "peak_mem_gb": None, "weights_gb": 1.0}
    packed = {"prefill_tok_s": 50.0, "decode_tok_s": 30.0, "peak_mem_gb": None, "weights_gb": 0.25}
    summary = speed_summary(dense, packed, "cpu", "W4A16")
    assert summary["speedup"] == 3.0 and summary["prefill_speedup"] == 0.5 and summary["weights_ratio"] == 4.0
    assert [r["name"] for r in summary["rows"]] == ["dense (baseline)", "W4A16"]
    assert summary["device"].startswith("CPU")
    assert speed_summary(None, packed, "cpu", "x") is None


def run_tiny_job(tmp_path, preset: str, speed: bool, progress=lambda event: None) -> dict:
    from django.conf import settings

    from compression.pipeline import run_job
    from compression.recipe import Recipe

    models = tmp_path / "models"
    model_dir = save_tiny_llama(models / "tiny")
    recipe = Recipe.from_preset(preset, **({"group_size": 64} if "W4A16" in preset else {}))
    spec = {"job_id": "t", "model": str(model_dir), "recipe": recipe.to_dict(), "allowed_roots": [str(models)],
            "calibration": {"source": "unused", "samples": 2, "seqlen": 16},
            "evaluation": {"tasks": ["wikitext2_ppl"], "windows": 1, "seqlen": 32, "speed": speed},
            "data_dir": settings.COMPRESSOR_DATA_DIR, "device": "cpu"}
    torch.manual_seed(0)
    return run_job(spec, tmp_path / "out", progress=progress)


def test_a_job_measures_dense_and_compressed_speed_and_cards_it(tmp_path, monkeypatch):
    from compression import pipeline

    monkeypatch.setattr(pipeline, "measure_speed", lambda model: measure_speed(
        model, prompt_tokens=8, decode_tokens=2, repeats=1))
    results = run_tiny_job(tmp_path, "FP8_DYNAMIC", speed=True)
    speed = results["speed"]
    dense, compressed = speed["rows"]
    assert dense["name"] == "dense (baseline)" and compressed["name"].startswith("FP8_DYNAMIC via compressed runtime")
    # fp32 Linears -> FP8 weights (+ per-channel scales): 3/4 of their bytes leave memory; the
    # embedding and lm_head (kept dense) are most of this tiny model, so compare the saving itself
    linear_bytes = sum(m.weight.numel() * 4 for name, m in tiny_llama().named_modules()
                       if isinstance(m, torch.nn.Linear) and name != "lm_head")
    saved = (dense["weights_gb"] - compressed["weights_gb"]) * 1e9
    assert 0.7 * linear_bytes <= saved <= 0.75 * linear_bytes + 2e3, (saved, linear_bytes)
    assert speed["weights_ratio"] > 1
    assert speed["speedup"] == round(compressed["decode_tok_s"] / dense["decode_tok_s"], 3)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "### Speed" in card and "| dense (baseline) |" in card and "Weights in memory" in card


def test_a_job_can_skip_the_speed_measurement(tmp_path, monkeypatch):
    from compression import pipeline

    def never(model):
        raise AssertionError("speed measured although the job said no")

    monkeypatch.setattr(pipeline, "measure_speed", never)
    results = run_tiny_job(tmp_path, "FP8_DYNAMIC", speed=False)
    assert results["speed"] is None
    assert "### Speed" not in (tmp_path / "out" / "README.md").read_text()


def test_a_model_that_cannot_be_timed_costs_the_job_its_speed_table_not_its_results(tmp_path, monkeypatch):
    from compression import pipeline

    def broken(model):
        raise RuntimeError("this architecture has no KV cache")

    monkeypatch.setattr(pipeline, "measure_speed", broken)
    events: list[dict] = []
    results = run_tiny_job(tmp_path, "FP8_DYNAMIC", speed=True, progress=events.append)
    assert results["speed"] is None and results["evaluation"]["metrics"]
    warnings = [e["message"] for e in events if e.get("level") == "warning"]
    assert any("no KV cache" in w for w in warnings), warnings


def test_the_measurement_stays_inside_the_models_positions():
    model = tiny_llama()
    model.config.max_position_embeddings = 20
    row = measure_speed(model, prompt_tokens=128, decode_tokens=8, repeats=1)
    assert row["prompt_tokens"] + row["decode_tokens"] <= 20 and row["decode_tokens"] == 8
