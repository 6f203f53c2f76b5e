//! `klio operator` against a real control plane (etcd, kube-apiserver, kube-controller-manager
//! from `scripts/k8s-testenv.sh`): the seeds' Server manifests become StatefulSets, Services and
//! claims; the StatefulSet controller creates the pod from the rendered template (it stays
//! Pending: there is no kubelet), which proves the template valid; the pod's arguments, mounts
//! and environment are checked against `klio server --help` and the Secrets they name. Then
//! changes, certificate rotation, deletion, restarts without writes and leader election.
//!
//! Every test runs its own operator processes restricted to its own namespace.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use klio_test_support::{ChildGuard, K8sTestEnv, wait_until};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(250);

/// A running `klio operator` whose log goes to a file.
pub struct Operator {
    child: ChildGuard,
    log: PathBuf,
}

impl Operator {
    /// Starts `klio operator args...` with `kubeconfig`.
    pub fn start(kubeconfig: &Path, args: &[&str], log: PathBuf) -> Operator {
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_klio"));
        cmd.arg("operator")
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("KLIO_LOG", "info,klio_operator=debug")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("POD_NAMESPACE")
            .env_remove("KLIO_OPERATOR_NAMESPACE")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out);
        Operator {
            child: ChildGuard::spawn(&mut cmd).unwrap(),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        wait_until(
            Duration::from_secs(20),
            POLL,
            "the operator to exit",
            || Ok(!self.child.is_running()),
        )
        .unwrap();
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }
}

/// A namespace of the shared control plane and a scratch directory for logs.
struct Setup {
    env: Arc<K8sTestEnv>,
    ns: String,
    scratch: klio_test_support::ScratchDir,
}

impl Setup {
    fn new(prefix: &str) -> Setup {
        Setup::in_env(K8sTestEnv::with_klio_crds(), prefix)
    }

    /// A new namespace in `env`.
    fn in_env(env: Arc<K8sTestEnv>, prefix: &str) -> Setup {
        let ns = env.create_namespace(prefix);
        Setup {
            env,
            ns,
            scratch: klio_test_support::scratch_dir(),
        }
    }

    /// An operator watching this namespace only.
    fn operator(&self, log: &str, extra: &[&str]) -> Operator {
        let mut args = vec!["--namespace", self.ns.as_str()];
        args.extend_from_slice(extra);
        Operator::start(self.env.kubeconfig(), &args, self.scratch.path().join(log))
    }

    /// Runs `helm args...` against this control plane, its state in the scratch directory.
    fn helm(&self, args: &[&str]) -> String {
        self.env.helm(&self.scratch.path().join("helm"), args)
    }

    fn get(&self, kind_name: &str) -> Option<Value> {
        self.env.get_json(&[kind_name, "-n", &self.ns])
    }

    fn wait_get(&self, kind_name: &str) -> Value {
        let mut found = None;
        wait_until(
            TIMEOUT,
            POLL,
            &format!("{kind_name} in {}", self.ns),
            || {
                found = self.get(kind_name);
                Ok(found.is_some())
            },
        )
        .unwrap();
        found.unwrap()
    }

    /// Waits until `kind_name` (in this namespace) satisfies `pred`, returning it.
    fn wait_for(&self, kind_name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_in(&self.ns, kind_name, what, pred)
    }

    /// Waits until `kubectl get <what> -n <ns>` satisfies `pred`.
    fn wait_for_in(&self, ns: &str, what: &str, why: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut last = None;
        let r = wait_until(TIMEOUT, POLL, why, || {
            last = self.env.get_json(&[what, "-n", ns]);
            Ok(last.as_ref().is_some_and(&pred))
        });
        if let Err(e) = r {
            panic!("{e:#}\nlast seen: {last:#?}");
        }
        last.unwrap()
    }

    fn secret(&self, name: &str, pairs: &[(&str, &str)]) {
        let mut args = vec![
            "create".to_string(),
            "secret".into(),
            "generic".into(),
            name.into(),
            "-n".into(),
            self.ns.clone(),
        ];
        args.extend(pairs.iter().map(|(k, v)| format!("--from-literal={k}={v}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.env.kubectl_ok(&args, None);
    }

    /// The Secrets every seed manifest names.
    fn seed_secrets(&self) {
        self.secret(
            "my-server-tls",
            &[("tls.crt", "server certificate"), ("tls.key", "server key")],
        );
        self.secret(
            "dr-server-tls",
            &[("tls.crt", "dr certificate"), ("tls.key", "dr key")],
        );
        self.secret(
            "server-sample-ca",
            &[("ca.crt", "ca"), ("tls.crt", "ca"), ("tls.key", "ca key")],
        );
        self.secret(
            "my-server-encryption",
            &[("encryptionKey", "my-secure-key")],
        );
        self.secret("dr-server-encryption", &[("encryptionKey", "dr-key")]);
        self.secret(
            "rustfs",
            &[
                ("RUSTFS_ACCESS_KEY", "access"),
                ("RUSTFS_SECRET_KEY", "secret"),
            ],
        );
        self.secret("rustfs-tls", &[("tls.crt", "rustfs ca")]);
        self.secret(
            "s3-credentials",
            &[("ACCESS_KEY_ID", "a"), ("SECRET_ACCESS_KEY", "s")],
        );
    }

    fn apply(&self, doc: &serde_yaml::Value) {
        let mut doc = doc.clone();
        doc["metadata"]["namespace"] = serde_yaml::Value::from(self.ns.as_str());
        self.env.apply(&serde_yaml::to_string(&doc).unwrap());
    }

    fn condition(&self, server: &str, type_: &str) -> Option<(String, String)> {
        let s = self.get(&format!("server/{server}"))?;
        let c = s["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)?
            .clone();
        Some((
            c["status"].as_str()?.to_string(),
            c["reason"].as_str()?.to_string(),
        ))
    }
}

/// A seed manifest of `crates/k8s-types/tests/data`.
fn seed(name: &str) -> serde_yaml::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../k8s-types/tests/data")
        .join(name);
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `server.yaml` renamed, with `fragment`'s `spec.template` (and `spec.tier2.s3` when it has
/// one) put in.
fn seed_with(name: &str, fragment: &str) -> serde_yaml::Value {
    let mut doc = seed("server.yaml");
    doc["metadata"]["name"] = serde_yaml::Value::from(name);
    let fragment = seed(fragment);
    doc["spec"]["template"] = fragment["spec"]["template"].clone();
    if let Some(s3) = fragment["spec"]["tier2"].get("s3") {
        doc["spec"]["tier2"]["s3"] = s3.clone();
    }
    doc
}

/// The long flags `klio server --help` documents.
fn server_flags() -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_klio"))
        .args(["server", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').to_string())
        .collect()
}

/// Checks the pod of `server` against `klio server --help` and the objects it names: every
/// flag exists, every file argument lies in a mounted volume whose Secret has the key (or
/// whose claim exists), every secret env variable names an existing key.
fn check_pod(setup: &Setup, server: &str) -> Value {
    let pod = setup.wait_get(&format!("pod/{server}-klio-0"));
    let spec = &pod["spec"];
    let c = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "server")
        .unwrap()
        .clone();
    let args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(args[0], "server");
    let flags = server_flags();
    for a in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            flags.contains(a),
            "{a} is not a flag of klio server: {args:?}"
        );
    }
    let volumes: BTreeMap<String, Value> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v.clone()))
        .collect();
    let mounts = c["volumeMounts"].as_array().unwrap();
    let secret_has = |name: &str, key: &str| {
        let s = setup
            .get(&format!("secret/{name}"))
            .unwrap_or_else(|| panic!("no Secret {name}"));
        assert!(
            s["data"].get(key).is_some(),
            "Secret {name} has no key {key}"
        );
    };
    for path in args.iter().filter(|a| a.starts_with('/')) {
        let m = mounts
            .iter()
            .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{path} is not in a mounted volume"));
        let volume = &volumes[m["name"].as_str().unwrap()];
        if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
            assert!(
                setup.get(&format!("pvc/{claim}")).is_some(),
                "no claim {claim}"
            );
        } else if let Some(secret) = volume["secret"].as_object() {
            let file = path
                .strip_prefix(m["mountPath"].as_str().unwrap())
                .unwrap()
                .trim_start_matches('/');
            let item = secret["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["path"] == file)
                .unwrap_or_else(|| panic!("{path}: no item {file} in {volume}"));
            secret_has(
                secret["secretName"].as_str().unwrap(),
                item["key"].as_str().unwrap(),
            );
        } else {
            panic!("{path} is in volume {volume}, neither a claim nor a Secret");
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
            secret_has(r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
        }
    }
    assert_eq!(
        pod["metadata"]["labels"]["klio.enterprisedb.io/klio-server"],
        server
    );
    pod
}

fn arg_value(pod: &Value, flag: &str) -> Option<String> {
    let args = pod["spec"]["containers"][0]["args"].as_array().unwrap();
    let i = args.iter().position(|a| a == flag)?;
    Some(args[i + 1].as_str().unwrap().to_string())
}

#[test]
fn operator_seed_servers_become_statefulsets_services_claims_and_valid_pods() {
    let setup = Setup::new("op-seeds");
    setup.seed_secrets();
    setup.env.kubectl_ok(
        &[
            "create",
            "serviceaccount",
            "klio-s3-access",
            "-n",
            &setup.ns,
        ],
        None,
    );
    let _operator = setup.operator("operator.log", &[]);
    setup.apply(&seed("server.yaml"));
    setup.apply(&seed("server-read-only.yaml"));
    setup.apply(&seed_with(
        "affinity-server",
        "server-template-fragment.yaml",
    ));
    setup.apply(&seed_with("irsa-server", "server-irsa-fragment.yaml"));

    // Standard server with Tier 1 and Tier 2.
    let sts = setup.wait_get("statefulset/my-server-klio");
    assert_eq!(sts["spec"]["replicas"], 1);
    assert_eq!(sts["metadata"]["ownerReferences"][0]["kind"], "Server");
    let svc = setup.wait_get("service/my-server");
    let ports: Vec<i64> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, [51515, 52000]);
    for claim in ["data", "cache", "queue", "tier2-cache"] {
        let pvc = setup.wait_get(&format!("pvc/my-server-klio-{claim}"));
        assert!(pvc["metadata"].get("ownerReferences").is_none());
    }
    let data = setup.wait_get("pvc/my-server-klio-data");
    assert_eq!(data["spec"]["storageClassName"], "standard");
    assert_eq!(data["spec"]["resources"]["requests"]["storage"], "100Gi");
    let pod = check_pod(&setup, "my-server");
    assert_eq!(pod["status"]["phase"], "Pending");
    assert_eq!(arg_value(&pod, "--mode").as_deref(), Some("standard"));
    assert_eq!(arg_value(&pod, "--data-dir").as_deref(), Some("/data"));
    assert_eq!(arg_value(&pod, "--queue-dir").as_deref(), Some("/queue"));
    assert_eq!(
        arg_value(&pod, "--tier2-s3-endpoint").as_deref(),
        Some("https://rustfs:9000")
    );

    // Read-only DR server: Tier 2 only.
    let pod = check_pod(&setup, "dr-server");
    assert_eq!(arg_value(&pod, "--mode").as_deref(), Some("read-only"));
    assert_eq!(arg_value(&pod, "--data-dir"), None);
    assert!(setup.get("pvc/dr-server-klio-data").is_none());
    setup.wait_get("pvc/dr-server-klio-tier2-cache");

    // Node affinity and tolerations from the template.
    let pod = check_pod(&setup, "affinity-server");
    assert_eq!(
        pod["spec"]["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["key"] == "node-role.kubernetes.io/klio")
            .count(),
        1
    );
    assert!(pod["spec"]["affinity"]["nodeAffinity"].is_object());

    // IRSA: the pod's service account, no static credentials.
    let pod = check_pod(&setup, "irsa-server");
    assert_eq!(pod["spec"]["serviceAccountName"], "klio-s3-access");
    let env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(
        env.iter()
            .all(|e| !e["name"].as_str().unwrap().starts_with("AWS_"))
    );

    // Status: the pod stays Pending (no kubelet), so not Ready, and nothing to fix.
    setup.wait_for("server/my-server", "my-server's status", |s| {
        s["status"]["observedGeneration"] == s["metadata"]["generation"]
    });
    assert_eq!(
        setup.condition("my-server", "Ready"),
        Some(("False".into(), "PodNotReady".into()))
    );
    assert_eq!(
        setup.condition("my-server", "Degraded"),
        Some(("False".into(), "AsExpected".into()))
    );
    let table = setup
        .env
        .kubectl_ok(&["get", "servers", "-n", &setup.ns], None);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "MODE", "READY", "AGE"]);
    let row = table.lines().find(|l| l.starts_with("dr-server ")).unwrap();
    let row: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&row[..3], ["dr-server", "read-only", "False"]);
}

/// The resourceVersions of everything the operator writes for `server`.
fn versions(setup: &Setup, server: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut objects = vec![
        format!("server/{server}"),
        format!("statefulset/{server}-klio"),
        format!("service/{server}"),
    ];
    for claim in ["data", "cache", "queue", "tier2-cache"] {
        objects.push(format!("pvc/{server}-klio-{claim}"));
    }
    for o in objects {
        let v = setup.get(&o).unwrap_or_else(|| panic!("{o} is missing"));
        out.insert(
            o,
            v["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    out
}

fn secrets_hash(sts: &Value) -> String {
    sts["spec"]["template"]["metadata"]["annotations"]["klio.enterprisedb.io/secrets-hash"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn operator_follows_changes_rotations_deletion_and_restarts_without_writes() {
    let setup = Setup::new("op-life");
    setup.seed_secrets();
    // The encryption key does not exist yet: Degraded, no StatefulSet.
    setup.env.kubectl_ok(
        &["delete", "secret", "my-server-encryption", "-n", &setup.ns],
        None,
    );
    let operator = setup.operator("operator-1.log", &[]);
    setup.apply(&seed("server.yaml"));
    setup.wait_for("server/my-server", "Degraded=True SecretMissing", |s| {
        s["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["type"] == "Degraded"
                    && c["reason"] == "SecretMissing"
                    && c["message"]
                        .as_str()
                        .unwrap()
                        .contains("\"my-server-encryption\" (spec.tier1.encryptionKey)")
            })
        })
    });
    assert!(setup.get("statefulset/my-server-klio").is_none());
    let events = setup.env.kubectl_ok(
        &["get", "events.events.k8s.io", "-n", &setup.ns, "-o", "json"],
        None,
    );
    assert!(events.contains("SecretMissing"), "{events}");

    // The Secret appears: the StatefulSet follows.
    setup.secret("my-server-encryption", &[("encryptionKey", "k1")]);
    let sts = setup.wait_get("statefulset/my-server-klio");
    let first_hash = secrets_hash(&sts);
    setup.wait_for("server/my-server", "Degraded=False", |s| {
        s["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Degraded" && c["status"] == "False")
        })
    });

    // A spec change updates the StatefulSet.
    setup.env.kubectl_ok(
        &[
            "patch",
            "server",
            "my-server",
            "-n",
            &setup.ns,
            "--type=merge",
            "-p",
            r#"{"spec":{"image":"localhost/klio:v2"}}"#,
        ],
        None,
    );
    setup.wait_for("statefulset/my-server-klio", "the new image", |s| {
        s["spec"]["template"]["spec"]["containers"][0]["image"] == "localhost/klio:v2"
    });

    // New Secret content (a renewed certificate): a new pod-template annotation.
    setup.env.kubectl_ok(
        &[
            "patch",
            "secret",
            "my-server-tls",
            "-n",
            &setup.ns,
            "--type=merge",
            "-p",
            r#"{"stringData":{"tls.crt":"renewed certificate"}}"#,
        ],
        None,
    );
    let sts = setup.wait_for("statefulset/my-server-klio", "a new secrets hash", |s| {
        secrets_hash(s) != first_hash
    });
    let hash = secrets_hash(&sts);

    // Restart: nothing is written for the unchanged Server.
    setup.wait_for(
        "server/my-server",
        "the status of the latest generation",
        |s| s["status"]["observedGeneration"] == s["metadata"]["generation"],
    );
    setup.wait_for(
        "statefulset/my-server-klio",
        "the StatefulSet to settle",
        |s| {
            // (Its rollout never completes: without a kubelet no pod becomes ready.)
            s["status"]["observedGeneration"] == s["metadata"]["generation"]
        },
    );
    // Let the first operator finish what it reacts to (its own writes trigger one more pass).
    std::thread::sleep(Duration::from_secs(3));
    operator.terminate();
    let before = versions(&setup, "my-server");
    let second = setup.operator("operator-2.log", &[]);
    wait_until(
        TIMEOUT,
        POLL,
        "the restarted operator to reconcile my-server",
        || Ok(second.log().contains("reconciled")),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(versions(&setup, "my-server"), before, "{}", second.log());
    assert_eq!(
        secrets_hash(&setup.get("statefulset/my-server-klio").unwrap()),
        hash
    );

    // A claim change the API server refuses (a bound claim's storage class is immutable):
    // Degraded with the API server's reason, the rest still applied.
    setup.env.kubectl_ok(
        &[
            "patch", "server", "my-server", "-n", &setup.ns, "--type=json", "-p",
            r#"[{"op":"replace","path":"/spec/tier1/data/pvcTemplate/storageClassName","value":"fast"}]"#,
        ],
        None,
    );
    let server = setup.wait_for("server/my-server", "Degraded=True ApplyFailed", |s| {
        s["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Degraded" && c["reason"] == "ApplyFailed")
        })
    });
    let degraded = server["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
        .clone();
    let message = degraded["message"].as_str().unwrap();
    assert!(
        message.contains("PersistentVolumeClaim \"my-server-klio-data\"")
            && message.contains("immutable"),
        "{message}"
    );

    // Deletion: the garbage collector removes the StatefulSet and the Service; the claims stay.
    setup
        .env
        .kubectl_ok(&["delete", "server", "my-server", "-n", &setup.ns], None);
    wait_until(
        TIMEOUT,
        POLL,
        "the StatefulSet and Service to be collected",
        || {
            Ok(setup.get("statefulset/my-server-klio").is_none()
                && setup.get("service/my-server").is_none())
        },
    )
    .unwrap();
    for claim in ["data", "cache", "queue", "tier2-cache"] {
        assert!(setup.get(&format!("pvc/my-server-klio-{claim}")).is_some());
    }
}

#[test]
fn operator_replicas_elect_one_leader_and_hand_over_on_shutdown() {
    let setup = Setup::new("op-leader");
    setup.seed_secrets();
    let lease_args = [
        "--leader-election-namespace",
        setup.ns.as_str(),
        "--leader-election-lease",
        "klio-test",
    ];
    let first = setup.operator("leader-1.log", &lease_args);
    wait_until(TIMEOUT, POLL, "the first replica to lead", || {
        Ok(first.log().contains("became the leader"))
    })
    .unwrap();
    let mut second = setup.operator("leader-2.log", &lease_args);
    setup.apply(&seed("server.yaml"));
    setup.wait_get("statefulset/my-server-klio");
    let lease = setup.wait_get("lease/klio-test");
    let holder = lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        first.log().contains(&holder),
        "the lease names the first replica"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(second.is_running());
    let log = second.log();
    assert!(
        !log.contains("became the leader") && !log.contains("reconciled"),
        "{log}"
    );

    // The leader stops and releases the lease: the second replica takes over and reconciles.
    first.terminate();
    wait_until(
        Duration::from_secs(30),
        POLL,
        "the second replica to lead",
        || Ok(second.log().contains("became the leader")),
    )
    .unwrap();
    let mut dr = seed("server-read-only.yaml");
    dr["metadata"]["name"] = serde_yaml::Value::from("dr-server");
    setup.apply(&dr);
    setup.wait_get("statefulset/dr-server-klio");
    let lease = setup.get("lease/klio-test").unwrap();
    assert_ne!(lease["spec"]["holderIdentity"].as_str().unwrap(), holder);
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

/// A kubeconfig that authenticates with `token` (a ServiceAccount's), written into `dir`.
fn token_kubeconfig(env: &K8sTestEnv, token: &str, dir: &Path) -> PathBuf {
    let path = dir.join("sa-kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: sa\n  context: {{cluster: test, user: sa}}\ncurrent-context: sa\n",
        env.server_url(),
        env.var("KLIO_K8S_CA").unwrap(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `GET path` on the operator's health port: the status line.
fn http_status(port: u16, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    Ok(reply.lines().next().unwrap_or_default().to_string())
}

#[test]
fn helm_chart_installs_and_its_service_account_runs_the_operator() {
    // A control plane of its own: the chart installs the CRDs itself.
    let env = Arc::new(K8sTestEnv::start());
    let setup = Setup::in_env(env.clone(), "op-helm");
    let chart = klio_test_support::klio_chart_dir();
    let lint = setup.helm(&["lint", chart.to_str().unwrap()]);
    // The CNPG-I plugin's objects go to CloudNativePG's namespace, which CloudNativePG's
    // installation creates.
    env.kubectl_ok(&["create", "namespace", "cnpg-system"], None);
    assert!(
        !lint.contains("[WARNING]") && !lint.contains("[ERROR]"),
        "{lint}"
    );
    env.helm_install_klio(&setup.scratch.path().join("helm"));
    env.wait_established(&["servers.klio.enterprisedb.io"]);
    // The Deployment's pod is created (and stays Pending: no kubelet): its template is valid.
    let pods = setup.wait_for_in("klio-system", "pods", "the operator pod", |p| {
        p["items"].as_array().is_some_and(|i| !i.is_empty())
    });
    let pod = &pods["items"][0];
    assert_eq!(pod["spec"]["containers"][0]["image"], "localhost/klio:test");
    assert_eq!(pod["spec"]["containers"][0]["args"][0], "operator");
    let sa = pod["spec"]["serviceAccountName"]
        .as_str()
        .unwrap()
        .to_string();

    // The operator runs with the chart's ServiceAccount and nothing more.
    let token = env.kubectl_ok(&["create", "token", &sa, "-n", "klio-system"], None);
    let kubeconfig = token_kubeconfig(&env, token.trim(), setup.scratch.path());
    // `resource` may carry more words, e.g. `--subresource=status`.
    let can = |verb: &str, resource: &str| {
        let mut args = vec![
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "auth",
            "can-i",
            verb,
        ];
        args.extend(resource.split_whitespace());
        args.extend(["-n", setup.ns.as_str()]);
        let out = env.kubectl(&args, None);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    assert!(
        can("create", "statefulsets.apps")
            && can("patch", "servers.klio.enterprisedb.io --subresource=status")
    );
    assert!(
        !can("delete", "persistentvolumeclaims"),
        "PVCs are never deleted by the operator"
    );
    assert!(!can("delete", "secrets") && !can("create", "pods"));

    let port = klio_test_support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let _operator = Operator::start(
        &kubeconfig,
        &[
            "--leader-election-namespace",
            "klio-system",
            "--health-listen",
            &listen,
        ],
        setup.scratch.path().join("operator.log"),
    );
    wait_until(TIMEOUT, POLL, "the health endpoint", || {
        Ok(http_status(port, "/healthz").is_ok_and(|s| s.contains("200")))
    })
    .unwrap();
    assert!(http_status(port, "/readyz").unwrap().contains("200"));
    assert!(http_status(port, "/other").unwrap().contains("404"));

    setup.seed_secrets();
    setup.apply(&seed("server.yaml"));
    setup.wait_get("statefulset/my-server-klio");
    setup.wait_get("pvc/my-server-klio-data");
    check_pod(&setup, "my-server");
    setup.wait_for("server/my-server", "the status", |s| {
        s["status"]["observedGeneration"] == s["metadata"]["generation"]
    });
    let lease = env
        .get_json(&["lease/klio-operator", "-n", "klio-system"])
        .unwrap();
    assert!(lease["spec"]["holderIdentity"].is_string());
    setup.helm(&["uninstall", "klio", "-n", "klio-system"]);
    // Helm keeps the CRDs (and so every Server) on uninstall.
    assert!(setup.get("server/my-server").is_some());
}
