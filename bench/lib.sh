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
