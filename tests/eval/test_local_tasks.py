"""The nine offline lm-eval tasks: YAML written with absolute paths, and each one really runs."""
from __future__ import annotations

import math

import pytest
import yaml

from compression.evaluation import lm_eval_tasks
from compression.evaluation.harness import EvalSettings, evaluate

EXPECTED_METRICS = {
    "hellaswag": {"acc", "acc_norm"}, "arc_easy": {"acc", "acc_norm"}, "arc_challenge": {"acc", "acc_norm"},
    "piqa": {"acc", "acc_norm"}, "winogrande": {"acc"}, "boolq": {"acc"},
    "lambada_openai": {"perplexity", "acc"},
    "gsm8k": {"exact_match,strict-match", "exact_match,flexible-extract"},
    "wikitext": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
}


class _FunctionTagLoader(yaml.SafeLoader):
    """Reads `!function` tags as plain strings so the YAML can be inspected without lm-eval."""


_FunctionTagLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def test_it_writes_one_yaml_per_task_with_absolute_data_paths(tmp_path, data_dir):
    names = lm_eval_tasks.available_local_tasks(data_dir)
    assert sorted(names) == sorted(EXPECTED_METRICS)
    lm_eval_tasks.write_task_dir(names, data_dir, tmp_path)
    for name in names:
        spec = lm_eval_tasks.LOCAL_TASKS[name]
        doc = yaml.load((tmp_path / f"{spec.task}.yaml").read_text(), Loader=_FunctionTagLoader)
        assert doc["task"] == spec.task and doc["dataset_path"] == "json"
        (path,) = doc["dataset_kwargs"]["data_files"].values()
        assert path.startswith("/") and path.endswith(spec.relpath)
        assert doc[f"{spec.split}_split"] == spec.split
        assert {m["metric"] for m in doc["metric_list"]} == {m.split(",")[0] for m in EXPECTED_METRICS[name]}
    wikitext = yaml.load((tmp_path / "local_wikitext2.yaml").read_text(), Loader=_FunctionTagLoader)
    assert wikitext["process_results"].endswith("preprocess_wikitext.process_results")


def test_it_indexes_every_local_task_in_lm_evals_task_manager(tmp_path, data_dir):
    from lm_eval.tasks import TaskManager

    lm_eval_tasks.write_task_dir(list(EXPECTED_METRICS), data_dir, tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert {lm_eval_tasks.LOCAL_TASKS[n].task for n in EXPECTED_METRICS} <= set(manager.all_tasks)


def test_all_nine_local_tasks_run_on_a_tiny_model_and_report_their_metrics(tiny, data_dir):
    model, tokenizer = tiny
    result = evaluate(model, tokenizer, EvalSettings(tasks=list(EXPECTED_METRICS), limit=3, batch_size=4),
                      data_dir=data_dir)
    assert set(result["tasks"]) == set(EXPECTED_METRICS)
    for name, expected in EXPECTED_METRICS.items():
        task = result["tasks"][name]
        assert task["source"] == "local" and task["samples"] == 3
        assert set(task["metrics"]) == expected, name
        for metric, m in task["metrics"].items():
            value = m["value"]
            if "perplexity" in metric or metric == "bits_per_byte":
                assert value is not None and math.isfinite(value) and value > 0, (name, metric)
                assert m["higher_is_better"] is False
            else:
                assert 0.0 <= value <= 1.0, (name, metric)
                assert m["higher_is_better"] is True


@pytest.mark.parametrize("alias, canonical", [("local_arc_easy", "arc_easy"), ("wikitext2", "wikitext"),
                                              ("wikitext", "wikitext"), ("mmlu", None)])
def test_it_maps_user_task_names_to_local_tasks(alias, canonical):
    assert lm_eval_tasks.resolve_local_name(alias) == canonical
