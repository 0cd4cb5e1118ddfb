"""Login on every page; a user sees and downloads only their own jobs (404 for others)."""
import datetime

import pytest
from django.urls import reverse
from django.utils import timezone

from jobs.models import Job, Status

from .factories import make_job

pytestmark = pytest.mark.django_db


def job_urls(job):
    return [reverse(name, args=[job.id]) for name in ("job-detail", "job-status", "job-artifact", "job-card")]


def test_every_page_requires_login(client, owner):
    job = make_job(owner)
    for url in [reverse("job-list"), reverse("job-new"), reverse("compare"), *job_urls(job)]:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("login")), url
    response = client.post(reverse("job-cancel", args=[job.id]))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_another_user_gets_404_for_every_job_url(client, owner, outsider, tmp_path, settings):
    settings.ARTIFACT_ROOT = tmp_path
    job = make_job(owner)
    Job.claim(job.id, "w")
    (tmp_path / str(job.id)).mkdir()
    (tmp_path / str(job.id) / "config.json").write_text("{}")
    Job.succeed(job.id, {"model_card": "# card"}, str(job.id), 2)
    client.force_login(outsider)
    for url in job_urls(job):
        assert client.get(url).status_code == 404, url
    assert client.post(reverse("job-cancel", args=[job.id])).status_code == 404
    listing = client.get(reverse("job-list"))
    assert str(job.id) not in listing.content.decode()
    compare = client.get(reverse("compare") + "?model=demo")
    assert str(job.id) not in compare.content.decode() and compare.context["jobs"] == []
    job.refresh_from_db()
    assert job.status == Status.SUCCEEDED


def test_the_owner_downloads_the_artifact_as_a_tar(client, owner, tmp_path, settings):
    import io
    import tarfile

    settings.ARTIFACT_ROOT = tmp_path
    job = make_job(owner)
    Job.claim(job.id, "w")
    artifact = tmp_path / str(job.id)
    artifact.mkdir()
    (artifact / "config.json").write_text('{"a": 1}')
    (artifact / "model.safetensors").write_bytes(b"x" * 1500)
    (artifact / "escape").symlink_to("/etc/passwd")
    Job.succeed(job.id, {}, str(job.id), 1508)
    client.force_login(owner)
    response = client.get(reverse("job-artifact", args=[job.id]))
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    assert int(response["Content-Length"]) == len(body)
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = sorted(tar.getnames())
        assert names == [f"compressor-{job.id}/config.json", f"compressor-{job.id}/model.safetensors"]
        assert tar.extractfile(f"compressor-{job.id}/model.safetensors").read() == b"x" * 1500


def test_a_job_without_artifact_has_no_download(client, owner):
    job = make_job(owner)
    client.force_login(owner)
    assert client.get(reverse("job-artifact", args=[job.id])).status_code == 404


def test_the_owner_can_cancel_a_queued_job(client, owner):
    job = make_job(owner)
    client.force_login(owner)
    response = client.post(reverse("job-cancel", args=[job.id]))
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.status == Status.CANCELLED


def test_status_json_reports_progress(client, owner):
    job = make_job(owner)
    Job.claim(job.id, "w")
    started = (timezone.now() - datetime.timedelta(seconds=40)).isoformat()
    Job.report_progress(job.id, {"stage": "compress", "fraction": 0.5, "within": 0.5, "layer": 4, "layers": 30,
                                 "message": "m", "stage_started_at": started})
    client.force_login(owner)
    data = client.get(reverse("job-status", args=[job.id])).json()
    assert data["status"] == "running" and data["finished"] is False
    assert data["progress"]["layer"] == 4
    assert "layer 5/30" in data["progress_html"]
    assert 'id="job-eta" data-stage-s="40"' in data["progress_html"]  # half the stage in 40 s: 40 s to go


def _all_routes(patterns, prefix=""):
    from django.urls import URLPattern, URLResolver

    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _all_routes(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), pattern.name


def test_every_route_of_the_site_needs_a_user(client):
    """Walks the URL configuration itself, so a page or endpoint added later is covered too."""
    import re
    import uuid

    from django.urls import get_resolver

    public = {"login", "logout"}  # logging in must be possible without being logged in
    checked = 0
    for route, name in _all_routes(get_resolver().url_patterns):
        if name in public or route.startswith("admin/"):
            continue  # the admin has its own login (tested by Django)
        path = "/" + re.sub(r"<uuid:\w+>", str(uuid.uuid4()), route)
        path = re.sub(r"\^|\$|\(\?P<\w+>\.\*\)", "", path)
        for method in ("get", "post"):
            response = getattr(client, method)(path)
            if path.startswith("/api/"):
                assert response.status_code in (401, 405), (method, path, response.status_code)
            else:
                assert response.status_code in (302, 405), (method, path, response.status_code)
                if response.status_code == 302:
                    assert response["Location"].startswith(reverse("login")), (method, path)
            checked += 1
    assert checked >= 40
