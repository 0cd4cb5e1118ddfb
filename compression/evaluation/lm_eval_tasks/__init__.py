"""Offline lm-eval task definitions built from the benchmark files in a data directory.

Each entry of `LOCAL_TASKS` describes one lm-eval YAML task (our own wording of the built-in
task, pointed at a local JSONL file; see shared/data/LM_EVAL_LOCAL_TASKS.md). `write_task_dir`
renders the YAML files with absolute data paths into a folder that is then handed to
`lm_eval.tasks.TaskManager(include_path=...)`. Paths are absolute because `datasets` resolves
relative `data_files` against the working directory, not the YAML's folder.

The two WikiText functions are not reimplemented: the YAML points `!function` at the
harness's own `lm_eval.tasks.wikitext.preprocess_wikitext` module, which lm-eval imports as a
normal module when no file of that name sits next to the YAML.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_WIKITEXT_MODULE = "lm_eval.tasks.wikitext.preprocess_wikitext"

_MC_METRICS = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
]
_ACC_ONLY = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ARC = {
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_choice": "{{choices.text}}",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "metric_list": _MC_METRICS,
}


@dataclass(frozen=True)
class LocalTask:
    """One offline task: the user-facing name, the lm-eval task name and its data file."""

    name: str  # what users type ("arc_easy")
    task: str  # lm-eval task name in our include folder ("local_arc_easy")
    relpath: str  # data file, relative to the data directory
    split: str  # "test" or "validation": the split name the file is loaded as
    config: dict[str, Any]  # remaining YAML keys
    functions: dict[str, str] = field(default_factory=dict)  # YAML key -> "module.function"
    note: str = ""  # how the local data differs from the Hub task, shown in results


LOCAL_TASKS: dict[str, LocalTask] = {t.name: t for t in [
    LocalTask("hellaswag", "local_hellaswag", "hellaswag/hellaswag_val_0000_0499.jsonl", "validation", {
        "output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_choice": "endings",
        "doc_to_target": "label", "metric_list": _MC_METRICS,
    }, note="validation records 0-499 only; context's last phrase not capitalised"),
    LocalTask("arc_easy", "local_arc_easy", "arc/arc_easy_test.jsonl", "test", _ARC,
              note="2,365 of 2,376 test questions (non-4-choice ones dropped)"),
    LocalTask("arc_challenge", "local_arc_challenge", "arc/arc_challenge_test_0000_0599.jsonl", "test", _ARC,
              note="test positions 0-599 only (597 questions)"),
    LocalTask("piqa", "local_piqa", "piqa/piqa_valid_labeled.jsonl", "validation", {
        "output_type": "multiple_choice", "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_choice": "{{[sol1, sol2]}}", "doc_to_target": "label", "metric_list": _MC_METRICS,
    }),
    LocalTask("winogrande", "local_winogrande", "winogrande/winogrande_xl_dev.jsonl", "validation", {
        # Partial scoring: the two filled-in contexts are the choices, the shared rest of the
        # sentence is the target, and doc_to_text renders the index of the right context.
        "output_type": "multiple_choice", "doc_to_text": "{{gold}}", "doc_to_choice": "context_options",
        "doc_to_target": "continuation", "metric_list": _ACC_ONLY,
    }),
    LocalTask("boolq", "local_boolq", "boolq/boolq_dev.jsonl", "validation", {
        "output_type": "multiple_choice", "doc_to_text": "{{query}}\nAnswer:", "doc_to_choice": "choices",
        "doc_to_target": "gold", "metric_list": _ACC_ONLY,
    }, note="passage carries a 'Passage: ' prefix the Hub prompt does not have"),
    LocalTask("lambada_openai", "local_lambada_openai", "lambada/lambada_openai_test.jsonl", "test", {
        "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    }),
    LocalTask("gsm8k", "local_gsm8k", "gsm8k/test.jsonl", "test", {
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        # No train split offline: few-shot examples would come from the test split itself.
        "num_fewshot": 0,
        "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                              "temperature": 0.0},
        "metric_list": [{
            "metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
            "ignore_case": True, "ignore_punctuation": False,
            "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
        }],
        "filter_list": [
            {"name": "strict-match", "filter": [
                {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [
                {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                {"function": "take_first"}]},
        ],
    }, note="0-shot: no train split offline, so a num_fewshot setting draws examples from the test split"),
    LocalTask("wikitext", "local_wikitext2", "wikitext2/wikitext2_test_pages.jsonl", "test", {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
    }, functions={"doc_to_target": f"{_WIKITEXT_MODULE}.wikitext_detokenizer",
                  "process_results": f"{_WIKITEXT_MODULE}.process_results"},
        note="62 articles rebuilt from the raw test split; may differ from the Hub copy in whitespace"),
]}

# Extra spellings users type for the same task.
ALIASES: dict[str, str] = {"wikitext2": "wikitext", "local_wikitext2": "wikitext",
                           **{t.task: t.name for t in LOCAL_TASKS.values()}}


def resolve_local_name(name: str) -> str | None:
    """The canonical local task name for `name` ("local_arc_easy" -> "arc_easy"), or None."""
    name = ALIASES.get(name, name)
    return name if name in LOCAL_TASKS else None


def available_local_tasks(data_dir: str | Path) -> list[str]:
    """The user-facing names of the local tasks whose data file exists under `data_dir`."""
    root = Path(data_dir)
    return [name for name, t in LOCAL_TASKS.items() if (root / t.relpath).is_file()]


def data_file_identity(data_dir: str | Path, name: str) -> dict[str, Any]:
    """Identity of a task's data file for cache keys: path, size and a hash of its content.

    Hashing (a few MB at most) is used rather than mtime so that copying the data directory
    to another machine keeps cached baselines valid.
    """
    path = (Path(data_dir) / LOCAL_TASKS[name].relpath).resolve()
    stat = path.stat()
    return {"file": LOCAL_TASKS[name].relpath, "bytes": stat.st_size,
            "sha256": _sha256(str(path), stat.st_size, stat.st_mtime_ns)}


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file; size and mtime are part of the memo key so an edited file is re-read."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def task_yaml(name: str, data_dir: str | Path) -> str:
    """The YAML text of local task `name` with the absolute path of its data file."""
    spec = LOCAL_TASKS[name]
    path = (Path(data_dir) / spec.relpath).resolve()
    doc: dict[str, Any] = {
        "task": spec.task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {spec.split: str(path)}},
        f"{spec.split}_split": spec.split,
        **json.loads(json.dumps(spec.config)),  # deep copy, plain types only
        "metadata": {"version": 1.0},
    }
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    # safe_dump cannot emit the `!function` tag; these lines are appended by hand.
    for key, target in spec.functions.items():
        text += f"{key}: !function {target}\n"
    return text


def write_task_dir(names: list[str], data_dir: str | Path, out_dir: str | Path) -> Path:
    """Write one YAML per local task in `names` into `out_dir`; returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / f"{LOCAL_TASKS[name].task}.yaml").write_text(task_yaml(name, data_dir), encoding="utf-8")
    return out
