"""lm-eval batch size: an integer in range or "auto"; anything else names the field."""
import pytest

from jobs.models import Job

from .conftest import errors

pytestmark = pytest.mark.django_db

URL = "/api/jobs"
BODY = {"model": "demo", "recipe": {"preset": "FP8_DYNAMIC"},
        "evaluation": {"tasks": ["wikitext2_ppl"], "windows": 2}}


def test_auto_is_accepted_and_stored(api, sent):
    response = api.post(URL, {**BODY, "evaluation": {**BODY["evaluation"], "batch_size": "auto"}}, format="json")
    assert response.status_code == 201, response.content
    assert Job.objects.get(pk=response.json()["id"]).evaluation["batch_size"] == "auto"


@pytest.mark.parametrize("value", ["big", 0, 10_000, True])
def test_other_values_are_refused_naming_the_field(api, sent, value):
    response = api.post(URL, {**BODY, "evaluation": {**BODY["evaluation"], "batch_size": value}}, format="json")
    assert response.status_code == 400
    assert "evaluation.batch_size" in errors(response)
    assert not Job.objects.exists() and sent == []
