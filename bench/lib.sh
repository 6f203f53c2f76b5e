# shellcheck shell=bash
# Helpers shared by the benchmark scripts (sourced): running PostgreSQL's binaries as its
# user, free loopback ports, process memory, wall time, sizes, and a PostgreSQL cluster
# set up for streaming. Expects PG_BIN and WORK to be set by the script.

as_pg() { runuser -u postgres -- "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Peak and current resident memory of a process, in MB.
peak_rss_mb() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
rss_mb() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
now() { date +%s.%N; }
# Seconds since a time taken with `now`, to a tenth.
elapsed() { python3 -c "print(f'{$(now) - $1:.1f}')"; }
du_b() { du -sb "$1" | cut -f1; }
mb() { python3 -c "print(f'{$1/1e6:,.1f} MB')"; }

# init_pg DIR PORT: initdb (with page checksums), then pg_conf. Not started.
init_pg() {
  as_pg "$PG_BIN/initdb" -D "$1" -k -U postgres -A trust >/dev/null
  pg_conf "$1" "$2"
}

# pg_conf DIR PORT: the settings a streaming client needs, listening on 127.0.0.1:PORT and
# a socket in $WORK (appended: they win over earlier lines, e.g. of a restored cluster).
pg_conf() {
  cat >> "$1/postgresql.conf" <<CONF
port = $2
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = replica
max_wal_senders = 10
CONF
}

# stop_all: kills the processes in PIDS and the PostgreSQL in $WORK/pg, waits for them.
stop_all() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  [ -f "$WORK/pg/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" stop -m immediate >/dev/null 2>&1
  wait 2>/dev/null
}

# start_klio_server: development certificates in $WORK/pki (cluster "bench"), an encryption
# key, and a Klio server ($KLIO) on free loopback ports with its data in $WORK/klio and its
# log in $WORK/server.log; sets SERVER (its pid, also added to PIDS), WAL_PORT, BASE_PORT
# and CLIENT (the client flags for cluster bench).
start_klio_server() {
  "$KLIO" pki init "$WORK/pki" --cluster bench >/dev/null
  head -c 32 /dev/urandom | base64 > "$WORK/key"
  WAL_PORT=$(free_port); BASE_PORT=$(free_port)
  "$KLIO" server --data-dir "$WORK/klio" --encryption-key-file "$WORK/key" --tls-cert "$WORK/pki/server.crt" \
    --tls-key "$WORK/pki/server.key" --client-ca "$WORK/pki/ca.crt" --wal-listen "127.0.0.1:$WAL_PORT" \
    --base-listen "127.0.0.1:$BASE_PORT" 2> "$WORK/server.log" &
  SERVER=$!; PIDS+=("$SERVER")
  CLIENT=(--server-address 127.0.0.1 --wal-port "$WAL_PORT" --base-port "$BASE_PORT" --cluster bench
    --client-cert "$WORK/pki/client-bench.crt" --client-key "$WORK/pki/client-bench.key" --server-ca "$WORK/pki/ca.crt")
}
