#!/usr/bin/env bash
# Runs the Autobahn fuzzingserver (../shared/conformance/autobahn) against
# corerelay's upstream WebSocket client (tools/autobahn/client.rs drives one
# source per case with echo_upstream): every case outside 12.* and 13.*,
# then the same fixed 12/13 subset as run_server_suite.sh with the source
# offering permessage-deflate (`compression: true`). Any case FAILED fails
# the run.
# usage: tools/autobahn/run_client_suite.sh WSTEST_BIN [OUTDIR] [CASES_JSON]
set -euo pipefail
cd "$(dirname "$0")/../.."
WSTEST=${1:?path to wstest}
OUT=${2:-target/autobahn-client}
CASES=${3:-'["*"]'}
SUITE=${AUTOBAHN_DIR:-../shared/conformance/autobahn}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cargo build --release --example corerelay-autobahn-client >/dev/null
bash "$SUITE/run_fuzzingserver.sh" "$WSTEST" "$PORT" "$OUT" "$PWD/target/release/examples/corerelay-autobahn-client" "$CASES" '["12.*","13.*"]'
DEFLATE='["12.1.1","12.1.5","12.1.11","12.2.1","12.2.5","12.2.11","12.3.1","12.3.5","12.3.11","12.4.1","12.4.5","12.4.11","12.5.1","12.5.5","12.5.11","13.1.1","13.1.5","13.1.11","13.2.1","13.2.5","13.2.11","13.3.1","13.3.5","13.3.11","13.4.1","13.4.5","13.4.11","13.5.1","13.5.5","13.5.11","13.6.1","13.6.5","13.6.11","13.7.1","13.7.5","13.7.11","13.7.18"]'
echo "permessage-deflate offered by the source"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
CORERELAY_AUTOBAHN_COMPRESSION=1 bash "$SUITE/run_fuzzingserver.sh" "$WSTEST" "$PORT" "$OUT/deflate" "$PWD/target/release/examples/corerelay-autobahn-client" "$DEFLATE"
