"""A worker that freezes or loses its main process never leaves a job queued or running forever.

Real Redis, real Celery worker processes (prefork pool, one process per job, as `make run` starts
them), real signals: SIGSTOP freezes a pool process the way a child forked while another thread held
a lock froze, SIGKILL of the main process is a crash with nobody else to notice.
"""
from __future__ import annotations

import os
import signal

import psutil
import pytest

from jobs.models import Job, Status
from jobs.tasks import enqueue
from tests.conftest import wait_for
from tests.jobs.factories import make_job

from .test_faults import slow_job, wait_for_stage
from .test_job_on_worker import wait_until_finished

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


def test_the_worker_main_process_runs_no_other_thread_so_forks_inherit_no_held_lock(owner, job_env, worker_factory):
    worker = worker_factory(COMPRESSOR_WATCHDOG_INTERVAL_S="1")
    job = make_job(owner, model_source="nonexistent-org/no-such-model")
    enqueue(job)  # a job has run (and its pool process been replaced) and the watchdog has ticked
    job = wait_until_finished(job, worker, timeout=90)
    assert job.error_type == "ModelSourceError"
    assert "watchdog started (event loop)" in worker.log_path.read_text()
    assert psutil.Process(worker.main_pid()).num_threads() == 1, worker.tail()


def test_a_job_taken_by_a_frozen_pool_process_fails_at_the_claim_deadline_and_the_worker_recovers(
        owner, job_env, worker_factory):
    worker = worker_factory(COMPRESSOR_CLAIM_DEADLINE_S="10", COMPRESSOR_WATCHDOG_INTERVAL_S="1")
    wait_for(lambda: len(worker.pool_pids()) == 1, 30, "the pool process")
    # Give the pool process time to report itself up, so the main process hands it the job.
    wait_for(lambda: psutil.Process(worker.pool_pids()[0]).status() == psutil.STATUS_SLEEPING, 30, "an idle pool")
    frozen = worker.pool_pids()[0]
    os.kill(frozen, signal.SIGSTOP)
    try:
        job = make_job(owner, model_source="nonexistent-org/no-such-model")
        enqueue(job)
        job = wait_until_finished(job, worker, timeout=90)
    finally:
        if psutil.pid_exists(frozen):
            os.kill(frozen, signal.SIGCONT)
    assert job.status == Status.FAILED and job.error_type == "ClaimTimeout", (job.error_message, worker.tail())
    assert job.started_at is None  # it never ran
    assert "never started it" in job.error_message and "COMPRESSOR_CLAIM_DEADLINE_S=10" in job.error_message
    assert job.events.filter(stage="failed", message__contains="claim deadline").exists()

    # The worker killed its stuck pool process and takes jobs again.
    wait_for(lambda: not psutil.pid_exists(frozen) or psutil.Process(frozen).status() == psutil.STATUS_ZOMBIE,
             30, "the frozen pool process to be killed")
    second = make_job(owner, model_source="nonexistent-org/no-such-model")
    enqueue(second)
    second = wait_until_finished(second, worker, timeout=90)
    assert second.status == Status.FAILED and second.error_type == "ModelSourceError", worker.tail()  # it ran
    assert second.started_at is not None


def test_kill_9_of_the_only_workers_main_process_fails_its_job_after_the_supervised_restart(
        owner, job_env, worker_factory):
    # WORKER_LOST_AFTER_S is an hour, so only the restarted worker's lost-process check can end the job.
    worker = worker_factory(supervised=True, COMPRESSOR_HEARTBEAT_S="1", COMPRESSOR_WATCHDOG_INTERVAL_S="1",
                            COMPRESSOR_WORKER_LOST_AFTER_S="3600")
    job = slow_job(owner, job_env)
    enqueue(job)
    job = wait_for_stage(job, "baseline", worker)
    main = worker.main_pid()
    child = int(job.worker.rsplit(":", 1)[1])
    assert child in worker.pool_pids()
    os.kill(main, signal.SIGKILL)

    # The pool process dies with its parent; the supervisor starts a new worker.
    wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
             30, "the orphaned pool process to die")
    worker.wait_ready(2)
    assert worker.main_pid() != main
    job = wait_until_finished(job, worker, timeout=60)
    assert job.status == Status.FAILED and job.error_type == "WorkerLost", (job.error_message, worker.tail())
    assert "is gone" in job.error_message and job.worker in job.error_message
    # removed by the same handler right after the job is marked failed: allow it a moment under load
    wait_for(lambda: list(job_env["artifacts"].iterdir()) == [], 15, "its temporary directory removed")

    # ... and the restarted worker runs the next job.
    second = make_job(owner, model_source="nonexistent-org/no-such-model")
    enqueue(second)
    assert wait_until_finished(second, worker, timeout=90).error_type == "ModelSourceError"
    assert Job.objects.filter(status=Status.RUNNING).count() == 0
