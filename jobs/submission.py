"""One validation path for a new job, shared by the HTML form and the REST API.

Errors are `SubmissionError(field, message)` with a dotted field path (`model`,
`recipe.group_size`, `calibration.samples`, `evaluation.tasks` ...) and a message that says what
is allowed. Nothing is written to the database until everything has been validated.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from .errors import SubmissionError
from .models import ACTIVE, CalibrationUpload, Job, JobEvent
from .queue import enqueue
from .uploads import resolve_source

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_SOURCE = "calibration/self_instruct_seed_tasks.jsonl"
PERPLEXITY_TASK = "wikitext2_ppl"
MAX_MODEL_CHARS = 500  # Job.model_source
STORED_JSON_LIMITS = {"recipe": 64_000, "calibration": 2_000, "evaluation": 8_000}  # bytes
PREFLIGHT_PATTERN_BUDGET_S = 1.0
LIMITS = {  # field -> (min, max)
    "calibration.samples": (1, 4096),
    "calibration.seqlen": (16, 8192),
    "evaluation.windows": (1, 1000),
    "evaluation.seqlen": (16, 8192),
    "evaluation.limit": (1, 100000),
    "evaluation.num_fewshot": (0, 25),
    "evaluation.batch_size": (1, 512),
}


@dataclass
class JobRequest:
    owner: Any
    model: str
    recipe: Any  # compression.recipe.Recipe
    calibration: dict
    evaluation: dict
    trust_remote_code: bool = False
    name: str = ""
    preflight: Any = None
    warnings: list[str] = field(default_factory=list)


def available_eval_tasks() -> list[str]:
    """The evaluation tasks this install's worker can run (data directory or Hub)."""
    return [option.name for option in eval_task_options() if option.available]


def eval_task_options() -> list:
    """Every task the form knows, each with whether it can run here and why not
    (compression.data_sources.EvalOption)."""
    from compression.data_sources import eval_options

    return eval_options(settings.COMPRESSOR_DATA_DIR or None)


def _bounded_int(value: Any, name: str, default: int | None) -> int | None:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SubmissionError(name, "must be an integer")
    try:
        number = int(value)
    except ValueError:
        raise SubmissionError(name, "must be an integer") from None
    lo, hi = LIMITS[name]
    if not lo <= number <= hi:
        raise SubmissionError(name, f"must be between {lo} and {hi}, got {number}")
    return number


def clean_calibration(raw: dict | None, owner: Any = None, *, needs_calibration: bool = True) -> dict:
    """Calibration settings with a checked source: ``upload:<id>`` (one of the owner's uploads), a
    file inside the data directory, or a Hub dataset id ``org/name[:split]``."""
    raw = dict(raw or {})
    unknown = set(raw) - {"source", "samples", "seqlen", "calibrate_all_experts"}
    if unknown:
        raise SubmissionError(f"calibration.{sorted(unknown)[0]}",
                              "unknown field; allowed: source, samples, seqlen, calibrate_all_experts")
    all_experts = raw.get("calibrate_all_experts", False)
    if not isinstance(all_experts, bool):
        raise SubmissionError("calibration.calibrate_all_experts", "must be true or false (MoE models: every "
                              "expert's statistics see every calibration token)")
    given = raw.get("source")
    source = given or default_calibration_source()
    if not isinstance(source, str) or len(source) > 300:
        raise SubmissionError("calibration.source", "must be a data-directory file or a Hugging Face dataset id")
    source = source.strip()
    if given or needs_calibration:
        if not is_builtin_source(source):
            check_calibration_source(source, owner)
        check_calibration_available(source)
    return {"source": source,
            "samples": _bounded_int(raw.get("samples"), "calibration.samples", 128),
            "seqlen": _bounded_int(raw.get("seqlen"), "calibration.seqlen", 512),
            **({"calibrate_all_experts": True} if all_experts else {})}


def check_calibration_source(source: str, owner: Any) -> None:
    """Exactly one of: one of the owner's uploads, a data-directory file, or a Hub dataset id that is
    never resolved against the server's filesystem (``compression.calibration.classify_source``, the
    same check the worker repeats before it reads anything)."""
    from compression.calibration import classify_source
    from compression.errors import CalibrationError

    if source.startswith(CalibrationUpload.SOURCE_PREFIX):
        if owner is None or resolve_source(owner.pk, source) is None:
            raise SubmissionError("calibration.source", f"{source!r} names none of your uploaded calibration files")
        return
    try:
        classify_source(source, settings.COMPRESSOR_DATA_DIR or None)
    except CalibrationError as exc:
        raise SubmissionError("calibration.source", exc.message) from None


def default_calibration_source() -> str:
    """The data directory's calibration file, else the Hub default when the worker is online, else
    the built-in set (compression.data_sources)."""
    from compression.data_sources import default_calibration_source as default

    return default(settings.COMPRESSOR_DATA_DIR or None)


def is_builtin_source(source: str) -> bool:
    from compression.data_sources import is_builtin

    return is_builtin(source)


def check_calibration_available(source: str) -> None:
    """Refuse a calibration source this install cannot provide: an unknown built-in set, a
    data-directory file with no data directory configured, a Hub dataset while the Hub is off."""
    from compression.data_sources import (BUILTIN_CALIBRATION, DataUnavailable, builtin_path, is_builtin,
                                          offline_reason)

    if is_builtin(source):
        try:
            builtin_path(source)
        except DataUnavailable as exc:
            raise SubmissionError("calibration.source", str(exc)) from None
        return
    if source.startswith(CalibrationUpload.SOURCE_PREFIX):
        return
    instead = f"use {BUILTIN_CALIBRATION} (built in), one of your uploads or "
    file_like = source.endswith((".jsonl", ".json", ".txt", ".raw", ".tokens")) or source.startswith((".", "/"))
    if file_like and not settings.COMPRESSOR_DATA_DIR:
        raise SubmissionError("calibration.source", f"{source!r} names a data-directory file, but no data "
                                                    f"directory is configured (COMPRESSOR_DATA_DIR); "
                                                    f"{instead}a Hugging Face dataset id")
    looks_local = settings.COMPRESSOR_DATA_DIR and (Path(settings.COMPRESSOR_DATA_DIR) / source).exists()
    if not file_like and not looks_local and offline_reason():  # classify_source took it as a Hub dataset id
        raise SubmissionError("calibration.source", f"{source!r} is a Hugging Face dataset, but the worker is "
                                                    f"offline ({offline_reason()}); {instead}a data-directory file")


def clean_evaluation(raw: dict | None) -> dict:
    raw = dict(raw or {})
    allowed = {"tasks", "windows", "seqlen", "limit", "num_fewshot", "batch_size", "apply_chat_template",
               "data_source", "speed"}
    unknown = set(raw) - allowed
    if unknown:
        raise SubmissionError(f"evaluation.{sorted(unknown)[0]}",
                              f"unknown field; allowed: {', '.join(sorted(allowed))}")
    tasks = raw.get("tasks")
    if tasks is None:  # not given: perplexity when this install can compute it, else no accuracy evaluation
        from compression.data_sources import default_eval_tasks

        tasks = default_eval_tasks(settings.COMPRESSOR_DATA_DIR or None)
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise SubmissionError("evaluation.tasks", "must be a list of task names (an empty list: no accuracy "
                                                  "evaluation)")
    if len(tasks) > 20:
        raise SubmissionError("evaluation.tasks", "at most 20 tasks per job")
    data_source = raw.get("data_source") or "auto"
    if data_source not in ("auto", "local", "hub"):
        raise SubmissionError("evaluation.data_source", "must be one of auto, local, hub")
    check_tasks_available(tasks, data_source)
    chat = raw.get("apply_chat_template", False)
    if not isinstance(chat, bool):
        raise SubmissionError("evaluation.apply_chat_template", "must be true or false")
    speed = raw.get("speed", True)
    if not isinstance(speed, bool):
        raise SubmissionError("evaluation.speed", "must be true or false")
    return {
        "tasks": list(dict.fromkeys(tasks)),
        "speed": speed,
        "windows": _bounded_int(raw.get("windows"), "evaluation.windows", settings.COMPRESSOR_EVAL_WINDOWS),
        "seqlen": _bounded_int(raw.get("seqlen"), "evaluation.seqlen", 512),
        "limit": _bounded_int(raw.get("limit"), "evaluation.limit", None),
        "num_fewshot": _bounded_int(raw.get("num_fewshot"), "evaluation.num_fewshot", None),
        "batch_size": _batch_size(raw.get("batch_size")),
        "apply_chat_template": chat,
        "data_source": data_source,
    }


def _batch_size(value: Any) -> int | str:
    """lm-eval's batch size: an integer in range, or "auto" (lm-eval finds the largest that fits)."""
    if value == "auto":
        return "auto"
    try:
        return _bounded_int(value, "evaluation.batch_size", 1)
    except SubmissionError as exc:
        lo, hi = LIMITS["evaluation.batch_size"]
        raise SubmissionError("evaluation.batch_size", f'must be an integer between {lo} and {hi}, or "auto"'
                              + ("" if "integer" in exc.message else f" ({exc.message})")) from None


def check_tasks_available(tasks: list[str], data_source: str) -> None:
    """Every task must be runnable by this install's worker (data directory or Hub) and known to lm-eval."""
    from compression.data_sources import DataUnavailable, check_eval_tasks

    try:
        check_eval_tasks(tasks, data_source, settings.COMPRESSOR_DATA_DIR or None)
    except DataUnavailable as exc:
        raise SubmissionError("evaluation.tasks", str(exc)) from None


def build_recipe(*, preset: str | None, preset_options: dict | None, recipe_yaml: str | None,
                 recipe_dict: dict | None):
    from compression.recipe import Recipe, RecipeError

    try:
        if recipe_yaml and recipe_yaml.strip():
            return Recipe.from_yaml(recipe_yaml)
        if recipe_dict:
            return Recipe.from_dict(recipe_dict)
        if not preset:
            raise SubmissionError("recipe.preset", "choose a preset or give a recipe")
        return Recipe.from_preset(preset, **(preset_options or {}))
    except RecipeError as exc:
        prefix = "recipe.yaml" if recipe_yaml else "recipe"
        field_path = exc.field if exc.field.startswith("recipe") else f"{prefix}.{exc.field}"
        raise SubmissionError(field_path, exc.message) from None


def validate_submission(owner, *, model: str, preset: str | None = None, preset_options: dict | None = None,
                        recipe_yaml: str | None = None, recipe_dict: dict | None = None,
                        calibration: dict | None = None, evaluation: dict | None = None,
                        trust_remote_code: bool = False, name: str = "") -> JobRequest:
    """Validate everything about a new job, including the pre-flight check against the model's config."""
    from compression.model_io.loading import ModelSourceError, load_config
    from compression.model_io.streaming import MemoryPlanError
    from compression.preflight import model_layout, preflight
    from compression.recipe import RecipeError, pattern_time_budget

    check_active_limit(owner)  # early, before the costly checks; create_job checks again, atomically
    model = clean_model(model)
    if not isinstance(name or "", str) or len(name or "") > 200:
        raise SubmissionError("name", "at most 200 characters")
    recipe = build_recipe(preset=preset, preset_options=preset_options, recipe_yaml=recipe_yaml,
                          recipe_dict=recipe_dict)
    calibration = clean_calibration(calibration, owner, needs_calibration=recipe.needs_calibration)
    evaluation = clean_evaluation(evaluation)
    device = worker_device()
    try:
        config = load_config(model, allowed_roots=settings.COMPRESSOR_MODEL_ROOTS,
                             trust_remote_code=trust_remote_code)
        with pattern_time_budget(PREFLIGHT_PATTERN_BUDGET_S):  # user re: patterns run inside this request
            layout = model_layout(config, trust_remote_code=trust_remote_code)
            report = preflight(config, recipe, samples=calibration["samples"], seqlen=calibration["seqlen"],
                               device=device, trust_remote_code=trust_remote_code, layout=layout)
        check_memory_plan(model, config, recipe, report, layout, calibration, device=device,
                          trust_remote_code=trust_remote_code)  # cheap; before a fine-tune dataset is counted
        notes = check_finetune(recipe, config, owner, model=model, trust_remote_code=trust_remote_code)
    except ModelSourceError as exc:
        raise SubmissionError("model", exc.message) from None
    except MemoryPlanError as exc:
        raise SubmissionError(*memory_plan_field(exc)) from None
    except RecipeError as exc:  # "model": the engine cannot walk it; anything else is in the recipe
        field_path = exc.field if exc.field.startswith(("recipe", "model")) else f"recipe.{exc.field}"
        raise SubmissionError(field_path, exc.message) from None
    request = JobRequest(owner=owner, model=model, recipe=recipe, calibration=calibration,
                         evaluation=evaluation, trust_remote_code=bool(trust_remote_code), name=name or "",
                         preflight=report, warnings=notes)
    check_stored_sizes(request)
    return request


def memory_settings() -> dict:
    """The memory-plan settings, as the job spec carries them to the worker (jobs.tasks.job_spec) and
    as compression.model_io.streaming reads them (empty: unset)."""
    return {"streaming": str(getattr(settings, "COMPRESSOR_STREAMING", "") or ""),
            "host_memory_bytes": str(getattr(settings, "COMPRESSOR_HOST_MEMORY_BYTES", "") or ""),
            "device_memory_bytes": str(getattr(settings, "COMPRESSOR_DEVICE_MEMORY_BYTES", "") or "")}


def worker_device() -> str:
    """The device the worker computes on, as this deployment configures it (COMPRESSOR_DEVICE; "auto":
    a CUDA device when this host has one, as the worker decides on its own host)."""
    name = str(getattr(settings, "COMPRESSOR_DEVICE", "") or "auto").strip()
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_memory_plan(model: str, config: Any, recipe: Any, report: Any, layout: Any, calibration: dict, *,
                      device: str, trust_remote_code: bool = False):
    """The worker's memory plan (compression.model_io.streaming.plan_memory), made before the job is
    queued with the settings the worker is given (:func:`memory_settings`: COMPRESSOR_STREAMING,
    COMPRESSOR_HOST_MEMORY_BYTES, COMPRESSOR_DEVICE_MEMORY_BYTES): a job the worker would refuse is
    refused here, with the same MemoryPlanError. A budget this deployment leaves unset is the
    worker's free memory, which only the worker can measure: that part is checked there alone. Whether
    the model can stream is worked out only when the plan needs it: a local directory's shard headers
    are read; a Hub model's shards are not downloaded here, so only its config speaks (the worker
    checks the headers again)."""
    from compression.model_io import streaming
    from compression.sequential import offloadable

    setting = streaming.streaming_setting(memory_settings())
    host, device_bytes = streaming.configured_budgets(memory_settings())
    can_stream = None
    in_memory = int(report.peak_host_mb * 2 ** 20)
    if setting == "always" or (setting == "auto" and host is not None and in_memory > host):
        can_stream = _stream_refusal(model, config, recipe, layout, device=device, trust_remote_code=trust_remote_code)
    samples, seqlen = int(calibration["samples"]), int(calibration["seqlen"])
    return streaming.plan_memory(report, device=device, setting=setting, can_stream=can_stream, host_bytes=host,
                                 device_bytes=device_bytes, measure=False, samples=samples, seqlen=seqlen,
                                 offload_ok=offloadable(recipe))


def _stream_refusal(model: str, config: Any, recipe: Any, layout: Any, *, device: str,
                    trust_remote_code: bool) -> str | None:
    """Why the worker could not stream this job's model (None: as far as can be told here, it can)."""
    from compression.model_io.loading import check_model_source, default_dtype
    from compression.model_io.streaming import fused_experts_refusal, stream_refusal
    from compression.recipe import finetune_split

    source = check_model_source(model, allowed_roots=settings.COMPRESSOR_MODEL_ROOTS)
    if source.kind == "demo":
        return "the demo model is a GGUF file"
    if source.kind == "local":
        return stream_refusal(recipe, source.value, config, dtype=default_dtype(device),
                              trust_remote_code=trust_remote_code)
    if finetune_split(recipe)[1] is not None:
        return "the recipe's distillation fine-tune trains the whole model at once"
    quantized = getattr(config, "quantization_config", None)
    if layout.experts_stored_fused and quantized:  # gpt-oss's Hub checkpoints: MXFP4 expert blocks
        return fused_experts_refusal(layout.architecture)
    return None


def memory_plan_field(exc: Any) -> tuple[str, str]:
    """(field, message) of a MemoryPlanError at submission: calibration.samples stays; a budget or
    streaming setting (the operator's, named in the message) becomes ``model``, the field the submitter
    can change; a budget setting that is not a number is the deployment's fault (non_field)."""
    if exc.field in ("calibration.samples", "model"):
        return exc.field, exc.message
    if exc.field in exc.message:
        return "model", exc.message
    return "non_field", f"the server's {exc.field} setting {exc.message}"


def clean_model(model: Any) -> str:
    """The model field as every entry point checks it: a string of at most MAX_MODEL_CHARS naming
    a Hub id, the demo, or a directory inside COMPRESSOR_MODEL_ROOTS (SubmissionError("model") otherwise)."""
    from compression.model_io.loading import ModelSourceError, check_model_source

    if not isinstance(model, str):
        raise SubmissionError("model", "must be a string")
    model = model.strip()
    if len(model) > MAX_MODEL_CHARS:
        raise SubmissionError("model", f"at most {MAX_MODEL_CHARS} characters")
    try:
        check_model_source(model, allowed_roots=settings.COMPRESSOR_MODEL_ROOTS)
    except ModelSourceError as exc:
        raise SubmissionError("model", exc.message) from None
    return model


def recommend_for_model(model: Any, *, trust_remote_code: bool = False) -> dict:
    """compression.recommend.recommend for a model named as on job submission (same checks, same
    config loading); SubmissionError("model", ...) for a model it cannot read or walk."""
    from compression.model_io.loading import ModelSourceError, load_config
    from compression.recipe import RecipeError, pattern_time_budget
    from compression.recommend import recommend

    model = clean_model(model)
    try:
        config = load_config(model, allowed_roots=settings.COMPRESSOR_MODEL_ROOTS,
                             trust_remote_code=trust_remote_code)
        with pattern_time_budget(PREFLIGHT_PATTERN_BUDGET_S * 4):  # one pre-flight per preset and group size
            return {"model": model, **recommend(config, trust_remote_code=trust_remote_code)}
    except ModelSourceError as exc:
        raise SubmissionError("model", exc.message) from None
    except RecipeError as exc:
        raise SubmissionError("model", exc.message) from None


def check_stored_sizes(request: JobRequest) -> None:
    """Every JSON field the job row stores stays within STORED_JSON_LIMITS once serialized (the
    recipe, calibration and evaluation are already built from capped parts; this is the backstop)."""
    import json

    for name, value in (("recipe", request.recipe.to_dict()), ("calibration", request.calibration),
                        ("evaluation", request.evaluation)):
        size = len(json.dumps(value))
        if size > STORED_JSON_LIMITS[name]:
            raise SubmissionError(name, f"too large to store ({size} bytes as JSON; at most "
                                        f"{STORED_JSON_LIMITS[name]})")


def check_active_limit(owner: Any) -> None:
    """SubmissionError if `owner` already has COMPRESSOR_MAX_QUEUED_PER_USER queued or running jobs."""
    limit = settings.COMPRESSOR_MAX_QUEUED_PER_USER
    active = Job.objects.filter(owner=owner, status__in=ACTIVE).count()
    if active >= limit:
        raise SubmissionError("non_field", f"you already have {active} queued or running jobs (limit {limit}); "
                                           "wait for one to finish or cancel one")


def create_job(request: JobRequest) -> Job:
    """Store the validated job (queued) and send it to the worker queue.

    The per-user limit of active jobs holds under concurrent submissions: the count and the insert
    run in one transaction that first locks the owner's user row (SELECT ... FOR UPDATE on
    PostgreSQL; on SQLite every transaction begins IMMEDIATE -- settings -- and so holds the
    database's write lock), so a user's submissions are counted one after another. Raises
    SubmissionError ("non_field") at the limit. The job is sent to the queue only after the commit,
    so a worker never receives a job it cannot see yet.
    """
    from django.contrib.auth import get_user_model

    with transaction.atomic():
        list(get_user_model().objects.select_for_update().filter(pk=request.owner.pk).values_list("pk"))
        check_active_limit(request.owner)
        job = Job.objects.create(
            owner=request.owner, name=request.name, model_source=request.model,
            trust_remote_code=request.trust_remote_code, recipe=request.recipe.to_dict(),
            recipe_name=request.recipe.preset or "custom", calibration=request.calibration,
            evaluation=request.evaluation)
        for note in request.warnings:  # what submission could not check: the job's log says so
            JobEvent.objects.create(job=job, stage="queued", level="info", message=note)
    enqueue(job)
    return job


def check_finetune(recipe, model_config, owner, *, model: str | None = None,
                   trust_remote_code: bool = False) -> list[str]:
    """A recipe's fine-tune stage, before queueing: its dataset is one the submitter may use (same
    rules as calibration sources), a data-directory file or upload holds enough tokens for the budget,
    and the budget fits the worker's memory (COMPRESSOR_WORKER_MEMORY_GB). Raises RecipeError naming
    the field; returns notes for the job's log about what could not be checked here.

    A local dataset is counted as the worker packs it (compression.algorithms.distill.record_token_ids)
    with the model's tokenizer; first, cheaply, against an upper bound that needs no tokenizer
    (one token per UTF-8 byte plus special tokens and a chat-template allowance), and with that bound
    alone when the tokenizer cannot be read here (a model with custom code, a Hub model not
    reachable). A Hub dataset is only checked by the worker, before any pruning."""
    from compression.algorithms.distill import check_memory, count_training_tokens, record_tokens_bound
    from compression.calibration import classify_source, parse_records
    from compression.errors import CalibrationError, RecipeError
    from compression.recipe import FINETUNE

    notes = []
    for i, stage in enumerate(recipe.stages):
        m = stage.modifiers[0]
        if m.kind != FINETUNE:
            continue
        path, settings = f"recipe.stages[{i}].modifiers[0]", m.finetune
        source, file = settings.dataset.strip(), None
        if source.startswith(CalibrationUpload.SOURCE_PREFIX):
            upload = resolve_source(owner.pk, source) if owner is not None else None
            if upload is None or not upload.path.is_file():
                raise RecipeError(f"{path}.dataset", f"{source!r} names none of your uploaded files")
            file = upload.path
        else:
            try:
                where = classify_source(source, settings_dir())
            except CalibrationError as exc:
                raise RecipeError(f"{path}.dataset", exc.message) from None
            file = where.path if where.kind == "file" else None
        check_memory(model_config, settings, int(settings_memory_gb() * 2 ** 30), path)  # before any tokenizing
        need = settings.windows_needed * settings.seq_len
        budget_field = f"{path}.tokens" if settings.tokens is not None else f"{path}.steps"
        budget = f"{need:,} ({settings.total_steps} steps × {settings.tokens_per_step} tokens)"
        if file is None:
            notes.append(f"The fine-tuning dataset {source!r} is a Hugging Face Hub dataset, so its size was not "
                         f"checked before queueing; the worker checks that it holds the {need:,} tokens the "
                         "budget needs before any pruning.")
        else:
            try:
                records = parse_records(file.read_text(encoding="utf-8", errors="replace"), file.suffix)
            except CalibrationError as exc:
                raise RecipeError(f"{path}.dataset", exc.message) from None
            bound = sum(record_tokens_bound(r) for r in records)
            if bound < need:
                raise RecipeError(budget_field, f"the dataset {source!r} holds at most {bound:,} tokens but the "
                                                f"budget needs {budget}; lower it or use a larger dataset")
            tokenizer = None if trust_remote_code or model is None else _tokenizer(model)
            if tokenizer is None:
                notes.append(f"The fine-tuning dataset {source!r} was checked against an upper bound of its "
                             f"tokens ({bound:,}), not with the model's tokenizer; the worker counts them "
                             "exactly before any pruning.")
            else:
                tokens, exact = count_training_tokens(records, tokenizer, need)
                if tokens < need:
                    held = f"{tokens:,} tokens" if exact else f"at most {tokens:,} tokens"
                    raise RecipeError(budget_field, f"the dataset {source!r} holds {held} with the model's "
                                                    f"tokenizer but the budget needs {budget}; lower it or use "
                                                    "a larger dataset")
    return notes


def _tokenizer(model: str):
    """The model's tokenizer for counting a dataset, or None when it cannot be read here."""
    from compression.model_io.loading import load_tokenizer

    try:
        return load_tokenizer(model, allowed_roots=settings.COMPRESSOR_MODEL_ROOTS)
    except Exception as exc:  # noqa: BLE001 - any failure only means the cheaper bound is used
        log.info("no tokenizer for %s at submission (%s); fine-tuning tokens bounded instead", model, exc)
        return None


def settings_dir():
    return settings.COMPRESSOR_DATA_DIR or None


def settings_memory_gb() -> float:
    return float(getattr(settings, "COMPRESSOR_WORKER_MEMORY_GB", 80))
