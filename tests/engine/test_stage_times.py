"""Every job reports the wall time of each stage it ran: in its results, on its page and in its card."""
from __future__ import annotations

import torch

from compression.pipeline import STAGE_TIMES, stage_times
from tests.tiny import save_tiny_llama


def _run(tmp_path, evaluation: dict, preset: str = "W4A16") -> dict:
    from django.conf import settings

    from compression.pipeline import run_job
    from compression.recipe import Recipe

    models = tmp_path / "models"
    model_dir = save_tiny_llama(models / "tiny")
    recipe = Recipe.from_preset(preset, **({"group_size": 64} if preset == "W4A16" else {}))
    spec = {"job_id": "t", "model": str(model_dir), "recipe": recipe.to_dict(), "allowed_roots": [str(models)],
            "calibration": {"source": "calibration/self_instruct_seed_tasks.jsonl", "samples": 2, "seqlen": 16},
            "evaluation": evaluation, "data_dir": settings.COMPRESSOR_DATA_DIR, "device": "cpu"}
    torch.manual_seed(0)
    return run_job(spec, tmp_path / "out")


def test_stage_times_follow_the_job_order_and_end_with_the_total():
    timings = {"total_s": 9.0, "compress_s": 2.0, "load_s": 1.0, "export_s": 0.5}
    rows = stage_times(timings)
    assert [r["key"] for r in rows] == ["load_s", "compress_s", "export_s", "total_s"]
    assert rows[1] == {"key": "compress_s", "stage": dict(STAGE_TIMES)["compress_s"], "seconds": 2.0}


def test_a_job_without_evaluation_or_speed_still_times_every_stage_it_ran(tmp_path):
    results = _run(tmp_path, {"tasks": [], "speed": False})
    keys = [r["key"] for r in results["stage_times"]]
    assert keys == ["load_s", "baseline_eval_s", "calibration_s", "compress_s", "export_s", "compressed_load_s",
                    "compressed_eval_s", "card_s", "total_s"]
    assert results["speed"] is None
    assert results["evaluation"]["baseline"] == {} and results["evaluation"]["compressed"] == {}
    seconds = {r["key"]: r["seconds"] for r in results["stage_times"]}
    assert all(v >= 0 for v in seconds.values())
    assert seconds["total_s"] >= seconds["compress_s"] + seconds["export_s"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "### Time per stage" in card and "| compress |" in card and "| total (up to this card) |" in card


def test_a_job_with_speed_times_both_speed_measurements(tmp_path, monkeypatch):
    from compression import pipeline
    from compression.evaluation.speed import measure_speed

    monkeypatch.setattr(pipeline, "measure_speed", lambda model: measure_speed(
        model, prompt_tokens=8, decode_tokens=2, repeats=1))
    results = _run(tmp_path, {"tasks": ["wikitext2_ppl"], "windows": 1, "seqlen": 32, "speed": True},
                   preset="FP8_DYNAMIC")
    keys = [r["key"] for r in results["stage_times"]]
    assert "baseline_speed_s" in keys and "compressed_speed_s" in keys and "calibration_s" not in keys
