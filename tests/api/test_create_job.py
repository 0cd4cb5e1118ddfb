"""POST /api/jobs: the form's validation and pre-flight, JSON errors naming the field, nothing stored
on bad input."""
import pytest

from jobs.models import Job, Status

from .conftest import csrf_headers, errors

pytestmark = pytest.mark.django_db

URL = "/api/jobs"
VALID = {"model": "demo", "recipe": {"preset": "FP8_DYNAMIC"},
         "calibration": {"samples": 16, "seqlen": 128}, "evaluation": {"tasks": ["wikitext2_ppl"], "windows": 2}}


def test_it_creates_and_queues_a_job_with_a_token(api, owner, sent):
    body = {**VALID, "name": "int4 g64", "recipe": {"preset": "W4A16", "group_size": 64}}
    response = api.post(URL, body, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    job = Job.objects.get(pk=data["id"])
    assert job.owner == owner and job.status == Status.QUEUED
    assert job.name == "int4 g64" and job.recipe_name == "W4A16"
    assert job.recipe["preset_options"] == {"group_size": 64}
    assert job.calibration == {"source": job.calibration["source"], "samples": 16, "seqlen": 128}
    assert sent == [str(job.id)]
    assert data["status"] == "queued" and data["model"] == "demo" and data["error"] is None
    assert data["links"]["self"].endswith(f"/api/jobs/{job.id}")
    assert response["Location"] == data["links"]["self"]


def test_it_creates_a_job_from_a_browser_session_with_csrf(browser, owner, sent):
    refused = browser.post(URL, VALID, format="json")
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["errors"][0]["message"]
    assert not Job.objects.exists()
    response = browser.post(URL, VALID, format="json", **csrf_headers(browser))
    assert response.status_code == 201, response.content
    assert Job.objects.get().owner == owner


def test_it_accepts_a_yaml_recipe_and_a_recipe_dict(api, sent):
    from compression.recipe import Recipe

    yaml_text = Recipe.from_preset("FP8_DYNAMIC").to_yaml()
    response = api.post(URL, {**VALID, "recipe": {"yaml": yaml_text}}, format="json")
    assert response.status_code == 201, response.content
    as_dict = Recipe.from_preset("W4A16", group_size=32).to_dict()
    response = api.post(URL, {**VALID, "recipe": {"recipe": as_dict}}, format="json")
    assert response.status_code == 201, response.content
    job = Job.objects.get(pk=response.json()["id"])
    assert job.recipe == as_dict and job.recipe_name == "W4A16"
    assert len(sent) == 2


def test_it_reports_a_job_the_queue_refused_as_failed(api, monkeypatch):
    from jobs.tasks import run_job

    def refuse(*args, **kwargs):
        raise ConnectionError("broker down")

    monkeypatch.setattr(run_job, "apply_async", refuse)
    response = api.post(URL, VALID, format="json")
    assert response.status_code == 201
    assert response.json()["status"] == "failed"
    assert response.json()["error"]["type"] == "BrokerUnavailable"
    job = Job.objects.get()
    assert job.status == Status.FAILED


def test_it_rejects_a_group_size_the_demo_model_cannot_use(api, sent):
    response = api.post(URL, {**VALID, "recipe": {"preset": "W4A16", "group_size": 128}}, format="json")
    assert response.status_code == 400
    assert "576" in errors(response)["recipe.group_size"]
    assert not Job.objects.exists() and sent == []


def test_it_rejects_a_group_size_no_preset_offers(api, sent):
    response = api.post(URL, {**VALID, "recipe": {"preset": "W4A16", "group_size": 48}}, format="json")
    assert response.status_code == 400
    assert "32, 64, 128" in errors(response)["recipe.group_size"]


def test_it_names_an_unknown_recipe_field(api, sent):
    response = api.post(URL, {**VALID, "recipe": {"preset": "W4A16", "groupsize": 64}}, format="json")
    assert response.status_code == 400
    assert "unknown field" in errors(response)["recipe.groupsize"]


def test_it_names_a_preset_option_the_preset_does_not_take(api, sent):
    response = api.post(URL, {**VALID, "recipe": {"preset": "FP8_DYNAMIC", "group_size": 64}}, format="json")
    assert response.status_code == 400
    assert "not an option of preset FP8_DYNAMIC" in errors(response)["recipe.group_size"]


def test_it_names_unknown_top_level_and_nested_fields(api, sent):
    response = api.post(URL, {**VALID, "priority": 1}, format="json")
    assert response.status_code == 400 and "unknown field" in errors(response)["priority"]
    response = api.post(URL, {**VALID, "calibration": {"samples": 8, "dataset": "x"}}, format="json")
    assert response.status_code == 400 and "unknown field" in errors(response)["calibration.dataset"]
    assert not Job.objects.exists()


def test_it_rejects_out_of_range_and_mistyped_values_by_path(api, sent):
    response = api.post(URL, {**VALID, "calibration": {"samples": 0}}, format="json")
    assert response.status_code == 400 and "between 1 and 4096" in errors(response)["calibration.samples"]
    response = api.post(URL, {**VALID, "evaluation": {"tasks": ["no_such_task"]}}, format="json")
    assert response.status_code == 400 and "evaluation.tasks" in errors(response)
    response = api.post(URL, {**VALID, "trust_remote_code": "maybe"}, format="json")
    assert response.status_code == 400 and "trust_remote_code" in errors(response)
    response = api.post(URL, {**VALID, "evaluation": {"tasks": [["nested"]]}}, format="json")
    assert response.status_code == 400 and "evaluation.tasks[0]" in errors(response)


def test_it_wants_exactly_one_recipe_form(api, sent):
    response = api.post(URL, {**VALID, "recipe": {"preset": "FP8_DYNAMIC", "yaml": "a: b"}}, format="json")
    assert response.status_code == 400 and "exactly one" in errors(response)["recipe"]
    response = api.post(URL, {"model": "demo"}, format="json")
    assert response.status_code == 400 and "recipe" in errors(response)


def test_it_refuses_path_traversal_and_paths_outside_the_allowed_roots(api, sent, settings, tmp_path):
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    response = api.post(URL, {**VALID, "model": "/etc/../etc"}, format="json")
    assert response.status_code == 400 and "'..' is not allowed" in errors(response)["model"]
    response = api.post(URL, {**VALID, "model": "/etc"}, format="json")
    assert response.status_code == 400 and "outside the allowed model directories" in errors(response)["model"]
    assert not Job.objects.exists()


def test_it_answers_invalid_json_with_a_json_400(api, sent):
    response = api.post(URL, data='{"model": "demo",', content_type="application/json")
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert "JSON parse error" in errors(response)[None]
    response = api.post(URL, data="[1, 2]", content_type="application/json")
    assert response.status_code == 400 and "JSON object" in errors(response)[None]
    response = api.post(URL, data="model=demo", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415 and response.json()["errors"]


def test_it_enforces_the_limit_of_active_jobs(api, owner, sent, settings):
    from tests.jobs.factories import make_job

    settings.COMPRESSOR_MAX_QUEUED_PER_USER = 1
    make_job(owner)
    response = api.post(URL, VALID, format="json")
    assert response.status_code == 400
    assert "queued or running" in errors(response)[None]
    assert Job.objects.count() == 1


def test_an_autoround_preset_takes_its_steps_per_layer_and_refuses_them_elsewhere(api, sent):
    from compression.recipe import Recipe

    body = {**VALID, "recipe": {"preset": "AutoRound+W4A16", "group_size": 64, "iters": 20}}
    response = api.post(URL, body, format="json")
    assert response.status_code == 201, response.content
    job = Job.objects.get(pk=response.json()["id"])
    assert job.recipe["preset_options"] == {"group_size": 64, "iters": 20}
    assert Recipe.from_dict(job.recipe).modifiers[0].autoround.iters == 20
    bad = api.post(URL, {**VALID, "recipe": {"preset": "W4A16", "iters": 20}}, format="json")
    assert bad.status_code == 400 and "not an option of preset W4A16" in errors(bad)["recipe.iters"]
    negative = api.post(URL, {**body, "recipe": {"preset": "AutoRound+W4A16", "iters": -1}}, format="json")
    assert negative.status_code == 400 and "recipe.iters" in errors(negative)
    assert Job.objects.count() == 1
