"""The job page caches a finished job's rendered parts (jobs.views._page_parts); nothing it shows may
ever be stale: every change a job can still go through shows on the next request, on the page and
in its status poll."""
from __future__ import annotations

import json
import shutil

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from jobs.models import Job, JobEvent, Status

from .factories import make_job

pytestmark = pytest.mark.django_db

METRICS = [{"task": "wikitext2_ppl", "metric": "perplexity", "baseline": 10.0, "compressed": 11.0,
            "higher_is_better": False, "recovery_pct": 90.9}]


def page(client, job) -> str:
    response = client.get(reverse("job-detail", args=[job.id]))
    assert response.status_code == 200
    return response.content.decode()


def poll(client, job) -> dict:
    response = client.get(reverse("job-status", args=[job.id]))
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    return json.loads(response.content)


def charts_on_page(html: str) -> dict:
    return json.loads(html.split('<script id="job-charts" type="application/json">')[1].split("</script>")[0])


@pytest.fixture
def running(client, owner):
    client.force_login(owner)
    job = make_job(owner, name="cache me")
    assert Job.claim(job.id, "w")
    return job


def test_a_running_job_shows_each_new_progress_and_event(client, running):
    Job.report_progress(running.id, {"stage": "compress", "fraction": 0.1, "message": "layer one", "layer": 0,
                                     "layers": 30})
    assert "layer 1/30" in page(client, running) and "layer one" in poll(client, running)["progress_html"]
    Job.report_progress(running.id, {"stage": "compress", "fraction": 0.2, "message": "layer two", "layer": 1,
                                     "layers": 30})
    JobEvent.objects.create(job=running, stage="compress", message="compressed the second layer")
    html = page(client, running)
    assert "layer 2/30" in html and "layer two" in html and "compressed the second layer" in html
    data = poll(client, running)
    assert data["progress"]["layer"] == 1 and "compressed the second layer" in data["progress_html"]


def test_the_page_seen_while_running_is_replaced_by_the_results_once_it_succeeds(client, running):
    JobEvent.objects.create(job=running, stage="compress", data={"layer": 0, "layers": 1, "module": "m", "loss": 0.5})
    before = page(client, running)
    assert 'id="results-table"' not in before and charts_on_page(before)["recovery"] is None
    poll(client, running)
    assert Job.succeed(running.id, {"evaluation": {"metrics": METRICS}, "model_card": "# The card\n\nhello"}, "", 0)
    for _ in range(2):  # the first request after the change, and the one served from the cache
        html = page(client, running)
        assert 'id="results-table"' in html and "90.90%" in html and 'id="model-card"' in html
        assert charts_on_page(html)["recovery"] is not None and charts_on_page(html)["layer_loss"] is not None
        data = poll(client, running)
        assert data["finished"] and data["status"] == "succeeded" and 'id="results-table"' in data["results_html"]
        assert data["charts"] == charts_on_page(html)


def test_a_failed_or_cancelled_job_shows_why(client, running, owner):
    page(client, running)
    assert Job.fail(running.id, "ModelSourceError", "no such model <b>here</b>")
    html = page(client, running)
    assert "ModelSourceError" in html and "no such model &lt;b&gt;here&lt;/b&gt;" in html
    queued = make_job(owner)
    page(client, queued)
    assert Job.request_cancel(queued.id) == Status.CANCELLED
    assert '<span class="status cancelled" id="job-status">cancelled</span>' in page(client, queued)
    assert poll(client, queued)["status"] == "cancelled"


def test_a_finished_job_shows_later_events_and_a_push(client, owner, settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    (settings.ARTIFACT_ROOT / "job1").mkdir(parents=True)
    (settings.ARTIFACT_ROOT / "job1" / "config.json").write_text("{}")
    client.force_login(owner)
    job = make_job(owner)
    assert Job.claim(job.id, "w") and Job.succeed(job.id, {"evaluation": {"metrics": METRICS}}, "job1", 2)
    html = page(client, job)
    assert 'id="hub-push"' in html and 'id="hub-push-last"' not in html
    JobEvent.objects.create(job=job, stage="push", message="pushed to https://hf.example/me/model",
                            data={"url": "https://hf.example/me/model", "repo_id": "me/model", "private": True})
    html = page(client, job)
    assert 'id="hub-push-last"' in html and "me/model" in html and "pushed to https://hf.example/me/model" in html
    assert "pushed to https://hf.example/me/model" in poll(client, job)["progress_html"]


def test_a_removed_artifact_takes_its_download_and_push_away(client, owner, settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    (settings.ARTIFACT_ROOT / "job2").mkdir(parents=True)
    client.force_login(owner)
    job = make_job(owner)
    assert Job.claim(job.id, "w") and Job.succeed(job.id, {"evaluation": {"metrics": METRICS}}, "job2", 0)
    html = page(client, job)
    assert "Download the checkpoint" in html and 'id="hub-push"' in html
    shutil.rmtree(settings.ARTIFACT_ROOT / "job2")
    html = page(client, job)
    assert "Download the checkpoint" not in html and 'id="hub-push"' not in html
    assert "Download the checkpoint" not in poll(client, job)["results_html"]


def test_a_finished_job_is_served_from_the_cache(client, owner):
    """The second view of a finished job reads no event's message or data again (only the newest
    event's id, which is part of the cache key)."""
    client.force_login(owner)
    job = make_job(owner)
    assert Job.claim(job.id, "w")
    JobEvent.objects.bulk_create([JobEvent(job=job, stage="compress", data={"layer": k, "layers": 4, "module": "m",
                                                                          "loss": 0.1}) for k in range(4)])
    assert Job.succeed(job.id, {"evaluation": {"metrics": METRICS}, "model_card": "# card"}, "", 0)
    with CaptureQueriesContext(connection) as first:
        first_html = page(client, job)
    with CaptureQueriesContext(connection) as second:
        second_html = page(client, job)
    assert second_html.replace(_csrf(second_html), "") == first_html.replace(_csrf(first_html), "")
    event_reads = [q["sql"] for q in second.captured_queries if '"jobs_jobevent"' in q["sql"]]
    assert len(event_reads) == 1, event_reads
    assert '"jobs_jobevent"."message"' not in event_reads[0] and '"jobs_jobevent"."data"' not in event_reads[0]
    assert len(second.captured_queries) < len(first.captured_queries)


def _csrf(html: str) -> str:
    marker = 'name="csrfmiddlewaretoken" value="'
    return html.split(marker)[1].split('"')[0] if marker in html else ""


def test_the_cache_never_shows_one_users_job_to_another(client, owner, outsider):
    client.force_login(owner)
    job = make_job(owner, name="private name")
    assert Job.claim(job.id, "w") and Job.succeed(job.id, {"evaluation": {"metrics": METRICS}}, "", 0)
    assert "private name" in page(client, job)
    client.force_login(outsider)
    assert client.get(reverse("job-detail", args=[job.id])).status_code == 404
    assert client.get(reverse("job-status", args=[job.id])).status_code == 404
