"""Pages stay cheap with many jobs: the list is paginated and reads only the columns it shows, and
no page issues a query per job or per event (speed itself is measured by bench/api.py)."""
from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from jobs.models import Job, JobEvent, Status
from jobs.views import JOBS_PER_PAGE

from .factories import make_job

pytestmark = pytest.mark.django_db


@pytest.fixture
def many_jobs(owner):
    recipe = make_job(owner).recipe
    Job.objects.bulk_create([Job(owner=owner, model_source="demo", recipe=recipe, name=f"job {i:03d}",
                                 results={"model_card": "x" * 1000}) for i in range(JOBS_PER_PAGE + 11)])
    return Job.objects.filter(owner=owner).count()


def rows(response) -> list[str]:
    return re.findall(r'<a href="/jobs/([0-9a-f-]{36})/">', response.content.decode())


def test_the_job_list_is_paginated_and_every_page_number_is_safe(client, owner, many_jobs):
    client.force_login(owner)
    first = client.get(reverse("job-list"))
    assert first.status_code == 200 and len(rows(first)) == JOBS_PER_PAGE
    assert f"page 1 of 2 ({many_jobs} jobs)" in first.content.decode()
    second = client.get(reverse("job-list"), {"page": 2})
    assert len(rows(second)) == many_jobs - JOBS_PER_PAGE
    assert not set(rows(first)) & set(rows(second))
    newest = Job.objects.filter(owner=owner).order_by("-created_at", "-id").first()
    assert rows(first)[0] == str(newest.id)
    for bad in ("0", "-1", "abc", "999999", "1e9", "9" * 40):
        response = client.get(reverse("job-list"), {"page": bad})
        assert response.status_code == 200 and rows(response), bad


def test_the_job_list_reads_only_the_columns_it_shows_in_a_fixed_number_of_queries(client, owner, many_jobs):
    client.force_login(owner)
    with CaptureQueriesContext(connection) as queries:
        client.get(reverse("job-list"), {"page": 2})
    job_queries = [q["sql"] for q in queries.captured_queries if '"jobs_job"' in q["sql"]]
    assert len(job_queries) == 2, job_queries  # the count and the page
    for sql in job_queries:
        for column in ("results", "recipe", "progress", "calibration", "evaluation", "error_message"):
            assert f'"jobs_job"."{column}"' not in sql, (column, sql)
    assert len(queries) < 10


def test_the_job_page_costs_the_same_number_of_queries_however_many_events(client, owner):
    client.force_login(owner)
    counts = []
    for layers in (2, 40):
        job = make_job(owner)
        Job.claim(job.id, "w")
        JobEvent.objects.bulk_create(
            [JobEvent(job=job, stage="compress", data={"layer": k, "layers": layers, "module": "mlp.up_proj",
                                                       "loss": 0.1}) for k in range(layers)]
            + [JobEvent(job=job, stage="compress", data={"kind": "reconstruction", "layer": k, "error_before": 0.2,
                                                         "error_after": 0.1}) for k in range(layers)]
            + [JobEvent(job=job, stage="finetune", data={"kind": "finetune", "step": k, "loss": 1.0 / (k + 1)})
               for k in range(layers)])
        with CaptureQueriesContext(connection) as queries:
            response = client.get(reverse("job-detail", args=[job.id]))
        assert response.status_code == 200
        counts.append(len(queries))
        with CaptureQueriesContext(connection) as queries:
            assert client.get(reverse("job-status", args=[job.id])).json()["charts"]["layer_loss"]
        counts.append(len(queries))
    assert counts[0] == counts[2] and counts[1] == counts[3], counts


def test_cached_charts_follow_the_job(client, owner):
    client.force_login(owner)
    job = make_job(owner)
    Job.claim(job.id, "w")
    url = reverse("job-status", args=[job.id])
    assert client.get(url).json()["charts"]["layer_loss"] is None
    JobEvent.objects.create(job=job, stage="compress", data={"layer": 0, "layers": 2, "module": "m", "loss": 0.5})
    assert client.get(url).json()["charts"]["layer_loss"] is not None  # a new event: rebuilt
    metrics = [{"task": "wikitext2_ppl", "metric": "perplexity", "baseline": 10.0, "compressed": 11.0,
                "higher_is_better": False, "recovery_pct": 90.0}]
    assert Job.succeed(job.id, {"evaluation": {"metrics": metrics}}, "", 0)
    charts = client.get(url).json()["charts"]
    assert charts["recovery"] is not None  # finished: rebuilt with the results
    assert Job.objects.get(pk=job.id).status == Status.SUCCEEDED


def test_the_cached_compare_page_follows_newly_finished_jobs(client, owner):
    client.force_login(owner)
    metrics = [{"task": "wikitext2_ppl", "metric": "perplexity", "baseline": 10.0, "compressed": 11.0,
                "higher_is_better": False, "recovery_pct": 90.0}]
    names = []
    for name in ("first recipe", "second recipe"):
        job = make_job(owner, name=name)
        Job.claim(job.id, "w")
        assert Job.succeed(job.id, {"evaluation": {"metrics": metrics}}, "", 0)
        names.append(name)
        page = client.get(reverse("compare"), {"model": "demo"})
        assert [p["name"] for p in page.context["points"]] == names
