#!/usr/bin/env bash
# Local Prefect stack: server (SQLite, loopback only), a process work pool, deployments from prefect.yaml,
# the automations of scripts/automations.py, and one worker. Idempotent: `up` twice is fine. Pid files and
# logs live in .prefect/.
#   scripts/stack.sh up | down | status
set -euo pipefail
cd "$(dirname "$0")/.."
export DO_NOT_TRACK=1
PREFECT=.venv/bin/prefect
POOL=local-process
RUN=.prefect/run
API=http://127.0.0.1:4200/api
mkdir -p "$RUN"

healthy() { .venv/bin/python -c "import urllib.request; urllib.request.urlopen('$API/health', timeout=2)" >/dev/null 2>&1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  if healthy; then
    echo "server: already running at http://127.0.0.1:4200"
  else
    echo "server: starting (log: $RUN/server.log)"
    set -m  # own process group, so `down` can stop it and its children
    nohup "$PREFECT" server start --host 127.0.0.1 --port 4200 >"$RUN/server.log" 2>&1 &
    echo $! >"$RUN/server.pid"
    set +m
    for _ in $(seq 1 120); do healthy && break; sleep 1; done
    healthy || { echo "server did not become healthy in 120 s; see $RUN/server.log" >&2; tail -20 "$RUN/server.log" >&2; exit 1; }
    echo "server: up at http://127.0.0.1:4200"
  fi
  "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1 || "$PREFECT" work-pool create "$POOL" --type process >/dev/null
  echo "work pool: $POOL"
  "$PREFECT" --no-prompt deploy --all >"$RUN/deploy.log" 2>&1 || { cat "$RUN/deploy.log" >&2; exit 1; }
  echo "deployments: $(grep -c '^  - name:' prefect.yaml) from prefect.yaml"
  PREFECT_API_URL="$API" .venv/bin/python scripts/automations.py
  if alive "$RUN/worker.pid"; then
    echo "worker: already running (pid $(cat "$RUN/worker.pid"))"
  else
    # A worker started with & from a non-interactive shell ignores SIGINT unless job control is on.
    set -m
    nohup "$PREFECT" worker start --pool "$POOL" --name local-worker >"$RUN/worker.log" 2>&1 &
    echo $! >"$RUN/worker.pid"
    set +m
    echo "worker: started (pid $(cat "$RUN/worker.pid"), log: $RUN/worker.log)"
  fi
}

stop() {  # stop <pidfile> <name>
  if alive "$1"; then
    local pid; pid=$(cat "$1")
    kill -INT -- "-$pid" 2>/dev/null || kill -INT "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; }
    echo "$2: stopped"
  else
    echo "$2: not running"
  fi
  rm -f "$1"
}

case "${1:-}" in
  up) up ;;
  down) stop "$RUN/worker.pid" worker; stop "$RUN/server.pid" server ;;
  status)
    healthy && echo "server: up at http://127.0.0.1:4200" || echo "server: down"
    alive "$RUN/worker.pid" && echo "worker: running (pid $(cat "$RUN/worker.pid"))" || echo "worker: not running" ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
