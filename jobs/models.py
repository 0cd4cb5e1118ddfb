"""Jobs and their events. The database row is the truth about a job.

State machine (every transition is a compare-and-set on the status column, so two processes
racing on one job never both win):

    queued ──claim──> running ──succeed──> succeeded
      │                  ├──fail───────> failed
      │                  └──cancelled──> cancelled   (at a layer boundary, after cancel_requested)
      ├──cancel────────> cancelled
      └──fail──────────> failed        (e.g. the broker refused the message)
"""
from __future__ import annotations

import math
import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone


def db_safe(value: Any) -> Any:
    """``value`` made storable by every database we run on: no NUL characters in strings (PostgreSQL
    refuses them in text and JSON) and no NaN/Infinity in JSON (both refuse those); such floats become
    None, which the pages show as "n/a"."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {db_safe(k) if isinstance(k, str) else k: db_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [db_safe(v) for v in value]
    return value


class Status(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (Status.QUEUED, Status.RUNNING)
FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)


class Job(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    name = models.CharField(max_length=200, blank=True)
    model_source = models.CharField(max_length=500)
    trust_remote_code = models.BooleanField(default=False)
    recipe = models.JSONField()
    recipe_name = models.CharField(max_length=100, blank=True)
    calibration = models.JSONField(default=dict, blank=True)
    evaluation = models.JSONField(default=dict, blank=True)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    cancel_requested = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True)

    progress = models.JSONField(default=dict, blank=True)  # {"stage", "fraction", "message", "layer", "layers"}
    results = models.JSONField(null=True, blank=True)
    error_type = models.CharField(max_length=100, blank=True)
    error_message = models.TextField(blank=True)
    artifact_dir = models.CharField(max_length=300, blank=True)  # relative to ARTIFACT_ROOT
    artifact_bytes = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [  # the job list (a user's jobs, newest first) and the active-job count per user
            models.Index(fields=["owner", "-created_at"], name="job_owner_created"),
            models.Index(fields=["owner", "status"], name="job_owner_status"),
        ]

    def __str__(self) -> str:
        return f"{self.display_name} ({self.status})"

    @property
    def display_name(self) -> str:
        return self.name or f"{self.recipe_name or 'custom'} on {self.model_source}"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    # -- transitions -------------------------------------------------------------------------
    @classmethod
    def _cas(cls, job_id: Any, old: tuple[str, ...], where: dict | None = None, **changes: Any) -> bool:
        """Compare-and-set: apply `changes` only if the job is in one of `old` (and matches `where`).
        True if it was. Values are made storable first (`db_safe`)."""
        changes = {key: db_safe(value) for key, value in changes.items()}
        return cls.objects.filter(pk=job_id, status__in=old, **(where or {})).update(**changes) == 1

    @classmethod
    def claim(cls, job_id: Any, worker: str) -> bool:
        """queued → running. Exactly one caller wins; a redelivered message loses."""
        now = timezone.now()
        return cls._cas(job_id, (Status.QUEUED,), status=Status.RUNNING, started_at=now,
                        heartbeat_at=now, worker=worker[:200],
                        progress={"stage": "starting", "fraction": 0.0, "message": "claimed by worker"})

    @classmethod
    def succeed(cls, job_id: Any, results: dict, artifact_dir: str, artifact_bytes: int) -> bool:
        return cls._cas(job_id, (Status.RUNNING,), status=Status.SUCCEEDED, finished_at=timezone.now(),
                        results=results, artifact_dir=artifact_dir, artifact_bytes=artifact_bytes,
                        progress={"stage": "done", "fraction": 1.0, "message": "finished"})

    @classmethod
    def fail(cls, job_id: Any, error_type: str, message: str, *, heartbeat_before: Any = None,
             from_status: tuple[str, ...] = ACTIVE) -> bool:
        """→ failed, from any of `from_status`. With `heartbeat_before`, only if the job's last heartbeat
        is older than that (the reaper: a heartbeat arriving after it looked proves the worker alive)."""
        where = {"heartbeat_at__lt": heartbeat_before} if heartbeat_before is not None else None
        return cls._cas(job_id, from_status, where, status=Status.FAILED, finished_at=timezone.now(),
                        error_type=error_type[:100], error_message=message)

    @classmethod
    def mark_cancelled(cls, job_id: Any, message: str = "cancelled by the user") -> bool:
        """running → cancelled, once the worker has stopped and cleaned up."""
        return cls._cas(job_id, ACTIVE, status=Status.CANCELLED, finished_at=timezone.now(),
                        progress={"stage": "cancelled", "fraction": 0.0, "message": message})

    @classmethod
    def request_cancel(cls, job_id: Any) -> str | None:
        """Cancel a queued job at once; ask a running one to stop at its next layer boundary.

        Returns the resulting status, or None if the job had already finished.
        """
        if cls._cas(job_id, (Status.QUEUED,), status=Status.CANCELLED, cancel_requested=True,
                    finished_at=timezone.now(),
                    progress={"stage": "cancelled", "fraction": 0.0, "message": "cancelled before it started"}):
            return Status.CANCELLED
        if cls._cas(job_id, (Status.RUNNING,), cancel_requested=True):
            return Status.RUNNING
        return None

    @classmethod
    def cancel_is_requested(cls, job_id: Any) -> bool:
        return cls.objects.filter(pk=job_id, cancel_requested=True).exists()

    @classmethod
    def report_progress(cls, job_id: Any, progress: dict) -> bool:
        """Store the latest progress (only while running) and beat the heart."""
        return cls._cas(job_id, (Status.RUNNING,), progress=progress, heartbeat_at=timezone.now())


class JobEvent(models.Model):
    """One line of a job's log: a stage change, a compressed module, a warning."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    created_at = models.DateTimeField(default=timezone.now)
    level = models.CharField(max_length=10, default="info")
    stage = models.CharField(max_length=40, blank=True)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["job", "id"])]

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.message, self.data = db_safe(self.message), db_safe(self.data)
        super().save(*args, **kwargs)


class CalibrationUpload(models.Model):
    """A calibration file a user uploaded, stored as ``UPLOAD_ROOT/<owner id>/<id><suffix>``.

    Jobs name it by ``source`` (``upload:<id>``); only its owner can use or see it. The original
    file name is kept for display and the model card only, never as a path.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                              related_name="calibration_uploads")
    filename = models.CharField(max_length=255)
    suffix = models.CharField(max_length=8)  # .jsonl | .json | .txt
    size = models.BigIntegerField()
    records = models.IntegerField()
    sha256 = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)

    SOURCE_PREFIX = "upload:"

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.filename} ({self.records} records)"

    @property
    def source(self) -> str:
        return f"{self.SOURCE_PREFIX}{self.id}"

    @property
    def label(self) -> str:
        """How pages and model cards name it."""
        return f"{self.filename} (uploaded)"

    @property
    def stored_name(self) -> str:
        return f"{self.id}{self.suffix}"

    @property
    def directory(self):
        return settings.UPLOAD_ROOT / str(self.owner_id)

    @property
    def path(self):
        return self.directory / self.stored_name
