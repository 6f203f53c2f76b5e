#!/usr/bin/env bash
# Crash campaign: kill -9 the Klio server, the streamer or PostgreSQL at random moments under
# pgbench with synchronous archiving (synchronous_standby_names = 'klio'), and check after each
# kill that everything Klio had acknowledged as durably stored is in the archive.
#
#   bash bench/crash.sh               # 200 trials
#   TRIALS=50 bash bench/crash.sh
#
# What "acknowledged" means here: the flush position Klio reported to PostgreSQL
# (pg_stat_replication.flush_lsn of application_name klio), sampled every 50 ms while pgbench
# runs; with synchronous commit a transaction returns only once that position covers it. After
# the killed process is back, the archive's end (klio wal-list) must be at or past the highest
# position reported before the kill. Prints: trials, kills per target, acknowledged WAL lost
# (must be 0), and the server's verdict on the archive at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
PG_BIN="${KLIO_PG_BIN:-/usr/lib/postgresql/15/bin}"
TRIALS="${TRIALS:-200}"
WORK="$(mktemp -d /var/tmp/klio-bench-crash-XXXXXX)"
chown postgres:postgres "$WORK"
source bench/lib.sh

cargo build --release --locked --bin klio >&2
KLIO="$CARGO_TARGET_DIR/release/klio"
lsn_int() { python3 -c 'import sys; h,l=sys.argv[1].split("/"); print((int(h,16)<<32)|int(l,16))' "$1"; }

SERVER=""; STREAMER=""; BENCH=""
cleanup() {
  set +e
  for p in $SERVER $STREAMER $BENCH; do kill -9 "$p" 2>/dev/null; done
  pkill -9 -f "pgbench -h $WORK" 2>/dev/null
  [ -f "$WORK/pg/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" stop -m immediate >/dev/null 2>&1
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

"$KLIO" pki init "$WORK/pki" --cluster crash >/dev/null
head -c 32 /dev/urandom | base64 > "$WORK/key"
WAL_PORT=$(free_port); BASE_PORT=$(free_port); PG_PORT=$(free_port)
export KLIO_SERVER_ADDRESS=127.0.0.1 KLIO_WAL_PORT=$WAL_PORT KLIO_BASE_PORT=$BASE_PORT KLIO_CLUSTER=crash \
  KLIO_CLIENT_CERT="$WORK/pki/client-crash.crt" KLIO_CLIENT_KEY="$WORK/pki/client-crash.key" \
  KLIO_SERVER_CA="$WORK/pki/ca.crt"
start_server() {
  KLIO_LOG=warn "$KLIO" server --data-dir "$WORK/data" --encryption-key-file "$WORK/key" \
    --tls-cert "$WORK/pki/server.crt" --tls-key "$WORK/pki/server.key" --client-ca "$WORK/pki/ca.crt" \
    --wal-listen "127.0.0.1:$WAL_PORT" --base-listen "127.0.0.1:$BASE_PORT" 2>>"$WORK/server.log" &
  SERVER=$!
  for _ in $(seq 1 200); do "$KLIO" wal-list --json >/dev/null 2>&1 && return 0; (exec 3<>"/dev/tcp/127.0.0.1/$WAL_PORT") 2>/dev/null && return 0; sleep 0.05; done
}
start_streamer() {
  KLIO_LOG=warn "$KLIO" wal-stream --pg-dsn "host=$WORK port=$PG_PORT user=postgres dbname=postgres" 2>>"$WORK/stream.log" &
  STREAMER=$!
}
psql_pg() { as_pg "$PG_BIN/psql" -X -At -q -h "$WORK" -p "$PG_PORT" -U postgres -d postgres -c "$1"; }
start_pg() {
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w start >/dev/null
}

init_pg "$WORK/pg" "$PG_PORT"
cat >> "$WORK/pg/postgresql.conf" <<CONF
synchronous_standby_names = 'klio'
synchronous_commit = on
max_wal_size = 1GB
CONF
start_server
start_pg
as_pg "$PG_BIN/pgbench" -i -q -s 5 -h "$WORK" -p "$PG_PORT" -U postgres postgres >/dev/null 2>&1 &
INIT=$!
start_streamer
wait $INIT

LOST=0; KILLS_SERVER=0; KILLS_STREAMER=0; KILLS_PG=0; CHECKED=0
for trial in $(seq 1 "$TRIALS"); do
  # Load, and the highest flush position Klio reports, sampled until the kill.
  as_pg "$PG_BIN/pgbench" -n -c 2 -T 30 -h "$WORK" -p "$PG_PORT" -U postgres postgres >/dev/null 2>&1 &
  BENCH=$!; disown "$BENCH" 2>/dev/null || true
  MAXACK=0
  DEADLINE=$(python3 -c "import random,time; print(time.time() + random.uniform(0.5, 3.0))")
  while python3 -c "import time,sys; sys.exit(0 if time.time() < $DEADLINE else 1)"; do
    f=$(psql_pg "SELECT flush_lsn FROM pg_stat_replication WHERE application_name = 'klio'" 2>/dev/null || true)
    if [ -n "$f" ]; then v=$(lsn_int "$f"); [ "$v" -gt "$MAXACK" ] && MAXACK=$v; fi
    sleep 0.05
  done
  TARGET=$(python3 -c "import random; print(random.choice(['server','streamer','postgres']))")
  case $TARGET in
    server) kill -9 "$SERVER"; { wait "$SERVER"; } 2>/dev/null || true; KILLS_SERVER=$((KILLS_SERVER + 1)); start_server ;;
    streamer) kill -9 "$STREAMER"; { wait "$STREAMER"; } 2>/dev/null || true; KILLS_STREAMER=$((KILLS_STREAMER + 1)); start_streamer ;;
    postgres)
      kill -9 "$(head -1 "$WORK/pg/postmaster.pid")"; KILLS_PG=$((KILLS_PG + 1))
      for _ in $(seq 1 100); do [ -f "$WORK/pg/postmaster.pid" ] && kill -0 "$(head -1 "$WORK/pg/postmaster.pid")" 2>/dev/null || break; sleep 0.05; done
      start_pg ;;
  esac
  pkill -9 -f "pgbench -n -c 2 -T 30 -h $WORK" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$BENCH" 2>/dev/null || break; sleep 0.02; done
  # What was acknowledged must be in the archive, whatever died.
  END=0
  for _ in $(seq 1 200); do
    e=$("$KLIO" wal-list --json 2>/dev/null | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v.get("end_lsn") or "0/0")' 2>/dev/null || echo "0/0")
    END=$(lsn_int "$e")
    [ "$END" -ge "$MAXACK" ] && break
    sleep 0.05
  done
  CHECKED=$((CHECKED + 1))
  if [ "$END" -lt "$MAXACK" ]; then
    LOST=$((LOST + 1))
    echo "trial $trial ($TARGET): acknowledged up to $MAXACK, archive ends at $END" >&2
  fi
  [ $((trial % 20)) -eq 0 ] && echo "$trial trials, $LOST with acknowledged WAL lost" >&2
done

VERIFY=$("$KLIO" wal-list --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(len(v.get("files", [])), "files, timeline", v.get("timeline"), "end", v.get("end_lsn"))')
cat <<REPORT

== crash campaign: $CHECKED trials under synchronous archiving ==
kills: server $KILLS_SERVER, streamer $KILLS_STREAMER, PostgreSQL $KILLS_PG
trials where acknowledged WAL was missing from the archive: $LOST (must be 0)
archive after the campaign: $VERIFY
REPORT
[ "$LOST" -eq 0 ]
