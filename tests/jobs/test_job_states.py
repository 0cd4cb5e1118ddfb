"""The written state machine and the compare-and-set claim."""
import threading

import pytest
from django.db import connection

from jobs.models import Job, Status

from .factories import make_job

pytestmark = pytest.mark.django_db


def test_a_new_job_is_queued(owner):
    job = make_job(owner)
    assert job.status == Status.QUEUED
    assert job.started_at is None and job.finished_at is None


def test_claim_moves_a_queued_job_to_running_once(owner):
    job = make_job(owner)
    assert Job.claim(job.id, "w1:1") is True
    assert Job.claim(job.id, "w2:2") is False  # a redelivered message loses
    job.refresh_from_db()
    assert job.status == Status.RUNNING
    assert job.worker == "w1:1"
    assert job.started_at is not None and job.heartbeat_at is not None


def test_it_cannot_claim_a_cancelled_or_finished_job(owner):
    for status in (Status.CANCELLED, Status.SUCCEEDED, Status.FAILED, Status.RUNNING):
        job = make_job(owner, status=status)
        assert Job.claim(job.id, "w") is False
        job.refresh_from_db()
        assert job.status == status


def test_succeed_only_from_running(owner):
    job = make_job(owner)
    assert Job.succeed(job.id, {"x": 1}, str(job.id), 10) is False
    Job.claim(job.id, "w")
    assert Job.succeed(job.id, {"x": 1}, str(job.id), 10) is True
    job.refresh_from_db()
    assert (job.status, job.results, job.artifact_bytes) == (Status.SUCCEEDED, {"x": 1}, 10)
    assert job.finished_at is not None
    assert Job.fail(job.id, "E", "late failure") is False  # finished jobs stay finished
    job.refresh_from_db()
    assert job.status == Status.SUCCEEDED


def test_fail_records_a_structured_error(owner):
    job = make_job(owner)
    Job.claim(job.id, "w")
    assert Job.fail(job.id, "ModelSourceError", "model: not found")
    job.refresh_from_db()
    assert (job.status, job.error_type, job.error_message) == (Status.FAILED, "ModelSourceError", "model: not found")


def test_cancelling_a_queued_job_is_immediate(owner):
    job = make_job(owner)
    assert Job.request_cancel(job.id) == Status.CANCELLED
    job.refresh_from_db()
    assert job.status == Status.CANCELLED and job.finished_at is not None
    assert Job.claim(job.id, "w") is False


def test_cancelling_a_running_job_only_flags_it(owner):
    job = make_job(owner)
    Job.claim(job.id, "w")
    assert Job.request_cancel(job.id) == Status.RUNNING
    assert Job.cancel_is_requested(job.id)
    job.refresh_from_db()
    assert job.status == Status.RUNNING
    assert Job.mark_cancelled(job.id)
    job.refresh_from_db()
    assert job.status == Status.CANCELLED
    assert Job.request_cancel(job.id) is None


def test_progress_is_stored_only_while_running(owner):
    job = make_job(owner)
    assert Job.report_progress(job.id, {"stage": "load"}) is False
    Job.claim(job.id, "w")
    assert Job.report_progress(job.id, {"stage": "compress", "layer": 3, "layers": 30})
    job.refresh_from_db()
    assert job.progress["layer"] == 3


@pytest.mark.django_db(transaction=True)
def test_only_one_of_many_concurrent_claims_wins(owner):
    job = make_job(owner)
    wins: list[bool] = []
    barrier = threading.Barrier(6)

    def claim(i: int) -> None:
        barrier.wait()
        try:
            wins.append(Job.claim(job.id, f"w{i}"))
        finally:
            connection.close()

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 5 + [True]
