#!/usr/bin/env bash
# Fuzzing of the parsers of untrusted input, for a fixed time, in two parts:
#
# 1. Coverage-guided: the libFuzzer targets of fuzz/ (cargo fuzz, nightly Rust, address
#    sanitizer), each for the same share of FUZZ_SECONDS: WAL file names, LSNs and history
#    files (wal_names); a walsender's output, framing and streaming messages (walsender);
#    sealed objects, every change detected (sealed_object); index, blocklist and manifest
#    plaintexts (repository_objects); a backup commit request with its file list and
#    tablespace metadata checked by the manifest rules (backup_commit). Corpora persist in
#    $KLIO_FUZZ_DIR (default /var/tmp/klio-fuzz), so later runs go deeper.
# 2. Randomized: the property tests (the same parsers, plus queue task JSON, the replication
#    framing and the repository decoders) run again and again with fresh seeds and
#    KLIO_PROPERTY_SCALE times their usual number of cases, for PROPERTY_SECONDS.
#
#   bash bench/fuzz.sh                                  # 10 + 2 minutes
#   FUZZ_SECONDS=3600 PROPERTY_SECONDS=600 bash bench/fuzz.sh
#
# Needs the nightly toolchain (rustup toolchain install nightly) and installs cargo-fuzz into
# /var/tmp/klio-tools when missing. Prints executions and findings per target; a finding
# (a crash input in $KLIO_FUZZ_DIR/artifacts/<target>) makes it exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS="${FUZZ_SECONDS:-600}"
PROPERTY_SECONDS="${PROPERTY_SECONDS:-120}"
SCALE="${KLIO_PROPERTY_SCALE:-20}"
FUZZ_DIR="${KLIO_FUZZ_DIR:-/var/tmp/klio-fuzz}"
TOOLS=/var/tmp/klio-tools
CARGO_FUZZ_VERSION=0.13.2
TARGETS=(wal_names walsender sealed_object repository_objects backup_commit)

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  printf 'error: cargo fuzz needs the nightly toolchain\nHINT: rustup toolchain install nightly\n' >&2
  exit 1
fi
if ! "$TOOLS/bin/cargo-fuzz" --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION into $TOOLS" >&2
  cargo install -q cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$TOOLS"
fi
export PATH="$TOOLS/bin:$PATH"

# ---------------------------------------------------------------- coverage-guided
(
  cd fuzz
  # Nightly and sanitizer builds go to a target directory of their own.
  fuzz_target_dir=/var/tmp/klio-fuzz-target
  CARGO_TARGET_DIR=$fuzz_target_dir cargo +nightly fuzz build -O >&2
  per=$(( FUZZ_SECONDS / ${#TARGETS[@]} ))
  [ "$per" -ge 1 ] || per=1
  total_runs=0 total_findings=0
  printf '\n== coverage-guided fuzzing (libFuzzer, address sanitizer), %s s per target ==\n' "$per"
  printf '%-20s %14s %10s %8s %9s\n' target executions exec/s corpus findings
  for t in "${TARGETS[@]}"; do
    corpus="$FUZZ_DIR/corpus/$t" artifacts="$FUZZ_DIR/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    log="$FUZZ_DIR/$t.log"
    # -fork would use both cores, but one libFuzzer process per target is simpler to read.
    CARGO_TARGET_DIR=$fuzz_target_dir cargo +nightly fuzz run -O "$t" "$corpus" -- -max_total_time="$per" -print_final_stats=1 \
      -artifact_prefix="$artifacts/" >"$log" 2>&1 || true
    runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -1)
    rate=$(( ${runs:-0} / per ))
    findings=$(find "$artifacts" -type f | wc -l)
    files=$(find "$corpus" -type f | wc -l)
    if [ -z "$runs" ]; then
      echo "$t: libFuzzer did not finish; its log ($log) ends with:" >&2
      tail -20 "$log" >&2
      findings=$((findings + 1))
    fi
    printf '%-20s %14s %10s %8s %9s\n' "$t" "${runs:-?}" "$rate" "$files" "$findings"
    total_runs=$(( total_runs + ${runs:-0} ))
    total_findings=$(( total_findings + findings ))
  done
  printf 'total: %s executions in %s s, findings: %s (must be 0; inputs in %s/artifacts)\n' \
    "$total_runs" "$(( per * ${#TARGETS[@]} ))" "$total_findings" "$FUZZ_DIR"
  [ "$total_findings" -eq 0 ]
) || status=$?

# ---------------------------------------------------------------- randomized properties
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
# Integration-test binaries hold only property tests; in the libraries, a filter picks them.
WHOLE=(-p klio-pg --test properties -p klio-crypto --test properties
  -p klio-proto --test manifest_properties)
LIBS=(-p klio-replication -p klio-repository -p klio-server --lib)
FILTER=(properties:: generated_tasks)
cargo test --release --locked "${WHOLE[@]}" --no-run >&2
cargo test --release --locked "${LIBS[@]}" --no-run >&2
property_run() {
  KLIO_PROPERTY_SEED=$1 KLIO_PROPERTY_SCALE=$SCALE cargo test --release --locked -q "${WHOLE[@]}" &&
    KLIO_PROPERTY_SEED=$1 KLIO_PROPERTY_SCALE=$SCALE cargo test --release --locked -q "${LIBS[@]}" \
      -- "${FILTER[@]}"
}
START=$(date +%s); RUNS=0; FAILURES=0
while [ $(( $(date +%s) - START )) -lt "$PROPERTY_SECONDS" ]; do
  SEED=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
  if ! property_run "$SEED" >"$FUZZ_DIR/properties.log" 2>&1; then
    FAILURES=$((FAILURES + 1))
    echo "FAILURE with KLIO_PROPERTY_SEED=$SEED KLIO_PROPERTY_SCALE=$SCALE:" >&2
    grep -E "panicked|assert" "$FUZZ_DIR/properties.log" | head -5 >&2
  fi
  RUNS=$((RUNS + 1))
done
cat <<REPORT

== randomized property tests (no coverage guidance) ==
time: $(( $(date +%s) - START )) s, runs: $RUNS (fresh seed each, scale $SCALE), failures: $FAILURES (must be 0)
REPORT
[ "$FAILURES" -eq 0 ] && [ "${status:-0}" -eq 0 ]
