#!/usr/bin/env bash
# Where the CPU goes: a full `klio backup --jobs 2` and a `klio restore --jobs 2` of a pgbench
# database, with `perf record` on the client and on the Klio server at once; prints the
# hottest functions of each side (self time, all threads) and the CPU seconds each side
# used, then leaves the perf data in $OUT (default /var/tmp/klio-profile). Then the
# synchronous WAL acknowledgement path: pgbench with `klio wal-stream` as the only
# synchronous standby, once under perf (streamer and server) and once counting, per
# commit, the system calls (strace -c) and the context switches (wake-ups) of each.
#
#   bash bench/profile.sh              # scale 50
#   SCALE=200 bash bench/profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
PG_BIN="${KLIO_PG_BIN:-/usr/lib/postgresql/15/bin}"
SCALE="${SCALE:-50}"
TOP="${TOP:-25}"
OUT="${OUT:-/var/tmp/klio-profile}"
WORK="$(mktemp -d /var/tmp/klio-bench-profile-XXXXXX)"
chown postgres:postgres "$WORK"
# shellcheck source=bench/lib.sh
source bench/lib.sh
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }

cargo build --release --locked --bin klio >&2
KLIO="$CARGO_TARGET_DIR/release/klio"
mkdir -p "$OUT"

PIDS=()
cleanup() {
  set +e
  stop_all
  rm -rf "$WORK"
}
trap cleanup EXIT

start_klio_server
PG_PORT=$(free_port)
init_pg "$WORK/pg" "$PG_PORT"
echo "shared_buffers = 512MB" >> "$WORK/pg/postgresql.conf"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w start >/dev/null
DSN="host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres"
"$KLIO" wal-stream "${CLIENT[@]}" --pg-dsn "$DSN" 2> "$WORK/wal-stream.log" &
PIDS+=($!)
as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -i -q -s "$SCALE" postgres >&2
"$PG_BIN/psql" -X -At -h "$WORK" -p "$PG_PORT" -U postgres -d postgres -c "VACUUM (FREEZE)" -c "CHECKPOINT" >/dev/null

cpu_s() { awk '{printf "%.1f", ($14 + $15) / 100}' "/proc/$1/stat"; } # utime + stime, 100 Hz ticks
report() { # $1 = perf data, $2 = title
  echo
  echo "== $2: hottest functions (self time, % of its samples)"
  perf report -i "$1" --no-children --sort symbol --stdio --percent-limit 0.7 2>/dev/null \
    | grep -E '^ +[0-9]' | head -n "$TOP" || true
}

# profile NAME CMD...: runs CMD under perf while perf also samples the server.
profile() {
  local name=$1; shift
  local s0 t0
  s0=$(cpu_s "$SERVER")
  perf record -q -F 999 -g -p "$SERVER" -o "$OUT/$name-server.data" 2>/dev/null &
  local rec=$!
  sleep 0.5
  t0=$(now)
  perf record -q -F 999 -g -o "$OUT/$name-client.data" -- "$@" > "$WORK/$name.out" 2> "$WORK/$name.err" \
    || { cat "$WORK/$name.err" >&2; exit 1; }
  local wall; wall=$(elapsed "$t0")
  kill -INT "$rec"; wait "$rec" 2>/dev/null || true
  local s1; s1=$(cpu_s "$SERVER")
  local client_cpu
  client_cpu=$(perf report -i "$OUT/$name-client.data" --stdio --sort comm 2>/dev/null | awk '/^# Samples/ && !d {print $3; d = 1}' || true)
  echo
  echo "##### $name: ${wall}s wall; server CPU $(python3 -c "print(f'{$s1 - $s0:.1f}')")s; client samples ${client_cpu} at 999 Hz"
  report "$OUT/$name-client.data" "$name, client"
  report "$OUT/$name-server.data" "$name, server"
}

profile backup "$KLIO" backup "${CLIENT[@]}" --pg-dsn "$DSN" --pgdata "$WORK/pg" --jobs 2 --json --no-retention
profile restore "$KLIO" restore "${CLIENT[@]}" --pgdata "$WORK/restored" --jobs 2

# The synchronous acknowledgement path: PostgreSQL -> wal-stream -> server (write, fsync)
# -> ack -> wal-stream -> PostgreSQL.
WAL_SECS="${WAL_SECS:-15}"
PSQL=("$PG_BIN/psql" -X -At -h "$WORK" -p "$PG_PORT" -U postgres -d postgres)
"${PSQL[@]}" -c "ALTER SYSTEM SET synchronous_standby_names = 'klio'" -c "SELECT pg_reload_conf()" >/dev/null
STREAMER=$(pgrep -f "klio wal-stream" | head -1)
commits() { # pgbench for WAL_SECS seconds; prints the transactions processed
  as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -c 4 -j 2 -T "$WAL_SECS" postgres 2>/dev/null \
    | awk '/number of transactions actually processed/ {split($NF, a, "/"); print a[1]}'
}
switches() { # voluntary + involuntary context switches of every thread of $1
  cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s}'
}
perf record -q -F 999 -g -p "$SERVER" -o "$OUT/walsync-server.data" 2>/dev/null &
R1=$!
perf record -q -F 999 -g -p "$STREAMER" -o "$OUT/walsync-streamer.data" 2>/dev/null &
R2=$!
sleep 0.5
N=$(commits)
kill -INT "$R1" "$R2"; wait "$R1" "$R2" 2>/dev/null || true
echo
echo "##### synchronous WAL: $N commits in ${WAL_SECS}s under perf ($(python3 -c "print(round($N / $WAL_SECS))") per second)"
report "$OUT/walsync-streamer.data" "synchronous WAL, streamer"
report "$OUT/walsync-server.data" "synchronous WAL, server"
X0=$(switches "$STREAMER"); Y0=$(switches "$SERVER")
strace -c -f -qq -p "$STREAMER" -o "$WORK/strace-streamer" &
T1=$!
strace -c -f -qq -p "$SERVER" -o "$WORK/strace-server" &
T2=$!
sleep 0.5
N=$(commits)
kill -INT "$T1" "$T2"; wait "$T1" "$T2" 2>/dev/null || true
X1=$(switches "$STREAMER"); Y1=$(switches "$SERVER")
per_commit() { # $1 = strace -c output, $2 = commits: the busiest system calls per commit
  awk -v n="$2" '$1 ~ /^[0-9.]+$/ && NF >= 5 {name = $NF; calls = $4; if (calls + 0 > 0) printf "  %-18s %6.2f per commit\n", name, calls / n}' "$1" \
    | sort -k2 -nr | head -8
}
echo
echo "##### synchronous WAL: $N commits in ${WAL_SECS}s under strace (slower; counts per commit)"
echo "streamer: $(python3 -c "print(round(($X1 - $X0) / $N, 2))") context switches per commit"
per_commit "$WORK/strace-streamer" "$N"
echo "server: $(python3 -c "print(round(($Y1 - $Y0) / $N, 2))") context switches per commit"
per_commit "$WORK/strace-server" "$N"
"${PSQL[@]}" -c "ALTER SYSTEM SET synchronous_standby_names = ''" -c "SELECT pg_reload_conf()" >/dev/null

echo
echo "perf data in $OUT (perf report -i $OUT/backup-server.data)"
