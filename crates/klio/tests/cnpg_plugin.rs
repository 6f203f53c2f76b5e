//! Klio's CNPG-I plugin with the real CloudNativePG operator (v1.30.0) on the test control
//! plane: the operator finds the plugin through the chart's Service (`helm install`), dials it
//! over mutual TLS (through the fixture's loopback CONNECT proxy), lists it in the Cluster's
//! status, and has it inject the sidecars into the instance Pod it creates and `klio-restore`
//! into a recovery Job; a Cluster naming a missing PluginConfiguration is stopped with the
//! reason in its status and gets nothing injected.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use klio_test_support::{
    ChildGuard, CnpgOperator, K8sTestEnv, free_port, mark_job_succeeded, plugin_tls_secrets,
    scratch_dir, self_signed_tls, wait_for_object, wait_until,
};
use serde_json::Value;

const PLUGIN_AUTHORITY: &str = "klio-plugin.cnpg-system.svc:9090";

/// `text` indented by four spaces, for a YAML block scalar.
fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {list:#}"))
}

fn cluster_yaml(ns: &str, name: &str, plugin_ref: &str) -> String {
    format!(
        "apiVersion: postgresql.cnpg.io/v1
kind: Cluster
metadata:
  name: {name}
  namespace: {ns}
spec:
  instances: 1
  postgresql:
    pg_hba:
      - local replication all peer
  plugins:
    - name: klio.enterprisedb.io
      enabled: true
      parameters:
        pluginConfigurationRef: {plugin_ref}
  storage:
    size: 1Gi
"
    )
}

#[test]
fn cnpg_operator_discovers_klio_and_gets_its_sidecars_injected() {
    let env = K8sTestEnv::with_klio_crds();
    let plugin_port = free_port();
    let plugin_addr = format!("127.0.0.1:{plugin_port}").parse().unwrap();
    let operator = CnpgOperator::start(&env, "cnpg-system", &[(PLUGIN_AUTHORITY, plugin_addr)]);
    let scratch = scratch_dir();

    // The plugin's certificate pair, as cert-manager's selfSigned issuer would make them.
    let tls = plugin_tls_secrets(&env, "cnpg-system", scratch.path(), "klio-plugin");
    // The chart: its Service in cnpg-system is what CloudNativePG discovers.
    env.helm_install_klio(&scratch.path().join("helm"));
    let svc = env
        .get_json(&["service", "klio-plugin", "-n", "cnpg-system"])
        .unwrap();
    assert_eq!(
        svc["metadata"]["labels"]["cnpg.io/pluginName"],
        "klio.enterprisedb.io"
    );

    // The plugin process the chart's Deployment would run, with the Secrets' files.
    let log = scratch.path().join("cnpg-plugin.log");
    let listen = format!("127.0.0.1:{plugin_port}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_klio"));
    cmd.args(["cnpg-plugin", "--listen", &listen])
        .arg("--server-cert")
        .arg(&tls.server_crt)
        .arg("--server-key")
        .arg(&tls.server_key)
        .arg("--client-cert")
        .arg(&tls.client_crt)
        .args(["--sidecar-image", "localhost/klio:test"])
        .env("KUBECONFIG", env.kubeconfig())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let _plugin = ChildGuard::spawn(&mut cmd).unwrap();
    let plugin_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // A PluginConfiguration with container customizations, and a Cluster using it.
    let ns = env.create_namespace("cnpg-klio");
    env.apply(&format!(
        "apiVersion: klio.enterprisedb.io/v1alpha1
kind: PluginConfiguration
metadata:
  name: klio-config
  namespace: {ns}
spec:
  serverAddress: klio-server.{ns}
  clientSecretName: client-tls
  serverSecretName: server-tls
  containers:
    - name: klio-plugin
      env:
        - name: LOG_LEVEL
          value: debug
      resources:
        limits:
          memory: 512Mi
      volumeMounts:
        - name: scratch-data
          mountPath: /extra
    - name: klio-wal
      env:
        - name: WAL_BUFFER_SIZE
          value: \"8192\"
"
    ));
    env.apply(&cluster_yaml(&ns, "pg", "klio-config"));

    // The Cluster lists the plugin with the capabilities the operator side advertised.
    let cluster = wait_until(
        Duration::from_secs(90),
        Duration::from_millis(250),
        "pluginStatus",
        || {
            let c = env.get_json(&["cluster", "pg", "-n", &ns]);
            Ok(c.is_some_and(|c| {
                c["status"]["pluginStatus"]
                    .as_array()
                    .is_some_and(|p| !p.is_empty())
            }))
        },
    );
    if let Err(e) = cluster {
        panic!(
            "{e:#}\noperator:\n{}\nplugin:\n{}",
            operator.log_tail(60),
            plugin_log()
        );
    }
    let c = env.get_json(&["cluster", "pg", "-n", &ns]).unwrap();
    let status = &c["status"]["pluginStatus"][0];
    assert_eq!(status["name"], "klio.enterprisedb.io");
    let caps = status["capabilities"].to_string();
    for cap in [
        "TYPE_LIFECYCLE_SERVICE",
        "TYPE_RECONCILER_HOOKS",
        "TYPE_INSTANCE_SIDECAR_INJECTION",
    ] {
        assert!(caps.contains(cap), "{status:#}");
    }

    // The initdb Job is not a recovery Job: nothing injected. Then the instance Pod.
    let job = wait_for_object(
        &env,
        &operator,
        &["job", "pg-1-initdb", "-n", &ns],
        Duration::from_secs(90),
    );
    assert!(
        names(&job["spec"]["template"]["spec"]["initContainers"])
            .iter()
            .all(|n| !n.starts_with("klio-"))
    );
    mark_job_succeeded(&env, &ns, "pg-1-initdb");
    let pod = wait_for_object(
        &env,
        &operator,
        &["pod", "pg-1", "-n", &ns],
        Duration::from_secs(90),
    );
    let init = &pod["spec"]["initContainers"];
    let klio: Vec<String> = names(init)
        .into_iter()
        .filter(|n| n.starts_with("klio-"))
        .collect();
    assert_eq!(klio, ["klio-plugin", "klio-wal"], "{init:#}");
    let plugin = container(init, "klio-plugin");
    assert_eq!(plugin["restartPolicy"], "Always");
    assert_eq!(plugin["image"], "localhost/klio:test");
    assert_eq!(plugin["resources"]["limits"]["memory"], "512Mi");
    assert_eq!(plugin["securityContext"]["runAsUser"], 26);
    let env_names = names(&plugin["env"]);
    for n in [
        "CONTAINER_NAME",
        "LOG_LEVEL",
        "KLIO_SERVER_ADDRESS",
        "PGDATA",
    ] {
        assert!(
            env_names.iter().any(|e| e == n),
            "{n} missing: {env_names:?}"
        );
    }
    let mounts: Vec<&str> = plugin["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(
        mounts.contains(&"/extra") && mounts.contains(&"/plugins"),
        "{mounts:?}"
    );
    let wal = container(init, "klio-wal");
    assert!(names(&wal["env"]).iter().any(|e| e == "WAL_BUFFER_SIZE"));
    let postgres = container(&pod["spec"]["containers"], "postgres");
    assert!(
        postgres["volumeMounts"]
            .to_string()
            .contains("\"/plugins\"")
    );

    // The spec CloudNativePG stored for comparison is the one it created: no rollout loop.
    let stored: Value = serde_json::from_str(
        pod["metadata"]["annotations"]["cnpg.io/podSpec"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    // (The API server's ServiceAccount admission adds its token volume and mounts later.)
    let ours = |list: &Value| -> Vec<String> {
        names(list)
            .into_iter()
            .filter(|n| !n.starts_with("kube-api-access-"))
            .collect()
    };
    for field in ["initContainers", "containers", "volumes"] {
        assert_eq!(ours(&stored[field]), ours(&pod["spec"][field]), "{field}");
    }
    assert_eq!(
        container(&stored["initContainers"], "klio-plugin")["env"],
        plugin["env"],
        "the stored and created sidecars differ"
    );
    let uid = pod["metadata"]["uid"].clone();
    std::thread::sleep(Duration::from_secs(5));
    let again = env.get_json(&["pod", "pg-1", "-n", &ns]).unwrap();
    assert_eq!(again["metadata"]["uid"], uid, "the pod was recreated");

    // A recovery Cluster whose source is a Klio external cluster: full-recovery gets
    // klio-restore.
    env.apply(&format!(
        "apiVersion: postgresql.cnpg.io/v1
kind: Cluster
metadata:
  name: restored
  namespace: {ns}
spec:
  instances: 1
  storage:
    size: 1Gi
  bootstrap:
    recovery:
      source: origin
  externalClusters:
    - name: origin
      plugin:
        name: klio.enterprisedb.io
        parameters:
          pluginConfigurationRef: klio-config
"
    ));
    let job = wait_for_object(
        &env,
        &operator,
        &["job", "restored-1-full-recovery", "-n", &ns],
        Duration::from_secs(90),
    );
    let init = &job["spec"]["template"]["spec"]["initContainers"];
    let restore = container(init, "klio-restore");
    assert_eq!(restore["args"][0], "cnpg-sidecar");

    // A missing PluginConfiguration: the reconcile stops with the reason, nothing is created.
    env.apply(&cluster_yaml(&ns, "orphan", "nope"));
    let reason = wait_until(
        Duration::from_secs(90),
        Duration::from_millis(250),
        "the refusal in the status",
        || {
            let c = env.get_json(&["cluster", "orphan", "-n", &ns]);
            Ok(c.is_some_and(|c| {
                c["status"]
                    .to_string()
                    .contains("PluginConfiguration \\\"nope\\\"")
            }))
        },
    );
    if let Err(e) = reason {
        let c = env.get_json(&["cluster", "orphan", "-n", &ns]);
        panic!("{e:#}\n{c:#?}\nplugin:\n{}", plugin_log());
    }
    assert!(
        env.get_json(&["job", "orphan-1-initdb", "-n", &ns])
            .is_none()
    );

    // CloudNativePG's client certificate replaced by one the plugin does not trust: the
    // plugin refuses the connection, the Cluster says so, nothing is created.
    let (other_crt, other_key) = self_signed_tls(
        scratch.path(),
        "other",
        "cnpg-operator",
        "DNS:cnpg-operator",
    );
    let secret = format!(
        "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata:\n  name: klio-plugin-client-tls\n  namespace: cnpg-system\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&std::fs::read_to_string(&other_crt).unwrap()),
        indent(&std::fs::read_to_string(&other_key).unwrap())
    );
    env.apply(&secret);
    env.apply(&cluster_yaml(&ns, "stranger", "klio-config"));
    let refused = wait_until(
        Duration::from_secs(90),
        Duration::from_millis(250),
        "the TLS refusal in the status",
        || {
            let c = env.get_json(&["cluster", "stranger", "-n", &ns]);
            Ok(c.is_some_and(|c| {
                c["status"]["phaseReason"]
                    .as_str()
                    .is_some_and(|r| r.contains("tls: unknown certificate"))
            }))
        },
    );
    if let Err(e) = refused {
        let c = env.get_json(&["cluster", "stranger", "-n", &ns]);
        panic!("{e:#}\n{c:#?}\n{}", operator.log_tail(20));
    }
    assert!(
        env.get_json(&["job", "stranger-1-initdb", "-n", &ns])
            .is_none()
    );
    assert!(
        plugin_log().contains("rejected TLS client"),
        "{}",
        plugin_log()
    );
    env.helm(
        &scratch.path().join("helm"),
        &["uninstall", "klio", "-n", "klio-system"],
    );
}
