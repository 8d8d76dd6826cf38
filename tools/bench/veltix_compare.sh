#!/usr/bin/env bash
# Veltix hub fan-out, in one run: the hub Veltix users run today (the Python
# library's Server, tools/bench/veltix_hub.py), corerelay's Veltix hub, and
# corerelay's WebSocket broadcast of the same payload; RUNS runs each,
# medians printed. Usage: tools/bench/veltix_compare.sh [RUNS] [DURATION_S] [SUBS]
# Needs python3 (a venv with veltix==3.3.0 is built under target/).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}
DUR=${2:-3}
SUBS=${3:-100}
cargo build --release --bin corerelay-bench >/dev/null
B=target/release/corerelay-bench
VENV=target/veltix-venv
if ! "$VENV/bin/python" -c 'import veltix' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet veltix==3.3.0
fi
OUT=$(mktemp -d)
trap 'kill $(cat "$OUT"/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$OUT"' EXIT
. tools/bench/common.sh
run() { # name, args...
  local name=$1; shift
  for _ in $(seq "$RUNS"); do
    "$B" "$@" --warmup 1 --duration "$DUR" --subs "$SUBS" --json 2>/dev/null | sed "s/^{/{\"name\":\"$name\",/" >> "$OUT/results.jsonl"
  done
}
# A fresh Python hub per run: one still flushing the last run's backlog to
# closed sockets would not take new clients in time.
for _ in $(seq "$RUNS"); do
  PORT=$(free_port)
  "$VENV/bin/python" tools/bench/veltix_hub.py "$PORT" > "$OUT/py.log" 2>&1 & echo $! > "$OUT/py.pid"
  for _ in $(seq 100); do grep -q ready "$OUT/py.log" 2>/dev/null && break; sleep 0.1; done
  RUNS=1 run "python veltix hub" veltix-hub --veltix-target "127.0.0.1:$PORT" --pid "$(cat "$OUT/py.pid")"
  kill "$(cat "$OUT/py.pid")"; wait "$(cat "$OUT/py.pid")" 2>/dev/null || true; rm -f "$OUT/py.pid"
done
run "corerelay veltix hub"     veltix-hub --inproc 2
run "corerelay websocket fan-out" ws-fanout --inproc 2
python3 - "$OUT/results.jsonl" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows.setdefault(d["name"], []).append(d)
med = lambda rs, f: statistics.median([f(r) for r in rs if f(r) is not None]) if any(f(r) is not None for r in rs) else None
fmt = lambda v, p=0: "-" if v is None else f"{v:.{p}f}"
print(f"{'configuration':30} {'deliveries/s':>13} {'ns cpu/deliv':>12} {'p50 us':>9} {'p99 us':>9}")
for n, rs in rows.items():
    print(f"{n:30} {fmt(med(rs, lambda r: r['deliveries_per_s'])):>13} {fmt(med(rs, lambda r: r['server_ns_per_delivery'])):>12} "
          f"{fmt(med(rs, lambda r: r['latency_us']['p50']),1):>9} {fmt(med(rs, lambda r: r['latency_us']['p99']),1):>9}")
def m(n, f): return med(rows[n], f)
d = lambda r: r["deliveries_per_s"]
c = lambda r: r["server_ns_per_delivery"]
print()
print("deliveries/s, corerelay veltix hub / python veltix hub:", fmt(m("corerelay veltix hub", d) / m("python veltix hub", d), 1))
print("CPU per delivery, veltix hub / websocket fan-out:      ", fmt(m("corerelay veltix hub", c) / m("corerelay websocket fan-out", c), 2))
PY
