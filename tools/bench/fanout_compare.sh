#!/usr/bin/env bash
# WebSocket fan-out and echo: corerelay against the floor relay
# (`corerelay-bench floor`: one thread, one writev per member per loop
# iteration, no features), interleaved, medians of RUNS, ratios to the floor.
# Usage: tools/bench/fanout_compare.sh [RUNS] [DURATION_S] [CORERELAY_BIN]
# Placement: the server (1 worker) on the last CPU, the client on CPU 0, so
# that server CPU per delivery is the server's own work. Idle memory per
# connection (`conns --ws`, 8,000 connections) is measured the same way.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}
DUR=${2:-5}
cargo build -q --release --bin corerelay --bin corerelay-bench
CR=$(readlink -f "${3:-target/release/corerelay}")
B=target/release/corerelay-bench
OUT=$(mktemp -d)
SPID=
trap '[ -n "$SPID" ] && kill $SPID 2>/dev/null; rm -rf "$OUT"' EXIT
ulimit -n 20000 2>/dev/null || true
LAST=$(( $(nproc) - 1 ))
# taskset execs the program: $! is the server's own PID (for --pid and kill).

. tools/bench/common.sh

start() { # floor|corerelay -> SPID, PORT
  PORT=$(free_port)
  if [ "$1" = floor ]; then
    taskset -c "$LAST" "$B" floor --listen "127.0.0.1:$PORT" >"$OUT/floor.log" 2>&1 & SPID=$!
  else
    cat > "$OUT/cr.yaml" <<YAML
workers: 1
rely:
  listen: []
admin:
  listen: []
websocket:
  listen: ["127.0.0.1:$PORT"]
  max_output_bytes: 64MiB
  ping_interval: 0
  endpoints:
    - path: /echo
      on_message: echo
    - path: /fan/{id}
      id_param: id
      set_tags: {room: bench}
      on_message: broadcast
      broadcast_tag: room
YAML
    taskset -c "$LAST" "$CR" -c "$OUT/cr.yaml" >"$OUT/corerelay.log" 2>&1 & SPID=$!
  fi
  wait_port "$PORT" || { echo "$1 did not open port $PORT" >&2; exit 1; }
}
stop() { kill "$SPID" 2>/dev/null; wait "$SPID" 2>/dev/null || true; SPID=; }

scen=(
  "fanout w32, 1000 subs|ws-fanout --subs 1000 --window 32"
  "fanout w256, 1000 subs|ws-fanout --subs 1000 --window 256"
  "fanout w32, 100 subs|ws-fanout --subs 100 --window 32"
  "echo, 100 conns|ws-echo --clients 100"
  "idle conns|conns --ws --conns 8000"
  "idle room members|conns --ws --conns 8000 --ws-path /fan/m{i}"
)
for i in $(seq "$RUNS"); do
  for s in "${scen[@]}"; do
    name=${s%%|*}; args=${s#*|}
    for peer in floor corerelay; do
      start $peer
      # shellcheck disable=SC2086
      taskset -c 0 "$B" $args --ws-target "127.0.0.1:$PORT" --target "127.0.0.1:$PORT" --pid "$SPID" \
        --warmup 1 --duration "$DUR" --json 2>>"$OUT/stderr" \
        | sed "s/^{/{\"name\":\"$name\",\"peer\":\"$peer\",/" >> "$OUT/results.jsonl" || true
      stop
    done
  done
done

python3 - "$OUT/results.jsonl" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    try:
        d = json.loads(line)
    except ValueError:
        continue
    rows.setdefault((d["name"], d["peer"]), []).append(d)
def med(rs, k):
    v = [r.get(k) for r in rs if isinstance(r.get(k), (int, float))]
    return statistics.median(v) if v else None
figs = [("deliveries_per_s", "deliveries/s", "{:,.0f}"), ("server_ns_per_delivery", "ns cpu/delivery", "{:.0f}"),
        ("round_trips_per_s", "round trips/s", "{:,.0f}"), ("bytes_per_conn", "RSS B/conn", "{:.0f}")]
print(f"{'work':24} {'figure':18} {'floor':>14} {'corerelay':>14} {'corerelay/floor':>16}")
for name in dict.fromkeys(n for n, _ in rows):
    f, c = rows.get((name, "floor"), []), rows.get((name, "corerelay"), [])
    for k, label, fmt in figs:
        a, b = med(f, k), med(c, k)
        if a is None and b is None:
            continue
        show = lambda v: "-" if v is None else fmt.format(v)
        ratio = "-" if not a or b is None else f"{b / a:.2f}x"
        print(f"{name:24} {label:18} {show(a):>14} {show(b):>14} {ratio:>16}")
PY
