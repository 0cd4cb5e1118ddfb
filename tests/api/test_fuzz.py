"""Property-based fuzzing of every API operation from its own OpenAPI schema (schemathesis): whatever
the generated input, the answer is never a 5xx and always JSON. The example count per operation is
small here (FUZZ_EXAMPLES raises it for a longer hunt; 400 per operation found nothing more)."""
from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from rest_framework.authtoken.models import Token

from tests.jobs.factories import make_job

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "15"))


@pytest.fixture
def api_schema(db, owner, monkeypatch, settings, tmp_path):
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    from compressor_ui.wsgi import application
    from jobs.tasks import run_job

    # as Django's test client does: the test's open transaction must survive each request
    for signal in (request_started, request_finished):
        signal.disconnect(close_old_connections)

    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    monkeypatch.setattr(run_job, "apply_async", lambda *args, **kwargs: None)  # jobs stay queued
    make_job(owner)
    key = Token.objects.create(user=owner).key
    schema = schemathesis.openapi.from_wsgi("/api/schema", application,
                                            headers={"Authorization": f"Token {key}"})
    schema.fuzz_headers = {"Authorization": f"Token {key}"}
    yield schema
    for signal in (request_started, request_finished):
        signal.connect(close_old_connections)


def test_no_input_makes_the_api_fail_or_answer_in_anything_but_json(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    headers = api_schema.fuzz_headers
    for operation in operations:
        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call(headers=headers)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code}\n" \
                                               f"{response.text[:2000]}"
            if response.status_code >= 400:
                assert (response.headers.get("content-type") or [""])[0].startswith("application/json"), \
                    f"{case.method} {case.formatted_path}: {response.status_code} {response.headers}"

        fuzz()
