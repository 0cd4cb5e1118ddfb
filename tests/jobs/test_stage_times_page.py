"""The job page shows how long each stage of a finished job took."""
from django.urls import reverse

from jobs.models import Job
from tests.jobs.factories import make_job


def test_the_job_page_lists_the_time_of_each_stage(client, owner):
    job = make_job(owner)
    assert Job.claim(job.id, "w1")
    results = {"evaluation": {"metrics": []}, "size": {}, "artifact": {},
               "stage_times": [{"key": "load_s", "stage": "load model", "seconds": 1.25},
                               {"key": "compress_s", "stage": "compress", "seconds": 12.5},
                               {"key": "total_s", "stage": "total", "seconds": 20.0}]}
    assert Job.succeed(job.id, results, str(job.id), 10)
    client.force_login(owner)
    page = client.get(reverse("job-detail", args=[job.id])).content.decode()
    assert 'id="stage-times-table"' in page
    assert "<td>compress</td><td class=\"num\">12.5</td>" in page and "<td>total</td>" in page
