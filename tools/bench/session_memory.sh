#!/usr/bin/env bash
# wsproxy session sockets' memory (README "Replacing wsproxy"): server RSS
# per idle socket when each socket is its own session, when all share one
# session, and for a plain /echo socket, each RUNS times; prints medians.
# Usage: tools/bench/session_memory.sh [RUNS] [CONNS]
# CORERELAY=path runs that server binary (an A/B against another build).
# Needs redis-server on PATH (apt-get install redis-server).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}
N=${2:-8000}
cargo build -q --release --bin corerelay --bin corerelay-bench
B=target/release/corerelay-bench
OUT=$(mktemp -d)
SPID=
trap '[ -n "$SPID" ] && kill $SPID 2>/dev/null; kill $(cat "$OUT/redis.pid" 2>/dev/null) 2>/dev/null; rm -rf "$OUT"' EXIT
ulimit -n 20000 2>/dev/null || true
LAST=$(( $(nproc) - 1 ))

. tools/bench/common.sh

start_redis "$OUT"

start() { # -> SPID, PORT
  PORT=$(free_port)
  cat > "$OUT/cr.yaml" <<YAML
workers: 1
pin: false
rely:
  listen: []
admin:
  listen: []
websocket:
  listen: ["127.0.0.1:$PORT"]
  ping_interval: 0
  endpoints:
    - path: /echo
      on_message: echo
    - path: /{agent_id}/ws/{session_id}
      wsproxy:
        session_param: session_id
        auth: false
redis:
  url: redis://127.0.0.1:$RPORT
YAML
  taskset -c "$LAST" "${CORERELAY:-target/release/corerelay}" -c "$OUT/cr.yaml" >"$OUT/corerelay.log" 2>&1 & SPID=$!
  wait_port "$PORT" || { echo "corerelay did not open port $PORT" >&2; cat "$OUT/corerelay.log" >&2; exit 1; }
}
stop() { kill "$SPID" 2>/dev/null; wait "$SPID" 2>/dev/null || true; SPID=; }

scen=(
  "own session each|/a/ws/s{i}"
  "one shared session|/a/ws/shared"
  "plain /echo|/echo"
)
for _ in $(seq "$RUNS"); do
  for s in "${scen[@]}"; do
    name=${s%%|*}; path=${s#*|}
    start
    taskset -c 0 "$B" conns --ws --conns "$N" --ws-path "$path" --ws-target "127.0.0.1:$PORT" \
      --target "127.0.0.1:$PORT" --pid "$SPID" --json | sed "s|^{|{\"name\":\"$name\",|" >> "$OUT/results.jsonl"
    stop
  done
done

python3 - "$OUT/results.jsonl" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows.setdefault(d["name"], []).append(d["bytes_per_conn"])
print(f"{'idle socket':24} {'server RSS per socket (median)':>32}  runs")
for name, v in rows.items():
    print(f"{name:24} {statistics.median(v):>29.0f} B  {', '.join(f'{x:.0f}' for x in v)}")
PY
