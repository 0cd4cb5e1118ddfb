"""The user's own API token: create or regenerate it (the key is shown once, in the answer to that
POST, and never again), revoke it (one token per user). The page is never cached."""
from __future__ import annotations

import logging

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods
from rest_framework.authtoken.models import Token

log = logging.getLogger(__name__)


def replace_token(user) -> Token:
    """A fresh key: the old one (if any) stops working at once."""
    with transaction.atomic():
        Token.objects.filter(user=user).delete()
        return Token.objects.create(user=user)


@never_cache  # Cache-Control: no-store (and private, no-cache): the one answer with the key stays nowhere
@login_required
@require_http_methods(["GET", "POST"])
def api_token(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "create":
            token = replace_token(request.user)
            log.info("API token (re)generated for %s", request.user)
            # Rendered here, not after a redirect: the key exists in this one response only.
            return render(request, "account/tokens.html", {"token": token, "new_key": token.key})
        elif action == "revoke":
            deleted, _ = Token.objects.filter(user=request.user).delete()
            log.info("API token revoked for %s", request.user)
            messages.info(request, "API token revoked." if deleted else "You had no API token.")
        else:
            messages.warning(request, "Unknown action; nothing changed.")
        return redirect("api-token")
    token = Token.objects.filter(user=request.user).first()
    return render(request, "account/tokens.html", {"token": token})
