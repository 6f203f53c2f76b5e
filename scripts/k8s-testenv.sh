#!/usr/bin/env bash
# A real Kubernetes control plane for tests: etcd, kube-apiserver and
# kube-controller-manager on loopback, built from their Go modules.
#
#   scripts/k8s-testenv.sh build      build (or find) the binaries in the cache
#   scripts/k8s-testenv.sh bindir     print the cache's bin directory
#   scripts/k8s-testenv.sh up DIR     start a control plane, state in DIR
#   scripts/k8s-testenv.sh down DIR   stop it (DIR is kept)
#
# Environment:
#   KLIO_K8S_CACHE   bin directory (default /var/tmp/klio-k8s/<kube version>/bin)
#   KLIO_K8S_ROOT    root of Go's caches (default /var/tmp/klio-k8s)
# See docs/k8s-testenv.md.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
tools=$repo/tools/k8s-testenv
# shellcheck source=../tools/k8s-testenv/versions.env
. "$tools/versions.env"
# shellcheck source=../tools/k8s-testenv/goenv.sh
. "$tools/goenv.sh"
bin=${KLIO_K8S_CACHE:-$KLIO_K8S_ROOT/$KUBE_VERSION/bin}

log() { echo "k8s-testenv: $*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------- build

# The key of a built binary: its version, the wrapper module it came from and
# the flags. A binary whose recorded key differs is rebuilt.
key_of() { # name, module dir or "-", extra
	{
		echo "$1 $3"
		[[ $2 == - ]] || cat "$2/go.mod" "$2/go.sum"
	} | sha256sum | cut -c1-16
}

have() { # name, key, version-command..., expected substring is $want
	local name=$1 key=$2
	shift 2
	[[ -x $bin/$name && -f $bin/.$name.key && $(cat "$bin/.$name.key") == "$key" ]] || return 1
	"$@" 2>/dev/null | grep -qF -- "$want" || return 1
}

kube_ldflags() {
	local major=${KUBE_VERSION#v} minor
	minor=${major#*.}
	minor=${minor%%.*}
	major=${major%%.*}
	local f="-s -w" pkg
	# The same variables upstream's hack/lib/version.sh sets, in both packages.
	for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		f+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
		f+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
	done
	echo "$f"
}

build_etcd() {
	local key want=${ETCD_VERSION#v}
	key=$(key_of etcd "$tools/etcd" "$ETCD_VERSION")
	if have etcd "$key" "$bin/etcd" --version; then return; fi
	log "building etcd $ETCD_VERSION"
	(cd "$tools/etcd" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3)
	echo "$key" >"$bin/.etcd.key"
}

build_helm() {
	local key want=$HELM_VERSION
	local ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
	key=$(key_of helm - "$HELM_VERSION $ldflags")
	if have helm "$key" "$bin/helm" version --template '{{.Version}}'; then return; fi
	log "building helm $HELM_VERSION"
	# helm's go.mod has no replace directives, so plain go install works.
	(cd / && GOBIN=$bin go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v4/cmd/helm@$HELM_VERSION")
	echo "$key" >"$bin/.helm.key"
}

build_kube() {
	local key want="$KUBE_VERSION" ldflags missing=() name
	ldflags=$(kube_ldflags)
	key=$(key_of kube "$tools/kube" "$KUBE_VERSION $ldflags")
	have kube-apiserver "$key" "$bin/kube-apiserver" --version || missing+=(kube-apiserver)
	have kube-controller-manager "$key" "$bin/kube-controller-manager" --version || missing+=(kube-controller-manager)
	have kubectl "$key" "$bin/kubectl" version --client || missing+=(kubectl)
	[[ ${#missing[@]} -gt 0 ]] || return 0
	log "building ${missing[*]} $KUBE_VERSION"
	local pkgs=()
	for name in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$name"); done
	(cd "$tools/kube" && go build -trimpath -ldflags "$ldflags" -o "$bin/" "${pkgs[@]}")
	for name in "${missing[@]}"; do echo "$key" >"$bin/.$name.key"; done
}

cmd_build() {
	mkdir -p "$bin"
	# Smallest first, so a timeout still leaves something usable.
	build_etcd
	build_helm
	build_kube
	"$bin/kube-apiserver" --version >&2
	"$bin/etcd" --version | head -1 >&2
	"$bin/helm" version --short >&2
	log "binaries in $bin"
}

case "${1:-}" in
build) cmd_build ;;
bindir) echo "$bin" ;;
*) echo "usage: $0 build|bindir|up DIR|down DIR" >&2; exit 2 ;;
esac
