"""Where calibration and evaluation data come from, on any install.

Every piece of data resolves, in this order, to
1. the data directory (``COMPRESSOR_DATA_DIR``) when one is configured and holds the file;
2. the Hugging Face Hub when the worker is online (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` unset);
3. for calibration only, the small set built into this package (``builtin:chat-v1``,
   ``compression/builtin_data/``, CC0), so a calibrating job works on an air-gapped install.

`eval_options` lists every evaluation task the form offers with whether this install can run it,
where the data would come from and, when it cannot, why. `check_eval_tasks` is the same decision
for a submitted job, so a job that needs data the worker does not have is refused at submission.

`hub_load_dataset` is the one function that downloads a dataset from the Hub for our own code
(WikiText-2 perplexity, Hub calibration sets); the tests point it at local fixtures.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PERPLEXITY_TASK = "wikitext2_ppl"
BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin_data"
BUILTIN_SETS = {"chat-v1": "calibration_chat_v1.jsonl"}  # builtin:<name> -> file in BUILTIN_DIR
BUILTIN_CALIBRATION = "builtin:chat-v1"
DATA_DIR_CALIBRATION = "calibration/self_instruct_seed_tasks.jsonl"
# Neural Magic's calibration set, used by the seed W4A16 card; chat records ("messages").
HUB_CALIBRATION = "neuralmagic/LLM_compression_calibration:train"
WIKITEXT_FILE = "wikitext2/wiki.test.raw"
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")  # repo, config, split
# The Open LLM Leaderboard v1 set of the seed cards, with its few-shot counts.
OPEN_LLM_V1: dict[str, int] = {"hellaswag": 10, "arc_challenge": 25, "gsm8k": 5, "mmlu": 5,
                               "winogrande": 5, "truthfulqa_mc2": 0}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class DataUnavailable(ValueError):
    """Data a job needs that this install cannot provide; the message says what to configure."""


# ----------------------------------------------------------------------------- online / offline

def offline_reason() -> str | None:
    """``"HF_HUB_OFFLINE=1"`` (the variable that switches the Hub off) or None when the Hub is allowed."""
    for var in OFFLINE_VARS:
        value = os.environ.get(var, "").strip()
        if value.upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var}={value}"
    return None


def hub_online() -> bool:
    return offline_reason() is None


def hub_load_dataset(path: str, name: str | None = None, *, split: str) -> Any:
    """Download one split of a Hub dataset (a ``datasets.Dataset``), never anything local: without a
    config ``name`` through datasets' remote-only ``hf://datasets/<id>`` form; with one (WikiText's
    ``wikitext-2-raw-v1``) by id, refused if that id exists as a path on this machine. Refused while
    the Hub is switched off."""
    if not hub_online():
        raise DataUnavailable(f"dataset {path!r} is on the Hugging Face Hub, but the Hub is switched off "
                              f"({offline_reason()})")
    from datasets import load_dataset

    if name is None:
        return load_dataset(f"hf://datasets/{path}", split=split)
    if os.path.lexists(path):
        raise DataUnavailable(f"{path!r} names a path on this machine, not only a Hub dataset; refusing to load it")
    return load_dataset(path, name, split=split)


def _where(data_dir: str | os.PathLike | None) -> str:
    return f"the data directory {data_dir}" if data_dir else "the data directory (COMPRESSOR_DATA_DIR is not set)"


# ----------------------------------------------------------------------------- calibration

def is_builtin(source: str) -> bool:
    return isinstance(source, str) and source.startswith(BUILTIN_PREFIX)


def builtin_path(source: str) -> Path:
    """The file of a built-in calibration set; DataUnavailable naming the sets that exist."""
    name = source[len(BUILTIN_PREFIX):] if is_builtin(source) else source
    if name not in BUILTIN_SETS:
        raise DataUnavailable(f"{source!r} is not a built-in calibration set; built in: "
                              + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_SETS))
    return BUILTIN_DIR / BUILTIN_SETS[name]


def builtin_records(source: str) -> list[dict]:
    path = builtin_path(source)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def default_calibration_source(data_dir: str | os.PathLike | None, *, online: bool | None = None) -> str:
    """The calibration set a job gets when it names none: the data directory's file, else the Hub
    default when the worker is online, else the built-in set."""
    if data_dir and (Path(data_dir) / DATA_DIR_CALIBRATION).is_file():
        return DATA_DIR_CALIBRATION
    if hub_online() if online is None else online:
        return HUB_CALIBRATION
    return BUILTIN_CALIBRATION


def calibration_suggestions(data_dir: str | os.PathLike | None, *, online: bool | None = None) -> list[tuple[str, str]]:
    """(source, label) pairs the form suggests: data-directory files, the built-in set, the Hub default."""
    online = hub_online() if online is None else online
    options: list[tuple[str, str]] = []
    root = Path(data_dir) if data_dir else None
    if root is not None and (root / "calibration").is_dir():
        for path in sorted((root / "calibration").iterdir()):
            if path.suffix in (".jsonl", ".json", ".txt"):
                options.append((f"calibration/{path.name}", "data directory"))
    for name, file in BUILTIN_SETS.items():
        options.append((BUILTIN_PREFIX + name, "built in, 43 chat records, CC0"))
    if online:
        options.append((HUB_CALIBRATION, "Hugging Face Hub"))
        options.append(("HuggingFaceH4/ultrachat_200k:train_sft", "Hugging Face Hub"))
    return options


# ----------------------------------------------------------------------------- WikiText-2

def wikitext2_test_text(data_dir: str | os.PathLike | None) -> tuple[str, str]:
    """(text, where it came from) of the raw WikiText-2 test split: the data directory's
    ``wikitext2/wiki.test.raw``, else the Hub's ``wikitext-2-raw-v1`` test split. Lines are joined
    with blank lines (the GPTQ papers' convention) in both cases."""
    if data_dir and (Path(data_dir) / WIKITEXT_FILE).is_file():
        path = Path(data_dir) / WIKITEXT_FILE
        lines = path.read_text(encoding="utf-8").split("\n")
        return "\n\n".join(lines), f"data directory ({WIKITEXT_FILE})"
    if not hub_online():
        raise DataUnavailable(
            f"WikiText-2 perplexity needs {WIKITEXT_FILE} in {_where(data_dir)} or the Hugging Face Hub, "
            f"which is switched off ({offline_reason()})")
    repo, config, split = WIKITEXT_HUB
    rows = hub_load_dataset(repo, config, split=split)
    lines = [str(t).rstrip("\n") for t in rows["text"]]
    return "\n\n".join(lines), f"Hugging Face Hub ({repo} {config}, {split})"


# ----------------------------------------------------------------------------- evaluation tasks

@dataclass(frozen=True)
class EvalOption:
    """One evaluation task as the form offers it."""

    name: str
    available: bool
    source: str | None  # "local" | "hub" | None (unavailable)
    detail: str  # what would run, e.g. "Hub, 10-shot" or "data directory slice: ..."
    reason: str = ""  # why it cannot run here (empty when available)

    @property
    def label(self) -> str:
        return f"{self.name} — {self.detail}" if self.available else f"{self.name} — unavailable: {self.reason}"


def task_names() -> list[str]:
    """Every task the form knows: perplexity, the Open LLM v1 set, then the other local tasks."""
    from compression.evaluation.lm_eval_tasks import LOCAL_TASKS

    return [PERPLEXITY_TASK, *OPEN_LLM_V1, *(n for n in LOCAL_TASKS if n not in OPEN_LLM_V1)]


def eval_option(name: str, data_dir: str | os.PathLike | None, *, online: bool | None = None) -> EvalOption:
    from compression.evaluation.lm_eval_tasks import LOCAL_TASKS, resolve_local_name

    online = hub_online() if online is None else online
    offline = offline_reason() or "the Hub is switched off"
    if name == PERPLEXITY_TASK:
        if data_dir and (Path(data_dir) / WIKITEXT_FILE).is_file():
            return EvalOption(name, True, "local", "WikiText-2 raw test, data directory")
        if online:
            return EvalOption(name, True, "hub", f"WikiText-2 raw test ({WIKITEXT_HUB[0]} {WIKITEXT_HUB[1]}), Hub")
        return EvalOption(name, False, None, "WikiText-2 perplexity",
                          f"needs {WIKITEXT_FILE} in {_where(data_dir)} or the Hub ({offline})")
    local = resolve_local_name(name)
    if local and data_dir and (Path(data_dir) / LOCAL_TASKS[local].relpath).is_file():
        note = LOCAL_TASKS[local].note
        return EvalOption(name, True, "local", "offline copy, data directory" + (f" ({note})" if note else ""))
    shots = OPEN_LLM_V1.get(name)
    if online:
        return EvalOption(name, True, "hub", "lm-eval task from the Hub" + (f", {shots}-shot" if shots is not None else ""))
    if local:
        return EvalOption(name, False, None, "lm-eval task",
                          f"needs {LOCAL_TASKS[local].relpath} in {_where(data_dir)} or the Hub ({offline})")
    return EvalOption(name, False, None, "lm-eval task", f"needs the Hugging Face Hub ({offline})")


def eval_options(data_dir: str | os.PathLike | None, *, online: bool | None = None) -> list[EvalOption]:
    return [eval_option(name, data_dir, online=online) for name in task_names()]


def default_eval_tasks(data_dir: str | os.PathLike | None) -> list[str]:
    """What a job evaluates when it names no task: WikiText-2 perplexity when it can run, else nothing."""
    return [PERPLEXITY_TASK] if eval_option(PERPLEXITY_TASK, data_dir).available else []


def check_eval_tasks(tasks: list[str], data_source: str, data_dir: str | os.PathLike | None) -> None:
    """Raise DataUnavailable for the first task this install cannot run (missing data, Hub switched
    off, or a name lm-eval does not know), naming the task, what is missing and what can run."""
    from compression.evaluation.harness import EvalError, resolve_sources

    if PERPLEXITY_TASK in tasks:
        option = eval_option(PERPLEXITY_TASK, data_dir)
        if not option.available:
            raise DataUnavailable(f"{PERPLEXITY_TASK}: {option.reason}. {_runnable(data_dir)}")
    lm_tasks = [t for t in tasks if t != PERPLEXITY_TASK]
    if not lm_tasks:
        return
    try:
        sources = resolve_sources(lm_tasks, data_source, data_dir or None)
    except EvalError as exc:
        raise DataUnavailable(str(exc)) from None
    for name, (source, lm_name) in sources.items():
        if source == "hub" and not known_lm_eval_task(lm_name):
            raise DataUnavailable(f"{lm_name!r} is not a task lm-eval {_lm_eval_version()} defines; "
                                  f"use a standard name such as {', '.join(OPEN_LLM_V1)} "
                                  "(`lm-eval ls tasks` lists them all)")


def _runnable(data_dir: str | os.PathLike | None) -> str:
    names = [o.name for o in eval_options(data_dir) if o.available]
    return f"Tasks this install can run: {', '.join(names) or 'none'}."


def fewshot_for(task: str, num_fewshot: int | None) -> int | None:
    """The few-shot count a Hub task runs with: the job's setting when given, else the Open LLM v1
    count for the six tasks of that set, else the task's own default (None)."""
    return num_fewshot if num_fewshot is not None else OPEN_LLM_V1.get(task)


# ----------------------------------------------------------------------------- lm-eval task names

def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


@functools.lru_cache(maxsize=1)
def _scanned_task_names() -> frozenset[str]:
    """Every word of lm-eval's task YAML files and every file/folder stem: a superset (bar a few
    dozen generated names) of its task names, read in ~2 s instead of indexing every task (~20 s)."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval.tasks")
    root = Path(spec.origin).parent if spec and spec.origin else None
    names: set[str] = set()
    if root is None:
        return frozenset()
    word = re.compile(r"[A-Za-z0-9_][\w\-.:]*")
    for path in root.rglob("*"):
        names.add(path.stem)
        if path.suffix in (".yaml", ".yml"):
            names.update(word.findall(path.read_text(encoding="utf-8", errors="ignore")))
    return frozenset(names)


@functools.lru_cache(maxsize=1)
def _indexed_task_names() -> frozenset[str]:
    """lm-eval's own index of task names (slow: not used at submission; bench/outside.py compares it
    with the scan). Memoised on disk per lm-eval version when COMPRESSOR_CACHE_DIR is set."""
    cache_dir = os.environ.get("COMPRESSOR_CACHE_DIR")
    cache = Path(cache_dir) / f"lm_eval_task_names-{_lm_eval_version()}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            return frozenset(json.loads(cache.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
    from lm_eval.tasks import TaskManager

    names = frozenset(TaskManager().all_tasks)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(sorted(names)), encoding="utf-8")
            tmp.replace(cache)
        except OSError as exc:
            log.warning("could not cache lm-eval's task names in %s: %s", cache, exc)
    return names


def known_lm_eval_task(name: str) -> bool:
    """Whether lm-eval knows a task or group called ``name``, by the quick scan only: lm-eval's own
    index takes 20-60 s, too long for a web request (bench/outside.py). The scan misses a few dozen
    generated group names (of 14,683 tasks in lm-eval 0.4.13), which are refused at submission."""
    return name in _scanned_task_names()
