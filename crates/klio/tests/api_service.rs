//! The aggregated API service end to end: a real kube-apiserver with the aggregation layer
//! (from `scripts/k8s-testenv.sh`), a real Klio server with backups of a real PostgreSQL,
//! and `klio server api-server` started as the seed's Deployment starts it (its
//! `CLIENT_BASE_*` environment) with the ServiceAccount and RBAC the chart renders:
//!
//! - the APIService becomes Available; `kubectl get kliobackups` lists the backups `klio
//!   backup` made (names and times as `klio backups list --json` gives them), `-o yaml`
//!   shows one with the seed's fields and ours, `-w` prints a new backup as it completes,
//!   selectors filter, `kubectl explain` describes the resource;
//! - `kubectl --as` a user without RBAC is refused, and the service's own
//!   SubjectAccessReview refuses them too when called as the aggregator calls it; a
//!   RoleBinding to the chart's reader ClusterRole lets the same user read;
//! - no, an untrusted or a not-allowed front-proxy certificate is refused;
//! - with the Klio server down, `kubectl get` answers 503 with the reason.
//!
//! The aggregator reaches the service through an ExternalName Service `localhost` with
//! aggregator routing off (docs/k8s-testenv.md): it never dials a ClusterIP.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use common::*;
use klio_test_support::{ChildGuard, K8sTestEnv, PgCluster, PgOptions, free_port};
use serde_json::Value;

const CLUSTER: &str = "apisvc";
const GROUP: &str = "kliocatalog.enterprisedb.io";
const APISERVICE: &str = "v1alpha1.kliocatalog.enterprisedb.io";

/// `kubectl args...`: (success, stdout, stderr).
fn kubectl(env: &K8sTestEnv, args: &[&str]) -> (bool, String, String) {
    let out = env.kubectl(args, None);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kubectl_json(env: &K8sTestEnv, args: &[&str]) -> anyhow::Result<Value> {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let (ok, out, err) = kubectl(env, &a);
    ensure!(ok, "kubectl {args:?} failed: {err}");
    Ok(serde_json::from_str(&out)?)
}

/// Writes an openssl-signed client certificate `<name>.crt/.key` with `cn`, issued by
/// `ca`/`ca_key`.
fn issue_client_cert(
    dir: &Path,
    name: &str,
    cn: &str,
    ca: &Path,
    ca_key: &Path,
) -> (PathBuf, PathBuf) {
    let (crt, key, csr) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.csr")),
    );
    let ok = |c: &mut Command| {
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", &format!("/CN={cn}"), "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(&ext, "extendedKeyUsage=clientAuth\n").unwrap();
    ok(Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(ca)
        .arg("-CAkey")
        .arg(ca_key)
        .args(["-CAcreateserial", "-extfile"])
        .arg(&ext)
        .arg("-out")
        .arg(&crt));
    (crt, key)
}

/// A direct HTTPS GET to the API service as a client of `cert` (none: no certificate),
/// with front-proxy headers for `user`: (HTTP status, body). Status 0: the TLS handshake
/// or the connection failed.
fn direct_get(
    port: u16,
    host: &str,
    ca: &Path,
    cert: Option<(&Path, &Path)>,
    user: Option<(&str, &[&str])>,
    path: &str,
) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "20",
        "-w",
        "\n%{http_code}",
    ])
    .arg("--cacert")
    .arg(ca)
    .arg("--resolve")
    .arg(format!("{host}:{port}:127.0.0.1"));
    if let Some((crt, key)) = cert {
        c.arg("--cert").arg(crt).arg("--key").arg(key);
    }
    if let Some((name, groups)) = user {
        c.args(["-H", &format!("X-Remote-User: {name}")]);
        for g in groups {
            c.args(["-H", &format!("X-Remote-Group: {g}")]);
        }
    }
    c.arg(format!("https://{host}:{port}{path}"));
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|d| {
            let v: Value = serde::Deserialize::deserialize(d).ok()?;
            (!v.is_null()).then_some(v)
        })
        .collect()
}

#[test]
fn kubectl_reads_the_catalog_through_the_aggregation_layer() -> anyhow::Result<()> {
    let env = K8sTestEnv::start_with_env(&[("KLIO_K8S_AGGREGATOR_ROUTING", "false")]);
    let mut k = Klio::start(&[CLUSTER, "other"])?;
    let pg = PgCluster::start(PgOptions::default())?;
    let mut streamer = k.spawn_streamer(CLUSTER, &pg, "streamer", &[])?;
    k.wait_archived(CLUSTER, 1, klio_pg::Lsn(1), Duration::from_secs(60))
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    k.backup(CLUSTER, &pg, &[])?;

    // The clusters a certificate may read: all for the snapshot reader, its own for a
    // cluster's certificate (another cluster's certificate sees none here).
    let rt = tokio::runtime::Runtime::new()?;
    for (stem, want) in [
        ("snapshot-reader", vec![CLUSTER.to_string()]),
        ("client-apisvc", vec![CLUSTER.to_string()]),
        ("client-other", vec![]),
    ] {
        let clusters = rt.block_on(async {
            let ch = k.grpc_channel(k.base_port, stem).await;
            klio_proto::backup::v1::backup_client::BackupClient::new(ch)
                .list_clusters(klio_proto::backup::v1::ListClustersRequest::default())
                .await
                .map(|r| r.into_inner().clusters)
        })?;
        ensure!(clusters == want, "{stem} lists {clusters:?}, not {want:?}");
    }
    drop(rt);

    // The chart's objects for the API service, in a namespace of this test.
    let ns = env.create_namespace("klio-api");
    let host = format!("klio-api.{ns}.svc");
    let certs = k.dir.path().join("api-certs");
    let (serving_crt, serving_key) = klio_test_support::self_signed_tls(
        &certs,
        "serving",
        "klio-api",
        &format!("DNS:{host},DNS:klio-api.{ns},DNS:klio-api"),
    );
    let ca_bundle = {
        let out = Command::new("base64")
            .arg("-w0")
            .arg(&serving_crt)
            .output()?;
        String::from_utf8(out.stdout)?
    };
    let home = k.dir.path().join("helm");
    let rendered = env.helm(
        &home,
        &[
            "template",
            "klio",
            klio_test_support::klio_chart_dir().to_str().unwrap(),
            "--namespace",
            &ns,
            "--show-only",
            "templates/api-service.yaml",
            "--set",
            "apiService.enabled=true",
            "--set",
            "apiService.server.address=127.0.0.1",
            "--set",
            "apiService.server.caSecretName=klio-server-ca",
            "--set",
            "apiService.clientSecretName=klio-snapshot-reader",
            "--set",
            &format!("apiService.caBundle={ca_bundle}"),
        ],
    );
    // Applied as rendered (YAML 1.1 as kubectl reads it: `defaultMode: 0440` is octal).
    let docs: Vec<&str> = rendered
        .split("\n---")
        .filter(|d| d.contains("kind:"))
        .collect();
    let kind_of = |d: &str| -> String {
        d.lines()
            .find_map(|l| l.strip_prefix("kind: "))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let kinds: Vec<String> = docs.iter().map(|d| kind_of(d)).collect();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "RoleBinding",
        "Deployment",
        "Service",
        "APIService",
    ] {
        ensure!(
            kinds.iter().any(|k| k == kind),
            "the chart renders no {kind}: {kinds:?}"
        );
    }
    let port = free_port();
    // The aggregator would dial the chart Service's ClusterIP: an ExternalName Service to
    // the loopback address takes its place, and the APIService names the real port.
    env.apply(&serde_json::to_string(&serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "klio-api", "namespace": ns},
        "spec": {"type": "ExternalName", "externalName": "localhost"},
    }))?);
    for d in &docs {
        match kind_of(d).as_str() {
            "Service" => {}
            "APIService" => {
                let v = yaml_docs(d).pop().context("the APIService document")?;
                ensure!(v["metadata"]["name"] == APISERVICE, "{v}");
                ensure!(v["spec"]["service"]["port"] == 443, "{v}");
                ensure!(v["spec"]["caBundle"] == ca_bundle.as_str(), "{v}");
                env.apply(&d.replace("port: 443", &format!("port: {port}")));
            }
            _ => env.apply(d),
        }
    }

    // The service runs as the chart's ServiceAccount.
    let token = env.kubectl_ok(
        &["create", "token", "klio-api", "-n", &ns, "--duration", "2h"],
        None,
    );
    let kubeconfig = k.dir.path().join("api-kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: sa\n  user:\n    token: {}\ncontexts:\n- name: t\n  context: {{cluster: t, user: sa}}\ncurrent-context: t\n",
            env.server_url(),
            env.var("KLIO_K8S_CA").context("KLIO_K8S_CA")?,
            token.trim()
        ),
    )?;
    let log = k.dir.path().join("api-service.log");
    let mut cmd = klio();
    cmd.args(["server", "api-server"])
        .env("CLIENT_BASE_HOSTNAME", "localhost")
        .env(
            "CLIENT_BASE_URL",
            format!("https://127.0.0.1:{}", k.base_port),
        )
        .env("CLIENT_BASE_SERVER_CERT_PATH", k.pki.join("ca.crt"))
        .env("CLIENT_BASE_API_SERVER_CERTFILE", &serving_crt)
        .env("CLIENT_BASE_API_SERVER_KEYFILE", &serving_key)
        .env(
            "CLIENT_BASE_CLIENT_CERT_PATH",
            k.pki.join("snapshot-reader.crt"),
        )
        .env(
            "CLIENT_BASE_CLIENT_KEY_PATH",
            k.pki.join("snapshot-reader.key"),
        )
        .env("KLIO_API_LISTEN", format!("127.0.0.1:{port}"))
        .env("KLIO_API_NAMESPACE", &ns)
        .env("KLIO_API_POLL_INTERVAL", "1")
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let _api = ChildGuard::spawn(&mut cmd)?;
    let api_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let available = eventually(
        Duration::from_secs(90),
        "the APIService becomes Available",
        || {
            let v = kubectl_json(&env, &["get", "apiservice", APISERVICE])?;
            let cond = v["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Available").cloned());
            Ok(cond.filter(|c| c["status"] == "True"))
        },
    );
    if let Err(e) = available {
        bail!("{e:#}\nAPI service log:\n{}", api_log());
    }

    // kubectl get lists what `klio backups list` lists.
    let check_list = |k: &Klio| -> anyhow::Result<()> {
        let listed = k.backups_list(CLUSTER)?;
        let v = kubectl_json(&env, &["get", "kliobackups", "-n", &ns])?;
        let items = v["items"].as_array().context("items")?;
        ensure!(
            items.len() == listed.len(),
            "kubectl lists {} backups, klio {}: {v}",
            items.len(),
            listed.len()
        );
        for (item, b) in items.iter().zip(&listed) {
            let id = b["backup_id"].as_str().context("backup_id")?;
            ensure!(
                item["metadata"]["name"] == format!("{CLUSTER}.{id}"),
                "{item}"
            );
            for (ours, theirs) in [("startedAt", "started_at"), ("stoppedAt", "stopped_at")] {
                let want = klio_api_service::objects::kube_time(b[theirs].as_str().unwrap_or(""))
                    .context("time")?;
                ensure!(
                    item["status"][ours] == want.as_str(),
                    "{ours} of {item} is not {want}"
                );
            }
            ensure!(
                item["status"]["startWAL"] == b["start_wal"]
                    && item["status"]["endWAL"] == b["end_wal"],
                "{item}"
            );
        }
        Ok(())
    };
    check_list(&k).map_err(|e| anyhow::anyhow!("{e:#}\nAPI service log:\n{}", api_log()))?;

    // The table: the seed's columns (and the namespace with -A).
    let (ok, table, err) = kubectl(&env, &["get", "kliobackups", "-A"]);
    ensure!(ok, "{err}");
    let header = table.lines().next().unwrap_or("");
    for col in [
        "NAMESPACE",
        "NAME",
        "CLUSTER NAME",
        "STARTED AT",
        "STOPPED AT",
    ] {
        ensure!(header.contains(col), "no {col} column:\n{table}");
    }
    ensure!(
        table.contains(&format!("{CLUSTER}.backup-")) && table.contains("+0000 UTC"),
        "{table}"
    );
    let (ok, wide, err) = kubectl(&env, &["get", "kliobackups", "-n", &ns, "-o", "wide"]);
    ensure!(
        ok && wide.contains("TIERS") && wide.contains("END WAL"),
        "{wide}{err}"
    );

    // -o yaml of one backup.
    let first = k.backups_list(CLUSTER)?.remove(0);
    let name = format!("{CLUSTER}.{}", first["backup_id"].as_str().unwrap());
    let (ok, yaml, err) = kubectl(
        &env,
        &["get", "kliobackups", &name, "-n", &ns, "-o", "yaml"],
    );
    ensure!(ok, "{err}");
    let one: Value = serde_yaml::from_str(&yaml)?;
    ensure!(
        one["kind"] == "KlioBackup" && one["apiVersion"] == format!("{GROUP}/v1alpha1"),
        "{yaml}"
    );
    ensure!(
        one["spec"]["backupID"] == first["backup_id"] && one["spec"]["clusterName"] == CLUSTER,
        "{yaml}"
    );
    let s = &one["status"];
    let lsn = |t: &Value| {
        klio_api_service::objects::lsn_value(t.as_str().unwrap_or("")).unwrap_or(u64::MAX)
    };
    ensure!(
        s["startLSN"].as_u64() == Some(lsn(&first["start_lsn"])),
        "{yaml}"
    );
    ensure!(
        s["endLSN"].as_u64() == Some(lsn(&first["end_lsn"])),
        "{yaml}"
    );
    ensure!(
        s["timeline"] == first["timeline"] && s["tiers"] == serde_json::json!([1]),
        "{yaml}"
    );
    ensure!(
        s["logicalSize"] == first["logical_size"] && s["newStoredBytes"] == first["bytes_new"],
        "{yaml}"
    );
    ensure!(
        s["checksumFailures"] == 0 && s["recoveryWindow"]["fromLocation"] == first["end_lsn"],
        "{yaml}"
    );
    let (ok, _, err) = kubectl(
        &env,
        &[
            "get",
            "kliobackups",
            "other.backup-20200101000000",
            "-n",
            &ns,
        ],
    );
    ensure!(
        !ok && (err.contains("NotFound") || err.contains("not found")),
        "{err}"
    );

    // Selectors.
    let count = |args: &[&str]| -> anyhow::Result<usize> {
        let mut a = vec!["get", "kliobackups", "-n", &ns];
        a.extend_from_slice(args);
        Ok(kubectl_json(&env, &a)?["items"]
            .as_array()
            .map_or(0, Vec::len))
    };
    ensure!(count(&["-l", &format!("klio.enterprisedb.io/cluster={CLUSTER}")])? == 1);
    ensure!(count(&["-l", "klio.enterprisedb.io/cluster=other"])? == 0);
    ensure!(count(&["--field-selector", &format!("spec.clusterName={CLUSTER}")])? == 1);
    ensure!(count(&["--field-selector", &format!("metadata.name={name}")])? == 1);
    let (ok, _, err) = kubectl(
        &env,
        &[
            "get",
            "kliobackups",
            "-n",
            &ns,
            "--field-selector",
            "status.phase=x",
        ],
    );
    ensure!(!ok && err.contains("field label not supported"), "{err}");
    // The catalog is shown in the Klio server's namespace only.
    ensure!(
        kubectl_json(&env, &["get", "kliobackups", "-n", "default"])?["items"]
            .as_array()
            .map_or(0, Vec::len)
            == 0
    );

    // kubectl explain (the aggregator loads the OpenAPI documents in the background).
    let explained = eventually(
        Duration::from_secs(90),
        "kubectl explain kliobackups",
        || {
            let (ok, explain, err) = kubectl(&env, &["explain", "kliobackups"]);
            ensure!(ok, "{err}");
            Ok((explain.contains("KIND:")
                && explain.contains("KlioBackup")
                && explain.contains("status"))
            .then_some(()))
        },
    );
    if let Err(e) = explained {
        let (_, index, _) = kubectl(&env, &["get", "--raw", "/openapi/v3"]);
        bail!(
            "{e:#}\nOpenAPI v3 index: {index}\nAPI service log:\n{}",
            api_log()
        );
    }
    let (ok, explain, err) = kubectl(&env, &["explain", "kliobackups.status.recoveryWindow"]);
    ensure!(ok && explain.contains("fromLocation"), "{explain}{err}");

    // kubectl get -w prints the next backup as it completes.
    let watch_out = k.dir.path().join("watch.out");
    let mut watch_cmd = env.kubectl_command();
    watch_cmd
        .args(["get", "kliobackups", "-n", &ns, "-w"])
        .stdout(std::fs::File::create(&watch_out)?)
        .stderr(Stdio::null());
    let watcher = ChildGuard::spawn(&mut watch_cmd)?;
    eventually(
        Duration::from_secs(30),
        "kubectl get -w prints the first backup",
        || {
            Ok(std::fs::read_to_string(&watch_out)?
                .contains(&name)
                .then_some(()))
        },
    )?;
    let second = k.backup(CLUSTER, &pg, &[])?;
    let second_name = format!(
        "{CLUSTER}.{}",
        second["backup_id"].as_str().context("backup_id")?
    );
    eventually(
        Duration::from_secs(60),
        "kubectl get -w prints the new backup",
        || {
            Ok(std::fs::read_to_string(&watch_out)?
                .contains(&second_name)
                .then_some(()))
        },
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\n{}\nAPI service log:\n{}",
            std::fs::read_to_string(&watch_out).unwrap_or_default(),
            api_log()
        )
    })?;
    drop(watcher);
    check_list(&k)?;

    // RBAC: a user without a binding is refused, by kube-apiserver and by our own review.
    let user = "alice-klio";
    let (ok, _, err) = kubectl(&env, &["--as", user, "get", "kliobackups", "-n", &ns]);
    ensure!(!ok && err.to_lowercase().contains("forbidden"), "{err}");
    let pki = env.dir().join("pki");
    let (fp_crt, fp_key) = (
        pki.join("front-proxy-client.crt"),
        pki.join("front-proxy-client.key"),
    );
    let list_path = format!("/apis/{GROUP}/v1alpha1/namespaces/{ns}/kliobackups");
    let as_alice = || {
        direct_get(
            port,
            &host,
            &serving_crt,
            Some((&fp_crt, &fp_key)),
            Some((user, &["system:authenticated"])),
            &list_path,
        )
    };
    let (code, body) = as_alice();
    ensure!(
        code == 403 && body.contains("Klio API service's SubjectAccessReview"),
        "{code} {body}"
    );
    env.kubectl_ok(
        &[
            "create",
            "rolebinding",
            "alice-reads-backups",
            "-n",
            &ns,
            "--clusterrole",
            "klio-api-reader",
            "--user",
            user,
        ],
        None,
    );
    eventually(
        Duration::from_secs(30),
        "the RoleBinding lets the user list through kubectl",
        || {
            let (ok, out, _) = kubectl(
                &env,
                &["--as", user, "get", "kliobackups", "-n", &ns, "-o", "name"],
            );
            Ok((ok && out.contains(&name)).then_some(()))
        },
    )?;
    // Denials are remembered for 10 s at most.
    eventually(
        Duration::from_secs(30),
        "our review allows the bound user",
        || {
            let (code, body) = as_alice();
            Ok((code == 200 && body.contains(&name)).then_some(()))
        },
    )?;
    let (ok, _, err) = kubectl(&env, &["--as", user, "get", "kliobackups", "-n", "default"]);
    ensure!(!ok && err.to_lowercase().contains("forbidden"), "{err}");

    // Without a valid front-proxy certificate nothing is served.
    let (code, body) = direct_get(
        port,
        &host,
        &serving_crt,
        None,
        Some(("admin", &["system:masters"])),
        &list_path,
    );
    ensure!(
        code == 401 && body.contains("no client certificate"),
        "{code} {body}"
    );
    let (code, _) = direct_get(
        port,
        &host,
        &serving_crt,
        None,
        None,
        &format!("/apis/{GROUP}/v1alpha1"),
    );
    ensure!(code == 401, "discovery without a certificate: {code}");
    // A certificate from another CA (the cluster's client CA): the handshake fails.
    let (code, body) = direct_get(
        port,
        &host,
        &serving_crt,
        Some((&pki.join("admin.crt"), &pki.join("admin.key"))),
        Some(("admin", &["system:masters"])),
        &list_path,
    );
    ensure!(
        code == 0,
        "a certificate of another CA was accepted: {code} {body}"
    );
    // The front-proxy CA's certificate with a name not in requestheader-allowed-names.
    let (other_crt, other_key) = issue_client_cert(
        &certs,
        "not-the-proxy",
        "someone-else",
        &pki.join("front-proxy-ca.crt"),
        &pki.join("front-proxy-ca.key"),
    );
    let (code, body) = direct_get(
        port,
        &host,
        &serving_crt,
        Some((&other_crt, &other_key)),
        Some(("admin", &["system:masters"])),
        &list_path,
    );
    ensure!(
        code == 401 && body.contains("requestheader-allowed-names"),
        "{code} {body}"
    );
    // Health probes need no certificate.
    let (code, _) = direct_get(port, &host, &serving_crt, None, None, "/readyz");
    ensure!(code == 200, "readyz: {code}");

    // The Klio server down: a clear 503 with the reason, not a hang.
    k.kill_server()?;
    streamer.kill()?;
    let (ok, _, err) = kubectl(
        &env,
        &["get", "kliobackups", "-n", &ns, "--request-timeout", "60s"],
    );
    ensure!(!ok, "kubectl get succeeded with the Klio server down");
    ensure!(
        err.contains("ServiceUnavailable") && err.contains(&format!("127.0.0.1:{}", k.base_port)),
        "{err}"
    );
    // Discovery still works (the APIService stays Available).
    let (ok, _, err) = kubectl(&env, &["get", "--raw", &format!("/apis/{GROUP}/v1alpha1")]);
    ensure!(ok, "{err}");
    k.start_server()?;
    eventually(
        Duration::from_secs(30),
        "the list works again once the server is back",
        || {
            Ok(kubectl(&env, &["get", "kliobackups", "-n", &ns])
                .0
                .then_some(()))
        },
    )?;

    // Read-only: writes are refused.
    let (ok, _, err) = kubectl(&env, &["delete", "kliobackups", &name, "-n", &ns]);
    ensure!(
        !ok && (err.contains("MethodNotAllowed")
            || err.contains("read-only")
            || err.contains("not allowed")),
        "{err}"
    );
    Ok(())
}
