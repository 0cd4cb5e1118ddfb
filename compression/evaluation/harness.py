"""Accuracy evaluation of an in-memory model with EleutherAI's lm-evaluation-harness.

`evaluate(model, tokenizer, settings, data_dir=...)` wraps the model object in lm-eval's
`HFLM` (no reload from disk, so the compressed model with our kernels is what gets scored)
and runs `lm_eval.simple_evaluate`.

Task sources, per task (`EvalSettings.data_source`):
* ``"local"``: the task built from the files in `data_dir` (see `compression.evaluation.lm_eval_tasks`),
  with the Hub switched off (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`) while it runs;
* ``"hub"``: lm-eval's built-in task (downloads its dataset; groups such as ``leaderboard``);
* ``"auto"``: local when `data_dir` has the task's file, otherwise hub. A task with neither
  raises `EvalError` naming the task and the tasks available offline.

Result (JSON-able)::

    {"tasks": {"arc_easy": {"source": "local", "lm_eval_task": "local_arc_easy",
                            "samples": 20, "note": "...", "cache_hit": False,
                            "metrics": {"acc": {"value": 0.25, "stderr": 0.1,
                                                "higher_is_better": True}, ...}}, ...},
     "settings": {... every EvalSettings field, sources, data files, model identity ...},
     "lm_eval_version": "0.4.13", "cache_hit": bool, "seconds": float}

Metric names are lm-eval's; a metric computed under a filter other than ``none`` keeps the
filter name (``"exact_match,strict-match"``) because GSM8K reports two.

Cache: with a `cache_dir` and a `model_identity`, each task's result is stored as JSON under
a key made of the model identity (name, revision, fingerprint, dtype), the settings that change
a score, the lm-eval version and, for local tasks, the data file's size and SHA-256. Without a
model identity nothing is cached (a model object alone cannot be identified reliably).
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from compression.evaluation import lm_eval_tasks
from compression.data_sources import fewshot_for

log = logging.getLogger(__name__)

DATA_SOURCES = ("auto", "local", "hub")
# Bootstrap resamples for the stderr of non-mean metrics (perplexity); accuracy stderrs are
# analytic. lm-eval's default of 100000 takes minutes on large tasks for no score change.
BOOTSTRAP_ITERS = 100
ProgressFn = Callable[[dict], None]


class EvalError(ValueError):
    """An evaluation request that cannot be run as asked; the message says what to change."""


@dataclass
class EvalSettings:
    """Everything that changes an lm-eval score, recorded with each result."""

    tasks: list[str] = field(default_factory=lambda: ["arc_easy"])
    num_fewshot: int | None = None  # None: each task's own default
    limit: int | float | None = None  # int: first N documents per task; float < 1: fraction
    batch_size: int | str = 1  # an int or "auto"
    apply_chat_template: bool = False
    add_bos_token: bool | None = None  # None: the tokenizer's default
    seed: int = 1234
    data_source: str = "auto"  # "auto" | "local" | "hub"
    # Context length lm-eval uses (rolling windows for wikitext, truncation elsewhere); None:
    # the model's own maximum. A shorter window is much faster on CPU and changes perplexities.
    max_length: int | None = None

    def validate(self) -> None:
        """Raise EvalError for a setting lm-eval would reject or misread."""
        if not self.tasks or not all(isinstance(t, str) and t.strip() for t in self.tasks):
            raise EvalError("tasks: give at least one task name, e.g. ['arc_easy', 'wikitext']")
        if self.data_source not in DATA_SOURCES:
            raise EvalError(f"data_source: {self.data_source!r} is not one of {', '.join(DATA_SOURCES)}")
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int) or self.num_fewshot < 0):
            raise EvalError("num_fewshot: must be None or an integer >= 0")
        if self.limit is not None and (isinstance(self.limit, bool) or not (
                (isinstance(self.limit, int) and self.limit >= 1)
                or (isinstance(self.limit, float) and 0.0 < self.limit <= 1.0))):
            raise EvalError("limit: must be None, an integer >= 1 or a fraction in (0, 1]")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 16):
            raise EvalError("max_length: must be None or an integer >= 16 (tokens)")
        if not (self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1)):
            raise EvalError("batch_size: must be an integer >= 1 or 'auto'")


def lm_eval_version() -> str:
    """The installed lm-eval version (without importing the heavy package)."""
    from importlib.metadata import version

    return version("lm_eval")


def resolve_sources(tasks: list[str], data_source: str, data_dir: str | Path | None) -> dict[str, tuple[str, str]]:
    """Map each requested task to (source, lm-eval task name).

    Raises EvalError for a task that has no local data when the source must be local, naming
    the task and the tasks that are available offline.
    """
    available = lm_eval_tasks.available_local_tasks(data_dir) if data_dir else []
    offline = _hub_disabled()
    out: dict[str, tuple[str, str]] = {}
    for raw in tasks:
        name = raw.strip()
        local = lm_eval_tasks.resolve_local_name(name)
        spec = lm_eval_tasks.LOCAL_TASKS[local] if local else None
        has_local = local is not None and local in available
        explicit_local = spec is not None and name == spec.task  # "local_arc_easy" names a file task
        if data_source == "hub" and not explicit_local:
            out[name] = ("hub", name)
        elif has_local:
            out[local] = ("local", spec.task)  # type: ignore[union-attr]
        elif data_source == "local" or offline or explicit_local:
            why = ("data_source is 'local'" if data_source == "local" or explicit_local
                   else "the Hugging Face Hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
            where = f"in {data_dir}" if data_dir else "(no data directory given)"
            raise EvalError(
                f"task {name!r}: no local data {where} and {why}. "
                f"Tasks available offline: {', '.join(available) or 'none'}.")
        else:
            out[name] = ("hub", name)
    return out


def _hub_disabled() -> bool:
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Switch the Hub off for `datasets` / `huggingface_hub` inside the block.

    Both libraries read the environment variables once at import time, so their module
    constants are patched as well and everything is restored afterwards.
    """
    saved_env = {v: os.environ.get(v) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    patched: list[tuple[Any, str, Any]] = []
    try:
        for var in saved_env:
            os.environ[var] = "1"
        import datasets.config
        import huggingface_hub.constants

        for mod, attr in ((huggingface_hub.constants, "HF_HUB_OFFLINE"),
                          (datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")):
            if hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, True)
        yield
    finally:
        for mod, attr, old in reversed(patched):
            setattr(mod, attr, old)
        for var, old in saved_env.items():
            if old is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = old


# ----------------------------------------------------------------------------- cache

def _model_key(model: Any, model_identity: dict | str | None) -> dict | None:
    if model_identity is None:
        return None
    ident = dict(model_identity) if isinstance(model_identity, dict) else {"name": str(model_identity)}
    try:
        ident.setdefault("dtype", str(next(model.parameters()).dtype))
    except (AttributeError, StopIteration, TypeError):
        pass
    return ident


def _task_cache_key(model_key: dict, task: str, source: str, settings: EvalSettings,
                    data_dir: str | Path | None, version: str) -> tuple[str, dict]:
    parts = {
        "model": model_key, "task": task, "source": source, "lm_eval_version": version,
        "num_fewshot": settings.num_fewshot, "limit": settings.limit, "batch_size": settings.batch_size,
        "apply_chat_template": settings.apply_chat_template, "add_bos_token": settings.add_bos_token,
        "seed": settings.seed, "max_length": settings.max_length,
    }
    if source == "hub":  # the Open LLM v1 tasks run with their own few-shot counts by default
        parts["num_fewshot"] = fewshot_for(task, settings.num_fewshot)
    if source == "local":
        parts["data"] = lm_eval_tasks.data_file_identity(data_dir, task)  # type: ignore[arg-type]
        parts["task_yaml"] = hashlib.sha256(
            lm_eval_tasks.task_yaml(task, "/").encode()).hexdigest()  # definition, not its path
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32], parts


def _cache_read(cache_dir: Path, key: str) -> dict | None:
    path = cache_dir / f"{key}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["result"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as exc:  # a corrupt entry is recomputed, not fatal
        log.warning("ignoring unreadable eval cache entry %s: %s", path, exc)
        return None


def _cache_write(cache_dir: Path, key: str, parts: dict, result: dict) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"key": parts, "result": result}, indent=1, default=str), encoding="utf-8")
    tmp.replace(cache_dir / f"{key}.json")  # atomic: readers never see half a file


# ----------------------------------------------------------------------------- results

def _finite_or_none(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def parse_results(raw: dict, lm_task: str) -> dict[str, dict]:
    """Turn lm-eval's `results[task]` entries ("acc,none", "acc_stderr,none") into our metrics."""
    entry = raw.get("results", {}).get(lm_task, {})
    hib = raw.get("higher_is_better", {}).get(lm_task, {})
    metrics: dict[str, dict] = {}
    for key, value in entry.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, _, filt = key.partition(",")
        value_f = _finite_or_none(value)
        if value_f is None and not isinstance(value, (int, float)):
            continue  # e.g. the "alias" entry
        name = metric if filt == "none" else f"{metric},{filt}"
        metrics[name] = {
            "value": value_f,
            "stderr": _finite_or_none(entry.get(f"{metric}_stderr,{filt}")),
            "higher_is_better": bool(hib.get(metric, True)),
        }
    return metrics


def _run_lm_eval(model: Any, tokenizer: Any, lm_tasks: list[str], settings: EvalSettings,
                 include_path: str | None, use_defaults: bool) -> dict:
    """One `simple_evaluate` call on the in-memory model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lm_eval.api.model import LM

    if isinstance(model, LM):  # already an lm-eval model, e.g. its vLLM backend (compression.evaluation.backend)
        lm = model
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size,
                  add_bos_token=settings.add_bos_token,
                  **({"max_length": settings.max_length} if settings.max_length else {}))
    attach_request_progress(lm, _PROGRESS.get())
    manager = TaskManager(include_path=include_path, include_defaults=use_defaults)
    unknown = [t for t in lm_tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s): {', '.join(unknown)}; see `lm-eval ls tasks` "
                        f"for names, or use a local task ({', '.join(lm_eval_tasks.LOCAL_TASKS)})")
    seed = settings.seed
    raw = lm_eval.simple_evaluate(
        model=lm, tasks=lm_tasks, num_fewshot=settings.num_fewshot, limit=settings.limit,
        batch_size=settings.batch_size, apply_chat_template=settings.apply_chat_template,
        task_manager=manager, log_samples=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=BOOTSTRAP_ITERS,
    )
    if raw is None:  # only returned on non-zero ranks in multi-process runs
        raise EvalError("lm-eval returned no results")
    return raw


_PROGRESS: contextvars.ContextVar[ProgressFn | None] = contextvars.ContextVar("eval_progress", default=None)
PROGRESS_INTERVAL_S = 1.0


def attach_request_progress(lm: Any, emit: ProgressFn | None) -> None:
    """Report lm-eval's progress as ``{"stage": "eval", "requests_done", "requests_total",
    "request_type"}`` events (at most one a second, and at the end of each request type).

    lm-eval hands each request type (loglikelihood, loglikelihood_rolling, generate_until) to the
    model in one call; the wrappers add its request count to the total, and the model's cache hook,
    which HFLM calls once per finished request, counts them done.
    """
    if emit is None:
        return
    from lm_eval.api.model import CacheHook

    state = {"done": 0, "total": 0, "type": "requests", "last": 0.0}

    def report(force: bool = False) -> None:
        now = time.monotonic()
        if force or now - state["last"] >= PROGRESS_INTERVAL_S:
            state["last"] = now
            emit({"stage": "eval", "requests_done": min(state["done"], state["total"]),
                  "requests_total": state["total"], "request_type": state["type"],
                  "message": f"lm-eval {state['done']}/{state['total']} {state['type']} requests"})

    class Counting(CacheHook):
        def add_partial(self, attr: str, req: Any, res: Any) -> None:
            super().add_partial(attr, req, res)
            state["done"] += 1
            report()

    lm.set_cache_hook(Counting(None))
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, name, None)
        if method is None:
            continue

        def counted(requests, *args, _method=method, _name=name, **kwargs):
            state["total"] += len(requests)
            state["type"] = _name
            report(force=True)
            out = _method(requests, *args, **kwargs)
            state["done"] = max(state["done"], state["total"])  # rolling requests report at the end
            report(force=True)
            return out

        setattr(lm, name, counted)


def _samples(raw: dict, lm_task: str) -> int | None:
    n = raw.get("n-samples", {}).get(lm_task, {})
    return n.get("effective") if isinstance(n, dict) else None


def evaluate(model: Any, tokenizer: Any, settings: EvalSettings, *, data_dir: str | Path | None,
             cache_dir: str | Path | None = None, model_identity: dict | str | None = None,
             progress: ProgressFn | None = None) -> dict:
    """Score `model` on `settings.tasks` with lm-eval; see the module docstring for the result.

    `model_identity` ({"name", "revision", "fingerprint"} or a string) enables the result cache
    in `cache_dir`. `progress(event)` receives ``{"stage": "eval", "message": str, ...}`` events.
    """
    settings.validate()
    _PROGRESS.set(progress)
    started = time.perf_counter()
    version = lm_eval_version()
    emit = progress or (lambda event: None)
    sources = resolve_sources(settings.tasks, settings.data_source, data_dir)

    cache = Path(cache_dir) if cache_dir else None
    model_key = _model_key(model, model_identity)
    tasks_out: dict[str, dict] = {}
    keys: dict[str, tuple[str, dict]] = {}
    for name, (source, _lm) in sources.items():
        if cache is None or model_key is None:
            continue
        keys[name] = _task_cache_key(model_key, name, source, settings, data_dir, version)
        hit = _cache_read(cache, keys[name][0])
        if hit is not None:
            tasks_out[name] = {**hit, "cache_hit": True}
            emit({"stage": "eval", "task": name, "message": f"{name}: cached result reused"})

    todo = {n: s for n, s in sources.items() if n not in tasks_out}
    if todo:
        _evaluate_missing(model, tokenizer, settings, todo, data_dir, tasks_out, emit)
        for name in todo:
            if name in keys and cache is not None:
                _cache_write(cache, keys[name][0], keys[name][1], tasks_out[name])
            tasks_out[name]["cache_hit"] = False

    result = {
        "tasks": {name: tasks_out[name] for name in sources},
        "settings": {
            **asdict(settings),
            "tasks": list(sources),
            "sources": {n: s for n, (s, _) in sources.items()},
            "lm_eval_tasks": {n: lm for n, (_, lm) in sources.items()},
            "data_files": {n: lm_eval_tasks.data_file_identity(data_dir, n)  # type: ignore[arg-type]
                           for n, (s, _) in sources.items() if s == "local"},
            "model_identity": model_key,
            "bootstrap_iters": BOOTSTRAP_ITERS,
        },
        "lm_eval_version": version,
        "cache_hit": not todo,
        "seconds": round(time.perf_counter() - started, 3),
    }
    emit({"stage": "eval", "message": f"evaluation done in {result['seconds']:.1f}s", "done": True})
    return result


def _by_fewshot(hub: dict[str, str], settings: EvalSettings) -> dict[int | None, dict[str, str]]:
    """Hub tasks grouped by the few-shot count they run with (one lm-eval call per count)."""
    groups: dict[int | None, dict[str, str]] = {}
    for name, lm in hub.items():
        groups.setdefault(fewshot_for(lm, settings.num_fewshot), {})[name] = lm
    return groups


def _evaluate_missing(model: Any, tokenizer: Any, settings: EvalSettings, todo: dict[str, tuple[str, str]],
                      data_dir: str | Path | None, tasks_out: dict[str, dict], emit: ProgressFn) -> None:
    """Run lm-eval for the tasks not found in the cache (local and hub tasks in separate calls)."""
    local = {n: lm for n, (s, lm) in todo.items() if s == "local"}
    hub = {n: lm for n, (s, lm) in todo.items() if s == "hub"}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        if local:
            emit({"stage": "eval", "message": f"running local tasks: {', '.join(local)}", "tasks": list(local)})
            with tempfile.TemporaryDirectory(prefix="compressor-tasks-") as tmp, hub_offline():
                lm_eval_tasks.write_task_dir(list(local), data_dir, tmp)  # type: ignore[arg-type]
                raw = _run_lm_eval(model, tokenizer, list(local.values()), settings, tmp, use_defaults=False)
            for name, lm in local.items():
                tasks_out[name] = {"source": "local", "lm_eval_task": lm, "samples": _samples(raw, lm),
                                   "note": lm_eval_tasks.LOCAL_TASKS[name].note,
                                   "metrics": parse_results(raw, lm)}
        for shots, group in _by_fewshot(hub, settings).items():
            hub_settings = replace(settings, num_fewshot=shots)
            emit({"stage": "eval", "message": f"running hub tasks: {', '.join(group)}", "tasks": list(group)})
            try:
                raw = _run_lm_eval(model, tokenizer, list(group.values()), hub_settings, None, use_defaults=True)
            except (ConnectionError, OSError) as exc:
                raise EvalError(
                    f"task(s) {', '.join(hub)}: could not load the dataset from the Hugging Face Hub "
                    f"({type(exc).__name__}: {exc}). Tasks available offline: "
                    f"{', '.join(lm_eval_tasks.available_local_tasks(data_dir) if data_dir else []) or 'none'}."
                ) from exc
            for name, lm in group.items():
                if lm not in raw.get("results", {}):
                    raise EvalError(f"task {name!r}: lm-eval returned no results for it")
                subtasks = [s for s in raw.get("group_subtasks", {}).get(lm, []) if s in raw["results"]]
                tasks_out[name] = {
                    "source": "hub", "lm_eval_task": lm, "samples": _samples(raw, lm), "note": "",
                    "num_fewshot": shots,
                    "metrics": parse_results(raw, lm),
                    # a group (e.g. "leaderboard") also reports each member task
                    "subtasks": {s: {"samples": _samples(raw, s), "metrics": parse_results(raw, s)}
                                 for s in subtasks},
                }
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
