"""Race checks of the Job state machine, run against a real PostgreSQL database.

Not collected by pytest (no ``test_`` prefix): tests/db/test_postgres_transitions.py runs it as
``python -m tests.db.pg_race_checks CHECK`` with DATABASE_URL pointing at a throw-away, migrated
database. Each check prints one summary line and exits 0, or raises (exit status 1) with the
evidence. It refuses to run against anything but PostgreSQL.

Every race puts the contenders in their own threads, each with its own Django connection (its
own PostgreSQL backend) opened before a barrier, and releases them together. Half the rounds of
every race are also "gated": a separate connection holds the job row with SELECT ... FOR UPDATE
while the contenders start, and is released only once pg_stat_activity shows every contender's
UPDATE blocked on that row at the same time -- so those rounds are a guaranteed collision of all
the compare-and-set UPDATEs, not a race that merely might overlap.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "compressor_ui.settings")
django.setup()

import psycopg  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection  # noqa: E402

from jobs.models import FINISHED, Job, Status  # noqa: E402

CONTENDERS = 8
ROUNDS = 12  # per race; every other round is gated
RECIPE = {"stages": []}  # any JSON: the state machine never looks at the recipe

if connection.vendor != "postgresql":
    raise SystemExit(f"refusing to run: DATABASE_URL is {connection.vendor}, not PostgreSQL")
DSN = os.environ["DATABASE_URL"]


def owner():
    user, _ = get_user_model().objects.get_or_create(username="race-owner")
    return user


def new_job(status: str = Status.QUEUED, worker: str = "") -> Job:
    job = Job.objects.create(owner=owner(), model_source="demo", recipe=RECIPE, status=status)
    if status != Status.QUEUED:
        assert Job.objects.filter(pk=job.pk).update(worker=worker or "setup") == 1
    return job


def row(job_id: Any) -> dict:
    return Job.objects.filter(pk=job_id).values().get()


def lock_waiters(monitor: psycopg.Connection) -> int:
    """How many client backends of this database are blocked on a lock right now."""
    return monitor.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND state = 'active'").fetchone()[0]


def race(job_id: Any, calls: dict[str, Callable[[], Any]], *, gated: bool, table: str = "jobs_job") -> dict[str, Any]:
    """Run every call in its own thread and connection, all released at once; their results by name.

    Gated: the row `job_id` of `table` is locked first and released only when all calls are blocked on it.
    """
    names = list(calls)
    barrier = threading.Barrier(len(names) + 1)
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def contender(name: str) -> None:
        try:
            connection.ensure_connection()  # connect before the barrier: the race is the UPDATEs
            barrier.wait(timeout=20)
            results[name] = calls[name]()
        except BaseException as exc:  # re-raised in the main thread
            errors[name] = exc
        finally:
            connection.close()

    gate = psycopg.connect(DSN) if gated else None
    monitor = psycopg.connect(DSN, autocommit=True) if gated else None
    try:
        if gate is not None:
            gate.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE", [job_id])
        threads = [threading.Thread(target=contender, args=(name,)) for name in names]
        for t in threads:
            t.start()
        barrier.wait(timeout=20)
        if gate is not None:
            deadline = time.monotonic() + 15
            while (waiting := lock_waiters(monitor)) < len(names):
                if time.monotonic() > deadline or errors:
                    raise AssertionError(f"only {waiting} of {len(names)} UPDATEs ever blocked on the row; "
                                         f"errors: {errors}")
                time.sleep(0.005)
            gate.rollback()  # release the row: every blocked UPDATE re-checks its WHERE clause now
        for t in threads:
            t.join(30)
            if t.is_alive():
                raise AssertionError(f"a contender is stuck (deadlock?) in {names}")
    finally:
        for conn in (gate, monitor):
            if conn is not None:
                conn.close()
    if errors:
        name, exc = next(iter(errors.items()))
        raise AssertionError(f"contender {name!r} raised {exc!r}") from exc
    return results


def check_claim_race() -> str:
    """N workers claim one queued job at the same moment: exactly one wins and the row says so."""
    for rnd in range(ROUNDS):
        job = new_job()
        won = race(job.id, {f"worker-{i}:{1000 + i}": (lambda i=i: Job.claim(job.id, f"worker-{i}:{1000 + i}"))
                            for i in range(CONTENDERS)}, gated=rnd % 2 == 0)
        winners = [name for name, ok in won.items() if ok is True]
        assert len(winners) == 1, f"round {rnd}: {len(winners)} claims won: {won}"
        assert sum(ok is False for ok in won.values()) == CONTENDERS - 1, won
        r = row(job.id)
        assert r["status"] == Status.RUNNING, r
        assert r["worker"] == winners[0], (r["worker"], winners)
        assert r["started_at"] is not None and r["heartbeat_at"] is not None and r["finished_at"] is None, r
        assert r["progress"]["stage"] == "starting", r["progress"]
        assert Job.claim(job.id, "late-redelivery") is False
    return f"{ROUNDS} rounds x {CONTENDERS} concurrent claims: exactly one winner each, row names it"


def check_cancel_vs_succeed() -> str:
    """request_cancel racing succeed on a running job: it succeeds, and the flag tells who came first."""
    seen = set()
    for rnd in range(ROUNDS):
        job = new_job(Status.RUNNING, worker="w")
        out = race(job.id, {
            "succeed": lambda: Job.succeed(job.id, {"ppl": 12.5}, str(job.id), 123),
            "request_cancel": lambda: Job.request_cancel(job.id),
        }, gated=rnd % 2 == 0)
        r = row(job.id)
        # A running job is only flagged by request_cancel, so succeed always wins the status.
        assert out["succeed"] is True, out
        assert r["status"] == Status.SUCCEEDED, r
        assert (r["results"], r["artifact_bytes"], r["progress"]["stage"]) == ({"ppl": 12.5}, 123, "done"), r
        assert r["finished_at"] is not None and r["error_type"] == "", r
        # Consistent: the cancel request was recorded iff it reached the job while it was running.
        assert out["request_cancel"] in (Status.RUNNING, None), out
        assert r["cancel_requested"] == (out["request_cancel"] == Status.RUNNING), (out, r)
        seen.add(out["request_cancel"])
        # The worker noticing the flag too late cannot turn a success into a cancellation.
        assert Job.mark_cancelled(job.id) is False and row(job.id)["status"] == Status.SUCCEEDED
        assert Job.request_cancel(job.id) is None
    return f"{ROUNDS} rounds: always succeeded, cancel flag consistent (request_cancel returned {sorted(map(str, seen))})"


def check_cancel_vs_claim() -> str:
    """request_cancel racing claim on a queued job: cancelled before it ran, or running and flagged."""
    outcomes = set()
    for rnd in range(ROUNDS):
        job = new_job()
        out = race(job.id, {"claim": lambda: Job.claim(job.id, "w:1"),
                            "request_cancel": lambda: Job.request_cancel(job.id)}, gated=rnd % 2 == 0)
        r = row(job.id)
        assert r["cancel_requested"] is True, (out, r)
        if out["request_cancel"] == Status.CANCELLED:
            assert out["claim"] is False, out
            assert r["status"] == Status.CANCELLED and r["finished_at"] is not None and r["worker"] == "", r
        else:
            assert (out["claim"], out["request_cancel"]) == (True, Status.RUNNING), out
            assert r["status"] == Status.RUNNING and r["worker"] == "w:1" and r["finished_at"] is None, r
        outcomes.add(r["status"])
    return f"{ROUNDS} rounds: one consistent outcome each (seen: {sorted(map(str, outcomes))})"


def check_finish_race() -> str:
    """succeed, fail and mark_cancelled (plus a cancel request) at once: exactly one terminal state."""
    winners_seen = set()
    expected = {"succeed": Status.SUCCEEDED, "fail": Status.FAILED, "mark_cancelled": Status.CANCELLED}
    for rnd in range(ROUNDS):
        job = new_job(Status.RUNNING, worker="w")
        out = race(job.id, {
            "succeed": lambda: Job.succeed(job.id, {"ppl": 1.0}, str(job.id), 7),
            "fail": lambda: Job.fail(job.id, "RuntimeError", "boom"),
            "mark_cancelled": lambda: Job.mark_cancelled(job.id),
            "request_cancel": lambda: Job.request_cancel(job.id),
        }, gated=rnd % 2 == 0)
        winners = [name for name in expected if out[name] is True]
        assert len(winners) == 1, f"round {rnd}: {winners} all won: {out}"
        r = row(job.id)
        assert r["status"] == expected[winners[0]], (winners, r)
        assert r["finished_at"] is not None, r
        # No field of a losing transition leaked into the row.
        assert (r["results"] is not None) == (winners[0] == "succeed"), r
        assert (r["error_type"] == "RuntimeError") == (winners[0] == "fail"), r
        assert r["progress"].get("stage") != "done" or winners[0] == "succeed", r
        winners_seen.add(winners[0])
    return f"{ROUNDS} rounds x 4 concurrent finishers: one terminal state each (winners seen: {sorted(winners_seen)})"


def check_fail_after_succeed() -> str:
    """A finished job stays finished: fail (and every other transition) is refused and changes nothing."""
    job = new_job()
    assert Job.claim(job.id, "w:1") is True
    assert Job.succeed(job.id, {"ppl": 3.0}, str(job.id), 99) is True
    before = row(job.id)
    assert Job.fail(job.id, "LateError", "too late") is False
    assert Job.succeed(job.id, {"ppl": 4.0}, "other", 1) is False
    assert Job.mark_cancelled(job.id) is False
    assert Job.claim(job.id, "w:2") is False
    assert Job.request_cancel(job.id) is None
    assert row(job.id) == before, (before, row(job.id))
    # The same, with N late failures arriving at once (e.g. a lost-worker signal and the watchdog).
    # Not gated: their WHERE status IN (queued, running) no longer matches, so they never even block.
    out = race(job.id, {f"fail-{i}": (lambda i=i: Job.fail(job.id, "WorkerLost", f"late {i}"))
                        for i in range(CONTENDERS)}, gated=False)
    assert not any(out.values()), out
    assert row(job.id) == before, (before, row(job.id))
    return "fail/succeed/mark_cancelled/claim/request_cancel after succeed: all refused, row unchanged"


def check_progress_after_finish() -> str:
    """report_progress on a finished job changes nothing, also when it races the finishing update."""
    for status in FINISHED:
        job = new_job(Status.RUNNING, worker="w")
        {Status.SUCCEEDED: lambda: Job.succeed(job.id, {"ppl": 2.0}, str(job.id), 5),
         Status.FAILED: lambda: Job.fail(job.id, "E", "m"),
         Status.CANCELLED: lambda: Job.mark_cancelled(job.id)}[status]()
        before = row(job.id)
        assert before["status"] == status
        assert Job.report_progress(job.id, {"stage": "compress", "layer": 9, "layers": 30}) is False
        assert row(job.id) == before, (status, before, row(job.id))  # progress and heartbeat_at untouched
    for rnd in range(ROUNDS):
        job = new_job(Status.RUNNING, worker="w")
        reports = {f"progress-{i}": (lambda i=i: Job.report_progress(job.id, {"stage": "compress", "layer": i}))
                   for i in range(CONTENDERS - 1)}
        out = race(job.id, {"succeed": lambda: Job.succeed(job.id, {"ppl": 2.0}, str(job.id), 5), **reports},
                   gated=rnd % 2 == 0)
        assert out["succeed"] is True, out
        r = row(job.id)
        # Whatever order they committed in, a progress report never overwrites the finished state.
        assert r["status"] == Status.SUCCEEDED and r["progress"]["stage"] == "done", (out, r)
        assert Job.report_progress(job.id, {"stage": "compress", "layer": 99}) is False
        assert row(job.id) == r
    return f"refused on {len(FINISHED)} finished states; {ROUNDS} rounds of progress racing succeed end 'done'"


def check_active_limit_race() -> str:
    """Twelve submissions of one user at the same moment against a limit of five: exactly five jobs
    are created and seven refused with the limit's error (jobs.submission.create_job locks the user
    row). Gated rounds prove all twelve really queue up on that row lock."""
    from django.conf import settings

    from compression.recipe import Recipe
    from jobs.models import ACTIVE
    from jobs.submission import JobRequest, SubmissionError, create_job

    limit, submitters = 5, 12
    settings.COMPRESSOR_MAX_QUEUED_PER_USER = limit
    recipe = Recipe.from_preset("FP8_DYNAMIC")
    for rnd in range(4):
        user = get_user_model().objects.create_user(f"limit-race-{rnd}-{os.getpid()}")

        def submit(user=user) -> Any:
            try:
                return create_job(JobRequest(owner=user, model="demo", recipe=recipe, calibration={},
                                             evaluation={"tasks": ["wikitext2_ppl"]}))
            except SubmissionError as exc:
                return exc

        out = race(user.pk, {f"submit-{i}": submit for i in range(submitters)}, gated=rnd % 2 == 0,
                   table="auth_user")
        created = [v for v in out.values() if isinstance(v, Job)]
        refused = [v for v in out.values() if isinstance(v, SubmissionError)]
        assert len(created) == limit and len(refused) == submitters - limit, f"round {rnd}: {out}"
        assert all(f"limit {limit}" in exc.message for exc in refused), refused
        assert Job.objects.filter(owner=user, status__in=ACTIVE).count() == limit
    return f"4 rounds x {submitters} concurrent submissions, limit {limit}: {limit} created, the rest refused"


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}

if __name__ == "__main__":
    wanted = sys.argv[1:] or list(CHECKS)
    for name in wanted:
        started = time.monotonic()
        summary = CHECKS[name]()
        print(f"{name}: ok in {time.monotonic() - started:.2f}s: {summary}", flush=True)
