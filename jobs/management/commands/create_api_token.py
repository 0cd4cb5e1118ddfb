"""`manage.py create_api_token <username>`: print the user's REST API token, creating it if needed."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from rest_framework.authtoken.models import Token

from jobs.account import replace_token


class Command(BaseCommand):
    help = "Print the REST API token of a user (created if the user has none)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--regenerate", action="store_true",
                            help="replace an existing token with a new one (the old one stops working)")

    def handle(self, *args, username: str, regenerate: bool, **options) -> None:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user named {username!r}; create one first (manage.py createsuperuser)")
        if regenerate:
            token = replace_token(user)
        else:
            token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(token.key)
