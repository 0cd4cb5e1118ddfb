"""The Celery app. Workers consume the `gpu` queue: `celery -A compressor_ui worker -Q gpu`."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "compressor_ui.settings")

app = Celery("compressor_ui")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
