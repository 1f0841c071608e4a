#!/usr/bin/env bash
# End-to-end load benchmark: canarygate vs nginx vs HAProxy as 66/33 proxies, on this
# machine, in one run. Everything listens on 127.0.0.1 and every wrk run is bounded
# in time; all processes started here are killed on exit.
#
#   bash benches/load.sh                 # 3 rounds of A B C D at 64 and 512 connections
#   ROUNDS=1 DURATION=5 bash benches/load.sh
#
# Contenders, in turn each round (A B C D):
#   direct     wrk straight to one backend
#   canarygate 66/33 split, flags from a real redis-server, metrics on, RUST_LOG=warn
#   nginx      split_clients 66%, keepalive upstreams (benches/nginx.conf)
#   haproxy    weights 2:1, http-reuse always (benches/haproxy.cfg)
# The backends are the same for all: two `canarygate backend --workers 1` processes
# serving a fixed 100-byte page on /static. Per run it prints req/s, p50, p99, the
# proxy's CPU seconds per 100k requests and its peak RSS; then per-round ratios
# canarygate/nginx and canarygate/haproxy and their medians. Last, the RSS of each
# proxy holding 10,000 idle keep-alive client connections.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-"64 512"}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
BIN=target/release/canarygate
work=$(mktemp -d /tmp/canarygate-load.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null || missing+=("$2"); }
missing=()
need wrk wrk; need nginx nginx; need haproxy haproxy; need redis-server redis-server
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release --quiet
. benches/common.sh

# --- Backends, Redis -----------------------------------------------------------------
start_backends "$BIN"
RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" --daemonize no >/dev/null & pids+=($!)
wait_port "$RP"
redis-cli -p "$RP" HSET canarygate:flags new_checkout on dark_mode off theme blue >/dev/null

# --- Contenders ----------------------------------------------------------------------
CG=$(free_port); CG_ADMIN=$(free_port); NG=$(free_port); HA=$(free_port)
write_config "$work/canarygate.toml" "$CG" "$CG_ADMIN" <<EOF
[timeouts]
client_header_read_ms = 120000
idle_ms = 300000
[flags]
redis_url = "redis://127.0.0.1:$RP/0"
[limits]
max_connections = 20000
EOF
mkdir -p "$work/nginx/logs" "$work/nginx/tmp"
sed -e "s/@P1@/$P1/g; s/@P2@/$P2/g; s/@LISTEN@/$NG/g" benches/nginx.conf > "$work/nginx/nginx.conf"
sed -e "s/@P1@/$P1/g; s/@P2@/$P2/g; s/@LISTEN@/$HA/g" benches/haproxy.cfg > "$work/haproxy.cfg"

RUST_LOG=warn $BIN run --config "$work/canarygate.toml" 2>"$work/canarygate.log" & CG_PID=$!; pids+=($CG_PID)
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx/" & NG_PID=$!; pids+=($NG_PID)
haproxy -f "$work/haproxy.cfg" -q & HA_PID=$!; pids+=($HA_PID)
wait_port "$CG"; wait_port "$NG"; wait_port "$HA"
sleep 1

# All PIDs of a contender (nginx: the master and its workers).
family() { echo "$1 $(pgrep -P "$1" | tr '\n' ' ')"; }
cpu_ticks() { local t=0; for p in $(family "$1"); do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo $t; }
peak_rss_kib() { local t=0; for p in $(family "$1"); do t=$((t + $(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0))); done; echo $t; }
HZ=$(getconf CLK_TCK)

results="$work/results.tsv"
echo -e "round\tconns\tname\treq_s\tp50_ms\tp99_ms\tcpu_s_per_100k\tpeak_rss_mib" > "$results"

to_ms() { # wrk latency like 812.00us / 1.23ms / 2.01s -> ms
  awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'
}

measure() { # measure ROUND CONNS NAME PORT PID
  local round=$1 conns=$2 name=$3 port=$4 pid=$5 out before after
  before=$( [ "$pid" = - ] && echo 0 || cpu_ticks "$pid")
  local log_at; log_at=$(wc -l < "$work/canarygate.log")
  out=$(wrk -t1 -c"$conns" -d"${DURATION}s" --latency "http://127.0.0.1:$port/static")
  after=$( [ "$pid" = - ] && echo 0 || cpu_ticks "$pid")
  local rps p50 p99 total cpu rss
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p50=$(to_ms "$(awk '$1=="50%" {print $2}' <<<"$out")")
  p99=$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")")
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  if [ "$pid" = - ]; then cpu=-; rss=-; else
    cpu=$(awk -v d=$((after - before)) -v hz="$HZ" -v n="$total" 'BEGIN { printf "%.2f", d / hz / (n / 100000) }')
    rss=$(awk -v k="$(peak_rss_kib "$pid")" 'BEGIN { printf "%.1f", k / 1024 }')
  fi
  if grep -qE "Non-2xx|Socket errors" <<<"$out"; then
    echo "  note ($name): $(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr -s ' ')"
    # Why, in canarygate's own words (its log is at warn: errors only).
    if [ "$name" = canarygate ]; then tail -n "+$((log_at + 1))" "$work/canarygate.log" | head -n 5 | cut -c1-300 | sed 's/^/    /'; fi
  fi
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$round" "$conns" "$name" "$rps" "$p50" "$p99" "$cpu" "$rss" | tee -a "$results"
}

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%Y-%m-%dT%H:%MZ); wrk -t1 -d${DURATION}s, GET /static (100-byte page)"
for round in $(seq "$ROUNDS"); do
  for conns in $CONNECTIONS; do
    measure "$round" "$conns" direct "$P1" -
    measure "$round" "$conns" canarygate "$CG" "$CG_PID"
    measure "$round" "$conns" nginx "$NG" "$NG_PID"
    measure "$round" "$conns" haproxy "$HA" "$HA_PID"
  done
done

python3 - "$results" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def f(v):
    try: return float(v)
    except ValueError: return None
print("\nratios per round (canarygate / other; req/s higher is better, p99 and CPU lower is better)")
for conns in sorted({r["conns"] for r in rows}, key=int):
    ratios = {}
    for rnd in sorted({r["round"] for r in rows}):
        by = {r["name"]: r for r in rows if r["conns"] == conns and r["round"] == rnd}
        cg = by["canarygate"]
        for other in ("nginx", "haproxy"):
            o = by[other]
            for key in ("req_s", "p99_ms", "cpu_s_per_100k"):
                a, b = f(cg[key]), f(o[key])
                if a is not None and b:
                    ratios.setdefault((other, key), []).append(a / b)
    for (other, key), values in sorted(ratios.items()):
        print(f"  c={conns:>3} {key:<15} canarygate/{other:<8} " + " ".join(f"{v:.2f}" for v in values) + f"   median {statistics.median(values):.2f}")
EOF

# --- Memory with idle keep-alive connections ------------------------------------------
# Clients arrive in waves of 100 (each connects, makes one request, reads the answer
# and stays open), as keep-alive clients do; sending all 10,000 requests at once
# would measure a 10,000-connection burst into two single-threaded backends instead
# (their backlogs overflow and connects time out). RSS is read once every connection
# is parked (canarygate_parked_connections equals the count; nginx and HAProxy: after
# the same wait) and the allocator has returned the freed buffers, and again 10 s
# later. RSS is summed over a contender's processes (nginx: master and workers).
idle_memory() { # idle_memory NAME PORT PID ADMIN_PORT|-
python3 - "$1" "$2" "$IDLE_CONNECTIONS" "$4" $(family "$3") <<'EOF'
import re, socket, sys, time, urllib.request
name, port, n, admin, pids = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
def rss():
    total = 0
    for pid in pids:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS"):
                total += int(line.split()[1])
    return total / 1024
def parked():
    if admin == "-":
        return n
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
    return int(re.search(r"^canarygate_parked_connections (\d+)", text, re.M).group(1))
def read_response(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("connection closed before a response")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += s.recv(65536)
    return head.split(b" ")[1].decode()
before = rss()
socks, statuses = [], {}
for start in range(0, n, 100):
    wave = [socket.create_connection(("127.0.0.1", port)) for _ in range(min(100, n - start))]
    for s in wave:
        s.sendall(b"GET /static HTTP/1.1\r\nHost: x\r\n\r\n")
    for s in wave:
        s.settimeout(10)
        code = read_response(s)
        statuses[code] = statuses.get(code, 0) + 1
    socks += wave
time.sleep(1)
deadline = time.time() + 30
while parked() < len(socks) and time.time() < deadline:
    time.sleep(0.2)
time.sleep(2)  # mimalloc returns freed pages after a short delay
settled = rss()
parked_note = f", {parked()} parked" if admin != "-" else ""
time.sleep(10)
print(f"memory: {name:<10} RSS {before:6.1f} MiB before, {settled:6.1f} MiB with {len(socks)} idle "
      f"keep-alive client connections (statuses {statuses}{parked_note}), {rss():6.1f} MiB 10 s later")
for s in socks:
    s.close()
EOF
}
echo
idle_memory canarygate "$CG" "$CG_PID" "$CG_ADMIN"
idle_memory nginx "$NG" "$NG_PID" -
# Not HAProxy: its maxconn stays below 10,000 under this machine's 20,000 open-file
# limit (it needs two descriptors per connection).
