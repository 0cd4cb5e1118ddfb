"""The OpenAPI schema, the docs page (no CDN), and schemathesis run against the served schema:
no 5xx, and every response conforms to the schema (status, content type, body)."""
from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings as hypothesis_settings, strategies as st

from jobs.models import CalibrationUpload, Job, JobEvent
from tests.jobs.factories import make_job

from .conftest import token_client

EXAMPLES_PER_OPERATION = 25
SCHEMATHESIS_BUDGET_S = 60


@pytest.mark.django_db
def test_the_schema_describes_every_endpoint(api):
    response = api.get("/api/schema?format=json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert set(schema["paths"]) == {
        "/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events", "/api/jobs/{job_id}/cancel",
        "/api/jobs/{job_id}/card", "/api/jobs/{job_id}/artifact", "/api/jobs/{job_id}/push", "/api/presets",
        "/api/compare", "/api/recommend",
            "/api/calibration-files", "/api/calibration-files/{upload_id}"}
    listing = {p["name"] for p in schema["paths"]["/api/jobs"]["get"]["parameters"]}
    assert {"limit", "offset", "status", "model"} <= listing
    assert "tokenAuth" in schema["components"]["securitySchemes"]
    card = schema["paths"]["/api/jobs/{job_id}/card"]["get"]["responses"]["200"]["content"]
    assert list(card) == ["text/markdown"]


@pytest.mark.django_db
def test_the_docs_page_loads_nothing_from_outside(browser):
    page = browser.get("/api/docs").content.decode()
    assert "swagger-ui-bundle.js" in page
    assert "//cdn" not in page and "https://" not in page and "http://" not in page
    bundle = browser.get("/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js")
    assert bundle.status_code == 200


def succeeded_job(owner, artifacts) -> Job:
    job = make_job(owner)
    Job.claim(job.id, "w")
    (artifacts / str(job.id)).mkdir()
    (artifacts / str(job.id) / "config.json").write_text("{}")
    Job.succeed(job.id, {"model_card": "# card\n", "evaluation": {"metrics": []}}, str(job.id), 2)
    JobEvent.objects.create(job=job, stage="done", message="job succeeded", data={"fraction": 1.0})
    return job


@pytest.mark.django_db(transaction=True)  # requests go through the real WSGI handler, which commits
def test_schemathesis_finds_no_server_errors_and_no_schema_violations(owner, sent, settings, tmp_path):
    import schemathesis
    from django.core.wsgi import get_wsgi_application

    settings.ARTIFACT_ROOT = tmp_path
    settings.ALLOWED_HOSTS = ["*"]
    job = succeeded_job(owner, tmp_path)
    upload = CalibrationUpload.objects.create(owner=owner, filename="a.jsonl", suffix=".jsonl", size=1, records=1,
                                              sha256="0" * 64)
    auth = {"Authorization": token_client(owner)._credentials["HTTP_AUTHORIZATION"]}
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    # Django refuses NUL characters in any string (databases cannot store them): don't generate them.
    config = schemathesis.Config.from_dict({"generation": {"allow-x00": False}})
    schema = schemathesis.openapi.from_wsgi("/api/schema?format=json", get_wsgi_application(), headers=auth,
                                            config=config)
    started = time.monotonic()
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        strategies = [operation.as_strategy(mode) for mode in
                      (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)]
        if "{job_id}" in operation.path:  # also hit a real job, not only random ids
            strategies.append(operation.as_strategy(path_parameters={"job_id": str(job.id)}))
        if "{upload_id}" in operation.path:  # and a real upload
            strategies.append(operation.as_strategy(path_parameters={"upload_id": str(upload.id)}))

        # A schema-valid job is not necessarily a valid job (unknown model, bad group size), nor is any
        # schema-valid file a calibration file (suffix, UTF-8, records with text): 400 is right.
        # A schema-valid push may lack a stored token or name a repo id the Hub does not allow.
        # Likewise a schema-valid model name is not necessarily a model (GET /api/recommend).
        semantic = (operation.method.upper() == "POST" and operation.path in (
            "/api/jobs", "/api/calibration-files", "/api/jobs/{job_id}/push")) or operation.path == "/api/recommend"
        excluded = [positive_data_acceptance] if semantic else []

        @given(case=st.one_of(strategies))
        @hypothesis_settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                             phases=[Phase.explicit, Phase.generate], derandomize=True,
                             suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(headers=auth, excluded_checks=excluded)

        check()
        operations += 1
    assert operations == 15
    assert time.monotonic() - started < SCHEMATHESIS_BUDGET_S
