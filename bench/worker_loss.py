"""How long a job stays `running` after kill -9 of the only worker's main process, with the
production reliability settings (no test overrides) and the worker supervised as `make run` runs it.

    python bench/worker_loss.py [--rounds 1]

Starts a private redis-server, a temporary SQLite database and `scripts/supervise.sh celery ...
worker` (as scripts/run.sh), submits a job on a tiny local Llama whose baseline evaluation lasts a
while, waits until it runs, SIGKILLs the worker's main process and records: when the supervisor's
new worker was ready, and when the job was failed (by the restarted worker's watchdog). Writes
bench/results/worker_loss.json and prints a Markdown table. The documented bound
(docs/architecture.md, "Reliability policy") is restart + 3 x COMPRESSOR_HEARTBEAT_S +
COMPRESSOR_WATCHDOG_INTERVAL_S after the kill.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import machine  # noqa: E402

from bench.polling import wait_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "worker_loss.json")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="compressor-bench-loss-"))
    from tests.conftest import RedisServer

    redis_server = RedisServer(tmp)
    redis_server.start()
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="compressor_ui.settings", COMPRESSOR_VAR_DIR=str(tmp),
               DATABASE_URL=f"sqlite:///{tmp / 'db.sqlite3'}", REDIS_URL=redis_server.url,
               ARTIFACT_ROOT=str(tmp / "artifacts"), COMPRESSOR_MODEL_ROOTS=str(tmp / "models"),
               COMPRESSOR_DEVICE="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    for name in ("COMPRESSOR_HEARTBEAT_S", "COMPRESSOR_WORKER_LOST_AFTER_S", "COMPRESSOR_WATCHDOG_INTERVAL_S",
                 "COMPRESSOR_CLAIM_DEADLINE_S", "COMPRESSOR_REQUEUE_AFTER_S"):
        env.pop(name, None)  # the defaults of compressor_ui/settings.py
    os.environ.update(env)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)
    import django

    django.setup()
    import psutil
    from django.conf import settings
    from django.contrib.auth.models import User

    from jobs.models import Status
    from jobs.tasks import enqueue
    from tests.jobs.factories import make_job
    from tests.tiny import save_tiny_llama

    model_dir = save_tiny_llama(tmp / "models" / "tiny-llama")
    owner = User.objects.create_user("bench")
    log_path = tmp / "worker.log"
    log = log_path.open("w")
    supervisor = subprocess.Popen(
        ["bash", "scripts/supervise.sh", sys.executable, "-m", "celery", "-A", "compressor_ui", "worker", "-Q", "gpu",
         "--concurrency", "1", "--max-tasks-per-child", "1", "--loglevel", "INFO"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rows = []
    try:
        wait_for(lambda: log_path.read_text().count("ready.") >= 1, 180, "the worker", interval=0.2)
        for round_ in range(args.rounds):
            job = make_job(owner, model_source=str(model_dir),
                           evaluation={"tasks": ["wikitext2_ppl"], "windows": 400, "seqlen": 256})
            enqueue(job)

            def running():
                job.refresh_from_db()
                return job.status == Status.RUNNING and job.progress.get("stage") == "baseline"

            wait_for(running, 300, "the job to run")
            main_pid = psutil.Process(supervisor.pid).children()[0].pid
            readies = log_path.read_text().count("ready.")
            killed = time.monotonic()
            os.kill(main_pid, signal.SIGKILL)
            wait_for(lambda: log_path.read_text().count("ready.") > readies, 300, "the restarted worker")
            restarted = time.monotonic() - killed

            def finished():
                job.refresh_from_db()
                return job.is_finished

            wait_for(finished, 600, "the job to be failed", interval=0.5)
            failed = time.monotonic() - killed
            rows.append({"round": round_, "status": job.status, "error_type": job.error_type,
                         "restart_s": round(restarted, 1), "failed_after_kill_s": round(failed, 1),
                         "documented_bound_s": f"restart + {3 * settings.COMPRESSOR_HEARTBEAT_S + settings.COMPRESSOR_WATCHDOG_INTERVAL_S}"})
            print(rows[-1], file=sys.stderr)
    finally:
        os.killpg(supervisor.pid, signal.SIGTERM)
        try:
            supervisor.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(supervisor.pid, signal.SIGKILL)
        redis_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    report = {"benchmark": "worker_loss", "command": "python bench/worker_loss.py " + " ".join(sys.argv[1:]),
              "machine": machine(),
              "date": dt.date.today().isoformat(),
              "settings": {"COMPRESSOR_HEARTBEAT_S": settings.COMPRESSOR_HEARTBEAT_S,
                           "COMPRESSOR_WATCHDOG_INTERVAL_S": settings.COMPRESSOR_WATCHDOG_INTERVAL_S,
                           "COMPRESSOR_WORKER_LOST_AFTER_S": settings.COMPRESSOR_WORKER_LOST_AFTER_S},
              "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| round | job ended | error | worker restarted after | job failed after kill | bound |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['round']} | {row['status']} | {row['error_type']} | {row['restart_s']} s | "
              f"{row['failed_after_kill_s']} s | {row['documented_bound_s']} s |")


if __name__ == "__main__":
    main()
