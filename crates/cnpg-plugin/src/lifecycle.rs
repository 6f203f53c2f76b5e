//! Sidecar injection as pure functions on JSON: a Pod or Job (and the PluginConfiguration)
//! in, the changed object out; [`json_patch()`] turns the difference into the RFC 6902 patch
//! the operator applies. Working on JSON keeps every field we do not touch exactly as
//! CloudNativePG sent it.
//!
//! Instance pods get `klio-plugin` (the CNPG-I socket server and backups) and, unless the
//! PluginConfiguration is read-only, `klio-wal` (WAL streaming), both as native sidecars
//! (`initContainers` with `restartPolicy: Always`). Recovery Jobs (`full-recovery`,
//! `snapshot-recovery`) get `klio-restore`. Each sidecar starts from the PluginConfiguration's
//! container of that name; Klio forces `name`, `args` and `CONTAINER_NAME`, fills the image,
//! restart policy, security context, probes, resources, environment and mounts only where
//! unset, and keeps everything else.
//!
//! The result is a function of the input only and re-applying it changes nothing (existing
//! Klio sidecars are replaced, lists keep their order), so CloudNativePG's EVALUATE and CREATE
//! give the same pod and its pod-spec comparison never sees a difference.

use serde_json::{Value, json};

use crate::PLUGIN_NAME;
use crate::sidecar::ArchiveNames;
use klio_k8s_types::{Mode, PluginConfigurationSpec};

/// The emptyDir shared by the instance manager and the sidecars (`/plugins/<plugin>`).
pub const PLUGINS_VOLUME: &str = "plugins";
pub const PLUGINS_DIR: &str = "/plugins";
/// Where the client certificate (`clientSecretName`) is mounted in the sidecars.
pub const CLIENT_TLS_DIR: &str = "/klio/client-tls";
/// Where the server certificate (`serverSecretName`, trusted as the server's CA) is mounted.
pub const SERVER_TLS_DIR: &str = "/klio/server-tls";
const CLIENT_TLS_VOLUME: &str = "klio-client-tls";
const SERVER_TLS_VOLUME: &str = "klio-server-tls";
/// PostgreSQL's user and group in CloudNativePG images (peer authentication over the socket).
pub const POSTGRES_UID: i64 = 26;

/// The sidecars' image and resources when the PluginConfiguration does not set them (the
/// chart's values).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SidecarDefaults {
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// A `ResourceRequirements` JSON object.
    pub resources: Option<Value>,
}

/// Why an object cannot be changed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HookError {
    #[error("the {kind} has no container named \"{container}\"")]
    NoMainContainer {
        kind: &'static str,
        container: String,
    },
    #[error("the {0} definition is not a JSON object with a spec")]
    Malformed(&'static str),
}

/// The sidecars of an instance pod for `spec`, in their order.
fn instance_sidecars(spec: &PluginConfigurationSpec) -> Vec<&'static str> {
    match spec.mode {
        Mode::Standard => vec!["klio-plugin", "klio-wal"],
        Mode::ReadOnly => vec!["klio-plugin"],
    }
}

/// Klio's arguments of each sidecar.
/// The metrics endpoint of each sidecar (port, and its name for PodMonitors): distinct,
/// since the sidecars share the pod's network.
pub fn sidecar_metrics_port(name: &str) -> (i32, &'static str) {
    match name {
        "klio-wal" => (9188, "wal-metrics"),
        _ => (9189, "plugin-metrics"),
    }
}

fn sidecar_args(name: &str) -> Vec<&'static str> {
    match name {
        "klio-wal" => vec!["wal-stream"],
        "klio-restore" => vec!["cnpg-sidecar", "restore"],
        _ => vec!["cnpg-sidecar", "instance"],
    }
}

/// `pod` with Klio's sidecars for the PluginConfiguration `pc_name`/`spec`.
pub fn mutate_pod(
    pod: &Value,
    pc_name: &str,
    spec: &PluginConfigurationSpec,
    names: &ArchiveNames,
    defaults: &SidecarDefaults,
) -> Result<Value, HookError> {
    let mut out = pod.clone();
    let pod_spec = out
        .get_mut("spec")
        .filter(|s| s.is_object())
        .ok_or(HookError::Malformed("Pod"))?;
    inject(
        pod_spec,
        "Pod",
        "postgres",
        &instance_sidecars(spec),
        pc_name,
        spec,
        names,
        defaults,
    )?;
    Ok(out)
}

/// The role of a CloudNativePG Job (`cnpg.io/jobRole`, or EDB's label with the same suffix).
pub fn job_role(job: &Value) -> Option<&str> {
    let labels = job["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .or_else(|| job["metadata"]["labels"].as_object())?;
    labels
        .iter()
        .find(|(k, _)| k.as_str() == "cnpg.io/jobRole" || k.ends_with("/jobRole"))
        .and_then(|(_, v)| v.as_str())
}

/// Whether a Job of this role restores through the plugin.
pub fn is_recovery_role(role: &str) -> bool {
    matches!(role, "full-recovery" | "snapshot-recovery")
}

/// `job` with `klio-restore`, when it is a recovery Job; `None` for any other Job.
pub fn mutate_job(
    job: &Value,
    pc_name: &str,
    spec: &PluginConfigurationSpec,
    names: &ArchiveNames,
    defaults: &SidecarDefaults,
) -> Result<Option<Value>, HookError> {
    let Some(role) = job_role(job).filter(|r| is_recovery_role(r)) else {
        return Ok(None);
    };
    let role = role.to_string();
    let mut out = job.clone();
    let pod_spec = out
        .get_mut("spec")
        .and_then(|s| s.get_mut("template"))
        .and_then(|t| t.get_mut("spec"))
        .filter(|s| s.is_object())
        .ok_or(HookError::Malformed("Job"))?;
    inject(
        pod_spec,
        "Job",
        &role,
        &["klio-restore"],
        pc_name,
        spec,
        names,
        defaults,
    )?;
    Ok(Some(out))
}

#[allow(clippy::too_many_arguments)]
fn inject(
    pod_spec: &mut Value,
    kind: &'static str,
    main: &str,
    sidecars: &[&str],
    pc_name: &str,
    spec: &PluginConfigurationSpec,
    names: &ArchiveNames,
    defaults: &SidecarDefaults,
) -> Result<(), HookError> {
    // Volumes: the shared socket directory and the two certificate Secrets (ours replaced).
    let volumes = array_mut(pod_spec, "volumes");
    if !volumes.iter().any(|v| v["name"] == PLUGINS_VOLUME) {
        volumes.push(json!({"name": PLUGINS_VOLUME, "emptyDir": {}}));
    }
    for (name, secret) in [
        (CLIENT_TLS_VOLUME, &spec.client_secret_name),
        (SERVER_TLS_VOLUME, &spec.server_secret_name),
    ] {
        let v = json!({"name": name, "secret": {"secretName": secret, "defaultMode": 0o440}});
        match volumes.iter_mut().find(|x| x["name"] == name) {
            Some(x) => *x = v,
            None => volumes.push(v),
        }
    }

    // The main container mounts the socket directory.
    let containers = array_mut(pod_spec, "containers");
    let main_container = containers
        .iter_mut()
        .find(|c| c["name"] == main)
        .ok_or_else(|| HookError::NoMainContainer {
            kind,
            container: main.to_string(),
        })?;
    let mounts = array_mut(main_container, "volumeMounts");
    if !mounts.iter().any(|m| m["mountPath"] == PLUGINS_DIR) {
        mounts.push(json!({"name": PLUGINS_VOLUME, "mountPath": PLUGINS_DIR}));
    }
    let main_container = main_container.clone();

    let built: Vec<Value> = sidecars
        .iter()
        .map(|name| sidecar(name, &main_container, pc_name, spec, names, defaults))
        .collect();
    let init = array_mut(pod_spec, "initContainers");
    init.retain(|c| {
        !c["name"].as_str().is_some_and(|n| {
            klio_k8s_types::plugin_configuration::SIDECAR_CONTAINER_NAMES.contains(&n)
        })
    });
    init.extend(built);
    Ok(())
}

/// One sidecar: the PluginConfiguration's container as the base, Klio's required values
/// forced, its defaults where the base says nothing.
fn sidecar(
    name: &str,
    main: &Value,
    pc_name: &str,
    spec: &PluginConfigurationSpec,
    names: &ArchiveNames,
    defaults: &SidecarDefaults,
) -> Value {
    let mut c = spec
        .containers
        .iter()
        .find(|c| c.name == name)
        .and_then(|c| serde_json::to_value(c).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    c["name"] = json!(name);
    c["args"] = json!(sidecar_args(name));
    fill(&mut c, "image", json!(defaults.image));
    if let Some(p) = &defaults.image_pull_policy {
        fill(&mut c, "imagePullPolicy", json!(p));
    }
    fill(&mut c, "restartPolicy", json!("Always"));
    fill(
        &mut c,
        "securityContext",
        json!({
            "runAsUser": POSTGRES_UID,
            "runAsGroup": POSTGRES_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}
        }),
    );
    if let Some(r) = &defaults.resources {
        fill(&mut c, "resources", r.clone());
    }
    if name != "klio-wal" {
        // Passes once the sidecar serves the CNPG-I socket, which the instance manager
        // scans only when it starts.
        fill(
            &mut c,
            "startupProbe",
            json!({
                "exec": {"command": ["klio", "cnpg-sidecar", "healthcheck"]},
                "periodSeconds": 1,
                "failureThreshold": 60
            }),
        );
    }

    // Environment: CONTAINER_NAME forced; Klio's settings, then the main container's
    // variables (PGDATA, POD_NAME, PGHOST, ...) where the base does not set them.
    let env = array_mut(&mut c, "env");
    env.retain(|e| e["name"] != "CONTAINER_NAME");
    env.insert(0, json!({"name": "CONTAINER_NAME", "value": name}));
    let server = spec.server_address.as_str();
    let tier2 = spec.tier2.as_ref();
    let settings = [
        ("KLIO_PLUGIN_NAME", PLUGIN_NAME.to_string()),
        ("KLIO_PLUGIN_CONFIGURATION", pc_name.to_string()),
        ("KLIO_SERVER_ADDRESS", server.to_string()),
        ("KLIO_CLUSTER", names.own.clone()),
        ("KLIO_CLIENT_CERT", format!("{CLIENT_TLS_DIR}/tls.crt")),
        ("KLIO_CLIENT_KEY", format!("{CLIENT_TLS_DIR}/tls.key")),
        // The Secret's CA when it was issued by one (cert-manager writes ca.crt), and the
        // certificate itself, which verifies a self-signed one.
        (
            "KLIO_SERVER_CA",
            format!("{SERVER_TLS_DIR}/ca.crt,{SERVER_TLS_DIR}/tls.crt"),
        ),
        ("KLIO_MODE", spec.mode.as_str().to_string()),
        (
            "KLIO_TIER2_BACKUP",
            tier2.is_some_and(|t| t.enable_backup).to_string(),
        ),
        (
            "KLIO_TIER2_RECOVERY",
            tier2.is_some_and(|t| t.enable_recovery).to_string(),
        ),
        ("KLIO_SOCKET_DIR", PLUGINS_DIR.to_string()),
        // The instance manager's socket directory; peer authentication as postgres (uid 26),
        // which the Cluster's `local replication all peer` pg_hba line allows for streaming.
        (
            "KLIO_PG_DSN",
            "host=/controller/run user=postgres dbname=postgres".to_string(),
        ),
    ];
    // Present only when set, so a pod's environment changes only with what it uses.
    let retention =
        |r: Option<&klio_k8s_types::Retention>| r.and_then(|r| serde_json::to_string(r).ok());
    let optional = [
        (
            "KLIO_RECOVERY_SOURCE_CLUSTER",
            names.recovery_source.clone(),
        ),
        ("KLIO_REPLICA_SOURCE_CLUSTER", names.replica_source.clone()),
        (
            "KLIO_RETENTION",
            retention(spec.tier1.as_ref().and_then(|t| t.retention.as_ref())),
        ),
        (
            "KLIO_TIER2_RETENTION",
            retention(spec.tier2.as_ref().and_then(|t| t.retention.as_ref())),
        ),
    ];
    let (metrics_port, metrics_port_name) = sidecar_metrics_port(name);
    let telemetry = [
        (
            "KLIO_METRICS_LISTEN",
            Some(format!("0.0.0.0:{metrics_port}")),
        ),
        // The PluginConfiguration's pprof: CPU profiles on the metrics endpoint.
        (
            "KLIO_PPROF",
            (spec.pprof == Some(true)).then(|| "true".to_string()),
        ),
    ];
    let settings = settings.into_iter().chain(
        optional
            .into_iter()
            .chain(telemetry)
            .filter_map(|(k, v)| Some((k, v?))),
    );
    for (k, v) in settings {
        if !env.iter().any(|e| e["name"] == k) {
            env.push(json!({"name": k, "value": v}));
        }
    }
    for e in main["env"].as_array().into_iter().flatten() {
        if !env.iter().any(|x| x["name"] == e["name"]) {
            env.push(e.clone());
        }
    }

    let ports = array_mut(&mut c, "ports");
    if !ports.iter().any(|p| p["name"] == metrics_port_name) {
        ports.push(
            json!({"name": metrics_port_name, "containerPort": metrics_port, "protocol": "TCP"}),
        );
    }

    // Mounts: the main container's (PGDATA, /controller, /plugins, ...) and the certificates.
    let mounts = array_mut(&mut c, "volumeMounts");
    let ours = [
        json!({"name": CLIENT_TLS_VOLUME, "mountPath": CLIENT_TLS_DIR, "readOnly": true}),
        json!({"name": SERVER_TLS_VOLUME, "mountPath": SERVER_TLS_DIR, "readOnly": true}),
    ];
    for m in main["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(ours.iter())
    {
        if !mounts.iter().any(|x| x["mountPath"] == m["mountPath"]) {
            mounts.push(m.clone());
        }
    }
    c
}

/// Sets `obj[key]` unless it holds a value.
fn fill(obj: &mut Value, key: &str, value: Value) {
    if obj.get(key).is_none_or(Value::is_null) {
        obj[key] = value;
    }
}

/// `obj[key]` as an array, created (or replaced, if it held something else) when needed.
fn array_mut<'a>(obj: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    if !obj[key].is_array() {
        obj[key] = json!([]);
    }
    match &mut obj[key] {
        Value::Array(a) => a,
        _ => unreachable!("set to an array above"),
    }
}

/// The RFC 6902 patch from `original` to `changed`, as JSON bytes; empty when equal.
pub fn json_patch(original: &Value, changed: &Value) -> Vec<u8> {
    let patch = json_patch::diff(original, changed);
    if patch.0.is_empty() {
        return Vec::new();
    }
    serde_json::to_vec(&patch).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec(v: Value) -> PluginConfigurationSpec {
        serde_json::from_value(v).unwrap()
    }

    fn archives(own: &str) -> ArchiveNames {
        ArchiveNames {
            own: own.to_string(),
            recovery_source: None,
            replica_source: None,
        }
    }

    fn base_spec() -> PluginConfigurationSpec {
        spec(json!({
            "serverAddress": "klio-server.default",
            "clientSecretName": "client-tls",
            "serverSecretName": "server-tls",
            "containers": [
                {"name": "klio-plugin", "image": "registry.local/klio:1",
                 "args": ["ignored"],
                 "env": [{"name": "CONTAINER_NAME", "value": "spoof"}, {"name": "LOG_LEVEL", "value": "debug"}],
                 "resources": {"limits": {"memory": "512Mi"}},
                 "volumeMounts": [{"name": "extra", "mountPath": "/extra"}]},
                {"name": "klio-wal", "env": [{"name": "WAL_BUFFER_SIZE", "value": "8192"}]}
            ]
        }))
    }

    fn pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "pg-1", "labels": {"cnpg.io/cluster": "pg"}},
            "spec": {
                "containers": [{
                    "name": "postgres", "image": "postgres:17",
                    "env": [{"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}],
                    "volumeMounts": [{"name": "pgdata", "mountPath": "/var/lib/postgresql/data"}]
                }],
                "volumes": [{"name": "pgdata", "persistentVolumeClaim": {"claimName": "pg-1"}}],
                "futureField": {"kept": true}
            }
        })
    }

    fn defaults() -> SidecarDefaults {
        SidecarDefaults {
            image: "klio:default".into(),
            image_pull_policy: Some("IfNotPresent".into()),
            resources: Some(json!({"requests": {"cpu": "100m"}})),
        }
    }

    fn init<'a>(v: &'a Value, name: &str) -> &'a Value {
        v["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
    }

    fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
    }

    #[test]
    fn mutate_pod_merges_the_configuration_containers_as_the_seed_says() {
        let out = mutate_pod(&pod(), "pc", &base_spec(), &archives("pg"), &defaults()).unwrap();
        let plugin = init(&out, "klio-plugin");
        assert_eq!(
            plugin["args"],
            json!(["cnpg-sidecar", "instance"]),
            "args forced"
        );
        assert_eq!(
            plugin["image"], "registry.local/klio:1",
            "user's image kept"
        );
        assert_eq!(plugin["restartPolicy"], "Always");
        assert_eq!(plugin["resources"], json!({"limits": {"memory": "512Mi"}}));
        assert_eq!(
            env(plugin, "CONTAINER_NAME").unwrap()["value"],
            "klio-plugin"
        );
        assert_eq!(
            plugin["env"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["name"] == "CONTAINER_NAME")
                .count(),
            1
        );
        assert_eq!(env(plugin, "LOG_LEVEL").unwrap()["value"], "debug");
        assert_eq!(
            env(plugin, "PGDATA").unwrap()["value"],
            "/var/lib/postgresql/data/pgdata"
        );
        assert_eq!(env(plugin, "KLIO_CLUSTER").unwrap()["value"], "pg");
        // Metrics endpoints on distinct named ports; no profiles unless pprof: true.
        let wal = init(&out, "klio-wal");
        assert_eq!(
            env(plugin, "KLIO_METRICS_LISTEN").unwrap()["value"],
            "0.0.0.0:9189"
        );
        assert_eq!(
            env(wal, "KLIO_METRICS_LISTEN").unwrap()["value"],
            "0.0.0.0:9188"
        );
        assert_eq!(plugin["ports"][0]["name"], "plugin-metrics");
        assert_eq!(wal["ports"][0]["name"], "wal-metrics");
        assert!(env(plugin, "KLIO_PPROF").is_none());
        let mut profiled = base_spec();
        profiled.pprof = Some(true);
        let out2 = mutate_pod(&pod(), "pc", &profiled, &archives("pg"), &defaults()).unwrap();
        assert_eq!(
            env(init(&out2, "klio-wal"), "KLIO_PPROF").unwrap()["value"],
            "true"
        );
        assert!(
            env(plugin, "KLIO_PG_DSN").unwrap()["value"]
                .as_str()
                .unwrap()
                .contains("host=/controller/run")
        );
        assert_eq!(plugin["securityContext"]["runAsUser"], 26);
        let mounts: Vec<&str> = plugin["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        assert_eq!(
            mounts,
            [
                "/extra",
                "/var/lib/postgresql/data",
                "/plugins",
                CLIENT_TLS_DIR,
                SERVER_TLS_DIR
            ]
        );
        let wal = init(&out, "klio-wal");
        assert_eq!(wal["image"], "klio:default", "default image fills the gap");
        assert_eq!(wal["resources"], json!({"requests": {"cpu": "100m"}}));
        assert!(wal.get("startupProbe").is_none());
        assert_eq!(env(wal, "WAL_BUFFER_SIZE").unwrap()["value"], "8192");
        let main = &out["spec"]["containers"][0];
        assert_eq!(main["volumeMounts"][1]["mountPath"], "/plugins");
        assert_eq!(out["spec"]["futureField"], json!({"kept": true}));
    }

    #[test]
    fn mutate_pod_is_idempotent_and_patch_of_a_mutated_pod_is_empty() {
        let spec = base_spec();
        let once = mutate_pod(&pod(), "pc", &spec, &archives("pg"), &defaults()).unwrap();
        let twice = mutate_pod(&once, "pc", &spec, &archives("pg"), &defaults()).unwrap();
        assert_eq!(once, twice);
        assert!(json_patch(&once, &twice).is_empty());
        let patch: Value = serde_json::from_slice(&json_patch(&pod(), &once)).unwrap();
        let mut applied = pod();
        let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
        json_patch::patch(&mut applied, &patch).unwrap();
        assert_eq!(applied, once);
    }

    #[test]
    fn mutate_pod_read_only_has_no_wal_sidecar() {
        let mut s = base_spec();
        s.mode = Mode::ReadOnly;
        let out = mutate_pod(&pod(), "pc", &s, &archives("pg"), &defaults()).unwrap();
        let names: Vec<&str> = out["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["klio-plugin"]);
        // A pod that had both loses klio-wal when the configuration becomes read-only.
        let both = mutate_pod(&pod(), "pc", &base_spec(), &archives("pg"), &defaults()).unwrap();
        assert_eq!(
            mutate_pod(&both, "pc", &s, &archives("pg"), &defaults()).unwrap(),
            out
        );
    }

    #[test]
    fn mutate_job_injects_restore_only_into_recovery_jobs() {
        let job = |role: &str| {
            json!({
                "apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": format!("pg-1-{role}")},
                "spec": {"template": {
                    "metadata": {"labels": {"cnpg.io/jobRole": role}},
                    "spec": {"containers": [{"name": role, "image": "postgres:17"}]}
                }}
            })
        };
        let out = mutate_job(
            &job("full-recovery"),
            "pc",
            &base_spec(),
            &archives("pg"),
            &defaults(),
        )
        .unwrap()
        .unwrap();
        let init = &out["spec"]["template"]["spec"]["initContainers"];
        assert_eq!(init[0]["name"], "klio-restore");
        assert_eq!(init[0]["args"], json!(["cnpg-sidecar", "restore"]));
        // Only what is set reaches the environment.
        assert!(env(&init[0], "KLIO_RECOVERY_SOURCE_CLUSTER").is_none());
        assert!(env(&init[0], "KLIO_RETENTION").is_none());
        // The archive names and the retention of each tier, when set.
        let mut with_retention = base_spec();
        with_retention.tier1 = Some(klio_k8s_types::PluginTier1 {
            retention: Some(klio_k8s_types::Retention {
                keep_daily: Some(7),
                ..Default::default()
            }),
        });
        let mut recovering = archives("pg");
        recovering.recovery_source = Some("origin".into());
        let out = mutate_job(
            &job("full-recovery"),
            "pc",
            &with_retention,
            &recovering,
            &defaults(),
        )
        .unwrap()
        .unwrap();
        let restore = &out["spec"]["template"]["spec"]["initContainers"][0];
        assert_eq!(env(restore, "KLIO_CLUSTER").unwrap()["value"], "pg");
        assert_eq!(
            env(restore, "KLIO_RECOVERY_SOURCE_CLUSTER").unwrap()["value"],
            "origin"
        );
        assert_eq!(
            env(restore, "KLIO_RETENTION").unwrap()["value"],
            r#"{"keepDaily":7}"#
        );
        assert!(env(restore, "KLIO_TIER2_RETENTION").is_none());
        assert!(
            mutate_job(
                &job("initdb"),
                "pc",
                &base_spec(),
                &archives("pg"),
                &defaults()
            )
            .unwrap()
            .is_none()
        );
        let mut edb = job("snapshot-recovery");
        edb["spec"]["template"]["metadata"]["labels"] =
            json!({"k8s.enterprisedb.io/jobRole": "snapshot-recovery"});
        assert!(
            mutate_job(&edb, "pc", &base_spec(), &archives("pg"), &defaults())
                .unwrap()
                .is_some()
        );
        let mut broken = job("full-recovery");
        broken["spec"]["template"]["spec"]["containers"][0]["name"] = json!("other");
        assert!(matches!(
            mutate_job(&broken, "pc", &base_spec(), &archives("pg"), &defaults()),
            Err(HookError::NoMainContainer { .. })
        ));
    }

    #[test]
    fn mutate_pod_without_spec_is_refused() {
        assert_eq!(
            mutate_pod(
                &json!({"kind": "Pod"}),
                "pc",
                &base_spec(),
                &archives("pg"),
                &defaults()
            ),
            Err(HookError::Malformed("Pod"))
        );
    }
}
