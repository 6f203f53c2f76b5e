#!/usr/bin/env bash
# CloudNativePG sidecar benchmark: what going through the CNPG-I plugin costs compared with
# calling Klio directly, on the same archive and database, in one run.
#
#   bash bench/cnpg-sidecar.sh             # 48 WAL segments, pgbench scale 50 for the backups
#   SEGMENTS=96 SCALE=100 bash bench/cnpg-sidecar.sh
#
# Measures (issue 11):
# - per-WAL-file wall time of CloudNativePG's own `manager wal-restore` (v1.30, a new process
#   per file: plugin discovery, handshake, Probe, then WAL.Restore over the unix socket) with
#   the sidecar's prefetch off and on, against `klio wal-get` run the same way
#   (`--prefetch 0` and `--prefetch 8`), fetching the same segments in order as recovery does;
# - a base backup through `Backup.Backup` on the klio-plugin socket against `klio backup`.
# The CloudNativePG commands run in a network namespace of their own where a small HTTP
# server plays the instance manager's cache (the Cluster JSON on localhost:8010).
# Needs root (`ip netns`) and the CloudNativePG build of `scripts/k8s-testenv.sh build`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
PG_BIN="${KLIO_PG_BIN:-/usr/lib/postgresql/15/bin}"
SEGMENTS="${SEGMENTS:-48}"
SCALE="${SCALE:-50}"
WORK="$(mktemp -d /var/tmp/klio-bench-cnpg-XXXXXX)"
chown postgres:postgres "$WORK"
chmod 755 "$WORK"
NS="klio-bench-$$"
source bench/lib.sh

CNPG_DIR="$(bash scripts/k8s-testenv.sh cnpg-dir)" || {
  echo "CloudNativePG is not built: run bash scripts/k8s-testenv.sh build" >&2; exit 1; }
MANAGER="$CNPG_DIR/bin/cnpg-manager"
cargo build --release --locked --bin klio >&2
cargo build --release --locked -p klio-cnpg-plugin --example cnpgi_backup >&2
KLIO="$CARGO_TARGET_DIR/release/klio"
CALL_BACKUP="$CARGO_TARGET_DIR/release/examples/cnpgi_backup"
ms() { python3 -c "print(f'{($(now) - $1) * 1000 / $2:.1f}')"; }
secs() { python3 -c "print(f'{$(now) - $1:.1f}')"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }

PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for d in "$WORK/pg" "$WORK/s0/pgdata" "$WORK/s8/pgdata"; do
    [ -f "$d/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1
  done
  wait 2>/dev/null
  ip netns del "$NS" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# A Klio server, a PostgreSQL streaming into it, and SEGMENTS segments of WAL.
"$KLIO" pki init "$WORK/pki" --cluster pg >/dev/null
chown -R postgres:postgres "$WORK/pki"
echo "bench-key-0123456789" > "$WORK/key"
WAL_PORT=$(free_port); BASE_PORT=$(free_port); PG_PORT=$(free_port)
KLIO_LOG=warn "$KLIO" server --data-dir "$WORK/data" --encryption-key-file "$WORK/key" \
  --tls-cert "$WORK/pki/server.crt" --tls-key "$WORK/pki/server.key" --client-ca "$WORK/pki/ca.crt" \
  --wal-listen "127.0.0.1:$WAL_PORT" --base-listen "127.0.0.1:$BASE_PORT" 2>"$WORK/server.log" &
PIDS+=($!)
export KLIO_SERVER_ADDRESS=127.0.0.1 KLIO_WAL_PORT=$WAL_PORT KLIO_BASE_PORT=$BASE_PORT KLIO_CLUSTER=pg \
  KLIO_CLIENT_CERT="$WORK/pki/client-pg.crt" KLIO_CLIENT_KEY="$WORK/pki/client-pg.key" \
  KLIO_SERVER_CA="$WORK/pki/ca.crt"
init_pg "$WORK/pg" "$PG_PORT"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w start >/dev/null
DSN="host=$WORK port=$PG_PORT user=postgres dbname=postgres"
KLIO_LOG=warn "$KLIO" wal-stream --pg-dsn "$DSN" 2>"$WORK/stream.log" &
PIDS+=($!)
psql_pg() { as_pg "$PG_BIN/psql" -X -At -q -h "$WORK" -p "$PG_PORT" -U postgres -d postgres -c "$1"; }
for _ in $(seq 1 50); do psql_pg "SELECT 1" >/dev/null 2>&1 && break; sleep 0.2; done
echo "pgbench -i -s $SCALE" >&2
as_pg "$PG_BIN/pgbench" -i -q -s "$SCALE" -h "$WORK" -p "$PG_PORT" -U postgres postgres >/dev/null 2>&1
psql_pg "CREATE TABLE w (x text)"
# The base backup the replays start from (and the full backup the timed ones build on).
"$KLIO" backup --pg-dsn "$DSN" --no-retention --json >/dev/null 2>"$WORK/b0.err"
FIRST=$(psql_pg "SELECT pg_walfile_name(pg_current_wal_lsn())")
for _ in $(seq 1 "$SEGMENTS"); do
  psql_pg "INSERT INTO w SELECT repeat(md5(g::text), 20) FROM generate_series(1, 20000) g; SELECT pg_switch_wal()" >/dev/null
done
END_LSN=$(psql_pg "SELECT pg_current_wal_lsn()")
for _ in $(seq 1 600); do
  "$KLIO" wal-list --json 2>/dev/null | python3 -c "
import json,sys
v=json.load(sys.stdin); h,l='$END_LSN'.split('/'); e=v.get('end_lsn') or '0/0'; a,b=e.split('/')
sys.exit(0 if (int(a,16)<<32|int(b,16)) >= (int(h,16)<<32|int(l,16)) else 1)" && break
  sleep 0.2
done
mapfile -t NAMES < <(python3 -c "
t,hi,lo='$FIRST'[:8],int('$FIRST'[8:16],16),int('$FIRST'[16:],16)
n=hi*256+lo
for i in range($SEGMENTS): print(f'{t}{(n+i)//256:08X}{(n+i)%256:08X}')")
echo "archive holds ${#NAMES[@]} segments from ${NAMES[0]}" >&2

# The sidecars, as postgres (like uid 26 in the pod), one without and one with prefetch.
start_sidecar() { # DIR PREFETCH
  mkdir -p "$1/sock" "$1/pgdata/pg_wal"; chown -R postgres:postgres "$1"
  KLIO_LOG=warn KLIO_SOCKET_DIR="$1/sock" PGDATA="$1/pgdata" KLIO_WAL_PREFETCH="$2" \
    KLIO_PG_DSN="$DSN" runuser -u postgres -p -- "$KLIO" cnpg-sidecar instance 2>"$1/sidecar.log" &
  PIDS+=($!)
  for _ in $(seq 1 100); do
    KLIO_SOCKET_DIR="$1/sock" "$KLIO" cnpg-sidecar healthcheck 2>/dev/null && return 0; sleep 0.1
  done
  cat "$1/sidecar.log" >&2; return 1
}
start_sidecar "$WORK/s0" 0
start_sidecar "$WORK/s8" 8
ip netns add "$NS"; ip -n "$NS" link set lo up
mkdir -p "$WORK/im/cache"
echo '{"apiVersion":"postgresql.cnpg.io/v1","kind":"Cluster","metadata":{"name":"pg","namespace":"default"},"spec":{"instances":1,"plugins":[{"name":"klio.enterprisedb.io","parameters":{"pluginConfigurationRef":"pc"}}]},"status":{"currentPrimary":"pg-1","targetPrimary":"pg-1"}}' > "$WORK/im/cache/cluster"
cp "$WORK/im/cache/cluster" "$WORK/cluster.json"
ip netns exec "$NS" python3 -m http.server 8010 --bind 127.0.0.1 --directory "$WORK/im" >/dev/null 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  ip netns exec "$NS" python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8010/cache/cluster', timeout=1)" 2>/dev/null && break; sleep 0.1
done

# Per-file cost, every segment in order, each call a new process as PostgreSQL runs it.
via_plugin() { # SIDECAR_DIR
  local t0; t0=$(now)
  for n in "${NAMES[@]}"; do
    PLUGIN_SOCKET_DIR="$1/sock" PGDATA="$1/pgdata" POD_NAME=pg-1 ip netns exec "$NS" \
      runuser -u postgres -p -- "$MANAGER" wal-restore --log-destination "$1/manager.json" "$n" "$1/pgdata/pg_wal/RECOVERYXLOG" \
      || { echo "wal-restore $n failed" >&2; cat "$1/sidecar.log" >&2; exit 1; }
  done
  ms "$t0" "${#NAMES[@]}"
}
direct() { # PREFETCH
  local d="$WORK/direct-$1"; mkdir -p "$d"; chown postgres:postgres "$d"
  local t0; t0=$(now)
  for n in "${NAMES[@]}"; do
    runuser -u postgres -p -- "$KLIO" wal-get --prefetch "$1" --spool-dir "$d/spool" "$n" "$d/RECOVERYXLOG" 2>/dev/null \
      || { echo "wal-get $n failed" >&2; exit 1; }
  done
  ms "$t0" "${#NAMES[@]}"
}
echo "fetching ${#NAMES[@]} segments four ways" >&2
D0=$(direct 0); P0=$(via_plugin "$WORK/s0")
D8=$(direct 8); P8=$(via_plugin "$WORK/s8")

# Real replays of the same WAL from the base backup, until promotion: PostgreSQL's
# restore_command is klio wal-get (prefetch 0 / 8) or CloudNativePG's manager wal-restore
# through the sidecar (prefetch 0 / 8), which prefetches while PostgreSQL applies.
replay() { # PGDATA KIND PREFETCH -> seconds from start to promotion
  local d="$1"
  rm -rf "$d"; "$KLIO" restore --pgdata "$d" >/dev/null 2>"$WORK/restore.err" || { cat "$WORK/restore.err" >&2; exit 1; }
  chown -R postgres:postgres "$d"; chmod 700 "$d"
  local port; port=$(free_port)
  pg_conf "$d" "$port"
  echo "unix_socket_directories = '$d/..'" >> "$d/postgresql.conf"
  local cmd prefix=()
  if [ "$2" = direct ]; then
    cmd=$(grep "^restore_command" "$d/postgresql.auto.conf" | tail -1 | sed "s| wal-get | wal-get --prefetch $3 --spool-dir $d/../direct-spool |")
    echo "$cmd" >> "$d/postgresql.auto.conf"
  else
    echo "restore_command = 'env PLUGIN_SOCKET_DIR=$d/../sock PGDATA=$d POD_NAME=pg-1 $MANAGER wal-restore --log-destination $d/../manager.json %f %p'" >> "$d/postgresql.auto.conf"
    prefix=(ip netns exec "$NS")
  fi
  local t0; t0=$(now)
  "${prefix[@]}" runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$d" -l "$d/../replay.log" start >/dev/null
  for _ in $(seq 1 6000); do
    [ "$(as_pg "$PG_BIN/psql" -X -At -h "$d/.." -p "$port" -U postgres -d postgres -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ] && break
    sleep 0.05
  done
  secs "$t0"
  as_pg "$PG_BIN/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1 || true
}
echo "replaying the WAL four ways" >&2
R_D0=$(replay "$WORK/s0/pgdata" direct 0); R_P0=$(replay "$WORK/s0/pgdata" plugin 0)
R_D8=$(replay "$WORK/s8/pgdata" direct 8); R_P8=$(replay "$WORK/s8/pgdata" plugin 8)

# Backups each way after the same change (a full backup first, untimed, so every timed one
# is an incremental of the same kind), alternating which goes first.
change() { as_pg "$PG_BIN/pgbench" -n -t 2000 -h "$WORK" -p "$PG_PORT" -U postgres postgres >/dev/null 2>&1; }
backup_direct() { local t0; t0=$(now); "$KLIO" backup --pg-dsn "$DSN" --no-retention --json >/dev/null 2>"$WORK/b.err"; secs "$t0"; }
backup_plugin() { local t0; t0=$(now); "$CALL_BACKUP" "$WORK/s0/sock/klio.enterprisedb.io" "$WORK/cluster.json" bench skipRetention=true >/dev/null; secs "$t0"; }
change; B_DIRECT=$(backup_direct); change; B_PLUGIN=$(backup_plugin)
change; B_PLUGIN2=$(backup_plugin); change; B_DIRECT2=$(backup_direct)
DB_SIZE=$(psql_pg "SELECT pg_size_pretty(pg_database_size('postgres'))")

cat <<REPORT

== CloudNativePG sidecar: ${#NAMES[@]} WAL segments, database $DB_SIZE ==
per WAL file (ms)            no prefetch   prefetch 8
  klio wal-get (direct)      $D0$(printf '%*s' $((14 - ${#D0})) '')$D8
  manager wal-restore+plugin $P0$(printf '%*s' $((14 - ${#P0})) '')$P8
  plugin / direct            $(ratio "$P0" "$D0")$(printf '%*s' 9 '')$(ratio "$P8" "$D8")
replay to promotion (s)      no prefetch   prefetch 8
  restore_command klio wal-get $R_D0$(printf '%*s' $((12 - ${#R_D0})) '')$R_D8
  manager wal-restore+plugin $R_P0$(printf '%*s' $((14 - ${#R_P0})) '')$R_P8
  plugin / direct            $(ratio "$R_P0" "$R_D0")$(printf '%*s' 9 '')$(ratio "$R_P8" "$R_D8")
incremental backup (s)       run 1         run 2 (order reversed)
  klio backup (direct)       $B_DIRECT$(printf '%*s' $((14 - ${#B_DIRECT})) '')$B_DIRECT2
  Backup.Backup via plugin   $B_PLUGIN$(printf '%*s' $((14 - ${#B_PLUGIN})) '')$B_PLUGIN2
REPORT
