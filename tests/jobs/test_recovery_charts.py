"""Job page charts of issue 14: the fine-tuning loss curve and per-layer reconstruction error."""
import json

import pytest
from django.urls import reverse

from jobs.charts import finetune_loss, reconstruction_error
from jobs.models import Job, JobEvent
from jobs.tasks import ProgressRecorder

from .factories import make_job

STEP = {"stage": "finetune", "kind": "finetune", "steps": 3, "message": "step"}
RECON = {"stage": "compress", "kind": "reconstruction", "layers": 2, "message": "recon"}


def test_the_loss_curve_has_one_point_per_step_and_keeps_a_resumed_steps_last_value():
    events = [{**STEP, "step": 1, "loss": 0.9, "kl": 0.9, "layer_loss": 0.0, "tokens": 512},
              {**STEP, "step": 2, "loss": 0.7, "kl": 0.7, "layer_loss": 0.0, "tokens": 1024},
              {**STEP, "step": 2, "loss": 0.6, "kl": 0.6, "layer_loss": 0.0, "tokens": 1024},  # after a resume
              {"stage": "compress", "module": "q_proj", "loss": 5.0, "layer": 0}]
    fig = finetune_loss(events)
    (trace,) = fig["data"]
    assert trace["x"] == [1, 2] and trace["y"] == [0.9, 0.6]
    assert "1,024 tokens" in trace["hovertext"][1]
    assert "step" in fig["layout"]["xaxis"]["title"]["text"]
    with_layer_loss = finetune_loss([{**STEP, "step": 1, "loss": 1.5, "kl": 1.0, "layer_loss": 0.5}])
    assert [t["name"] for t in with_layer_loss["data"]] == ["loss", "KL part"]
    assert finetune_loss([[1, 0.5], [2, 0.25]])["data"][0]["y"] == [0.5, 0.25]  # the results' loss_curve
    assert "No fine-tuning" in json.dumps(finetune_loss([]))


def test_reconstruction_bars_show_before_and_after_per_layer():
    events = [{**RECON, "layer": 0, "error_before": 4.0, "error_after": 1.0, "relative_before": 0.04,
               "relative_after": 0.01},
              {**RECON, "layer": 1, "error_before": 9.0, "error_after": 9.0, "relative_before": 0.09,
               "relative_after": 0.09}]
    fig = reconstruction_error(events)
    before, after = fig["data"]
    assert before["x"] == [0, 1] and before["y"] == [0.04, 0.09] and after["y"] == [0.01, 0.09]
    assert after["text"][0] == "−75%"
    assert fig["layout"]["yaxis"]["type"] == "log"
    absolute = reconstruction_error([{"layer": 0, "error_before": 2.0, "error_after": 1.0}])  # report rows
    assert absolute["data"][0]["y"] == [2.0] and "MSE" in absolute["layout"]["yaxis"]["title"]["text"]


@pytest.mark.django_db
def test_the_job_page_and_status_carry_both_charts_from_the_recorded_events(client, owner):
    job = make_job(owner)
    Job.claim(job.id, "w")
    record = ProgressRecorder(job.id)
    for i in range(2):
        record({**RECON, "layer": i, "error_before": 2.0 + i, "error_after": 1.0, "relative_before": 0.2,
                "relative_after": 0.1})
    for step in (1, 2, 3):
        record({**STEP, "step": step, "loss": 1.0 / step, "kl": 1.0 / step, "layer_loss": 0.0, "tokens": 512 * step})
    assert JobEvent.objects.filter(job=job, data__kind="finetune").count() == 3  # every step is logged
    client.force_login(owner)
    charts = client.get(reverse("job-status", args=[job.id])).json()["charts"]
    assert charts["finetune_loss"]["data"][0]["x"] == [1, 2, 3]
    assert charts["reconstruction"]["data"][1]["y"] == [0.1, 0.1]
    page = client.get(reverse("job-detail", args=[job.id])).content.decode()
    assert 'id="chart-finetune-loss"' in page and 'id="chart-reconstruction"' in page
    other = make_job(owner)
    assert client.get(reverse("job-status", args=[other.id])).json()["charts"]["finetune_loss"] is None


@pytest.mark.django_db
def test_autoround_events_are_logged_and_drawn_as_round_to_nearest_vs_tuned(client, owner):
    job = make_job(owner)
    Job.claim(job.id, "w")
    record = ProgressRecorder(job.id)
    for i in range(3):
        record({"stage": "compress", "kind": "autoround", "layers": 3, "layer": i, "error_before": 4.0,
                "error_after": 1.0 + i, "relative_before": 0.4, "relative_after": 0.1 * (i + 1), "message": "ar"})
    assert JobEvent.objects.filter(job=job, data__kind="autoround").count() == 3  # every layer is logged
    client.force_login(owner)
    charts = client.get(reverse("job-status", args=[job.id])).json()["charts"]
    rtn, tuned = charts["autoround"]["data"]
    assert rtn["name"] == "round-to-nearest" and tuned["name"] == "after AutoRound"
    assert tuned["x"] == [0, 1, 2] and tuned["y"] == pytest.approx([0.1, 0.2, 0.3]) and tuned["text"][0] == "−75%"
    assert charts["reconstruction"] is None
    assert 'id="chart-autoround"' in client.get(reverse("job-detail", args=[job.id])).content.decode()
    # the report's rows (error_rtn / error_tuned) draw the same way when the events are gone
    from jobs.charts import autoround_error

    rows = autoround_error([{"layer": 0, "error_rtn": 2.0, "error_tuned": 1.0}])
    assert rows["data"][1]["y"] == [1.0]
