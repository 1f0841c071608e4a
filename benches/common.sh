# Shared by the benchmark scripts (sourced): free ports, waiting for a listener, the
# two demo backends, and the canarygate config every benchmark runs.
# The sourcing script defines `pids` (killed on exit) and `work` (its temp dir).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 30 s for 127.0.0.1:PORT to accept (valgrind starts slowly).
wait_port() { for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

# start_backends BINARY: production on $P1 and canary on $P2, one worker each,
# serving the fixed 100-byte page on /static. Their PIDs in BACKEND_PIDS.
start_backends() {
  P1=$(free_port); P2=$(free_port); BACKEND_PIDS=()
  RUST_LOG=warn "$1" backend --listen "127.0.0.1:$P1" --name production --workers 1 & pids+=($!); BACKEND_PIDS+=($!)
  RUST_LOG=warn "$1" backend --listen "127.0.0.1:$P2" --name canary --app-version v2 --workers 1 & pids+=($!); BACKEND_PIDS+=($!)
  wait_port "$P1"; wait_port "$P2"
}

# write_config FILE LISTEN_PORT ADMIN_PORT: the 66/33 unsticky split over the backends
# ($CANARY_PERCENT, if set, instead of 33);
# more TOML (flags, timeouts, limits) is read from standard input and appended, and
# $SERVER_EXTRA (lines) goes into [server]. Access log off unless it says otherwise.
write_config() {
  local prod=${PROD_BACKENDS:-'"'127.0.0.1:$P1'"'} canary=${CANARY_BACKENDS:-'"'127.0.0.1:$P2'"'}
  local server_extra=${SERVER_EXTRA:-'access_log = "off"'}
  cat > "$1" <<TOML
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
$server_extra
[pools.production]
backends = [$prod]
[pools.canary]
backends = [$canary]
[routing]
canary_percent = ${CANARY_PERCENT:-33}
sticky = "none"
TOML
  cat >> "$1"
}
