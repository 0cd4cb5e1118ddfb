"""Progress that tells the truth: ETA from measured stage rates, newest log lines first, lm-eval
request counts on the page, the stage durations the worker records."""
from __future__ import annotations

import datetime as dt
import re

import pytest
from django.urls import reverse
from django.utils import timezone

from jobs.eta import estimate, human, stage_durations
from jobs.models import Job, JobEvent
from jobs.tasks import ProgressRecorder

from .factories import make_job

NOW = dt.datetime(2026, 12, 2, 12, 0, 0, tzinfo=dt.timezone.utc)


def _progress(stage, within, elapsed, **extra):
    return {"stage": stage, "within": within, "stage_started_at": (NOW - dt.timedelta(seconds=elapsed)).isoformat(),
            **extra}


def test_the_current_stage_uses_its_own_rate_not_the_job_wide_fraction():
    # compression 10% done after 60 s: 540 s left in it, whatever its share of the bar
    eta = estimate(_progress("compress", 0.1, 60), NOW)
    assert eta["stage_s"] == 540 and eta["total_s"] is None  # export/evaluate never measured: unknown


def test_later_stages_come_from_an_earlier_run_and_the_baseline_evaluation():
    previous = stage_durations({"compress_s": 300.0, "export_s": 5.0, "card_s": 1.0})
    eta = estimate(_progress("compress", 0.5, 100, stage_seconds={"baseline": 80.0}), NOW, previous=previous)
    # 100 s left compressing + 5 export + 80 (compressed evaluation ~ this job's baseline) + 1 card
    assert eta == {"stage_s": 100, "total_s": 186}
    # before a stage has measurably started, the earlier run's duration minus the time spent
    eta = estimate(_progress("compress", 0.0, 30, stage_seconds={"baseline": 80.0}), NOW, previous=previous)
    assert eta["stage_s"] == 270


def test_no_estimate_without_a_rate_or_history():
    assert estimate(_progress("baseline", 0.0, 10), NOW) is None
    assert estimate({"stage": "starting"}, NOW) is None


def test_an_evaluation_near_its_end_says_seconds_not_minutes():
    # lm-eval 390/400 requests in 390 s: 10 s left (the old estimate said 441 s)
    eta = estimate(_progress("evaluate", 0.975, 390), NOW, previous={"finish": 1.0})
    assert eta["stage_s"] == 10 and eta["total_s"] == 11
    assert estimate(_progress("evaluate", 0.975, 390), NOW)["total_s"] == 10  # the finish counts as nothing


def test_human_durations():
    assert human(42) == "42 s" and human(150) == "2 min 30 s" and human(None) == "unknown"


@pytest.mark.django_db
def test_the_recorder_stores_stage_start_and_durations(owner):
    job = make_job(owner)
    Job.claim(job.id, "w")
    recorder = ProgressRecorder(job.id)
    recorder({"stage": "load", "fraction": 0.0, "within": 0.0, "message": "loading"})
    recorder({"stage": "baseline", "fraction": 0.05, "within": 0.0, "message": "evaluating"})
    job.refresh_from_db()
    assert job.progress["stage"] == "baseline" and "load" in job.progress["stage_seconds"]
    assert dt.datetime.fromisoformat(job.progress["stage_started_at"]) <= timezone.now()


def test_the_page_shows_the_newest_log_lines_first_and_lm_eval_requests(client, owner):
    job = make_job(owner)
    Job.claim(job.id, "w")
    for i in range(45):
        JobEvent.objects.create(job=job, stage="compress", message=f"line {i}")
    Job.report_progress(job.id, {"stage": "evaluate", "fraction": 0.9, "within": 0.5, "requests_done": 120,
                                 "requests_total": 400, "message": "lm-eval: 120/400 loglikelihood requests",
                                 "stage_started_at": (timezone.now() - dt.timedelta(seconds=60)).isoformat()})
    client.force_login(owner)
    html = client.get(reverse("job-status", args=[job.id])).json()["progress_html"]
    assert html.index("line 44") < html.index("line 43")  # newest first
    assert "line 14" not in html and "line 15" in html  # the 30 latest
    assert "120/400" in html
    assert re.search(r"about (6\d|7\d) s left in this stage", html)  # half the stage took ~60 s
