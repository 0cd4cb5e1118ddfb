"""Compressor settings. Every value comes from an environment variable (see .env.example)."""
from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(name) or default  # empty means unset, as in .env.example


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def _default_data_dir() -> str:
    shared = BASE_DIR.parent / "shared" / "data"
    return str(shared) if shared.is_dir() else ""


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    if DEBUG or env_bool("COMPRESSOR_ALLOW_INSECURE_KEY", True):
        SECRET_KEY = "dev-only-insecure-key-set-SECRET_KEY-in-production"
    else:
        raise ValueError("SECRET_KEY must be set")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

VAR_DIR = Path(env_str("COMPRESSOR_VAR_DIR", str(BASE_DIR / "var")))
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'compressor.sqlite3'}"), conn_max_age=60),
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # The web process and the worker write concurrently; wait for the lock instead of failing. Every
    # transaction takes the write lock when it begins (IMMEDIATE): a read-then-write transaction (the
    # per-user job limit in jobs.submission.create_job) is then serialized with the others instead of
    # deadlocking into "database is locked" when two of them upgrade their read locks.
    DATABASES["default"].setdefault("OPTIONS", {}).update(timeout=30, transaction_mode="IMMEDIATE")
    # A file, not :memory:, so the Celery worker process of the integration tests sees the test data.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")}

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
ARTIFACT_ROOT = Path(env_str("ARTIFACT_ROOT", str(VAR_DIR / "artifacts")))
CACHE_ROOT = Path(env_str("COMPRESSOR_CACHE_DIR", str(VAR_DIR / "cache")))
# memory of the worker's training device (GPU memory, or RAM on a CPU worker): fine-tune budgets
# that would not fit are refused at submission (compression.algorithms.distill.check_memory)
COMPRESSOR_WORKER_MEMORY_GB = float(env_str("COMPRESSOR_WORKER_MEMORY_GB", "80"))
COMPRESSOR_MODEL_ROOTS = env_list("COMPRESSOR_MODEL_ROOTS", "")
COMPRESSOR_DATA_DIR = env_str("COMPRESSOR_DATA_DIR", _default_data_dir())
COMPRESSOR_DEVICE = env_str("COMPRESSOR_DEVICE", "auto")  # auto | cpu | cuda | cuda:N
# The memory plan (compression.model_io.streaming.plan_memory): applied at submission (jobs.submission)
# and by the worker before any work (passed in the job spec). Empty budgets: the worker measures its own.
COMPRESSOR_STREAMING = env_str("COMPRESSOR_STREAMING", "auto")  # auto | always | never
COMPRESSOR_HOST_MEMORY_BYTES = env_str("COMPRESSOR_HOST_MEMORY_BYTES", "")
COMPRESSOR_DEVICE_MEMORY_BYTES = env_str("COMPRESSOR_DEVICE_MEMORY_BYTES", "")
COMPRESSOR_MAX_QUEUED_PER_USER = env_int("COMPRESSOR_MAX_QUEUED_PER_USER", 5)
# Uploaded calibration files: one directory per user; the size limit is enforced while the upload
# streams in (jobs.uploads.LimitedUploadHandler), so an oversized file never lands on disk whole.
UPLOAD_ROOT = Path(env_str("COMPRESSOR_UPLOAD_ROOT", str(VAR_DIR / "uploads")))
COMPRESSOR_MAX_UPLOAD_BYTES = env_int("COMPRESSOR_MAX_UPLOAD_BYTES", 64 * 1024 * 1024)
COMPRESSOR_MAX_UPLOADS_PER_USER = env_int("COMPRESSOR_MAX_UPLOADS_PER_USER", 100)
FILE_UPLOAD_HANDLERS = ["jobs.uploads.LimitedUploadHandler"]
# Artifact store (jobs/storage.py): "local" (ARTIFACT_ROOT) or s3://bucket[/prefix] shared by many hosts.
COMPRESSOR_ARTIFACT_STORE = env_str("COMPRESSOR_ARTIFACT_STORE", "local")
COMPRESSOR_S3_ENDPOINT_URL = env_str("COMPRESSOR_S3_ENDPOINT_URL", "")
COMPRESSOR_S3_REGION = env_str("COMPRESSOR_S3_REGION", "")
COMPRESSOR_S3_PRESIGN_SECONDS = env_int("COMPRESSOR_S3_PRESIGN_SECONDS", 3600)
# Evaluation backend of the worker (compression/evaluation/backend.py reads it from the environment): auto | hf | vllm.
COMPRESSOR_EVAL_BACKEND = env_str("COMPRESSOR_EVAL_BACKEND", "auto")
# Where "Push to the Hub" sends checkpoints (a local server in the tests).
COMPRESSOR_HF_ENDPOINT = env_str("COMPRESSOR_HF_ENDPOINT", os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
COMPRESSOR_EVAL_WINDOWS = env_int("COMPRESSOR_EVAL_WINDOWS", 8)
# Reliability (jobs/reliability.py): a running job beats its heart every HEARTBEAT_S; one silent for
# WORKER_LOST_AFTER_S is marked failed ("worker lost") -- after 3 missed beats already when its process
# is gone from the host of a (restarted) worker; a queued job whose message a worker took but did not
# start within CLAIM_DEADLINE_S is failed ("ClaimTimeout"); a queued job absent from the broker for
# REQUEUE_AFTER_S is re-sent. The watchdog runs every WATCHDOG_INTERVAL_S in every worker.
COMPRESSOR_HEARTBEAT_S = env_int("COMPRESSOR_HEARTBEAT_S", 10)
COMPRESSOR_WORKER_LOST_AFTER_S = env_int("COMPRESSOR_WORKER_LOST_AFTER_S", 120)
COMPRESSOR_CLAIM_DEADLINE_S = env_int("COMPRESSOR_CLAIM_DEADLINE_S", 60)
COMPRESSOR_REQUEUE_AFTER_S = env_int("COMPRESSOR_REQUEUE_AFTER_S", 30)
COMPRESSOR_WATCHDOG_INTERVAL_S = env_int("COMPRESSOR_WATCHDOG_INTERVAL_S", 15)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "jobs",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
]

MIDDLEWARE = [
    "jobs.middleware.RequestSizeLimitMiddleware",
    "jobs.middleware.ContentSecurityPolicyMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "compressor_ui.urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [BASE_DIR / "templates"],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
WSGI_APPLICATION = "compressor_ui.wsgi.application"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "job-list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"

def _plotly_js_dir() -> str:
    # plotly.js is served from the installed plotly package, never from a CDN or a copy in the repo.
    import plotly

    return str(Path(plotly.__file__).parent / "package_data")


STATICFILES_DIRS = [BASE_DIR / "static", ("vendor/plotly", _plotly_js_dir())]
WHITENOISE_USE_FINDERS = True  # serve straight from the finders too, so no collectstatic is needed in dev
STATIC_ROOT = VAR_DIR / "staticfiles"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 2_621_440)

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_MAX_TASKS_PER_CHILD = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {"jobs.tasks.run_job": {"queue": "gpu"}}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A compression job can run for hours: the message must not be redelivered while it runs.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 12 * 3600)}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

# REST API (jobs/api.py): token auth for scripts, session auth for the browser, JSON only.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["jobs.api_errors.BoundedJSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "jobs.api_errors.JSONFallbackNegotiation",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "jobs.api_errors.json_exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Compressor API",
    "DESCRIPTION": "Submit, follow and download LLM compression jobs. Authenticate with "
                   "`Authorization: Token <key>` (create a key on the API tokens page or with "
                   "`manage.py create_api_token <username>`) or a browser session.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "SCHEMA_PATH_PREFIX": "/api",
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI assets come from the installed drf-spectacular-sidecar package, never a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}
