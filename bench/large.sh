#!/usr/bin/env bash
# A database larger than any single gRPC message or in-memory list of its pages: a PGDATA
# whose relation files total more than 20 GiB, backed up, verified and restored by a real
# Klio server; prints wall times and the peak RSS of the server and of each client.
#
#   bash bench/large.sh              # 21 GiB of relation files
#   GIB=4 bash bench/large.sh        # smaller
#
# The data is cheap to build: one table whose segment files are extended with zeroed pages
# while PostgreSQL is stopped (all-zero pages are valid, and PostgreSQL reads them as new
# pages). The block ids of every page still travel: 32 bytes per 8 KiB page, ~88 MB for 21
# GiB, where a whole-manifest message was capped at 64 MiB (~16 GiB of pages). Checks: the
# restored relation files have the sizes and contents of the originals, and the restored
# cluster starts and counts the table's rows. Targets (issue 15): client and server peak RSS
# under 256 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
PG_BIN="${KLIO_PG_BIN:-/usr/lib/postgresql/15/bin}"
GIB="${GIB:-21}"
WORK="$(mktemp -d /var/tmp/klio-bench-large-XXXXXX)"
chown postgres:postgres "$WORK"

cargo build --release --locked --bin klio >&2
KLIO="$CARGO_TARGET_DIR/release/klio"

# shellcheck source=bench/lib.sh
. bench/lib.sh
# Runs a command, prints its wall time in seconds; its peak RSS (KiB) goes to $WORK/rss.
timed() {
  local t0; t0=$(now)
  /usr/bin/time -f "%M" -o "$WORK/rss" "$@" > "$WORK/last.out" 2> "$WORK/last.err" || {
    cat "$WORK/last.err" >&2; return 1; }
  elapsed "$t0"
}
client_rss() { python3 -c "print(f'{int(open(\"$WORK/rss\").read().split()[-1])/1024:.0f}')"; }

PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for d in "$WORK"/pg "$WORK"/restored; do [ -f "$d/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1; done
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== setup: PostgreSQL 15 with a table of $GIB GiB, Klio server and streamer" >&2
"$KLIO" pki init "$WORK/pki" --cluster large >/dev/null
# The restored cluster runs klio wal-get as postgres.
chown -R postgres:postgres "$WORK/pki"
head -c 32 /dev/urandom | base64 > "$WORK/key"
WAL_PORT=$(free_port); BASE_PORT=$(free_port); PG_PORT=$(free_port)
CLIENT=(--server-address 127.0.0.1 --wal-port "$WAL_PORT" --base-port "$BASE_PORT" --cluster large
  --client-cert "$WORK/pki/client-large.crt" --client-key "$WORK/pki/client-large.key" --server-ca "$WORK/pki/ca.crt")
init_pg "$WORK/pg" "$PG_PORT"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w start >/dev/null
PSQL=("$PG_BIN/psql" -X -At -h "$WORK" -p "$PG_PORT" -U postgres -d postgres)
"${PSQL[@]}" -c "CREATE TABLE big (id int, payload text); INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 1000) g; CHECKPOINT" >/dev/null
REL=$("${PSQL[@]}" -c "SELECT pg_relation_filepath('big')")
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -w stop >/dev/null
# Extend the table to $GIB GiB of zeroed pages: full 1 GiB segments, sparse on disk.
SEG=$((1024 * 1024 * 1024))
as_pg truncate -s "$SEG" "$WORK/pg/$REL"
for ((i = 1; i < GIB; i++)); do as_pg truncate -s "$SEG" "$WORK/pg/$REL.$i"; done
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w start >/dev/null
ROWS=$("${PSQL[@]}" -c "SELECT count(*) FROM big")
REL_BYTES=$(du -cb --apparent-size "$WORK/pg/$REL"* | tail -1 | cut -f1)
echo "table big: $ROWS rows, relation files $(python3 -c "print(f'{$REL_BYTES/2**30:.1f} GiB')")" >&2

"$KLIO" server --data-dir "$WORK/klio" --encryption-key-file "$WORK/key" --tls-cert "$WORK/pki/server.crt" \
  --tls-key "$WORK/pki/server.key" --client-ca "$WORK/pki/ca.crt" --wal-listen "127.0.0.1:$WAL_PORT" \
  --base-listen "127.0.0.1:$BASE_PORT" 2> "$WORK/server.log" &
SERVER=$!; PIDS+=("$SERVER")
"$KLIO" wal-stream "${CLIENT[@]}" --pg-dsn "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" 2> "$WORK/wal-stream.log" &
PIDS+=("$!")
sleep 2
SERVER_START_RSS=$(rss_mb "$SERVER")

row() { printf '%-36s %10s %14s %s\n' "$1" "$2" "$3" "${4:-}"; }
echo
row "" "seconds" "client RSS" "server RSS (peak so far)"
T=$(timed "$KLIO" backup "${CLIENT[@]}" --pg-dsn "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" --pgdata "$WORK/pg" --jobs 2 --json --no-retention)
ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["backup_id"])' "$WORK/last.out")
row "klio backup --jobs 2" "$T" "$(client_rss) MB" "$(peak_rss_mb "$SERVER") MB"
T=$(timed "$KLIO" verify "${CLIENT[@]}" --backup-id "$ID")
row "klio verify" "$T" "$(client_rss) MB" "$(peak_rss_mb "$SERVER") MB"
T=$(timed "$KLIO" restore "${CLIENT[@]}" --pgdata "$WORK/restored" --backup-id "$ID" --target-immediate --jobs 2)
row "klio restore --jobs 2" "$T" "$(client_rss) MB" "$(peak_rss_mb "$SERVER") MB"
echo "server RSS at start: $SERVER_START_RSS MB"

echo "== checks" >&2
for f in "$WORK/pg/$REL"*; do
  g="$WORK/restored/${f#"$WORK/pg/"}"
  [ "$(stat -c %s "$f")" = "$(stat -c %s "$g")" ] || { echo "size differs: $g" >&2; exit 1; }
  cmp -s "$f" "$g" || { echo "content differs: $g" >&2; exit 1; }
done
sed -i "s/^port = .*/port = $(free_port)/" "$WORK/restored/postgresql.conf"
chown -R postgres:postgres "$WORK/restored"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/restored" -l "$WORK/restored.log" -w -t 300 start >/dev/null || {
  tail -20 "$WORK/restored.log" >&2; exit 1; }
RPORT=$(awk '/^port = / {print $3}' "$WORK/restored/postgresql.conf" | tail -1)
for _ in $(seq 1 120); do
  R=$("$PG_BIN/psql" -X -At -h "$WORK" -p "$RPORT" -U postgres -d postgres -c "SELECT NOT pg_is_in_recovery()" 2>/dev/null || true)
  [ "$R" = t ] && break; sleep 1
done
RROWS=$("$PG_BIN/psql" -X -At -h "$WORK" -p "$RPORT" -U postgres -d postgres -c "SELECT count(*) FROM big")
[ "$RROWS" = "$ROWS" ] || { echo "restored table has $RROWS rows, not $ROWS" >&2; exit 1; }
echo "OK: $(python3 -c "print(f'{$REL_BYTES/2**30:.1f}')") GiB of relation files restored byte for byte; the restored cluster counts $RROWS rows"
