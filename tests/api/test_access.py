"""Every endpoint needs a user; another user's job is a 404 everywhere; every error is JSON."""
import pytest

from jobs.models import Job, Status
from tests.jobs.factories import make_job

from .conftest import errors

pytestmark = pytest.mark.django_db

JOB_PATHS = ["", "/events", "/card", "/artifact"]
OTHER_GETS = ["/api/jobs", "/api/presets", "/api/compare?model=demo", "/api/schema", "/api/docs"]


def test_every_endpoint_wants_credentials_and_says_so_in_json(client, owner):
    job = make_job(owner)
    for url in [*OTHER_GETS, *(f"/api/jobs/{job.id}{p}" for p in JOB_PATHS)]:
        response = client.get(url)
        assert response.status_code == 401, url
        assert response["WWW-Authenticate"] == "Token", url
        assert "credentials were not provided" in response.json()["errors"][0]["message"], url
    for url in ["/api/jobs", f"/api/jobs/{job.id}/cancel"]:
        assert client.post(url, {}, content_type="application/json").status_code == 401
    job.refresh_from_db()
    assert job.status == Status.QUEUED


def test_a_wrong_token_is_a_401(client, owner):
    response = client.get("/api/jobs", HTTP_AUTHORIZATION="Token not-a-real-key")
    assert response.status_code == 401 and "Invalid token" in errors(response)[None]


def test_another_user_gets_404_for_every_job_endpoint(outsider_api, owner, tmp_path, settings):
    settings.ARTIFACT_ROOT = tmp_path
    job = make_job(owner)
    Job.claim(job.id, "w")
    (tmp_path / str(job.id)).mkdir()
    (tmp_path / str(job.id) / "config.json").write_text("{}")
    Job.succeed(job.id, {"model_card": "# card"}, str(job.id), 2)
    for path in JOB_PATHS:
        response = outsider_api.get(f"/api/jobs/{job.id}{path}")
        assert response.status_code == 404, path
        assert response.json()["errors"][0]["field"] is None
    assert outsider_api.post(f"/api/jobs/{job.id}/cancel").status_code == 404
    assert outsider_api.get("/api/jobs").json()["count"] == 0
    assert outsider_api.get("/api/compare?model=demo").json()["jobs"] == []
    job.refresh_from_db()
    assert job.status == Status.SUCCEEDED and not job.cancel_requested


def test_another_users_running_job_cannot_be_cancelled(outsider_api, owner):
    job = make_job(owner)
    Job.claim(job.id, "w")
    assert outsider_api.post(f"/api/jobs/{job.id}/cancel").status_code == 404
    job.refresh_from_db()
    assert job.status == Status.RUNNING and not job.cancel_requested


def test_unknown_paths_and_methods_are_json(api):
    for url in ["/api/nope", "/api/jobs/not-a-uuid", "/api/jobs/", "/api/jobs/00000000-0000-0000-0000-000000000000"]:
        response = api.get(url)
        assert response.status_code == 404, url
        assert response["Content-Type"] == "application/json", url
    response = api.delete("/api/jobs")
    assert response.status_code == 405 and 'Method "DELETE" not allowed' in errors(response)[None]
    response = api.get("/api/jobs", HTTP_ACCEPT="text/html")
    assert response.status_code == 200 and response["Content-Type"] == "application/json"


def test_an_unexpected_error_is_a_generic_json_500_and_is_logged(api, owner, monkeypatch, caplog):
    from jobs import api as api_module

    def explode(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api_module, "_presets", explode)
    response = api.get("/api/presets")
    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert "secret internals" not in response.content.decode()
    assert "server log" in errors(response)[None]
    assert any("secret internals" in r.exc_text for r in caplog.records if r.exc_text)
