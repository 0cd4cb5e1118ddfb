"""Shared fixtures: three personas, a real Redis server and a real Celery worker process."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.polling import wait_for

REPO = Path(__file__).resolve().parent.parent

# Triton reads TRITON_INTERPRET when a @triton.jit function is created, and any test may import
# the kernels first (through the runtime), so this must happen before every test module: without
# a GPU, the kernels run on Triton's CPU interpreter.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")
PASSWORD = "correct-horse-battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_user("alice", password=PASSWORD)


@pytest.fixture
def outsider(django_user_model):
    return django_user_model.objects.create_user("mallory", password=PASSWORD)


class RedisServer:
    """A private redis-server on a free port (never the system one), restartable by fault tests."""

    def __init__(self, workdir: Path):
        self.exe = shutil.which("redis-server")
        if not self.exe:
            raise RuntimeError("redis-server is not installed; `make test` installs it (scripts/setup.sh)")
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        def ping() -> bool:
            try:
                return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping())
            except redis.exceptions.ConnectionError:
                return False

        wait_for(ping, 10, "redis-server to accept connections")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def use_broker(url: str) -> str:
    """Point this process's Celery app at `url`, dropping pooled connections; returns the old URL."""
    from compressor_ui.celery import app

    old = app.conf.broker_url
    app.conf.broker_url = url
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None
    return old


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    use_broker(server.url)
    yield server
    server.stop()


def database_url_for_worker() -> str:
    """The URL of the test database pytest-django created, for the worker subprocess."""
    from django.db import connection

    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{s['NAME']}"
    if "postgresql" in s["ENGINE"]:
        auth = s["USER"] + (f":{s['PASSWORD']}" if s.get("PASSWORD") else "") + "@" if s.get("USER") else ""
        return f"postgres://{auth}{s.get('HOST') or 'localhost'}:{s.get('PORT') or 5432}/{s['NAME']}"
    raise RuntimeError(f"no worker URL for database engine {s['ENGINE']}")


class CeleryWorker:
    """A real `celery worker` process consuming the gpu queue, as `make run` starts it; `supervised`
    runs it under scripts/supervise.sh, which starts it again when it dies (as `make run` does)."""

    def __init__(self, env: dict, log_path: Path, supervised: bool = False):
        self.env, self.log_path, self.supervised = env, log_path, supervised
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.write_text("")
        self.log = self.log_path.open("a")
        command = [sys.executable, "-m", "celery", "-A", "compressor_ui", "worker", "-Q", "gpu", "--concurrency", "1",
                   "--max-tasks-per-child", "1", "--pool", "prefork", "--loglevel", "INFO", "--without-gossip",
                   "--without-mingle", "-n", f"test-{os.getpid()}@%h"]
        if self.supervised:
            command = ["bash", str(REPO / "scripts" / "supervise.sh"), *command]
        self.proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.wait_ready(1)

    def wait_ready(self, times: int, timeout: float = 120) -> None:
        """Until the worker has logged `ready.` `times` times in all (a supervised one once per start)."""
        wait_for(lambda: self.log_path.read_text().count("ready.") >= times or self.proc.poll() is not None,
                 timeout, "the Celery worker to start")
        if self.proc.poll() is not None:
            raise RuntimeError(f"celery worker exited:\n{self.tail()}")

    def main_pid(self) -> int:
        """The pid of celery's main process (the supervisor's child when supervised)."""
        if not self.supervised:
            return self.proc.pid
        import psutil

        children = wait_for(lambda: psutil.Process(self.proc.pid).children(), 30, "the supervised worker")
        return children[0].pid

    def pool_pids(self) -> list[int]:
        import psutil

        return [child.pid for child in psutil.Process(self.main_pid()).children()]

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), as a crashed machine would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(autouse=True)
def upload_root(tmp_path, settings):
    """Uploaded calibration files of one test go under its own tmp_path, never into var/."""
    settings.UPLOAD_ROOT = tmp_path / "uploads"
    return settings.UPLOAD_ROOT


@pytest.fixture
def job_env(tmp_path, settings, redis_server):
    """Artifact root, allowed model root and cache for one test, shared with the worker."""
    paths = {name: tmp_path / name for name in ("artifacts", "models", "cache")}
    for path in paths.values():
        path.mkdir()
    settings.ARTIFACT_ROOT = paths["artifacts"]
    settings.COMPRESSOR_MODEL_ROOTS = [str(paths["models"])]
    settings.CACHE_ROOT = paths["cache"]
    settings.REDIS_URL = redis_server.url
    return paths


@pytest.fixture
def worker_factory(job_env, redis_server, transactional_db, tmp_path, settings):
    """Start real worker processes (with extra environment); all are stopped after the test."""
    started: list[CeleryWorker] = []

    def start(supervised: bool = False, **extra_env: str) -> CeleryWorker:
        env = dict(os.environ,
                   DATABASE_URL=database_url_for_worker(), REDIS_URL=redis_server.url,
                   ARTIFACT_ROOT=str(job_env["artifacts"]), COMPRESSOR_MODEL_ROOTS=str(job_env["models"]),
                   COMPRESSOR_CACHE_DIR=str(job_env["cache"]), COMPRESSOR_DATA_DIR=settings.COMPRESSOR_DATA_DIR,
                   COMPRESSOR_UPLOAD_ROOT=str(settings.UPLOAD_ROOT),
                   COMPRESSOR_DEVICE="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), **extra_env)
        # The worker runs jobs as in production: torch reference kernels on CPU, not the interpreter.
        env.pop("TRITON_INTERPRET", None)
        worker = CeleryWorker(env, tmp_path / f"worker-{len(started)}.log", supervised=supervised)
        started.append(worker)
        worker.start()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def celery_worker(worker_factory):
    return worker_factory()
