"""A standard lm-eval task by its own name, from the Hub (its download pointed at local fixtures), with
the Open LLM v1 few-shot count (a job's own num_fewshot wins: compression.data_sources.fewshot_for).
One test only: lm-eval indexes all of its ~15k task definitions for every Hub run (~20 s here)."""
from __future__ import annotations

from compression.evaluation.harness import EvalSettings, evaluate
from tests.hub_fixtures import go_online, point_lm_eval_at_fixtures


def test_hellaswag_runs_as_lm_evals_own_task_with_its_ten_shots(tiny, monkeypatch):
    go_online(monkeypatch)
    calls = point_lm_eval_at_fixtures(monkeypatch)
    result = evaluate(*tiny, EvalSettings(tasks=["hellaswag"], limit=2, data_source="hub"), data_dir=None)
    task = result["tasks"]["hellaswag"]
    assert calls and set(calls) == {"Rowan/hellaswag"}
    assert task["source"] == "hub" and task["lm_eval_task"] == "hellaswag" and task["num_fewshot"] == 10
    assert task["samples"] == 2 and 0.0 <= task["metrics"]["acc"]["value"] <= 1.0
    assert "acc_norm" in task["metrics"]

