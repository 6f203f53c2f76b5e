#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Regenerate the wrapper modules' go.mod/go.sum from the upstream versions.
#
#   tools/k8s-testenv/gen-gomod.sh            # uses the versions in versions.env
#
# kube/: k8s.io/kubernetes requires each staging module at v0.0.0 and replaces
# it with ./staging/src/k8s.io/<name>; replaces only apply in the main module,
# so we copy every such line from that version's go.mod, pointing at the
# published k8s.io/<name> v0.<minor>.<patch> instead (never hand-copied).
# etcd/: go.etcd.io/etcd/server/v3 has ../ replaces, so it too needs a wrapper.
# cnpg/: CloudNativePG has no replaces, but `go install pkg@version` asks the
# proxy for the module's version list (to look up deprecations), which the
# proxy here refuses (403); building a tool of a wrapper module does not.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
# shellcheck source=goenv.sh
. "$here/goenv.sh"

staging_version="v0.${KUBE_VERSION#v1.}"

gen_kube() {
	local dir=$here/kube gomod
	gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
		sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
	[[ -f $gomod ]] || { echo "gen-gomod: no go.mod for k8s.io/kubernetes@$KUBE_VERSION" >&2; exit 1; }
	rm -f "$dir/go.mod" "$dir/go.sum"
	(
		cd "$dir"
		go mod init klio.test/k8s-testenv/kube
		go mod edit -go=1.26.0 -godebug=default=go1.26
		go mod edit -require="k8s.io/kubernetes@$KUBE_VERSION"
		local args=() name
		while read -r name; do
			args+=("-replace=k8s.io/$name=k8s.io/$name@$staging_version")
		done < <(sed -n 's|^[[:space:]]*k8s.io/\([^ ]*\) => ./staging/src/k8s.io/\1[[:space:]]*$|\1|p' "$gomod")
		[[ ${#args[@]} -gt 0 ]] || { echo "gen-gomod: no staging replaces found in $gomod" >&2; exit 1; }
		echo "gen-gomod: ${#args[@]} staging replaces at $staging_version"
		go mod edit "${args[@]}"
		go get -tool k8s.io/kubernetes/cmd/kube-apiserver \
			k8s.io/kubernetes/cmd/kube-controller-manager \
			k8s.io/kubernetes/cmd/kubectl
		go mod tidy
	)
}

gen_etcd() {
	local dir=$here/etcd
	rm -f "$dir/go.mod" "$dir/go.sum"
	(
		cd "$dir"
		go mod init klio.test/k8s-testenv/etcd
		go mod edit -go=1.26.0
		go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
		go get -tool go.etcd.io/etcd/server/v3
		go mod tidy
	)
}

gen_cnpg() {
	local dir=$here/cnpg
	mkdir -p "$dir"
	rm -f "$dir/go.mod" "$dir/go.sum"
	(
		cd "$dir"
		go mod init klio.test/k8s-testenv/cnpg
		go mod edit -go=1.26.0
		go mod edit -require="github.com/cloudnative-pg/cloudnative-pg@$CNPG_VERSION"
		# Not `go get -tool`: it would ask the proxy whether cmd/manager is a module
		# of its own (a version list, refused as above).
		go mod edit -tool=github.com/cloudnative-pg/cloudnative-pg/cmd/manager
		go mod tidy
	)
}

case "${1:-all}" in
kube) gen_kube ;;
etcd) gen_etcd ;;
cnpg) gen_cnpg ;;
all) gen_kube; gen_etcd; gen_cnpg ;;
*) echo "usage: $0 [kube|etcd|cnpg|all]" >&2; exit 2 ;;
esac
