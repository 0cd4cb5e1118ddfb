import os
import sys
import threading

from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.conf import settings

        # the demo model's config, parsed from its GGUF file once, is shared by every process as JSON
        os.environ.setdefault("COMPRESSOR_CONFIG_CACHE_DIR", str(settings.CACHE_ROOT / "model-configs"))
        if should_warm(sys.argv):
            # Imports first, in this thread: a request importing transformers while another thread is
            # half-way through importing it gets "cannot import name 'AutoConfig'". Only the slow
            # GGUF parse runs in the background (a submission meanwhile waits on its lock).
            from transformers import AutoConfig  # noqa: F401  (resolves the lazy module now)

            from compression.model_io.loading import warm_demo_config

            threading.Thread(target=warm_demo_config, name="warm-demo-config", daemon=True).start()
        if serves_jobs(sys.argv):  # an unreachable object store stops the process, naming the setting
            from .storage import check_store

            check_store()


def serves_jobs(argv: list[str]) -> bool:
    """Web servers and Celery workers (not tests, migrations or other commands)."""
    program = os.path.basename(argv[0]) if argv else ""
    return any(name in program for name in ("gunicorn", "celery")) or (len(argv) > 1 and argv[1] in (
        "runserver", "worker"))


def should_warm(argv: list[str]) -> bool:
    """Warm the demo config in web server processes only (gunicorn, runserver), never in tests,
    migrations or the worker; COMPRESSOR_WARM_DEMO_CONFIG=0 turns it off."""
    if os.environ.get("COMPRESSOR_WARM_DEMO_CONFIG", "1").strip() in ("0", "false", "no", "off"):
        return False
    program = os.path.basename(argv[0]) if argv else ""
    return "gunicorn" in program or (len(argv) > 1 and argv[1] == "runserver")
