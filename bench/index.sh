#!/usr/bin/env bash
# Server memory against repository size: a repository of 10^7 distinct blocks (built
# synthetically), opened by the server before the on-disk block index (commit edcceac,
# which loaded every index object into memory) and after; prints the time until the server
# serves, its RSS then, and its peak RSS during a backup of a small database.
#
#   bash bench/index.sh                  # N=10000000
#   N=1000000 bash bench/index.sh
#   OLD_KLIO=/path/to/old/klio bash bench/index.sh   # skip building the old server
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
PG_BIN="${KLIO_PG_BIN:-/usr/lib/postgresql/15/bin}"
N="${N:-10000000}"
OLD_COMMIT="${OLD_COMMIT:-edcceac}"
WORK="$(mktemp -d /var/tmp/klio-bench-index-XXXXXX)"
chown postgres:postgres "$WORK"

cargo build --release --locked --bin klio --example synthetic_repository -p klio -p klio-repository >&2
KLIO="$CARGO_TARGET_DIR/release/klio"
SYNTH="$CARGO_TARGET_DIR/release/examples/synthetic_repository"
if [ -z "${OLD_KLIO:-}" ]; then
  OLD_SRC=/var/tmp/klio-bench-old-src
  if [ ! -d "$OLD_SRC" ]; then git worktree add --detach "$OLD_SRC" "$OLD_COMMIT" >&2; fi
  (cd "$OLD_SRC" && CARGO_TARGET_DIR=/var/tmp/klio-bench-old-target cargo build --release --locked --bin klio >&2)
  OLD_KLIO=/var/tmp/klio-bench-old-target/release/klio
fi

# shellcheck source=bench/lib.sh
. bench/lib.sh

PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for d in "$WORK"/pg-*; do [ -f "$d/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1; done
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

head -c 32 /dev/urandom | base64 > "$WORK/key"
"$KLIO" pki init "$WORK/pki" --cluster bench1 --cluster bench2 --cluster bench3 >/dev/null
echo "== building a repository of $N blocks" >&2
T0=$(now)
"$SYNTH" "$WORK/synth" "$WORK/key" "$N" >&2
echo "built in $(elapsed "$T0") s; repository $(du -sh "$WORK/synth/repository" | cut -f1)" >&2

# A fresh small database per run, so that runs do not share a replication slot.
new_pg() {
  PG_DIR="$WORK/pg-$1"; PG_PORT=$(free_port)
  init_pg "$PG_DIR" "$PG_PORT"
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR.log" -w start >/dev/null
  as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -i -q -s 10 postgres >/dev/null 2>&1
}

# run LABEL BINARY DATA_DIR: starts the server, waits until it serves, backs up the database.
run() {
  local label=$1 bin=$2 data=$3 n=$4
  local wal_port base_port t0 server streamer ready_rss ready_s
  new_pg "$n"
  wal_port=$(free_port); base_port=$(free_port)
  t0=$(now)
  "$bin" server --data-dir "$data" --encryption-key-file "$WORK/key" --tls-cert "$WORK/pki/server.crt" \
    --tls-key "$WORK/pki/server.key" --client-ca "$WORK/pki/ca.crt" --wal-listen "127.0.0.1:$wal_port" \
    --base-listen "127.0.0.1:$base_port" 2> "$WORK/server-$n.log" &
  server=$!; PIDS+=("$server")
  until grep -qs "base-backup service listening" "$WORK/server-$n.log"; do
    kill -0 "$server" 2>/dev/null || { cat "$WORK/server-$n.log" >&2; exit 1; }
    sleep 0.2
  done
  ready_s=$(elapsed "$t0"); ready_rss=$(rss_mb "$server")
  # One cluster name per run: each run backs up a database of its own.
  local client=(--server-address 127.0.0.1 --wal-port "$wal_port" --base-port "$base_port" --cluster "bench$n"
    --client-cert "$WORK/pki/client-bench$n.crt" --client-key "$WORK/pki/client-bench$n.key" --server-ca "$WORK/pki/ca.crt")
  "$bin" wal-stream "${client[@]}" --pg-dsn "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" 2> "$WORK/stream-$n.log" &
  streamer=$!; PIDS+=("$streamer")
  "$bin" backup "${client[@]}" --pg-dsn "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" \
    --pgdata "$PG_DIR" --no-retention --json > /dev/null 2> "$WORK/backup-$n.err" || {
    cat "$WORK/backup-$n.err" >&2; tail -20 "$WORK/stream-$n.log" >&2; exit 1; }
  printf '%-40s %10s %14s %18s\n' "$label" "$ready_s" "$ready_rss MB" "$(peak_rss_mb "$server") MB"
  kill "$streamer" "$server"; wait "$streamer" "$server" 2>/dev/null || true
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR" stop -m fast >/dev/null
}

cp -a "$WORK/synth" "$WORK/old"
cp -a "$WORK/synth" "$WORK/new"
echo
printf '%-40s %10s %14s %18s\n' "server ($N blocks in the repository)" "ready (s)" "RSS at ready" "peak during backup"
run "before (in-memory index, $OLD_COMMIT)" "$OLD_KLIO" "$WORK/old" 1
run "after, first start (builds the cache)" "$KLIO" "$WORK/new" 2
run "after, next start (cache up to date)" "$KLIO" "$WORK/new" 3
