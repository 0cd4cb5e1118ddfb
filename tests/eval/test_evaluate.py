"""evaluate(): real lm-eval on the in-memory model, the result shape, the cache, clear errors."""
from __future__ import annotations

import json
import math
import os

import pytest

from compression.evaluation import harness as evaluation
from compression.evaluation.harness import EvalError, EvalSettings, evaluate, parse_results

IDENTITY = {"name": "tiny-llama", "revision": "seed0", "fingerprint": "abc123"}


@pytest.fixture(scope="module")
def first_run(tiny, data_dir, tmp_path_factory):
    """One real run of two local tasks with a cache directory; later tests reuse it."""
    model, tokenizer = tiny
    cache = tmp_path_factory.mktemp("eval-cache")
    events: list[dict] = []
    settings = EvalSettings(tasks=["arc_easy", "wikitext"], limit=8, batch_size=4, seed=7)
    result = evaluate(model, tokenizer, settings, data_dir=data_dir, cache_dir=cache,
                      model_identity=IDENTITY, progress=events.append)
    return result, settings, cache, events


def test_it_scores_local_tasks_with_lm_eval_and_reports_the_sources(first_run):
    result, _, _, _ = first_run
    arc, wiki = result["tasks"]["arc_easy"], result["tasks"]["wikitext"]
    assert arc["source"] == wiki["source"] == "local"
    assert arc["lm_eval_task"] == "local_arc_easy" and wiki["lm_eval_task"] == "local_wikitext2"
    assert 0.0 <= arc["metrics"]["acc"]["value"] <= 1.0
    assert arc["metrics"]["acc"]["stderr"] is not None and arc["metrics"]["acc"]["higher_is_better"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        value = wiki["metrics"][metric]["value"]
        assert math.isfinite(value) and value > 0 and not wiki["metrics"][metric]["higher_is_better"]


def test_it_records_every_setting_that_changes_a_score(first_run):
    result, settings, _, _ = first_run
    s = result["settings"]
    for key in ("num_fewshot", "limit", "batch_size", "apply_chat_template", "add_bos_token", "seed", "data_source"):
        assert s[key] == getattr(settings, key)
    assert s["sources"] == {"arc_easy": "local", "wikitext": "local"}
    assert s["data_files"]["arc_easy"]["bytes"] > 0 and len(s["data_files"]["arc_easy"]["sha256"]) == 64
    assert s["model_identity"]["name"] == "tiny-llama"
    assert result["lm_eval_version"] == "0.4.13"
    assert result["cache_hit"] is False and result["seconds"] > 0
    json.dumps(result)  # JSON-able as promised


def test_it_reports_progress_events(first_run):
    _, _, _, events = first_run
    assert events and all(e["stage"] == "eval" and e["message"] for e in events)
    assert events[-1].get("done") is True
    # lm-eval's own progress: requests done out of the total, per request type, never past it
    counted = [e for e in events if "requests_total" in e]
    assert {e["request_type"] for e in counted} == {"loglikelihood", "loglikelihood_rolling"}
    assert all(0 <= e["requests_done"] <= e["requests_total"] for e in counted)
    arc = [e for e in counted if e["request_type"] == "loglikelihood"]
    assert arc[0]["requests_done"] == 0 and arc[-1]["requests_done"] == arc[-1]["requests_total"] >= 8 * 4
    assert counted[-1]["requests_done"] == counted[-1]["requests_total"]


def test_a_second_call_with_the_same_key_comes_from_the_cache_without_running_lm_eval(
        first_run, tiny, data_dir, monkeypatch):
    result, settings, cache, _ = first_run

    def must_not_run(*args, **kwargs):
        raise AssertionError("lm-eval ran although the result was cached")

    monkeypatch.setattr(evaluation, "_run_lm_eval", must_not_run)
    again = evaluate(*tiny, settings, data_dir=data_dir, cache_dir=cache, model_identity=IDENTITY)
    assert again["cache_hit"] is True
    for name, task in result["tasks"].items():
        assert again["tasks"][name]["metrics"] == task["metrics"]
        assert again["tasks"][name]["cache_hit"] is True


def _fake_raw(lm_task: str, acc: float) -> dict:
    return {"results": {lm_task: {"alias": lm_task, "acc,none": acc, "acc_stderr,none": 0.1}},
            "higher_is_better": {lm_task: {"acc": True}}, "n-samples": {lm_task: {"effective": 5}}}


def test_changed_settings_or_model_revision_miss_the_cache(first_run, tiny, data_dir, monkeypatch):
    _, settings, cache, _ = first_run
    calls: list[list[str]] = []

    def fake_run(model, tokenizer, lm_tasks, settings, include_path, use_defaults):
        calls.append(lm_tasks)
        return _fake_raw(lm_tasks[0], 0.5)

    monkeypatch.setattr(evaluation, "_run_lm_eval", fake_run)
    changed = EvalSettings(tasks=["arc_easy"], limit=9, batch_size=4, seed=7)
    assert evaluate(*tiny, changed, data_dir=data_dir, cache_dir=cache, model_identity=IDENTITY)["cache_hit"] is False
    other = {**IDENTITY, "revision": "seed1"}
    evaluate(*tiny, EvalSettings(tasks=["arc_easy"], limit=8, batch_size=4, seed=7), data_dir=data_dir,
             cache_dir=cache, model_identity=other)
    assert calls == [["local_arc_easy"], ["local_arc_easy"]]


def test_only_the_tasks_missing_from_the_cache_are_run(first_run, tiny, data_dir, monkeypatch):
    _, settings, cache, _ = first_run
    calls: list[list[str]] = []

    def fake_run(model, tokenizer, lm_tasks, settings, include_path, use_defaults):
        calls.append(lm_tasks)
        return _fake_raw(lm_tasks[0], 0.25)

    monkeypatch.setattr(evaluation, "_run_lm_eval", fake_run)
    wider = EvalSettings(tasks=["arc_easy", "piqa"], limit=8, batch_size=4, seed=7)
    result = evaluate(*tiny, wider, data_dir=data_dir, cache_dir=cache, model_identity=IDENTITY)
    assert calls == [["local_piqa"]]
    assert result["cache_hit"] is False
    assert result["tasks"]["arc_easy"]["cache_hit"] is True and result["tasks"]["piqa"]["cache_hit"] is False


def test_without_a_model_identity_nothing_is_cached(tiny, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "_run_lm_eval", lambda m, t, lm_tasks, *a, **k: _fake_raw(lm_tasks[0], 0.5))
    evaluate(*tiny, EvalSettings(tasks=["piqa"], limit=2), data_dir=data_dir, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("task", ["mmlu", "truthfulqa_mc2"])
def test_a_task_without_local_data_offline_names_the_task_and_the_offline_ones(task, tiny, data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalError) as err:
        evaluate(*tiny, EvalSettings(tasks=["arc_easy", task]), data_dir=data_dir)
    message = str(err.value)
    assert repr(task) in message and "arc_easy" in message and "wikitext" in message


def test_data_source_local_refuses_a_task_with_no_local_file(tiny, data_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(EvalError, match="'mmlu'.*data_source is 'local'"):
        evaluate(*tiny, EvalSettings(tasks=["mmlu"], data_source="local"), data_dir=data_dir)


def test_auto_uses_the_hub_for_tasks_without_local_data_when_online(data_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    sources = evaluation.resolve_sources(["arc_easy", "mmlu", "leaderboard"], "auto", data_dir)
    assert sources == {"arc_easy": ("local", "local_arc_easy"), "mmlu": ("hub", "mmlu"),
                       "leaderboard": ("hub", "leaderboard")}
    assert evaluation.resolve_sources(["arc_easy"], "hub", data_dir) == {"arc_easy": ("hub", "arc_easy")}


@pytest.mark.parametrize("bad", [
    {"tasks": []}, {"data_source": "web"}, {"limit": 0}, {"limit": 1.5}, {"num_fewshot": -1}, {"batch_size": 0},
    {"max_length": 4},
])
def test_it_rejects_settings_lm_eval_would_misread(bad):
    with pytest.raises(EvalError):
        EvalSettings(**bad).validate()


def test_hub_offline_switches_the_hub_off_and_restores_it(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    with evaluation.hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and huggingface_hub.constants.HF_HUB_OFFLINE == before


def test_parse_results_keeps_filter_names_and_drops_non_metrics():
    raw = {"results": {"t": {"alias": "t", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                             "exact_match,flexible-extract": 0.25, "exact_match_stderr,flexible-extract": "N/A"}},
           "higher_is_better": {"t": {"exact_match": True}}}
    assert parse_results(raw, "t") == {
        "exact_match,strict-match": {"value": 0.5, "stderr": 0.1, "higher_is_better": True},
        "exact_match,flexible-extract": {"value": 0.25, "stderr": None, "higher_is_better": True},
    }
