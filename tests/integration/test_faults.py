"""Fault tests on real processes: killed workers, a restarted Redis, cancellation."""
from __future__ import annotations

import os
import signal
import time

import pytest
from django.urls import reverse

from jobs.models import Job, Status
from jobs.tasks import enqueue
from tests.conftest import wait_for
from tests.jobs.factories import make_job
from tests.tiny import save_tiny_llama

from .test_job_on_worker import wait_until_finished

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

# Enough WikiText-2 windows that the baseline stage lasts a few seconds on the tiny model.
SLOW_EVALUATION = {"tasks": ["wikitext2_ppl"], "windows": 80, "seqlen": 256}


def slow_job(owner, job_env) -> Job:
    model_dir = job_env["models"] / "tiny-llama"
    if not model_dir.exists():
        save_tiny_llama(model_dir)
    return make_job(owner, model_source=str(model_dir), evaluation=SLOW_EVALUATION)


def wait_for_stage(job: Job, stage: str, worker, timeout: float = 120) -> Job:
    def reached():
        job.refresh_from_db()
        if job.is_finished:
            raise AssertionError(f"job ended {job.status} before stage {stage}: {job.error_message}\n{worker.tail()}")
        return job.status == Status.RUNNING and job.progress.get("stage") == stage

    wait_for(reached, timeout, f"stage {stage}")
    return job


def test_a_killed_pool_process_fails_its_job_as_worker_lost(owner, job_env, celery_worker):
    job = slow_job(owner, job_env)
    enqueue(job)
    job = wait_for_stage(job, "baseline", celery_worker)
    pid = int(job.worker.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    job = wait_until_finished(job, celery_worker, timeout=60)
    assert job.status == Status.FAILED
    assert job.error_type == "WorkerLost"
    assert "worker lost" in job.error_message
    # the temporary directory is removed right after the job is marked failed (by the same handler in the
    # worker's main process; removing it first could delete a live job's output on a heartbeat race),
    # so allow that handler a moment under load
    wait_for(lambda: list(job_env["artifacts"].iterdir()) == [], 15, "the temporary directory removed")


def test_a_dead_worker_is_detected_by_the_heartbeat_watchdog(owner, job_env, worker_factory):
    first = worker_factory()
    job = slow_job(owner, job_env)
    enqueue(job)
    job = wait_for_stage(job, "baseline", first)
    first.kill()  # main process and child together: nobody is left to report the loss
    job.refresh_from_db()
    assert job.status == Status.RUNNING
    second = worker_factory(COMPRESSOR_WORKER_LOST_AFTER_S="3", COMPRESSOR_WATCHDOG_INTERVAL_S="1",
                            COMPRESSOR_HEARTBEAT_S="1")
    job = wait_until_finished(job, second, timeout=60)
    assert job.status == Status.FAILED and job.error_type == "WorkerLost"
    assert "no heartbeat" in job.error_message


def test_queued_jobs_survive_a_redis_restart(owner, job_env, redis_server, worker_factory):
    jobs = [make_job(owner, model_source="nonexistent-org/no-such-model") for _ in range(2)]
    for job in jobs:
        enqueue(job)
    redis_server.stop()  # no persistence: the queued messages are gone
    redis_server.start()
    import redis

    assert redis.Redis.from_url(redis_server.url).llen("gpu") == 0
    worker = worker_factory(COMPRESSOR_REQUEUE_AFTER_S="0", COMPRESSOR_WATCHDOG_INTERVAL_S="1")
    for job in jobs:
        job = wait_until_finished(job, worker, timeout=90)
        assert job.status == Status.FAILED and job.error_type == "ModelSourceError"  # it ran
        assert job.events.filter(message__contains="re-sent").exists()


def test_cancelling_a_running_job_stops_it_and_removes_its_files(client, owner, job_env, celery_worker):
    job = slow_job(owner, job_env)
    enqueue(job)
    job = wait_for_stage(job, "baseline", celery_worker)
    client.force_login(owner)
    client.post(reverse("job-cancel", args=[job.id]))
    job = wait_until_finished(job, celery_worker, timeout=120)
    assert job.status == Status.CANCELLED
    assert list(job_env["artifacts"].iterdir()) == []


def test_cancelling_a_queued_job_means_it_never_runs(client, owner, job_env, celery_worker):
    celery_worker.stop()  # nothing consumes the queue while we cancel
    job = slow_job(owner, job_env)
    enqueue(job)
    client.force_login(owner)
    client.post(reverse("job-cancel", args=[job.id]))
    job.refresh_from_db()
    assert job.status == Status.CANCELLED and job.started_at is None
