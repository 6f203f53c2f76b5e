# shellcheck shell=bash
# Sourced: Go environment for building the test control plane.
# Everything Go fetches or caches lives outside the work tree.
export PATH=/usr/local/go/bin:$PATH
KLIO_K8S_ROOT=${KLIO_K8S_ROOT:-/var/tmp/klio-k8s}
export GOMODCACHE=${KLIO_K8S_GOMODCACHE:-$KLIO_K8S_ROOT/go-mod}
export GOCACHE=${KLIO_K8S_GOCACHE:-$KLIO_K8S_ROOT/go-build}
export GOFLAGS=-modcacherw
export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOWORK=off
