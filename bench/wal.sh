#!/usr/bin/env bash
# WAL benchmark: klio wal-stream against pg_receivewal on the same PostgreSQL and the same
# pgbench script, in one run, then prints ratios.
#
#   bash bench/wal.sh            # defaults: scale 20, 30 s per pgbench run, 8 runs in ABBA order
#   SCALE=50 SECS=120 bash bench/wal.sh
#   SECS=10 REPLAY_SECS=30 bash bench/wal.sh   # shorter TPS runs, the same WAL to replay
#   DELAY_MS=25 bash bench/wal.sh              # a 50 ms round trip for the replay across a network
#   REPLAY_RUNS=5 bash bench/wal.sh            # each replay 5 times (default 3; the median is shown)
#   KLIO_BIN=/path/to/klio bash bench/wal.sh   # no build, use that binary
#
# Measures: TPS with each receiver, async and as the only synchronous standby; WAL bytes
# stored by Klio vs raw; replay time of the same WAL with and without wal-get prefetch, on
# loopback and across a simulated round trip (bench/delay_proxy.py in front of the Klio
# server, DELAY_MS each way, default 5: 10 ms); peak RSS of the Klio server and streamer.
# Targets (issue 2): TPS >= 0.9x pg_receivewal in both modes, prefetch >= 3x faster replay
# across the 10 ms round trip.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
PG_BIN="${KLIO_PG_BIN:-/usr/lib/postgresql/15/bin}"
SCALE="${SCALE:-20}"
SECS="${SECS:-30}"
REPLAY_SECS="${REPLAY_SECS:-$SECS}"
REPLAY_RUNS="${REPLAY_RUNS:-3}"
DELAY_MS="${DELAY_MS:-5}"
if [ -z "${KLIO_BIN:-}" ]; then
  cargo build --release --locked --bin klio >&2
  KLIO_BIN="$CARGO_TARGET_DIR/release/klio"
fi
KLIO="$KLIO_BIN"
[ -x "$KLIO" ] || { echo "no klio binary at $KLIO (set KLIO_BIN)" >&2; exit 1; }
WORK="$(mktemp -d /tmp/klio-bench-XXXXXX)"
chown postgres:postgres "$WORK"

as_pg() { runuser -u postgres -- "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
lsn_to_int() { python3 -c 'import sys; h,l=sys.argv[1].split("/"); print((int(h,16)<<32)|int(l,16))' "$1"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
cpu_secs() { python3 -c "print(round(($2 - $1) / $(getconf CLK_TCK), 1))"; }
peak_rss_mb() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }

PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  pkill -f "pg_receivewal -h $WORK" 2>/dev/null
  for d in "$WORK"/pg "$WORK"/replay*; do [ -f "$d/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1; done
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM # the cleanup also when stopped (it then runs once the current command ends)
trap 'exit 130' INT

"$KLIO" pki init "$WORK/pki" --cluster bench >/dev/null
chown -R postgres:postgres "$WORK/pki"
head -c 32 /dev/urandom | base64 > "$WORK/key"
WAL_PORT=$(free_port)
"$KLIO" server --data-dir "$WORK/klio" --encryption-key-file "$WORK/key" --tls-cert "$WORK/pki/server.crt" \
  --tls-key "$WORK/pki/server.key" --client-ca "$WORK/pki/ca.crt" --wal-listen "127.0.0.1:$WAL_PORT" \
  --base-listen 127.0.0.1:0 2> "$WORK/server.log" &
SERVER=$!; PIDS+=("$SERVER")
CLIENT_AUTH=(--cluster bench --client-cert "$WORK/pki/client-bench.crt" --client-key "$WORK/pki/client-bench.key"
  --server-ca "$WORK/pki/ca.crt")
CLIENT=(--server-address 127.0.0.1 --wal-port "$WAL_PORT" "${CLIENT_AUTH[@]}")

PG_PORT=$(free_port)
as_pg "$PG_BIN/initdb" -D "$WORK/pg" -k -U postgres -A trust >/dev/null
cat >> "$WORK/pg/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = replica
max_wal_senders = 10
shared_buffers = 512MB
max_wal_size = 4GB
wal_keep_size = 8GB
checkpoint_timeout = 15min
CONF
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w start >/dev/null
PSQL=("$PG_BIN/psql" -X -At -h "$WORK" -p "$PG_PORT" -U postgres -d postgres)
as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -i -q -s "$SCALE" postgres >/dev/null 2>&1

run_pgbench() { # prints TPS
  "${PSQL[@]}" -c "CHECKPOINT" >/dev/null
  as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -c 4 -j 2 -T "$SECS" postgres 2>/dev/null \
    | awk '/^tps/ {print $3; exit}'
}
set_sync() { # $1 = application_name or empty
  "${PSQL[@]}" -c "ALTER SYSTEM SET synchronous_standby_names = '$1'" -c "SELECT pg_reload_conf()" >/dev/null
}
wait_streaming() { # $1 = application_name
  for _ in $(seq 600); do
    [ "$("${PSQL[@]}" -c "SELECT count(*) FROM pg_stat_replication WHERE application_name = '$1' AND state IN ('streaming', 'catchup')")" = 1 ] && return
    sleep 0.1
  done
  echo "receiver $1 did not start streaming" >&2; exit 1
}

# runuser does not pass signals on to pg_receivewal: stop it by name.
stop_recv() {
  pkill -TERM -f "pg_receivewal -h $WORK" || true
  for _ in $(seq 100); do pgrep -f "pg_receivewal -h $WORK" >/dev/null || break; sleep 0.1; done
  wait "$RECV" 2>/dev/null || true
}
echo "== pgbench -c4 -j2 -T $SECS, scale $SCALE" >&2
# pg_receivewal, async then synchronous
mkdir -p "$WORK/recv"; chown postgres:postgres "$WORK/recv"
as_pg "$PG_BIN/pg_receivewal" -h "$WORK" -p "$PG_PORT" -U postgres -D "$WORK/recv" --slot recv --create-slot >/dev/null 2>&1

wait_caught_up() { # $1 = application_name: the walsender has sent it everything
  for _ in $(seq 3000); do
    [ "$("${PSQL[@]}" -c "SELECT coalesce(bool_and(sent_lsn >= pg_current_wal_lsn()), false) FROM pg_stat_replication WHERE application_name = '$1'")" = t ] && return
    sleep 0.1
  done
  echo "receiver $1 did not catch up" >&2; exit 1
}
CPU_RECV=0; CPU_STREAMER=0; CPU_SERVER=0
recv_run() { # $1 = async|sync; sets TPS
  local extra=(); [ "$1" = sync ] && extra=(--synchronous)
  as_pg "$PG_BIN/pg_receivewal" -h "$WORK" -p "$PG_PORT" -U postgres -D "$WORK/recv" --slot recv "${extra[@]}" \
    -d "application_name=recv" 2>>"$WORK/recv.log" &
  RECV=$!; PIDS+=("$RECV"); wait_streaming recv; wait_caught_up recv
  [ "$1" = sync ] && set_sync recv
  local pid c0 tps; pid=$(pgrep -f "pg_receivewal -h $WORK" | tail -1); c0=$(cpu_ticks "$pid")
  tps=$(run_pgbench)
  [ "$1" = async ] && CPU_RECV=$(python3 -c "print($CPU_RECV + $(cpu_secs "$c0" "$(cpu_ticks "$pid")"))")
  set_sync ""; stop_recv; TPS=$tps
}
klio_run() { # $1 = async|sync; sets TPS
  "$KLIO" wal-stream "${CLIENT[@]}" --pg-dsn "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" 2>>"$WORK/stream.log" &
  STREAMER=$!; PIDS+=("$STREAMER"); wait_streaming klio; wait_caught_up klio
  [ "$1" = sync ] && set_sync klio
  local s0 v0 tps; s0=$(cpu_ticks $STREAMER); v0=$(cpu_ticks $SERVER)
  tps=$(run_pgbench)
  if [ "$1" = async ]; then
    CPU_STREAMER=$(python3 -c "print($CPU_STREAMER + $(cpu_secs "$s0" "$(cpu_ticks $STREAMER)"))")
    CPU_SERVER=$(python3 -c "print($CPU_SERVER + $(cpu_secs "$v0" "$(cpu_ticks $SERVER)"))")
  fi
  RSS_STREAMER=$(peak_rss_mb $STREAMER)
  set_sync ""; kill $STREAMER; wait $STREAMER 2>/dev/null || true; TPS=$tps
}
mean() { python3 -c "import sys; v=[float(x) for x in sys.argv[1:]]; print(round(sum(v)/len(v), 1))" "$@"; }

# ABBA order, each receiver caught up before its run, so that neither gets the fresher
# database or the other's backlog.
recv_run async; A1=$TPS; klio_run async; A2=$TPS; klio_run async; A3=$TPS; recv_run async; A4=$TPS
klio_run sync; S1=$TPS; recv_run sync; S2=$TPS; recv_run sync; S3=$TPS; klio_run sync; S4=$TPS
TPS_RECV_ASYNC=$(mean "$A1" "$A4"); TPS_KLIO_ASYNC=$(mean "$A2" "$A3")
TPS_RECV_SYNC=$(mean "$S2" "$S3"); TPS_KLIO_SYNC=$(mean "$S1" "$S4")
CPU_RECV_ASYNC=$CPU_RECV; CPU_STREAMER_ASYNC=$CPU_STREAMER; CPU_SERVER_ASYNC=$CPU_SERVER
"${PSQL[@]}" -c "SELECT pg_drop_replication_slot('recv')" >/dev/null

# The streamer stays up for the archive-size and replay measurements.
"$KLIO" wal-stream "${CLIENT[@]}" --pg-dsn "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" 2>>"$WORK/stream.log" &
STREAMER=$!; PIDS+=("$STREAMER"); wait_streaming klio
END_LSN=$("${PSQL[@]}" -c "SELECT pg_switch_wal()")
for _ in $(seq 600); do
  A=$("$KLIO" wal-list "${CLIENT[@]}" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["end_lsn"])')
  [ "$(lsn_to_int "$A")" -ge "$(lsn_to_int "$END_LSN")" ] && break; sleep 0.2
done
RSS_SERVER=$(peak_rss_mb $SERVER)
SEGS=$(find "$WORK/klio/wal/bench/00000001" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9A-F]{24}' | wc -l)
RAW=$((SEGS * 16777216))
STORED=$(find "$WORK/klio/wal/bench/00000001" -regextype posix-extended -regex '.*/[0-9A-F]{24}' -printf '%s\n' | awk '{s += $1} END {print s}')

# Replay: a base backup, then one more pgbench run archived by klio; the same WAL is
# replayed from the archive with and without prefetch, on loopback, then through the delay
# proxy, each REPLAY_RUNS times.
BASE="$WORK/replaybase"
as_pg "$PG_BIN/pg_basebackup" -h "$WORK" -p "$PG_PORT" -U postgres -D "$BASE" -Fp -X none -c fast >/dev/null
set_sync ""
as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -c 4 -j 2 -T "$REPLAY_SECS" postgres >/dev/null 2>&1
REPLAY_END=$("${PSQL[@]}" -c "SELECT pg_switch_wal()")
for _ in $(seq 600); do
  A=$("$KLIO" wal-list "${CLIENT[@]}" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["end_lsn"])')
  [ "$(lsn_to_int "$A")" -ge "$(lsn_to_int "$REPLAY_END")" ] && break; sleep 0.2
done
# The archive stays as it is now (the streamer stops): every run replays the same WAL.
kill "$STREAMER"; wait "$STREAMER" 2>/dev/null || true
time_replay() { # $1 = prefetch count, $2 = run name, then the client flags of wal-get
  local prefetch=$1 dir="$WORK/replay-$2" port; shift 2; port=$(free_port)
  cp -a "$BASE" "$dir"
  cat >> "$dir/postgresql.auto.conf" <<CONF
port = $port
restore_command = '$KLIO wal-get $* --prefetch $prefetch %f %p'
recovery_target_action = 'promote'
CONF
  touch "$dir/recovery.signal"; chown -R postgres:postgres "$dir"
  local t0; t0=$(date +%s.%N)
  as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$dir.log" -w -t 3600 start >/dev/null
  for _ in $(seq 36000); do
    [ "$("$PG_BIN/psql" -X -At -h "$WORK" -p "$port" -U postgres -d postgres -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ] && break
    sleep 0.05
  done
  local t1; t1=$(date +%s.%N)
  as_pg "$PG_BIN/pg_ctl" -D "$dir" stop -m immediate >/dev/null
  rm -rf "$dir" # its log stays
  python3 -c "print(round($t1 - $t0, 2))"
}
# On loopback, replay is bound by PostgreSQL's redo, not by fetching. A Klio server is
# normally across a network: the same replays through bench/delay_proxy.py, a user-space
# TCP proxy that delays every chunk DELAY_MS each way (netem is not available in every
# kernel). TLS passes through it untouched: wal-get connects to the proxy's port and still
# verifies the server's certificate, by the name --server-name gives.
start_proxy() { # sets PROXY (also in PIDS) and PROXY_PORT
  rm -f "$WORK/proxy.port" # not a previous proxy's port: the redirection below may come late
  python3 bench/delay_proxy.py --target "127.0.0.1:$WAL_PORT" --delay-ms "$DELAY_MS" \
    > "$WORK/proxy.port" 2> "$WORK/proxy.log" &
  PROXY=$!; PIDS+=("$PROXY")
  for _ in $(seq 100); do [ -s "$WORK/proxy.port" ] && break; sleep 0.1; done
  PROXY_PORT=$(head -1 "$WORK/proxy.port")
  [ -n "$PROXY_PORT" ] || { echo "the delay proxy did not start" >&2; cat "$WORK/proxy.log" >&2; exit 1; }
}
stop_proxy() { # sets CONNS: the connections it forwarded
  kill "$PROXY"; wait "$PROXY" 2>/dev/null || true
  CONNS=$(sed -n 's/^delay_proxy: \([0-9]*\) connections.*/\1/p' "$WORK/proxy.log")
}
net_replay() { # $1 = prefetch count, $2 = run number; sets SECS_NET and CONNS
  start_proxy
  local flags=(--server-address 127.0.0.1 --server-name localhost --wal-port "$PROXY_PORT" "${CLIENT_AUTH[@]}")
  SECS_NET=$(time_replay "$1" "net-$1-$2" "${flags[@]}")
  stop_proxy
}
# Without and with prefetch alternately, so that neither gets the quieter moments.
LOOP0=(); LOOP8=(); NET0=(); NET8=()
for i in $(seq "$REPLAY_RUNS"); do
  LOOP0+=("$(time_replay 0 "0-$i" "${CLIENT[@]}")")
  LOOP8+=("$(time_replay 8 "8-$i" "${CLIENT[@]}")")
done
for i in $(seq "$REPLAY_RUNS"); do
  net_replay 0 "$i"; NET0+=("$SECS_NET"); CONNS_NOPREFETCH=$CONNS
  net_replay 8 "$i"; NET8+=("$SECS_NET"); CONNS_PREFETCH=$CONNS
done
median() { python3 -c "import statistics, sys; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
REPLAY_NOPREFETCH=$(median "${LOOP0[@]}"); REPLAY_PREFETCH=$(median "${LOOP8[@]}")
REPLAY_NET_NOPREFETCH=$(median "${NET0[@]}"); REPLAY_NET_PREFETCH=$(median "${NET8[@]}")
# Segments restored per replay (the same in every run: more than one figure would say not).
REPLAY_SEGS=$(for f in "$WORK"/replay-*.log; do grep -c 'restored log file "0000' "$f" || true; done | sort -un | paste -sd/)
RTT_MS=$(python3 -c "print(f'{2 * $DELAY_MS:g}')")

ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
cat <<OUT

WAL benchmark (pgbench -c4 -j2 -T $SECS, scale $SCALE; one run of 8, ABBA order, same PostgreSQL; TPS = mean of 2)
                          TPS        vs pg_receivewal
pg_receivewal async     $TPS_RECV_ASYNC   (runs: $A1 $A4)
klio wal-stream async   $TPS_KLIO_ASYNC   (runs: $A2 $A3)   $(ratio "$TPS_KLIO_ASYNC" "$TPS_RECV_ASYNC")x   (target >= 0.9)
pg_receivewal sync      $TPS_RECV_SYNC   (runs: $S2 $S3)
klio wal-stream sync    $TPS_KLIO_SYNC   (runs: $S1 $S4)   $(ratio "$TPS_KLIO_SYNC" "$TPS_RECV_SYNC")x   (target >= 0.9)

WAL archived by klio:   $SEGS complete segments, $RAW bytes raw, stored in $STORED bytes ($(ratio "$RAW" "$STORED")x smaller)
replay of $REPLAY_SEGS segments (wall time, median of $REPLAY_RUNS runs)
  $(printf '%-20s' loopback)no prefetch ${REPLAY_NOPREFETCH}s (runs: ${LOOP0[*]}), prefetch 8 ${REPLAY_PREFETCH}s (runs: ${LOOP8[*]})   $(ratio "$REPLAY_NOPREFETCH" "$REPLAY_PREFETCH")x faster
  $(printf '%-20s' "$RTT_MS ms round trip")no prefetch ${REPLAY_NET_NOPREFETCH}s (runs: ${NET0[*]}), prefetch 8 ${REPLAY_NET_PREFETCH}s (runs: ${NET8[*]})   $(ratio "$REPLAY_NET_NOPREFETCH" "$REPLAY_NET_PREFETCH")x faster   (target >= 3)
  (round trip: bench/delay_proxy.py, ${DELAY_MS} ms each way; wal-get connections per replay: ${CONNS_NOPREFETCH:-?} without prefetch, ${CONNS_PREFETCH:-?} with)
peak RSS: server ${RSS_SERVER} MB, streamer ${RSS_STREAMER} MB
CPU during the async runs: pg_receivewal ${CPU_RECV_ASYNC}s; klio streamer ${CPU_STREAMER_ASYNC}s + server ${CPU_SERVER_ASYNC}s (of 2 x ${SECS}s)
OUT
