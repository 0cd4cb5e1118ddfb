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


def test_text_and_numbers_no_database_can_store_are_made_storable(owner):
    """NUL characters (refused by PostgreSQL) and NaN/Infinity (refused in JSON) never make a
    transition raise and leave a job stuck in running."""
    from jobs.models import JobEvent

    job = make_job(owner)
    Job.claim(job.id, "w")
    assert Job.report_progress(job.id, {"stage": "compress", "message": "a\x00b", "loss": float("nan")})
    event = JobEvent.objects.create(job=job, stage="compress", message="x\x00y", data={"loss": float("inf")})
    event.refresh_from_db()
    assert event.message == "x\ufffdy" and event.data == {"loss": None}
    assert Job.succeed(job.id, {"evaluation": {"metrics": [{"compressed": float("nan"), "note": "\x00"}]}}, "d", 1)
    job.refresh_from_db()
    assert job.results["evaluation"]["metrics"] == [{"compressed": None, "note": "\ufffd"}]

    other = make_job(owner)
    Job.claim(other.id, "w")
    assert Job.fail(other.id, "Boom\x00", "message with \x00 inside")
    other.refresh_from_db()
    assert other.status == Status.FAILED and "\x00" not in other.error_message + other.error_type


def test_the_reaper_spares_a_job_whose_heartbeat_arrived_after_it_looked(owner, settings):
    from datetime import timedelta

    from django.utils import timezone

    from jobs.reliability import reap_stale_running

    settings.COMPRESSOR_WORKER_LOST_AFTER_S = 60
    stale, alive = make_job(owner), make_job(owner)
    for job in (stale, alive):
        Job.claim(job.id, "w")
    long_ago = timezone.now() - timedelta(seconds=600)
    Job.objects.filter(pk__in=[stale.id, alive.id]).update(heartbeat_at=long_ago)
    # the fail itself re-checks the heartbeat: a beat newer than the cutoff wins the race
    cutoff = timezone.now() - timedelta(seconds=60)
    Job.report_progress(alive.id, {"stage": "compress"})
    assert Job.fail(alive.id, "WorkerLost", "x", heartbeat_before=cutoff) is False
    assert reap_stale_running() == [str(stale.id)]
    alive.refresh_from_db()
    assert alive.status == Status.RUNNING
