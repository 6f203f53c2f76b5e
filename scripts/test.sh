#!/usr/bin/env bash
# Sets up what the tests need and runs the whole test suite (the README's second command;
# CI runs exactly this through .ci/run). Real PostgreSQL is used (15 from the system, 16-18
# from scripts/install-pg-majors.sh); nothing is mocked.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/klio-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Seconds of pgbench load in the long end-to-end test ("several minutes" in CI).
export KLIO_TEST_LOAD_SECS="${KLIO_TEST_LOAD_SECS:-150}"
export KLIO_SYNC_ITERATIONS="${KLIO_SYNC_ITERATIONS:-25}"

PG_BIN="${KLIO_PG_BIN:-/usr/lib/postgresql/15/bin}"
if [ ! -x "$PG_BIN/postgres" ]; then
  echo "PostgreSQL 15 binaries not found in $PG_BIN; installing postgresql-15" >&2
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15
fi
if ! id postgres >/dev/null 2>&1; then
  echo "error: the tests run PostgreSQL as the OS user \"postgres\", which does not exist" >&2
  exit 1
fi

# PostgreSQL 16, 17 and 18 for the version-matrix tests (crates/klio/tests/pg_majors.rs):
# pinned npm server builds cached in /var/tmp/klio-pg (KLIO_PG_MAJORS_DIR); fast when cached.
bash scripts/install-pg-majors.sh

# The NATS JetStream server of the work-queue tests (Debian package).
if ! command -v nats-server >/dev/null 2>&1; then
  echo "installing nats-server (work-queue tests)" >&2
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nats-server
fi
# The S3-compatible server of the Tier 2 tests (moto, from PyPI).
if ! python3 -c 'import moto.server, flask' >/dev/null 2>&1; then
  echo "installing moto[server] (S3-compatible server for the Tier 2 tests)" >&2
  python3 -m pip install -q 'moto[server]==5.2.1' 2>/dev/null \
    || python3 -m pip install -q --break-system-packages 'moto[server]==5.2.1'
fi

# Headless Chromium, which renders `klio report`'s page in the observability tests.
if [ ! -x /usr/bin/chromium ]; then
  echo "installing chromium (report rendering test)" >&2
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi

# The Kubernetes control plane of the CRD and operator tests (etcd, kube-apiserver,
# kube-controller-manager, kubectl, helm) and the CloudNativePG operator (cnpg-manager and
# its CRDs), built from Go modules into /var/tmp/klio-k8s (KLIO_K8S_ROOT): about 15 min
# cold, instant when cached. See docs/k8s-testenv.md.
bash scripts/k8s-testenv.sh build

echo "== format, lints, docs"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

echo "== tests"
# The generated CRD YAML (deploy/charts/klio/crds) is checked for drift by the unit test
# crd_yaml::tests::checked_in_yaml_matches_types of klio-k8s-types, part of the run below.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --failure-output final
else
  cargo test --workspace --locked --no-fail-fast
fi
