"""A real browser (Debian's Chromium, driven by Playwright) against the real server and worker:
log in, submit a job through the form, watch its progress update, see the charts, compare,
download the model card. Screenshots land in test-artifacts/ for people to look at."""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from jobs.models import Job, Status
from tests.conftest import PASSWORD
from tests.tiny import save_tiny_llama

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser_page():
    if not CHROMIUM:
        pytest.fail("Chromium is not installed; `make test` installs it (scripts/setup.sh)")
    # Playwright's sync API runs an event loop in this thread; the ORM calls of the test are safe here.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        yield page
        context.close()
        browser.close()
    os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


def test_a_user_runs_a_job_from_the_browser(browser_page, live_server, owner, job_env, celery_worker, tmp_path):
    page = browser_page
    model_dir = save_tiny_llama(job_env["models"] / "tiny-llama")

    page.goto(f"{live_server.url}/")
    assert "/login/" in page.url  # login on every page
    page.fill("input[name=username]", owner.username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")

    page.click("text=New job")
    page.fill("input[name=model]", str(model_dir))
    page.select_option("select[name=preset]", "FP8_DYNAMIC")
    page.fill("input[name=calibration_samples]", "4")
    page.fill("input[name=eval_windows]", "2")
    page.screenshot(path=str(ARTIFACTS / "01-new-job-form.png"), full_page=True)
    # Keyboard activation of the submit button (a mouse click on it did not fire a submit in
    # headless Chromium 156 under Playwright 1.65, while Enter on the focused button does).
    page.locator("form.card button[type=submit]").press("Enter")
    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f-]{36}/$"))
    job = Job.objects.get()

    # the page updates itself: record what it shows while the job runs, without reloading
    seen: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = page.text_content("#job-status") or ""
        stage = page.text_content("#job-stage") if page.query_selector("#job-stage") else ""
        if not seen or seen[-1] != f"{status}/{stage}":
            seen.append(f"{status}/{stage}")
            if status == "running" and len(seen) == 2:
                page.screenshot(path=str(ARTIFACTS / "02-job-running.png"), full_page=True)
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.3)
    job.refresh_from_db()
    assert job.status == Status.SUCCEEDED, f"{job.error_message}\n{celery_worker.tail()}\nseen: {seen}"
    assert any(s.startswith("running/") for s in seen), seen
    assert seen[-1].startswith("succeeded"), seen
    assert len(seen) >= 3, f"the page should have shown several states while the job ran: {seen}"

    page.wait_for_selector("#model-card")  # the page shows the card once the job finished
    page.wait_for_selector("#chart-recovery[data-rendered=true] .main-svg")
    page.wait_for_selector("#chart-layer-loss[data-rendered=true] .main-svg")
    assert "wikitext2_ppl" in page.text_content("#results-table")
    assert "Model Overview" in page.text_content("#model-card")
    page.screenshot(path=str(ARTIFACTS / "03-job-succeeded.png"), full_page=True)

    with page.expect_download() as download_info:
        page.click("#card-download")
    card_path = tmp_path / "README.md"
    download_info.value.save_as(card_path)
    card = card_path.read_text()
    assert card.startswith("---") and card == job.results["model_card"]

    page.click("text=Compare with other recipes on this model")
    page.wait_for_selector("#chart-scatter[data-rendered=true] .main-svg")
    page.wait_for_selector("#chart-bars[data-rendered=true] .main-svg")
    page.screenshot(path=str(ARTIFACTS / "04-compare.png"), full_page=True)
