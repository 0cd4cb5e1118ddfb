"""Celery tasks: ids in, one engine call, results out. The engine knows nothing of Django."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from typing import Any

from celery import shared_task, signals
from billiard.exceptions import WorkerLostError
from django.conf import settings
from django.db import connections

from .models import CalibrationUpload, Job, JobEvent, Status
from .queue import enqueue  # noqa: F401 (jobs.tasks.enqueue, as callers have always imported it)
from .reliability import Heartbeat, Watchdog, fail_lost_job
from .storage import commit_artifact
from .submission import memory_settings
from .uploads import resolve_source

log = logging.getLogger(__name__)

PROGRESS_MIN_INTERVAL_S = 0.5


def job_spec(job: Job) -> dict[str, Any]:
    """Everything the engine needs, as plain JSON, built from the job row and the settings.

    An uploaded calibration file (``upload:<id>``) becomes its stored name inside the owner's upload
    directory (``calibration_dir``), labelled with the name it was uploaded under.
    """
    from compression.errors import CalibrationError


    calibration = dict(job.calibration or {})
    calibration_dir = None
    if str(calibration.get("source", "")).startswith(CalibrationUpload.SOURCE_PREFIX):
        upload = resolve_source(job.owner_id, calibration["source"])
        if upload is None or not upload.path.is_file():
            raise CalibrationError(f"the uploaded calibration file {calibration['source']} no longer exists")
        calibration.update(source=upload.stored_name, label=upload.label)
        calibration_dir = str(upload.directory)
    return {
        "job_id": str(job.id),
        "model": job.model_source,
        "trust_remote_code": job.trust_remote_code,
        "recipe": job.recipe,
        "calibration": calibration,
        "calibration_dir": calibration_dir,
        "evaluation": job.evaluation,
        "allowed_roots": list(settings.COMPRESSOR_MODEL_ROOTS),
        "data_dir": settings.COMPRESSOR_DATA_DIR,
        "cache_dir": str(settings.CACHE_ROOT),
        "device": settings.COMPRESSOR_DEVICE,
        **memory_settings(),  # the memory plan the submission already applied, applied again before any work
        "owner_id": job.owner_id,
        "finetune_data": finetune_data(job),
    }


def finetune_data(job: Job) -> dict | None:
    """The recipe's fine-tuning dataset when it is an upload: its stored file, directory and label
    (``compression.pipeline`` reads it instead of the recipe's ``upload:<id>``)."""
    from compression.errors import CalibrationError


    for stage in (job.recipe or {}).get("stages", {}).values():
        for mods in (stage or {}).values():
            args = (mods or {}).get("DistillationFinetuneModifier") if isinstance(mods, dict) else None
            source = str((args or {}).get("dataset", ""))
            if source.startswith(CalibrationUpload.SOURCE_PREFIX):
                upload = resolve_source(job.owner_id, source)
                if upload is None or not upload.path.is_file():
                    raise CalibrationError(f"the uploaded fine-tuning file {source} no longer exists",
                                           "recipe.finetune.dataset")
                return {"source": upload.stored_name, "data_dir": str(upload.directory), "label": upload.label}
    return None


class ProgressRecorder:
    """Turns engine progress events into the job's progress field and its event log."""

    def __init__(self, job_id: Any):
        self.job_id = job_id
        self.last_write = 0.0
        self.last_stage = None
        self.stage_started = None  # wall clock, for the ETA's measured stage rates (jobs/eta.py)
        self.stage_seconds: dict[str, float] = {}

    def _time_stages(self, stage: str, event: dict) -> dict:
        """``event`` plus when its stage started and how long each finished stage took."""
        from django.utils import timezone

        now = timezone.now()
        if stage != self.last_stage:
            if self.last_stage is not None and self.stage_started is not None:
                self.stage_seconds[self.last_stage] = round(
                    self.stage_seconds.get(self.last_stage, 0.0) + (now - self.stage_started).total_seconds(), 2)
            self.stage_started = now
        return {**event, "stage_started_at": self.stage_started.isoformat(),
                "stage_seconds": dict(self.stage_seconds)}

    def __call__(self, event: dict) -> None:
        stage = event.get("stage", "")
        event = self._time_stages(stage, event)
        is_layer_event = "module" in event or event.get("kind") in ("layer", "reconstruction", "autoround", "finetune")
        if is_layer_event or stage != self.last_stage or event.get("level") in ("warning", "error"):
            JobEvent.objects.create(job_id=self.job_id, stage=stage[:40], level=event.get("level", "info"),
                                    message=str(event.get("message", ""))[:2000],
                                    data={k: v for k, v in event.items()
                                          if k not in ("message", "level", "stage_seconds", "stage_started_at")})
        now = time.monotonic()
        if stage != self.last_stage or now - self.last_write >= PROGRESS_MIN_INTERVAL_S:
            Job.report_progress(self.job_id, {k: v for k, v in event.items() if k != "level"})
            self.last_write = now
            self.last_stage = stage


@shared_task(name="jobs.tasks.run_job", acks_late=True, ignore_result=True)
def run_job(job_id: str) -> None:
    """Run one compression job. Claimed by compare-and-set: a redelivered message is a no-op."""
    from compression.errors import JobCancelled, describe_failure  # light: no torch

    worker = f"{socket.gethostname()}:{os.getpid()}"
    if not Job.claim(job_id, worker):
        log.warning("job %s was not queued (already claimed, cancelled or deleted); skipping", job_id)
        return
    job = Job.objects.get(pk=job_id)
    out_dir = settings.ARTIFACT_ROOT / str(job.id)
    recorder = ProgressRecorder(job.id)
    try:
        # Imported after the claim: an engine that cannot even be imported fails the job visibly.
        from compression.pipeline import run_job as run_pipeline

        with Heartbeat(job.id):
            results = run_pipeline(job_spec(job), out_dir, progress=recorder,
                                   should_stop=lambda: Job.cancel_is_requested(job_id))
    except JobCancelled:
        Job.mark_cancelled(job_id, "cancelled by the user; temporary files removed")
        JobEvent.objects.create(job_id=job_id, stage="cancelled", message="job cancelled")
        return
    except Exception as exc:  # recorded for the user, then re-raised for Celery's own log
        error_type, message = describe_failure(exc, recorder.last_stage)
        Job.fail(job_id, error_type, message)
        JobEvent.objects.create(job_id=job_id, stage="failed", level="error", message=message[:2000])
        raise
    try:  # a configured bucket gets the artifact before the job may succeed (jobs.storage)
        results = commit_artifact(job.id, out_dir, results)
    except Exception as exc:
        log.exception("job %s: artifact could not be stored", job_id)
        Job.fail(job_id, "ArtifactStoreFailed", f"the job finished but its artifact could not be stored: {exc}")
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    artifact_bytes = int(results.get("artifact", {}).get("bytes", 0))
    try:
        stored = Job.succeed(job_id, results, artifact_dir=str(job.id), artifact_bytes=artifact_bytes)
    except Exception as exc:  # the database refused the results: fail visibly, never stay "running"
        log.exception("job %s: results could not be stored", job_id)
        Job.fail(job_id, "ResultsNotStored", f"the job finished but its results could not be stored: {exc}")
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    if not stored:
        log.warning("job %s changed state while running; results discarded", job_id)
        return
    JobEvent.objects.create(job_id=job_id, stage="done", message="job succeeded")


@signals.task_failure.connect
def _fail_job_of_lost_worker(sender=None, task_id=None, exception=None, args=None, **kwargs) -> None:
    """In the worker's main process: the child running a job died (kill -9, OOM killer)."""
    if isinstance(exception, WorkerLostError) and getattr(sender, "name", "") == run_job.name and args:
        try:
            fail_lost_job(args[0], str(exception) or "the worker process died")
        finally:
            connections.close_all()  # the main process forks the next pool child next: hold no connection


@signals.worker_ready.connect
def _start_watchdog(sender=None, **kwargs) -> None:
    """The watchdog runs on the worker's event loop (main thread), never in a thread of this process:
    it forks pool children, and a child forked while a thread holds a lock inherits it held forever."""
    how = Watchdog().attach(getattr(sender, "controller", None))
    log.info("watchdog started (%s)", how)


@signals.worker_init.connect
def _preload_engine(**kwargs) -> None:
    """Import torch, transformers and the engine once, in the worker's main process, before the pool
    forks: every pool process (a fresh one per job, --max-tasks-per-child 1) starts with them loaded
    instead of paying seconds of imports per job. Importing initialises no CUDA context, so forking
    stays safe."""
    import transformers.modeling_utils  # noqa: F401  (pulls in the attention integrations)
    import transformers.models.llama.modeling_llama  # noqa: F401

    import compression.pipeline  # noqa: F401
    import compression.model_io.runtime  # noqa: F401

    connections.close_all()  # nothing opened here may be inherited by the pool children


__all__ = ["run_job", "enqueue", "job_spec", "Status"]
