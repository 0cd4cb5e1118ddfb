"""The new-job page's Recommend panel: markup the script fills, no inline script, the script builds
its DOM from text only (CSP: script-src 'self'; an answer naming a model cannot inject markup)."""
import re
from pathlib import Path

import pytest
from django.urls import reverse

pytestmark = pytest.mark.django_db

SCRIPT = Path(__file__).resolve().parents[2] / "static" / "js" / "new_job.js"


def test_the_page_has_the_panel_and_only_external_scripts(client, owner):
    client.force_login(owner)
    page = client.get(reverse("job-new")).content.decode()
    panel = re.search(r'<section id="recommend-panel"[^>]*>', page).group(0)
    assert f'data-url="{reverse("api-recommend")}"' in panel and "hidden" in panel
    assert 'id="id_model"' in page  # the field the script listens to
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert scripts and all("src=" in tag for tag in scripts)
    assert "js/new_job.js" in page


def test_the_script_asks_the_api_and_never_parses_html():
    text = SCRIPT.read_text()
    assert 'getElementById("recommend-panel")' in text and 'getElementById("id_model")' in text
    assert "encodeURIComponent(model)" in text and "credentials: \"same-origin\"" in text
    assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "eval(" not in text
