//! The CRDs on a real kube-apiserver (v1.37, `scripts/k8s-testenv.sh`): they install and become
//! Established, the documentation's example manifests are accepted, every documented rule is
//! enforced by the API server with a message naming the field, `spec.mode` is immutable, and
//! `kubectl get` shows the printer columns.
//!
//! All tests of this binary share one control plane ([`K8sTestEnv::shared`]); each works in its
//! own namespace. Manifests go through `kubectl apply --server-side`.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use klio_test_support::K8sTestEnv;
use serde_yaml::Value;

/// A test-data manifest (`tests/data/<name>`) as YAML.
fn manifest(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// `doc` with `metadata.namespace` set to `ns`.
fn in_namespace(mut doc: Value, ns: &str) -> String {
    doc["metadata"]["namespace"] = Value::from(ns);
    serde_yaml::to_string(&doc).unwrap()
}

/// `base` with `change` applied.
fn edited(base: &Value, change: impl FnOnce(&mut Value)) -> Value {
    let mut doc = base.clone();
    change(&mut doc);
    doc
}

fn spec_mut(doc: &mut Value) -> &mut serde_yaml::Mapping {
    doc.get_mut("spec").unwrap().as_mapping_mut().unwrap()
}

fn apply(env: &K8sTestEnv, ns: &str, doc: &Value) -> std::process::Output {
    env.kubectl(
        &[
            "apply",
            "--server-side",
            "--field-manager=klio-test",
            "-n",
            ns,
            "-f",
            "-",
        ],
        Some(&in_namespace(doc.clone(), ns)),
    )
}

fn apply_ok(env: &K8sTestEnv, ns: &str, doc: &Value) {
    let out = apply(env, ns, doc);
    assert!(
        out.status.success(),
        "apply was refused:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        serde_yaml::to_string(doc).unwrap()
    );
}

/// Applies `doc` and expects the API server to refuse it with an error that names `field` and
/// contains `message`.
fn apply_refused(env: &K8sTestEnv, ns: &str, doc: &Value, field: &str, message: &str) {
    let out = apply(env, ns, doc);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "apply was accepted, expected a refusal naming {field}:\n{}",
        serde_yaml::to_string(doc).unwrap()
    );
    assert!(
        stderr.contains(field) && stderr.contains(message),
        "refusal does not name {field:?} with {message:?}:\n{stderr}"
    );
}

#[test]
fn crds_examples_accepted_and_printed_with_columns() {
    let env = K8sTestEnv::with_klio_crds();
    let ns = env.create_namespace("klio-examples");

    let mut server = manifest("server.yaml");
    let template = manifest("server-template-fragment.yaml")["spec"]["template"].clone();
    apply_ok(&env, &ns, &server);
    apply_ok(&env, &ns, &manifest("server-read-only.yaml"));
    // The pod template is kept as given (x-kubernetes-preserve-unknown-fields).
    spec_mut(&mut server).insert("template".into(), template);
    apply_ok(&env, &ns, &server);
    let stored: Value = serde_yaml::from_str(&env.kubectl_ok(
        &["get", "server", "my-server", "-n", &ns, "-o", "yaml"],
        None,
    ))
    .unwrap();
    assert_eq!(
        stored["spec"]["mode"],
        Value::from("standard"),
        "mode defaults to standard"
    );
    assert_eq!(
        stored["spec"]["template"]["spec"]["tolerations"][0]["key"],
        Value::from("node-role.kubernetes.io/klio")
    );
    assert_eq!(
        stored["spec"]["tier1"]["data"]["pvcTemplate"]["resources"]["requests"]["storage"],
        Value::from("100Gi")
    );
    // The typed client side reads what the API server stored.
    let typed: klio_k8s_types::Server = serde_yaml::from_value(stored).unwrap();
    assert_eq!(typed.spec.mode, klio_k8s_types::Mode::Standard);
    assert!(typed.spec.template.is_some());

    let servers = env.kubectl_ok(&["get", "servers", "-n", &ns], None);
    let header: Vec<&str> = servers.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "MODE", "READY", "AGE"], "{servers}");
    let rows: Vec<Vec<&str>> = servers
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        rows.iter()
            .any(|r| r[0] == "dr-server" && r[1] == "read-only"),
        "{servers}"
    );
    assert!(
        rows.iter()
            .any(|r| r[0] == "my-server" && r[1] == "standard"),
        "{servers}"
    );
    let wide = env.kubectl_ok(&["get", "servers", "-n", &ns, "-o", "wide"], None);
    assert!(
        wide.lines().next().unwrap().contains("IMAGE") && wide.contains("localhost/klio:test"),
        "{wide}"
    );

    for (name, file) in [
        ("basic", "pluginconfiguration-basic.yaml"),
        ("retention", "pluginconfiguration-retention.yaml"),
        ("read-only", "pluginconfiguration-read-only.yaml"),
        ("containers", "pluginconfiguration-containers.yaml"),
    ] {
        let mut doc = manifest(file);
        doc["metadata"]["name"] = Value::from(format!("plugin-{name}"));
        apply_ok(&env, &ns, &doc);
    }
    let stored: Value = serde_yaml::from_str(&env.kubectl_ok(
        &[
            "get",
            "pluginconfiguration",
            "plugin-containers",
            "-n",
            &ns,
            "-o",
            "yaml",
        ],
        None,
    ))
    .unwrap();
    assert_eq!(
        stored["spec"]["containers"][0]["resources"]["limits"]["memory"],
        Value::from("512Mi"),
        "container fields are kept"
    );
    let typed: klio_k8s_types::PluginConfiguration = serde_yaml::from_value(stored).unwrap();
    assert_eq!(typed.spec.containers.len(), 2);

    let plugins = env.kubectl_ok(&["get", "pluginconfigurations", "-n", &ns], None);
    let header: Vec<&str> = plugins.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "SERVERADDRESS", "MODE", "READY", "AGE"],
        "{plugins}"
    );
    assert!(
        plugins.lines().any(|l| {
            let r: Vec<&str> = l.split_whitespace().collect();
            r[..3] == ["plugin-read-only", "dr-server.default", "read-only"]
        }),
        "{plugins}"
    );

    // The Ready column comes from status.conditions, written through the status subresource.
    let status = r#"{"status":{"observedGeneration":1,"conditions":[{"type":"Ready","status":"True","reason":"Reconciled","message":"","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    env.kubectl_ok(
        &[
            "patch",
            "server",
            "my-server",
            "-n",
            &ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            status,
        ],
        None,
    );
    let line = env.kubectl_ok(
        &["get", "server", "my-server", "-n", &ns, "--no-headers"],
        None,
    );
    let row: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(row[..3], ["my-server", "standard", "True"], "{line}");
}

#[test]
fn server_seed_rule_violations_refused_naming_the_field() {
    let env = K8sTestEnv::with_klio_crds();
    let ns = env.create_namespace("klio-server-rules");
    let standard = manifest("server.yaml");
    let read_only = manifest("server-read-only.yaml");

    // Each case: the seed changed one way, the field the refusal names, and its message.
    let cases = [
        (
            edited(&read_only, |d| {
                spec_mut(d).remove("tier2");
            }),
            "spec.tier2",
            "spec.tier2 is required when spec.mode is read-only",
        ),
        (
            edited(&read_only, |d| {
                spec_mut(d).insert("tier1".into(), standard["spec"]["tier1"].clone());
            }),
            "spec.tier1",
            "spec.tier1 is not allowed when spec.mode is read-only",
        ),
        (
            edited(&read_only, |d| {
                spec_mut(d).insert("queue".into(), standard["spec"]["queue"].clone());
            }),
            "spec.queue",
            "spec.queue is not allowed when spec.mode is read-only",
        ),
        (
            edited(&standard, |d| {
                spec_mut(d).remove("tier1");
            }),
            "spec.tier1",
            "spec.tier1 is required when spec.mode is standard",
        ),
        // An explicit `mode: standard` behaves like the default.
        (
            edited(&standard, |d| {
                spec_mut(d).remove("queue");
                spec_mut(d).insert("mode".into(), "standard".into());
            }),
            "spec.queue",
            "spec.queue is required when spec.mode is standard",
        ),
        (
            edited(&standard, |d| {
                spec_mut(d).insert("mode".into(), "read-write".into());
            }),
            "spec.mode",
            "Unsupported value",
        ),
        (
            edited(&standard, |d| {
                d["spec"]["tier2"]["s3"]
                    .as_mapping_mut()
                    .unwrap()
                    .remove("secretAccessKey");
            }),
            "spec.tier2.s3",
            "spec.tier2.s3.accessKeyId and spec.tier2.s3.secretAccessKey must be set together",
        ),
    ];
    for (doc, field, message) in &cases {
        apply_refused(&env, &ns, doc, field, message);
    }

    // Nothing refused was stored.
    let list = env.kubectl_ok(&["get", "servers", "-n", &ns, "-o", "name"], None);
    assert_eq!(list.trim(), "", "{list}");
}

#[test]
fn server_mode_is_immutable() {
    let env = K8sTestEnv::with_klio_crds();
    let ns = env.create_namespace("klio-server-mode");

    // standard -> read-only, with a spec that is otherwise valid for read-only.
    let standard = manifest("server.yaml");
    apply_ok(&env, &ns, &standard);
    let mut doc = standard.clone();
    spec_mut(&mut doc).remove("tier1");
    spec_mut(&mut doc).remove("queue");
    spec_mut(&mut doc).insert("mode".into(), "read-only".into());
    apply_refused(&env, &ns, &doc, "spec.mode", "spec.mode is immutable");

    // read-only -> standard, with a spec that is otherwise valid for standard.
    let read_only = manifest("server-read-only.yaml");
    apply_ok(&env, &ns, &read_only);
    let mut doc = read_only.clone();
    spec_mut(&mut doc).insert("mode".into(), "standard".into());
    spec_mut(&mut doc).insert("tier1".into(), standard["spec"]["tier1"].clone());
    spec_mut(&mut doc).insert("queue".into(), standard["spec"]["queue"].clone());
    apply_refused(&env, &ns, &doc, "spec.mode", "spec.mode is immutable");

    // Other fields still change.
    let mut doc = standard.clone();
    spec_mut(&mut doc).insert("image".into(), "localhost/klio:test2".into());
    apply_ok(&env, &ns, &doc);
    let image = env.kubectl_ok(
        &[
            "get",
            "server",
            "my-server",
            "-n",
            &ns,
            "-o",
            "jsonpath={.spec.image} {.spec.mode}",
        ],
        None,
    );
    assert_eq!(image, "localhost/klio:test2 standard");
}

#[test]
fn plugin_configuration_seed_rule_violations_refused_naming_the_field() {
    let env = K8sTestEnv::with_klio_crds();
    let ns = env.create_namespace("klio-plugin-rules");
    let read_only = manifest("pluginconfiguration-read-only.yaml");
    let retention = manifest("pluginconfiguration-retention.yaml");
    let containers = manifest("pluginconfiguration-containers.yaml");

    // Each case: a seed changed one way, the field the refusal names, and its message.
    let cases = [
        (
            edited(&read_only, |d| {
                spec_mut(d).remove("tier2");
            }),
            "spec.tier2.enableRecovery",
            "spec.tier2.enableRecovery must be true when spec.mode is read-only",
        ),
        (
            edited(&read_only, |d| {
                d["spec"]["tier2"]["enableRecovery"] = Value::from(false);
            }),
            "spec.tier2.enableRecovery",
            "spec.tier2.enableRecovery must be true when spec.mode is read-only",
        ),
        (
            edited(&read_only, |d| {
                spec_mut(d).insert("tier1".into(), retention["spec"]["tier1"].clone());
            }),
            "spec.tier1",
            "spec.tier1 is not allowed when spec.mode is read-only",
        ),
        (
            edited(&read_only, |d| {
                d["spec"]["tier2"]["enableBackup"] = Value::from(true);
            }),
            "spec.tier2.enableBackup",
            "spec.tier2.enableBackup must be false or omitted when spec.mode is read-only",
        ),
        (
            edited(&containers, |d| {
                d["spec"]["containers"][1]["name"] = Value::from("postgres");
            }),
            "spec.containers[1].name",
            "spec.containers[].name must be one of klio-plugin, klio-wal, klio-restore",
        ),
        // A map list keyed by name: server-side apply refuses the duplicate key itself.
        (
            edited(&containers, |d| {
                d["spec"]["containers"][1]["name"] = Value::from("klio-plugin");
            }),
            ".spec.containers",
            r#"duplicate entries for key [name="klio-plugin"]"#,
        ),
        (
            edited(&retention, |d| {
                d["spec"]["tier1"]["retention"]["keepDaily"] = Value::from(-1);
            }),
            "spec.tier1.retention.keepDaily",
            "should be greater than or equal to 0",
        ),
    ];
    for (doc, field, message) in &cases {
        apply_refused(&env, &ns, doc, field, message);
    }

    // `enableBackup: false` is allowed in read-only mode.
    apply_ok(
        &env,
        &ns,
        &edited(&read_only, |d| {
            d["spec"]["tier2"]["enableBackup"] = Value::from(false);
        }),
    );
}
