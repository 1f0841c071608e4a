# MODE=growth for benches/load.sh (sourced by it): how the cost grows with client
# connections, idle connections, flags and backends. Each table says per step what
# the step costs, so a cost that grows faster than the work shows.

# 1. Client connections: req/s, p99 and CPU per request at 64, 512 and 4096.
start_set a off ecdsa; sleep 1
for round in $(seq "$ROUNDS"); do
  for conns in ${GROWTH_CONNECTIONS:-64 512 4096}; do
    for n in canarygate/a ${ALT_BIN:+alt/a} nginx/a haproxy/a; do
      wrk_run "$round" "c$conns" "$n" "${PID[$n]}" "http://127.0.0.1:${PORT[$n]}/static" "$conns"
    done
  done
done

# 2. Memory with idle keep-alive connections (10,000, and the most this machine
# allows: its open-file limit is 20,000 per process, so 50,000 cannot be opened here).
# Clients arrive in waves of 100 (each connects, makes one request, reads the answer
# and stays open), as keep-alive clients do; sending all 10,000 requests at once
# would measure a 10,000-connection burst into two single-threaded backends instead
# (their backlogs overflow and connects time out). RSS is read once every connection
# is parked (canarygate_parked_connections equals the count; nginx and HAProxy: after
# the same wait) and the allocator has returned the freed buffers, and again 10 s
# later. RSS is summed over a contender's processes (nginx: master and workers).
idle_memory() { # idle_memory NAME PORT PID ADMIN_PORT|- COUNT
python3 - "$1" "$2" "$5" "$4" $(family "$3") <<'EOF'
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
for count in ${IDLE_COUNTS:-10000 18000}; do
  idle_memory canarygate "${PORT[canarygate/a]}" "${PID[canarygate/a]}" "${ADMIN[canarygate/a]}" "$count"
  idle_memory nginx "${PORT[nginx/a]}" "${PID[nginx/a]}" - "$count"
done
# Not HAProxy: its maxconn stays below 10,000 under this machine's 20,000 open-file
# limit (it needs two descriptors per connection).

# 3. Flags: 1, 100 and 1000 flags in Redis, all rendered into the header sent
# upstream (each flag `flag_NNNN=on`, so 1000 flags make a 12 KiB header).
echo
for count in 1 100 1000; do
  redis-cli -p "$RP" DEL "bench:flags:$count" >/dev/null
  python3 -c "import sys; n=int(sys.argv[1]); print('HSET bench:flags:%d ' % n + ' '.join(f'flag_{i:04d} on' for i in range(n)))" "$count" \
    | redis-cli -p "$RP" >/dev/null
  FLAGS_KEY="bench:flags:$count" ONLY=canarygate start_set "flags$count" off ecdsa
done
sleep 1
for round in $(seq "$ROUNDS"); do
  for count in 1 100 1000; do
    n=canarygate/flags$count
    wrk_run "$round" "flags$count" "$n" "${PID[$n]}" "http://127.0.0.1:${PORT[$n]}/static" 64
  done
done

# 4. Backends: 2 and 200 per pool. The backends here are one nginx serving the same
# 100-byte page on 400 ports (two single-threaded demo apps cannot listen on 400),
# the same for both contenders and both counts.
echo
# 400 distinct free ports (held open together while chosen).
mapfile -t bports < <(python3 -c 'import socket
socks = [socket.socket() for _ in range(400)]
for s in socks: s.bind(("127.0.0.1", 0))
print("\n".join(str(s.getsockname()[1]) for s in socks))')
mkdir -p "$work/nginx-backends/logs" "$work/nginx-backends/tmp"
{
  echo "worker_processes 1; daemon off; pid ./nginx.pid; error_log ./logs/error.log warn;"
  echo "events { worker_connections 10240; }"
  echo "http { access_log off; keepalive_requests 100000; client_body_temp_path ./tmp/body; proxy_temp_path ./tmp/proxy; fastcgi_temp_path ./tmp/fastcgi; uwsgi_temp_path ./tmp/uwsgi; scgi_temp_path ./tmp/scgi;"
  echo "  server {"
  for p in "${bports[@]}"; do echo "    listen 127.0.0.1:$p;"; done
  echo "    location / { default_type text/html; return 200 '<!doctype html><html><head><title>static</title></head><body><p>production static page, fixed size</p></body></html>\n'; }"
  echo "  }"
  echo "}"
} > "$work/nginx-backends/nginx.conf"
nginx -c "$work/nginx-backends/nginx.conf" -p "$work/nginx-backends/" & pids+=($!)
wait_port "${bports[0]}"; wait_port "${bports[399]}"
list() { local sep="" out=""; for p in "$@"; do out+="$sep\"127.0.0.1:$p\""; sep=", "; done; echo "$out"; }
servers() { local out=""; for p in "$@"; do out+="server 127.0.0.1:$p; "; done; echo "$out"; }
for count in 2 200; do
  prod=("${bports[@]:0:$count}"); canary=("${bports[@]:200:$count}")
  PROD_BACKENDS=$(list "${prod[@]}") CANARY_BACKENDS=$(list "${canary[@]}") \
  NGINX_PROD=$(servers "${prod[@]}") NGINX_CANARY=$(servers "${canary[@]}") \
  ONLY="canarygate nginx" start_set "backends$count" off ecdsa
done
sleep 1
for round in $(seq "$ROUNDS"); do
  for count in 2 200; do
    for n in canarygate/backends$count nginx/backends$count; do
      wrk_run "$round" "backends$count" "$n" "${PID[$n]}" "http://127.0.0.1:${PORT[$n]}/" 64
    done
  done
done

python3 - "$results" <<'EOF2'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def med(name, test, key):
    v = [float(r[key]) for r in rows if r["name"] == name and r["test"] == test and r[key] not in ("-", "")]
    return statistics.median(v) if v else float("nan")
print("\ngrowth, medians over the rounds (req/s, p99 ms, CPU s per 100k requests)")
for tests, names in ((["c64", "c512", "c4096"], ["canarygate", "nginx", "haproxy"]),
                     (["flags1", "flags100", "flags1000"], ["canarygate"]),
                     (["backends2", "backends200"], ["canarygate", "nginx"])):
    for name in names:
        cells = [f"{t}: {med(name, t, 'req_s'):8.0f} req/s p99 {med(name, t, 'p99_ms'):7.2f} cpu {med(name, t, 'cpu_s_per_100k'):5.2f}" for t in tests]
        print(f"  {name:<10} " + " | ".join(cells))
EOF2
ratios
