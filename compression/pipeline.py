"""One compression job from start to finish: the single entry point of the Celery worker and the CLI.

    run_job(spec, out_dir, progress=..., should_stop=...) -> results (JSON-able dict)

run_job is one short function over stage functions (_load_stage, _baseline_stage, ...), each
taking and returning plain data; their shares of the progress bar are in compression.progress.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from compression.errors import JobCancelled
from compression.finetune_stage import FinetuneStage
from compression.progress import Progress, Stage, engine_progress, timed
from compression.evaluation.backend import number_sources
from compression.evaluation.speed import measure_speed, speed_summary

log = logging.getLogger(__name__)


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


def _measure(model: Any, stage: "Stage") -> dict | None:
    """Speed and memory of ``model``; a model that cannot be timed (no KV cache, say) costs the job
    its speed table, with a warning, never its results."""
    try:
        return measure_speed(model)
    except Exception as exc:  # noqa: BLE001 - optional measurement
        log.warning("speed measurement failed: %s", exc, exc_info=True)
        stage(f"speed and memory not measured: {type(exc).__name__}: {exc}", 0.95, level="warning")
        return None


def run_job(spec: dict, out_dir: str | Path, *, progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict:
    """Run one job described by `spec` (see jobs.tasks.job_spec) and write its artifact to `out_dir`."""
    job = _prepare(spec, Path(out_dir), progress or (lambda event: None), should_stop or (lambda: False))
    try:
        job.tmp_dir.mkdir()
        source = _load_stage(job)
        baseline = _baseline_stage(job, source)
        calibration = _calibration_stage(job, source.tokenizer)
        compressed = _compress_stage(job, source, calibration)
        checkpoint = _export_stage(job, source, compressed)
        evaluated = _compressed_eval_stage(job, source, checkpoint, baseline)
        return _finish_stage(job, source, baseline, compressed, checkpoint, evaluated)
    except BaseException:
        shutil.rmtree(job.tmp_dir, ignore_errors=True)  # fine-tune checkpoints stay (outside it) for a resume
        raise


@dataclass
class _Job:
    """The settings of one job, resolved once, and what every stage shares (progress, timings)."""
    spec: dict
    out_dir: Path
    tmp_dir: Path
    recipe: Any
    evaluation: dict
    calibration_spec: dict
    device: str
    backend: Any
    data_dir: str
    progress: Progress
    should_stop: Callable[[], bool]
    started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)
    devices: dict[str, Any] = field(default_factory=dict)
    memory: Any = None  # compression.model_io.streaming.MemoryPlan: in memory or streamed

    def check_stop(self) -> None:
        if self.should_stop():
            raise JobCancelled("cancelled by the user")

    def stage(self, name: str) -> "Stage":
        return Stage(self.progress, name)

    def timed(self, key: str):
        return timed(self.timings, key)


@dataclass
class _Baseline:
    metrics: dict
    speed: dict | None


@dataclass
class _Compressed:
    report: Any
    finetune: "FinetuneStage"
    calibrated: bool


@dataclass
class _Checkpoint:
    export: Any
    architecture: str
    dense_bytes: int
    dense_dtype: str
    dtype: torch.dtype
    config: Any = None
    streamed: bool = False


@dataclass
class _Evaluated:
    model: Any
    runtime: str
    metrics: dict
    speed: dict | None
    vllm: dict | None


def _prepare(spec: dict, out_dir: Path, progress: Progress, should_stop: Callable[[], bool]) -> _Job:
    """Resolve the job's settings and check the worker can run it, before any work or any file."""
    from compression.data_sources import default_calibration_source
    from compression.recipe import Recipe

    if out_dir.exists():
        raise FileExistsError(f"artifact directory {out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    calibration_spec = {**DEFAULT_CALIBRATION, **(spec.get("calibration") or {})}
    data_dir = spec.get("data_dir") or ""
    if not calibration_spec.get("source"):
        calibration_spec["source"] = default_calibration_source(data_dir)
    device = resolve_device(spec.get("device"))
    return _Job(spec=spec, out_dir=out_dir, tmp_dir=out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}",
                recipe=Recipe.from_dict(spec["recipe"]),
                evaluation={**DEFAULT_EVALUATION, **(spec.get("evaluation") or {})},
                calibration_spec=calibration_spec, device=device,
                backend=_select_backend(device),  # a worker that cannot use the configured backend fails here
                data_dir=data_dir, progress=progress, should_stop=should_stop)


def _load_stage(job: _Job):
    """The dense model and tokenizer (compression.model_io.loading.LoadedModel), on the CPU: whole,
    or with its decoder layers left in the safetensors shards when the memory plan streams them."""
    from compression.model_io.loading import load_model

    load = job.stage("load")
    load(f"loading {job.spec['model']}")
    with job.timed("load_s"):
        job.memory = _memory_plan(job)  # None for the demo model until its config is loaded
        streamed = job.memory is not None and job.memory.mode == "streaming"
        loaded = load_model(job.spec["model"], allowed_roots=job.spec.get("allowed_roots") or (),
                            trust_remote_code=bool(job.spec.get("trust_remote_code")), device=job.device,
                            streamed=streamed)
        if job.memory is None:
            job.memory = _memory_plan(job, loaded.model.config, "the demo model is a GGUF file")
    load(f"model loaded ({job.memory.mode}: {job.memory.reason})", 1.0)
    job.check_stop()
    return loaded


def _memory_plan(job: _Job, config: Any = None, can_stream: str | None = None):
    """In memory or streamed layer by layer (compression.model_io.streaming.plan_memory), or a
    MemoryPlanError naming the setting to change, before any weight is read."""
    from compression.model_io import streaming
    from compression.model_io.loading import check_model_source, model_location
    from compression.preflight import preflight

    trust = bool(job.spec.get("trust_remote_code"))
    setting = streaming.streaming_setting(job.spec)
    if config is None:
        from transformers import AutoConfig

        source = check_model_source(job.spec["model"], allowed_roots=job.spec.get("allowed_roots") or ())
        if source.kind == "demo":
            return None
        location = model_location(source, trust_remote_code=trust, weights=False)  # no Hub weights yet
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust)
        if setting != "never":
            can_stream = _stream_refusal(job, source, location, config)
    samples, seqlen = int(job.calibration_spec["samples"]), int(job.calibration_spec["seqlen"])
    report = preflight(config, job.recipe, samples=samples, seqlen=seqlen, device=job.device, trust_remote_code=trust)
    from compression.sequential import offloadable

    host_bytes, device_bytes = streaming.configured_budgets(job.spec)  # None: measured here
    return streaming.plan_memory(report, device=job.device, setting=setting, can_stream=can_stream,
                                 host_bytes=host_bytes, device_bytes=device_bytes, samples=samples, seqlen=seqlen,
                                 offload_ok=offloadable(job.recipe))


def _stream_refusal(job: _Job, source, location, config) -> str | None:
    """Why this job cannot stream its model (None: it can); shard headers only."""
    from compression.model_io.loading import default_dtype, shard_reader
    from compression.model_io.streaming import MemoryPlanError, stream_refusal

    try:
        reader = shard_reader(source, location)
    except MemoryPlanError as exc:
        return exc.message
    return stream_refusal(job.recipe, location, config, dtype=default_dtype(job.device),
                          trust_remote_code=bool(job.spec.get("trust_remote_code")), reader=reader)


def _baseline_stage(job: _Job, source) -> _Baseline:
    """The dense model's metrics and speed, measured on the job's device (whole, or layer by layer)."""
    from compression.model_io.placement import place_for_eval

    model = source.model
    stage = job.stage("baseline")
    if source.streamed is not None:
        return _streamed_baseline(job, source, stage)
    placement = place_for_eval(model, job.device)
    job.devices.update({"baseline_eval": placement.as_dict(), "dense_speed": None, "compress": job.device,
                        "compressed_eval": job.device, "compressed_speed": None})
    stage(f"evaluating the uncompressed model on {placement.device} ({placement.mode})")
    with job.timed("baseline_eval_s"):
        metrics = _evaluate(model, source.tokenizer, job.evaluation, job.data_dir, cache_dir=job.spec.get("cache_dir"),
                            model_identity={**source.identity, "dtype": str(next(model.parameters()).dtype)},
                            should_stop=job.should_stop, progress=_eval_progress(stage, 0.05, 0.85))
    speed = None
    if job.evaluation.get("speed", True):
        stage("measuring the uncompressed model's speed and memory", 0.9)
        with job.timed("baseline_speed_s"):
            speed = _measure(model, stage)
        job.devices["dense_speed"] = placement.as_dict()
    placement.restore(model)  # back to the CPU: compression moves one layer at a time itself
    stage("baseline evaluated", 1.0)
    job.check_stop()
    return _Baseline(metrics=metrics, speed=speed)


def _streamed_baseline(job: _Job, source, stage) -> _Baseline:
    """The dense model's metrics with each decoder layer read from disk for its own forward pass;
    no speed run (it would time the disk)."""
    job.devices.update({"baseline_eval": {"device": job.device, "mode": "streamed"}, "dense_speed": None,
                        "compress": job.device, "compressed_eval": job.device, "compressed_speed": None})
    stage(f"evaluating the uncompressed model on {job.device} (layers streamed from disk)")
    with job.timed("baseline_eval_s"), source.streamed.lazy_layers(job.device) as model:
        metrics = _evaluate(model, source.tokenizer, job.evaluation, job.data_dir, cache_dir=job.spec.get("cache_dir"),
                            model_identity={**source.identity, "dtype": str(source.streamed.dtype)},
                            should_stop=job.should_stop, progress=_eval_progress(stage, 0.05, 0.85))
    if job.evaluation.get("speed", True):
        stage("speed and memory not measured: the model's layers are streamed from disk", 0.9, level="warning")
    stage("baseline evaluated", 1.0)
    job.check_stop()
    return _Baseline(metrics=metrics, speed=None)


def _calibration_stage(job: _Job, tokenizer) -> list[dict]:
    """Tokenized calibration samples; none for a data-free recipe."""
    from compression.calibration import load_calibration

    if not job.recipe.needs_calibration:
        return []
    spec = job.calibration_spec
    stage = job.stage("calibration")
    stage(f"tokenizing {spec['samples']} calibration samples")
    with job.timed("calibration_s"):
        calibration = load_calibration(spec["source"], tokenizer, samples=int(spec["samples"]),
                                       seqlen=int(spec["seqlen"]),
                                       data_dir=job.spec.get("calibration_dir") or job.data_dir)
    stage(f"{len(calibration)} calibration samples ready", 1.0)
    return calibration


def _compress_stage(job: _Job, source, calibration: list[dict]) -> _Compressed:
    """Every recipe stage, one decoder layer at a time; a fine-tune stage between pruning and quantization."""
    from compression.sequential import compress_model

    staged = FinetuneStage(job.spec, job.recipe, source.model, source.tokenizer, job.data_dir,
                            job.calibration_spec, job.progress, job.should_stop)
    if source.streamed is not None:  # each layer's tensors are written as soon as it is compressed
        from compression.model_io.source_facts import source_dtype

        source.streamed.begin_export(job.tmp_dir, source_dtype(source.source, source.model))
    with job.timed("compress_s"):
        report = compress_model(source.model, staged.before, calibration, device=job.device,
                                progress=engine_progress(job.progress, *staged.prune_span),
                                should_stop=job.should_stop,
                                calibrate_all_experts=bool(job.calibration_spec.get("calibrate_all_experts")),
                                layer_io=source.streamed,
                                offload_activations=bool(job.memory and job.memory.offload_activations))
    job.check_stop()
    if staged.modifier is not None:
        report = staged.run(source.model, report, calibration, job.device, job.timings)
        job.check_stop()
    return _Compressed(report=report, finetune=staged, calibrated=bool(calibration))


def _export_stage(job: _Job, source, compressed: _Compressed) -> _Checkpoint:
    """The compressed-tensors checkpoint in the job's temporary directory; the dense model is freed after it."""
    from compression.model_io.export import export_checkpoint
    from compression.model_io.placement import release_device_memory
    from compression.model_io.source_facts import source_checkpoint_bytes, source_dtype

    model = source.model
    stage = job.stage("export")
    stage("writing the compressed-tensors checkpoint")
    stored_dtype = source_dtype(source.source, model)  # unquantized tensors as the source stores them
    with job.timed("export_s"):
        if source.streamed is not None:  # the layers' shards are written; the rest, the index and config now
            exported = source.streamed.finish_export(source.tokenizer, job.recipe, compressed.report)
        else:
            exported = export_checkpoint(model, source.tokenizer, job.recipe, compressed.report, job.tmp_dir,
                                         dtype=stored_dtype)
    stage("checkpoint written", 1.0)
    job.check_stop()
    checkpoint = _Checkpoint(
        export=exported, architecture=(getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        # compared with the source checkpoint as published, not with the dtype this worker ran in
        dense_bytes=source_checkpoint_bytes(source.source, model, stored_dtype),
        dense_dtype=str(stored_dtype).removeprefix("torch."), dtype=next(model.parameters()).dtype,
        config=model.config, streamed=source.streamed is not None)
    source.model = model = source.streamed = None  # the dense (fake-quantized) model is freed before the compressed one loads
    release_device_memory(job.device)
    return checkpoint


def _compressed_eval_stage(job: _Job, source, checkpoint: _Checkpoint, baseline: _Baseline) -> _Evaluated:
    """The exported checkpoint loaded through the compressed runtime, scored and timed like the baseline."""
    stage = job.stage("evaluate")
    if checkpoint.streamed and not job.evaluation["tasks"] and not baseline.speed:
        stage("nothing to evaluate: the compressed checkpoint is not loaded", 1.0)
        return _Evaluated(model=None, runtime="not loaded (no evaluation)", metrics={}, speed=None, vllm=None)
    stage("loading the exported checkpoint through the compressed runtime")
    with job.timed("compressed_load_s"):
        model, runtime = _compressed_model_for_eval(job.tmp_dir, job.device, checkpoint.dtype)
    stage(f"evaluating the compressed model ({runtime})", 0.1)
    with job.timed("compressed_eval_s"):
        metrics = _evaluate(model, source.tokenizer, job.evaluation, job.data_dir, should_stop=job.should_stop,
                            progress=_eval_progress(stage, 0.1, 0.85))
    speed = None
    if baseline.speed:
        stage("measuring the compressed model's speed and memory", 0.9)
        with job.timed("compressed_speed_s"):
            compressed_speed = _measure(model, stage)
        job.devices["compressed_speed"] = {"device": job.device, "mode": "whole"}
        speed = speed_summary(baseline.speed, compressed_speed, job.device,
                              f"{job.recipe.preset or 'custom'} via {runtime}")
    stage("compressed model evaluated", 1.0)
    job.check_stop()
    vllm = _vllm_evaluation(job.backend, model, job.tmp_dir, job.evaluation, job.data_dir, stage)
    return _Evaluated(model=model, runtime=runtime, metrics=metrics, speed=speed, vllm=vllm)


def _finish_stage(job: _Job, source, baseline: _Baseline, compressed: _Compressed, checkpoint: _Checkpoint,
                  evaluated: _Evaluated) -> dict:
    """Model card, results record, then the artifact renamed into place (the job's only visible write)."""
    from compression.card.facts import as_eval_result
    from compression.evaluation.recovery import recovery_table
    from compression.model_io.export import apply_artifact_modes

    finish = job.stage("finish")
    recipe, evaluation, tmp_dir = job.recipe, job.evaluation, job.tmp_dir
    weight_bytes = sum(p.stat().st_size for p in tmp_dir.glob("*.safetensors"))
    size = {"dense_bytes": checkpoint.dense_bytes, "dense_dtype": checkpoint.dense_dtype,
            "compressed_weight_bytes": weight_bytes,
            "ratio": round(checkpoint.dense_bytes / weight_bytes, 3) if weight_bytes else None}
    bits = quantized_bits_per_param(tmp_dir)
    timings = job.timings
    timings["total_s"] = time.monotonic() - job.started  # the card lists every stage before it
    staged = compressed.finetune
    with job.timed("card_s"):
        card_text = _model_card(job.spec, recipe, evaluated.model if evaluated.model is not None
                                else _ConfigOnly(checkpoint.config),
                                checkpoint.architecture, source.identity,
                                evaluation, baseline.metrics, evaluated.metrics, size, bits, job.out_dir,
                                job.calibration_spec if compressed.calibrated else None, evaluated.speed,
                                source=source.source, stage_times=stage_times(timings),
                                creation_steps=staged.creation_steps(job.calibration_spec, compressed.report),
                                vllm={**(evaluated.vllm or {}), "backend": job.backend.as_dict()})
        (tmp_dir / "README.md").write_text(card_text, encoding="utf-8")
    timings["total_s"] = time.monotonic() - job.started
    vllm = evaluated.vllm
    results = {
        "model": source.identity,
        "recipe": recipe.to_dict(),
        "recipe_yaml": recipe.to_yaml(),
        "recipe_summary": recipe.describe(),
        "device": job.device,
        "devices": job.devices,
        "memory": job.memory.to_dict() if job.memory is not None else None,
        "evaluation": {"settings": evaluation, "baseline": baseline.metrics, "compressed": evaluated.metrics,
                       "compressed_runtime": evaluated.runtime, "backend": job.backend.as_dict(), "vllm": vllm,
                       "number_sources": number_sources(list(evaluation["tasks"]), job.backend,
                                                        list((vllm or {}).get("tasks") or {})),
                       "metrics": recovery_table(as_eval_result(baseline.metrics, evaluation),
                                                  as_eval_result(evaluated.metrics, evaluation))},
        "size": size,
        "speed": evaluated.speed,
        "bits_per_param": bits,
        "compression": _report_summary(compressed.report),
        "finetune": staged.summary(),
        "artifact": {"files": sorted(p.name for p in tmp_dir.iterdir()), "bytes": _dir_bytes(tmp_dir),
                     "export": _jsonable(checkpoint.export)},
        "model_card": card_text,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "stage_times": stage_times(timings),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    finish("moving the artifact into place", 0.5)
    apply_artifact_modes(tmp_dir)
    tmp_dir.rename(job.out_dir)
    staged.cleanup()
    finish("done", 1.0)
    return results


@dataclass
class _ConfigOnly:
    """What the model card reads from a model (its config), when the compressed one was not loaded."""
    config: Any


def _evaluate(model, tokenizer, evaluation: dict, data_dir: str, *, cache_dir: str | None = None,
              model_identity: dict | None = None, should_stop: Callable[[], bool] | None = None,
              progress: Progress | None = None) -> dict:
    """{task: {metric: {"value", "higher_is_better", ...}}} plus "_lm_eval" with lm-eval's own record
    (and per task the documents scored and the few-shot count). `progress` receives lm-eval's
    ``requests_done``/``requests_total`` events.

    `wikitext2_ppl` is our quick token-level WikiText-2 perplexity; every other task runs through
    lm-eval (compression.evaluation.harness) on the model object in memory. With `cache_dir` and
    `model_identity` (the baseline), lm-eval results are cached and reused across jobs.
    """
    from compression.evaluation.perplexity import wikitext_perplexity

    results: dict[str, Any] = {}
    lm_tasks = [t for t in evaluation["tasks"] if t != "wikitext2_ppl"]
    if "wikitext2_ppl" in evaluation["tasks"]:
        if cache_dir and model_identity:  # the baseline: cached per model identity like lm-eval's
            from compression.evaluation.perplexity import cached_wikitext_perplexity

            ppl, hit = cached_wikitext_perplexity(
                model, tokenizer, data_dir, seqlen=int(evaluation["seqlen"]), max_windows=int(evaluation["windows"]),
                cache_dir=cache_dir, model_identity=model_identity, should_stop=should_stop)
        else:
            ppl, hit = wikitext_perplexity(model, tokenizer, data_dir, seqlen=int(evaluation["seqlen"]),
                                           max_windows=int(evaluation["windows"]), should_stop=should_stop), False
        results["wikitext2_ppl"] = {"perplexity": {"value": ppl, "higher_is_better": False, "cache_hit": hit}}
        from compression.data_sources import PERPLEXITY_TASK, eval_option

        results["_perplexity"] = {"source": eval_option(PERPLEXITY_TASK, data_dir or None).source}  # local | hub
    if lm_tasks:
        from compression.evaluation.harness import EvalSettings, evaluate

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


def _eval_progress(stage: "Stage", start: float, end: float) -> Progress:
    """lm-eval's request counts as progress events of `stage`, between `start` and `end` of it."""
    def forward(event: dict) -> None:
        done, total = event.get("requests_done"), event.get("requests_total")
        if not total:
            return
        stage(f"lm-eval: {done}/{total} {event.get('request_type', 'requests')} requests",
              start + (end - start) * done / total, requests_done=done, requests_total=total)

    return forward


def _select_backend(device: str):
    from compression.evaluation.backend import select_backend

    return select_backend(device)


def _vllm_evaluation(backend, model, checkpoint_dir: Path, evaluation: dict, data_dir: str, stage) -> dict | None:
    """On a vLLM worker: load the exported checkpoint in vLLM (a short greedy generation proves it runs)
    and score the job's lm-eval tasks with lm-eval's vLLM backend. None elsewhere. A vLLM failure is a
    warning with the reason, recorded, never the job's failure (the runtime's numbers stand)."""
    if backend.name != "vllm":
        return None
    import gc

    from compression.evaluation.backend import vllm_lm, vllm_load_check

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
            from compression.evaluation.harness import EvalSettings, evaluate

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
    from compression.model_io.runtime import load_compressed_model

    compressed = load_compressed_model(checkpoint_dir, device=device, dtype=dtype)
    return compressed, "compressed runtime (kernels/)"


def quantized_bits_per_param(checkpoint_dir: Path) -> dict:
    """Storage bits per weight of the compressed Linears (values + scales), from the safetensors headers."""
    from compression.model_io.streaming import safetensors_header

    shapes: dict[str, tuple[str, list[int]]] = {}
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        shapes.update({name: (dtype, shape) for name, (shape, dtype) in safetensors_header(path).items()})
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
    from compression.calibration import is_local_source

    from compression.data_sources import builtin_records, is_builtin

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
    from compression.card.model_card import build_model_card
    from compression.card.facts import collect_facts
    from compression.model_io.source_facts import source_metadata

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
