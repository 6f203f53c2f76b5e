#!/usr/bin/env bash
# Tier 2 (S3) relay benchmark: how fast a Klio server copies backups and WAL from Tier 1 to
# an S3-compatible bucket (moto, in memory, on loopback), in one run, then prints the
# figures as lines starting with "RESULT ".
#
#   bash bench/tier2.sh                               # scale 50, 1000 WAL segments
#   SCALE=10 SEGMENTS=200 bash bench/tier2.sh         # a quick run
#   KLIO_BIN=/path/to/klio bash bench/tier2.sh        # no build, use that binary
#
# Measures:
#  1. Backup relay throughput: a pgbench database (SCALE), `klio backup --tier2-backup`
#     (--no-retention, so that nothing but the relay runs after the commit), then the time
#     from the commit (the server log's "backup committed" line; the commit enqueues the
#     relay) until `klio backups list --tier2-recovery` shows it in_tier2 (polled every
#     0.2 s); MB/s of the backup's stored bytes (bytes_new), beside the raw speed of putting
#     the same number of bytes into moto with boto3 as 32 MiB objects (Klio's pack size)
#     from 1 and from 8 threads. Also printed: the time from the end of the klio backup
#     command, the server log's commit -> "relayed" interval, the objects the relay wrote.
#  2./3. WAL backlog: SEGMENTS segments (each: rows of random md5 text making about SEG_KB
#     KiB of WAL, then pg_switch_wal()) streamed into Tier 1 of two fresh servers (each
#     with its own moto and bucket) whose wal-stream runs without --tier2-backup, so nothing
#     is relayed; then, one server at a time, wal-stream is restarted with --tier2-backup and the time until
#     `klio admin queue status` shows last_wal_relayed at the last segment and pending 0 is
#     measured: with --tier2-relay-jobs 1 and with --tier2-relay-jobs 8. Per-object cost:
#     seconds per segment and MB/s; beside boto3 putting as many objects of the same mean
#     size into moto from 1 and from 8 threads.
#  4. Retention and GC: 6 backups (Tier 1 only, a server without Tier 2) with pgbench
#     -T GC_SECS between them, then `klio retention run --keep-latest 3` (the other rules set
#     to 0, so that exactly 3 backups expire whatever the clock says): its wall time,
#     gc.bytes_reclaimed, and `du -sb <data-dir>/repository` before and after.
#  5. Peak RSS (VmHWM) of the klio server in each phase; the peak is reset (clear_refs 5)
#     when the measured part of the phase starts.
#
# Knobs (environment): SCALE (50), SEGMENTS (1000), SEG_KB (2048: WAL of the data inserted
# per segment, about half of it md5 text, which zstd halves again), GC_SECS (10), RELAY_INTERVAL (1: --tier2-relay-interval, seconds; the
# server default is 10), BACKUP_JOBS (2: klio backup --jobs), KLIO_BIN (default: build
# with cargo and use $CARGO_TARGET_DIR/release/klio), KLIO_PG_BIN, KEEP_LOGS (a directory
# the server, wal-stream, moto and PostgreSQL logs are copied to before the cleanup).
# Needs: PostgreSQL 15 binaries, python3 with moto[server] and boto3; runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
PG_BIN="${KLIO_PG_BIN:-/usr/lib/postgresql/15/bin}"
SCALE="${SCALE:-50}"
SEGMENTS="${SEGMENTS:-1000}"
SEG_KB="${SEG_KB:-2048}"
GC_SECS="${GC_SECS:-10}"
RELAY_INTERVAL="${RELAY_INTERVAL:-1}"
BACKUP_JOBS="${BACKUP_JOBS:-2}"
T_START=$(date +%s.%N)

if [ -z "${KLIO_BIN:-}" ]; then
  cargo build --release --locked --bin klio >&2
  KLIO_BIN="$CARGO_TARGET_DIR/release/klio"
fi
KLIO="$KLIO_BIN"
[ -x "$KLIO" ] || { echo "no klio binary at $KLIO (set KLIO_BIN)" >&2; exit 1; }
python3 -c "import boto3, moto.server" 2>/dev/null || {
  echo "needs python3 with boto3 and moto[server] (pip install 'moto[server]' boto3)" >&2; exit 1; }

WORK="$(mktemp -d /var/tmp/klio-bench-tier2-XXXXXX)"
chown postgres:postgres "$WORK"
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1

as_pg() { runuser -u postgres -- "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$(now) - $1:.1f}')"; }
calc() { python3 -c "print($1)"; }
du_b() { du -sb "$1" | cut -f1; }
mb() { python3 -c "print(f'{$1/1e6:,.1f} MB')"; }
peak_rss_mb() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
rss_mb() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
# Resets VmHWM to the current RSS, so that the peak read later is the peak of what follows;
# prints that current RSS (MB).
reset_peak() {
  echo 5 > "/proc/$1/clear_refs" 2>/dev/null || echo "warning: cannot reset the peak RSS of $1; VmHWM counts from the start" >&2
  rss_mb "$1"
}
lsn_to_int() { python3 -c 'import sys; h,l=sys.argv[1].split("/"); print((int(h,16)<<32)|int(l,16))' "$1"; }
# Runs a command, prints its wall time in seconds; output in $WORK/last.out and last.err.
timed() {
  local t0; t0=$(now)
  "$@" > "$WORK/last.out" 2> "$WORK/last.err" || { cat "$WORK/last.err" >&2; return 1; }
  elapsed "$t0"
}

PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  [ -f "$WORK/pg/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" stop -m immediate >/dev/null 2>&1
  wait 2>/dev/null
  if [ -n "${KEEP_LOGS:-}" ]; then mkdir -p "$KEEP_LOGS" && cp "$WORK"/*.log "$WORK"/*.json "$KEEP_LOGS"/ 2>/dev/null; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

"$KLIO" pki init "$WORK/pki" --cluster bench >/dev/null
head -c 32 /dev/urandom | base64 > "$WORK/key"
head -c 32 /dev/urandom | base64 > "$WORK/key2"   # Tier 2's own key: relays reseal

# --- moto: one process per measurement, so that each starts empty ---------------------
declare -A MOTO_PORT MOTO_PID
start_moto() { # $1 = name; the bucket is named after it
  local port; port=$(free_port)
  python3 -m moto.server -H 127.0.0.1 -p "$port" > "$WORK/moto-$1.log" 2>&1 &
  MOTO_PID[$1]=$!; PIDS+=($!); MOTO_PORT[$1]=$port
  for _ in $(seq 200); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
  curl -sf -X PUT -o /dev/null "http://127.0.0.1:$port/$1"
}
stop_moto() { stop_pid "${MOTO_PID[$1]}"; }

# --- klio servers ----------------------------------------------------------------------
declare -A SRV_PID SRV_WAL SRV_BASE
start_server() { # $1 = name (data dir $WORK/$1), then extra server flags
  local name=$1; shift
  SRV_WAL[$name]=$(free_port); SRV_BASE[$name]=$(free_port)
  "$KLIO" server --data-dir "$WORK/$name" --encryption-key-file "$WORK/key" --tls-cert "$WORK/pki/server.crt" \
    --tls-key "$WORK/pki/server.key" --client-ca "$WORK/pki/ca.crt" --wal-listen "127.0.0.1:${SRV_WAL[$name]}" \
    --base-listen "127.0.0.1:${SRV_BASE[$name]}" "$@" 2>> "$WORK/server-$name.log" &
  SRV_PID[$name]=$!; PIDS+=($!)
  for port in "${SRV_WAL[$name]}" "${SRV_BASE[$name]}"; do
    for _ in $(seq 300); do
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
      kill -0 "${SRV_PID[$name]}" 2>/dev/null || { echo "klio server $name exited:" >&2; tail -20 "$WORK/server-$name.log" >&2; exit 1; }
      sleep 0.1
    done
  done
}
tier2_flags() { # $1 = moto name (= bucket), $2 = relay jobs
  echo --tier2-s3-bucket "$1" --tier2-s3-prefix bench --tier2-s3-endpoint "http://127.0.0.1:${MOTO_PORT[$1]}" \
    --tier2-s3-region us-east-1 --tier2-encryption-key-file "$WORK/key2" --tier2-relay-jobs "$2" \
    --tier2-relay-interval "$RELAY_INTERVAL"
}
client() { # $1 = server name: the client flags for cluster bench
  echo --server-address 127.0.0.1 --wal-port "${SRV_WAL[$1]}" --base-port "${SRV_BASE[$1]}" --cluster bench \
    --client-cert "$WORK/pki/client-bench.crt" --client-key "$WORK/pki/client-bench.key" --server-ca "$WORK/pki/ca.crt"
}
admin() { # $1 = server name, then the admin queue subcommand
  local name=$1; shift
  "$KLIO" admin queue "$@" --server-address 127.0.0.1 --base-port "${SRV_BASE[$name]}" \
    --client-cert "$WORK/pki/admin.crt" --client-key "$WORK/pki/admin.key" --server-ca "$WORK/pki/ca.crt"
}

# --- PostgreSQL ------------------------------------------------------------------------
PG_PORT=$(free_port)
as_pg "$PG_BIN/initdb" -D "$WORK/pg" -k -U postgres -A trust >/dev/null
cat >> "$WORK/pg/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
shared_buffers = 512MB
max_wal_size = 4GB
checkpoint_timeout = 15min
CONF
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w start >/dev/null
PSQL=("$PG_BIN/psql" -X -At -h "$WORK" -p "$PG_PORT" -U postgres -d postgres)
DSN="host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres"

declare -A STREAM_PID
start_stream() { # $1 = server name (the slot and application_name are klio_<name>), then extra flags
  local name=$1; shift
  # shellcheck disable=SC2046
  "$KLIO" wal-stream $(client "$name") --pg-dsn "$DSN" --slot "klio_$name" --application-name "klio_$name" "$@" \
    2>> "$WORK/stream-$name.log" &
  STREAM_PID[$name]=$!; PIDS+=($!)
  for _ in $(seq 600); do
    [ "$("${PSQL[@]}" -c "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'klio_$name' AND state = 'streaming'")" = 1 ] && return
    sleep 0.1
  done
  echo "wal-stream to $name did not start streaming:" >&2; tail -20 "$WORK/stream-$name.log" >&2; exit 1
}
stop_stream() { stop_pid "${STREAM_PID[$1]}"; }
drop_slot() { # the walsender may outlive its client by a moment
  for _ in $(seq 100); do
    "${PSQL[@]}" -c "SELECT pg_drop_replication_slot('klio_$1')" >/dev/null 2>&1 && return
    sleep 0.1
  done
  "${PSQL[@]}" -c "SELECT pg_drop_replication_slot('klio_$1')" >/dev/null
}
wait_archived() { # $1 = server name, $2 = LSN: Tier 1's archive reaches it
  local want a; want=$(lsn_to_int "$2")
  for _ in $(seq 36000); do
    # shellcheck disable=SC2046
    a=$("$KLIO" wal-list $(client "$1") --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["end_lsn"] or "0/0")')
    [ "$(lsn_to_int "$a")" -ge "$want" ] && return
    sleep 0.2
  done
  echo "the archive of $1 did not reach $2" >&2; exit 1
}
# Prints "yes" when the relay of cluster bench reached WAL file $2 and the queue is empty.
relay_done() {
  admin "$1" status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
r = [p for p in s["relay"] if p["cluster"] == "bench"]
print("yes" if r and r[0]["last_wal_relayed"] >= sys.argv[1] and s["pending"] == 0 else "no")' "$2" 2>/dev/null || echo no
}
wait_relayed() { # $1 = server name, $2 = WAL file name, $3 = timeout (s)
  local deadline; deadline=$(calc "$(now) + $3")
  while [ "$(relay_done "$1" "$2")" != yes ]; do
    if python3 -c "import sys; sys.exit(0 if $(now) > $deadline else 1)"; then
      echo "the relay of $1 did not reach $2 in $3 s; queue status and server log:" >&2
      admin "$1" status >&2 || true; tail -30 "$WORK/server-$1.log" >&2; exit 1
    fi
    sleep 0.2
  done
}
relay_field() { # $1 = server name, $2 = field of cluster bench's relay progress
  admin "$1" status --json | python3 -c '
import json, sys
print([p for p in json.load(sys.stdin)["relay"] if p["cluster"] == "bench"][0][sys.argv[1]])' "$2"
}
jfield() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# boto3 into moto: $1 = moto name, $2 = total bytes, $3 = bytes per object (the last one
# takes the rest), $4 = threads; prints the wall time in seconds.
raw_put() {
  python3 - "http://127.0.0.1:${MOTO_PORT[$1]}" "$1" "$2" "$3" "$4" <<'PY'
import os, sys, time, boto3, botocore.config
from concurrent.futures import ThreadPoolExecutor
endpoint, bucket, total, size, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  config=botocore.config.Config(max_pool_connections=max(threads, 10)))
body = os.urandom(size)          # incompressible, like sealed packs
sizes = [size] * (total // size) + ([total % size] if total % size else [])
prefix = f"raw-{threads}-{size}"
def put(i):
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{i:06d}", Body=body[:sizes[i]])
t0 = time.time()
with ThreadPoolExecutor(threads) as ex:
    list(ex.map(put, range(len(sizes))))
print(f"{time.time() - t0:.2f}")
PY
}
# Server log: the time (seconds since the epoch) of the first line holding $2 and $3.
log_time() {
  python3 - "$1" "$2" "$3" <<'PY'
import re, sys
from datetime import datetime
path, pattern, key = sys.argv[1:4]
ansi = re.compile(r"\x1b\[[0-9;]*m")
for line in open(path, errors="replace"):
    line = ansi.sub("", line)
    if pattern in line and key in line:
        print(datetime.fromisoformat(line.split()[0].rstrip("Z")[:26] + "+00:00").timestamp())
        break
else:
    print("nan")
PY
}

# ============================================================================================
echo "== 1. backup relay: pgbench scale $SCALE, klio backup --tier2-backup" >&2
start_moto t2backup
# shellcheck disable=SC2046
start_server a $(tier2_flags t2backup 8)
start_stream a --tier2-backup
as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -i -q -s "$SCALE" postgres >/dev/null 2>&1
"${PSQL[@]}" -c "VACUUM (FREEZE, ANALYZE)" -c "CHECKPOINT" >/dev/null
DB_SIZE=$("${PSQL[@]}" -c "SELECT pg_database_size('postgres')")
echo "database: $(mb "$DB_SIZE"); waiting for the WAL of pgbench -i to reach Tier 2 first" >&2
SEG=$("${PSQL[@]}" -c "SELECT pg_walfile_name(pg_switch_wal())")
wait_relayed a "$SEG" 1800
RSS0_A=$(reset_peak "${SRV_PID[a]}")
# shellcheck disable=SC2046
T_BACKUP=$(timed "$KLIO" backup $(client a) --pg-dsn "$DSN" --pgdata "$WORK/pg" --jobs "$BACKUP_JOBS" \
  --tier2-backup --no-retention --json)
T0=$(now)
cp "$WORK/last.out" "$WORK/backup-a.json"
BACKUP_ID=$(jfield "$WORK/backup-a.json" backup_id)
BYTES_NEW=$(jfield "$WORK/backup-a.json" bytes_new)
POLLS=0
while :; do
  # shellcheck disable=SC2046
  if "$KLIO" backups list $(client a) --tier2-recovery --json 2>>"$WORK/poll.err" | python3 -c '
import json, sys
sys.exit(0 if any(b["backup_id"] == sys.argv[1] and b.get("in_tier2") for b in json.load(sys.stdin)) else 1)' "$BACKUP_ID"
  then break; fi
  POLLS=$((POLLS + 1))
  if [ "$POLLS" -gt 9000 ]; then echo "backup $BACKUP_ID not in Tier 2 after 30 min" >&2; tail -30 "$WORK/server-a.log" >&2; exit 1; fi
  sleep 0.2
done
T_END=$(now)
RSS_A=$(peak_rss_mb "${SRV_PID[a]}")
# From the commit (the server's log line) to the first poll that sees the backup in Tier 2.
T_COMMIT=$(log_time "$WORK/server-a.log" "backup committed" "$BACKUP_ID")
T_RELAYED=$(log_time "$WORK/server-a.log" "backup relayed to Tier 2" "$BACKUP_ID")
T_BRELAY=$(calc "round($T_END - $T_COMMIT, 1)")
T_BRELAY_CLIENT=$(calc "round($T_END - $T0, 1)")
T_BRELAY_LOG=$(calc "round($T_RELAYED - $T_COMMIT, 1)")
BRELAY_MBS=$(calc "round($BYTES_NEW / 1e6 / $T_BRELAY, 1)")
echo "backup $BACKUP_ID: $(mb "$BYTES_NEW") stored in ${T_BACKUP}s; seen in Tier 2 ${T_BRELAY}s after the commit, ${T_BRELAY_CLIENT}s after the command returned (server log: ${T_BRELAY_LOG}s from commit to relayed)" >&2
# What the relay wrote: objects per kind in the bucket (before the raw puts add theirs).
T2_OBJECTS=$(python3 - "http://127.0.0.1:${MOTO_PORT[t2backup]}" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
n = {}
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="t2backup", Prefix="bench/repository/"):
    for o in page.get("Contents", []):
        kind = o["Key"].split("/")[2]
        n[kind] = n.get(kind, 0) + 1
print(", ".join(f"{v} {k}" for k, v in sorted(n.items()) if k in ("packs", "index", "blocklists", "manifests")))
PY
)
PACK=$((32 << 20))
NPACKS=$(( (BYTES_NEW + PACK - 1) / PACK ))
RAW1=$(raw_put t2backup "$BYTES_NEW" "$PACK" 1)
RAW8=$(raw_put t2backup "$BYTES_NEW" "$PACK" 8)
RAW1_MBS=$(calc "round($BYTES_NEW / 1e6 / $RAW1, 1)")
RAW8_MBS=$(calc "round($BYTES_NEW / 1e6 / $RAW8, 1)")
echo "boto3 put of $(mb "$BYTES_NEW") as $NPACKS objects of up to 32 MiB: 1 thread ${RAW1}s, 8 threads ${RAW8}s" >&2
stop_stream a; stop_pid "${SRV_PID[a]}"; stop_moto t2backup; drop_slot a

# ============================================================================================
echo "== 4. retention and GC: 6 backups, pgbench -T $GC_SECS between them (Tier 1 only)" >&2
start_server gc
start_stream gc
GC_BACKUPS=()
for i in 1 2 3 4 5 6; do
  if [ "$i" -gt 1 ]; then
    as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -c 4 -j 2 -T "$GC_SECS" postgres >/dev/null 2>&1
  fi
  # shellcheck disable=SC2046
  T=$(timed "$KLIO" backup $(client gc) --pg-dsn "$DSN" --pgdata "$WORK/pg" --jobs "$BACKUP_JOBS" --no-retention --json)
  GC_BACKUPS+=("$(jfield "$WORK/last.out" bytes_new)")
  echo "backup $i: ${T}s, $(mb "${GC_BACKUPS[-1]}") new" >&2
done
REPO_BEFORE=$(du_b "$WORK/gc/repository")
RSS0_GC=$(reset_peak "${SRV_PID[gc]}")
# shellcheck disable=SC2046
T_RET=$(timed "$KLIO" retention run $(client gc) --keep-latest 3 --keep-hourly 0 --keep-daily 0 \
  --keep-weekly 0 --keep-monthly 0 --keep-annual 0 --json)
cp "$WORK/last.out" "$WORK/retention.json"
RSS_GC=$(peak_rss_mb "${SRV_PID[gc]}")
REPO_AFTER=$(du_b "$WORK/gc/repository")
read -r EXPIRED RECLAIMED WAL_REMOVED < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(len(r["deleted_backups"]), (r.get("gc") or {}).get("bytes_reclaimed", 0), len(r["deleted_wal"]))' "$WORK/retention.json")
# Garbage collection spans every cluster: the administration certificate's.
# shellcheck disable=SC2046
"$KLIO" gc plan $(client gc | sed "s/client-bench/admin/g") --json > "$WORK/gc-plan.json"
LEFT=$(jfield "$WORK/gc-plan.json" reclaimable_bytes)
echo "retention: ${T_RET}s, $EXPIRED backups expired, $WAL_REMOVED WAL files removed, gc reclaimed $(mb "$RECLAIMED"); still reclaimable after: $(mb "$LEFT")" >&2
stop_stream gc; stop_pid "${SRV_PID[gc]}"; drop_slot gc

# ============================================================================================
echo "== 2./3. WAL backlog: $SEGMENTS segments into Tier 1 of two servers (no relay yet)" >&2
start_moto walj1
start_moto walj8
# shellcheck disable=SC2046
start_server j1 $(tier2_flags walj1 1)
# shellcheck disable=SC2046
start_server j8 $(tier2_flags walj8 8)
start_stream j1
start_stream j8
# WAL of one row of 64 hex characters: about 121 bytes (measured on PostgreSQL 15).
ROWS=$((SEG_KB * 1024 / 121))
# No autovacuum on it: its visibility-map and freeze passes would add WAL after the backlog.
"${PSQL[@]}" -c "CREATE TABLE walgen (payload text) WITH (autovacuum_enabled = off)" >/dev/null
FIRST_SEG=$("${PSQL[@]}" -c "SELECT pg_walfile_name(pg_current_wal_lsn())")
for _ in $(seq "$SEGMENTS"); do
  echo "INSERT INTO walgen SELECT md5(random()::text) || md5(random()::text) FROM generate_series(1, $ROWS);"
  echo "SELECT pg_switch_wal();"
done > "$WORK/walgen.sql"
T0=$(now)
# The LSN the last pg_switch_wal() returns lies in the last segment it completed.
END_LSN=$("${PSQL[@]}" -q -f "$WORK/walgen.sql" | tail -1)
LAST_SEG=$("${PSQL[@]}" -c "SELECT pg_walfile_name('$END_LSN')")
T_GEN=$(elapsed "$T0")
wait_archived j1 "$END_LSN"
wait_archived j8 "$END_LSN"
T_INGEST=$(elapsed "$T0")
echo "$FIRST_SEG .. $LAST_SEG: generated in ${T_GEN}s, in both Tier 1 archives after ${T_INGEST}s" >&2
tier1_segments() { # $1 = server name: "<count> <bytes> <newest>" of its complete segments
  find "$WORK/$1/wal/bench/00000001" -regextype posix-extended -regex '.*/[0-9A-F]{24}' -printf '%f %s\n' \
    | sort | awk '{n++; s += $2; last = $1} END {print n + 0, s + 0, last}'
}

relay_backlog() { # $1 = server name; sets T_RELAY, FILES, BYTES, RSS, RSS0, T1_*
  stop_stream "$1"
  # The target: the newest segment in Tier 1 now (the streamer is stopped).
  read -r T1_FILES T1_BYTES T1_LAST < <(tier1_segments "$1")
  echo "$1: Tier 1 holds $T1_FILES segments up to $T1_LAST, $(mb "$T1_BYTES") ($(calc "round($T1_BYTES / max($T1_FILES, 1) / 1e3)") kB each)" >&2
  RSS0=$(reset_peak "${SRV_PID[$1]}")
  local t0; t0=$(now)
  start_stream "$1" --tier2-backup
  wait_relayed "$1" "$T1_LAST" 3600
  T_RELAY=$(elapsed "$t0")
  RSS=$(peak_rss_mb "${SRV_PID[$1]}")
  FILES=$(relay_field "$1" wal_files_relayed)
  BYTES=$(relay_field "$1" wal_bytes_relayed)
  # When the task that copied the last files recorded its progress (no polling delay).
  T_REC=$(python3 -c '
import sys
from datetime import datetime
t = datetime.fromisoformat(sys.argv[1].replace("Z", "+00:00")).timestamp()
print(f"{t - float(sys.argv[2]):.1f}")' "$(relay_field "$1" updated_at)" "$t0")
  echo "$1: $FILES WAL files ($(mb "$BYTES")) relayed in ${T_RELAY}s (progress recorded at +${T_REC}s); peak RSS $RSS MB" >&2
}
relay_backlog j1
T_J1=$T_RELAY; FILES_J1=$FILES; BYTES_J1=$BYTES; RSS_J1=$RSS; REC_J1=$T_REC; RSS0_J1=$RSS0
T1_FILES_J1=$T1_FILES; T1_BYTES_J1=$T1_BYTES; T1_LAST_J1=$T1_LAST
stop_stream j1; stop_pid "${SRV_PID[j1]}"; stop_moto walj1; drop_slot j1
relay_backlog j8
T_J8=$T_RELAY; FILES_J8=$FILES; BYTES_J8=$BYTES; RSS_J8=$RSS; REC_J8=$T_REC; RSS0_J8=$RSS0
# The floor moto puts under any client: as many objects of the same mean size, from boto3.
OBJ=$((BYTES_J8 / FILES_J8))
RAWW1=$(raw_put walj8 $((FILES_J8 * OBJ)) "$OBJ" 1)
RAWW8=$(raw_put walj8 $((FILES_J8 * OBJ)) "$OBJ" 8)
echo "boto3 put of $FILES_J8 x $OBJ bytes: 1 thread ${RAWW1}s, 8 threads ${RAWW8}s" >&2
stop_stream j8; stop_pid "${SRV_PID[j8]}"; stop_moto walj8; drop_slot j8

for s in a gc j1 j8; do
  n=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/server-$s.log" | grep -cE " (WARN|ERROR) " || true)
  if [ "$n" -gt 0 ]; then
    echo "server $s logged $n warnings/errors; the last ones:" >&2
    sed 's/\x1b\[[0-9;]*m//g' "$WORK/server-$s.log" | grep -E " (WARN|ERROR) " | tail -5 >&2
  fi
done

ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
per() { python3 -c "print(f'{$1/$2:.4f}')"; }
mbs() { python3 -c "print(f'{$1/1e6/$2:.1f}')"; }
T_TOTAL=$(elapsed "$T_START")
cat <<OUT

Tier 2 relay benchmark (moto on loopback, 2 cores; scale $SCALE, $SEGMENTS segments of ~$SEG_KB KiB data, relay interval ${RELAY_INTERVAL}s)
RESULT backup_relay: backup $BACKUP_ID, $(mb "$BYTES_NEW") stored (bytes_new; database $(mb "$DB_SIZE"), backup took ${T_BACKUP}s) seen in Tier 2 ${T_BRELAY}s after the commit = ${BRELAY_MBS} MB/s (${T_BRELAY_CLIENT}s after klio backup returned; server log, commit to "relayed": ${T_BRELAY_LOG}s); Tier 2 objects: $T2_OBJECTS
RESULT backup_relay_vs_raw: boto3 put_object of the same bytes as $NPACKS objects of up to 32 MiB into moto: 1 thread ${RAW1}s = ${RAW1_MBS} MB/s, 8 threads ${RAW8}s = ${RAW8_MBS} MB/s; klio relay / raw = $(ratio "$BRELAY_MBS" "$RAW1_MBS")x (1 thread), $(ratio "$BRELAY_MBS" "$RAW8_MBS")x (8 threads) (target >= 0.8x of the parallel upload)
RESULT wal_backlog: $SEGMENTS segments generated ($FIRST_SEG..$LAST_SEG) in ${T_GEN}s, archived by both servers after ${T_INGEST}s; Tier 1 at relay start: $T1_FILES_J1 segments up to $T1_LAST_J1, $(mb "$T1_BYTES_J1") (jobs 8 server: $T1_FILES segments up to $T1_LAST, $(mb "$T1_BYTES"))
RESULT wal_relay_jobs1: $FILES_J1 files, $(mb "$BYTES_J1") in ${T_J1}s = $(per "$T_J1" "$FILES_J1") s/segment, $(mbs "$BYTES_J1" "$T_J1") MB/s (progress record written at +${REC_J1}s)
RESULT wal_relay_jobs8: $FILES_J8 files, $(mb "$BYTES_J8") in ${T_J8}s = $(per "$T_J8" "$FILES_J8") s/segment, $(mbs "$BYTES_J8" "$T_J8") MB/s (progress record written at +${REC_J8}s)
RESULT wal_relay_jobs1_over_jobs8: $(ratio "$T_J1" "$T_J8")x (time with 1 job / time with 8 jobs)
RESULT wal_raw_put: boto3 put_object of $FILES_J8 x $OBJ bytes into moto: 1 thread ${RAWW1}s = $(per "$RAWW1" "$FILES_J8") s/object, 8 threads ${RAWW8}s = $(per "$RAWW8" "$FILES_J8") s/object; klio jobs 1 / boto3 1 thread = $(ratio "$T_J1" "$RAWW1")x, klio jobs 8 / boto3 8 threads = $(ratio "$T_J8" "$RAWW8")x
RESULT gc: 6 backups (new bytes: $(python3 -c "import sys; print(', '.join(f'{int(b)/1e6:.1f}' for b in sys.argv[1:]) + ' MB')" "${GC_BACKUPS[@]}")), retention run --keep-latest 3: ${T_RET}s wall, $EXPIRED backups expired, $WAL_REMOVED WAL files removed, gc.bytes_reclaimed $(mb "$RECLAIMED"); Tier 1 repository $(mb "$REPO_BEFORE") -> $(mb "$REPO_AFTER") (gc plan afterwards: $(mb "$LEFT") reclaimable)
RESULT peak_rss_server: backup relay ${RSS_A} MB, WAL relay jobs 1 ${RSS_J1} MB, jobs 8 ${RSS_J8} MB, retention+GC ${RSS_GC} MB (RSS when each started: ${RSS0_A}, ${RSS0_J1}, ${RSS0_J8}, ${RSS0_GC} MB) (target <= 256 MB)
RESULT runtime: ${T_TOTAL}s
OUT
