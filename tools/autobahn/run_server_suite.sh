#!/usr/bin/env bash
# Runs the Autobahn fuzzingclient (../shared/conformance/autobahn) against a
# corerelay echo endpoint. Every case outside 12.* and 13.* (compression,
# which corerelay does not negotiate) must pass.
# usage: tools/autobahn/run_server_suite.sh WSTEST_BIN [OUTDIR] [CASES_JSON]
set -euo pipefail
cd "$(dirname "$0")/../.."
WSTEST=${1:?path to wstest}
OUT=${2:-target/autobahn-server}
CASES=${3:-'["*"]'}
SUITE=${AUTOBAHN_DIR:-../shared/conformance/autobahn}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)   # the suite runner cd-s into it
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Section 9 sends messages up to 16 MiB and expects them echoed whole.
cat > "$OUT/corerelay.yaml" <<YAML
workers: 2
pin: false
rely:
  listen: []
admin:
  listen: []
websocket:
  listen: ["127.0.0.1:$PORT"]
  max_output_bytes: 64MiB
  endpoints:
    - path: /
      on_message: echo
      max_message_size: 16MiB
YAML
cargo build --release --bin corerelay >/dev/null
target/release/corerelay -c "$OUT/corerelay.yaml" 2>"$OUT/corerelay.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening: websocket" "$OUT/corerelay.log" && break; sleep 0.1; done
bash "$SUITE/run_fuzzingclient.sh" "$WSTEST" "ws://127.0.0.1:$PORT" "$OUT" "$CASES" '["12.*","13.*"]'
