#!/usr/bin/env bash
# make loadtest: the gateway of `make run` in the background, locust headless
# against it for a bounded time, then the summary (percentiles, SLO pass/fail).
# The gateway and its Ray are stopped on every exit path (success, failure, Ctrl-C).
#
#   LOADTEST_TIME=60s        locust -t
#   LOADTEST_USERS=20        locust -u (concurrent users)
#   LOADTEST_SPAWN_RATE=5    locust -r
#   LOADTEST_CLASSES=        user classes to run, e.g. "AgentLoopUser" (default: all, by weight)
#   LOADTEST_PORT=8000       where the gateway listens (deployments/local.yaml with this port)
#   LOADTEST_HOST=           an already-running gateway: nothing is started or stopped
#   LOADTEST_OUT=loadtests/out
# Output: $LOADTEST_OUT/<UTC stamp>_{stats,stats_history,failures,exceptions}.csv,
#         _summary.json, _summary.txt, _gateway.log. Exit status 1 when an SLO fails.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
TIME=${LOADTEST_TIME:-60s}
USERS=${LOADTEST_USERS:-20}
RATE=${LOADTEST_SPAWN_RATE:-5}
PORT=${LOADTEST_PORT:-8000}
OUT=${LOADTEST_OUT:-loadtests/out}
HOST=${LOADTEST_HOST:-}
mkdir -p "$OUT"
prefix="$OUT/$(date -u +%Y%m%dT%H%M%SZ)"
gw_pid=""

stop_gateway() {
  [ -n "$gw_pid" ] || return 0
  echo "stopping the gateway (pid $gw_pid) and its Ray"
  kill -TERM -- "-$gw_pid" 2>/dev/null || true  # its own process group: serve run and the Ray it started
  for _ in $(seq 60); do
    kill -0 -- "-$gw_pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$gw_pid" 2>/dev/null || true
  gw_pid=""
}
trap stop_gateway EXIT
trap 'exit 130' INT TERM

if [ -z "$HOST" ]; then
  HOST="http://127.0.0.1:$PORT"
  if curl -s -o /dev/null --max-time 2 "$HOST/health"; then
    echo "something already answers on $HOST: stop it, or set LOADTEST_PORT, or LOADTEST_HOST to use it" >&2
    exit 2
  fi
  cfg="$prefix.gateway.yaml"
  sed "s/^  port: 8000\$/  port: $PORT/" deployments/local.yaml > "$cfg"
  echo "starting the gateway (deployments/local.yaml on port $PORT); log: ${prefix}_gateway.log"
  # A Ray of its own (own temp dir): never joins or stops anyone else's.
  RAY_TMPDIR="/tmp/proxima-lt-$PORT" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \
    setsid "$BIN/serve" run "$cfg" > "${prefix}_gateway.log" 2>&1 &
  gw_pid=$!
  disown "$gw_pid" 2>/dev/null || true  # its end (SIGTERM makes Ray abort) is not a job to report
  for i in $(seq 240); do  # up to 120 s: Ray start, deploy, every engine reporting
    if curl -sf --max-time 2 "$HOST/health" 2>/dev/null | grep -q '"status":"ok"'; then break; fi
    if ! kill -0 "$gw_pid" 2>/dev/null; then echo "the gateway exited; see ${prefix}_gateway.log" >&2; exit 1; fi
    if [ "$i" = 240 ]; then echo "the gateway was not healthy after 120 s" >&2; exit 1; fi
    sleep 0.5
  done
  echo "gateway healthy: $(curl -s "$HOST/health")"
fi

# shellcheck disable=SC2086  # LOADTEST_CLASSES is a list of class names
"$BIN/locust" -f loadtests/locustfile.py --headless -u "$USERS" -r "$RATE" -t "$TIME" \
  --host "$HOST" --csv "$prefix" --only-summary --stop-timeout 30 ${LOADTEST_CLASSES:-} \
  || echo "locust exited with $? (failures are counted in the summary)"
stop_gateway
"$BIN/python" -m serving.bench.loadtest "$prefix"
