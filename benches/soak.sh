#!/usr/bin/env bash
# Soak: mixed traffic through canarygate for a long time at a bounded rate, with a
# backend restarted every minute and a flag flipped every 10 s. It passes when no
# idempotent request failed and the proxy's RSS and open file descriptors at the end
# are within 10% of their values after the first minute (no leak).
#
#   bash benches/soak.sh                       # 10 minutes, 200 req/s
#   SECONDS_TOTAL=60 RATE=100 bash benches/soak.sh   # the short version CI runs
#   BIN=target/debug/canarygate bash benches/soak.sh  # another build
#
# Traffic (127.0.0.1 only; every client is a thread of one Python process, paced to
# RATE requests per second in total): GET /static (100 bytes) and GET /static-1m
# (1 MiB, one request in ten), half on keep-alive connections and half on a new
# connection each, every answer's status and length checked. Four backends (two per
# pool, so a restart has another backend to retry on); every 60 s one of them, in
# turn, gets SIGTERM and is started again on the same port. Every 10 s the flag
# `soak` flips in Redis. The proxy's RSS and fds are sampled every 5 s.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL=${SECONDS_TOTAL:-600}
RATE=${RATE:-200}
BIN=${BIN:-target/release/canarygate}
work=$(mktemp -d /tmp/canarygate-soak.XXXXXX)
pids=()
backend_pids=()
# Every backend ever started, restarts included (they start in the chaos subshell).
started="$work/backends.pids"
cleanup() {
  local all=("${pids[@]}")
  [ -f "$started" ] && mapfile -t -O "${#all[@]}" all < "$started"
  for pid in "${all[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${all[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
command -v redis-server >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
ulimit -n 65536 2>/dev/null || true
[ "$BIN" = target/release/canarygate ] && cargo build --release --quiet
. benches/common.sh

names=(production-a production-b canary-a canary-b)
ports=()
for i in 0 1 2 3; do ports+=("$(free_port)"); done
start_backend() { # start_backend INDEX
  local i=$1
  RUST_LOG=warn "$BIN" backend --listen "127.0.0.1:${ports[$i]}" --name "${names[$i]}" --workers 1 & backend_pids[$i]=$!
  echo "$!" >> "$started"
}
for i in 0 1 2 3; do start_backend "$i"; done
for i in 0 1 2 3; do wait_port "${ports[$i]}"; done

RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" --daemonize no >/dev/null & pids+=($!)
wait_port "$RP"
CG=$(free_port); CG_ADMIN=$(free_port)
cat > "$work/canarygate.toml" <<EOF
[server]
listen = "127.0.0.1:$CG"
admin_listen = "127.0.0.1:$CG_ADMIN"
[pools.production]
backends = ["127.0.0.1:${ports[0]}", "127.0.0.1:${ports[1]}"]
[pools.canary]
backends = ["127.0.0.1:${ports[2]}", "127.0.0.1:${ports[3]}"]
[routing]
sticky = "none"
[health]
interval_ms = 1000
[flags]
redis_url = "redis://127.0.0.1:$RP/0"
EOF
RUST_LOG=warn "$BIN" run --config "$work/canarygate.toml" 2>"$work/canarygate.log" & CG_PID=$!; pids+=($CG_PID)
wait_port "$CG"

# Chaos: a backend restarted every 60 s (in turn), a flag flipped every 10 s.
(
  turn=0
  for t in $(seq 1 "$SECONDS_TOTAL"); do
    sleep 1
    if (( t % 10 == 0 )); then
      redis-cli -p "$RP" HSET canarygate:flags soak "$(( (t / 10) % 2 == 0 ))" >/dev/null 2>&1 || true
    fi
    if (( t % 60 == 30 )); then
      i=$(( turn % 4 )); turn=$(( turn + 1 ))
      kill -TERM "${backend_pids[$i]}" 2>/dev/null || true
      wait "${backend_pids[$i]}" 2>/dev/null || true
      start_backend "$i"
      echo "  t=${t}s restarted ${names[$i]}" >&2
    fi
  done
) & pids+=($!)

echo "soak: ${SECONDS_TOTAL}s at ${RATE} req/s through canarygate ($BIN), $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)"
python3 - "$CG" "$CG_PID" "$SECONDS_TOTAL" "$RATE" <<'EOF'
import http.client, random, socket, sys, threading, time
port, pid, total, rate = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
WORKERS = 16
stop = time.time() + total
lock = threading.Lock()
counts = {"ok": 0, "failed": 0, "bytes": 0}
failures = []

def rss_fds():
    rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS"))
    import os
    return rss, len(os.listdir(f"/proc/{pid}/fd"))

def client(n):
    keep_alive = n % 2 == 0
    conn = None
    interval = WORKERS / rate
    next_at = time.time() + random.random() * interval
    while time.time() < stop:
        now = time.time()
        if now < next_at:
            time.sleep(next_at - now)
        next_at += interval
        big = random.random() < 0.1
        path, length = ("/static-1m", 1 << 20) if big else ("/static", 100)
        try:
            if conn is None or not keep_alive:
                if conn is not None:
                    conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200 or len(body) != length:
                raise RuntimeError(f"status {response.status}, {len(body)} bytes")
            if response.getheader("connection", "").lower() == "close":
                conn.close(); conn = None
            with lock:
                counts["ok"] += 1; counts["bytes"] += len(body)
        except Exception as e:
            if conn is not None:
                conn.close()
            conn = None
            with lock:
                counts["failed"] += 1
                failures.append(f"{time.strftime('%H:%M:%S')} {path}: {e!r}"[:200])

threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(WORKERS)]
for t in threads: t.start()
samples = []
start = time.time()
while any(t.is_alive() for t in threads):
    time.sleep(5)
    samples.append((time.time() - start, *rss_fds()))
for t in threads: t.join()
after_first = next((s for s in samples if s[0] >= min(60, total / 2)), samples[0])
end = samples[-1]
print(f"requests: {counts['ok']} ok, {counts['failed']} failed, {counts['bytes'] / 2**30:.2f} GiB")
for f in failures[:10]: print("  failure:", f)
print(f"RSS: {after_first[1] / 1024:.1f} MiB at {after_first[0]:.0f} s, {end[1] / 1024:.1f} MiB at the end "
      f"(peak {max(s[1] for s in samples) / 1024:.1f} MiB); open fds: {after_first[2]} at {after_first[0]:.0f} s, {end[2]} at the end")
rss_ok = end[1] <= after_first[1] * 1.10
fds_ok = end[2] <= after_first[2] * 1.10 + 2
ok = counts["failed"] == 0 and rss_ok and fds_ok
print("soak " + ("passed" if ok else "FAILED") +
      f": failed idempotent requests {counts['failed']} (want 0), RSS within 10% {rss_ok}, fds within 10% {fds_ok}")
sys.exit(0 if ok else 1)
EOF
