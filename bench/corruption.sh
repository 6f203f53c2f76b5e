#!/usr/bin/env bash
# Corruption campaign: flip one byte at random offsets of every kind of object Klio keeps on
# disk (sealed WAL segment, the .open segment being received, backup history file, pack, index,
# blocklist, manifest, the repository config, keys.json) and check that each flip is detected
# with an error that names the object, by the path a user takes to it: the server's start,
# `klio verify`, `klio wal-get`, `klio wal-list`, `klio restore`.
#
#   bash bench/corruption.sh          # 12 flips per kind
#   FLIPS=40 bash bench/corruption.sh
#
# Each flip is undone before the next, and the block index cache is dropped before each start
# so that index objects are read again. Prints: corruptions injected, detected (named), and
# the ones not detected, with where they were.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
PG_BIN="${KLIO_PG_BIN:-/usr/lib/postgresql/15/bin}"
FLIPS="${FLIPS:-12}"
WORK="$(mktemp -d /var/tmp/klio-bench-corrupt-XXXXXX)"
chown postgres:postgres "$WORK"
source bench/lib.sh

cargo build --release --locked --bin klio >&2
KLIO="$CARGO_TARGET_DIR/release/klio"
SERVER=""; STREAMER=""
cleanup() {
  set +e
  for p in $SERVER $STREAMER; do kill -9 "$p" 2>/dev/null; done
  [ -f "$WORK/pg/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" stop -m immediate >/dev/null 2>&1
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

"$KLIO" pki init "$WORK/pki" --cluster pg >/dev/null
head -c 32 /dev/urandom | base64 > "$WORK/key"
WAL_PORT=$(free_port); BASE_PORT=$(free_port); PG_PORT=$(free_port)
export KLIO_SERVER_ADDRESS=127.0.0.1 KLIO_WAL_PORT=$WAL_PORT KLIO_BASE_PORT=$BASE_PORT KLIO_CLUSTER=pg \
  KLIO_CLIENT_CERT="$WORK/pki/client-pg.crt" KLIO_CLIENT_KEY="$WORK/pki/client-pg.key" \
  KLIO_SERVER_CA="$WORK/pki/ca.crt"
start_server() { # returns non-zero when the server does not come up
  KLIO_LOG=info "$KLIO" server --data-dir "$WORK/data" --encryption-key-file "$WORK/key" \
    --tls-cert "$WORK/pki/server.crt" --tls-key "$WORK/pki/server.key" --client-ca "$WORK/pki/ca.crt" \
    --wal-listen "127.0.0.1:$WAL_PORT" --base-listen "127.0.0.1:$BASE_PORT" >"$WORK/server.out" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 200); do
    kill -0 "$SERVER" 2>/dev/null || return 1
    (exec 3<>"/dev/tcp/127.0.0.1/$BASE_PORT") 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}
stop_server() { kill "$SERVER" 2>/dev/null || true; { wait "$SERVER"; } 2>/dev/null || true; SERVER=""; }

# A small cluster with a backup, its WAL archived, and a segment still being received.
init_pg "$WORK/pg" "$PG_PORT"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w start >/dev/null
start_server
KLIO_LOG=warn "$KLIO" wal-stream --pg-dsn "host=$WORK port=$PG_PORT user=postgres dbname=postgres" 2>"$WORK/stream.log" &
STREAMER=$!
as_pg "$PG_BIN/pgbench" -i -q -s 2 -h "$WORK" -p "$PG_PORT" -U postgres postgres >/dev/null 2>&1
as_pg "$PG_BIN/psql" -X -q -h "$WORK" -p "$PG_PORT" -U postgres -c "SELECT pg_switch_wal()" >/dev/null
"$KLIO" backup --pg-dsn "host=$WORK port=$PG_PORT user=postgres dbname=postgres" --no-retention --json >/dev/null 2>"$WORK/backup.err"
as_pg "$PG_BIN/psql" -X -q -h "$WORK" -p "$PG_PORT" -U postgres -c "INSERT INTO pgbench_history SELECT 1,1,1,1,now() FROM generate_series(1,2000)" >/dev/null
sleep 1
kill -9 "$STREAMER"; { wait "$STREAMER"; } 2>/dev/null || true; STREAMER=""
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" stop -m fast >/dev/null
stop_server

D="$WORK/data"
declare -A FILES
FILES[wal-segment]=$(find "$D/wal" -regextype posix-extended -regex '.*/[0-9A-F]{8}/[0-9A-F]{24}' -type f | sort)
FILES[wal-open]=$(find "$D/wal" -name '*.open' -type f | sort)
FILES[backup-history]=$(find "$D/wal" -name '*.backup' -type f | sort)
FILES[pack]=$(find "$D/repository/packs" -type f | sort)
FILES[index]=$(find "$D/repository/index" -type f | sort)
FILES[blocklist]=$(find "$D/repository/blocklists" -type f | sort)
FILES[manifest]=$(find "$D/repository/manifests" -type f | sort)
FILES[config]="$D/repository/config"
FILES[keys]="$D/keys.json"

# Runs every path a user takes to the data; prints what they said.
probe() { # OBJECT_FILE
  rm -rf "$D/cache"
  if ! start_server; then cat "$WORK/server.out"; return; fi
  local seg; seg=$(basename "$1"); seg=${seg%.open}
  {
    cat "$WORK/server.out"
    "$KLIO" verify 2>&1 || true
    "$KLIO" wal-list 2>&1 || true
    if [[ $seg =~ ^[0-9A-F]{24}$ ]]; then "$KLIO" wal-get --prefetch 0 "$seg" "$WORK/probe.wal" 2>&1 || true; fi
    rm -rf "$WORK/restore"
    "$KLIO" restore --pgdata "$WORK/restore" 2>&1 >/dev/null || true
  } 2>&1
  stop_server
}

INJECTED=0; DETECTED=0; MISSED=()
for kind in wal-segment wal-open backup-history pack index blocklist manifest config keys; do
  mapfile -t objs < <(printf '%s\n' ${FILES[$kind]} | sed '/^$/d')
  if [ ${#objs[@]} -eq 0 ]; then echo "no object of kind $kind on disk; skipped" >&2; continue; fi
  for _ in $(seq 1 "$FLIPS"); do
    obj=${objs[$((RANDOM % ${#objs[@]}))]}
    size=$(stat -c %s "$obj")
    off=$(python3 -c "import random; print(random.randrange($size))")
    python3 - "$obj" "$off" <<'PY'
import sys
p, off = sys.argv[1], int(sys.argv[2])
with open(p, 'r+b') as f:
    f.seek(off); b = f.read(1); f.seek(off); f.write(bytes([b[0] ^ 0x01]))
PY
    out=$(probe "$obj")
    python3 - "$obj" "$off" <<'PY'
import sys
p, off = sys.argv[1], int(sys.argv[2])
with open(p, 'r+b') as f:
    f.seek(off); b = f.read(1); f.seek(off); f.write(bytes([b[0] ^ 0x01]))
PY
    INJECTED=$((INJECTED + 1))
    name=$(basename "$obj"); name=${name%.open}
    # Detected: some path refused with an error naming the object (its file name or id).
    if grep -qiE "corrupt|damaged|does not match|not valid|cannot|invalid|failed|mismatch" <<<"$out" && grep -qF "$name" <<<"$out"; then
      DETECTED=$((DETECTED + 1))
    else
      MISSED+=("$kind $obj @ $off")
    fi
  done
  echo "$kind: done" >&2
done

cat <<REPORT

== corruption campaign: one byte flipped at a time ==
corruptions injected: $INJECTED ($FLIPS per kind: wal-segment wal-open backup-history pack index blocklist manifest config keys)
detected with an error naming the object: $DETECTED
not detected or not named: ${#MISSED[@]}
REPORT
for m in "${MISSED[@]}"; do echo "  $m"; done
[ "${#MISSED[@]}" -eq 0 ]
