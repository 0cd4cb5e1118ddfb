"""REST API load benchmark on loopback: p50/p99 latency and requests/s of the job list and job
detail endpoints at 1, 8 and 32 concurrent clients.

    python bench/api.py [--requests 400] [--max-seconds 20] [--workers 2] [--jobs 200]

Starts gunicorn on a free 127.0.0.1 port with a temporary SQLite database seeded with one user,
an API token and `--jobs` jobs (a quarter of them succeeded, with results), runs a bounded number
of requests per case (stopping early after --max-seconds), stops gunicorn and writes
bench/results/api.json (shape: ../shared/BENCH_RESULTS.md) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CONCURRENCY = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def seed(env: dict[str, str], jobs: int) -> tuple[str, str]:
    """Migrate the temporary database and fill it; returns (token key, id of a succeeded job)."""
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)
    script = f"""
import random
from django.contrib.auth.models import User
from rest_framework.authtoken.models import Token
from jobs.models import Job, JobEvent
from compression.recipe import Recipe
user = User.objects.create_user("bench", password="bench-password")
recipe = Recipe.from_preset("W4A16", group_size=64).to_dict()
metrics = [{{"task": t, "metric": "acc", "baseline": 0.5, "compressed": 0.49, "higher_is_better": True,
            "recovery_pct": 98.0}} for t in ("arc_easy", "hellaswag", "piqa", "winogrande")]
done = None
for i in range({jobs}):
    job = Job.objects.create(owner=user, model_source="demo", recipe=recipe, recipe_name="W4A16",
                             name=f"bench job {{i}}", evaluation={{"tasks": ["wikitext2_ppl"], "windows": 8}})
    if i % 4 == 0:
        Job.claim(job.id, "bench")
        Job.succeed(job.id, {{"evaluation": {{"metrics": metrics}}, "size": {{"dense_bf16_bytes": 269060096,
                    "compressed_weight_bytes": 98000000, "ratio": 2.75}}, "timings": {{"total_s": 61.2}}}}, "", 0)
        JobEvent.objects.bulk_create([JobEvent(job=job, stage="compress", message=f"layer {{k}}",
                                                data={{"layer": k, "layers": 30, "loss": 0.01}}) for k in range(30)])
        done = job.id
print(Token.objects.create(user=user).key, done)
"""
    out = subprocess.run([sys.executable, "manage.py", "shell", "-c", script], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[-2], out[-1]


def start_gunicorn(env: dict[str, str], port: int, workers: int, log_path: Path) -> subprocess.Popen:
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "compressor_ui.wsgi:application", "--bind", f"{HOST}:{port}",
         "--workers", str(workers), "--worker-class", "sync", "--backlog", "256", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{log_path.read_text()}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("gunicorn did not start listening within 60 s")


def one_request(port: int, path: str, headers: dict[str, str]) -> tuple[float, bool]:
    """(seconds, ok). A fresh connection per request: gunicorn's sync workers close it after each."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        ok = response.status == 200
    except OSError:
        ok = False
    finally:
        conn.close()
    return time.perf_counter() - started, ok


def run_case(port: int, path: str, headers: dict[str, str], concurrency: int, requests: int,
             max_seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    remaining = [requests]
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            seconds, ok = one_request(port, path, headers)
            with lock:
                latencies.append(seconds)
                errors += not ok

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = sorted(x * 1000 for x in latencies)
    return {"requests": len(ms), "wall_s": round(wall, 3), "rps": round(len(ms) / wall, 1),
            "p50_ms": round(statistics.median(ms), 2),
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per endpoint and concurrency")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="stop a case early after this long")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn sync workers")
    parser.add_argument("--jobs", type=int, default=200, help="jobs seeded in the database")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "api.json")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="compressor-bench-api-"))
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="compressor_ui.settings", COMPRESSOR_VAR_DIR=str(tmp),
               DATABASE_URL=f"sqlite:///{tmp / 'bench.sqlite3'}", DEBUG="false", LOG_LEVEL="WARNING",
               ALLOWED_HOSTS=HOST, PYTHONPATH=str(REPO))
    proc = None
    try:
        token, job_id = seed(env, args.jobs)
        port = free_port()
        proc = start_gunicorn(env, port, args.workers, tmp / "gunicorn.log")
        headers = {"Authorization": f"Token {token}", "Accept": "application/json"}
        endpoints = {"GET /api/jobs?limit=50": "/api/jobs?limit=50", "GET /api/jobs/{id}": f"/api/jobs/{job_id}"}
        rows = []
        for name, path in endpoints.items():
            run_case(port, path, headers, 4, 40, args.max_seconds)  # warm every worker (imports, caches)
            for concurrency in CONCURRENCY:
                result = run_case(port, path, headers, concurrency, args.requests, args.max_seconds)
                rows.append({"endpoint": name, "concurrency": concurrency, **result})
                print(f"{name:24} c={concurrency:<3} {result}", file=sys.stderr)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)

    command = "python bench/api.py " + " ".join(sys.argv[1:])
    report = {
        "benchmark": "api", "command": command.strip(), "machine": f"{os.cpu_count()}-core CPU, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GB",
        "date": dt.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "django": version("django"),
                     "djangorestframework": version("djangorestframework"), "gunicorn": version("gunicorn")},
        "setup": {"server": f"gunicorn, {args.workers} sync workers, SQLite", "seeded_jobs": args.jobs,
                  "client": "Python threads on the same machine, one connection per request",
                  "requests_per_case": args.requests, "max_seconds_per_case": args.max_seconds},
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"| endpoint | clients | requests | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| `{row['endpoint']}` | {row['concurrency']} | {row['requests']} | {row['rps']} | {row['p50_ms']} "
              f"| {row['p99_ms']} | {row['errors']} |")


if __name__ == "__main__":
    main()
