#!/usr/bin/env bash
# What tenant isolation costs in storage: a cluster, and a clone restored from its backup
# (the same pages), each backed up to one Klio server; once with the default per-cluster
# dedup domains, once with both clusters in a shared domain (--shared-dedup-domain).
# Prints the bytes each backup added to the repository and the ratio.
#
#   bash bench/isolation.sh          # pgbench scale 50 (about 800 MB)
#   SCALE=10 bash bench/isolation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
PG_BIN="${KLIO_PG_BIN:-/usr/lib/postgresql/15/bin}"
SCALE="${SCALE:-50}"
WORK="$(mktemp -d /var/tmp/klio-bench-isolation-XXXXXX)"
chown postgres:postgres "$WORK"

cargo build --release --locked --bin klio >&2
KLIO="$CARGO_TARGET_DIR/release/klio"

# shellcheck source=bench/lib.sh
. bench/lib.sh

PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for d in "$WORK"/origin-* "$WORK"/clone-*; do [ -f "$d/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1; done
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

"$KLIO" pki init "$WORK/pki" --cluster origin --cluster clone >/dev/null
# A restored cluster runs klio wal-get as postgres.
chown -R postgres:postgres "$WORK/pki"
head -c 32 /dev/urandom | base64 > "$WORK/key"

start_pg() { # DIR PORT
  pg_conf "$1" "$2"
  chown -R postgres:postgres "$1"
  as_pg "$PG_BIN/pg_ctl" -D "$1" -l "$1.log" -w -t 300 start >/dev/null
}
wait_primary() { # PORT
  for _ in $(seq 1 300); do
    [ "$("$PG_BIN/psql" -X -At -h "$WORK" -p "$1" -U postgres -d postgres -c "SELECT NOT pg_is_in_recovery()" 2>/dev/null || true)" = t ] && return 0
    sleep 1
  done
  echo "PostgreSQL on port $1 did not finish recovery" >&2; return 1
}

# mode LABEL [server flags...]: prints the bytes the origin's and the clone's backups added.
mode() {
  local label=$1; shift
  local data="$WORK/klio-$label" wal_port base_port server clone_port origin_stream clone_stream
  # A fresh origin per mode (same pgbench data), so that no slot or archive is shared.
  local origin="$WORK/origin-$label"
  ORIGIN_PORT=$(free_port)
  init_pg "$origin" "$ORIGIN_PORT"
  chown -R postgres:postgres "$origin"
  as_pg "$PG_BIN/pg_ctl" -D "$origin" -l "$origin.log" -w -t 300 start >/dev/null
  as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$ORIGIN_PORT" -U postgres -i -q -s "$SCALE" postgres >/dev/null 2>&1
  "$PG_BIN/psql" -X -At -h "$WORK" -p "$ORIGIN_PORT" -U postgres -d postgres -c "VACUUM (FREEZE)" -c CHECKPOINT >/dev/null
  wal_port=$(free_port); base_port=$(free_port)
  "$KLIO" server --data-dir "$data" --encryption-key-file "$WORK/key" --tls-cert "$WORK/pki/server.crt" \
    --tls-key "$WORK/pki/server.key" --client-ca "$WORK/pki/ca.crt" --wal-listen "127.0.0.1:$wal_port" \
    --base-listen "127.0.0.1:$base_port" "$@" 2> "$WORK/server-$label.log" &
  server=$!; PIDS+=("$server")
  sleep 1
  client() { echo --server-address 127.0.0.1 --wal-port "$wal_port" --base-port "$base_port" --cluster "$1" \
    --client-cert "$WORK/pki/client-$1.crt" --client-key "$WORK/pki/client-$1.key" --server-ca "$WORK/pki/ca.crt"; }
  # shellcheck disable=SC2046
  "$KLIO" wal-stream $(client origin) --pg-dsn "host=127.0.0.1 port=$ORIGIN_PORT user=postgres dbname=postgres" 2> "$WORK/stream-origin-$label.log" &
  origin_stream=$!; PIDS+=("$origin_stream")
  local r0 r1 r2
  r0=$(du_b "$data/repository")
  # shellcheck disable=SC2046
  "$KLIO" backup $(client origin) --pg-dsn "host=127.0.0.1 port=$ORIGIN_PORT user=postgres dbname=postgres" --pgdata "$origin" --jobs 2 --no-retention --json >/dev/null 2>> "$WORK/backup-$label.log"
  r1=$(du_b "$data/repository")
  # shellcheck disable=SC2046
  "$KLIO" restore $(client origin) --pgdata "$WORK/clone-$label" --target-immediate >/dev/null 2>&1
  clone_port=$(free_port)
  start_pg "$WORK/clone-$label" "$clone_port"
  wait_primary "$clone_port"
  # shellcheck disable=SC2046
  "$KLIO" wal-stream $(client clone) --pg-dsn "host=127.0.0.1 port=$clone_port user=postgres dbname=postgres" 2> "$WORK/stream-clone-$label.log" &
  clone_stream=$!; PIDS+=("$clone_stream")
  # shellcheck disable=SC2046
  "$KLIO" backup $(client clone) --pg-dsn "host=127.0.0.1 port=$clone_port user=postgres dbname=postgres" --pgdata "$WORK/clone-$label" --jobs 2 --no-retention --json >/dev/null 2>> "$WORK/backup-$label.log"
  r2=$(du_b "$data/repository")
  kill "$origin_stream" "$clone_stream" "$server"; wait "$origin_stream" "$clone_stream" "$server" 2>/dev/null || true
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/clone-$label" stop -m fast >/dev/null
  as_pg "$PG_BIN/pg_ctl" -D "$origin" stop -m fast >/dev/null
  printf '%-34s %16s %16s\n' "$label" "$(mb $((r1 - r0)))" "$(mb $((r2 - r1)))"
  echo $((r2 - r1)) > "$WORK/clone-bytes-$label"
}

echo
printf '%-34s %16s %16s\n' "dedup domains (isolated: default)" "origin backup" "clone backup"
mode isolated
mode shared --shared-dedup-domain "family=origin,clone"
ISO=$(cat "$WORK/clone-bytes-isolated")
SHARED=$(cat "$WORK/clone-bytes-shared")
python3 -c "print(f'clone backup stored with isolation / shared: {$ISO/max($SHARED,1):.1f}x ({($ISO-$SHARED)/1e6:,.1f} MB more)')"
