"""Calibration data: uploads with a size limit enforced while streaming, checked content, per-user
ownership, and calibration sources checked at submission (data directory, upload, Hub id)."""
from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from jobs.models import CalibrationUpload, Job
from jobs.submission import SubmissionError, clean_calibration
from jobs.tasks import job_spec
from tests.api.conftest import errors, token_client

pytestmark = pytest.mark.django_db

RECORDS = [{"text": f"Calibration sample number {i}: the quick brown fox jumps over the lazy dog."} for i in range(5)]
JSONL = "\n".join(json.dumps(r) for r in RECORDS).encode()
UPLOADS = "/api/calibration-files"


@pytest.fixture
def api(owner):
    return token_client(owner)


@pytest.fixture
def sent(monkeypatch) -> list[str]:
    from jobs.tasks import run_job

    ids: list[str] = []
    monkeypatch.setattr(run_job, "apply_async", lambda args, **kwargs: ids.append(args[0]))
    return ids


def upload(client, content: bytes, name: str = "mine.jsonl", field: str = "file"):
    return client.post(UPLOADS, {field: SimpleUploadedFile(name, content)}, format="multipart")


def files_under(root) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_an_upload_is_checked_stored_under_its_owner_and_listed(api, owner, upload_root):
    response = upload(api, JSONL, name="../../etc/evil name.jsonl")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["records"] == 5 and body["size"] == len(JSONL)
    assert body["filename"] == "evil name.jsonl"  # the client's directories are dropped
    row = CalibrationUpload.objects.get(pk=body["id"])
    assert body["source"] == f"upload:{row.id}"
    assert row.path == upload_root / str(owner.pk) / f"{row.id}.jsonl"
    assert row.path.read_bytes() == JSONL
    listed = api.get(UPLOADS).json()
    assert [item["id"] for item in listed["results"]] == [body["id"]]
    assert listed["max_bytes"] > 0


@pytest.mark.parametrize("name, content, message", [
    ("data.csv", b"text\nhello", "must end in .jsonl, .json, .txt"),
    ("data.jsonl", b'{"text": "fine"}\n{"text": broken}\n', "line 2 is not valid JSON"),
    ("data.jsonl", '{"text": "caf\u00e9"}'.encode("latin-1"), "not UTF-8 text"),
    ("data.jsonl", b'{"label": 1}\n{"score": 2}\n', "no usable calibration text"),
    ("data.txt", b"too short to be a paragraph", "paragraphs of more than 200 characters"),
    ("data.json", b'{"text": ', "not valid JSON"),
])
def test_bad_uploads_are_refused_naming_the_problem_and_leave_nothing(api, upload_root, name, content, message):
    response = upload(api, content, name=name)
    assert response.status_code == 400
    assert message in errors(response)["file"] and "calibration.source" not in errors(response)["file"]
    assert not CalibrationUpload.objects.exists()
    assert files_under(upload_root) == []


def test_a_file_over_the_limit_is_dropped_while_streaming(api, settings, upload_root):
    settings.COMPRESSOR_MAX_UPLOAD_BYTES = 1000
    big = b"\n".join(json.dumps({"text": "x" * 90}).encode() for _ in range(200))  # ~20 kB
    response = upload(api, big)
    assert response.status_code == 413
    assert "larger than the upload limit of 1000 bytes" in errors(response)["file"]
    assert not CalibrationUpload.objects.exists() and files_under(upload_root) == []
    assert upload(api, JSONL[:900]).status_code == 201  # under the limit still works


def test_the_upload_endpoint_names_missing_and_unknown_fields(api):
    assert errors(api.post(UPLOADS, {}, format="multipart"))["file"].startswith("no file uploaded")
    assert "unknown field" in errors(upload(api, JSONL, field="data"))["data"]
    assert api.post(UPLOADS, {"file": "x"}, format="json").status_code == 415


def test_the_per_user_upload_limit(api, settings):
    settings.COMPRESSOR_MAX_UPLOADS_PER_USER = 1
    assert upload(api, JSONL).status_code == 201
    response = upload(api, JSONL)
    assert response.status_code == 400 and "limit 1" in errors(response)["file"]


def test_uploads_are_private(api, outsider, sent):
    source = upload(api, JSONL).json()["source"]
    stranger = token_client(outsider)
    assert stranger.get(UPLOADS).json()["results"] == []
    response = stranger.post("/api/jobs", {"model": "demo", "recipe": {"preset": "W4A16", "group_size": 64},
                                           "calibration": {"source": source}}, format="json")
    assert response.status_code == 400
    assert "names none of your uploaded calibration files" in errors(response)["calibration.source"]
    assert not Job.objects.exists() and sent == []


def test_a_job_calibrates_on_an_upload_and_the_worker_finds_it(api, owner, sent):
    created = upload(api, JSONL, name="support-chats.jsonl").json()
    response = api.post("/api/jobs", {"model": "demo", "recipe": {"preset": "W4A16", "group_size": 64},
                                      "calibration": {"source": created["source"], "samples": 4}}, format="json")
    assert response.status_code == 201, response.content
    job = Job.objects.get(pk=response.json()["id"])
    assert job.calibration["source"] == created["source"] and sent == [str(job.id)]
    spec = job_spec(job)
    upload_row = CalibrationUpload.objects.get(pk=created["id"])
    assert spec["calibration_dir"] == str(upload_row.directory)
    assert spec["calibration"]["source"] == upload_row.stored_name
    assert spec["calibration"]["label"] == "support-chats.jsonl (uploaded)"

    upload_row.path.unlink()  # gone before the worker ran: a clear error, not a crash elsewhere
    from compression.errors import CalibrationError

    with pytest.raises(CalibrationError, match="no longer exists"):
        job_spec(job)


@pytest.mark.parametrize("source, message", [
    ("../../../etc/passwd", "outside the data directory"),
    ("/etc/passwd", "outside the data directory"),
    ("calibration/missing.jsonl", "not found"),
    ("upload:not-a-uuid", "names none of your uploaded calibration files"),
    ("not a dataset id", "neither a file under the data directory"),
    ("<script>alert(1)</script>", "neither a file under the data directory"),
])
def test_calibration_sources_are_checked_at_submission(owner, source, message):
    with pytest.raises(SubmissionError) as caught:
        clean_calibration({"source": source}, owner)
    assert caught.value.field == "calibration.source" and message in caught.value.message
    assert not caught.value.message.startswith("calibration.source")  # the field is named once, by `field`


def test_good_calibration_sources_pass(owner, monkeypatch):
    assert clean_calibration({"source": "calibration/self_instruct_seed_tasks.jsonl"}, owner)["samples"] == 128
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # a Hub dataset needs a worker that is online
        monkeypatch.delenv(var, raising=False)
    assert clean_calibration({"source": "HuggingFaceH4/ultrachat_200k:train_sft"}, owner)["source"] \
        == "HuggingFaceH4/ultrachat_200k:train_sft"
    # a recipe without calibration does not need the default file to exist
    assert clean_calibration({}, owner, needs_calibration=False)["source"].endswith(".jsonl")


# -- the form -----------------------------------------------------------------------------------
FORM = {"model": "demo", "preset": "W4A16", "group_size": "64", "recipe_yaml": "", "calibration_samples": 4,
        "calibration_seqlen": 64, "eval_windows": 2}


@pytest.fixture
def logged_in(client, owner):
    client.force_login(owner)
    return client


def test_the_form_uploads_a_file_and_queues_the_job_on_it(logged_in, owner, sent):
    page = logged_in.get(reverse("job-new")).content.decode()
    assert 'enctype="multipart/form-data"' in page
    assert '<option value="calibration/self_instruct_seed_tasks.jsonl">' in page
    response = logged_in.post(reverse("job-new"), {**FORM, "calibration_file": SimpleUploadedFile("a.jsonl", JSONL)})
    assert response.status_code == 302, response.content.decode()[:2000]
    upload_row = CalibrationUpload.objects.get(owner=owner)
    job = Job.objects.get()
    assert job.calibration["source"] == upload_row.source and sent == [str(job.id)]
    # the upload is offered again next time
    assert f'<option value="{upload_row.source}">' in logged_in.get(reverse("job-new")).content.decode()
    # and the job page names it as the user knows it
    page = logged_in.get(reverse("job-detail", args=[job.id])).content.decode()
    assert "a.jsonl (uploaded), up to 4 samples of 64 tokens" in page


def test_the_form_keeps_the_upload_when_another_field_is_wrong(logged_in, owner):
    response = logged_in.post(reverse("job-new"), {**FORM, "model": "no-such/model-anywhere",
                                                   "calibration_file": SimpleUploadedFile("a.jsonl", JSONL)})
    assert response.status_code == 400
    upload_row = CalibrationUpload.objects.get(owner=owner)
    assert f'value="{upload_row.source}"' in response.content.decode()  # no re-upload needed
    assert not Job.objects.exists()


def test_the_form_reports_a_file_over_the_limit_on_its_field(logged_in, settings, upload_root):
    settings.COMPRESSOR_MAX_UPLOAD_BYTES = 100
    response = logged_in.post(reverse("job-new"), {**FORM, "calibration_file": SimpleUploadedFile("a.jsonl", JSONL)})
    assert response.status_code == 400
    assert "larger than the upload limit of 100 bytes" in response.context["form"].errors["calibration_file"][0]
    assert not Job.objects.exists() and not CalibrationUpload.objects.exists() and files_under(upload_root) == []


def test_the_form_names_a_bad_calibration_source(logged_in):
    response = logged_in.post(reverse("job-new"), {**FORM, "calibration_source": "../secrets.jsonl"})
    assert response.status_code == 400
    assert "outside the data directory" in response.context["form"].errors["calibration_source"][0]


# -- managing uploads ------------------------------------------------------------------------------
def test_an_upload_can_be_read_and_deleted_only_by_its_owner(api, outsider, django_capture_on_commit_callbacks):
    created = upload(api, JSONL).json()
    row = CalibrationUpload.objects.get(pk=created["id"])
    stranger = token_client(outsider)
    assert stranger.get(f"{UPLOADS}/{row.id}").status_code == 404
    assert stranger.delete(f"{UPLOADS}/{row.id}").status_code == 404
    assert row.path.is_file()
    assert api.get(f"{UPLOADS}/{row.id}").json()["sha256"] == row.sha256
    with django_capture_on_commit_callbacks(execute=True):  # the file goes once the deletion commits
        assert api.delete(f"{UPLOADS}/{row.id}").status_code == 204
    assert not CalibrationUpload.objects.exists() and not row.path.exists()
    assert api.get(f"{UPLOADS}/{row.id}").status_code == 404


@pytest.mark.django_db(transaction=True)  # the file goes once the deletion commits
def test_an_upload_a_queued_job_needs_cannot_be_deleted(api, owner, sent):
    created = upload(api, JSONL).json()
    job_id = api.post("/api/jobs", {"model": "demo", "recipe": {"preset": "W4A16", "group_size": 64},
                                    "calibration": {"source": created["source"]}}, format="json").json()["id"]
    response = api.delete(f"{UPLOADS}/{created['id']}")
    assert response.status_code == 409 and job_id in errors(response)[None]
    assert CalibrationUpload.objects.filter(pk=created["id"]).exists()
    Job.request_cancel(job_id)  # once the job no longer needs it, it goes
    assert api.delete(f"{UPLOADS}/{created['id']}").status_code == 204
    assert files_under(CalibrationUpload(owner=owner).directory) == []


def test_the_calibration_page_uploads_lists_and_deletes(logged_in, owner, settings, upload_root,
                                                        django_capture_on_commit_callbacks):
    page = logged_in.get(reverse("calibration-files"))
    assert page.status_code == 200 and "No uploads yet" in page.content.decode()
    response = logged_in.post(reverse("calibration-files"), {"file": SimpleUploadedFile("notes.jsonl", JSONL)})
    assert response.status_code == 302
    row = CalibrationUpload.objects.get(owner=owner)
    page = logged_in.get(reverse("calibration-files")).content.decode()
    assert "notes.jsonl" in page and row.source in page and "Uploaded notes.jsonl: 5 records." in page
    settings.COMPRESSOR_MAX_UPLOAD_BYTES = 100
    too_big = logged_in.post(reverse("calibration-files"), {"file": SimpleUploadedFile("big.jsonl", JSONL)})
    assert too_big.status_code == 400 and "larger than the upload limit of 100 bytes" in too_big.content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        assert logged_in.post(reverse("calibration-delete", args=[row.id])).status_code == 302
    assert not CalibrationUpload.objects.exists() and files_under(upload_root) == []


def test_another_users_upload_cannot_be_deleted_through_the_page(client, owner, outsider):
    row = CalibrationUpload.objects.create(owner=owner, filename="a.jsonl", suffix=".jsonl", size=1, records=1,
                                           sha256="0" * 64)
    client.force_login(outsider)
    assert client.post(reverse("calibration-delete", args=[row.id])).status_code == 404
    assert client.get(reverse("calibration-files")).content.decode().count("a.jsonl") == 0
    assert CalibrationUpload.objects.filter(pk=row.id).exists()
