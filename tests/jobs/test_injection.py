"""User text reaches pages only escaped or sanitised: job names, model ids, error messages, log
lines, recipe text, uploaded file names and the model card, on every page and partial that shows them."""
from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from django.urls import reverse

from jobs.models import CalibrationUpload, Job, JobEvent, Status

from .factories import make_job

pytestmark = pytest.mark.django_db

SCRIPT = '<script>alert("owned")</script>'
IMG = '<img src=x onerror="alert(1)">'
CARD = f"""---
license: apache-2.0
---
# Card {SCRIPT}

{IMG} [click me](javascript:alert(2)) <iframe src="https://evil.example"></iframe>

| a | b |
|---|---|
| <svg onload=alert(3)> | ok |
"""


class TagAudit(HTMLParser):
    """Every element the browser would build from a page, and the text inside its scripts."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[tuple[str, str]] = []  # (type, text)
        self._script_type: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._script_type = (dict(attrs).get("type") or "text/javascript") if tag == "script" else None

    def handle_endtag(self, tag):
        self._script_type = None

    def handle_data(self, data):
        if self._script_type:
            self.scripts.append((self._script_type, data))


def assert_inert(html: str) -> None:
    """No element, attribute or script of the page came from the attacker's text."""
    audit = TagAudit()
    audit.feed(html)
    for tag, attrs in audit.tags:
        assert tag not in ("iframe", "svg"), tag
        assert not (tag == "img" and attrs.get("src") == "x"), attrs
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        assert not str(attrs.get("href", "")).strip().lower().startswith("javascript:"), attrs
    for kind, text in audit.scripts:
        if kind == "application/json":  # data islands (json_script): markup characters escaped
            assert "<" not in text and ">" not in text, text[:200]
        else:
            assert "alert(" not in text, text[:200]


@pytest.fixture
def logged_in(client, owner):
    client.force_login(owner)
    return client


@pytest.fixture
def hostile_jobs(owner):
    """A finished job and a running one whose every user-controlled text is an attack."""
    done = make_job(owner, name=f"fp8 {SCRIPT}", model_source=f"org/model{IMG}")
    Job.claim(done.id, "w")
    metrics = [{"task": f"task{SCRIPT}", "metric": IMG, "baseline": 10.0, "compressed": 10.5,
                "recovery_pct": 95.0, "higher_is_better": False}]
    Job.succeed(done.id, {"model_card": CARD, "evaluation": {"metrics": metrics},
                          "size": {"compressed_weight_bytes": 5_000_000, "dense_bytes": 10_000_000}}, "", 0)
    running = make_job(owner, name=IMG, model_source=f"org/model{IMG}")
    Job.claim(running.id, "w")
    Job.report_progress(running.id, {"stage": "compress", "message": SCRIPT, "fraction": 0.5,
                                     "layer": 1, "layers": 2})
    JobEvent.objects.create(job=running, stage="compress", level="warning", message=f"log {SCRIPT}{IMG}")
    failed = make_job(owner, name="failing")
    Job.fail(failed.id, f"Err{IMG}", f"boom {SCRIPT}")
    CalibrationUpload.objects.create(owner=owner, filename=f"{SCRIPT}.jsonl", suffix=".jsonl", size=1, records=1,
                                     sha256="0" * 64)
    return done, running, failed


def test_pages_escape_every_piece_of_user_text(logged_in, hostile_jobs):
    done, running, failed = hostile_jobs
    pages = {
        "list": logged_in.get(reverse("job-list")),
        "done": logged_in.get(reverse("job-detail", args=[done.id])),
        "running": logged_in.get(reverse("job-detail", args=[running.id])),
        "failed": logged_in.get(reverse("job-detail", args=[failed.id])),
        "new": logged_in.get(reverse("job-new")),
        "compare": logged_in.get(reverse("compare"), {"model": done.model_source}),
        "calibration": logged_in.get(reverse("calibration-files")),
    }
    for name, response in pages.items():
        assert response.status_code == 200, name
        assert_inert(response.content.decode())
    # the text is still shown, escaped, so the user sees what they typed
    assert "&lt;script&gt;alert(&quot;owned&quot;)&lt;/script&gt;" in pages["list"].content.decode()
    assert "boom &lt;script&gt;" in pages["failed"].content.decode()
    assert "&lt;script&gt;alert(&quot;owned&quot;)&lt;/script&gt;.jsonl" in pages["new"].content.decode()
    assert "&lt;script&gt;alert(&quot;owned&quot;)&lt;/script&gt;.jsonl" in pages["calibration"].content.decode()
    # the card is rendered as HTML (a table survives) with the dangerous parts gone
    assert "<table>" in pages["done"].content.decode()


def test_the_live_partials_escape_user_text_too(logged_in, hostile_jobs):
    _, running, _ = hostile_jobs
    body = logged_in.get(reverse("job-status", args=[running.id])).json()
    assert_inert(body["progress_html"])
    assert_inert(body["results_html"])
    assert "log &lt;script&gt;" in body["progress_html"]


def test_a_recipe_yaml_with_markup_is_refused_and_echoed_escaped(logged_in):
    response = logged_in.post(reverse("job-new"), {
        "model": "demo", "preset": "FP8_DYNAMIC", "group_size": "", "calibration_samples": 4,
        "calibration_seqlen": 64, "eval_windows": 2,
        "recipe_yaml": f"quant_stage:\n  quant_modifiers:\n    {SCRIPT}: {{}}\n"})
    assert response.status_code == 400
    assert_inert(response.content.decode())
    assert not Job.objects.exists()


def test_the_api_returns_user_text_as_data_not_markup(hostile_jobs, owner):
    from tests.api.conftest import token_client

    done, _, _ = hostile_jobs
    api = token_client(owner)
    response = api.get(f"/api/jobs/{done.id}")
    assert response["Content-Type"] == "application/json"
    assert json.loads(response.content)["name"] == f"fp8 {SCRIPT}"  # stored verbatim, served as JSON
    card = api.get(f"/api/jobs/{done.id}/card")
    assert card["Content-Type"].startswith("text/markdown")  # never text/html
    assert card["X-Content-Type-Options"] == "nosniff"

