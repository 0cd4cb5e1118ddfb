"""API test fixtures: clients authenticated by token or by session, and a queue that records
what it is sent instead of talking to a broker (no worker is needed by these tests)."""
from __future__ import annotations

import os

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

# A generated model name that looks like a Hub id must never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def sent(monkeypatch) -> list[str]:
    """Job ids sent to the worker queue; the jobs stay queued."""
    from jobs.tasks import run_job

    ids: list[str] = []
    monkeypatch.setattr(run_job, "apply_async", lambda args, **kwargs: ids.append(args[0]))
    return ids


def token_client(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


@pytest.fixture
def api(owner) -> APIClient:
    """The owner, authenticated with an API token."""
    return token_client(owner)


@pytest.fixture
def browser(owner) -> APIClient:
    """The owner, logged in with a session and held to CSRF like a browser."""
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(owner)
    return client


@pytest.fixture
def outsider_api(outsider) -> APIClient:
    return token_client(outsider)


def csrf_headers(client: APIClient) -> dict[str, str]:
    """The CSRF header a browser page would send (token from a page that sets the cookie)."""
    client.get("/account/api-token/")
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def errors(response) -> dict[str | None, str]:
    body = response.json()
    return {item["field"]: item["message"] for item in body["errors"]}
