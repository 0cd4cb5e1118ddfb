"""The new-job form: clear, field-specific errors and nothing queued on bad input."""
import pytest
from django.urls import reverse

from jobs.models import Job

pytestmark = pytest.mark.django_db

VALID = {"model": "demo", "preset": "FP8_DYNAMIC", "group_size": "", "recipe_yaml": "",
         "calibration_samples": 16, "calibration_seqlen": 128, "eval_windows": 2}


def post(client, **changes):
    return client.post(reverse("job-new"), {**VALID, **changes})


def form_errors(response) -> dict:
    return {name: list(errors) for name, errors in response.context["form"].errors.items()}


@pytest.fixture
def logged_in(client, owner):
    client.force_login(owner)
    return client


def test_the_form_page_offers_the_demo_model_and_presets(logged_in):
    page = logged_in.get(reverse("job-new")).content.decode()
    assert 'value="demo"' in page
    for preset in ("FP8_DYNAMIC", "W4A16", "2:4"):
        assert preset in page


def test_it_rejects_a_path_outside_the_allowed_roots(logged_in, settings, tmp_path):
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    response = post(logged_in, model="/etc")
    assert response.status_code == 400
    assert "outside the allowed model directories" in form_errors(response)["model"][0]
    response = post(logged_in, model=f"{tmp_path}/../../etc")
    assert "'..' is not allowed" in form_errors(response)["model"][0]
    assert not Job.objects.exists()


def test_it_rejects_a_symlink_escaping_the_allowed_root(logged_in, settings, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (root / "link").symlink_to(outside)
    settings.COMPRESSOR_MODEL_ROOTS = [str(root)]
    response = post(logged_in, model=str(root / "link"))
    assert "outside the allowed model directories" in form_errors(response)["model"][0]


def test_it_refuses_pickled_weights(logged_in, settings, tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "pytorch_model.bin").write_bytes(b"pickle")
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    response = post(logged_in, model=str(model_dir))
    assert "no .safetensors weights" in form_errors(response)["model"][0]
    assert "pickled weights are refused" in form_errors(response)["model"][0]


def test_it_rejects_a_malformed_model_id(logged_in):
    response = post(logged_in, model="not a model!")
    assert "Hugging Face id" in form_errors(response)["model"][0]


def test_it_rejects_a_group_size_that_does_not_divide_the_demo_model(logged_in):
    response = post(logged_in, preset="W4A16", group_size="128")
    assert response.status_code == 400
    message = form_errors(response)["group_size"][0]
    assert "576" in message and "64" in message
    assert not Job.objects.exists()


def test_it_rejects_a_group_size_on_a_non_int4_preset(logged_in):
    response = post(logged_in, preset="FP8_DYNAMIC", group_size="64")
    assert "only to the W4A16 presets" in form_errors(response)["group_size"][0]


def test_it_names_the_bad_field_of_a_yaml_recipe(logged_in):
    yaml_text = "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      bogus_field: 1\n      scheme: FP8_DYNAMIC\n"
    response = post(logged_in, recipe_yaml=yaml_text)
    assert response.status_code == 400
    assert "bogus_field" in form_errors(response)["recipe_yaml"][0]


def test_it_limits_queued_jobs_per_user(logged_in, owner, settings):
    from .factories import make_job

    settings.COMPRESSOR_MAX_QUEUED_PER_USER = 2
    make_job(owner)
    make_job(owner)
    response = post(logged_in)
    assert response.status_code == 400
    assert "limit 2" in response.content.decode()  # shown as a form-wide error
    assert Job.objects.count() == 2


def test_a_valid_submission_queues_a_job_even_when_the_broker_is_down(logged_in, owner, settings):
    from tests.conftest import use_broker

    old = use_broker("redis://127.0.0.1:1/0")  # nothing listens on port 1
    try:
        response = post(logged_in)
    finally:
        use_broker(old)
    job = Job.objects.get()
    assert response.status_code == 302 and str(job.id) in response["Location"]
    assert job.recipe_name == "FP8_DYNAMIC" and job.model_source == "demo"
    assert job.status == "failed" and job.error_type == "BrokerUnavailable"
    assert "unreachable" in job.error_message


def test_calibration_too_large_for_the_workers_memory_is_a_form_error_before_queueing(logged_in, settings):
    settings.COMPRESSOR_DEVICE = "cpu"
    settings.COMPRESSOR_HOST_MEMORY_BYTES = str(8 * 2 ** 30)
    response = post(logged_in, preset="W8A8", calibration_samples=4096, calibration_seqlen=8192)
    assert response.status_code == 400
    message = form_errors(response)["calibration_samples"][0]
    assert "4096 samples x 8192 tokens" in message and "use at most" in message
    assert not Job.objects.exists()
