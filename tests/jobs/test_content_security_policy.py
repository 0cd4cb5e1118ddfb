"""Every page and endpoint sends a Content-Security-Policy without 'unsafe-inline' or 'unsafe-eval',
and no template carries what such a policy would block (inline scripts, on* handlers, style
attributes). The browser test (tests/browser/) checks that Chromium reports no violation."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs.middleware import content_security_policy, plotly_style_hashes
from tests.jobs.factories import make_job

pytestmark = pytest.mark.django_db
TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def test_the_policy_allows_only_our_own_files_and_plotlys_own_styles():
    policy = content_security_policy()
    directives = dict(d.split(" ", 1) for d in policy.split("; "))
    assert directives["script-src"] == "'self'" and directives["object-src"] == "'none'"
    assert directives["style-src"] == "'self' " + " ".join(plotly_style_hashes())
    # the empty <style> plotly fills through CSSOM, and its map CSS, found in the bundle we serve
    assert plotly_style_hashes()[0] == "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"
    assert len(plotly_style_hashes()) >= 2
    assert "unsafe" not in policy and "*" not in policy and "http" not in policy


def test_every_page_and_endpoint_sends_it(client, owner):
    job = make_job(owner)
    urls = ["/login/", "/", "/jobs/new/", f"/jobs/{job.id}/", f"/jobs/{job.id}/status.json", "/compare/",
            "/calibration/", "/account/api-token/", "/api/jobs", "/api/docs", "/api/docs?script=", "/nowhere/"]
    assert client.get("/login/")["Content-Security-Policy"] == content_security_policy()  # before logging in
    client.force_login(owner)
    for url in urls:
        response = client.get(url)
        assert response.status_code in (200, 404), url
        assert response["Content-Security-Policy"] == content_security_policy(), url


def test_the_api_docs_page_loads_its_start_up_script_as_a_file(client, owner):
    client.force_login(owner)
    page = client.get("/api/docs").content.decode()
    inline = [s for s in re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S) if s[1].strip()]
    assert inline == [] and "script=" in page
    script = client.get("/api/docs?script=")
    assert script.status_code == 200 and "SwaggerUIBundle" in script.content.decode()


@pytest.mark.parametrize("template", sorted(str(p.relative_to(TEMPLATES)) for p in TEMPLATES.rglob("*.html")))
def test_no_template_holds_inline_script_handlers_or_styles(template):
    text = (TEMPLATES / template).read_text()
    for match in re.finditer(r"<script\b([^>]*)>(.*?)</script>", text, re.S):
        attributes, body = match.groups()
        assert body.strip() == "" or "application/json" in attributes, f"inline script in {template}"
    assert not re.search(r"\son[a-z]+\s*=", text), f"inline event handler in {template}"
    assert not re.search(r"\sstyle\s*=", text), f"style attribute in {template}"
    assert "<style" not in text, f"<style> element in {template}"
    assert "javascript:" not in text, f"javascript: URL in {template}"
