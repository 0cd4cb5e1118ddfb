"""Jobs in the database are the truth; the broker and the workers may die at any time.

Chosen policy (documented in docs/architecture.md):
* A worker killed in the middle of a job never leaves it `running`. Celery's main process sees
  the child die (WorkerLostError) and the job is failed at once with "worker lost"; if the whole
  worker or machine died, the job's heartbeat stops and the watchdog fails it after
  COMPRESSOR_WORKER_LOST_AFTER_S. Lost jobs are failed, not re-run: a job that killed its worker
  (out of memory, say) would only kill the next one.
* A Redis restart loses no queued job: the watchdog re-sends every queued job that has been
  queued for COMPRESSOR_REQUEUE_AFTER_S and is neither waiting in the broker's queue nor held
  unacknowledged by a worker. A message sent twice is harmless: the claim is a compare-and-set.
"""
from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta
from typing import Any, Iterable

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from .models import Job, JobEvent, Status

log = logging.getLogger(__name__)

WORKER_LOST = "WorkerLost"
QUEUE = "gpu"


class Heartbeat:
    """Beats a running job's heart from a background thread while the task works."""

    def __init__(self, job_id: Any, interval: float | None = None):
        self.job_id = job_id
        self.interval = interval if interval is not None else settings.COMPRESSOR_HEARTBEAT_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                Job.objects.filter(pk=self.job_id, status=Status.RUNNING).update(heartbeat_at=timezone.now())
            except Exception:  # a database hiccup must not kill the job; the next beat retries
                log.exception("heartbeat for job %s failed", self.job_id)
            finally:
                close_old_connections()

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def fail_lost_job(job_id: Any, reason: str, *, heartbeat_before: Any = None) -> bool:
    """Fail a running job whose worker died; remove its temporary output."""
    if not Job.fail(job_id, WORKER_LOST, f"worker lost: {reason}. The job was not retried; resubmit it.",
                    heartbeat_before=heartbeat_before):
        return False
    JobEvent.objects.create(job_id=job_id, stage="failed", level="error", message=f"worker lost: {reason}")
    remove_temporary_output(job_id)
    log.warning("job %s failed: worker lost (%s)", job_id, reason)
    return True


def remove_temporary_output(job_id: Any) -> None:
    import shutil

    root = settings.ARTIFACT_ROOT
    if root.is_dir():
        for path in root.glob(f".tmp-{job_id}-*"):
            shutil.rmtree(path, ignore_errors=True)


def reap_stale_running(now=None) -> list[str]:
    """Fail running jobs whose heartbeat is older than COMPRESSOR_WORKER_LOST_AFTER_S."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.COMPRESSOR_WORKER_LOST_AFTER_S)
    reaped = []
    for job_id in Job.objects.filter(status=Status.RUNNING, heartbeat_at__lt=cutoff).values_list("pk", flat=True):
        if fail_lost_job(job_id, f"no heartbeat for more than {settings.COMPRESSOR_WORKER_LOST_AFTER_S}s",
                         heartbeat_before=cutoff):
            reaped.append(str(job_id))
    return reaped


def broker_job_ids(app=None) -> set[str] | None:
    """Job ids waiting in the gpu queue or unacknowledged on a worker; None if the broker is down."""
    import redis

    from compressor_ui.celery import app as celery_app

    app = app or celery_app
    client = redis.Redis.from_url(app.conf.broker_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        waiting: Iterable[bytes] = client.lrange(QUEUE, 0, -1)
        unacked: Iterable[bytes] = client.hvals("unacked")
    except redis.exceptions.RedisError:
        return None
    ids: set[str] = set()
    for raw in list(waiting) + list(unacked):
        ids.update(_job_ids_in_message(raw))
    return ids


def _job_ids_in_message(raw: bytes) -> list[str]:
    try:
        payload = json.loads(raw)
        if isinstance(payload, list):  # unacked entries are [message, exchange, routing_key]
            payload = payload[0]
        headers = payload.get("headers") or {}
        argsrepr = headers.get("argsrepr") or ""
        return [part.strip(" '\"[]()") for part in argsrepr.split(",") if part.strip(" '\"[]()")]
    except (ValueError, AttributeError, IndexError, TypeError):
        return []


def requeue_missing_queued(now=None) -> list[str]:
    """Re-send queued jobs that the broker no longer holds (e.g. after a Redis restart)."""
    from .tasks import enqueue

    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.COMPRESSOR_REQUEUE_AFTER_S)
    candidates = list(Job.objects.filter(status=Status.QUEUED, created_at__lt=cutoff))
    if not candidates:
        return []
    present = broker_job_ids()
    if present is None:
        log.warning("broker unreachable; %d queued jobs wait for it to come back", len(candidates))
        return []
    resent = []
    for job in candidates:
        if str(job.id) not in present:
            enqueue(job, fail_if_unreachable=False)
            JobEvent.objects.create(job=job, stage="queued", level="warning",
                                    message="the broker had lost this job's message; re-sent")
            resent.append(str(job.id))
    if resent:
        log.warning("re-sent %d queued jobs missing from the broker: %s", len(resent), ", ".join(resent))
    return resent


def watchdog_pass() -> dict:
    try:
        return {"reaped": reap_stale_running(), "requeued": requeue_missing_queued()}
    finally:
        close_old_connections()


class Watchdog:
    """Runs watchdog_pass every COMPRESSOR_WATCHDOG_INTERVAL_S in a daemon thread of the worker's
    main process (every worker runs one; all their actions are compare-and-set, so that is safe)."""

    def __init__(self, interval: float | None = None):
        self.interval = interval if interval is not None else settings.COMPRESSOR_WATCHDOG_INTERVAL_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compressor-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            try:
                watchdog_pass()
            except Exception:
                log.exception("watchdog pass failed")
            if self._stop.wait(self.interval):
                return
