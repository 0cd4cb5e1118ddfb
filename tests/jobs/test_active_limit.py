"""The per-user limit of active jobs holds under concurrent submissions (SQLite; the same race on
PostgreSQL is tests/db/pg_race_checks.py::check_active_limit_race).

Twelve threads, each with its own database connection, submit at the same moment: exactly the
limit's worth of jobs is created, every other submission gets the limit's error, none a database
error ("database is locked") or a 500."""
from __future__ import annotations

import threading

import pytest
from django.db import connection
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from jobs.models import ACTIVE, Job
from jobs.submission import JobRequest, SubmissionError, create_job

pytestmark = pytest.mark.django_db(transaction=True)

SUBMITTERS = 12
LIMIT = 5


def in_parallel(call, n: int = SUBMITTERS) -> list:
    """`call()` in n threads released together; each result or exception, in thread order."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        try:
            connection.ensure_connection()  # connect first: the race is the submissions themselves
            barrier.wait(timeout=30)
            results[i] = call()
        except BaseException as exc:  # reported by the test
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def job_request(owner) -> JobRequest:
    from compression.recipe import Recipe

    return JobRequest(owner=owner, model="demo", recipe=Recipe.from_preset("FP8_DYNAMIC"),
                      calibration={}, evaluation={"tasks": ["wikitext2_ppl"]})


def test_parallel_create_job_calls_never_exceed_the_limit(owner, outsider, settings, redis_server):
    settings.COMPRESSOR_MAX_QUEUED_PER_USER = LIMIT
    Job.objects.create(owner=outsider, model_source="demo", recipe={})  # another user's job does not count
    results = in_parallel(lambda: create_job(job_request(owner)))

    created = [r for r in results if isinstance(r, Job)]
    refused = [r for r in results if isinstance(r, SubmissionError)]
    others = [r for r in results if not isinstance(r, (Job, SubmissionError))]
    assert others == []
    assert len(created) == LIMIT and len(refused) == SUBMITTERS - LIMIT
    assert all(r.field == "non_field" and f"limit {LIMIT}" in r.message for r in refused)
    assert Job.objects.filter(owner=owner, status__in=ACTIVE).count() == LIMIT


def test_parallel_api_submissions_never_exceed_the_limit(owner, settings, redis_server):
    settings.COMPRESSOR_MAX_QUEUED_PER_USER = LIMIT
    # Warm what a long-running server has long cached: the demo model's config (seconds to build the
    # first time) and transformers' lazy module, which is not safe to import from several threads at
    # once the first time (ImportError for AutoConfig).
    from compression.model_io.loading import load_config

    load_config("demo", allowed_roots=[])

    token = Token.objects.create(user=owner).key
    body = {"model": "demo", "recipe": {"preset": "FP8_DYNAMIC"}, "evaluation": {"tasks": ["wikitext2_ppl"]}}

    def submit():
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        return client.post(reverse("api-jobs"), body, format="json")

    responses = in_parallel(submit)
    assert [r for r in responses if not hasattr(r, "status_code")] == []
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] * LIMIT + [400] * (SUBMITTERS - LIMIT), [r.content[:300] for r in responses]
    for response in responses:
        if response.status_code == 400:
            assert "queued or running" in response.json()["errors"][0]["message"]
    assert Job.objects.filter(owner=owner, status__in=ACTIVE).count() == LIMIT
