#!/usr/bin/env bash
# End-to-end load benchmark: canarygate vs nginx vs HAProxy as 66/33 proxies, on this
# machine, in one run. Everything listens on 127.0.0.1 and every load run is bounded
# in time; all processes started here are killed on exit.
#
#   bash benches/load.sh                 # MODE=plain: 3 rounds at 64 and 512 connections
#   MODE=log bash benches/load.sh        # each proxy with its access log off, then on (to a file)
#   MODE=tls bash benches/load.sh        # TLS: full and resumed handshakes, keep-alive HTTP/1.1
#                                        # and HTTP/2, on ECDSA P-256 and RSA 2048 certificates
#   MODE=h2 bash benches/load.sh         # HTTP/2 from clients (h2load, 100 streams), cleartext and TLS
#   MODE=growth bash benches/load.sh     # 64/512/4096 connections, idle RSS, 1/100/1000 flags,
#                                        # 2/200 backends per pool
#   MODE=percore VARIANT=all bash benches/load.sh   # issue 30: cost per core; each proxy runs
#     one worker pinned to CPU 0 (canarygate --workers 1, nginx worker_processes 1, HAProxy
#     nbthread 1), wrk/h2load, backends and Redis on CPU 1; contenders in turn, each started
#     fresh per run (3 s warm-up, then DURATION measured). VARIANT=plain (wrk -c64), log (the
#     combined access log to a file on all three, lines per request counted, HAProxy's
#     DroppedLogs read), tls (wrk over https, ECDSA P-256, one TLS 1.3 suite), h2 (h2load
#     -c64 -m10, h2c and TLS), c4096 (wrk -c4096), or all. Prints per round req/s, p50/p99,
#     the proxy's user/system CPU per request and how busy its core was; then medians, the
#     per-round ratios canarygate/nginx and canarygate/HAProxy, and whether issue 30's target
#     is met (STRICT=1: exit 1 if not). Details: benches/percore.sh
#   MODE=shadow bash benches/load.sh     # issue 32: what the shadow stage costs production's
#     clients, off / 10% / 100% / slow canary / dead canary, as ratios within the run
#     (benches/shadow.sh); run it under `flock /tmp/cg-bench.lock`
#   ROUNDS=1 DURATION=5 bash benches/load.sh
#   ALT_BIN=/tmp/ring/release/canarygate MODE=tls bash benches/load.sh  # a second build as "alt",
#     e.g. the *ring* provider: CARGO_TARGET_DIR=/tmp/ring cargo build --release --no-default-features
#     (in MODE=growth, alt runs in the client-connection steps: an A/B of memory and CPU)
#   HANDSHAKE_SUITE=TLS_AES_128_GCM_SHA256 MODE=tls bash benches/load.sh  # handshakes on one suite
#   BIN=/path/to/canarygate ...  # the build to measure (default target/release/canarygate, built)
#
# Contenders, in turn each round:
#   direct     wrk straight to one backend (plain mode)
#   canarygate 66/33 split, flags from a real redis-server, metrics on
#   nginx      split_clients 66%, keepalive upstreams (benches/nginx.conf)
#   haproxy    weights 2:1, http-reuse always (benches/haproxy.cfg)
# The backends are the same for all: two `canarygate backend --workers 1` processes
# serving a fixed 100-byte page on /static. Logging is off on every side unless the
# mode says otherwise (MODE=log), and canarygate runs at the default log level.
# The certificates are made at run time with openssl; every TLS contender uses the
# same one. Per run it prints the figures; then per-round ratios canarygate/other and
# their medians.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-plain}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-"64 512"}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
BIN=${BIN:-target/release/canarygate}
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
need h2load nghttp2-client; need openssl openssl
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

[ "$BIN" = target/release/canarygate ] && cargo build --release --quiet
. benches/common.sh

# --- Backends, Redis, certificates ---------------------------------------------------
start_backends "$BIN"
RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" --daemonize no >/dev/null & pids+=($!); REDIS_PID=$!
wait_port "$RP"
redis-cli -p "$RP" HSET canarygate:flags new_checkout on dark_mode off theme blue >/dev/null
# One certificate of each kind for 127.0.0.1 and localhost, shared by every contender.
for kind in ecdsa rsa; do
  if [ $kind = ecdsa ]; then keyopt=(-newkey ec -pkeyopt ec_paramgen_curve:P-256); else keyopt=(-newkey rsa:2048); fi
  openssl req -x509 "${keyopt[@]}" -nodes -days 2 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$work/$kind.key" -out "$work/$kind.pem" 2>/dev/null
  cat "$work/$kind.pem" "$work/$kind.key" > "$work/$kind.haproxy.pem"
done

# --- Contenders ----------------------------------------------------------------------
# start_set SET LOG CERT [extra canarygate TOML] : canarygate, nginx and haproxy as
# "<name>/SET", logging on or off, TLS with certificate CERT (ecdsa or rsa). Ports in
# PORT, H2C, TLS; PIDs in PID; canarygate's admin port in ADMIN.
declare -A PORT H2C TLS PID ADMIN
start_set() {
  local set=$1 log=$2 cert=$3 extra=${4:-} n dir
  local only=${ONLY:-canarygate nginx haproxy}
  n=canarygate/$set; PORT[$n]=$(free_port); H2C[$n]=${PORT[$n]}; TLS[$n]=$(free_port); ADMIN[$n]=$(free_port)
  local access_log='"off"'; [ "$log" = on ] && access_log="\"$work/$set.canarygate-access.log\""
  SERVER_EXTRA="access_log = $access_log" write_config "$work/$set.canarygate.toml" "${PORT[$n]}" "${ADMIN[$n]}" <<TOML
[server.tls]
listen = "127.0.0.1:${TLS[$n]}"
cert_path = "$work/$cert.pem"
key_path = "$work/$cert.key"
[timeouts]
client_header_read_ms = 120000
idle_ms = 300000
[flags]
redis_url = "redis://127.0.0.1:$RP/0"
key = "${FLAGS_KEY:-canarygate:flags}"
[limits]
max_connections = 20000
$extra
TOML
  $BIN run --config "$work/$set.canarygate.toml" >/dev/null 2>"$work/$set.canarygate.log" & PID[$n]=$!; pids+=($!)
  if [ -n "${ALT_BIN:-}" ]; then
    # The same config from another build (ALT_BIN, e.g. with --features aws-lc) on ports
    # of its own: contender "alt".
    local m=alt/$set; PORT[$m]=$(free_port); H2C[$m]=${PORT[$m]}; TLS[$m]=$(free_port); ADMIN[$m]=$(free_port)
    sed -e "s|127.0.0.1:${PORT[$n]}\"|127.0.0.1:${PORT[$m]}\"|; s|127.0.0.1:${ADMIN[$n]}\"|127.0.0.1:${ADMIN[$m]}\"|; s|127.0.0.1:${TLS[$n]}\"|127.0.0.1:${TLS[$m]}\"|" \
      "$work/$set.canarygate.toml" > "$work/$set.alt.toml"
    "$ALT_BIN" run --config "$work/$set.alt.toml" >/dev/null 2>"$work/$set.alt.log" & PID[$m]=$!; pids+=($!)
    wait_port "${PORT[$m]}"; wait_port "${TLS[$m]}"
  fi

  if [[ " $only " == *" nginx "* ]]; then
  n=nginx/$set; PORT[$n]=$(free_port); H2C[$n]=$(free_port); TLS[$n]=$(free_port)
  dir="$work/nginx-$set"; mkdir -p "$dir/logs" "$dir/tmp"
  local nlog="access_log off;"; [ "$log" = on ] && nlog="access_log logs/access.log combined buffer=64k flush=1s;"
  sed -e "s|@P1@|$P1|g; s|@P2@|$P2|g; s|@LISTEN@|${PORT[$n]}|g; s|@H2C@|${H2C[$n]}|g; s|@TLS@|${TLS[$n]}|g" \
      -e "s|@CERT@|$work/$cert.pem|; s|@KEY@|$work/$cert.key|; s|@ACCESS_LOG@|$nlog|; s|@WORKERS@|auto|; s|@TLS_EXTRA@||" \
      -e "s|@PROD_SERVERS@|${NGINX_PROD:-server 127.0.0.1:$P1;}|; s|@CANARY_SERVERS@|${NGINX_CANARY:-server 127.0.0.1:$P2;}|" \
      benches/nginx.conf > "$dir/nginx.conf"
  nginx -c "$dir/nginx.conf" -p "$dir/" & PID[$n]=$!; pids+=($!)
  fi
  if [[ " $only " == *" haproxy "* ]]; then

  n=haproxy/$set; PORT[$n]=$(free_port); H2C[$n]=$(free_port); TLS[$n]=$(free_port)
  local hlog="" hhttp=""; [ "$log" = on ] && { hlog="log stdout format raw local0 info"; hhttp=$'log global\n    option httplog'; }
  sed -e "s|@P1@|$P1|g; s|@P2@|$P2|g; s|@LISTEN@|${PORT[$n]}|g; s|@H2C@|${H2C[$n]}|g; s|@TLS@|${TLS[$n]}|g" \
      -e "s|@PEM@|$work/$cert.haproxy.pem|; s|@LOG@|$hlog|; s|@GLOBAL_EXTRA@||; s|@FRONTEND_EXTRA@||; s|@TLS_EXTRA@||" benches/haproxy.cfg \
    | awk -v r="$hhttp" '{ sub(/@HTTPLOG@/, r) } 1' > "$work/$set.haproxy.cfg"
  # (Not -q: it silences the HTTP log on standard output too.)
  haproxy -f "$work/$set.haproxy.cfg" >"$work/$set.haproxy-access.log" 2>"$work/$set.haproxy.err" & PID[$n]=$!; pids+=($!)
  fi

  for c in $only; do n=$c/$set; wait_port "${PORT[$n]}" || { echo "$n did not start:"; for f in "$work/$set".*.err "$work/$set".*.log "$work/nginx-$set/logs/error.log"; do [ -f "$f" ] && tail -n 5 "$f"; done; exit 1; }; wait_port "${TLS[$n]}"; done
}

# All PIDs of a contender (nginx: the master and its workers).
family() { echo "$1 $(pgrep -P "$1" | tr '\n' ' ')"; }
cpu_ticks() { local t=0; for p in $(family "$1"); do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo $t; }
peak_rss_kib() { local t=0; for p in $(family "$1"); do t=$((t + $(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0))); done; echo $t; }
HZ=$(getconf CLK_TCK)

results="$work/results.tsv"
echo -e "round\ttest\tname\treq_s\tp50_ms\tp99_ms\tcpu_s_per_100k\tpeak_rss_mib" > "$results"

to_ms() { # wrk latency like 812.00us / 1.23ms / 2.01s -> ms
  awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'
}

# record ROUND TEST NAME PID BEFORE_TICKS COUNT RATE P50 P99: one row of results.
record() {
  local round=$1 test=$2 name=$3 pid=$4 before=$5 total=$6 rate=$7 p50=$8 p99=$9 cpu rss
  if [ "$pid" = - ]; then cpu=-; rss=-; else
    cpu=$(awk -v d=$(( $(cpu_ticks "$pid") - before )) -v hz="$HZ" -v n="$total" 'BEGIN { printf "%.2f", n ? d / hz / (n / 100000) : 0 }')
    rss=$(awk -v k="$(peak_rss_kib "$pid")" 'BEGIN { printf "%.1f", k / 1024 }')
  fi
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$round" "$test" "${name%%/*}" "$rate" "$p50" "$p99" "$cpu" "$rss" | tee -a "$results"
}

# wrk_run ROUND TEST NAME PID URL CONNS [wrk args]
wrk_run() {
  local round=$1 test=$2 name=$3 pid=$4 url=$5 conns=$6 out before; shift 6
  before=$( [ "$pid" = - ] && echo 0 || cpu_ticks "$pid")
  out=$(wrk -t1 -c"$conns" -d"${DURATION}s" --latency "$@" "$url")
  if grep -qE "Non-2xx|Socket errors" <<<"$out"; then
    echo "  note ($name, $test): $(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr -s ' ')"
    # Why, in canarygate's own words (its log at the default level: no line per request).
    if [ "${name%%/*}" = canarygate ]; then
      grep -hE '"level":"(WARN|ERROR)"|WARN|ERROR' "$work/${name#*/}.canarygate.log" | tail -n 3 | cut -c1-300 | sed 's/^/    /'
    fi
  fi
  record "$round" "$test" "$name" "$pid" "$before" "$(awk '/requests in/ {print $1}' <<<"$out")" \
    "$(awk '/^Requests\/sec/ {print $2}' <<<"$out")" \
    "$(to_ms "$(awk '$1=="50%" {print $2}' <<<"$out")")" "$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")")"
}

# h2load_run ROUND TEST NAME PID URL: 4 connections x 100 concurrent streams; p50/p99
# from h2load's per-request log.
h2load_run() {
  local round=$1 test=$2 name=$3 pid=$4 url=$5 out before; shift 5
  before=$( [ "$pid" = - ] && echo 0 || cpu_ticks "$pid")
  out=$(h2load -c4 -m100 -t1 -D "$DURATION" --log-file "$work/h2load.log" "$@" "$url" 2>&1)
  local done_n errored pct
  done_n=$(awk '/^requests:/ {print $8}' <<<"$out"); errored=$(awk '/^requests:/ {print $12}' <<<"$out")
  [ "${errored:-0}" != 0 ] && echo "  note ($name, $test): $(grep '^requests:' <<<"$out")"
  pct=$(python3 - "$work/h2load.log" <<'PY'
import sys
d = sorted(int(l.split()[2]) for l in open(sys.argv[1]) if l.strip())
q = lambda p: d[min(len(d) - 1, int(p * len(d)))] / 1000
print(f"{q(0.5):.3f} {q(0.99):.3f}")
PY
)
  record "$round" "$test" "$name" "$pid" "$before" "$done_n" \
    "$(awk '/^finished in/ {print $4}' <<<"$out")" ${pct}
}

# handshakes ROUND TEST NAME PID PORT new|reuse: TLS handshakes per second, from
# HANDSHAKE_CLIENTS (8) openssl s_time clients at once (each: connect, handshake,
# GET /static, close; -reuse resumes the first session on every later connection).
# The clients' own CPU is in the rate; CPU per handshake is the proxy's alone.
# (Not h2load or wrk with `Connection: close`: both resume the first session on every
# reconnect, so they count resumed handshakes; nginx with its session cache and
# tickets off drops from 2,450 to 1,750 of them a second.) HANDSHAKE_SUITE fixes the
# TLS 1.3 suite (e.g. TLS_AES_128_GCM_SHA256); by default the clients offer OpenSSL's
# order, AES-256-GCM-SHA384 first, and every contender here settles on that suite.
handshakes() {
  local round=$1 test=$2 name=$3 pid=$4 port=$5 how=$6 before i total=0 clients=${HANDSHAKE_CLIENTS:-8}
  local suite=(); [ -n "${HANDSHAKE_SUITE:-}" ] && suite=(-ciphersuites "$HANDSHAKE_SUITE")
  before=$(cpu_ticks "$pid")
  for i in $(seq "$clients"); do
    openssl s_time -connect "127.0.0.1:$port" -www /static "-$how" "${suite[@]}" -time "$DURATION" > "$work/s_time.$i" 2>&1 &
  done
  wait $(jobs -p | tail -n "$clients") 2>/dev/null || true
  for i in $(seq "$clients"); do
    total=$((total + $(awk '/connections in/ && /real seconds/ {print $1; exit}' "$work/s_time.$i" || echo 0)))
  done
  record "$round" "$test" "$name" "$pid" "$before" "$total" \
    "$(awk -v n="$total" -v s="$DURATION" 'BEGIN { printf "%.1f", n / s }')" - -
}

ratios() { # ratios REFERENCE_NAME: per-round ratios canarygate/other and medians
python3 - "$results" <<'EOF2'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def f(v):
    try: return float(v)
    except ValueError: return None
print("\nratios per round (canarygate / other; req/s higher is better, p99 and CPU lower is better)")
for test in dict.fromkeys(r["test"] for r in rows):
    ratios = {}
    for rnd in dict.fromkeys(r["round"] for r in rows):
        by = {r["name"]: r for r in rows if r["test"] == test and r["round"] == rnd}
        cg = by.get("canarygate")
        if not cg: continue
        for other in ("nginx", "haproxy", "alt"):
            o = by.get(other)
            if not o: continue
            for key in ("req_s", "p99_ms", "cpu_s_per_100k"):
                a, b = f(cg[key]), f(o[key])
                if a is not None and b:
                    ratios.setdefault((other, key), []).append(a / b)
    for (other, key), values in sorted(ratios.items()):
        print(f"  {test:<22} {key:<15} canarygate/{other:<8} " + " ".join(f"{v:.2f}" for v in values) + f"   median {statistics.median(values):.2f}")
EOF2
}

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%Y-%m-%dT%H:%MZ); MODE=$MODE, ${DURATION}s per run, ${ROUNDS} rounds"
case "$MODE" in
plain)
  start_set a off ecdsa; sleep 1
  for round in $(seq "$ROUNDS"); do
    for conns in $CONNECTIONS; do
      wrk_run "$round" "c$conns" direct - "http://127.0.0.1:$P1/static" "$conns"
      for n in canarygate/a nginx/a haproxy/a; do
        wrk_run "$round" "c$conns" "$n" "${PID[$n]}" "http://127.0.0.1:${PORT[$n]}/static" "$conns"
      done
    done
  done
  ratios ;;
log)
  # The same contenders twice: their logs off, and on (canarygate's access log to a
  # file; nginx's combined access log with buffer=64k flush=1s; HAProxy's HTTP log
  # to standard output, a file).
  start_set off off ecdsa; start_set on on ecdsa; sleep 1
  for round in $(seq "$ROUNDS"); do
    for set in off on; do
      for n in canarygate/$set nginx/$set haproxy/$set; do
        wrk_run "$round" "log-$set" "$n" "${PID[$n]}" "http://127.0.0.1:${PORT[$n]}/static" 64
      done
    done
  done
  sleep 1.5 # nginx flushes its buffer every second
  echo "  access log lines written: canarygate $(wc -l < "$work/on.canarygate-access.log"), nginx $(wc -l < "$work/nginx-on/logs/access.log"), haproxy $(wc -l < "$work/on.haproxy-access.log")"
  python3 - "$results" <<'EOF2'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print("\nwhat the log costs each proxy (req/s with it on / off), per round and median")
for name in ("canarygate", "nginx", "haproxy"):
    v = []
    for rnd in dict.fromkeys(r["round"] for r in rows):
        by = {r["test"]: float(r["req_s"]) for r in rows if r["name"] == name and r["round"] == rnd}
        v.append(by["log-on"] / by["log-off"])
    print(f"  {name:<10} " + " ".join(f"{x:.3f}" for x in v) + f"   median {statistics.median(v):.3f}")
EOF2
  ratios ;;
tls)
  start_set ecdsa off ecdsa; start_set rsa off rsa; sleep 1
  for round in $(seq "$ROUNDS"); do
    for cert in ecdsa rsa; do
      for n in canarygate/$cert ${ALT_BIN:+alt/$cert} nginx/$cert haproxy/$cert; do
        handshakes "$round" "$cert-full" "$n" "${PID[$n]}" "${TLS[$n]}" new
        handshakes "$round" "$cert-resumed" "$n" "${PID[$n]}" "${TLS[$n]}" reuse
        wrk_run "$round" "$cert-keepalive-h1" "$n" "${PID[$n]}" "https://127.0.0.1:${TLS[$n]}/static" 64
        h2load_run "$round" "$cert-keepalive-h2" "$n" "${PID[$n]}" "https://127.0.0.1:${TLS[$n]}/static"
      done
    done
  done
  ratios ;;
h2)
  start_set a off ecdsa; sleep 1
  for round in $(seq "$ROUNDS"); do
    for n in canarygate/a nginx/a haproxy/a; do
      h2load_run "$round" h2c "$n" "${PID[$n]}" "http://127.0.0.1:${H2C[$n]}/static"
      h2load_run "$round" h2-tls "$n" "${PID[$n]}" "https://127.0.0.1:${TLS[$n]}/static"
    done
  done
  ratios ;;
growth)
  . benches/growth.sh ;;
percore)
  . benches/percore.sh ;;
shadow)
  . benches/shadow.sh ;;
*) echo "MODE must be plain, log, tls, h2, growth, percore or shadow" >&2; exit 64 ;;
esac
