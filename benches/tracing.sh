#!/usr/bin/env bash
# What tracing costs per request (issue 33): user-space instructions per proxied
# request (benches/instructions.sh, callgrind: repeatable whatever the machine does)
# with [tracing] off, sampling 1% and 100% of new traces, the spans exported to a
# real OTLP/HTTP endpoint on 127.0.0.1 (a sink that accepts every export). Then the
# same at 100% with a collector that is down (the export fails, spans are dropped
# and counted).
#
#   bash benches/tracing.sh [path/to/canarygate]
#   PERCORE=1 bash benches/tracing.sh [path]   # req/s per core instead (below)
#
# PERCORE=1: req/s with the proxy pinned to CPU 0 (one worker) and wrk, the backends
# and the span sink on CPU 1, as `MODE=percore` measures the proxies: tracing off,
# 1% and 100% sampled in turn, ROUNDS rounds (3) of DURATION s (10) after 3 s of
# warm-up; prints each run and the medians of the per-round ratios to off.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-}
if [ -z "$BIN" ]; then cargo build --release --quiet; BIN=target/release/canarygate; fi
work=$(mktemp -d /tmp/canarygate-tracing.XXXXXX)
sink_pid= pids=()
cleanup() {
  [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
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
on() { printf '[tracing]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = %s\n' "$1" "$2"; }
if [ "${PERCORE:-0}" != 1 ]; then
  run() { echo "== $1"; EXTRA_TOML=$2 bash benches/instructions.sh "$BIN" | tail -1; }
  run "tracing off" ""
  run "1% sampled" "$(on "$SINK" 0.01)"
  run "100% sampled" "$(on "$SINK" 1.0)"
  run "100% sampled, collector down" "$(on "$DEAD" 1.0)"
  exit 0
fi

# Per core: everything this script starts runs on CPU 1, the proxy on CPU 0.
taskset -p -c 1 $$ >/dev/null
kill "$sink_pid"; wait "$sink_pid" 2>/dev/null || true
python3 - "$SINK" <<'PY' & sink_pid=$!
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
wait_port "$SINK"
start_backends "$BIN"
ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-10}
declare -A rps
for round in $(seq "$ROUNDS"); do
  for variant in off 1% 100%; do
    case $variant in off) extra="" ;; 1%) extra=$(on "$SINK" 0.01) ;; *) extra=$(on "$SINK" 1.0) ;; esac
    port=$(free_port); admin=$(free_port)
    write_config "$work/cg.toml" "$port" "$admin" <<<"$extra"
    taskset -c 0 "$BIN" run --config "$work/cg.toml" --workers 1 >/dev/null 2>&1 & cg=$!
    wait_port "$port"
    wrk -t1 -c64 -d3s "http://127.0.0.1:$port/static" >/dev/null
    ticks() { awk '{print $14 + $15}' "/proc/$cg/stat"; }
    t0=$(ticks)
    out=$(wrk -t1 -c64 -d"${DURATION}s" "http://127.0.0.1:$port/static")
    t1=$(ticks)
    kill "$cg"; wait "$cg" 2>/dev/null || true
    r=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    hz=$(getconf CLK_TCK)
    rps[$round,$variant]=$r
    # The proxy's CPU per request (user + system) and how busy its core was: when
    # it was not saturated, CPU 1 (wrk, backends) set the pace and req/s says less.
    echo "round $round, tracing $variant: $r req/s, proxy CPU $(awk -v t=$((t1 - t0)) -v n="$n" -v hz="$hz" 'BEGIN {printf "%.2f us/request", t / hz / n * 1e6}'), busy $(awk -v t=$((t1 - t0)) -v d="$DURATION" -v hz="$hz" 'BEGIN {printf "%d%%", t / hz / d * 100}')"
  done
done
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
for variant in 1% 100%; do
  ratios=$(for round in $(seq "$ROUNDS"); do echo "${rps[$round,$variant]} ${rps[$round,off]}"; done |
    awk '{printf "%.3f\n", $1 / $2}' | sort -n)
  echo "tracing $variant / off, by round (sorted): $(echo $ratios); median $(echo "$ratios" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
done
