#!/usr/bin/env bash
# Start everything: a Redis broker (the one on REDIS_URL, or our own), one Celery worker on the
# `gpu` queue and the web server (both restarted if they die). Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f .env ] && set -a && . ./.env && set +a
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
PORT=${PORT:-8000}
PY=.venv/bin/python
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "==> stopping"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

if $PY -c "import redis,os,sys; redis.Redis.from_url(os.environ['REDIS_URL'], socket_connect_timeout=1).ping()" 2>/dev/null; then
  echo "==> using the Redis broker already listening on $REDIS_URL"
else
  port=$($PY -c "import os,urllib.parse; print(urllib.parse.urlparse(os.environ['REDIS_URL']).port or 6379)")
  echo "==> starting redis-server on 127.0.0.1:$port"
  redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir var >var/redis.log 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do
    $PY -c "import redis,os; redis.Redis.from_url(os.environ['REDIS_URL']).ping()" 2>/dev/null && break; sleep 0.1
  done
fi

$PY manage.py ensure_admin
# The worker and the web server run under scripts/supervise.sh: if one dies (kill -9, OOM killer) it
# is started again, and the restarted worker's watchdog fails the job the dead one was running.
echo "==> starting the Celery worker (queue: gpu), supervised"
bash scripts/supervise.sh .venv/bin/celery -A compressor_ui worker -Q gpu --concurrency 1 --max-tasks-per-child 1 \
  --loglevel INFO >>var/worker.log 2>&1 &
pids+=($!)
echo "==> starting the web server, supervised"
bash scripts/supervise.sh .venv/bin/gunicorn compressor_ui.wsgi:application --bind "127.0.0.1:$PORT" --workers 2 \
  --threads 4 --access-logfile - --log-level info >>var/web.log 2>&1 &
pids+=($!)
sleep 2
echo
echo "Compressor is running at http://127.0.0.1:$PORT/   (logs: var/web.log, var/worker.log; Ctrl-C stops)"
wait -n "${pids[@]}" || true
echo "a process exited; see var/*.log"
