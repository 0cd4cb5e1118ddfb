"""The Job state machine is race-safe on real PostgreSQL, production's database.

The rest of the suite runs on SQLite, where writers are serialized by one database lock, so the
compare-and-set transitions in jobs/models.py are never really raced there. PostgreSQL runs
concurrent UPDATEs of one row in parallel backends (row locks, READ COMMITTED re-checks of the
WHERE clause), and these tests prove that there, too, N simultaneous claims have exactly one
winner, concurrent finishers leave exactly one consistent terminal state, and finished jobs stay
finished. The checks themselves are in tests/db/pg_race_checks.py; each is described there.

Server: COMPRESSOR_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres), a
role that may CREATE DATABASE. If it cannot be reached the tests are skipped, not failed (a fresh
machine may have no PostgreSQL); set COMPRESSOR_TEST_POSTGRES_REQUIRED=1 to make that a failure.

Why a subprocess and a throw-away database rather than pytest-django: the suite's settings and
pytest-django's session-wide test database are SQLite, and the transitions use the default
database alias (``Job.objects``), so exercising them on PostgreSQL in this process would mean
swapping the default connection under pytest-django's feet for the whole session. Instead this
module creates a database with a unique name on the server, runs ``manage.py migrate`` and then
each check in a child process whose DATABASE_URL points at it -- the same way production and the
Celery worker configure Django -- and drops the database afterwards, also when a check fails.
Nothing here touches the SQLite test database or any other database on the server.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKS_MODULE = "tests.db.pg_race_checks"
CHECKS = re.findall(r"^def check_(\w+)\(", (Path(__file__).parent / "pg_race_checks.py").read_text(), re.M)
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_url() -> str:
    return os.environ.get("COMPRESSOR_TEST_POSTGRES_URL") or DEFAULT_URL


def redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    return urlunsplit(parts)


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def unavailable(reason: str):
    if os.environ.get("COMPRESSOR_TEST_POSTGRES_REQUIRED", "").lower() in ("1", "true", "yes", "on"):
        pytest.fail(reason + " (COMPRESSOR_TEST_POSTGRES_REQUIRED is set)")
    pytest.skip(reason)


def run_python(args: list[str], database_url: str, timeout: float, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DATABASE_URL=database_url, **extra_env,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def drop_database(url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as admin:
        try:  # PostgreSQL 13+: disconnects anything a crashed check left behind
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        except psycopg.errors.SyntaxError:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name])
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def pg_database_url():
    """A freshly migrated, uniquely named database on the test server; dropped afterwards."""
    try:
        import psycopg
        from psycopg import sql
    except ImportError:
        unavailable("psycopg is not installed; the PostgreSQL race tests need it")
    url = server_url()
    try:
        admin = psycopg.connect(url, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        unavailable(f"no PostgreSQL server at {redacted(url)} (set COMPRESSOR_TEST_POSTGRES_URL): "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
    name = f"compressor_race_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        db_url = with_database(url, name)
        migrate = run_python(["manage.py", "migrate", "--noinput"], db_url, timeout=120)
        assert migrate.returncode == 0, f"migrate on PostgreSQL failed:\n{migrate.stdout}\n{migrate.stderr}"
        yield db_url
    finally:
        drop_database(url, name)


def test_the_checks_module_is_found():
    assert {"claim_race", "cancel_vs_succeed", "fail_after_succeed", "progress_after_finish",
            "active_limit_race"} <= set(CHECKS)


@pytest.mark.parametrize("check", CHECKS)
def test_transition_race_on_postgres(pg_database_url, check, redis_server):
    # a real broker: the submission race (active_limit_race) queues the jobs it creates
    result = run_python(["-m", CHECKS_MODULE, check], pg_database_url, timeout=120, REDIS_URL=redis_server.url)
    output = f"{result.stdout}\n{result.stderr}".strip()
    assert result.returncode == 0, f"{check} failed on PostgreSQL:\n{output}"
    assert f"{check}: ok" in result.stdout, output
