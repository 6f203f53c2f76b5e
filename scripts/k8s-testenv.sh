#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# A real Kubernetes control plane for tests: etcd, kube-apiserver and
# kube-controller-manager on loopback, built from their Go modules (and the other Go-built
# test peers: helm, the CloudNativePG operator, versitygw for the Tier 2 tests, Prometheus).
#
#   scripts/k8s-testenv.sh build      build (or find) the binaries in the cache
#   scripts/k8s-testenv.sh bindir     print the cache's bin directory
#   scripts/k8s-testenv.sh cnpg-dir   print the CloudNativePG operator's directory
#                                     (bin/cnpg-manager, crds/*.yaml)
#   scripts/k8s-testenv.sh up DIR     start a control plane, state in DIR
#   scripts/k8s-testenv.sh down DIR   stop it (DIR is kept)
#
# Environment:
#   KLIO_K8S_CACHE   bin directory (default /var/tmp/klio-k8s/<kube version>/bin)
#   KLIO_K8S_ROOT    root of Go's caches (default /var/tmp/klio-k8s)
#   KLIO_K8S_CNPG_DIR  CloudNativePG's directory (default <root>/cnpg-<version>)
# See docs/k8s-testenv.md.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
tools=$repo/tools/k8s-testenv
# shellcheck source=../tools/k8s-testenv/versions.env
. "$tools/versions.env"
# shellcheck source=../tools/k8s-testenv/goenv.sh
. "$tools/goenv.sh"
bin=${KLIO_K8S_CACHE:-$KLIO_K8S_ROOT/$KUBE_VERSION/bin}
cnpg_dir=${KLIO_K8S_CNPG_DIR:-$KLIO_K8S_ROOT/cnpg-$CNPG_VERSION}

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
	# No pipe into grep -q: with pipefail, the writer's SIGPIPE would count as failure.
	[[ $("$@" 2>/dev/null) == *"$want"* ]]
}

have_in() { # dir, then as have: the binary lives in dir, not in the bin directory
	local bin=$1
	shift
	have "$@"
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

# versitygw, the second S3-compatible server of the Tier 2 tests (after moto): a production
# S3 gateway, run on its posix backend.
build_versitygw() {
	local key want=$VERSITYGW_VERSION
	local ldflags="-s -w -X main.Version=$VERSITYGW_VERSION"
	key=$(key_of versitygw - "$VERSITYGW_VERSION $ldflags")
	if have versitygw "$key" "$bin/versitygw" --version; then return; fi
	log "building versitygw $VERSITYGW_VERSION"
	(cd / && GOBIN=$bin go install -trimpath -ldflags "$ldflags" "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION")
	echo "$key" >"$bin/.versitygw.key"
}

# Prometheus and promtool, for the metrics tests (scrapes, PromQL, alerting rules).
build_prometheus() {
	local key want=$PROMETHEUS_VERSION
	local ldflags="-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION"
	key=$(key_of prometheus - "$PROMETHEUS_VERSION $ldflags")
	if have prometheus "$key" "$bin/prometheus" --version && have promtool "$key" "$bin/promtool" --version; then
		return
	fi
	log "building prometheus and promtool $PROMETHEUS_VERSION"
	(cd / && GOBIN=$bin go install -trimpath -ldflags "$ldflags" \
		"github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE_VERSION" \
		"github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION")
	echo "$key" >"$bin/.prometheus.key"
	echo "$key" >"$bin/.promtool.key"
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

# The CloudNativePG operator: cmd/manager, a tool of the wrapper module
# tools/k8s-testenv/cnpg (see gen-gomod.sh for why not `go install pkg@version`),
# and the module's CRDs next to it.
build_cnpg() {
	local module=github.com/cloudnative-pg/cloudnative-pg
	local pkg=github.com/cloudnative-pg/cloudnative-pg/pkg/versions
	local crds=$cnpg_dir/crds
	local ldflags="-s -w -X $pkg.buildVersion=${CNPG_VERSION#v} -X $pkg.buildDate=1970-01-01T00:00:00Z"
	local key want="Version:${CNPG_VERSION#v} "
	key=$(key_of cnpg-manager "$tools/cnpg" "$CNPG_VERSION $ldflags")
	if have_in "$cnpg_dir/bin" cnpg-manager "$key" "$cnpg_dir/bin/cnpg-manager" version &&
		[[ -f $crds/.key && $(cat "$crds/.key") == "$key" ]]; then
		return
	fi
	log "building cnpg-manager $CNPG_VERSION"
	mkdir -p "$cnpg_dir/bin"
	# The commit the version's tag names, as upstream's goreleaser stamps it.
	local info commit
	info=$(cd "$tools/cnpg" && go mod download -json "$module@$CNPG_VERSION")
	commit=$(sed -n 's/^[[:space:]]*"Hash": "\([0-9a-f]*\)".*/\1/p' <<<"$info")
	(cd "$tools/cnpg" && go build -trimpath -ldflags "$ldflags -X $pkg.buildCommit=${commit:-none}" \
		-o "$cnpg_dir/bin/cnpg-manager" "$module/cmd/manager")
	echo "$key" >"$cnpg_dir/bin/.cnpg-manager.key"
	# The CRDs are in the module zip (config/crd/bases), read-only in the module cache.
	rm -rf "$crds"
	mkdir -p "$crds"
	cp "$(go env GOMODCACHE)/$module@$CNPG_VERSION"/config/crd/bases/*.yaml "$crds/"
	chmod 644 "$crds"/*.yaml
	echo "$key" >"$crds/.key"
}

cmd_build() {
	mkdir -p "$bin"
	# Smallest first, so a timeout still leaves something usable; the control plane
	# before CloudNativePG, which only some tests need.
	build_etcd
	build_helm
	build_versitygw
	build_prometheus
	build_kube
	build_cnpg
	"$bin/kube-apiserver" --version >&2
	"$bin/etcd" --version >&2
	"$bin/helm" version --short >&2
	"$cnpg_dir/bin/cnpg-manager" version >&2
	log "binaries in $bin; CloudNativePG in $cnpg_dir"
}

# ---------------------------------------------------------------- up / down

# Services get addresses from TEST-NET-2 (RFC 5737), never routed anywhere;
# nothing in this environment dials a ClusterIP (no kube-proxy, and the
# aggregator and webhooks resolve Services through their endpoints).
service_cidr=${KLIO_K8S_SERVICE_CIDR:-198.51.100.0/24}
kubernetes_service_ip=${service_cidr%.*}.1

taken_ports=" "
# Below the kernel's ephemeral range: a port chosen there can be taken by any outgoing
# connection (kubectl, the tests' clients) before the server binds it.
ephemeral_low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
((ephemeral_low > 21000)) || ephemeral_low=32768
free_port() { # sets $port: a TCP port no socket uses, not one we already took
	while :; do
		port=$((20000 + RANDOM % (ephemeral_low - 20000)))
		[[ $taken_ports == *" $port "* ]] && continue
		[[ -z $(ss -Htan "sport = :$port") ]] && break
	done
	taken_ports+="$port "
}

# pki/: one cluster CA (serving and client certs), a front-proxy CA for the
# aggregation layer, and the service-account signing key pair.
gen_pki() {
	local pki=$1
	mkdir -p "$pki"
	(
		cd "$pki"
		umask 077
		exec 2>"$pki/openssl.log"
		ca() { # name, CN
			openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
				-keyout "$1.key" -out "$1.crt" -days 3650 -subj "/CN=$2" \
				-addext basicConstraints=critical,CA:TRUE \
				-addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature
		}
		leaf() { # name, CA, subject, extendedKeyUsage, [subjectAltName]
			local ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$4"
			[[ -n ${5:-} ]] && ext+="
subjectAltName=$5"
			openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
				-keyout "$1.key" -out "$1.csr" -subj "$3"
			openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -CAcreateserial \
				-days 3650 -out "$1.crt" -extfile <(echo "$ext")
			rm -f "$1.csr"
		}
		ca ca klio-test-ca
		ca front-proxy-ca klio-test-front-proxy-ca
		leaf apiserver ca /CN=kube-apiserver serverAuth \
			"IP:127.0.0.1,DNS:localhost,IP:$kubernetes_service_ip,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
		leaf kube-controller-manager-serving ca /CN=kube-controller-manager serverAuth "IP:127.0.0.1,DNS:localhost"
		leaf admin ca "/O=system:masters/CN=klio-test-admin" clientAuth
		leaf kube-controller-manager ca /CN=system:kube-controller-manager clientAuth
		leaf front-proxy-client front-proxy-ca /CN=front-proxy-client clientAuth
		openssl ecparam -name prime256v1 -genkey -noout | openssl pkey -out sa.key
		openssl pkey -in sa.key -pubout -out sa.pub
		rm -f ./*.srl
	)
}

write_kubeconfig() { # file, port, client cert name, pki dir
	local b64='base64 -w0'
	cat >"$1" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: klio-test
  cluster:
    server: https://127.0.0.1:$2
    certificate-authority-data: $($b64 <"$4/ca.crt")
users:
- name: $3
  user:
    client-certificate-data: $($b64 <"$4/$3.crt")
    client-key-data: $($b64 <"$4/$3.key")
contexts:
- name: klio-test
  context:
    cluster: klio-test
    user: $3
current-context: klio-test
KUBECONFIG
	chmod 600 "$1"
}

start() { # name, dir, command...  (own session, logs in dir/logs)
	local name=$1 dir=$2
	shift 2
	setsid "$@" </dev/null >"$dir/logs/$name.log" 2>&1 &
	echo "$!" >"$dir/run/$name.pid"
	log "started $name (pid $!)"
}

wait_for() { # what, seconds, process-name, command...
	local what=$1 secs=$2 proc=$3 i
	shift 3
	for ((i = 0; i < secs * 4; i++)); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		if ! kill -0 "$(cat "$dir/run/$proc.pid")" 2>/dev/null; then
			tail -n 30 "$dir/logs/$proc.log" >&2
			die "$proc exited while waiting for $what (log: $dir/logs/$proc.log)"
		fi
		sleep 0.25
	done
	tail -n 30 "$dir/logs/$proc.log" >&2
	die "timed out after ${secs}s waiting for $what (log: $dir/logs/$proc.log)"
}

get_ok() { # url, client cert name: GET must answer exactly "ok"
	[[ $(curl -sS --noproxy '*' --max-time 5 --cacert "$dir/pki/ca.crt" \
		--cert "$dir/pki/$2.crt" --key "$dir/pki/$2.key" "$1") == ok ]]
}

cmd_up() {
	dir=${1:?usage: $0 up DIR}
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	[[ $dir != *[[:space:]]* ]] || die "DIR must not contain whitespace: '$dir'"
	[[ ! -f $dir/run/kube-apiserver.pid ]] || ! kill -0 "$(cat "$dir/run/kube-apiserver.pid")" 2>/dev/null ||
		die "a control plane is already running in $dir (run: $0 down $dir)"
	local b
	for b in etcd kube-apiserver kube-controller-manager kubectl; do
		[[ -x $bin/$b ]] || die "missing $bin/$b (run: $0 build)"
	done
	rm -rf "$dir/pki" "$dir/etcd" "$dir/run" "$dir/logs"
	mkdir -p "$dir/run" "$dir/logs"
	trap 'log "up failed (exit $?); stopping what was started; logs in $dir/logs, $dir/pki/openssl.log"; cmd_down "$dir" || true' EXIT

	local etcd_port etcd_peer_port apiserver_port kcm_port
	local port
	free_port; etcd_port=$port
	free_port; etcd_peer_port=$port
	free_port; apiserver_port=$port
	free_port; kcm_port=$port
	gen_pki "$dir/pki"
	write_kubeconfig "$dir/kubeconfig" "$apiserver_port" admin "$dir/pki"
	write_kubeconfig "$dir/kube-controller-manager.kubeconfig" "$apiserver_port" kube-controller-manager "$dir/pki"

	local etcd_url=http://127.0.0.1:$etcd_port
	start etcd "$dir" "$bin/etcd" \
		--name=klio-test --data-dir="$dir/etcd" \
		--listen-client-urls="$etcd_url" --advertise-client-urls="$etcd_url" \
		--listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
		--initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
		--initial-cluster="klio-test=http://127.0.0.1:$etcd_peer_port" \
		--unsafe-no-fsync=true --quota-backend-bytes=$((2 * 1024 * 1024 * 1024)) \
		--log-level=warn
	wait_for "etcd /health" 30 etcd \
		bash -c "curl -sS --noproxy '*' --max-time 2 $etcd_url/health | grep -q '\"health\":\"true\"'"

	local pki=$dir/pki
	start kube-apiserver "$dir" "$bin/kube-apiserver" \
		--etcd-servers="$etcd_url" \
		--bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$apiserver_port" \
		--cert-dir="$pki" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
		--client-ca-file="$pki/ca.crt" \
		--authorization-mode=RBAC \
		--service-cluster-ip-range="$service_cidr" \
		--endpoint-reconciler-type=none \
		--allow-privileged=true \
		--disable-admission-plugins=StorageObjectInUseProtection \
		--service-account-issuer="https://127.0.0.1:$apiserver_port" \
		--service-account-key-file="$pki/sa.pub" \
		--service-account-signing-key-file="$pki/sa.key" \
		--requestheader-client-ca-file="$pki/front-proxy-ca.crt" \
		--requestheader-allowed-names=front-proxy-client \
		--requestheader-username-headers=X-Remote-User \
		--requestheader-group-headers=X-Remote-Group \
		--requestheader-extra-headers-prefix=X-Remote-Extra- \
		--requestheader-uid-headers=X-Remote-Uid \
		--proxy-client-cert-file="$pki/front-proxy-client.crt" \
		--proxy-client-key-file="$pki/front-proxy-client.key" \
		--enable-aggregator-routing="${KLIO_K8S_AGGREGATOR_ROUTING:-true}" \
		--profiling=false
	wait_for "kube-apiserver /readyz" 120 kube-apiserver get_ok "https://127.0.0.1:$apiserver_port/readyz" admin

	local kcm_kubeconfig=$dir/kube-controller-manager.kubeconfig
	start kube-controller-manager "$dir" "$bin/kube-controller-manager" \
		--kubeconfig="$kcm_kubeconfig" \
		--authentication-kubeconfig="$kcm_kubeconfig" \
		--authorization-kubeconfig="$kcm_kubeconfig" \
		--bind-address=127.0.0.1 --secure-port="$kcm_port" \
		--tls-cert-file="$pki/kube-controller-manager-serving.crt" \
		--tls-private-key-file="$pki/kube-controller-manager-serving.key" \
		--client-ca-file="$pki/ca.crt" \
		--requestheader-client-ca-file="$pki/front-proxy-ca.crt" \
		--leader-elect=false \
		--use-service-account-credentials=true \
		--service-account-private-key-file="$pki/sa.key" \
		--root-ca-file="$pki/ca.crt" \
		--controllers="${KLIO_K8S_CONTROLLERS:-$default_controllers}" \
		--profiling=false
	wait_for "kube-controller-manager /healthz" 60 kube-controller-manager \
		get_ok "https://127.0.0.1:$kcm_port/healthz" admin
	# The serviceaccount controller has run once the default namespace has its
	# "default" ServiceAccount; pods created before that are refused.
	wait_for "ServiceAccount default/default" 60 kube-controller-manager \
		"$bin/kubectl" --kubeconfig="$dir/kubeconfig" get serviceaccount default -n default

	cat >"$dir/env" <<ENV
KUBECONFIG=$dir/kubeconfig
KLIO_K8S_BIN=$bin
KLIO_K8S_SERVER=https://127.0.0.1:$apiserver_port
KLIO_K8S_CA=$pki/ca.crt
KLIO_K8S_FRONT_PROXY_CA=$pki/front-proxy-ca.crt
KLIO_K8S_SERVICE_CIDR=$service_cidr
ETCD_PORT=$etcd_port
ETCD_PEER_PORT=$etcd_peer_port
KUBE_APISERVER_PORT=$apiserver_port
KUBE_CONTROLLER_MANAGER_PORT=$kcm_port
ETCD_PID=$(cat "$dir/run/etcd.pid")
KUBE_APISERVER_PID=$(cat "$dir/run/kube-apiserver.pid")
KUBE_CONTROLLER_MANAGER_PID=$(cat "$dir/run/kube-controller-manager.pid")
ENV
	trap - EXIT
	echo "$dir/kubeconfig"
}

# The controllers a test may need without a kubelet or a cloud.
default_controllers=namespace-controller,garbage-collector-controller,serviceaccount-controller,serviceaccount-token-controller,statefulset-controller,job-controller,cronjob-controller,replicaset-controller,deployment-controller,daemonset-controller,endpoints-controller,endpointslice-controller,endpointslice-mirroring-controller,resourcequota-controller,disruption-controller,clusterrole-aggregation-controller,root-ca-certificate-publisher-controller,ttl-after-finished-controller,persistentvolume-binder-controller,service-cidr-controller

cmd_down() {
	local dir=${1:?usage: $0 down DIR} name pid i
	[[ -d $dir/run ]] || { log "nothing running in $dir"; return 0; }
	# Reverse order: the controller manager, then the apiserver, then etcd.
	for name in kube-controller-manager kube-apiserver etcd; do
		[[ -f $dir/run/$name.pid ]] || continue
		pid=$(cat "$dir/run/$name.pid")
		if kill -0 "$pid" 2>/dev/null; then
			kill -TERM "$pid" 2>/dev/null || true
			for ((i = 0; i < 80; i++)); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.25
			done
			if kill -0 "$pid" 2>/dev/null; then
				log "$name (pid $pid) ignored SIGTERM for 20s; killing"
				kill -KILL "$pid" 2>/dev/null || true
			fi
			log "stopped $name (pid $pid)"
		fi
		rm -f "$dir/run/$name.pid"
	done
}

case "${1:-}" in
build) cmd_build ;;
up) cmd_up "${2:-}" ;;
down) cmd_down "${2:-}" ;;
bindir) echo "$bin" ;;
cnpg-dir) echo "$cnpg_dir" ;;
*) echo "usage: $0 build|bindir|cnpg-dir|up DIR|down DIR" >&2; exit 2 ;;
esac
