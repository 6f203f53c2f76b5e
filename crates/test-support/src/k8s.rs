//! A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager on
//! loopback) from `scripts/k8s-testenv.sh`, for tests of Klio's Kubernetes code.

#![allow(clippy::unwrap_used)] // test fixtures: a failure is a panic with the reason

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::{ChildGuard, ScratchDir};

/// `scripts/k8s-testenv.sh` in this repository.
pub fn k8s_testenv_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/k8s-testenv.sh")
}

/// The bin directory of the Go-built test peers (`scripts/k8s-testenv.sh bindir`).
pub(crate) fn testenv_bindir() -> PathBuf {
    let script = k8s_testenv_script();
    let out = Command::new("bash")
        .arg(&script)
        .arg("bindir")
        .output()
        .unwrap_or_else(|e| panic!("cannot run \"{}\": {e}", script.display()));
    assert!(
        out.status.success(),
        "\"{} bindir\" failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// This repository's Helm chart, `deploy/charts/klio`.
pub fn klio_chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/charts/klio")
}

const BUILD_HINT: &str = "HINT: build them with \"bash scripts/k8s-testenv.sh build\" (about 13 min cold, instant when cached in /var/tmp/klio-k8s); scripts/test.sh does this before the tests";

/// A control plane started by `scripts/k8s-testenv.sh up` in a scratch directory and stopped by
/// `down` when dropped.
///
/// [`K8sTestEnv::shared`] gives every test of a test binary the same control plane while any
/// of them holds it (`up` takes about 6 s and `down` about 7 s, and each control plane costs
/// several hundred MB, so per-test control planes would dominate the run on a 2-core CI
/// machine); tests isolate themselves with [`K8sTestEnv::create_namespace`]. Under a runner
/// that gives each test its own process (cargo nextest) that is one control plane per test.
///
/// Missing binaries are a failure, never a skip: the panic names `scripts/k8s-testenv.sh build`.
/// A guardian process (`setsid sh`) runs `down` if the test process dies without dropping the
/// fixture (a `SIGKILL`, an abort), so no control plane outlives its tests.
pub struct K8sTestEnv {
    env: BTreeMap<String, String>,
    guardian: Option<ChildGuard>,
    // Dropped last: the logs and the etcd data stay until `down` has run.
    scratch: ScratchDir,
}

static SHARED: Mutex<Weak<K8sTestEnv>> = Mutex::new(Weak::new());
static NAMESPACES: AtomicU32 = AtomicU32::new(0);

impl K8sTestEnv {
    /// The control plane of this test binary: started by the first caller, stopped when the
    /// last holder drops it.
    pub fn shared() -> Arc<K8sTestEnv> {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(env) = shared.upgrade() {
            return env;
        }
        let env = Arc::new(K8sTestEnv::start());
        *shared = Arc::downgrade(&env);
        env
    }

    /// Starts a control plane of its own.
    pub fn start() -> K8sTestEnv {
        K8sTestEnv::start_with_env(&[])
    }

    /// [`K8sTestEnv::start`] with settings of `scripts/k8s-testenv.sh up` in its environment
    /// (e.g. `KLIO_K8S_AGGREGATOR_ROUTING=false`).
    pub fn start_with_env(vars: &[(&str, &str)]) -> K8sTestEnv {
        let script = k8s_testenv_script();
        let bindir = testenv_bindir();
        check_binaries(&bindir);

        let scratch = crate::scratch_dir();
        let dir = scratch.path().join("k8s");
        let up = Command::new("bash")
            .arg(&script)
            .arg("up")
            .arg(&dir)
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run \"{}\": {e}", script.display()));
        // Started at once, so that a test process killed while `up` runs leaves nothing behind.
        let guardian = spawn_guardian(&script, &dir, up.id());
        let up = up.wait_with_output().unwrap();
        assert!(
            up.status.success(),
            "\"{} up {}\" failed ({}):\n{}",
            script.display(),
            dir.display(),
            up.status,
            String::from_utf8_lossy(&up.stderr)
        );
        // From here on, Drop runs `down`.
        let mut env = K8sTestEnv {
            env: BTreeMap::new(),
            guardian: Some(guardian),
            scratch,
        };
        let text = std::fs::read_to_string(dir.join("env"))
            .unwrap_or_else(|e| panic!("read \"{}\": {e}", dir.join("env").display()));
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("malformed line in {}/env: {line:?}", dir.display()));
            env.env.insert(key.to_string(), value.to_string());
        }
        for key in ["KUBECONFIG", "KLIO_K8S_BIN", "KLIO_K8S_SERVER"] {
            assert!(
                env.env.contains_key(key),
                "{}/env has no {key}",
                dir.display()
            );
        }
        env
    }

    /// The directory `up` ran in (`logs/`, `pki/`, `kubeconfig`, `env`).
    pub fn dir(&self) -> PathBuf {
        self.scratch.path().join("k8s")
    }

    /// A value of `DIR/env` (`KUBECONFIG`, `KLIO_K8S_BIN`, `KLIO_K8S_SERVER`, `KLIO_K8S_CA`, ...).
    pub fn var(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    /// The admin kubeconfig (`system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        Path::new(&self.env["KUBECONFIG"])
    }

    /// The directory of `kubectl`, `helm` and the control-plane binaries.
    pub fn bin_dir(&self) -> &Path {
        Path::new(&self.env["KLIO_K8S_BIN"])
    }

    /// The API server's URL (`https://127.0.0.1:<port>`).
    pub fn server_url(&self) -> &str {
        &self.env["KLIO_K8S_SERVER"]
    }

    /// A `kubectl` command using the admin kubeconfig.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir().join("kubectl"));
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `kubectl args...`, with `stdin` piped in when given.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = self.kubectl_command();
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run kubectl {args:?}: {e}"));
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Runs `kubectl args...` and returns its stdout; panics with its stderr if it fails.
    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The shared control plane ([`K8sTestEnv::shared`]) with Klio's CRDs (the chart's
    /// `crds/`) installed and Established; installed once per control plane (server-side
    /// apply makes a second install a no-op anyway).
    pub fn with_klio_crds() -> Arc<K8sTestEnv> {
        static INSTALLED: Mutex<Option<String>> = Mutex::new(None);
        let env = K8sTestEnv::shared();
        let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        if installed.as_deref() != Some(env.server_url()) {
            env.install_klio_crds();
            *installed = Some(env.server_url().to_string());
        }
        env
    }

    /// Applies Klio's CRDs (`deploy/charts/klio/crds/`) and waits until they are Established.
    pub fn install_klio_crds(&self) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/charts/klio/crds");
        self.kubectl_ok(
            &[
                "apply",
                "--server-side",
                "--field-manager=klio-test",
                "-f",
                dir.to_str().unwrap(),
            ],
            None,
        );
        self.wait_established(&[
            "servers.klio.enterprisedb.io",
            "pluginconfigurations.klio.enterprisedb.io",
        ]);
    }

    /// Waits (up to 60 s) until each named CRD reports `Established=True`. Polls rather than
    /// `kubectl wait`, which fails instead of waiting when it reads a CRD the API server has
    /// not given any condition yet (right after an apply).
    pub fn wait_established(&self, crds: &[&str]) {
        for crd in crds {
            crate::wait_until(
                std::time::Duration::from_secs(60),
                std::time::Duration::from_millis(200),
                &format!("CRD {crd} to be Established"),
                || {
                    Ok(self.get_json(&["crd", crd]).is_some_and(|c| {
                        c["status"]["conditions"].as_array().is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c["type"] == "Established" && c["status"] == "True")
                        })
                    }))
                },
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
        }
    }

    /// `kubectl get <args> -o json` as JSON, or `None` when kubectl fails (e.g. not found).
    pub fn get_json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl(&all, None);
        if !out.status.success() {
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).unwrap())
    }

    /// `kubectl apply --server-side` of the YAML `manifest` (field manager `klio-test`).
    pub fn apply(&self, manifest: &str) {
        self.kubectl_ok(
            &[
                "apply",
                "--server-side",
                "--field-manager=klio-test",
                "-f",
                "-",
            ],
            Some(manifest),
        );
    }

    /// Runs `helm args...` against this control plane, its state under `home`; returns its
    /// output, panics with it when helm fails.
    pub fn helm(&self, home: &Path, args: &[&str]) -> String {
        let out = Command::new(self.bin_dir().join("helm"))
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run helm: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "helm {args:?} failed:\n{text}");
        text
    }

    /// `helm install klio` of this repository's chart into namespace `klio-system` (created),
    /// with the test image `localhost/klio:test`; helm's state under `home`.
    pub fn helm_install_klio(&self, home: &Path) -> String {
        let chart = klio_chart_dir();
        self.helm(
            home,
            &[
                "install",
                "klio",
                chart.to_str().unwrap(),
                "-n",
                "klio-system",
                "--create-namespace",
                "--set",
                "image.repository=localhost/klio",
                "--set",
                "image.tag=test",
            ],
        )
    }

    /// Creates a namespace with a name unique in this control plane (`<prefix>-<pid>-<n>`).
    pub fn create_namespace(&self, prefix: &str) -> String {
        let n = NAMESPACES.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        self.kubectl_ok(&["create", "namespace", &name], None);
        name
    }
}

/// Panics, naming `scripts/k8s-testenv.sh build`, unless `bindir` has the control plane's
/// binaries.
fn check_binaries(bindir: &Path) {
    for binary in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kubectl",
    ] {
        assert!(
            bindir.join(binary).is_file(),
            "the Kubernetes test binaries are missing: no \"{}\"\n{BUILD_HINT}",
            bindir.join(binary).display()
        );
    }
}

/// `setsid sh`: waits for this process to exit, then for `up` (pid `up_pid`) to finish, then
/// runs `down DIR`. Its own session, so a signal to the test's process group does not take it
/// down first.
fn spawn_guardian(script: &Path, dir: &Path, up_pid: u32) -> ChildGuard {
    let mut cmd = Command::new("setsid");
    cmd.args([
        "sh",
        "-c",
        r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done
while kill -0 "$4" 2>/dev/null; do sleep 1; done
exec bash "$2" down "$3""#,
        "k8s-testenv-guardian",
    ])
    .arg(std::process::id().to_string())
    .arg(script)
    .arg(dir)
    .arg(up_pid.to_string())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    ChildGuard::spawn(&mut cmd).unwrap_or_else(|e| panic!("cannot start the guardian: {e:#}"))
}

impl Drop for K8sTestEnv {
    fn drop(&mut self) {
        let dir = self.dir();
        if std::thread::panicking() {
            eprintln!(
                "Kubernetes test control plane logs in {}/logs (removed after the test unless KLIO_KEEP_SCRATCH=1)",
                dir.display()
            );
        }
        // Output to a file, not a pipe: if this process dies meanwhile, `down` goes on (a pipe
        // would kill it with SIGPIPE), and the guardian, still alive, runs it again.
        let log = dir.join("down.log");
        let down = std::fs::File::create(&log).and_then(|out| {
            Command::new("bash")
                .arg(k8s_testenv_script())
                .arg("down")
                .arg(&dir)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .status()
        });
        match down {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!(
                "\"k8s-testenv.sh down {}\" failed ({status}):\n{}",
                dir.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
            Err(e) => eprintln!("cannot run k8s-testenv.sh down {}: {e}", dir.display()),
        }
        // Everything is stopped: the guardian is no longer needed.
        self.guardian.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "HINT: build them with \"bash scripts/k8s-testenv.sh build\"")]
    fn check_binaries_missing_fails_naming_the_build_command() {
        let empty = tempfile::tempdir().unwrap();
        check_binaries(empty.path());
    }
}
