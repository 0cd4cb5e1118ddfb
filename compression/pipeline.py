"""One compression job from start to finish: the single entry point of the Celery worker and the CLI.

    run_job(spec, out_dir, progress=..., should_stop=...) -> results (JSON-able dict)

Stages and their share of the progress bar:
    load 0-5%, baseline evaluation 5-20%, calibration data 20-25%, compression 25-75%
    (one decoder layer at a time), export 75-80%, compressed evaluation 80-97%, finish 97-100%.

Everything is written into a temporary sibling of `out_dir` that is renamed into place only when
the job completes; on any failure or cancellation the temporary directory is removed, so the
artifact root never holds partial output.
"""
from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]

STAGES = {  # stage -> (start, end) fraction of the whole job
    "load": (0.0, 0.05),
    "baseline": (0.05, 0.20),
    "calibration": (0.20, 0.25),
    "compress": (0.25, 0.75),
    "export": (0.75, 0.80),
    "evaluate": (0.80, 0.97),
    "finish": (0.97, 1.0),
}

DEFAULT_EVALUATION = {"tasks": ["wikitext2_ppl"], "windows": 8, "seqlen": 512}
DEFAULT_CALIBRATION = {"source": "calibration/self_instruct_seed_tasks.jsonl", "samples": 128, "seqlen": 512}


def resolve_device(name: str | None) -> str:
    if not name or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"COMPRESSOR_DEVICE={name} but no CUDA device is visible to this worker")
    return name


class _Stage:
    """Emits progress events with the job-wide fraction for one stage."""

    def __init__(self, progress: Progress, stage: str):
        self.progress, self.stage = progress, stage
        self.start, self.end = STAGES[stage]

    def __call__(self, message: str, within: float = 0.0, **extra: Any) -> None:
        fraction = self.start + (self.end - self.start) * min(max(within, 0.0), 1.0)
        self.progress({"stage": self.stage, "fraction": round(fraction, 4), "message": message, **extra})


def _engine_progress(progress: Progress) -> Progress:
    """Map the engine's per-layer events into the compress stage's share of the bar."""
    stage = _Stage(progress, "compress")

    def forward(event: dict) -> None:
        layers = max(int(event.get("layers") or 1), 1)
        layer = int(event.get("layer") or 0)
        done = layer + (1 if "module" not in event else 0.5)
        extra = {k: v for k, v in event.items() if k not in ("stage", "message", "fraction")}
        stage(event.get("message") or f"layer {layer + 1}/{layers}", done / layers, **extra)

    return forward


def run_job(spec: dict, out_dir: str | Path, *, progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict:
    """Run one job described by `spec` (see jobs.tasks.job_spec) and write its artifact to `out_dir`."""
    from .errors import JobCancelled
    from .loading import load_model
    from .recipe import Recipe

    progress = progress or (lambda event: None)
    should_stop = should_stop or (lambda: False)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"artifact directory {out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    timings: dict[str, float] = {}

    def check_stop() -> None:
        if should_stop():
            raise JobCancelled("cancelled by the user")

    recipe = Recipe.from_dict(spec["recipe"])
    evaluation = {**DEFAULT_EVALUATION, **(spec.get("evaluation") or {})}
    calibration_spec = {**DEFAULT_CALIBRATION, **(spec.get("calibration") or {})}
    device = resolve_device(spec.get("device"))
    data_dir = spec.get("data_dir") or ""
    try:
        tmp_dir.mkdir()
        load = _Stage(progress, "load")
        load(f"loading {spec['model']}")
        t0 = time.monotonic()
        loaded = load_model(spec["model"], allowed_roots=spec.get("allowed_roots") or (),
                            trust_remote_code=bool(spec.get("trust_remote_code")), device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
        timings["load_s"] = time.monotonic() - t0
        load("model loaded", 1.0)
        check_stop()

        baseline_stage = _Stage(progress, "baseline")
        baseline_stage("evaluating the uncompressed model")
        t0 = time.monotonic()
        baseline = _evaluate(model, tokenizer, evaluation, data_dir, cache_dir=spec.get("cache_dir"),
                             model_identity={**loaded.identity, "dtype": str(next(model.parameters()).dtype)},
                             should_stop=should_stop)
        timings["baseline_eval_s"] = time.monotonic() - t0
        baseline_stage("baseline evaluated", 1.0)
        check_stop()

        calibration: list[dict] = []
        if recipe.needs_calibration:
            from .calibration import load_calibration

            calib_stage = _Stage(progress, "calibration")
            calib_stage(f"tokenizing {calibration_spec['samples']} calibration samples")
            calibration = load_calibration(
                calibration_spec["source"], tokenizer, samples=int(calibration_spec["samples"]),
                seqlen=int(calibration_spec["seqlen"]), data_dir=data_dir)
            calib_stage(f"{len(calibration)} calibration samples ready", 1.0)

        from .export import export_checkpoint
        from .sequential import compress_model

        t0 = time.monotonic()
        report = compress_model(model, recipe, calibration, device=device,
                                progress=_engine_progress(progress), should_stop=should_stop)
        timings["compress_s"] = time.monotonic() - t0
        check_stop()

        export_stage = _Stage(progress, "export")
        export_stage("writing the compressed-tensors checkpoint")
        t0 = time.monotonic()
        exported = export_checkpoint(model, tokenizer, recipe, report, tmp_dir)
        timings["export_s"] = time.monotonic() - t0
        export_stage("checkpoint written", 1.0)
        check_stop()

        eval_stage = _Stage(progress, "evaluate")
        eval_stage("evaluating the compressed model")
        t0 = time.monotonic()
        compressed = _evaluate(model, tokenizer, evaluation, data_dir, should_stop=should_stop)
        timings["compressed_eval_s"] = time.monotonic() - t0
        eval_stage("compressed model evaluated", 1.0)
        check_stop()

        finish = _Stage(progress, "finish")
        dense_bytes = _dense_bf16_bytes(model)
        artifact_bytes = _dir_bytes(tmp_dir)
        weight_bytes = sum(p.stat().st_size for p in tmp_dir.glob("*.safetensors"))
        timings["total_s"] = time.monotonic() - started
        results = {
            "model": loaded.identity,
            "recipe": recipe.to_dict(),
            "recipe_summary": recipe.describe(),
            "device": device,
            "evaluation": {"settings": evaluation, "baseline": baseline, "compressed": compressed,
                           "metrics": _compare(baseline, compressed)},
            "size": {"dense_bf16_bytes": dense_bytes, "compressed_weight_bytes": weight_bytes,
                     "ratio": round(dense_bytes / weight_bytes, 3) if weight_bytes else None},
            "compression": _report_summary(report),
            "artifact": {"files": sorted(p.name for p in tmp_dir.iterdir()), "bytes": artifact_bytes,
                         "export": _jsonable(exported)},
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        finish("moving the artifact into place", 0.5)
        tmp_dir.rename(out_dir)
        finish("done", 1.0)
        return results
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _evaluate(model, tokenizer, evaluation: dict, data_dir: str, *, cache_dir: str | None = None,
              model_identity: dict | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """{task: {metric: {"value", "higher_is_better", ...}}} plus "_lm_eval" with lm-eval's own record.

    `wikitext2_ppl` is our quick token-level WikiText-2 perplexity; every other task runs through
    lm-eval (compression.evaluation) on the model object in memory. With `cache_dir` and
    `model_identity` (the baseline), lm-eval results are cached and reused across jobs.
    """
    from .perplexity import wikitext_perplexity

    results: dict[str, Any] = {}
    lm_tasks = [t for t in evaluation["tasks"] if t != "wikitext2_ppl"]
    if "wikitext2_ppl" in evaluation["tasks"]:
        ppl = wikitext_perplexity(model, tokenizer, data_dir, seqlen=int(evaluation["seqlen"]),
                                  max_windows=int(evaluation["windows"]), should_stop=should_stop)
        results["wikitext2_ppl"] = {"perplexity": {"value": ppl, "higher_is_better": False}}
    if lm_tasks:
        from .evaluation import EvalSettings, evaluate

        settings = EvalSettings(
            tasks=lm_tasks, num_fewshot=evaluation.get("num_fewshot"), limit=evaluation.get("limit"),
            batch_size=evaluation.get("batch_size") or 1,
            apply_chat_template=bool(evaluation.get("apply_chat_template")),
            data_source=evaluation.get("data_source") or "auto")
        record = evaluate(model, tokenizer, settings, data_dir=data_dir or None,
                          cache_dir=cache_dir if model_identity else None, model_identity=model_identity)
        for task, outcome in record["tasks"].items():
            results[task] = outcome["metrics"]
        results["_lm_eval"] = {k: v for k, v in record.items() if k != "tasks"}
        results["_lm_eval"]["sources"] = {t: o.get("source") for t, o in record["tasks"].items()}
    return results


def _compare(baseline: dict, compressed: dict) -> list[dict]:
    from .recovery import recovery

    rows = []
    for task, metrics in baseline.items():
        if task.startswith("_"):
            continue
        for metric, b in metrics.items():
            c = compressed.get(task, {}).get(metric)
            if c is None:
                continue
            hib = b.get("higher_is_better", True)
            rows.append({"task": task, "metric": metric, "baseline": b["value"], "compressed": c["value"],
                         "higher_is_better": hib, "recovery_pct": recovery(b["value"], c["value"], hib)})
    return rows


def _dense_bf16_bytes(model) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * 2
    return total


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _report_summary(report: Any) -> dict:
    if hasattr(report, "summary"):
        return _jsonable(report.summary())
    if hasattr(report, "to_dict"):
        return _jsonable(report.to_dict())
    return {}


def _jsonable(value: Any) -> Any:
    """Best-effort conversion of engine objects to JSON types (paths, tensors, dataclasses)."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else f"tensor{tuple(value.shape)}"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
