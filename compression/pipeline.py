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

import contextlib
import datetime as dt
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .eval_backend import number_sources
from .speed import measure_speed, speed_summary

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]

STAGES = {  # stage -> (start, end) fraction of the whole job
    "load": (0.0, 0.05),
    "baseline": (0.05, 0.20),
    "calibration": (0.20, 0.25),
    "compress": (0.25, 0.75),
    "finetune": (0.40, 0.70),  # a recipe with a fine-tune stage: prune 25-40%, fine-tune, quantize 70-75%
    "export": (0.75, 0.80),
    "evaluate": (0.80, 0.97),
    "finish": (0.97, 1.0),
}

# results["timings"] keys in job order, with the name the job page and the card show for each
STAGE_TIMES = (
    ("load_s", "load model"),
    ("baseline_eval_s", "evaluate baseline"),
    ("baseline_speed_s", "measure baseline speed"),
    ("calibration_s", "prepare calibration data"),
    ("compress_s", "compress"),
    ("export_s", "export checkpoint"),
    ("compressed_load_s", "load compressed checkpoint"),
    ("compressed_eval_s", "evaluate compressed model"),
    ("compressed_speed_s", "measure compressed speed"),
    ("card_s", "write model card"),
)

DEFAULT_EVALUATION = {"tasks": ["wikitext2_ppl"], "windows": 8, "seqlen": 512}
# source None: compression.data_sources.default_calibration_source (data directory, Hub or built in)
DEFAULT_CALIBRATION = {"source": None, "samples": 128, "seqlen": 512}


def resolve_device(name: str | None) -> str:
    if not name or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"COMPRESSOR_DEVICE={name} but no CUDA device is visible to this worker")
    return name


def stage_times(timings: dict[str, float]) -> list[dict]:
    """[{"key", "stage", "seconds"}] for the stages a job ran (in job order), then the total."""
    rows = [{"key": key, "stage": label, "seconds": round(timings[key], 2)}
            for key, label in STAGE_TIMES if key in timings]
    if "total_s" in timings:
        rows.append({"key": "total_s", "stage": "total", "seconds": round(timings["total_s"], 2)})
    return rows


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall time of the block under ``timings[key]`` (seconds)."""
    t0 = time.monotonic()
    try:
        yield
    finally:
        timings[key] = time.monotonic() - t0


def _measure(model: Any, stage: "_Stage") -> dict | None:
    """Speed and memory of ``model``; a model that cannot be timed (no KV cache, say) costs the job
    its speed table, with a warning, never its results."""
    try:
        return measure_speed(model)
    except Exception as exc:  # noqa: BLE001 - optional measurement
        log.warning("speed measurement failed: %s", exc, exc_info=True)
        stage(f"speed and memory not measured: {type(exc).__name__}: {exc}", 0.95, level="warning")
        return None


class _Stage:
    """Emits progress events with the job-wide fraction for one stage."""

    def __init__(self, progress: Progress, stage: str):
        self.progress, self.stage = progress, stage
        self.start, self.end = STAGES[stage]

    def __call__(self, message: str, within: float = 0.0, **extra: Any) -> None:
        within = min(max(within, 0.0), 1.0)
        fraction = self.start + (self.end - self.start) * within
        self.progress({"stage": self.stage, "fraction": round(fraction, 4), "within": round(within, 4),
                       "message": message, **extra})


def _engine_progress(progress: Progress, lo: float = 0.0, hi: float = 1.0) -> Progress:
    """Map the engine's per-layer events into the compress stage's share of the bar (its ``lo``-``hi`` part)."""
    stage = _Stage(progress, "compress")

    def forward(event: dict) -> None:
        layers = max(int(event.get("layers") or 1), 1)
        layer = int(event.get("layer") or 0)
        done = layer + (1 if "module" not in event else 0.5)
        extra = {k: v for k, v in event.items() if k not in ("stage", "message", "fraction")}
        stage(event.get("message") or f"layer {layer + 1}/{layers}", lo + (hi - lo) * done / layers, **extra)

    return forward


def run_job(spec: dict, out_dir: str | Path, *, progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict:
    """Run one job described by `spec` (see jobs.tasks.job_spec) and write its artifact to `out_dir`."""
    from .card_facts import as_eval_result
    from .errors import JobCancelled
    from .loading import load_model
    from .recovery import recovery_table
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
    backend = _select_backend(device)  # a worker that cannot use the configured backend fails before any work
    data_dir = spec.get("data_dir") or ""
    if not calibration_spec.get("source"):
        from .data_sources import default_calibration_source

        calibration_spec["source"] = default_calibration_source(data_dir)
    try:
        tmp_dir.mkdir()
        load = _Stage(progress, "load")
        load(f"loading {spec['model']}")
        with _timed(timings, "load_s"):
            loaded = load_model(spec["model"], allowed_roots=spec.get("allowed_roots") or (),
                                trust_remote_code=bool(spec.get("trust_remote_code")), device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
        load("model loaded", 1.0)
        check_stop()

        baseline_stage = _Stage(progress, "baseline")
        from .placement import place_for_eval, release_device_memory

        placement = place_for_eval(model, device)  # the job's device: whole, or layer by layer
        devices = {"baseline_eval": placement.as_dict(), "dense_speed": None, "compress": device,
                   "compressed_eval": device, "compressed_speed": None}
        baseline_stage(f"evaluating the uncompressed model on {placement.device} ({placement.mode})")
        with _timed(timings, "baseline_eval_s"):
            baseline = _evaluate(model, tokenizer, evaluation, data_dir, cache_dir=spec.get("cache_dir"),
                                 model_identity={**loaded.identity, "dtype": str(next(model.parameters()).dtype)},
                                 should_stop=should_stop, progress=_eval_progress(baseline_stage, 0.05, 0.85))
        dense_speed = None
        if evaluation.get("speed", True):
            baseline_stage("measuring the uncompressed model's speed and memory", 0.9)
            with _timed(timings, "baseline_speed_s"):
                dense_speed = _measure(model, baseline_stage)
            devices["dense_speed"] = placement.as_dict()
        placement.restore(model)  # back to the CPU: compression moves one layer at a time itself
        baseline_stage("baseline evaluated", 1.0)
        check_stop()

        calibration: list[dict] = []
        if recipe.needs_calibration:
            from .calibration import load_calibration

            calib_stage = _Stage(progress, "calibration")
            calib_stage(f"tokenizing {calibration_spec['samples']} calibration samples")
            with _timed(timings, "calibration_s"):
                calibration = load_calibration(
                    calibration_spec["source"], tokenizer, samples=int(calibration_spec["samples"]),
                    seqlen=int(calibration_spec["seqlen"]), data_dir=spec.get("calibration_dir") or data_dir)
            calib_stage(f"{len(calibration)} calibration samples ready", 1.0)

        from .export import apply_artifact_modes, export_checkpoint
        from .sequential import compress_model

        staged = _FinetuneStage(spec, recipe, model, tokenizer, data_dir, calibration_spec, progress, should_stop)
        with _timed(timings, "compress_s"):
            report = compress_model(model, staged.before, calibration, device=device,
                                    progress=_engine_progress(progress, *staged.prune_span), should_stop=should_stop,
                                    calibrate_all_experts=bool(calibration_spec.get("calibrate_all_experts")))
        check_stop()
        if staged.modifier is not None:
            report = staged.run(model, report, calibration, device, timings)
            check_stop()

        export_stage = _Stage(progress, "export")
        export_stage("writing the compressed-tensors checkpoint")
        from .source_facts import source_checkpoint_bytes, source_dtype

        stored_dtype = source_dtype(loaded.source, model)  # unquantized tensors as the source stores them
        with _timed(timings, "export_s"):
            exported = export_checkpoint(model, tokenizer, recipe, report, tmp_dir, dtype=stored_dtype)
        export_stage("checkpoint written", 1.0)
        check_stop()

        eval_stage = _Stage(progress, "evaluate")
        eval_stage("loading the exported checkpoint through the compressed runtime")
        architecture = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        # compared with the source checkpoint as published, not with the dtype this worker ran in
        dense_bytes = source_checkpoint_bytes(loaded.source, model, stored_dtype)
        dense_dtype = str(stored_dtype).removeprefix("torch.")
        dtype = next(model.parameters()).dtype
        model = loaded.model = None  # the dense (fake-quantized) model is freed before the compressed one loads
        release_device_memory(device)
        with _timed(timings, "compressed_load_s"):
            model, runtime = _compressed_model_for_eval(tmp_dir, device, dtype)
        eval_stage(f"evaluating the compressed model ({runtime})", 0.1)
        with _timed(timings, "compressed_eval_s"):
            compressed = _evaluate(model, tokenizer, evaluation, data_dir, should_stop=should_stop,
                                   progress=_eval_progress(eval_stage, 0.1, 0.85))
        speed = None
        if dense_speed:
            eval_stage("measuring the compressed model's speed and memory", 0.9)
            with _timed(timings, "compressed_speed_s"):
                compressed_speed = _measure(model, eval_stage)
            devices["compressed_speed"] = {"device": device, "mode": "whole"}
            speed = speed_summary(dense_speed, compressed_speed, device, f"{recipe.preset or 'custom'} via {runtime}")
        eval_stage("compressed model evaluated", 1.0)
        check_stop()
        vllm_record = _vllm_evaluation(backend, model, tmp_dir, evaluation, data_dir, eval_stage)

        finish = _Stage(progress, "finish")
        weight_bytes = sum(p.stat().st_size for p in tmp_dir.glob("*.safetensors"))
        size = {"dense_bytes": dense_bytes, "dense_dtype": dense_dtype, "compressed_weight_bytes": weight_bytes,
                "ratio": round(dense_bytes / weight_bytes, 3) if weight_bytes else None}
        bits = quantized_bits_per_param(tmp_dir)
        timings["total_s"] = time.monotonic() - started  # the card lists every stage before it
        with _timed(timings, "card_s"):
            card_text = _model_card(spec, recipe, model, architecture, loaded.identity, evaluation, baseline,
                                    compressed, size, bits, out_dir, calibration_spec if calibration else None,
                                    speed, source=loaded.source, stage_times=stage_times(timings),
                                    creation_steps=staged.creation_steps(calibration_spec, report),
                                    vllm={**(vllm_record or {}), "backend": backend.as_dict()})
            (tmp_dir / "README.md").write_text(card_text, encoding="utf-8")
        timings["total_s"] = time.monotonic() - started
        results = {
            "model": loaded.identity,
            "recipe": recipe.to_dict(),
            "recipe_yaml": recipe.to_yaml(),
            "recipe_summary": recipe.describe(),
            "device": device,
            "devices": devices,
            "evaluation": {"settings": evaluation, "baseline": baseline, "compressed": compressed,
                           "compressed_runtime": runtime, "backend": backend.as_dict(), "vllm": vllm_record,
                           "number_sources": number_sources(list(evaluation["tasks"]), backend,
                                                            list((vllm_record or {}).get("tasks") or {})),
                           "metrics": recovery_table(as_eval_result(baseline, evaluation),
                                                      as_eval_result(compressed, evaluation))},
            "size": size,
            "speed": speed,
            "bits_per_param": bits,
            "compression": _report_summary(report),
            "finetune": staged.summary(),
            "artifact": {"files": sorted(p.name for p in tmp_dir.iterdir()), "bytes": _dir_bytes(tmp_dir),
                         "export": _jsonable(exported)},
            "model_card": card_text,
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "stage_times": stage_times(timings),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        finish("moving the artifact into place", 0.5)
        apply_artifact_modes(tmp_dir)
        tmp_dir.rename(out_dir)
        staged.cleanup()
        finish("done", 1.0)
        return results
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # fine-tune checkpoints stay (outside it) for a resume
        raise


def _evaluate(model, tokenizer, evaluation: dict, data_dir: str, *, cache_dir: str | None = None,
              model_identity: dict | None = None, should_stop: Callable[[], bool] | None = None,
              progress: Progress | None = None) -> dict:
    """{task: {metric: {"value", "higher_is_better", ...}}} plus "_lm_eval" with lm-eval's own record
    (and per task the documents scored and the few-shot count). `progress` receives lm-eval's
    ``requests_done``/``requests_total`` events.

    `wikitext2_ppl` is our quick token-level WikiText-2 perplexity; every other task runs through
    lm-eval (compression.evaluation) on the model object in memory. With `cache_dir` and
    `model_identity` (the baseline), lm-eval results are cached and reused across jobs.
    """
    from .perplexity import wikitext_perplexity

    results: dict[str, Any] = {}
    lm_tasks = [t for t in evaluation["tasks"] if t != "wikitext2_ppl"]
    if "wikitext2_ppl" in evaluation["tasks"]:
        if cache_dir and model_identity:  # the baseline: cached per model identity like lm-eval's
            from .perplexity import cached_wikitext_perplexity

            ppl, hit = cached_wikitext_perplexity(
                model, tokenizer, data_dir, seqlen=int(evaluation["seqlen"]), max_windows=int(evaluation["windows"]),
                cache_dir=cache_dir, model_identity=model_identity, should_stop=should_stop)
        else:
            ppl, hit = wikitext_perplexity(model, tokenizer, data_dir, seqlen=int(evaluation["seqlen"]),
                                           max_windows=int(evaluation["windows"]), should_stop=should_stop), False
        results["wikitext2_ppl"] = {"perplexity": {"value": ppl, "higher_is_better": False, "cache_hit": hit}}
        from .data_sources import PERPLEXITY_TASK, eval_option

        results["_perplexity"] = {"source": eval_option(PERPLEXITY_TASK, data_dir or None).source}  # local | hub
    if lm_tasks:
        from .evaluation import EvalSettings, evaluate

        settings = EvalSettings(
            tasks=lm_tasks, num_fewshot=evaluation.get("num_fewshot"), limit=evaluation.get("limit"),
            batch_size=evaluation.get("batch_size") or 1,
            apply_chat_template=bool(evaluation.get("apply_chat_template")),
            data_source=evaluation.get("data_source") or "auto")
        record = evaluate(model, tokenizer, settings, data_dir=data_dir or None,
                          cache_dir=cache_dir if model_identity else None, model_identity=model_identity,
                          progress=progress)
        for task, outcome in record["tasks"].items():
            results[task] = outcome["metrics"]
        results["_lm_eval"] = {k: v for k, v in record.items() if k != "tasks"}
        results["_lm_eval"]["sources"] = {t: o.get("source") for t, o in record["tasks"].items()}
        results["_lm_eval"]["samples"] = {t: o.get("samples") for t, o in record["tasks"].items()}
        results["_lm_eval"]["num_fewshot"] = {t: o.get("num_fewshot") for t, o in record["tasks"].items()}
    return results


def _eval_progress(stage: "_Stage", start: float, end: float) -> Progress:
    """lm-eval's request counts as progress events of `stage`, between `start` and `end` of it."""
    def forward(event: dict) -> None:
        done, total = event.get("requests_done"), event.get("requests_total")
        if not total:
            return
        stage(f"lm-eval: {done}/{total} {event.get('request_type', 'requests')} requests",
              start + (end - start) * done / total, requests_done=done, requests_total=total)

    return forward


def _select_backend(device: str):
    from .eval_backend import select_backend

    return select_backend(device)


def _vllm_evaluation(backend, model, checkpoint_dir: Path, evaluation: dict, data_dir: str, stage) -> dict | None:
    """On a vLLM worker: load the exported checkpoint in vLLM (a short greedy generation proves it runs)
    and score the job's lm-eval tasks with lm-eval's vLLM backend. None elsewhere. A vLLM failure is a
    warning with the reason, recorded, never the job's failure (the runtime's numbers stand)."""
    if backend.name != "vllm":
        return None
    import gc

    from .eval_backend import vllm_lm, vllm_load_check

    stage("loading the exported checkpoint in vLLM", 0.95)
    try:
        model.to("cpu")  # leave the GPU to vLLM
        torch.cuda.empty_cache()
        llm, facts = vllm_load_check(checkpoint_dir)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        record = {"load": facts, "tasks": {}}
        lm_tasks = [t for t in evaluation["tasks"] if t != "wikitext2_ppl"]
        if lm_tasks:
            from .evaluation import EvalSettings, evaluate

            settings = EvalSettings(
                tasks=lm_tasks, num_fewshot=evaluation.get("num_fewshot"), limit=evaluation.get("limit"),
                batch_size="auto", apply_chat_template=bool(evaluation.get("apply_chat_template")),
                data_source=evaluation.get("data_source") or "auto")
            scored = evaluate(vllm_lm(checkpoint_dir), None, settings, data_dir=data_dir or None)
            record["tasks"] = {task: outcome["metrics"] for task, outcome in scored["tasks"].items()}
        stage(f"loaded in vLLM {facts['vllm_version']} on {facts['gpu']}", 0.99)
        return record
    except Exception as exc:  # noqa: BLE001 - reported; the runtime's numbers stand
        log.warning("vLLM check failed: %s", exc, exc_info=True)
        stage(f"the checkpoint did not load or run in vLLM: {type(exc).__name__}: {exc}", 0.99, level="warning")
        return {"load": {"loaded": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}, "tasks": {}}


def _compressed_model_for_eval(checkpoint_dir: Path, device: str, dtype: torch.dtype):
    """The exported checkpoint loaded through our compressed runtime (kernels/), so what is
    evaluated is what a user deploys (the caller has freed the fake-quantized model)."""
    from .runtime import load_compressed_model

    compressed = load_compressed_model(checkpoint_dir, device=device, dtype=dtype)
    return compressed, "compressed runtime (kernels/)"


def quantized_bits_per_param(checkpoint_dir: Path) -> dict:
    """Storage bits per weight of the compressed Linears (values + scales), from the safetensors headers."""
    from safetensors import safe_open

    shapes: dict[str, tuple[str, list[int]]] = {}
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                sl = handle.get_slice(name)
                shapes[name] = (sl.get_dtype(), sl.get_shape())
    item_bits = {"F32": 32, "F16": 16, "BF16": 16, "I32": 32, "I64": 64, "I8": 8, "U8": 8, "F8_E4M3": 8}
    prefixes = {n.rsplit(".", 1)[0] for n in shapes if n.endswith(".weight_scale")}
    params = bits = 0
    for prefix in prefixes:
        if f"{prefix}.weight_shape" in shapes:
            # the shape tensor's values are not in the header; derive from the packed layout
            dtype, shape = shapes[f"{prefix}.weight_packed"]
            params += shape[0] * shape[1] * 8
        else:
            params += _numel(shapes[f"{prefix}.weight"][1])
        for suffix in ("weight", "weight_packed", "weight_scale", "weight_zero_point", "input_scale"):
            if f"{prefix}.{suffix}" in shapes:
                dtype, shape = shapes[f"{prefix}.{suffix}"]
                bits += _numel(shape) * item_bits.get(dtype, 16)
    if not params:
        return {"dense": 16.0, "compressed": None, "quantized_params": 0}
    return {"dense": 16.0, "compressed": round(bits / params, 3), "quantized_params": params}


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _card_calibration(calibration: dict, spec: dict) -> dict:
    """How the card names the calibration data: the upload's own name, the data-directory file, or
    the Hub dataset (which also goes into the card's `datasets` metadata)."""
    from .calibration import is_local_source

    from .data_sources import builtin_records, is_builtin

    source = calibration["source"]
    if is_builtin(source):
        return {"dataset": f"{source} (built into Compressor: {len(builtin_records(source))} hand-written chat "
                           "records, CC0)", "hub_id": None, "samples": calibration["samples"],
                "seq_len": calibration["seqlen"]}
    hub = None if spec.get("calibration_dir") or is_local_source(source, spec.get("data_dir") or "") \
        else source.partition(":")[0]
    return {"dataset": calibration.get("label") or source, "hub_id": hub, "samples": calibration["samples"],
            "seq_len": calibration["seqlen"]}


def _model_card(spec, recipe, model, architecture, identity, evaluation, baseline, compressed, size, bits,
                final_dir: Path, calibration: dict | None, speed: dict | None = None, source: Any = None,
                stage_times: list[dict] | None = None, creation_steps: list[str] | None = None,
                vllm: dict | None = None) -> str:
    from .card import build_model_card
    from .card_facts import collect_facts
    from .source_facts import source_metadata

    facts = collect_facts(
        spec=spec, recipe=recipe, model=model, identity=identity, evaluation=evaluation, baseline=baseline,
        compressed=compressed, size={"dense_bytes": size["dense_bytes"], "dense_dtype": size.get("dense_dtype"),
                                     "compressed_bytes": size["compressed_weight_bytes"]},
        artifact_dir=str(final_dir), bits_per_param=bits,
        calibration=_card_calibration(calibration, spec) if calibration else None)
    facts["architecture"] = architecture
    facts["speed"] = speed
    facts["vllm"] = vllm
    facts["stage_times"] = stage_times
    for key, value in source_metadata(source if source is not None else spec["model"]).items():
        if value and not facts.get(key):  # licence, languages, intended use of the source model
            facts[key] = value
    facts["creation_steps"] = creation_steps
    return build_model_card(facts)


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


# fine-tune stage (compression/distill.py) -----------------------------------------------------------
class _FinetuneStage:
    """A recipe's DistillationFinetuneModifier stage around compress_model: before pruning the
    training data is tokenized (a dataset too small fails here, before any work) and the dense
    teacher copied; after pruning the student is fine-tuned with the mask held, then the stages
    after it (quantization) run with the same masks. Without a fine-tune stage it does nothing."""

    def __init__(self, spec, recipe, model, tokenizer, data_dir, calibration_spec, progress, should_stop):
        from .recipe import finetune_split

        self.spec, self.recipe, self.progress, self.should_stop = spec, recipe, progress, should_stop
        before, self.modifier, self.after = finetune_split(recipe)
        self.before = before if self.modifier is not None else recipe
        self.result = None
        self.checkpoint_dir = None
        self.windows = self.teacher = None
        self.prune_span = (0.0, 1.0)
        if self.modifier is None:
            return
        self.prune_span = (0.0, 0.3)
        settings = self.modifier.finetune
        index = next(i for i, st in enumerate(recipe.stages) if st.modifiers[0] is self.modifier)
        self.path = f"recipe.stages[{index}].modifiers[0]"
        data = spec.get("finetune_data") or {}
        stage = _Stage(progress, "calibration")
        stage(f"tokenizing {settings.windows_needed} fine-tuning windows of {settings.seq_len} tokens", 1.0)
        from .distill import load_training_windows

        self.windows = load_training_windows(
            data.get("source") or settings.dataset, tokenizer, windows=settings.windows_needed,
            seq_len=settings.seq_len, data_dir=data.get("data_dir") or data_dir, seed=settings.seed,
            field=f"{self.path}.dataset")
        self.dataset_label = data.get("label") or settings.dataset
        self.teacher = _copy_model(model)
        self.fingerprint = _fingerprint(spec, calibration_spec)
        if spec.get("cache_dir"):
            self.checkpoint_dir = Path(spec["cache_dir"]) / "finetune" / self.fingerprint[:32]

    def run(self, model, report, calibration, device, timings):
        from .distill import finetune
        from .sequential import compress_model, merge_reports, sparsity_masks

        settings = self.modifier.finetune
        masks = sparsity_masks(model, report)
        module_masks = sparsity_masks(model, report, by_module=True)
        stage = _Stage(self.progress, "finetune")
        stage(f"fine-tuning against the dense teacher: {settings.describe()}")

        def forward(event: dict) -> None:
            extra = {k: v for k, v in event.items() if k not in ("stage", "message", "fraction")}
            stage(event.get("message", ""), (event.get("step") or 0) / max(settings.total_steps, 1), **extra)

        with _timed(timings, "finetune_s"):
            self.result = finetune(model, self.teacher, self.windows, module_masks, settings, progress=forward,
                                   should_stop=self.should_stop, checkpoint_dir=self.checkpoint_dir,
                                   fingerprint=self.fingerprint)
        self.teacher = self.windows = None
        stage("fine-tune done", 1.0)
        if self.after is None:
            return report
        with _timed(timings, "quantize_s"):
            second = compress_model(model, self.after, calibration, device=device,
                                    progress=_engine_progress(self.progress, 0.9, 1.0),
                                    should_stop=self.should_stop, held_masks=masks)
        return merge_reports(report, second)

    def summary(self) -> dict | None:
        if self.result is None:
            return None
        out = self.result.summary()
        losses = out.pop("losses")
        stride = max(1, len(losses) // 500)  # at most ~500 points of the curve in the results
        out["loss_curve"] = [[r["step"], r["loss"]] for r in losses[::stride]]
        out["settings"] = self.modifier.finetune.to_dict()
        out["dataset"] = self.dataset_label
        return out

    def creation_steps(self, calibration_spec: dict, report) -> list[str]:
        """One sentence per step of the recipe for the card's Creation section (data and budgets)."""
        steps = []
        calib = f"{calibration_spec.get('label') or calibration_spec['source']}, {calibration_spec['samples']} " \
                f"samples of up to {calibration_spec['seqlen']} tokens"
        for m in self.recipe.modifiers:
            if m.kind == "SparseGPTModifier":
                steps.append(f"Pruning: SparseGPT {m.mask_structure if m.mask_structure != '0:0' else 'unstructured'} "
                             f"({m.sparsity:.0%} of the targeted weights), calibrated on {calib}.")
                if m.reconstruction is not None:
                    r = m.reconstruction
                    layers = getattr(report, "reconstruction", {}) or {}
                    gain = ""
                    if layers:
                        kept = sum(1 for v in layers.values() if v.get("kept"))
                        gain = f" It lowered the output error in {kept} of {len(layers)} layers."
                    steps.append(f"Recovery: layer-wise reconstruction of every pruned decoder layer, {r.steps} Adam "
                                 f"steps (lr {r.lr:g}, {r.batch_size} calibration samples per step, target: "
                                 f"{'dense model activations' if r.target == 'dense' else 'dense layer output'}) "
                                 f"on the same calibration data, pruned weights held at zero.{gain}")
            elif m.finetune is not None:
                f = m.finetune
                done = f" ({self.result.tokens:,} tokens in {self.result.seconds / 60:.1f} min)" if self.result else ""
                steps.append(f"Recovery: distillation fine-tuning against the dense model (KL on logits"
                             + (f" + {f.layer_loss_weight:g} × per-layer output MSE" if f.layer_loss_weight else "")
                             + f") on {getattr(self, 'dataset_label', f.dataset)}: {f.total_steps} steps of "
                             f"{f.batch_size} × {f.seq_len} tokens × {f.grad_accum} accumulation = "
                             f"{f.total_steps * f.tokens_per_step:,} tokens{done}, lr {f.lr:g}, 2:4 mask held.")
            elif m.quantizes:
                from .recipe import Recipe, Stage

                one = Recipe([Stage("s", "quant_modifiers", [m])])
                what = one.describe()
                data = f", calibrated on {calib}" if one.needs_calibration else " (no calibration data)"
                steps.append(f"Quantization: {'GPTQ ' if m.kind == 'GPTQModifier' else ''}{what}{data}"
                             + (", pruned weights kept at zero." if any(x.kind == "SparseGPTModifier"
                                                                     for x in self.recipe.modifiers) else "."))
        return steps

    def cleanup(self) -> None:
        from .distill import remove_checkpoints

        remove_checkpoints(self.checkpoint_dir)


def _copy_model(model):
    import copy

    return copy.deepcopy(model)


def _fingerprint(spec: dict, calibration_spec: dict) -> str:
    """Same owner, model, recipe and data → same fine-tune checkpoints (a resubmitted job resumes)."""
    import hashlib
    import json

    key = {k: spec.get(k) for k in ("owner_id", "model", "recipe", "finetune_data", "data_dir")}
    key["calibration"] = calibration_spec
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
