"""`GET /api/jobs` builds its rows directly (jobs.api.job_summary) for speed: they must be exactly what
the documented JobSummarySerializer writes, for every state a job can be in."""
from __future__ import annotations

import pytest
from rest_framework.test import APIRequestFactory

from jobs.api import job_summary
from jobs.models import Job
from jobs.serializers import JobSummarySerializer
from tests.jobs.factories import make_job

pytestmark = pytest.mark.django_db


def test_list_rows_equal_the_serializers_output(api, owner):
    queued = make_job(owner, name="<b>queued</b>")
    running, succeeded, failed, cancelled = (make_job(owner) for _ in range(4))
    for job in (running, succeeded, failed):
        Job.claim(job.id, "host:1")
    Job.report_progress(running.id, {"stage": "compress", "fraction": 0.25, "layer": 3, "layers": 30})
    Job.request_cancel(running.id)
    Job.succeed(succeeded.id, {"evaluation": {}}, str(succeeded.id), 10)
    Job.fail(failed.id, "OutOfMemory", "too big")
    Job.request_cancel(cancelled.id)

    response = api.get("/api/jobs?limit=10")
    assert response.status_code == 200
    rows = response.json()["results"]
    assert len(rows) == 5
    request = APIRequestFactory().get("/api/jobs?limit=10")
    jobs = Job.objects.filter(owner=owner)
    expected = JobSummarySerializer(jobs, many=True, context={"request": request}).data
    assert [job_summary(job, request) for job in jobs] == [dict(row) for row in expected]
    assert {row["id"] for row in rows} == {str(j.id) for j in (queued, running, succeeded, failed, cancelled)}
    by_id = {row["id"]: row for row in rows}
    assert by_id[str(failed.id)]["error"] == {"type": "OutOfMemory", "message": "too big"}
    assert by_id[str(running.id)]["cancel_requested"] is True
    assert by_id[str(succeeded.id)]["finished_at"].endswith("Z")
