"""The watchdog's checks, one at a time, against the database (the end-to-end runs on real worker
processes are in tests/integration/test_worker_supervision.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.models import Job, Status
from jobs.reliability import BrokerSnapshot, fail_unclaimed, reap_lost_processes

from .factories import make_job

pytestmark = pytest.mark.django_db


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def running(owner, worker: str, heartbeat_age_s: float) -> Job:
    job = make_job(owner)
    assert Job.claim(job.id, worker)
    Job.objects.filter(pk=job.id).update(heartbeat_at=timezone.now() - timedelta(seconds=heartbeat_age_s))
    return job


def test_a_job_whose_process_is_gone_from_this_host_is_failed_after_three_missed_beats(owner, settings):
    settings.COMPRESSOR_HEARTBEAT_S = 10
    settings.COMPRESSOR_WORKER_LOST_AFTER_S = 3600
    host = socket.gethostname()
    gone = running(owner, f"{host}:{dead_pid()}", heartbeat_age_s=31)
    gone_but_beating = running(owner, f"{host}:{dead_pid()}", heartbeat_age_s=5)
    alive = running(owner, f"{host}:{os.getppid()}", heartbeat_age_s=600)  # pid exists
    elsewhere = running(owner, f"other-{host}:{dead_pid()}", heartbeat_age_s=600)  # not this host's to judge

    assert reap_lost_processes() == [str(gone.id)]
    gone.refresh_from_db()
    assert gone.status == Status.FAILED and gone.error_type == "WorkerLost"
    assert gone.worker in gone.error_message and "is gone" in gone.error_message
    for job in (gone_but_beating, alive, elsewhere):
        job.refresh_from_db()
        assert job.status == Status.RUNNING


def test_the_claim_deadline_fails_only_jobs_whose_taken_message_never_started(owner, settings):
    settings.COMPRESSOR_CLAIM_DEADLINE_S = 60
    old = timezone.now() - timedelta(seconds=600)
    stuck, waiting, fresh, claimed, not_taken = (make_job(owner, created_at=old) for _ in range(5))
    assert Job.claim(claimed.id, "w:1")
    now = time.time()
    snapshot = BrokerSnapshot(
        waiting={str(waiting.id)},
        taken={str(stuck.id): now - 120, str(waiting.id): now - 120, str(fresh.id): now - 5,
               str(claimed.id): now - 120})
    killed = []

    assert fail_unclaimed(snapshot=snapshot, on_expired=killed.append) == [str(stuck.id)]
    assert killed == [str(stuck.id)]
    stuck.refresh_from_db()
    assert stuck.status == Status.FAILED and stuck.error_type == "ClaimTimeout" and stuck.started_at is None
    assert "COMPRESSOR_CLAIM_DEADLINE_S=60" in stuck.error_message
    assert {j.status for j in Job.objects.filter(pk__in=[waiting.id, fresh.id, not_taken.id])} == {Status.QUEUED}
    claimed.refresh_from_db()
    assert claimed.status == Status.RUNNING  # a job claimed meanwhile is never failed by the deadline
