#!/usr/bin/env bash
# Randomized fuzzing of the parsers of untrusted input, for a fixed time: the property tests
# (crates/pg/tests/properties.rs: WAL names, LSNs, timeline histories;
# crates/crypto/tests/properties.rs: every change to a sealed object detected) run again and
# again with fresh seeds and KLIO_PROPERTY_SCALE times their usual number of cases.
# (cargo-fuzz needs a nightly compiler, which this machine does not have: this is random
# testing without coverage guidance, and says so in its report.)
#
#   bash bench/fuzz.sh              # 10 minutes
#   SECONDS_TOTAL=3600 bash bench/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
TOTAL="${SECONDS_TOTAL:-600}"
SCALE="${KLIO_PROPERTY_SCALE:-20}"
cargo test --release --locked -p klio-pg --test properties -p klio-crypto --test properties --no-run >&2
START=$(date +%s); RUNS=0; FAILURES=0
while [ $(( $(date +%s) - START )) -lt "$TOTAL" ]; do
  SEED=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
  if ! KLIO_PROPERTY_SEED=$SEED KLIO_PROPERTY_SCALE=$SCALE cargo test --release --locked -q \
      -p klio-pg --test properties -p klio-crypto --test properties >/tmp/klio-fuzz.log 2>&1; then
    FAILURES=$((FAILURES + 1))
    echo "FAILURE with KLIO_PROPERTY_SEED=$SEED KLIO_PROPERTY_SCALE=$SCALE:" >&2
    grep -E "panicked|assert" /tmp/klio-fuzz.log | head -5 >&2
  fi
  RUNS=$((RUNS + 1))
done
ELAPSED=$(( $(date +%s) - START ))
# Cases per run: WAL names 250,000, LSNs 200,000, histories 50,000 (pg); 6,000 sealed-object
# changes (crypto); each times the scale.
CASES=$(( RUNS * SCALE * (250000 + 200000 + 50000 + 6000) ))
cat <<REPORT

== randomized fuzzing (no coverage guidance) ==
time: ${ELAPSED} s, runs: $RUNS (fresh seed each), generated cases: $CASES
failures: $FAILURES (must be 0)
REPORT
[ "$FAILURES" -eq 0 ]
