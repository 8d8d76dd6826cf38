#!/usr/bin/env bash
# Runs the Autobahn fuzzingserver (../shared/conformance/autobahn) against
# corerelay's upstream WebSocket client (tools/autobahn/client.rs drives one
# source per case with echo_upstream). Every case outside 12.* and 13.*
# (compression, not negotiated) must pass.
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
