"""List, detail, events, cancel, card and artifact, with a token and with a browser session."""
import io
import tarfile

import pytest

from jobs.models import Job, JobEvent, Status
from tests.jobs.factories import make_job

from .conftest import csrf_headers, errors

pytestmark = pytest.mark.django_db


def finished_job(owner, artifacts, **results):
    """A succeeded job with a two-file artifact under `artifacts` (ARTIFACT_ROOT)."""
    job = make_job(owner)
    Job.claim(job.id, "w")
    out = artifacts / str(job.id)
    out.mkdir()
    (out / "config.json").write_text('{"a": 1}')
    (out / "model.safetensors").write_bytes(b"x" * 1500)
    Job.succeed(job.id, results, str(job.id), 1508)
    job.refresh_from_db()
    return job


def test_the_list_shows_only_my_jobs_newest_first_with_filters(api, owner, outsider):
    older = make_job(owner, model_source="demo")
    newer = make_job(owner, model_source="org/model")
    Job.request_cancel(newer.id)
    make_job(outsider)
    data = api.get("/api/jobs").json()
    assert data["count"] == 2 and [j["id"] for j in data["results"]] == [str(newer.id), str(older.id)]
    assert data["next"] is None and data["previous"] is None
    assert [j["id"] for j in api.get("/api/jobs?status=queued").json()["results"]] == [str(older.id)]
    assert [j["id"] for j in api.get("/api/jobs?model=org/model").json()["results"]] == [str(newer.id)]
    assert api.get("/api/jobs?status=cancelled&model=demo").json()["count"] == 0


def test_the_list_pages_with_limit_and_offset(api, owner):
    for _ in range(5):
        make_job(owner)
    first = api.get("/api/jobs?limit=2").json()
    assert first["count"] == 5 and len(first["results"]) == 2 and first["previous"] is None
    second = api.get(first["next"]).json()
    assert len(second["results"]) == 2 and "offset=2" in first["next"]
    last = api.get("/api/jobs?limit=2&offset=4").json()
    assert len(last["results"]) == 1 and last["next"] is None
    seen = {j["id"] for page in (first, second, last) for j in page["results"]}
    assert len(seen) == 5
    assert api.get("/api/jobs?offset=50").json()["results"] == []


def test_the_list_rejects_bad_query_parameters_by_name(api):
    response = api.get("/api/jobs?status=done")
    assert response.status_code == 400 and "status" in errors(response)
    response = api.get("/api/jobs?limit=0")
    assert response.status_code == 400 and "limit" in errors(response)
    response = api.get("/api/jobs?page=2")
    assert response.status_code == 400 and "unknown field" in errors(response)["page"]


def test_the_detail_has_state_progress_results_error_and_links(api, owner):
    job = make_job(owner, name="first")
    Job.claim(job.id, "w")
    Job.fail(job.id, "RecipeError", "group size 128 does not divide 576")
    data = api.get(f"/api/jobs/{job.id}").json()
    assert data["id"] == str(job.id) and data["name"] == "first" and data["status"] == "failed"
    assert data["error"] == {"type": "RecipeError", "message": "group size 128 does not divide 576"}
    assert data["progress"]["stage"] == "starting" and data["results"] is None
    assert data["recipe"]["preset"] == "FP8_DYNAMIC" and data["has_card"] is False
    assert data["started_at"] and data["finished_at"] and data["created_at"]
    for name in ("events", "cancel", "card", "artifact"):
        assert data["links"][name].endswith(f"/api/jobs/{job.id}/{name}")


def test_the_browser_session_reads_the_same_api(browser, owner):
    job = make_job(owner)
    assert browser.get("/api/jobs").json()["results"][0]["id"] == str(job.id)
    assert browser.get(f"/api/jobs/{job.id}").json()["status"] == "queued"


def test_events_come_in_order_and_tail_after_an_id(api, owner):
    job = make_job(owner)
    events = [JobEvent.objects.create(job=job, stage="compress", message=f"layer {i}", data={"layer": i})
              for i in range(5)]
    page = api.get(f"/api/jobs/{job.id}/events?limit=3").json()
    assert [e["message"] for e in page["results"]] == ["layer 0", "layer 1", "layer 2"]
    assert page["last_id"] == events[2].id and page["next"]
    rest = api.get(page["next"]).json()
    assert [e["data"]["layer"] for e in rest["results"]] == [3, 4] and rest["next"] is None
    idle = api.get(f"/api/jobs/{job.id}/events?after={rest['last_id']}").json()
    assert idle["results"] == [] and idle["last_id"] == events[4].id
    assert api.get(f"/api/jobs/{job.id}/events?after=-1").status_code == 400


def test_cancel_cancels_a_queued_job_at_once(api, owner):
    job = make_job(owner)
    response = api.post(f"/api/jobs/{job.id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    job.refresh_from_db()
    assert job.status == Status.CANCELLED and job.cancel_requested


def test_cancel_flags_a_running_job(browser, owner):
    job = make_job(owner)
    Job.claim(job.id, "w")
    assert browser.post(f"/api/jobs/{job.id}/cancel").status_code == 403  # no CSRF token
    response = browser.post(f"/api/jobs/{job.id}/cancel", **csrf_headers(browser))
    assert response.status_code == 200
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    job.refresh_from_db()
    assert job.status == Status.RUNNING and job.cancel_requested


def test_cancel_of_a_finished_job_is_a_409(api, owner, tmp_path, settings):
    settings.ARTIFACT_ROOT = tmp_path
    job = finished_job(owner, tmp_path)
    response = api.post(f"/api/jobs/{job.id}/cancel")
    assert response.status_code == 409
    assert "already finished (succeeded)" in errors(response)["status"]
    job.refresh_from_db()
    assert job.status == Status.SUCCEEDED and not job.cancel_requested


def test_the_card_is_markdown_once_written(api, owner, tmp_path, settings):
    settings.ARTIFACT_ROOT = tmp_path
    job = finished_job(owner, tmp_path, model_card="---\nlicense: apache-2.0\n---\n# demo-FP8\n")
    response = api.get(f"/api/jobs/{job.id}/card")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/markdown; charset=utf-8"
    assert response.content.decode().startswith("---\nlicense: apache-2.0")
    assert api.get(f"/api/jobs/{job.id}").json()["has_card"] is True


def test_a_job_without_a_card_is_a_json_404(api, owner):
    job = make_job(owner)
    response = api.get(f"/api/jobs/{job.id}/card", HTTP_ACCEPT="text/markdown")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert "no model card yet" in errors(response)[None]


def test_the_artifact_streams_as_a_tar(api, owner, tmp_path, settings):
    settings.ARTIFACT_ROOT = tmp_path
    job = finished_job(owner, tmp_path)
    (tmp_path / str(job.id) / "escape").symlink_to("/etc/passwd")
    response = api.get(f"/api/jobs/{job.id}/artifact")
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "application/x-tar"
    body = b"".join(response.streaming_content)
    assert int(response["Content-Length"]) == len(body)
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = sorted(tar.getnames())
        assert names == [f"compressor-{job.id}/config.json", f"compressor-{job.id}/model.safetensors"]
        assert tar.extractfile(names[0]).read() == b'{"a": 1}'


def test_a_job_without_an_artifact_is_a_json_404(browser, owner, tmp_path, settings):
    settings.ARTIFACT_ROOT = tmp_path
    job = make_job(owner)
    response = browser.get(f"/api/jobs/{job.id}/artifact")
    assert response.status_code == 404 and "no artifact" in errors(response)[None]
    escaped = finished_job(owner, tmp_path)
    Job.objects.filter(pk=escaped.id).update(artifact_dir="../outside")
    assert browser.get(f"/api/jobs/{escaped.id}/artifact").status_code == 404
