"""Web load benchmark on loopback: p50/p99 latency and requests/s of the HTML pages (job list, one
page of it further back, a job page and its status poll, the compare page) and the REST API (job
list, job detail).

    python bench/api.py [--jobs 1000] [--concurrency 1,8] [--requests 400] [--max-seconds 20]

Starts gunicorn as `make run` does (scripts/run.sh: 2 workers x 4 threads) on a free 127.0.0.1
port with a temporary SQLite database seeded with one user, an API token, a logged-in session and
`--jobs` jobs; a quarter of them succeeded, each with results like a real job's (metrics, sizes, a
model card) and 210 per-module compression events (30 layers x 7 Linears, as the demo model has).
First measures each endpoint's CPU time per request in one process with Django's test client (no
HTTP, no other clients: the figure that hardly depends on the machine's load), then under gunicorn
runs a bounded number of requests per case (stopping early after --max-seconds), stops gunicorn,
writes bench/results/api.json (shape: ../shared/BENCH_RESULTS.md), prints a Markdown table and
checks the goals of issue 10 at 8 clients (p99 < 150 ms for list pages, < 100 ms for a job page
and `GET /api/jobs/<id>`).
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
# p99 goals at 8 clients (issue 10, item 7), by endpoint name
GOALS_MS = {"GET / (job list page)": 150, "GET /?page=10 (job list page 10)": 150, "GET /api/jobs?limit=50": 150,
            "GET /jobs/{id}/ (job page)": 100, "GET /api/jobs/{id}": 100}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


SEED = """
import sys
from datetime import timedelta
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
from django.utils import timezone
from rest_framework.authtoken.models import Token
from compression.card.model_card import build_model_card
from compression.recipe import Recipe
from jobs.models import Job, JobEvent, Status
from tests.eval.facts import FACTS

jobs = int(sys.argv[-1])
user = User.objects.create_user("bench", password="bench-password")
recipe = Recipe.from_preset("W4A16", group_size=64).to_dict()
metrics = [{"task": t, "metric": "acc", "baseline": 0.5, "compressed": 0.49, "higher_is_better": True,
            "recovery_pct": 98.0} for t in ("arc_easy", "hellaswag", "piqa", "winogrande")]
results = {"evaluation": {"metrics": metrics}, "model_card": build_model_card(FACTS),
           "size": {"dense_bytes": 269060096, "compressed_weight_bytes": 98000000, "ratio": 2.75},
           "speed": {"speedup": 1.4}, "timings": {"total_s": 61.2}}
modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
start = timezone.now() - timedelta(days=30)
rows = []
for i in range(jobs):
    created = start + timedelta(minutes=i)
    done = i % 4 == 0
    rows.append(Job(owner=user, model_source="demo", recipe=recipe, recipe_name="W4A16", name=f"bench job {i}",
                    evaluation={"tasks": ["wikitext2_ppl"], "windows": 8}, created_at=created,
                    status=Status.SUCCEEDED if done else Status.FAILED, started_at=created,
                    finished_at=created + timedelta(seconds=61) if done else created,
                    results=results if done else None, error_type="" if done else "ModelSourceError",
                    error_message="" if done else "no such model",
                    progress={"stage": "done", "fraction": 1.0, "message": "finished"}))
Job.objects.bulk_create(rows, batch_size=200)
succeeded = [job for job in rows if job.status == Status.SUCCEEDED]
for job in succeeded:
    JobEvent.objects.bulk_create([JobEvent(job=job, stage="compress", message=f"layer {k} {m}",
                                           data={"layer": k, "layers": 30, "module": m, "loss": 0.01 * (k + 1)})
                                  for k in range(30) for m in modules])
session = SessionStore()
session.update({SESSION_KEY: str(user.pk), BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
                HASH_SESSION_KEY: user.get_session_auth_hash()})
session.create()
print(Token.objects.create(user=user).key, session.session_key, succeeded[-1].id)
"""


IN_PROCESS = """
import json, sys, time
from django.test import Client

token, session, requests = sys.argv[-3], sys.argv[-2], int(sys.argv[-1])
endpoints = json.loads(sys.stdin.readline())
client = Client(HTTP_HOST="127.0.0.1")
client.cookies["sessionid"] = session
out = {}
for name, path, api in endpoints:
    headers = {"HTTP_AUTHORIZATION": f"Token {token}"} if api else {}
    for _ in range(5):  # imports and per-process caches, as the warm-up does for the server
        assert client.get(path, **headers).status_code == 200, (name, path)
    started = time.process_time()
    for _ in range(requests):
        client.get(path, **headers)
    out[name] = round((time.process_time() - started) * 1000 / requests, 2)
print(json.dumps(out))
"""


def in_process_cpu_ms(env: dict[str, str], token: str, session: str, endpoints: dict, requests: int) -> dict:
    """CPU milliseconds per request of each endpoint handled in one process by Django's test client,
    one request at a time: what the code costs without HTTP, gunicorn or other clients. Unlike
    latency it hardly depends on what else the machine is doing."""
    rows = [[name, path, "Authorization" in headers] for name, (path, headers) in endpoints.items()]
    out = subprocess.run([sys.executable, "-c", "import django; django.setup(); exec(" + repr(IN_PROCESS) + ")",
                          token, session, str(requests)],
                         input=json.dumps(rows) + "\n", cwd=REPO, env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def seed(env: dict[str, str], jobs: int) -> tuple[str, str, str]:
    """Migrate the temporary database and fill it; returns (token key, session key, id of a succeeded job)."""
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)
    out = subprocess.run([sys.executable, "-c", "import django; django.setup(); exec(open(0).read())", str(jobs)],
                         input=SEED, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout.split()
    return out[-3], out[-2], out[-1]


def start_gunicorn(env: dict[str, str], port: int, workers: int, threads: int, log_path: Path) -> subprocess.Popen:
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "compressor_ui.wsgi:application", "--bind", f"{HOST}:{port}",
         "--workers", str(workers), "--threads", str(threads), "--backlog", "256", "--log-level", "warning"],
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
    """(seconds, ok). A fresh connection per request, as independent clients would open."""
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


def server_cpu_s(proc: subprocess.Popen | None) -> float:
    """CPU seconds (user + system) used so far by gunicorn's master and workers."""
    if proc is None:
        return 0.0
    import psutil

    try:
        master = psutil.Process(proc.pid)
        return sum(sum(p.cpu_times()[:2]) for p in [master, *master.children(recursive=True)])
    except psutil.Error:
        return 0.0


def run_case(port: int, path: str, headers: dict[str, str], concurrency: int, requests: int,
             max_seconds: float, server: subprocess.Popen | None = None) -> dict:
    """Latencies of `requests` GETs from `concurrency` clients, and the server's CPU time per request
    (which, unlike latency, hardly depends on what else the machine is doing)."""
    cpu_before = server_cpu_s(server)
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
    cpu_ms = (server_cpu_s(server) - cpu_before) * 1000 / max(1, len(ms))
    return {"requests": len(ms), "wall_s": round(wall, 3), "rps": round(len(ms) / wall, 1),
            "p50_ms": round(statistics.median(ms), 2),
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2), "errors": errors,
            "server_cpu_ms_per_request": round(cpu_ms, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per endpoint and concurrency")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="stop a case early after this long")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (scripts/run.sh: 2)")
    parser.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker (scripts/run.sh: 4)")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs seeded in the database")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--only", default="", help="run only endpoints whose name contains this")
    parser.add_argument("--in-process-requests", type=int, default=200,
                        help="requests per endpoint for the in-process CPU time (Django's test client)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "api.json")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]

    tmp = Path(tempfile.mkdtemp(prefix="compressor-bench-api-"))
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="compressor_ui.settings", COMPRESSOR_VAR_DIR=str(tmp),
               DATABASE_URL=f"sqlite:///{tmp / 'bench.sqlite3'}", DEBUG="false", LOG_LEVEL="WARNING",
               ALLOWED_HOSTS=HOST, PYTHONPATH=str(REPO))
    proc = None
    try:
        token, session, job_id = seed(env, args.jobs)
        api = {"Authorization": f"Token {token}", "Accept": "application/json"}
        browser = {"Cookie": f"sessionid={session}", "Accept": "text/html"}
        endpoints = {
            "GET / (job list page)": ("/", browser),
            "GET /?page=10 (job list page 10)": ("/?page=10", browser),
            "GET /jobs/{id}/ (job page)": (f"/jobs/{job_id}/", browser),
            "GET /jobs/{id}/status.json (page poll)": (f"/jobs/{job_id}/status.json", browser),
            # "bench job 4" names 28 succeeded jobs: all 250 would be more than the page draws (a 400)
            "GET /compare/?q=bench+job+4 (28 jobs)": ("/compare/?model=demo&q=bench+job+4", browser),
            "GET /api/jobs?limit=50": ("/api/jobs?limit=50", api),
            "GET /api/jobs/{id}": (f"/api/jobs/{job_id}", api),
        }
        endpoints = {name: value for name, value in endpoints.items() if args.only in name}
        cpu = in_process_cpu_ms(env, token, session, endpoints, args.in_process_requests)
        port = free_port()
        proc = start_gunicorn(env, port, args.workers, args.threads, tmp / "gunicorn.log")
        status, _ = one_status(port, "/login/", {})  # the workers have booted (imports at start-up)
        if status != 200:
            raise RuntimeError(f"GET /login/: HTTP {status}")
        rows = []
        for name, (path, headers) in endpoints.items():
            status, _ = one_status(port, path, headers)
            if status != 200:
                raise RuntimeError(f"{name}: HTTP {status}")
            # warm every worker (per-process caches): 8 clients, so both workers take requests
            run_case(port, path, headers, 8, 80, max(60.0, args.max_seconds))
            for clients in concurrency:
                result = run_case(port, path, headers, clients, args.requests, args.max_seconds, proc)
                rows.append({"endpoint": name, "concurrency": clients, **result,
                             "in_process_cpu_ms_per_request": cpu[name]})
                print(f"{name:40} c={clients:<3} {result}", file=sys.stderr)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)

    command = "python bench/api.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()
    report = {
        "benchmark": "api", "command": command.strip(), "machine": f"{os.cpu_count()}-core CPU, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GB, load average "
        f"{load[0]:.1f} at the end",
        "date": dt.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "django": version("django"),
                     "djangorestframework": version("djangorestframework"), "gunicorn": version("gunicorn")},
        "setup": {"server": f"gunicorn, {args.workers} workers x {args.threads} threads (as scripts/run.sh), SQLite",
                  "seeded_jobs": args.jobs,
                  "client": "Python threads on the same machine, one connection per request",
                  "in_process": f"Django test client, one request at a time, {args.in_process_requests} requests "
                                "per endpoint after 5 warm-up requests, CPU time (time.process_time)",
                  "requests_per_case": args.requests, "max_seconds_per_case": args.max_seconds},
        "goals_p99_ms_at_8_clients": GOALS_MS,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| endpoint | clients | requests | req/s | p50 ms | p99 ms | errors | server CPU ms/request "
          "| in-process CPU ms/request | goal (8 clients) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        goal = GOALS_MS.get(row["endpoint"])
        verdict = ""
        if goal and row["concurrency"] == 8:
            verdict = f"p99 < {goal}: {'met' if row['p99_ms'] < goal else 'MISSED'}"
        print(f"| `{row['endpoint']}` | {row['concurrency']} | {row['requests']} | {row['rps']} | {row['p50_ms']} "
              f"| {row['p99_ms']} | {row['errors']} | {row['server_cpu_ms_per_request']} "
              f"| {row['in_process_cpu_ms_per_request']} | {verdict} |")


def one_status(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


if __name__ == "__main__":
    main()
