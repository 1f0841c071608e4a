# MODE=percore for benches/load.sh (sourced by it; issue 30): each proxy's cost per
# core. The proxy runs ONE worker pinned to CPU $PROXY_CPU (0): canarygate `run
# --workers 1`, nginx `worker_processes 1`, HAProxy `nbthread 1`, each under
# `taskset -c 0`; the load generator (wrk -t1, or h2load -t1), the two backends and
# Redis run on CPU $LOAD_CPU (1). On a quiet machine the proxy's core is saturated,
# so req/s is the proxy's own cost. Each run says how CPU 0 was spent meanwhile (the
# proxy, other processes, interrupts) and how idle CPU 1 was: when others took part
# of CPU 0 (another engineer's build), a warning says so and CPU per request, which
# such sharing moves far less than req/s, is the figure to compare.
# Contenders in turn, each started fresh for its run and stopped after it: a warm-up
# of $WARMUP s, then $DURATION s measured. Per run: req/s, p50/p99, the proxy's
# user and system CPU time per request (/proc/<pid>/stat utime and stime over the
# measured run, nginx: master + worker), and in VARIANT=log the log lines written per
# request. Then per variant: each round, medians, the per-round ratios canarygate /
# nginx and canarygate / HAProxy with their medians, and whether issue 30's target is
# met (STRICT=1: exit 1 when one is missed).
#
# Variants (VARIANT=all runs them in this order):
#   plain  HTTP/1.1 keep-alive, wrk -c64, logs off on all three
#   log    the same with the access log on, the combined format to a file, on all
#          three: canarygate access_log = FILE, access_log_format = "combined";
#          nginx access_log FILE combined buffer=64k flush=1s; HAProxy a combined-like
#          log-format on `log stdout`, which is that file (a regular file: HAProxy's
#          non-blocking write cannot fail with EAGAIN, so no line is dropped; its
#          DroppedLogs counter, read from a stats socket after each run, shows it)
#   tls    HTTP/1.1 keep-alive over TLS 1.3, wrk -c64 over https: the same ECDSA
#          P-256 certificate, one suite ($TLS_SUITE, TLS_AES_128_GCM_SHA256): nginx
#          and HAProxy are pinned to it server-side; canarygate has no setting for its
#          suites (rustls' defaults: AES-256-GCM, AES-128-GCM, ChaCha20), so the
#          clients offer that suite alone (an OpenSSL config for wrk; h2load
#          --tls13-ciphers), and openssl s_client prints what each contender settles on
#   h2     HTTP/2: h2load -c64 -m10, cleartext with prior knowledge (h2c) and over
#          TLS (ALPN h2, the suite above). 64 connections as the HTTP/1.1 runs, 10
#          streams in flight on each (640 requests outstanding): multiplexing at work
#          as a browser uses it, under every proxy's stream limit (canarygate 100,
#          nginx 128, HAProxy 100) so none of them queues, and within what h2load on
#          one core can drive while the proxy's core stays saturated (-m100 adds only
#          queueing latency). p50/p99 from h2load's per-request log.
#   c4096  HTTP/1.1 keep-alive, wrk -c4096 (the open-file limit raised by load.sh;
#          nginx worker_connections 10240; HAProxy maxconn 8000, global and per
#          frontend; canarygate's limits.max_connections default is 10,000)
#
# canarygate's config is the issue's: the 66/33 unsticky split, default log level on
# stderr, no flags (PERCORE_FLAGS=1 adds load.sh's Redis flags), metrics and the
# analysis as by default.

WARMUP=${WARMUP:-3}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
TLS_SUITE=${TLS_SUITE:-TLS_AES_128_GCM_SHA256}
H2_STREAMS=${H2_STREAMS:-10}
VARIANT=${VARIANT:-plain}
case "$VARIANT" in
all) variants="plain log tls h2 c4096" ;;
plain|log|tls|h2|c4096) variants=$VARIANT ;;
*) echo "VARIANT must be plain, log, tls, h2, c4096 or all" >&2; exit 64 ;;
esac
[ "$(nproc)" -ge 2 ] || { echo "MODE=percore needs 2 cores (the proxy on one, the load on the other)"; exit 1; }
command -v taskset >/dev/null || { echo "taskset (util-linux) is missing"; exit 1; }

# Everything but the proxy on the load CPU (all threads: -a).
for p in "${BACKEND_PIDS[@]}" "$REDIS_PID"; do taskset -apc "$LOAD_CPU" "$p" >/dev/null; done

# The clients offer one TLS 1.3 suite and nothing older.
cat > "$work/client-openssl.cnf" <<CNF
openssl_conf = client_init
[client_init]
ssl_conf = client_ssl
[client_ssl]
system_default = client_default
[client_default]
MinProtocol = TLSv1.3
Ciphersuites = $TLS_SUITE
CNF
client() { OPENSSL_CONF="$work/client-openssl.cnf" taskset -c "$LOAD_CPU" "$@"; }

# fill TEMPLATE OUT KEY=VALUE...: the template with every @KEY@ replaced; any left over
# is an error.
fill() {
python3 - "$@" <<'PY'
import re, sys
src, out, *pairs = sys.argv[1:]
text = open(src).read()
for pair in pairs:
    key, value = pair.split("=", 1)
    text = text.replace(f"@{key}@", value)
left = sorted(set(re.findall(r"@[A-Z0-9_]+@", text)))
if left:
    sys.exit(f"{src}: placeholders not filled: {left}")
open(out, "w").write(text)
PY
}

# pc_start NAME LOG DIR: starts contender NAME pinned to the proxy CPU, its access log
# on or off (to DIR/access.log); sets PC_PID, PC_PORT (HTTP/1.1), PC_H2C, PC_TLS.
pc_start() {
  local name=$1 log=$2 dir=$3
  PC_PORT=$(free_port); PC_H2C=$(free_port); PC_TLS=$(free_port)
  case $name in
  canarygate)
    local admin server_extra='access_log = "off"' flags=""
    admin=$(free_port); PC_H2C=$PC_PORT # canarygate takes h2c (prior knowledge) on its one port
    [ "$log" = on ] && server_extra="access_log = \"$dir/access.log\""$'\n''access_log_format = "combined"'
    [ "${PERCORE_FLAGS:-0}" = 1 ] && flags=$'[flags]\n'"redis_url = \"redis://127.0.0.1:$RP/0\""$'\n''key = "canarygate:flags"'
    SERVER_EXTRA=$server_extra write_config "$dir/canarygate.toml" "$PC_PORT" "$admin" <<TOML
[server.tls]
listen = "127.0.0.1:$PC_TLS"
cert_path = "$work/ecdsa.pem"
key_path = "$work/ecdsa.key"
$flags
TOML
    taskset -c "$PROXY_CPU" "$BIN" run --config "$dir/canarygate.toml" --workers 1 >"$dir/stdout" 2>"$dir/stderr" &
    ;;
  nginx)
    local nlog="access_log off;"
    [ "$log" = on ] && nlog="access_log $dir/access.log combined buffer=64k flush=1s;"
    mkdir -p "$dir/logs" "$dir/tmp"
    fill benches/nginx.conf "$dir/nginx.conf" WORKERS=1 P1="$P1" P2="$P2" LISTEN="$PC_PORT" H2C="$PC_H2C" TLS="$PC_TLS" \
      CERT="$work/ecdsa.pem" KEY="$work/ecdsa.key" ACCESS_LOG="$nlog" \
      PROD_SERVERS="server 127.0.0.1:$P1;" CANARY_SERVERS="server 127.0.0.1:$P2;" \
      TLS_EXTRA="ssl_conf_command Ciphersuites $TLS_SUITE;"
    taskset -c "$PROXY_CPU" nginx -c "$dir/nginx.conf" -p "$dir/" >"$dir/stdout" 2>"$dir/stderr" &
    ;;
  haproxy)
    local hlog="" httplog="maxconn 8000" frontend=""
    if [ "$log" = on ]; then
      # Close to combined: client, [time zone], "request line", status, bytes (HAProxy's
      # %B counts the response headers too), "referer", "user agent". dontlognull: no
      # line for a connection closed without a request (nginx and canarygate write none).
      hlog="log stdout format raw local0 info"
      httplog="maxconn 8000
    log global
    option dontlognull
    log-format \"%ci - - [%trl] %{+Q}r %ST %B %{+Q}[capture.req.hdr(0)] %{+Q}[capture.req.hdr(1)]\""
      frontend="http-request capture req.hdr(Referer) len 256
    http-request capture req.hdr(User-Agent) len 256"
    fi
    cat "$work/ecdsa.pem" "$work/ecdsa.key" > "$dir/ecdsa.haproxy.pem"
    fill benches/haproxy.cfg "$dir/haproxy.cfg" P1="$P1" P2="$P2" LISTEN="$PC_PORT" H2C="$PC_H2C" TLS="$PC_TLS" \
      PEM="$dir/ecdsa.haproxy.pem" LOG="$hlog" HTTPLOG="$httplog" FRONTEND_EXTRA="$frontend" \
      GLOBAL_EXTRA="nbthread 1
    stats socket $dir/stats.sock level user" \
      TLS_EXTRA="ciphersuites $TLS_SUITE"
    # Standard output is the access log (not -q: it silences the log there too).
    taskset -c "$PROXY_CPU" haproxy -f "$dir/haproxy.cfg" >"$dir/access.log" 2>"$dir/stderr" &
    ;;
  esac
  PC_PID=$!; pids+=("$PC_PID")
  local p
  for p in "$PC_PORT" "$PC_H2C" "$PC_TLS"; do
    wait_port "$p" 2>/dev/null || { echo "$name did not start:"; tail -n 5 "$dir"/stderr "$dir"/logs/error.log 2>/dev/null; exit 1; }
  done
}

# pc_stop: stops the contender gracefully (so that buffered log lines are written),
# at most 10 s, then kills it; drops it from the cleanup list.
pc_stop() {
  local sig=TERM keep=() p
  [ "$1" = nginx ] && sig=QUIT
  kill -s "$sig" "$PC_PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$PC_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$PC_PID" 2>/dev/null || true
  wait "$PC_PID" 2>/dev/null || true
  for p in "${pids[@]}"; do if [ "$p" != "$PC_PID" ]; then keep+=("$p"); fi; done
  pids=("${keep[@]}")
}

# cpu_split PID: utime and stime of a contender (all its processes), in clock ticks.
cpu_split() { local u=0 s=0 p; for p in $(family "$1"); do read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null || echo "0 0"); u=$((u + a)); s=$((s + b)); done; echo "$u $s"; }
# cpu_state N: CPU N's clock ticks from /proc/stat: user+nice+system, irq+softirq, idle+iowait.
cpu_state() { awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4, $7 + $8, $5 + $6 }' /proc/stat; }

# haproxy_dropped DIR: HAProxy's DroppedLogs (its count of log lines it could not write).
haproxy_dropped() {
python3 - "$1/stats.sock" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1]); s.sendall(b"show info\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(next((l.split(":")[1].strip() for l in data.decode().splitlines() if l.startswith("DroppedLogs:")), "?"))
PY
}

# load_run KIND URL CONNS SECONDS OUT [h2load log file]: wrk or h2load on the load CPU.
load_run() {
  local kind=$1 url=$2 conns=$3 secs=$4 out=$5 log=${6:-}
  if [ "$kind" = wrk ]; then
    client wrk -t1 -c"$conns" -d"${secs}s" --timeout 10s --latency "$url" >"$out" 2>&1 || true
  else
    client h2load -t1 -c"$conns" -m"$H2_STREAMS" -D "$secs" --tls13-ciphers="$TLS_SUITE" ${log:+--log-file="$log"} "$url" >"$out" 2>&1 || true
  fi
}
# count KIND OUT: requests completed in a run.
count() { if [ "$1" = wrk ]; then awk '/requests in/ {print $1}' "$2"; else awk '/^requests:/ {print $8}' "$2"; fi; }

pc_results="$work/percore.tsv"
echo -e "variant\ttest\tround\tname\treq_s\tp50_ms\tp99_ms\tbusy_pct\tothers_pct\tirq_pct\tidle_pct\tload_idle_pct\tuser_us\tsys_us\tlines_per_req\tdropped\terrors" > "$pc_results"

# pc_run VARIANT TEST ROUND NAME: one contender, one run.
pc_run() {
  local variant=$1 test=$2 round=$3 name=$4 kind=wrk conns=64 scheme=http log=off dir url
  case $test in
  log) log=on ;;
  tls|h2-tls) scheme=https ;;
  c4096) conns=4096 ;;
  esac
  case $test in h2c|h2-tls) kind=h2load ;; esac
  dir=$(mktemp -d "$work/run.$test.$name.XXXX")
  pc_start "$name" "$log" "$dir"
  case $test in
  h2c) url="http://127.0.0.1:$PC_H2C/static" ;;
  tls|h2-tls) url="https://127.0.0.1:$PC_TLS/static" ;;
  *) url="http://127.0.0.1:$PC_PORT/static" ;;
  esac
  sleep 0.5
  load_run $kind "$url" "$conns" "$WARMUP" "$dir/warmup.out"
  local before after t0 t1 warm total
  warm=$(count $kind "$dir/warmup.out")
  local c0 c1 l0 l1
  c0=$(cpu_state "$PROXY_CPU"); l0=$(cpu_state "$LOAD_CPU")
  before=$(cpu_split "$PC_PID"); t0=$(date +%s.%N)
  load_run $kind "$url" "$conns" "$DURATION" "$dir/run.out" "$dir/h2load.log"
  t1=$(date +%s.%N); after=$(cpu_split "$PC_PID")
  c1=$(cpu_state "$PROXY_CPU"); l1=$(cpu_state "$LOAD_CPU")
  local dropped=- lines=- errors="" out="$dir/run.out" rate p50 p99
  if [ "$name" = haproxy ]; then dropped=$(haproxy_dropped "$dir" || echo "?"); fi
  pc_stop "$name"
  total=$(count $kind "$out")
  if [ "$kind" = wrk ]; then
    rate=$(awk '/^Requests\/sec/ {print $2}' "$out")
    p50=$(to_ms "$(awk '$1=="50%" {print $2}' "$out")"); p99=$(to_ms "$(awk '$1=="99%" {print $2}' "$out")")
    errors=$(grep -hE "Non-2xx|Socket errors" "$dir/warmup.out" "$out" | tr -s ' ' | paste -sd';' || true)
  else
    rate=$(awk '/^finished in/ {print $4}' "$out")
    read -r p50 p99 < <(python3 - "$dir/h2load.log" <<'PY'
import sys
d = sorted(int(l.split()[2]) for l in open(sys.argv[1]) if l.strip())
q = lambda p: d[min(len(d) - 1, int(p * len(d)))] / 1000 if d else float("nan")
print(f"{q(0.5):.3f} {q(0.99):.3f}")
PY
)
    rm -f "$dir/h2load.log"
    local req; req=$(grep -h '^requests:' "$dir/warmup.out" "$out" | awk '$10 != 0 || $12 != 0 || $14 != 0' | paste -sd';' || true)
    if [ -n "$req" ]; then errors="$req; $(grep -h '^status codes:' "$out" | tr -s ' ')"; fi
  fi
  if [ -n "$errors" ] && [ "$name" = canarygate ]; then
    # Why, in canarygate's own words (its log at the default level: no line per request).
    grep -hE '"level":"(WARN|ERROR)"|WARN|ERROR' "$dir/stderr" | tail -n 3 | cut -c1-300 | sed 's/^/    canarygate: /' || true
  fi
  if [ "$log" = on ]; then
    lines=$(awk -v l="$(wc -l < "$dir/access.log")" -v n=$((warm + total)) 'BEGIN { printf "%.4f", n ? l / n : 0 }')
    if [ "$round" = 1 ]; then echo "    $name's last log line: $(tail -n 1 "$dir/access.log" | cut -c1-200)"; fi
  fi
  # busy: the proxy's CPU time over the run's wall time. On its CPU meanwhile: irq
  # (interrupts and softirqs, the loopback's receive work among them: about a quarter
  # of a quiet CPU 0), others (any other process: another engineer's compiler) and
  # idle; and how idle the load CPU was.
  local busy others irq idle lidle user sys
  read -r busy others irq idle lidle user sys < <(awk -v b="$before" -v a="$after" -v t0="$t0" -v t1="$t1" -v hz="$HZ" -v n="$total" \
      -v c0="$c0" -v c1="$c1" -v l0="$l0" -v l1="$l1" 'BEGIN {
      split(b, x, " "); split(a, y, " "); du = (y[1] - x[1]) / hz; ds = (y[2] - x[2]) / hz
      split(c0, p, " "); split(c1, q, " "); split(l0, r, " "); split(l1, s, " ")
      w = t1 - t0; o = (q[1] - p[1]) / hz - du - ds; if (o < 0) o = 0
      printf "%.0f %.0f %.0f %.0f %.0f %.2f %.2f\n", (du + ds) / w * 100, o / w * 100, (q[2] - p[2]) / hz / w * 100,
        (q[3] - p[3]) / hz / w * 100, (s[3] - r[3]) / hz / w * 100, n ? du / n * 1e6 : 0, n ? ds / n * 1e6 : 0 }')
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$variant" "$test" "$round" "$name" "$rate" "$p50" "$p99" \
    "$busy" "$others" "$irq" "$idle" "$lidle" "$user" "$sys" "$lines" "$dropped" "${errors:--}" >> "$pc_results"
  printf "  round %s %-7s %-10s %9s req/s  p50 %6s ms  p99 %7s ms  CPU/req %5s us user + %5s us sys  CPU %s: proxy %3s%%, irq %2s%%, others %2s%%, idle %2s%%; CPU %s idle %2s%%%s%s%s\n" \
    "$round" "$test" "$name" "$rate" "$p50" "$p99" "$user" "$sys" "$PROXY_CPU" "$busy" "$irq" "$others" "$idle" "$LOAD_CPU" "$lidle" \
    "$([ "$lines" != - ] && echo "  log lines/req $lines")" "$([ "$dropped" != - ] && [ "$log" = on ] && echo "  DroppedLogs $dropped")" \
    "$([ -n "$errors" ] && echo "  ERRORS: $errors")"
  rm -rf "$dir"
}

# The suite each contender settles on with the clients' OpenSSL config.
show_suite() {
  local name dir
  for name in canarygate nginx haproxy; do
    dir=$(mktemp -d "$work/suite.$name.XXXX")
    pc_start "$name" off "$dir"
    echo "    $name: $(OPENSSL_CONF="$work/client-openssl.cnf" openssl s_client -connect "127.0.0.1:$PC_TLS" -servername localhost </dev/null 2>/dev/null \
      | awk '/^New, / {print $2, $NF} /Server Temp Key/ {sub(/^.*Key: /, ""); print "key exchange", $0}' | paste -sd' ')"
    pc_stop "$name"; rm -rf "$dir"
  done
}

echo "per core: proxies on CPU $PROXY_CPU (one worker each), wrk/h2load, backends and Redis on CPU $LOAD_CPU;" \
  "warm-up ${WARMUP}s, measured ${DURATION}s, $ROUNDS rounds; canarygate $BIN ($("$BIN" --version 2>/dev/null))"
echo "  $(nginx -v 2>&1 | sed 's/^nginx version: //'), $(haproxy -v | head -n 1 | awk '{print "HAProxy", $3}'), $(wrk -v 2>&1 | head -n 1 | awk '{print "wrk", $2}'), $(h2load --version | awk '{print $2}' | sed 's|nghttp2/|h2load |')"
for variant in $variants; do
  tests=$variant; [ "$variant" = h2 ] && tests="h2c h2-tls"
  echo "VARIANT=$variant"
  case $variant in
  tls|h2) echo "  TLS 1.3 suite offered by the clients: $TLS_SUITE; each contender settles on:"; show_suite ;;
  esac
  for round in $(seq "$ROUNDS"); do
    for test in $tests; do
      for name in canarygate nginx haproxy; do pc_run "$variant" "$test" "$round" "$name"; done
    done
  done
done

python3 - "$pc_results" "${STRICT:-0}" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
strict = sys.argv[2] == "1"
names = ("canarygate", "nginx", "haproxy")
def num(v):
    try: return float(v)
    except ValueError: return None
def med(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None
def fmt(v, spec):
    return "-" if v is None else format(v, spec)
verdicts, missed = [], False
for test in dict.fromkeys(r["test"] for r in rows):
    rs = [r for r in rows if r["test"] == test]
    rounds = list(dict.fromkeys(r["round"] for r in rs))
    by = {(r["round"], r["name"]): r for r in rs}
    print(f"\n{test}: per round (req/s, p99 ms) and canarygate / peer")
    print(f"  {'round':<6}" + "".join(f"{n + ' req/s':>18}{'p99':>8}" for n in names) + f"{'cg/nginx':>10}{'cg/HAProxy':>12}{'p99 cg/HA':>11}")
    ratios = {"nginx": [], "haproxy": [], "p99": []}
    for rnd in rounds:
        cells, v = "", {}
        for n in names:
            r = by.get((rnd, n))
            v[n] = r and (num(r["req_s"]), num(r["p99_ms"]))
            cells += f"{fmt(v[n] and v[n][0], ',.0f'):>18}{fmt(v[n] and v[n][1], '.2f'):>8}"
        rn = v["canarygate"][0] / v["nginx"][0] if v["canarygate"] and v["nginx"] and v["nginx"][0] else None
        rh = v["canarygate"][0] / v["haproxy"][0] if v["canarygate"] and v["haproxy"] and v["haproxy"][0] else None
        rp = v["canarygate"][1] / v["haproxy"][1] if v["canarygate"] and v["haproxy"] and v["haproxy"][1] else None
        ratios["nginx"].append(rn); ratios["haproxy"].append(rh); ratios["p99"].append(rp)
        print(f"  {rnd:<6}{cells}{fmt(rn, '.2f'):>10}{fmt(rh, '.2f'):>12}{fmt(rp, '.2f'):>11}")
    cells = ""
    for n in names:
        nr = [r for r in rs if r["name"] == n]
        cells += f"{fmt(med(num(r['req_s']) for r in nr), ',.0f'):>18}{fmt(med(num(r['p99_ms']) for r in nr), '.2f'):>8}"
    mn, mh, mp = med(ratios["nginx"]), med(ratios["haproxy"]), med(ratios["p99"])
    print(f"  {'median':<6}{cells}{fmt(mn, '.2f'):>10}{fmt(mh, '.2f'):>12}{fmt(mp, '.2f'):>11}")
    print("  CPU per request, medians (user + system = total, us); the proxy's CPU: the proxy, other processes, idle load CPU:")
    cpu = {}
    for n in names:
        nr = [r for r in rs if r["name"] == n]
        u, s = med(num(r["user_us"]) for r in nr), med(num(r["sys_us"]) for r in nr)
        for r in nr:
            a, b = num(r["user_us"]), num(r["sys_us"])
            cpu[(r["round"], n)] = None if a is None or b is None else a + b
        b, o, li = (med(num(r[k]) for r in nr) for k in ("busy_pct", "others_pct", "load_idle_pct"))
        print(f"    {n:<11} {fmt(u, '.2f')} + {fmt(s, '.2f')} = {fmt(None if u is None or s is None else u + s, '.2f')} us"
              f"  (user {fmt(None if not u or s is None else 100 * u / (u + s), '.0f')}%)   proxy {fmt(b, '.0f')}%, others {fmt(o, '.0f')}%, load CPU idle {fmt(li, '.0f')}%")
    for peer in ("nginx", "haproxy"):
        v = [cpu.get((rnd, "canarygate")) / cpu[(rnd, peer)] for rnd in rounds
             if cpu.get((rnd, "canarygate")) is not None and cpu.get((rnd, peer))]
        print(f"    CPU per request canarygate / {peer:<8} " + " ".join(f"{x:.2f}" for x in v) + f"   median {fmt(med(v), '.2f')}")
    shared = [r for r in rs if (num(r["others_pct"]) or 0) > 5]
    if shared:
        worst = max(shared, key=lambda r: num(r["others_pct"]) or 0)
        print(f"  WARNING: in {len(shared)} of {len(rs)} runs other processes took more than 5% of the proxy's CPU (up to"
              f" {worst['others_pct']}%): req/s and p99 measure the machine's other load as much as the proxy;"
              " CPU per request (above) is the steadier figure. Re-run on a quiet machine.")
    idle = [r for r in rs if (num(r["idle_pct"]) or 0) > 5 and (num(r["others_pct"]) or 0) <= 5]
    if idle:
        print(f"  WARNING: in {len(idle)} of {len(rs)} runs the proxy's CPU was more than 5% idle: the load CPU, not the proxy, set the pace.")
    like = True
    if test == "log":
        print("  log lines written per request (warm-up + run), per round; HAProxy's DroppedLogs:")
        for n in names:
            nr = [r for r in rs if r["name"] == n]
            extra = f"   DroppedLogs {' '.join(r['dropped'] for r in nr)}" if n == "haproxy" else ""
            print(f"    {n:<11} " + " ".join(r["lines_per_req"] for r in nr) + extra)
            for r in nr:
                lp = num(r["lines_per_req"])
                if lp is None or lp < 0.999 or r["dropped"] not in ("-", "0"):
                    like = False
    errs = [f"round {r['round']} {r['name']}: {r['errors']}" for r in rs if r["errors"] != "-"]
    for e in errs:
        print(f"  errors: {e}")
    # Issue 30's target.
    if test in ("plain", "log", "tls"):
        checks = [("cg/nginx >= 1.10", mn, mn is not None and mn >= 1.10), ("cg/HAProxy >= 1.00", mh, mh is not None and mh >= 1.00)]
        if test in ("plain", "log"):
            checks.append(("p99 cg/HAProxy <= 1.00", mp, mp is not None and mp <= 1.00))
    elif test in ("h2c", "h2-tls"):
        checks = [("cg/nginx > 1.00", mn, mn is not None and mn > 1.00), ("cg/HAProxy > 1.00", mh, mh is not None and mh > 1.00)]
    else:
        checks = []
    if checks:
        ok = all(c[2] for c in checks) and like and not errs
        missed |= not ok
        detail = ", ".join(f"{c[0]}: {fmt(c[1], '.3f')} {'ok' if c[2] else 'MISSED'}" for c in checks)
        if not like: detail += "; the logs are not like for like (lines/request or drops above)"
        if errs: detail += "; errors in some runs"
        verdicts.append(f"  {test:<7} {'MET    ' if ok else 'NOT MET'}  {detail}")
    else:
        verdicts.append(f"  {test:<7} (no target in issue 30)  cg/nginx {fmt(mn, '.2f')}, cg/HAProxy {fmt(mh, '.2f')}, p99 cg/HAProxy {fmt(mp, '.2f')}")
print("\nissue 30's target per core (medians of per-round ratios):")
print("\n".join(verdicts))
if strict and missed:
    sys.exit(1)
PY
