"""Jobs in the database are the truth; the broker and the workers may die or hang at any time.

Chosen policy (documented in docs/architecture.md, "Reliability policy"):
* A worker killed in the middle of a job never leaves it `running`. Celery's main process sees
  the child die (WorkerLostError) and the job is failed at once with "worker lost". If the worker's
  main process dies (its pool children die with it: prefork sets PDEATHSIG), the job's heartbeat
  stops; the supervisor (`make run`, docker-compose's restart policy) starts the worker again and its
  watchdog fails the job once LOST_PROCESS_BEATS heartbeats are missed and its process is gone from
  this host; any worker's watchdog fails it anyway after COMPRESSOR_WORKER_LOST_AFTER_S. Lost jobs
  are failed, not re-run: a job that killed its worker (out of memory, say) would only kill the next.
* A job whose message a worker took but never started (its pool process hangs) is failed after the
  claim deadline COMPRESSOR_CLAIM_DEADLINE_S as `ClaimTimeout`, and the worker holding it kills the
  stuck pool process so that it takes jobs again.
* A Redis restart loses no queued job: the watchdog re-sends every queued job that has been
  queued for COMPRESSOR_REQUEUE_AFTER_S and is neither waiting in the broker's queue nor held
  unacknowledged by a worker. A message sent twice is harmless: the claim is a compare-and-set.
* The watchdog runs on the worker's event loop in its main thread, never in a thread of a process
  that forks (see `Watchdog`), and leaves no database connection open between passes.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable

from django.conf import settings
from django.db import close_old_connections, connections
from django.utils import timezone

from .models import Job, JobEvent, Status
from .queue import enqueue

log = logging.getLogger(__name__)

WORKER_LOST = "WorkerLost"
CLAIM_TIMEOUT = "ClaimTimeout"
QUEUE = "gpu"
RUN_JOB = "jobs.tasks.run_job"
LOST_PROCESS_BEATS = 3  # missed heartbeats before a job whose process is gone from this host is failed


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


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def reap_lost_processes(now=None) -> list[str]:
    """Fail running jobs claimed by a pool process of this host that no longer exists, once their
    heartbeat is LOST_PROCESS_BEATS beats late: the fast path after a worker's main process was killed
    (its pool children die with it) and the supervisor restarted the worker, long before
    COMPRESSOR_WORKER_LOST_AFTER_S. A job whose pid exists (or was reused) is left to that timeout;
    a job of another host with the same name still beats its heart, so it is never touched."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=LOST_PROCESS_BEATS * settings.COMPRESSOR_HEARTBEAT_S)
    prefix = f"{socket.gethostname()}:"
    reaped = []
    for job_id, worker in Job.objects.filter(status=Status.RUNNING, heartbeat_at__lt=cutoff,
                                             worker__startswith=prefix).values_list("pk", "worker"):
        pid = worker[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid() or process_exists(int(pid)):
            continue
        reason = f"no heartbeat for more than {(now - cutoff).total_seconds():.0f}s and its process {worker} is gone"
        if fail_lost_job(job_id, reason, heartbeat_before=cutoff):
            reaped.append(str(job_id))
    return reaped


@dataclass
class BrokerSnapshot:
    """What the broker holds for the `gpu` queue: job ids whose message waits in the queue, and job
    ids whose message a worker has taken (unacknowledged) with the newest time it was taken."""

    waiting: set[str] = field(default_factory=set)
    taken: dict[str, float] = field(default_factory=dict)

    def holds(self, job_id: str) -> bool:
        return job_id in self.waiting or job_id in self.taken


def broker_snapshot(app=None) -> BrokerSnapshot | None:
    """Read the Redis transport's queue list and its `unacked` hash + `unacked_index` (delivery tag →
    the time a worker took the message); None if the broker is unreachable."""
    import redis

    from compressor_ui.celery import app as celery_app

    app = app or celery_app
    client = redis.Redis.from_url(app.conf.broker_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        waiting_raw: Iterable[bytes] = client.lrange(QUEUE, 0, -1)
        unacked: dict[bytes, bytes] = client.hgetall("unacked")
        taken_at: dict[bytes, float] = dict(client.zrange("unacked_index", 0, -1, withscores=True))
    except redis.exceptions.RedisError:
        return None
    finally:
        client.close()
    snapshot = BrokerSnapshot()
    for raw in waiting_raw:
        snapshot.waiting.update(_job_ids_in_message(raw))
    for tag, raw in unacked.items():
        when = taken_at.get(tag, 0.0)
        for job_id in _job_ids_in_message(raw):
            snapshot.taken[job_id] = max(when, snapshot.taken.get(job_id, 0.0))
    return snapshot


def broker_job_ids(app=None) -> set[str] | None:
    """Job ids waiting in the gpu queue or unacknowledged on a worker; None if the broker is down."""
    snapshot = broker_snapshot(app)
    return None if snapshot is None else snapshot.waiting | set(snapshot.taken)


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


def requeue_missing_queued(now=None, snapshot: BrokerSnapshot | None = None) -> list[str]:
    """Re-send queued jobs that the broker no longer holds (e.g. after a Redis restart)."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.COMPRESSOR_REQUEUE_AFTER_S)
    candidates = list(Job.objects.filter(status=Status.QUEUED, created_at__lt=cutoff))
    if not candidates:
        return []
    snapshot = snapshot or broker_snapshot()
    if snapshot is None:
        log.warning("broker unreachable; %d queued jobs wait for it to come back", len(candidates))
        return []
    resent = []
    for job in candidates:
        if not snapshot.holds(str(job.id)):
            enqueue(job, fail_if_unreachable=False)
            JobEvent.objects.create(job=job, stage="queued", level="warning",
                                    message="the broker had lost this job's message; re-sent")
            resent.append(str(job.id))
    if resent:
        log.warning("re-sent %d queued jobs missing from the broker: %s", len(resent), ", ".join(resent))
    return resent


def fail_unclaimed(now=None, snapshot: BrokerSnapshot | None = None,
                   on_expired: Callable[[str], None] | None = None) -> list[str]:
    """The claim deadline: fail queued jobs whose message a worker took more than
    COMPRESSOR_CLAIM_DEADLINE_S ago without ever claiming the job (its pool process is stuck, e.g. a
    child forked while another thread held a lock). Claiming is the first thing a task does, so such a
    job never started and nothing of it needs cleaning up. A job whose message (also) waits in the
    queue is only waiting for a free worker and is left alone. `on_expired(job_id)` lets the worker
    that holds the message kill its stuck pool process."""
    deadline_s = settings.COMPRESSOR_CLAIM_DEADLINE_S
    now = now or timezone.now()
    candidates = [str(pk) for pk in Job.objects.filter(
        status=Status.QUEUED, created_at__lt=now - timedelta(seconds=deadline_s)).values_list("pk", flat=True)]
    if not candidates:
        return []
    snapshot = snapshot or broker_snapshot()
    if snapshot is None:
        return []
    expired = []
    for job_id in candidates:
        taken = snapshot.taken.get(job_id)
        if job_id in snapshot.waiting or taken is None:
            continue
        waited = now.timestamp() - taken
        if waited <= deadline_s:
            continue
        message = (f"a worker took this job from the queue {waited:.0f} s ago but never started it (claim "
                   f"deadline COMPRESSOR_CLAIM_DEADLINE_S={deadline_s} s; the worker's pool process was stuck "
                   "or the worker died). The job did not run; resubmit it.")
        if Job.fail(job_id, CLAIM_TIMEOUT, message, from_status=(Status.QUEUED,)):
            JobEvent.objects.create(job_id=job_id, stage="failed", level="error", message=message)
            log.error("job %s failed: %s", job_id, message)
            expired.append(job_id)
            if on_expired is not None:
                on_expired(job_id)
    return expired


def watchdog_pass(on_expired: Callable[[str], None] | None = None) -> dict:
    """One round of every check. Leaves no database connection open: the worker's main process forks
    pool processes right after, and a forked child must not inherit a connection."""
    try:
        now = timezone.now()
        result = {"lost": reap_lost_processes(now), "reaped": reap_stale_running(now)}
        snapshot = broker_snapshot()
        result["unclaimed"] = fail_unclaimed(now, snapshot, on_expired) if snapshot else []
        result["requeued"] = requeue_missing_queued(now, snapshot) if snapshot else []
        if snapshot is None and Job.objects.filter(status=Status.QUEUED).exists():
            log.warning("broker unreachable; queued jobs wait for it to come back")
        return result
    finally:
        connections.close_all()


def kill_stuck_request(job_id: str) -> int | None:
    """In a worker's main process: SIGKILL the pool process that holds `job_id`'s task, if this worker
    holds it, so the pool replaces it and the worker takes jobs again. Returns the pid killed."""
    from celery.worker import state

    for request in list(state.active_requests) + list(state.reserved_requests):
        if request.name != RUN_JOB or not request.args or str(request.args[0]) != job_id:
            continue
        pid = request.worker_pid
        if pid is None and request._apply_result is not None:  # written to a process that never accepted it
            result = request._apply_result()
            proc = getattr(result, "_write_to", None) or getattr(result, "_scheduled_for", None)
            pid = getattr(proc, "pid", None)
        if pid and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return None
            log.error("killed stuck pool process %s holding job %s", pid, job_id)
            return pid
    return None


class Watchdog:
    """Runs `watchdog_pass` every COMPRESSOR_WATCHDOG_INTERVAL_S in every worker (all its actions are
    compare-and-set, so several workers running it is safe).

    It never runs in a thread of a process that forks: the prefork pool forks a fresh child per job
    from the worker's main process, and a child forked while another thread holds a lock (SQLite's,
    logging's, a connection pool's) inherits the lock held forever. So in the prefork worker it runs as
    a timer on the worker's own event loop, in the main thread, between the loop's other work (where
    the pool also forks); a pool that does not fork (solo, threads) may run it in a thread.
    """

    def __init__(self, interval: float | None = None):
        self.interval = interval if interval is not None else settings.COMPRESSOR_WATCHDOG_INTERVAL_S
        self._stop = threading.Event()

    def tick(self) -> None:
        try:
            watchdog_pass(on_expired=kill_stuck_request)
        except Exception:
            log.exception("watchdog pass failed")

    def attach(self, worker) -> str:
        """Start in a Celery WorkController: on its event loop if it has one, else in a thread if its pool
        does not fork. Returns how it runs."""
        hub = getattr(worker, "hub", None)
        if hub is not None:
            hub.call_soon(self.tick)
            hub.call_repeatedly(self.interval, self.tick)
            return "event loop"
        pool_name = type(getattr(worker, "pool", None)).__module__
        if "prefork" in pool_name:
            log.error("the prefork pool runs without an event loop here; the watchdog is NOT started in a "
                      "thread (a forked child could inherit a held lock). Run another worker with a "
                      "non-forking pool or enable the event loop.")
            return "not started"
        threading.Thread(target=self._run, name="compressor-watchdog", daemon=True).start()
        return "thread"

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            self.tick()
            if self._stop.wait(self.interval):
                return
