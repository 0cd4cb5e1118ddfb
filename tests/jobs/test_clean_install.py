"""A clean checkout on a user's own server: no ../shared beside it, no data directory, Hub switched off.

The checkout's files are copied to a temporary folder (where no ../shared exists), migrated and served
by a real `manage.py runserver` process. The form must show only what the worker can run and say why
the rest cannot; a job that needs missing data is refused at once with the field named; a calibrating
job with no source gets the built-in calibration set.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, free_port, wait_for

pytestmark = pytest.mark.timeout(300)


def _copy_checkout(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def clean_install(tmp_path_factory):
    root = tmp_path_factory.mktemp("elsewhere")
    checkout = root / "compressor"
    _copy_checkout(checkout)
    assert not (root / "shared").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPRESSOR_", "DJANGO_"))}
    env.update(COMPRESSOR_VAR_DIR=str(root / "var"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # no broker: accepted jobs fail visibly
               DATABASE_URL=f"sqlite:///{root / 'var' / 'db.sqlite3'}", PYTHONPATH=str(checkout))
    run = lambda *args: subprocess.run([sys.executable, "manage.py", *args], cwd=checkout, env=env, check=True,
                                       capture_output=True, text=True, timeout=240)
    (root / "var").mkdir()
    run("migrate", "--noinput", "-v", "0")
    run("shell", "-c", "from django.contrib.auth import get_user_model; "
                       "get_user_model().objects.create_user('ada', password='correct-horse-battery')")
    token = run("create_api_token", "ada").stdout.strip()
    port = free_port()
    server = subprocess.Popen([sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
                              cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{base}/login/", timeout=2).status_code == 200
        except requests.ConnectionError:
            assert server.poll() is None, server.stderr.read().decode()
            return False

    try:
        wait_for(up, 120, "the clean checkout's web server")
        yield {"base": base, "token": token}
    finally:
        server.terminate()
        server.wait(timeout=20)


def _session(base: str) -> requests.Session:
    session = requests.Session()
    page = session.get(f"{base}/login/", timeout=30)
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    session.post(f"{base}/login/", data={"username": "ada", "password": "correct-horse-battery",
                                         "csrfmiddlewaretoken": csrf}, headers={"Referer": f"{base}/login/"},
                 timeout=30)
    return session


def _post_job(clean_install, body: dict) -> requests.Response:
    return requests.post(f"{clean_install['base']}/api/jobs", json=body, timeout=120,
                         headers={"Authorization": f"Token {clean_install['token']}"})


def test_the_form_lists_only_runnable_tasks_and_says_why_the_others_are_not(clean_install):
    page = _session(clean_install["base"]).get(f"{clean_install['base']}/jobs/new/", timeout=120)
    assert page.status_code == 200
    html = page.text
    assert 'name="eval_tasks"' not in html  # nothing can be evaluated here: no checkbox at all
    unavailable = re.findall(r'<li data-task="([^"]+)">', html)
    assert {"wikitext2_ppl", "hellaswag", "mmlu", "arc_easy"} <= set(unavailable)
    assert "wikitext2/wiki.test.raw" in html and "HF_HUB_OFFLINE=1" in html
    assert "COMPRESSOR_DATA_DIR is not set" in html
    assert "Empty: builtin:chat-v1" in html and '<option value="builtin:chat-v1">' in html
    assert "self_instruct" not in html  # nothing points into a ../shared that is not there


def test_a_job_that_needs_missing_data_is_refused_naming_the_field(clean_install):
    response = _post_job(clean_install, {"model": "demo", "recipe": {"preset": "FP8_DYNAMIC"},
                                         "evaluation": {"tasks": ["wikitext2_ppl"]}})
    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["field"] == "evaluation.tasks"
    assert "wikitext2/wiki.test.raw" in error["message"] and "HF_HUB_OFFLINE=1" in error["message"]

    response = _post_job(clean_install, {"model": "demo", "recipe": {"preset": "W4A16", "group_size": 64},
                                         "calibration": {"source": "calibration/self_instruct_seed_tasks.jsonl"}})
    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["field"] == "calibration.source" and "no data directory is configured" in error["message"]

    response = _post_job(clean_install, {"model": "demo", "recipe": {"preset": "W4A16", "group_size": 64},
                                         "calibration": {"source": "HuggingFaceH4/ultrachat_200k:train_sft"}})
    assert response.status_code == 400 and "offline" in response.json()["errors"][0]["message"]


def test_a_calibrating_job_without_a_source_gets_the_built_in_set(clean_install):
    response = _post_job(clean_install, {"model": "demo", "recipe": {"preset": "W4A16", "group_size": 64}})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["calibration"]["source"] == "builtin:chat-v1"
    assert job["evaluation"]["tasks"] == []  # nothing can be evaluated here, and nothing was put back
