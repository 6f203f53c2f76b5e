//! The real CloudNativePG operator (`manager controller` of CloudNativePG, built by
//! `scripts/k8s-testenv.sh build` as `cnpg-manager`) against a [`K8sTestEnv`] control plane.
//!
//! The operator reaches CNPG-I plugins at `<service>.<namespace>.svc:<port>`; it runs with
//! `HTTPS_PROXY` pointing at a [`ConnectProxy`] that maps those names to loopback addresses
//! given by the test ([`CnpgOperator::route`]). Its API-server traffic goes straight to
//! `https://127.0.0.1` (`NO_PROXY`).

#![allow(clippy::unwrap_used)] // test fixtures: a failure is a panic with the reason

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::{ChildGuard, ConnectProxy, K8sTestEnv, ScratchDir, k8s_testenv_script, wait_until};

const BUILD_HINT: &str = "HINT: build it with \"bash scripts/k8s-testenv.sh build\" (CloudNativePG adds about 2 min cold, instant when cached in /var/tmp/klio-k8s); scripts/test.sh does this before the tests";

/// The directory holding CloudNativePG's `bin/cnpg-manager` and `crds/*.yaml`
/// (`scripts/k8s-testenv.sh cnpg-dir`); panics, naming the build command, when either is
/// missing.
pub fn cnpg_dir() -> PathBuf {
    let script = k8s_testenv_script();
    let out = Command::new("bash")
        .arg(&script)
        .arg("cnpg-dir")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run \"{}\": {e}", script.display()));
    assert!(
        out.status.success(),
        "\"{} cnpg-dir\" failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    check_cnpg_dir(&dir);
    dir
}

fn check_cnpg_dir(dir: &Path) {
    let manager = dir.join("bin/cnpg-manager");
    assert!(
        manager.is_file(),
        "the CloudNativePG operator is missing: no \"{}\"\n{BUILD_HINT}",
        manager.display()
    );
    let crd = dir.join("crds/postgresql.cnpg.io_clusters.yaml");
    assert!(
        crd.is_file(),
        "CloudNativePG's CRDs are missing: no \"{}\"\n{BUILD_HINT}",
        crd.display()
    );
}

/// A running CloudNativePG operator (`cnpg-manager controller`), killed on drop.
///
/// [`CnpgOperator::start`] installs CloudNativePG's CRDs (once per control plane), creates the
/// operator namespace, starts a [`ConnectProxy`] and the operator with:
/// `--leader-elect=false --metrics-bind-address=0 --webhook-port=<free port>`, `KUBECONFIG`
/// (the admin kubeconfig), `OPERATOR_NAMESPACE`, `WEBHOOK_CERT_DIR` (a self-signed
/// `apiserver.crt`/`apiserver.key`, so the operator creates no PKI of its own; no webhook
/// configuration is installed: v1.30 defaults and validates in its reconcilers),
/// `HTTPS_PROXY=<the proxy>`, `NO_PROXY=127.0.0.1,localhost`, and a working directory holding
/// `operator/manager_<arch>` (the operator's architecture check globs it). Its output goes to
/// [`CnpgOperator::log_path`]; the tail is printed when a test panics.
///
/// A guardian process kills the operator if the test process dies without dropping the
/// fixture.
pub struct CnpgOperator {
    child: Option<ChildGuard>,
    guardian: Option<ChildGuard>,
    proxy: ConnectProxy,
    namespace: String,
    log: PathBuf,
    webhook_port: u16,
    // Dropped last: the log stays until the operator is gone.
    scratch: ScratchDir,
}

impl CnpgOperator {
    /// Starts the operator watching `env` with `OPERATOR_NAMESPACE=operator_namespace` (created
    /// if missing). `proxy_targets` are the first routes of its proxy (see
    /// [`CnpgOperator::route`]), e.g. `&[("klio-plugin.cnpg-system.svc:9090", addr)]`.
    pub fn start(
        env: &K8sTestEnv,
        operator_namespace: &str,
        proxy_targets: &[(&str, SocketAddr)],
    ) -> CnpgOperator {
        let dir = cnpg_dir();
        install_cnpg_crds(env, &dir);
        env.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {operator_namespace}\n"
        ));

        let proxy = ConnectProxy::start().unwrap_or_else(|e| panic!("{e:#}"));
        for (authority, target) in proxy_targets {
            proxy
                .route(authority, *target)
                .unwrap_or_else(|e| panic!("{e:#}"));
        }

        let scratch = crate::scratch_dir();
        let certs = scratch.path().join("webhook-certs");
        write_self_signed_cert(&certs);
        // The operator globs operator/manager_* relative to its working directory to learn
        // which architectures its image offers.
        let work = scratch.path().join("work");
        std::fs::create_dir_all(work.join("operator")).unwrap();
        std::os::unix::fs::symlink(
            dir.join("bin/cnpg-manager"),
            work.join("operator").join(format!("manager_{}", go_arch())),
        )
        .unwrap();

        let log = scratch.path().join("cnpg-manager.log");
        let out = std::fs::File::create(&log).unwrap();
        let webhook_port = crate::free_port();
        let mut cmd = Command::new(dir.join("bin/cnpg-manager"));
        cmd.args([
            "controller",
            "--leader-elect=false",
            "--metrics-bind-address=0",
            &format!("--webhook-port={webhook_port}"),
        ])
        .current_dir(&work)
        .env("KUBECONFIG", env.kubeconfig())
        .env("OPERATOR_NAMESPACE", operator_namespace)
        .env("WEBHOOK_CERT_DIR", &certs)
        .env("HTTPS_PROXY", proxy.url())
        .env("NO_PROXY", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
        // Only our proxy: none from the caller's environment, no in-cluster configuration.
        for var in [
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
            "no_proxy",
            "KUBERNETES_SERVICE_HOST",
            "KUBERNETES_SERVICE_PORT",
            "WATCH_NAMESPACE",
        ] {
            cmd.env_remove(var);
        }
        let child = ChildGuard::spawn(&mut cmd).unwrap_or_else(|e| panic!("{e:#}"));
        let guardian = spawn_guardian(child.id());
        let mut operator = CnpgOperator {
            child: Some(child),
            guardian: Some(guardian),
            proxy,
            namespace: operator_namespace.to_string(),
            log,
            webhook_port,
            scratch,
        };
        operator.wait_started();
        operator
    }

    /// Waits until the operator has started its controllers (its log says so), failing early
    /// if it exits.
    fn wait_started(&mut self) {
        let log = self.log.clone();
        let child = self.child.as_mut().unwrap();
        let result = wait_until(
            Duration::from_secs(60),
            Duration::from_millis(200),
            "the CloudNativePG operator to start its controllers",
            || {
                if !child.is_running() {
                    anyhow::bail!("cnpg-manager exited");
                }
                let text = std::fs::read_to_string(&log)?;
                Ok(text.contains("Starting workers"))
            },
        );
        if let Err(e) = result {
            panic!("{e:#}\n{}", self.log_tail(60));
        }
    }

    /// Routes the operator's `CONNECT <authority>` (`<service>.<namespace>.svc:<port>`) to
    /// `target`, a loopback address.
    pub fn route(&self, authority: &str, target: SocketAddr) -> anyhow::Result<()> {
        self.proxy.route(authority, target)
    }

    /// The proxy the operator dials plugins through ([`ConnectProxy::events`] shows what it
    /// asked for).
    pub fn proxy(&self) -> &ConnectProxy {
        &self.proxy
    }

    /// The operator's namespace (`OPERATOR_NAMESPACE`), where it looks for plugin Services.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The port of the operator's webhook server (HTTPS, self-signed `CN=cnpg-webhook`).
    pub fn webhook_port(&self) -> u16 {
        self.webhook_port
    }

    /// The fixture's scratch directory (`work/` is the operator's working directory,
    /// `webhook-certs/` its `WEBHOOK_CERT_DIR`); removed on drop unless `KLIO_KEEP_SCRATCH=1`.
    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }

    /// The operator's log file (stdout and stderr, JSON lines).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The operator's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the operator's log, with a header naming the file.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!("--- last lines of {} ---\n{tail}", self.log.display())
    }

    /// Whether the operator process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }
}

impl Drop for CnpgOperator {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(80));
            eprintln!("proxy events: {:#?}", self.proxy.events());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
        }
        self.guardian.take();
    }
}

/// Applies CloudNativePG's CRDs (server-side: `clusters` and `poolers` exceed the
/// client-side apply annotation limit) and waits until they are Established; once per
/// control plane.
fn install_cnpg_crds(env: &K8sTestEnv, dir: &Path) {
    static INSTALLED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if installed.iter().any(|url| url == env.server_url()) {
        return;
    }
    let crds = dir.join("crds");
    let crds = crds.to_str().unwrap();
    env.kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--field-manager=klio-test",
            "-f",
            crds,
        ],
        None,
    );
    // Each file is `<group>_<plural>.yaml`, the CRD `<plural>.<group>`.
    let mut names: Vec<String> = std::fs::read_dir(crds)
        .unwrap()
        .filter_map(|e| {
            let file = e.ok()?.file_name().into_string().ok()?;
            let (group, plural) = file.strip_suffix(".yaml")?.split_once('_')?;
            Some(format!("{plural}.{group}"))
        })
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no CRD files in {crds}");
    env.wait_established(&names.iter().map(String::as_str).collect::<Vec<_>>());
    installed.push(env.server_url().to_string());
}

/// `apiserver.crt`/`apiserver.key` in `dir`: a self-signed pair for the operator's webhook
/// server.
fn write_self_signed_cert(dir: &Path) {
    self_signed_tls(
        dir,
        "apiserver",
        "cnpg-webhook",
        "IP:127.0.0.1,DNS:localhost",
    );
}

/// Writes `<dir>/<name>.crt` and `<dir>/<name>.key`: a self-signed ECDSA P-256 certificate
/// (`CN=<cn>`, `subjectAltName=<sans>` in openssl's syntax, e.g. `DNS:klio-plugin`, usable for
/// both serverAuth and clientAuth) and its key, with the openssl CLI as
/// `scripts/k8s-testenv.sh` uses it. For a CNPG-I plugin, one such pair is the server Secret
/// (its certificate is also the operator's trust root; the operator checks the name in the
/// Service's `cnpg.io/pluginServerName` annotation, else the Service name) and another the
/// client Secret. Returns the two paths.
pub fn self_signed_tls(dir: &Path, name: &str, cn: &str, sans: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            &format!("subjectAltName={sans}"),
            "-addext",
            "extendedKeyUsage=serverAuth,clientAuth",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl: {e}"));
    assert!(
        out.status.success(),
        "openssl req (certificate \"{name}\") failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (crt, key)
}

/// Go's name of this machine's architecture (`GOARCH`).
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// `setsid sh`: kills `pid` (the operator) once this process has exited, so a test killed
/// with SIGKILL leaves no operator behind. Its own session, so a signal to the test's process
/// group does not take it down first.
fn spawn_guardian(pid: u32) -> ChildGuard {
    let mut cmd = Command::new("setsid");
    cmd.args([
        "sh",
        "-c",
        r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done
exec kill -KILL "$2" 2>/dev/null"#,
        "cnpg-operator-guardian",
    ])
    .arg(std::process::id().to_string())
    .arg(pid.to_string())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    ChildGuard::spawn(&mut cmd).unwrap_or_else(|e| panic!("cannot start the guardian: {e:#}"))
}

/// The files of a CNPG-I plugin's certificate pair (see [`plugin_tls_secrets`]).
pub struct PluginTls {
    pub server_crt: PathBuf,
    pub server_key: PathBuf,
    pub client_crt: PathBuf,
    pub client_key: PathBuf,
}

/// Writes a self-signed server certificate for `service` and one for CloudNativePG's client
/// into `dir`, and stores them in `namespace` as the `kubernetes.io/tls` Secrets
/// `klio-plugin-server-tls` and `klio-plugin-client-tls` (the chart's default names).
pub fn plugin_tls_secrets(
    env: &K8sTestEnv,
    namespace: &str,
    dir: &Path,
    service: &str,
) -> PluginTls {
    let (server_crt, server_key) =
        self_signed_tls(dir, "server", service, &format!("DNS:{service}"));
    let (client_crt, client_key) =
        self_signed_tls(dir, "client", "cnpg-operator", "DNS:cnpg-operator");
    for (name, crt, key) in [
        ("klio-plugin-server-tls", &server_crt, &server_key),
        ("klio-plugin-client-tls", &client_crt, &client_key),
    ] {
        let crt = format!("--cert={}", crt.display());
        let key = format!("--key={}", key.display());
        env.kubectl_ok(
            &["create", "secret", "tls", name, "-n", namespace, &crt, &key],
            None,
        );
    }
    PluginTls {
        server_crt,
        server_key,
        client_crt,
        client_key,
    }
}

/// Marks the Job `namespace/job` succeeded through its status subresource, as the Job
/// controller would once its pod completed (no kubelet runs pods here), so CloudNativePG moves
/// on (it treats a Job as done when `status.succeeded` reaches `spec.completions`).
///
/// The whole finished status is written, so the result does not depend on the Job controller
/// (kube-controller-manager's would also finish the Job after a bare `succeeded: 1`). What
/// kube-apiserver 1.37 refuses, as tried: `Complete=True` without `SuccessCriteriaMet=True`
/// ("cannot set Complete=True condition without the SuccessCriteriaMet=true condition"),
/// without `completionTime` ("completionTime is required for Complete jobs"), and with
/// `active > 0` ("active>0 is invalid for finished job"); the Job controller has usually set
/// `active: 1` for the pod it created, hence `active: 0` here. Times are the Job's creation
/// time, so `completionTime` is never before `startTime`.
pub fn mark_job_succeeded(env: &K8sTestEnv, namespace: &str, job: &str) {
    let now = env.kubectl_ok(
        &[
            "get",
            "job",
            job,
            "-n",
            namespace,
            "-o",
            "jsonpath={.metadata.creationTimestamp}",
        ],
        None,
    );
    let time = now.trim();
    let condition = |kind: &str, reason: &str| {
        serde_json::json!({
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": "marked succeeded by the test",
            "lastProbeTime": time,
            "lastTransitionTime": time,
        })
    };
    let patch = serde_json::json!({
        "status": {
            "startTime": time,
            "completionTime": time,
            "active": 0,
            "ready": 0,
            "terminating": 0,
            "succeeded": 1,
            "failed": 0,
            "conditions": [
                condition("SuccessCriteriaMet", "CompletionsReached"),
                condition("Complete", "CompletionsReached"),
            ],
        }
    });
    env.kubectl_ok(
        &[
            "patch",
            "job",
            job,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ],
        None,
    );
}

/// Waits up to `timeout` until `kubectl get <args>` finds the object and returns it as JSON;
/// panics, with `operator`'s log tail, when it does not appear.
pub fn wait_for_object(
    env: &K8sTestEnv,
    operator: &CnpgOperator,
    args: &[&str],
    timeout: Duration,
) -> serde_json::Value {
    let mut found = None;
    let result = wait_until(
        timeout,
        Duration::from_millis(250),
        &format!("kubectl get {}", args.join(" ")),
        || {
            found = env.get_json(args);
            Ok(found.is_some())
        },
    );
    if let Err(e) = result {
        panic!("{e:#}\n{}", operator.log_tail(60));
    }
    found.unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "HINT: build it with \"bash scripts/k8s-testenv.sh build\"")]
    fn check_cnpg_dir_missing_fails_naming_the_build_command() {
        let empty = tempfile::tempdir().unwrap();
        check_cnpg_dir(empty.path());
    }

    #[test]
    fn self_signed_cert_is_written_as_apiserver_pair() {
        let dir = tempfile::tempdir().unwrap();
        write_self_signed_cert(dir.path());
        let crt = std::fs::read_to_string(dir.path().join("apiserver.crt")).unwrap();
        assert!(crt.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(dir.path().join("apiserver.key").is_file());
    }
}
