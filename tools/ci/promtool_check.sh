#!/usr/bin/env bash
# Starts corerelay (binary $1) with every kind of listener and a real
# redis-server on free loopback ports, fetches /metrics, and checks it with
# promtool (Prometheus's own linter). Used by .ci/run.
set -euo pipefail
BIN=${1:?usage: promtool_check.sh path/to/corerelay}
dir=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RP=$(free_port); AP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes --pidfile "$dir/redis.pid" >/dev/null
cleanup() { kill "$(cat "$dir/redis.pid")" 2>/dev/null || true; [ -n "${CR:-}" ] && kill "$CR" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
cat > "$dir/config.yaml" <<YAML
workers: 2
pin: false
rely: {listen: ["127.0.0.1:0"]}
websocket:
  listen: ["127.0.0.1:0"]
  endpoints:
    - {path: /echo, on_message: echo}
    - path: /{agent_id}/ws/{session_id}
      wsproxy: {auth: false}
    - {path: /connect, events: true, stream_include_tags: [app], set_tags: {app: ci}}
admin: {listen: ["127.0.0.1:$AP"]}
redis: {url: "redis://127.0.0.1:$RP"}
events: {stream_name: "ci-events"}
sync: {}
sources: [{url: "ws://127.0.0.1:9/feed", websocket_port: 0}]
veltix: [{listen: "127.0.0.1:0"}]
YAML
"$BIN" -c "$dir/config.yaml" 2>/dev/null &
CR=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$AP/metrics" -o "$dir/metrics.txt" && break
  sleep 0.05
done
promtool check metrics < "$dir/metrics.txt"
echo "promtool: $(grep -c '^# TYPE' "$dir/metrics.txt") families, no problems"
