#!/usr/bin/env bash
# Runs the RELY figures of the engine issue and the redis-server pub/sub
# baseline in one go, each configuration RUNS times, and prints medians.
# Usage: tools/bench/compare.sh [RUNS] [DURATION_S]
# Needs redis-server on PATH (apt-get install redis-server) for the baseline.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}
DUR=${2:-3}
cargo build --release --bin corerelay --bin corerelay-bench >/dev/null
B=target/release/corerelay-bench
ulimit -n 20000 2>/dev/null || true
OUT=$(mktemp -d)
trap 'kill $(cat "$OUT"/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$OUT"' EXIT

. tools/bench/common.sh

start_redis "$OUT"

CPORT=$(free_port)
printf 'workers: 2\nrely:\n  listen: ["127.0.0.1:%s"]\n  idle_timeout: 0\n' "$CPORT" > "$OUT/corerelay.yaml"
target/release/corerelay -c "$OUT/corerelay.yaml" 2>"$OUT/corerelay.log" & echo $! > "$OUT/corerelay.pid"
CPID=$(cat "$OUT/corerelay.pid")
for _ in $(seq 50); do grep -q "listening" "$OUT/corerelay.log" 2>/dev/null && break; sleep 0.1; done

run() { # name, args...
  local name=$1; shift
  for i in $(seq "$RUNS"); do
    "$B" "$@" --warmup 1 --duration "$DUR" --json | sed "s/^{/{\"name\":\"$name\",/" >> "$OUT/results.jsonl"
  done
}

run "rely pingpong 1 pair cross-core"            pingpong --inproc 2 --placement cross --pairs 1
run "rely pingpong 1 pair same-core"             pingpong --inproc 2 --placement same --pairs 1
run "rely pingpong 1 pair cross-core busy-poll"  pingpong --inproc 2 --placement cross --pairs 1 --busy-poll
run "rely pingpong 1 pair same-core busy-poll"   pingpong --inproc 2 --placement same --pairs 1 --busy-poll
run "rely pingpong 50 pairs cross-core"          pingpong --inproc 2 --placement cross --pairs 50
run "rely pingpong 50 pairs cross-core busy-poll" pingpong --inproc 2 --placement cross --pairs 50 --busy-poll
run "redis pingpong 1 pair"                      pingpong --proto redis --target "127.0.0.1:$RPORT" --pid "$RPID" --pairs 1
run "redis pingpong 50 pairs"                    pingpong --proto redis --target "127.0.0.1:$RPORT" --pid "$RPID" --pairs 50
run "rely stream 50 pairs, 1 worker"             stream --inproc 1 --pairs 50
run "rely stream 50 pairs, 2 workers"            stream --inproc 2 --pairs 50
run "rely stream 50 pairs, 2 workers, process"   stream --target "127.0.0.1:$CPORT" --pid "$CPID" --pairs 50
run "redis stream 50 pairs"                      stream --proto redis --target "127.0.0.1:$RPORT" --pid "$RPID" --pairs 50
# Idle logged-in connections: server RSS per connection (8,000, spread
# over 127.0.1.x sources), once per run like the rest.
# Each run on a server of its own: a server keeps the memory of the
# connections it had (its slab, its maps) for the next ones, so a second
# run on the same one measures almost nothing.
for i in $(seq "$RUNS"); do
  IPORT=$(free_port)
  printf 'workers: 2\nrely:\n  listen: ["127.0.0.1:%s"]\n  idle_timeout: 0\n' "$IPORT" > "$OUT/idle.yaml"
  target/release/corerelay -c "$OUT/idle.yaml" 2>"$OUT/idle.log" & IPID=$!
  for _ in $(seq 50); do grep -q "listening" "$OUT/idle.log" 2>/dev/null && break; sleep 0.1; done
  "$B" conns --target "127.0.0.1:$IPORT" --pid "$IPID" --conns 8000 --json \
    | sed 's/^{/{"name":"rely idle connections, 2 workers, process",/' >> "$OUT/results.jsonl"
  kill "$IPID"; wait "$IPID" 2>/dev/null || true
done

python3 - "$OUT/results.jsonl" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows.setdefault(d["name"], []).append(d)
def med(rs, f):
    v = [f(r) for r in rs if f(r) is not None]
    return statistics.median(v) if v else None
fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
print(f"{'configuration':46} {'msgs/s':>11} {'ns cpu/msg':>10} {'rtt p50 us':>10} {'rtt p99 us':>10} {'client cpu s':>12}")
idle = rows.pop("rely idle connections, 2 workers, process", [])
for name, rs in rows.items():
    print(f"{name:46} {fmt(med(rs, lambda r: r['msgs_per_s']),0):>11} {fmt(med(rs, lambda r: r['server_ns_per_msg']),0):>10} "
          f"{fmt(med(rs, lambda r: r['rtt_us']['p50'])):>10} {fmt(med(rs, lambda r: r['rtt_us']['p99'])):>10} {fmt(med(rs, lambda r: r['client_cpu_s']),2):>12}")
m = {n: rs for n, rs in rows.items()}
def ratio(a, b, f):
    x, y = med(m[a], f), med(m[b], f)
    return None if not x or not y else x / y
print()
print("stream msgs/s, corerelay (2 workers) / redis:      ", fmt(ratio("rely stream 50 pairs, 2 workers", "redis stream 50 pairs", lambda r: r["msgs_per_s"]), 2))
print("server CPU/msg, corerelay (2 workers) / redis:     ", fmt(ratio("rely stream 50 pairs, 2 workers", "redis stream 50 pairs", lambda r: r["server_ns_per_msg"]), 2))
print("stream msgs/s, 2 workers / 1 worker:               ", fmt(ratio("rely stream 50 pairs, 2 workers", "rely stream 50 pairs, 1 worker", lambda r: r["msgs_per_s"]), 2))
print("msgs per server CPU-second, 2 workers / 1 worker:  ", fmt(ratio("rely stream 50 pairs, 1 worker", "rely stream 50 pairs, 2 workers", lambda r: r["server_ns_per_msg"]), 2))
x = med(m["rely pingpong 1 pair cross-core busy-poll"], lambda r: r["rtt_us"]["p50"])
y = med(m["rely pingpong 1 pair same-core busy-poll"], lambda r: r["rtt_us"]["p50"])
print("busy-poll one-way cross-core added latency p50 us: ", fmt((x - y) / 2))
if idle:
    print("idle logged-in RELY connection, server RSS bytes:", fmt(med(idle, lambda r: r["bytes_per_conn"]), 0))
PY
