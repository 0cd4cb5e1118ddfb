"""Compare like with like: one colour per job, the recipe in the Recipe column, evaluation settings
grouped with a warning when mixed, and filters."""
from __future__ import annotations

import json

import pytest
from django.urls import reverse

from jobs.models import Job

from .factories import make_job

pytestmark = pytest.mark.django_db


def _done(owner, name, recipe_name, evaluation, recovery, size):
    job = make_job(owner, name=name, recipe_name=recipe_name, evaluation=evaluation)
    Job.claim(job.id, "w")
    rows = [{"task": "wikitext2_ppl", "metric": "perplexity", "baseline": 10.0, "compressed": 10.0 / recovery * 100,
             "recovery_pct": recovery, "higher_is_better": False, "primary": True}]
    Job.succeed(job.id, {"evaluation": {"metrics": rows, "settings": evaluation},
                         "recipe_summary": f"{recipe_name} summary", "size": {"compressed_weight_bytes": size}}, "", 0)
    return job


PPL8 = {"tasks": ["wikitext2_ppl"], "windows": 8, "seqlen": 512}
PPL2 = {"tasks": ["wikitext2_ppl"], "windows": 2, "seqlen": 512}


@pytest.fixture
def jobs(owner):
    return [_done(owner, "fp8 run", "FP8_DYNAMIC", PPL8, 99.0, 160_000_000),
            _done(owner, "w4 run", "W4A16", PPL8, 92.0, 90_000_000),
            _done(owner, "quick w4", "W4A16", PPL2, 95.0, 90_000_000)]


def _page(client, owner, **params):
    client.force_login(owner)
    response = client.get(reverse("compare"), {"model": "demo", **params})
    assert response.status_code == 200
    html = response.content.decode()
    charts = json.loads(html.split('id="compare-charts" type="application/json">')[1].split("</script>")[0])
    return html, charts


def test_mixed_evaluation_settings_are_warned_and_get_separate_fronts(client, owner, jobs):
    html, charts = _page(client, owner)
    assert 'id="mixed-settings"' in html
    assert "wikitext2_ppl · perplexity 8×512 tokens" in html and "perplexity 2×512 tokens" in html
    fronts = [t for t in charts["scatter"]["data"] if t["mode"] == "lines"]
    assert len(fronts) == 2
    markers = [t for t in charts["scatter"]["data"] if t["mode"] == "markers"]
    assert len({t["marker"]["color"] for t in markers}) == 3  # one colour per job
    # the Recipe column shows the recipe, not the job name
    assert "<td>FP8_DYNAMIC<br><small class=\"muted\">FP8_DYNAMIC summary</small></td>" in html


def test_filtering_by_settings_compares_like_with_like(client, owner, jobs):
    html, _ = _page(client, owner)
    key = html.split('<option value="')[3].split('"')[0]  # first settings group (after the model option)
    html, charts = _page(client, owner, eval=key)
    assert 'id="mixed-settings"' not in html
    assert [t["name"] for t in charts["scatter"]["data"] if t["mode"] == "markers"] == ["fp8 run", "w4 run"]


def test_filtering_by_text(client, owner, jobs):
    html, charts = _page(client, owner, q="quick")
    assert [t["name"] for t in charts["scatter"]["data"] if t["mode"] == "markers"] == ["quick w4"]
    html, charts = _page(client, owner, q="nothing-like-this")
    assert "No job matches the filter." in html and charts is None


def test_more_jobs_than_the_page_draws_is_a_400_that_says_how_to_narrow_them(client, owner, jobs, monkeypatch):
    monkeypatch.setattr("jobs.views.MAX_COMPARED", 2)
    client.force_login(owner)
    response = client.get(reverse("compare"), {"model": "demo"})
    html = response.content.decode()
    assert response.status_code == 400 and 'id="too-many-jobs"' in html
    assert "3 of your succeeded jobs on demo match; the compare page draws at most 2 at once" in html
    assert 'id="compare-filters"' in html and 'id="compare-table"' not in html
    assert 'id="compare-charts" type="application/json">null</script>' in html
    html, charts = _page(client, owner, q="w4")  # narrowed to two: drawn
    assert [t["name"] for t in charts["scatter"]["data"] if t["mode"] == "markers"] == ["w4 run", "quick w4"]


def test_the_cached_compare_charts_follow_every_job_shown(client, owner, jobs):
    _, charts = _page(client, owner)
    assert len([t for t in charts["scatter"]["data"] if t["mode"] == "markers"]) == 3
    _done(owner, "late run", "W8A8", PPL8, 97.0, 140_000_000)
    _, again = _page(client, owner)
    assert [t["name"] for t in again["scatter"]["data"] if t["mode"] == "markers"][-1] == "late run"
    _, filtered = _page(client, owner, q="late")
    assert [t["name"] for t in filtered["scatter"]["data"] if t["mode"] == "markers"] == ["late run"]
