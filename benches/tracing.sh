#!/usr/bin/env bash
# What tracing costs per request (issue 33): user-space instructions per proxied
# request (benches/instructions.sh, callgrind: repeatable whatever the machine does)
# with [tracing] off, sampling 1% and 100% of new traces, the spans exported to a
# real OTLP/HTTP endpoint on 127.0.0.1 (a sink that accepts every export). Then the
# same at 100% with a collector that is down (the export fails, spans are dropped
# and counted).
#
#   bash benches/tracing.sh [path/to/canarygate]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-}
if [ -z "$BIN" ]; then cargo build --release --quiet; BIN=target/release/canarygate; fi
work=$(mktemp -d /tmp/canarygate-tracing.XXXXXX)
sink_pid=
cleanup() { [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
. benches/common.sh
SINK=$(free_port)
python3 - "$SINK" <<'PY' & sink_pid=$!
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
wait_port "$SINK"
DEAD=$(free_port)
run() { echo "== $1"; EXTRA_TOML=$2 bash benches/instructions.sh "$BIN" | tail -1; }
run "tracing off" ""
run "1% sampled" $'[tracing]\notlp_endpoint = "http://127.0.0.1:'"$SINK"$'"\nsample_ratio = 0.01'
run "100% sampled" $'[tracing]\notlp_endpoint = "http://127.0.0.1:'"$SINK"$'"\nsample_ratio = 1.0'
run "100% sampled, collector down" $'[tracing]\notlp_endpoint = "http://127.0.0.1:'"$DEAD"$'"\nsample_ratio = 1.0'
