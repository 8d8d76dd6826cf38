#!/usr/bin/env bash
# Scale-out figures (README "Several nodes"): RELY pairs on one node, the
# same pairs split across two nodes of a cluster (every message crosses
# through Redis), and redis-server pub/sub alone, in one run, each RUNS
# times; prints medians and the ratios the cluster issue asks for.
# Usage: tools/bench/cluster_compare.sh [RUNS] [DURATION_S] [PAIRS]
# BUSY_POLL=true runs both nodes with busy_poll (no wake-up per message).
# CORERELAY=path runs that server binary (an A/B against another build).
# Needs redis-server on PATH (apt-get install redis-server).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}
DUR=${2:-3}
PAIRS=${3:-50}
cargo build --release --bin corerelay --bin corerelay-bench >/dev/null
B=target/release/corerelay-bench
OUT=$(mktemp -d)
trap 'kill $(cat "$OUT"/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$OUT"' EXIT

. tools/bench/common.sh

start_redis "$OUT"

# Two nodes of one cluster, one worker each (the machine has 2 CPUs and
# also runs the client and redis-server).
start_node() { # name -> sets PORT_<name> and PID_<name>
  local name=$1 port
  port=$(free_port)
  printf 'workers: 1\nbusy_poll: %s\nrely:\n  listen: ["127.0.0.1:%s"]\n  idle_timeout: 0\nadmin:\n  listen: []\ncluster:\n  redis_url: redis://127.0.0.1:%s\n  node_id: %s\n' \
    "${BUSY_POLL:-false}" "$port" "$RPORT" "$name" > "$OUT/$name.yaml"
  "${CORERELAY:-target/release/corerelay}" -c "$OUT/$name.yaml" 2>"$OUT/$name.log" & echo $! > "$OUT/$name.pid"
  for _ in $(seq 50); do grep -q "listening" "$OUT/$name.log" 2>/dev/null && break; sleep 0.1; done
  eval "PORT_$name=$port PID_$name=$(cat "$OUT/$name.pid")"
}
start_node a
start_node b
sleep 1 # both nodes' Redis connections up (they log in the background)

run() { # name, args...
  local name=$1; shift
  for _ in $(seq "$RUNS"); do
    "$B" "$@" --warmup 1 --duration "$DUR" --json | sed "s/^{/{\"name\":\"$name\",/" >> "$OUT/results.jsonl"
  done
}

A="127.0.0.1:$PORT_a"
BN="127.0.0.1:$PORT_b"
for i in $(seq "$RUNS"); do
  RUNS=1 run "pingpong 1 pair, one node"     pingpong --target "$A" --pid "$PID_a" --pid-b "$PID_b" --redis-pid "$RPID" --pairs 1
  RUNS=1 run "pingpong 1 pair, two nodes"    pingpong --target "$A" --target-b "$BN" --pid "$PID_a" --pid-b "$PID_b" --redis-pid "$RPID" --pairs 1
  RUNS=1 run "pingpong 1 pair, redis"        pingpong --proto redis --target "127.0.0.1:$RPORT" --redis-pid "$RPID" --pairs 1
  RUNS=1 run "stream $PAIRS pairs, one node"  stream --target "$A" --pid "$PID_a" --pid-b "$PID_b" --redis-pid "$RPID" --pairs "$PAIRS"
  RUNS=1 run "stream $PAIRS pairs, two nodes" stream --target "$A" --target-b "$BN" --pid "$PID_a" --pid-b "$PID_b" --redis-pid "$RPID" --pairs "$PAIRS"
  RUNS=1 run "stream $PAIRS pairs, redis"     stream --proto redis --target "127.0.0.1:$RPORT" --redis-pid "$RPID" --pairs "$PAIRS"
done

python3 - "$OUT/results.jsonl" "$PAIRS" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows.setdefault(d["name"], []).append(d)
def med(rs, f):
    v = [f(r) for r in rs if f(r) is not None]
    return statistics.median(v) if v else None
fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
print(f"{'configuration':32} {'msgs/s':>10} {'nodes ns/msg':>12} {'redis ns/msg':>12} {'rtt p50 us':>10} {'rtt p99 us':>10}")
for name, rs in rows.items():
    print(f"{name:32} {fmt(med(rs, lambda r: r['msgs_per_s']),0):>10} {fmt(med(rs, lambda r: r['server_ns_per_msg']),0):>12} "
          f"{fmt(med(rs, lambda r: r['redis_ns_per_msg']),0):>12} {fmt(med(rs, lambda r: r['rtt_us']['p50'])):>10} {fmt(med(rs, lambda r: r['rtt_us']['p99'])):>10}")
p = sys.argv[2]
m = lambda n, f: med(rows[n], f)
two, red = m(f"stream {p} pairs, two nodes", lambda r: r["msgs_per_s"]), m(f"stream {p} pairs, redis", lambda r: r["msgs_per_s"])
print()
print("stream msgs/s, two nodes / redis pub/sub alone:   ", fmt(two / red if two and red else None, 2))
one_rtt = m("pingpong 1 pair, one node", lambda r: r["rtt_us"]["p50"])
two_rtt = m("pingpong 1 pair, two nodes", lambda r: r["rtt_us"]["p50"])
red_rtt = m("pingpong 1 pair, redis", lambda r: r["rtt_us"]["p50"])
print("round trip p50 added by crossing nodes, us:       ", fmt(two_rtt - one_rtt if two_rtt and one_rtt else None))
print("redis pub/sub round trip p50 (two hops each way), us:", fmt(red_rtt))
PY
