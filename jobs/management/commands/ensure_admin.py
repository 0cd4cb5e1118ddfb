"""Create the first login user if there is none, and say how to log in."""
from __future__ import annotations

import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create an 'admin' superuser when no user exists (password from COMPRESSOR_ADMIN_PASSWORD or random)."

    def handle(self, *args, **options) -> None:
        User = get_user_model()
        password_file = settings.VAR_DIR / "admin-password.txt"
        if User.objects.exists():
            if password_file.exists():
                self.stdout.write(f"Log in as admin with the password in {password_file}")
            else:
                self.stdout.write("Users exist; create more with: python manage.py createsuperuser")
            return
        password = os.environ.get("COMPRESSOR_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser("admin", "", password)
        settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        self.stdout.write(f"Created user 'admin' with password {password} (also in {password_file})")
