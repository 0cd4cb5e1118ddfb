"""API tokens: the management command and the page where users manage their own."""
import pytest
from django.core.management import CommandError, call_command
from rest_framework.authtoken.models import Token

from .conftest import csrf_headers

pytestmark = pytest.mark.django_db

PAGE = "/account/api-token/"


def test_the_command_prints_a_working_token_and_keeps_it(owner, capsys, client):
    call_command("create_api_token", "alice")
    key = capsys.readouterr().out.strip()
    assert Token.objects.get(user=owner).key == key
    assert client.get("/api/jobs", HTTP_AUTHORIZATION=f"Token {key}").status_code == 200
    call_command("create_api_token", "alice")
    assert capsys.readouterr().out.strip() == key
    call_command("create_api_token", "alice", "--regenerate")
    assert capsys.readouterr().out.strip() != key
    assert client.get("/api/jobs", HTTP_AUTHORIZATION=f"Token {key}").status_code == 401


def test_the_command_refuses_an_unknown_user(db):
    with pytest.raises(CommandError, match="no user named 'nobody'"):
        call_command("create_api_token", "nobody")


def test_the_page_needs_login(client):
    response = client.get(PAGE)
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_a_user_creates_regenerates_and_revokes_their_token(client, owner, outsider):
    other = Token.objects.create(user=outsider)
    client.force_login(owner)
    page = client.get(PAGE).content.decode()
    assert "You have no API token" in page and "API tokens" in page
    created = client.post(PAGE, {"action": "create"})
    first = Token.objects.get(user=owner)
    assert created.status_code == 200 and first.key in created.content.decode()
    assert "shown only this once" in created.content.decode()
    page = client.get(PAGE).content.decode()
    assert first.key not in page and "You have an API token" in page  # shown once, never again
    assert other.key not in page
    client.post(PAGE, {"action": "create"})
    second = Token.objects.get(user=owner)
    assert second.key != first.key
    client.post(PAGE, {"action": "revoke"})
    assert not Token.objects.filter(user=owner).exists()
    assert Token.objects.filter(user=outsider).exists()


def test_the_page_is_protected_by_csrf(owner):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    assert client.post(PAGE, {"action": "create"}).status_code == 403
    assert not Token.objects.filter(user=owner).exists()
    headers = csrf_headers(client)
    assert client.post(PAGE, {"action": "create"}, **headers).status_code == 200
    assert Token.objects.filter(user=owner).exists()


def test_the_token_page_is_never_stored_by_a_cache(client, owner):
    client.force_login(owner)
    for response in (client.get(PAGE), client.post(PAGE, {"action": "create"})):
        assert "no-store" in response["Cache-Control"] and "private" in response["Cache-Control"]
