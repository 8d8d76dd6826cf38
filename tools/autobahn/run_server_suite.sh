#!/usr/bin/env bash
# Runs the Autobahn fuzzingclient (../shared/conformance/autobahn) against
# corerelay echo endpoints:
# - every case outside 12.* and 13.* against a plain endpoint;
# - a fixed subset of 12.* and 13.* (permessage-deflate) against a
#   `compression: dedicated` endpoint and a `compression: shared` one.
#   The full sections take over 15 minutes (216 cases of 1,000 messages,
#   mostly the suite's own Python zlib), so the subset is every data set of
#   12 (12.1-12.5) and every parameter combination of 13 (13.1-13.7), each
#   at 16 B, 4 KiB and 8 KiB auto-fragmented into 256-byte frames
#   (cases .1, .5, .11), plus 13.7.18 (128 KiB in 32 KiB frames). shared
#   declines offers that limit the server's window (13.3, 13.5), which the
#   suite reports as UNIMPLEMENTED.
# Any case FAILED fails the run.
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
    - path: /deflate-dedicated
      on_message: echo
      compression: dedicated
    - path: /deflate-shared
      on_message: echo
      compression: shared
YAML
cargo build --release --bin corerelay >/dev/null
target/release/corerelay -c "$OUT/corerelay.yaml" 2>"$OUT/corerelay.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening: websocket" "$OUT/corerelay.log" && break; sleep 0.1; done
bash "$SUITE/run_fuzzingclient.sh" "$WSTEST" "ws://127.0.0.1:$PORT" "$OUT" "$CASES" '["12.*","13.*"]'
DEFLATE='["12.1.1","12.1.5","12.1.11","12.2.1","12.2.5","12.2.11","12.3.1","12.3.5","12.3.11","12.4.1","12.4.5","12.4.11","12.5.1","12.5.5","12.5.11","13.1.1","13.1.5","13.1.11","13.2.1","13.2.5","13.2.11","13.3.1","13.3.5","13.3.11","13.4.1","13.4.5","13.4.11","13.5.1","13.5.5","13.5.11","13.6.1","13.6.5","13.6.11","13.7.1","13.7.5","13.7.11","13.7.18"]'
for mode in dedicated shared; do
  echo "permessage-deflate, compression: $mode"
  bash "$SUITE/run_fuzzingclient.sh" "$WSTEST" "ws://127.0.0.1:$PORT/deflate-$mode" "$OUT/deflate-$mode" "$DEFLATE"
done
