#!/usr/bin/env bash
# Keep a command running: start it again whenever it exits on its own (a crash, kill -9, the OOM
# killer). TERM or INT to this script is passed on to the command, which is then not restarted.
#   bash scripts/supervise.sh CMD [ARGS...]
# A command that keeps dying young is restarted with a growing delay (2 s doubling up to 30 s,
# back to 2 s once it has run for 60 s). `make run` runs the Celery worker and the web server so.
set -u
[ $# -gt 0 ] || { echo "usage: $0 CMD [ARGS...]" >&2; exit 2; }
delay=2
child=""
stopping=""
stop() {
  stopping=1
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
}
trap stop INT TERM
while :; do
  started=$SECONDS
  "$@" &
  child=$!
  wait "$child"; status=$?
  while kill -0 "$child" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for the exit
    wait "$child"; status=$?
  done
  child=""
  [ -n "$stopping" ] && exit "$status"
  if [ $((SECONDS - started)) -ge 60 ]; then delay=2; fi
  echo "supervise: '$*' exited with status $status after $((SECONDS - started)) s; restarting in ${delay} s" >&2
  sleep "$delay" &
  wait $! 2>/dev/null
  [ -n "$stopping" ] && exit "$status"
  delay=$((delay * 2 > 30 ? 30 : delay * 2))
done
