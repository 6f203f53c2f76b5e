#!/usr/bin/env bash
# Base-backup benchmark: klio backup / restore against pg_basebackup, pgBackRest and restic
# on the same PostgreSQL data, in one run, then prints the figures and ratios.
#
#   bash bench/backup.sh                 # scale 200 (about 3.2 GB), pgbench -c4 -T60 between backups
#   SCALE=50 SECS=20 bash bench/backup.sh
#
# Measures: full backup wall time and bytes stored (pg_basebackup -Fp and -Ft -z, pgBackRest
# full with process-max 2 and zstd / lz4, restic, klio --jobs 2); after a pgbench run: the
# incremental bytes and time (pgBackRest incr, restic's second snapshot, klio's second
# backup) and the compressed size of the pages that really changed; after appends to one
# table (localized changes) the same; restore wall time (pgBackRest process-max 2, klio
# --jobs 2, klio --delta onto the restored directory); peak RSS of the klio server and
# client. Targets (issue 3): full <= 0.67x pgBackRest's best; incremental bytes <= 0.35x
# pgBackRest incr and restic, <= 1.2x the compressed changed pages; restore <= 0.67x
# pgBackRest; server <= 256 MiB, client <= 128 MiB RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
PG_BIN="${KLIO_PG_BIN:-/usr/lib/postgresql/15/bin}"
SCALE="${SCALE:-200}"
SECS="${SECS:-60}"
WORK="$(mktemp -d /var/tmp/klio-bench-backup-XXXXXX)"
chown postgres:postgres "$WORK"

for tool in pgbackrest restic; do
  if ! command -v "$tool" >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbackrest restic >&2
  fi
done

cargo build --release --locked --bin klio >&2
KLIO="$CARGO_TARGET_DIR/release/klio"

# shellcheck source=bench/lib.sh
source bench/lib.sh
# Whole megabytes in this script's tables.
mb() { python3 -c "print(f'{$1/1e6:,.0f} MB')"; }
ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }
# Runs a command, prints its wall time in seconds; the client's peak RSS goes to $WORK/rss.
timed() {
  local t0; t0=$(now)
  /usr/bin/time -f "%M" -o "$WORK/rss" "$@" > "$WORK/last.out" 2> "$WORK/last.err" || {
    cat "$WORK/last.err" >&2; return 1; }
  elapsed "$t0"
}

PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for d in "$WORK"/pg "$WORK"/r-*; do [ -f "$d/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1; done
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== setup: PostgreSQL 15, pgbench scale $SCALE, Klio server and streamer, pgBackRest stanza, restic repository" >&2
start_klio_server

mkdir -p "$WORK/pgbackrest/repo" "$WORK/pgbackrest/log" "$WORK/pgbackrest/spool"
PG_PORT=$(free_port)
cat > "$WORK/pgbackrest.conf" <<CONF
[global]
repo1-path=$WORK/pgbackrest/repo
repo1-retention-full=10
log-path=$WORK/pgbackrest/log
spool-path=$WORK/pgbackrest/spool
lock-path=$WORK/pgbackrest/lock
start-fast=y
process-max=2
log-level-console=warn

[bench]
pg1-path=$WORK/pg
pg1-port=$PG_PORT
pg1-socket-path=$WORK
pg1-user=postgres
CONF
chown -R postgres:postgres "$WORK"
PGBR=(pgbackrest --config="$WORK/pgbackrest.conf" --stanza=bench)

as_pg "$PG_BIN/initdb" -D "$WORK/pg" -k -U postgres -A trust >/dev/null
cat >> "$WORK/pg/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = replica
max_wal_senders = 10
max_wal_size = 4GB
shared_buffers = 512MB
archive_mode = on
archive_command = 'pgbackrest --config=$WORK/pgbackrest.conf --stanza=bench archive-push %p'
CONF
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w start >/dev/null
PSQL=("$PG_BIN/psql" -X -At -h "$WORK" -p "$PG_PORT" -U postgres -d postgres)
as_pg "${PGBR[@]}" stanza-create >&2
"$KLIO" wal-stream "${CLIENT[@]}" --pg-dsn "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" 2> "$WORK/wal-stream.log" &
PIDS+=($!)
as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -i -q -s "$SCALE" postgres >&2
"${PSQL[@]}" -c "CREATE TABLE appendlog (id bigserial primary key, payload text); INSERT INTO appendlog (payload) SELECT md5(g::text) || repeat('x', 100) FROM generate_series(1, 2000000) g" >/dev/null
# Freeze now, so that autovacuum does not rewrite every page between the measured backups.
"${PSQL[@]}" -c "VACUUM (FREEZE, ANALYZE)" -c "CHECKPOINT" >/dev/null
DB_SIZE=$("${PSQL[@]}" -c "SELECT sum(pg_database_size(oid)) FROM pg_database")
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY="$WORK/restic" RESTIC_CACHE_DIR="$WORK/restic-cache"
restic init -q >&2
KB=(--pg-dsn "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" --pgdata "$WORK/pg" --jobs 2 --json)
echo "database size: $(mb "$DB_SIZE")" >&2

kinfo() { python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print("%d of %d blocks new, %.0f MB before compression" % (m["blocks_new"], m["blocks_total"], m["plain_bytes_new"]/1e6))' "$WORK/last.out"; }
row() { printf '%-44s %10s %14s %s\n' "$1" "$2" "$3" "${4:-}"; }
echo
row "FULL BACKUP" "seconds" "stored" ""
T=$(timed runuser -u postgres -- "$PG_BIN/pg_basebackup" -h "$WORK" -p "$PG_PORT" -U postgres -D "$WORK/bb-plain" -Fp -X none -c fast)
row "pg_basebackup -Fp" "$T" "$(mb "$(du_b "$WORK/bb-plain")")"
T_BBZ=$(timed runuser -u postgres -- "$PG_BIN/pg_basebackup" -h "$WORK" -p "$PG_PORT" -U postgres -D "$WORK/bb-tgz" -Ft -z -X none -c fast)
row "pg_basebackup -Ft -z" "$T_BBZ" "$(mb "$(du_b "$WORK/bb-tgz")")"
rm -rf "$WORK/bb-tgz"
B0=$(du_b "$WORK/pgbackrest/repo/backup")
T_LZ4=$(timed runuser -u postgres -- "${PGBR[@]}" backup --type=full --compress-type=lz4)
B1=$(du_b "$WORK/pgbackrest/repo/backup")
row "pgBackRest full (process-max 2, lz4)" "$T_LZ4" "$(mb $((B1 - B0)))"
T_ZST=$(timed runuser -u postgres -- "${PGBR[@]}" backup --type=full --compress-type=zst --compress-level=1)
B2=$(du_b "$WORK/pgbackrest/repo/backup")
row "pgBackRest full (process-max 2, zstd-1)" "$T_ZST" "$(mb $((B2 - B1)))"
T_RESTIC=$(timed restic backup -q "$WORK/pg")
R1=$(du_b "$WORK/restic")
row "restic (first snapshot)" "$T_RESTIC" "$(mb "$R1")"
reset_peak() { echo 5 > "/proc/$1/clear_refs" 2>/dev/null || true; } # VmHWM := current RSS
PEAK_START=$(peak_rss_mb "$SERVER")
reset_peak "$SERVER"
# What each backup adds to the repository, counted like the peers' (du -sb): packs, index
# objects, blocklists and the manifest.
KREPO="$WORK/klio/repository"
K0=$(du_b "$KREPO")
T_KLIO=$(timed "$KLIO" backup "${CLIENT[@]}" "${KB[@]}")
PEAK_FULL=$(peak_rss_mb "$SERVER"); reset_peak "$SERVER"
KLIO_RSS1=$(( $(cat "$WORK/rss") / 1024 ))
KR1=$(du_b "$KREPO"); K1=$((KR1 - K0))
row "klio backup --jobs 2" "$T_KLIO" "$(mb "$K1")" "client peak RSS ${KLIO_RSS1} MB"
BEST=$(python3 -c "print(min($T_LZ4, $T_ZST))")
echo "klio full / pgBackRest best: $(ratio "$T_KLIO" "$BEST")  (target <= 0.67x)"
echo "klio full stored / pgBackRest zstd-1 stored: $(ratio "$K1" "$((B2 - B1))")  (target <= 1.0x)"

echo
echo "== pgbench -c4 -j2 -T$SECS (random page updates)" >&2
as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -c 4 -j 2 -T "$SECS" postgres | grep -E "^tps" >&2
"${PSQL[@]}" -c "CHECKPOINT" >/dev/null
# The pages that really changed: compare two plain copies page by page.
as_pg "$PG_BIN/pg_basebackup" -h "$WORK" -p "$PG_PORT" -U postgres -D "$WORK/bb-after" -Fp -X none -c fast
python3 - "$WORK/bb-plain" "$WORK/bb-after" "$WORK/changed-pages" <<'PY'
import os, sys
a, b, out = sys.argv[1:4]
pages = changed = 0
with open(out, "wb") as o:
    for root, _, files in os.walk(b):
        for f in files:
            pb = os.path.join(root, f)
            rel = os.path.relpath(pb, b)
            if rel in ("backup_label", "backup_manifest") or rel.startswith("pg_wal"):
                continue
            pa = os.path.join(a, rel)
            with open(pb, "rb") as fb:
                db = fb.read()
            da = open(pa, "rb").read() if os.path.exists(pa) else b""
            for i in range(0, len(db), 8192):
                pages += 1
                if db[i:i+8192] != da[i:i+8192]:
                    changed += 1
                    o.write(db[i:i+8192])
print(f"{changed} of {pages} pages changed ({100*changed/max(pages,1):.1f}%)", file=sys.stderr)
PY
CHANGED_Z=$(zstd -1 -c "$WORK/changed-pages" | wc -c)
# The same pages compressed one by one (what any page-granular store can at best keep).
mkdir -p "$WORK/pages"
split -b 8192 -a 6 "$WORK/changed-pages" "$WORK/pages/p"
zstd -q -1 --rm -r "$WORK/pages"
CHANGED_PZ=$(find "$WORK/pages" -type f -printf "%s\n" | awk "{s+=\$1} END {print s}")
rm -rf "$WORK/pages"
rm -rf "$WORK/bb-plain" "$WORK/changed-pages"
row "INCREMENTAL (after pgbench)" "seconds" "stored"
T=$(timed runuser -u postgres -- "${PGBR[@]}" backup --type=incr --compress-type=lz4)
B3=$(du_b "$WORK/pgbackrest/repo/backup")
PGBR_INCR=$((B3 - B2))
row "pgBackRest incr (lz4)" "$T" "$(mb "$PGBR_INCR")"
T=$(timed restic backup -q "$WORK/pg")
R2=$(du_b "$WORK/restic")
RESTIC_INCR=$((R2 - R1))
row "restic (second snapshot)" "$T" "$(mb "$RESTIC_INCR")"
T=$(timed "$KLIO" backup "${CLIENT[@]}" "${KB[@]}")
KR2=$(du_b "$KREPO"); K2=$((KR2 - KR1))
row "klio backup (second)" "$T" "$(mb "$K2")" "$(kinfo)"
row "changed pages, zstd -1 as one stream" "" "$(mb "$CHANGED_Z")"
row "changed pages, zstd -1 page by page" "" "$(mb "$CHANGED_PZ")"
echo "klio incr / pgBackRest incr: $(ratio "$K2" "$PGBR_INCR"), / restic: $(ratio "$K2" "$RESTIC_INCR")  (target <= 0.35x)"
echo "klio incr / compressed changed pages: $(ratio "$K2" "$CHANGED_Z") as one stream (target <= 1.0x), $(ratio "$K2" "$CHANGED_PZ") page by page"

echo
echo "== appends to one table (localized changes)" >&2
"${PSQL[@]}" -c "INSERT INTO appendlog (payload) SELECT md5(g::text) || repeat('y', 100) FROM generate_series(1, 100000) g; CHECKPOINT" >/dev/null
row "INCREMENTAL (after appending 100k rows)" "seconds" "stored"
T=$(timed runuser -u postgres -- "${PGBR[@]}" backup --type=incr --compress-type=lz4)
B4=$(du_b "$WORK/pgbackrest/repo/backup")
row "pgBackRest incr (lz4)" "$T" "$(mb $((B4 - B3)))"
T=$(timed restic backup -q "$WORK/pg")
R3=$(du_b "$WORK/restic")
row "restic (third snapshot)" "$T" "$(mb $((R3 - R2)))"
T=$(timed "$KLIO" backup "${CLIENT[@]}" "${KB[@]}")
KR3=$(du_b "$KREPO"); K3=$((KR3 - KR2))
row "klio backup (third)" "$T" "$(mb "$K3")" "$(kinfo)"
PEAK_INCR=$(peak_rss_mb "$SERVER"); reset_peak "$SERVER"

echo
row "RESTORE (files only, no WAL replay)" "seconds" ""
T_PGBR_R=$(timed runuser -u postgres -- "${PGBR[@]}" restore --pg1-path="$WORK/r-pgbackrest" --process-max=2)
row "pgBackRest restore (process-max 2)" "$T_PGBR_R" ""
rm -rf "$WORK/r-pgbackrest"
T_KLIO_R=$(timed "$KLIO" restore "${CLIENT[@]}" --pgdata "$WORK/r-klio" --jobs 2)
KLIO_RSS2=$(( $(cat "$WORK/rss") / 1024 ))
row "klio restore --jobs 2" "$T_KLIO_R" "" "client peak RSS ${KLIO_RSS2} MB"
PEAK_RESTORE=$(peak_rss_mb "$SERVER")
# The full restore wrote with direct I/O, so nothing of it is in the page cache: the delta
# restore reads the directory from disk (cold), then again from the page cache (warm).
sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null && COLD="cold cache" || COLD="page cache not dropped"
T=$(timed "$KLIO" restore "${CLIENT[@]}" --pgdata "$WORK/r-klio" --jobs 2 --delta)
row "klio restore --delta (same directory, $COLD)" "$T" ""
T_DELTA=$(timed "$KLIO" restore "${CLIENT[@]}" --pgdata "$WORK/r-klio" --jobs 2 --delta)
row "klio restore --delta (same directory, warm)" "$T_DELTA" ""
echo "klio restore / pgBackRest restore: $(ratio "$T_KLIO_R" "$T_PGBR_R")  (target <= 0.67x)"
echo "klio delta restore (warm) / klio full restore: $(ratio "$T_DELTA" "$T_KLIO_R")  (target <= 0.2x)"
echo
PEAK_DELTA=$(peak_rss_mb "$SERVER")
PEAK_ALL=$(python3 -c "print(max(int(x) for x in '$PEAK_START $PEAK_FULL $PEAK_INCR $PEAK_RESTORE $PEAK_DELTA'.split() if x.isdigit()))")
echo "peak RSS: klio server $PEAK_ALL MB over the run (target <= 256): setup $PEAK_START, full backup $PEAK_FULL, incrementals $PEAK_INCR, restore $PEAK_RESTORE, delta restores $PEAK_DELTA; klio client backup ${KLIO_RSS1} MB / restore ${KLIO_RSS2} MB (target <= 128)"
echo "klio repository on disk: $(mb "$(du_b "$WORK/klio/repository")")"
