#!/usr/bin/env bash
# Self-test of the test control plane: build, up, exercise the apiserver and
# the controllers with the built kubectl and helm, down. Exits non-zero on any
# failure.
#
#   tools/k8s-testenv/selftest.sh [DIR]     (default DIR: /tmp/k8s-x)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
testenv=$repo/scripts/k8s-testenv.sh
dir=${1:-/tmp/k8s-x}

step() { echo "selftest: $*"; }
fail() { echo "selftest: FAILED: $*" >&2; exit 1; }

until_true() { # seconds, description, command...
	local secs=$1 what=$2 i
	shift 2
	for ((i = 0; i < secs * 2; i++)); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.5
	done
	fail "timed out after ${secs}s: $what"
}

step "build"
start=$SECONDS
"$testenv" build
step "build took $((SECONDS - start))s"
bin=$("$testenv" bindir)
kubectl=$bin/kubectl
helm=$bin/helm

step "up $dir"
start=$SECONDS
kubeconfig=$("$testenv" up "$dir")
step "up took $((SECONDS - start))s; kubeconfig $kubeconfig"
trap '"$testenv" down "$dir"' EXIT
export KUBECONFIG=$kubeconfig
set -a # DIR/env is plain KEY=value lines
# shellcheck disable=SC1091
. "$dir/env"
set +a
[[ $KUBECONFIG == "$kubeconfig" ]] || fail "$dir/env names another kubeconfig"

step "kubectl get --raw /readyz"
[[ $("$kubectl" get --raw /readyz) == ok ]] || fail "/readyz is not ok"

step "kubectl version"
version=$("$kubectl" version)
echo "$version"
[[ $version == *"Client Version: v1."* && $version == *"Server Version: v1."* ]] ||
	fail "kubectl version does not show real versions"

step "front-proxy settings published for aggregated servers"
"$kubectl" -n kube-system get configmap extension-apiserver-authentication \
	-o jsonpath='{.data.requestheader-allowed-names}' | grep -q front-proxy-client ||
	fail "extension-apiserver-authentication lacks the requestheader settings"

ns=selftest-$RANDOM
step "create namespace $ns"
"$kubectl" create namespace "$ns"
until_true 30 "ServiceAccount $ns/default (serviceaccount controller)" \
	"$kubectl" -n "$ns" get serviceaccount default

step "create StatefulSet web (1 replica)"
"$kubectl" -n "$ns" apply -f - <<YAML
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 80}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web}
spec:
  serviceName: web
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: klio.invalid/no-such-image:1}]
YAML
until_true 60 "pod web-0 created by the statefulset controller" "$kubectl" -n "$ns" get pod web-0
phase=$("$kubectl" -n "$ns" get pod web-0 -o jsonpath='{.status.phase}')
owner=$("$kubectl" -n "$ns" get pod web-0 -o jsonpath='{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}')
step "pod web-0: phase $phase, owner $owner"
[[ $phase == Pending ]] || fail "pod web-0 is $phase, expected Pending (no kubelet)"
[[ $owner == StatefulSet/web ]] || fail "pod web-0 is owned by $owner"

step "delete namespace $ns"
"$kubectl" delete namespace "$ns" --wait=false
ns_gone() { # the list succeeds and does not name $ns
	local out
	out=$("$kubectl" get namespaces -o name) || return 1
	! grep -qx "namespace/$ns" <<<"$out"
}
until_true 90 "namespace $ns gone (namespace controller)" ns_gone
step "namespace $ns is gone"

step "helm version"
"$helm" version
[[ $("$helm" version --template '{{.Version}}') == v4.* ]] || fail "helm is not v4"
"$helm" list -A >/dev/null || fail "helm cannot talk to the apiserver"

step "down"
trap - EXIT
start=$SECONDS
"$testenv" down "$dir"
step "down took $((SECONDS - start))s"
for pid in "$ETCD_PID" "$KUBE_APISERVER_PID" "$KUBE_CONTROLLER_MANAGER_PID"; do
	kill -0 "$pid" 2>/dev/null && fail "process $pid still running after down"
done
step "all checks passed"
