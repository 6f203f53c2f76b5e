#!/usr/bin/env bash
# The README's first command: builds klio, starts a Klio server and a local PostgreSQL 15,
# streams its WAL into the archive, takes a base backup with `klio backup` while pgbench
# runs, then restores it with `klio restore` into a new directory to a point in time
# (recovery fetches WAL with `klio wal-get`), starts it and checks that the data matches
# that point. Everything lives in one work
# directory and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
PG_BIN="${KLIO_PG_BIN:-/usr/lib/postgresql/15/bin}"
WORK="${KLIO_QUICKSTART_DIR:-$(mktemp -d /tmp/klio-quickstart-XXXXXX)}"
CLUSTER=quickstart

step() { printf '\n== %s\n' "$*"; }

if [ ! -x "$PG_BIN/postgres" ]; then
  echo "PostgreSQL 15 not found in $PG_BIN; installing postgresql-15" >&2
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15
fi

step "build klio"
cargo build --locked --bin klio
KLIO="$CARGO_TARGET_DIR/debug/klio"

# PostgreSQL refuses to run as root: run its binaries as the postgres user when needed.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mkdir -p "$WORK"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$WORK"
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for d in "$WORK/pg" "$WORK/restored"; do
    [ -f "$d/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$d" stop -m fast >/dev/null 2>&1
  done
  wait 2>/dev/null
  echo "work directory: $WORK (logs: *.log)"
}
trap cleanup EXIT

step "certificates and encryption key"
"$KLIO" pki init "$WORK/pki" --cluster "$CLUSTER"
[ "$(id -u)" = 0 ] && chown -R postgres:postgres "$WORK/pki"
head -c 32 /dev/urandom | base64 > "$WORK/encryption.key"
chmod 600 "$WORK/encryption.key"

step "start the Klio server"
WAL_PORT=$(free_port)
BASE_PORT=$(free_port)
"$KLIO" server --data-dir "$WORK/klio-data" --encryption-key-file "$WORK/encryption.key" \
  --tls-cert "$WORK/pki/server.crt" --tls-key "$WORK/pki/server.key" --client-ca "$WORK/pki/ca.crt" \
  --wal-listen "127.0.0.1:$WAL_PORT" --base-listen "127.0.0.1:$BASE_PORT" 2> "$WORK/server.log" &
PIDS+=($!)
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$WAL_PORT") 2>/dev/null && break; sleep 0.1; done

CLIENT=(--server-address 127.0.0.1 --wal-port "$WAL_PORT" --base-port "$BASE_PORT" --cluster "$CLUSTER"
  --client-cert "$WORK/pki/client-$CLUSTER.crt" --client-key "$WORK/pki/client-$CLUSTER.key"
  --server-ca "$WORK/pki/ca.crt")

step "start PostgreSQL 15"
PG_PORT=$(free_port)
as_pg "$PG_BIN/initdb" -D "$WORK/pg" -k -U postgres -A trust >/dev/null
cat >> "$WORK/pg/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = replica
max_wal_senders = 10
wal_keep_size = '1GB'
CONF
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w start >/dev/null
PSQL=("$PG_BIN/psql" -X -At -h "$WORK" -p "$PG_PORT" -U postgres -d postgres)

step "stream WAL to Klio (klio wal-stream)"
"$KLIO" wal-stream "${CLIENT[@]}" --pg-dsn "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" 2> "$WORK/wal-stream.log" &
PIDS+=($!)
for _ in $(seq 100); do "$KLIO" wal-list "${CLIENT[@]}" --json 2>/dev/null | grep -q '"end_lsn": "' && break; sleep 0.2; done

step "load data, then take a base backup (klio backup) while pgbench runs"
as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -i -q -s 10 postgres
as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -c 4 -j 2 -T 15 postgres > "$WORK/pgbench.out" &
PGBENCH=$!
sleep 2
"$KLIO" backup "${CLIENT[@]}" --pg-dsn "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" --pgdata "$WORK/pg"
wait "$PGBENCH"
grep -E "tps|processed" "$WORK/pgbench.out"
"$KLIO" backups list "${CLIENT[@]}"

step "mark a point in time, then change more"
"${PSQL[@]}" -c "CREATE TABLE quickstart_marker (note text); INSERT INTO quickstart_marker VALUES ('before the target')"
EXPECTED=$("${PSQL[@]}" -c "SELECT md5(string_agg(h::text, ',' ORDER BY h::text)) FROM pgbench_history h")
TARGET=$("${PSQL[@]}" -c "SELECT now()")
sleep 1
"${PSQL[@]}" -c "INSERT INTO quickstart_marker VALUES ('after the target'); DELETE FROM pgbench_history WHERE mtime > now() - interval '5 seconds'"
as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -c 2 -T 3 postgres >/dev/null
END_LSN=$("${PSQL[@]}" -c "SELECT pg_switch_wal()")
echo "target time: $TARGET; WAL written up to $END_LSN"
for _ in $(seq 300); do
  ARCHIVED=$("$KLIO" wal-list "${CLIENT[@]}" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["end_lsn"])')
  python3 - "$ARCHIVED" "$END_LSN" <<'PY' && break
import sys
def lsn(s): hi, lo = s.split("/"); return (int(hi, 16) << 32) | int(lo, 16)
sys.exit(0 if lsn(sys.argv[1]) >= lsn(sys.argv[2]) else 1)
PY
  sleep 0.2
done
"$KLIO" wal-list "${CLIENT[@]}" | sed -n '1,8p'

step "restore to $TARGET (klio restore; recovery fetches WAL with klio wal-get)"
"$KLIO" restore "${CLIENT[@]}" --pgdata "$WORK/restored" --target-time "$TARGET"
RESTORE_PORT=$(free_port)
echo "port = $RESTORE_PORT" >> "$WORK/restored/postgresql.auto.conf"
[ "$(id -u)" = 0 ] && chown -R postgres:postgres "$WORK/restored"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/restored" -l "$WORK/restored.log" -w start >/dev/null
RPSQL=("$PG_BIN/psql" -X -At -h "$WORK" -p "$RESTORE_PORT" -U postgres -d postgres)
for _ in $(seq 600); do [ "$("${RPSQL[@]}" -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ] && break; sleep 0.2; done

step "check"
GOT=$("${RPSQL[@]}" -c "SELECT md5(string_agg(h::text, ',' ORDER BY h::text)) FROM pgbench_history h")
MARKER=$("${RPSQL[@]}" -c "SELECT string_agg(note, ',') FROM quickstart_marker")
echo "restored quickstart_marker: $MARKER"
echo "pgbench_history md5 at the target: $EXPECTED"
echo "pgbench_history md5 restored:      $GOT"
if [ "$GOT" = "$EXPECTED" ] && [ "$MARKER" = "before the target" ]; then
  echo "OK: the restored cluster matches the source at $TARGET"
else
  echo "MISMATCH: see $WORK/restored.log" >&2
  exit 1
fi
