#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's callgrind: the
# same binary and inputs give the same count whatever else the machine is doing, so
# small CPU changes show here when wrk's req/s is lost in the noise (10-20% on a
# shared 2-core VM). Everything listens on 127.0.0.1; all processes are killed on exit.
#
#   bash benches/instructions.sh                  # builds release, measures it
#   bash benches/instructions.sh path/to/canarygate   # another build, for an A/B
#   SERVER_EXTRA='access_log = "/tmp/a.log"' bash benches/instructions.sh   # [server] settings
#   EXTRA_TOML=$'[tracing]\n...' bash benches/instructions.sh   # more sections (benches/tracing.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
if [ $# -ge 1 ]; then BIN=$1; else cargo build --release --quiet; BIN=target/release/canarygate; fi
BACKEND=target/release/canarygate
[ -x "$BACKEND" ] || cargo build --release --quiet
DURATION=${DURATION:-10}
work=$(mktemp -d /tmp/canarygate-instr.XXXXXX)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
. benches/common.sh
start_backends "$BACKEND"
CG=$(free_port); ADMIN=$(free_port)
write_config "$work/canarygate.toml" "$CG" "$ADMIN" <<TOML
[flags.static]
new_checkout = "on"
theme = "blue"
${EXTRA_TOML:-}
TOML
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
  "$BIN" run --config "$work/canarygate.toml" --workers 1 2>"$work/valgrind.log" & VG=$!
pids+=($VG)
wait_port "$CG"
# Warm up (connections, pools, lazy statics), then count only the measured load:
# start-up and warm-up are zeroed away, so the figure is per request whatever the
# machine's speed (a busy machine serves fewer requests in the same time).
wrk -t1 -c8 -d1s "http://127.0.0.1:$CG/static" >/dev/null
callgrind_control -z "$VG" >/dev/null
requests=$(wrk -t1 -c8 -d"${DURATION}s" "http://127.0.0.1:$CG/static" | awk '/requests in/ {print $1}')
callgrind_control -d "$VG" >/dev/null
kill -INT "$VG"; wait "$VG" 2>/dev/null || true
# The dump taken after the load (".1"); the file written at exit holds only the end.
total=$(callgrind_annotate "$work/callgrind.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
# CALLGRIND_OUT=FILE keeps the profile (callgrind_annotate FILE shows where they go).
[ -n "${CALLGRIND_OUT:-}" ] && cp "$work/callgrind.out.1" "$CALLGRIND_OUT"
echo "$BIN: $requests requests, $total instructions during the load, $((total / requests)) per request"
