"""Push to the Hub, against a local server that speaks the Hub's endpoints (tests/fake_hub.py), through the
real huggingface_hub client: one commit with every file, errors naming the field, nothing half pushed."""
from __future__ import annotations

import logging

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from jobs.hub_push import has_token, stored_token
from jobs.models import JobEvent, Status
from tests.fake_hub import FakeHub
from tests.jobs.factories import make_job

GOOD = "hf_writeTokenOfAlice1234"
READ_ONLY = "hf_readTokenOfAlice12345"


@pytest.fixture
def hub(settings, monkeypatch, tmp_path):
    import huggingface_hub.constants

    settings.VAR_DIR = tmp_path / "var"  # stored tokens live here

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    server = FakeHub().start()
    server.tokens[GOOD] = ("alice", ["acme"], "write")
    server.tokens[READ_ONLY] = ("alice", [], "read")
    settings.COMPRESSOR_HF_ENDPOINT = server.url
    yield server
    server.stop()


@pytest.fixture
def done_job(owner, settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    job = make_job(owner, status=Status.SUCCEEDED, artifact_dir="job1", results={"model_card": "# card"})
    artifact = settings.ARTIFACT_ROOT / "job1"
    artifact.mkdir(parents=True)
    (artifact / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (artifact / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)))
    (artifact / "README.md").write_text("---\nlicense: apache-2.0\n---\n# m-FP8\n")
    return job


@pytest.fixture
def api(owner):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=owner).key}")
    return client


def push(api, job, **body):
    return api.post(f"/api/jobs/{job.id}/push", body, format="json")


@pytest.mark.django_db
def test_a_push_uploads_every_file_in_one_commit_and_links_the_repo(api, hub, done_job, caplog):
    caplog.set_level(logging.DEBUG)
    response = push(api, done_job, repo_id="alice/m-fp8", private=True, token=GOOD)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["url"] == f"{hub.url}/alice/m-fp8" and body["files"] == 3 and body["private"] is True
    repo = hub.repos["alice/m-fp8"]
    assert repo["commits"] == 1 and repo["private"] is True
    assert repo["files"]["README.md"].startswith(b"---\nlicense")
    assert repo["files"]["model.safetensors"].endswith(bytes(range(256)))
    events = list(JobEvent.objects.filter(job=done_job, stage="push").values_list("message", flat=True))
    assert events[0].startswith("push to alice/m-fp8") and events[-1] == f"pushed to {hub.url}/alice/m-fp8"
    assert GOOD not in caplog.text and not any(GOOD in m for m in events)  # the token is never logged
    assert not has_token(done_job.owner)  # not remembered unless asked


@pytest.mark.django_db
def test_a_remembered_token_is_stored_encrypted_and_used_next_time(api, hub, done_job, settings):
    assert push(api, done_job, repo_id="acme/m1", token=GOOD, remember_token=True).status_code == 200
    stored = next((settings.VAR_DIR / "hub-tokens").glob("*.token"))
    assert GOOD.encode() not in stored.read_bytes() and stored.stat().st_mode & 0o077 == 0
    assert stored_token(done_job.owner) == GOOD
    assert push(api, done_job, repo_id="acme/m2").status_code == 200  # no token in the request
    assert set(hub.repos) == {"acme/m1", "acme/m2"}


@pytest.mark.django_db
@pytest.mark.parametrize("body, field, words, status", [
    ({"repo_id": "alice/x"}, "token", "no token given", 400),
    ({"repo_id": "alice/x", "token": "hf_doesNotExist12345"}, "token", "rejected this token", 400),
    ({"repo_id": "alice/x", "token": READ_ONLY}, "token", "read-only", 400),
    ({"repo_id": "bob/x", "token": GOOD}, "repo_id", "cannot write to 'bob'", 400),
    ({"repo_id": "not a repo", "token": GOOD}, "repo_id", "must be a Hub model id", 400),
    ({"repo_id": "alice/x", "token": "bad token!"}, "token", "access token", 400),
])
def test_bad_pushes_name_the_field_and_create_nothing(api, hub, done_job, body, field, words, status):
    response = push(api, done_job, **body)
    assert response.status_code == status, response.content
    error = response.json()["errors"][0]
    assert error["field"] == field and words in error["message"]
    assert hub.repos == {}


@pytest.mark.django_db
def test_an_existing_repo_is_refused_not_overwritten(api, hub, done_job):
    hub.repos["alice/taken"] = {"private": False, "files": {"README.md": b"theirs"}, "commits": 1}
    response = push(api, done_job, repo_id="alice/taken", token=GOOD)
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "repo_id"
    assert "already exists" in response.json()["errors"][0]["message"]
    assert hub.repos["alice/taken"]["files"] == {"README.md": b"theirs"}


@pytest.mark.django_db
def test_a_failed_commit_leaves_no_repo_behind(api, hub, done_job):
    hub.fail_commit = True
    response = push(api, done_job, repo_id="alice/half", token=GOOD)
    assert response.status_code == 502 and response.json()["errors"][0]["field"] == "hub"
    assert "alice/half" not in hub.repos  # created, then removed again


@pytest.mark.django_db
def test_an_unreachable_hub_is_reported_as_such(api, hub, done_job, settings):
    from tests.conftest import free_port

    settings.COMPRESSOR_HF_ENDPOINT = f"http://127.0.0.1:{free_port()}"
    response = push(api, done_job, repo_id="alice/x", token=GOOD)
    assert response.status_code == 502
    assert "could not reach the Hugging Face Hub" in response.json()["errors"][0]["message"]


@pytest.mark.django_db
def test_only_a_succeeded_job_of_ones_own_can_be_pushed(api, hub, owner, outsider, done_job):
    running = make_job(owner, status=Status.RUNNING)
    response = push(api, running, repo_id="alice/x", token=GOOD)
    assert response.status_code == 409 and response.json()["errors"][0]["field"] == "job"
    assert "running" in response.json()["errors"][0]["message"]
    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=outsider).key}")
    assert push(other, done_job, repo_id="mallory/x", token=GOOD).status_code == 404
    assert hub.repos == {} and hub.requests == []


@pytest.mark.django_db
def test_the_job_page_button_pushes_and_shows_the_link(client, owner, hub, done_job):
    from tests.conftest import PASSWORD

    client.login(username=owner.username, password=PASSWORD)
    page = client.get(f"/jobs/{done_job.id}/").content.decode()
    assert 'id="hub-push"' in page and f'action="/jobs/{done_job.id}/push/"' in page
    response = client.post(f"/jobs/{done_job.id}/push/", {"repo_id": "alice/from-page", "token": GOOD,
                                                          "private": "1"}, follow=True)
    text = response.content.decode()
    assert f"Pushed 3 files to {hub.url}/alice/from-page" in text
    assert f'href="{hub.url}/alice/from-page"' in text and hub.repos["alice/from-page"]["private"] is True
    response = client.post(f"/jobs/{done_job.id}/push/", {"repo_id": "alice/again"}, follow=True)
    assert "Not pushed — token: no token given" in response.content.decode() and "alice/again" not in hub.repos
