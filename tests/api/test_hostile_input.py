"""Hand-made hostile input, across the API and the HTML forms: every case is a clear 4xx naming what
was wrong (413 for a body over the limit), never a 500, nothing stored and nothing queued."""
from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from jobs.models import CalibrationUpload, Job
from tests.jobs.factories import make_job

from .conftest import errors

pytestmark = pytest.mark.django_db

JOBS = "/api/jobs"
UPLOADS = "/api/calibration-files"
FORM = {"model": "demo", "preset": "FP8_DYNAMIC", "group_size": "", "recipe_yaml": "",
        "calibration_samples": 16, "calibration_seqlen": 128, "eval_windows": 2}
LONG_INT = "9" * 5000  # past Python's 4300-digit limit for int(str)
CATASTROPHIC = r"(?:(?:[a-z]|[a-z][a-z]|[a-z][a-z][a-z]|\.|_|[0-9])+)+[0-9]$"


def post_json(client, body: str, path: str = JOBS):
    return client.generic("POST", path, body, content_type="application/json")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def yaml_job(text: str) -> dict:
    return {"model": "demo", "recipe": {"yaml": text}}


@pytest.fixture
def logged_in(client, owner):
    client.force_login(owner)
    return client


def assert_nothing_stored():
    assert not Job.objects.exists() and not CalibrationUpload.objects.exists()


# -- API: JSON bodies ----------------------------------------------------------------------------
@pytest.mark.parametrize("body, message", [
    (json.dumps({"model": "demo", "recipe": {"preset": "FP8_DYNAMIC"}, "name": "x"})[:-1]
     + ', "evaluation": {"tasks": ' + nested(100_000) + "}}", "nested more than 32 levels"),
    ('{"model": "demo", "recipe": {"recipe": {"a": ' + nested(200) + "}}}", "nested more than 32 levels"),
    ('{"model": "demo", "recipe": {"preset": "FP8_DYNAMIC"}, "calibration": {"samples": ' + LONG_INT + "}}",
     "JSON parse error"),
])
def test_json_bodies_nested_too_deeply_or_with_endless_integers_are_a_400(api, sent, body, message):
    response = post_json(api, body)
    assert response.status_code == 400 and response["Content-Type"] == "application/json"
    assert message in errors(response)[None]
    assert_nothing_stored() and not sent


def test_a_json_body_over_the_limit_is_a_413_before_it_is_read(api, sent, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    response = post_json(api, json.dumps({"model": "demo", "recipe": {"preset": "FP8_DYNAMIC"}, "name": "x" * 20_000}))
    assert response.status_code == 413 and "larger than the limit of 10000 bytes" in errors(response)[None]
    assert_nothing_stored() and not sent


@pytest.mark.parametrize("text, message", [
    ("a: &a [x, x]\nb: [*a, *a]\n", "anchors and aliases"),
    (nested(5000), "nested more than 16 levels"),
    ("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W4A16\n      block_size: " + LONG_INT,
     "not a usable YAML value"),
])
def test_hostile_yaml_is_a_400_naming_the_recipe(api, sent, text, message):
    response = api.post(JOBS, yaml_job(text), format="json")
    assert response.status_code == 400 and message in errors(response)["recipe"]
    assert_nothing_stored() and not sent


@pytest.mark.timeout(120)
def test_a_catastrophic_pattern_is_refused_in_the_request(api, sent):
    response = api.post(JOBS, {"model": "demo", "recipe": {"preset": "FP8_DYNAMIC", "ignore": [f"re:{CATASTROPHIC}"]}},
                        format="json")
    assert response.status_code == 400 and "takes too long to match module names" in errors(response)["recipe"]
    assert_nothing_stored() and not sent


def test_stored_fields_are_capped(api, sent):
    ignore = ["lm_head", *(f"model.layers.{i}.{'x' * 235}" for i in range(255))]  # each allowed, together 65 KB
    body = {"model": "demo", "recipe": {"recipe": {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {
        "ignore": ignore, "scheme": "FP8_DYNAMIC"}}}}}}
    response = api.post(JOBS, body, format="json")
    assert response.status_code == 400 and "too large to store" in errors(response)["recipe"]
    response = api.post(JOBS, {"model": "/" + "m" * 600, "recipe": {"preset": "FP8_DYNAMIC"}}, format="json")
    assert response.status_code == 400 and "model" in errors(response)
    assert_nothing_stored() and not sent


@pytest.mark.parametrize("query", [f"offset={10 ** 30}", f"limit={LONG_INT}", "offset=-1"])
def test_query_numbers_out_of_range_are_a_400(api, query):
    response = api.get(f"{JOBS}?{query}")
    assert response.status_code == 400 and response["Content-Type"] == "application/json"


def test_event_cursors_out_of_range_are_a_400(api, owner):
    job = make_job(owner)
    response = api.get(f"{JOBS}/{job.id}/events?after={10 ** 30}")
    assert response.status_code == 400 and "after" in errors(response)


@pytest.mark.parametrize("path", ["/api/jobs%0A", "/api/no%0Awhere", "/api/%0A/x", "/api/jobs/{id}%0A",
                                  "/api/jobs/{id}/events%0D%0A"])
def test_api_404s_for_paths_with_newlines_are_json(api, owner, path):
    # (the test client would strip a raw newline from the URL, as urllib does; encoded, it reaches Django)
    response = api.get(path.format(id=make_job(owner).id))
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    assert errors(response)[None]


# -- API: uploads --------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n' + nested(100_000).encode() + b"\n", "line 2 is nested more than 32 levels deep"),
    (b'{"messages": [{"content": ' + nested(500).encode() + b"}]}\n", "line 1 is nested more than 32 levels deep"),
    (b'{"text": "ok", "n": ' + LONG_INT.encode() + b"}\n", "line 1 is not usable JSON"),
])
def test_hostile_upload_records_are_a_400_naming_the_file(api, content, message):
    response = api.post(UPLOADS, {"file": SimpleUploadedFile("hostile.jsonl", content)}, format="multipart")
    assert response.status_code == 400 and message in errors(response)["file"]
    assert_nothing_stored()


def test_too_many_multipart_fields_are_a_400_in_json(api, settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    fields = {f"f{i}": "x" for i in range(50)}
    response = api.post(UPLOADS, {**fields, "file": SimpleUploadedFile("a.jsonl", b'{"text": "x"}')},
                        format="multipart")
    assert response.status_code == 400 and response["Content-Type"] == "application/json"
    assert_nothing_stored()


def test_a_multipart_body_declared_over_the_limit_is_a_413(api, settings):
    settings.COMPRESSOR_MAX_UPLOAD_BYTES = 1000
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = api.post(UPLOADS, {"file": SimpleUploadedFile("big.jsonl", b'{"text": "x"}\n' * 500)},
                        format="multipart")
    assert response.status_code == 413 and response["Content-Type"] == "application/json"
    assert_nothing_stored()


# -- HTML forms ----------------------------------------------------------------------------------
def test_a_form_body_over_the_limit_is_a_413(logged_in, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    response = logged_in.post(reverse("job-new"), {**FORM, "recipe_yaml": "#" * 20_000})
    assert response.status_code == 413
    assert_nothing_stored()


def test_too_many_form_fields_are_a_400_not_a_500(logged_in, settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    response = logged_in.post(reverse("job-new"), {**FORM, **{f"f{i}": "x" for i in range(50)}})
    assert response.status_code == 400
    assert_nothing_stored()


@pytest.mark.parametrize("changes, field, message", [
    ({"recipe_yaml": nested(5000)}, "recipe_yaml", "nested more than 16 levels"),
    ({"recipe_yaml": "a: &a [x]\nb: *a\n"}, "recipe_yaml", "anchors and aliases"),
    ({"calibration_samples": LONG_INT}, "calibration_samples", "whole number"),
])
def test_hostile_form_fields_are_field_errors(logged_in, changes, field, message):
    response = logged_in.post(reverse("job-new"), {**FORM, **changes})
    assert response.status_code == 400
    assert message in " ".join(response.context["form"].errors[field])
    assert_nothing_stored()


def test_a_hostile_upload_on_the_calibration_page_is_a_400(logged_in):
    response = logged_in.post(reverse("calibration-files"),
                              {"file": SimpleUploadedFile("deep.json", nested(100_000).encode())})
    assert response.status_code == 400 and "nested more than 32 levels deep" in response.content.decode()
    assert_nothing_stored()


# -- sources (issue item 1, through the API) -----------------------------------------------------
def test_sources_that_exist_relative_to_the_working_directory_are_refused(api, sent, tmp_path, monkeypatch):
    (tmp_path / "var" / "uploads" / "7").mkdir(parents=True)
    (tmp_path / "var" / "uploads" / "7" / "x.jsonl").write_text('{"text": "secret"}')
    monkeypatch.chdir(tmp_path)
    response = api.post(JOBS, {"model": "demo", "recipe": {"preset": "W4A16", "group_size": 64},
                               "calibration": {"source": "var/uploads"}}, format="json")
    assert response.status_code == 400 and "names a path on the server" in errors(response)["calibration.source"]
    response = api.post(JOBS, {"model": "var/uploads", "recipe": {"preset": "FP8_DYNAMIC"}}, format="json")
    assert response.status_code == 400 and "names a path on the server" in errors(response)["model"]
    assert_nothing_stored() and not sent
