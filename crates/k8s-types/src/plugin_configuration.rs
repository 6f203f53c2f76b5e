//! The `PluginConfiguration` resource (`pluginconfigurations.klio.enterprisedb.io`): how the
//! CNPG-I plugin of a PostgreSQL cluster reaches its Klio server, and what it keeps.
//!
//! Rules checked by the API server (CEL, on `spec` unless said otherwise):
//!
//! | rule | message |
//! |---|---|
//! | `mode: read-only` needs `tier2.enableRecovery: true` | `spec.tier2.enableRecovery must be true when spec.mode is read-only` |
//! | `mode: read-only` has no `tier1` | `spec.tier1 is not allowed when spec.mode is read-only` |
//! | `mode: read-only` has no `tier2.enableBackup: true` | `spec.tier2.enableBackup must be false or omitted when spec.mode is read-only` |
//! | `containers[].name` is a Klio sidecar (on each item) | `spec.containers[].name must be one of klio-plugin, klio-wal, klio-restore` |
//!
//! `containers` is a map list keyed by `name`, so a name appears at most once.

use k8s_openapi::api::core::v1::Container;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::Mode;

/// The names of the sidecar containers a `PluginConfiguration` may customize.
pub const SIDECAR_CONTAINER_NAMES: [&str; 3] = ["klio-plugin", "klio-wal", "klio-restore"];

/// The plugin's configuration, referenced by a CloudNativePG `Cluster` through the plugin
/// parameter `pluginConfigurationRef`.
// clippy's duplicated_attributes mistakes the repeated `type_ = "string"` of separate
// `printcolumn(...)` lists for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "klio.enterprisedb.io",
    version = "v1alpha1",
    kind = "PluginConfiguration",
    namespaced,
    status = "PluginConfigurationStatus",
    category = "klio",
    doc = "How the Klio plugin of a CloudNativePG cluster connects to a Klio server, its mode, retention and sidecar containers",
    printcolumn(
        name = "ServerAddress",
        type_ = "string",
        json_path = ".spec.serverAddress"
    ),
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".spec.mode",
        description = "standard or read-only"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.mode != 'read-only' || (has(self.tier2) && self.tier2.enableRecovery)",
        "message": "spec.tier2.enableRecovery must be true when spec.mode is read-only",
        "fieldPath": ".tier2.enableRecovery",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "self.mode != 'read-only' || !has(self.tier1)",
        "message": "spec.tier1 is not allowed when spec.mode is read-only",
        "fieldPath": ".tier1",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "self.mode != 'read-only' || !has(self.tier2) || !self.tier2.enableBackup",
        "message": "spec.tier2.enableBackup must be false or omitted when spec.mode is read-only",
        "fieldPath": ".tier2.enableBackup",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct PluginConfigurationSpec {
    /// Where the Klio server is reached: a Service name (`klio-server.default`), a fully
    /// qualified name or an external address. The default ports are used.
    #[schemars(length(min = 1))]
    pub server_address: String,
    /// The Secret (`kubernetes.io/tls`) with the client certificate presented to the server.
    #[schemars(length(min = 1))]
    pub client_secret_name: String,
    /// The Secret with the server's TLS certificate (the one the `Server` uses).
    #[schemars(length(min = 1))]
    pub server_secret_name: String,
    /// `standard` (backups, WAL streaming and restores) or `read-only` (restores from Tier 2).
    #[serde(default)]
    pub mode: Mode,
    /// The cluster name used for backups; the CloudNativePG `Cluster`'s name when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// Tier 1 settings. Not allowed in read-only mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier1: Option<PluginTier1>,
    /// Tier 2 settings. Required, with `enableRecovery: true`, in read-only mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier2: Option<PluginTier2>,
    /// Whether the sidecars expose a pprof endpoint (troubleshooting only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pprof: Option<bool>,
    /// Bases for the sidecar containers (`klio-plugin`, `klio-wal`, `klio-restore`): Klio
    /// keeps what is set here except `name`, `args` and the `CONTAINER_NAME` variable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "sidecar_containers")]
    pub containers: Vec<Container>,
}

/// `spec.containers`: at most one base per sidecar name. Each item is a Container whose fields
/// other than `name` are kept as given (the API server checks the pods they end up in).
fn sidecar_containers(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": 3,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
        "items": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {
                    "type": "string",
                    "description": "The sidecar: klio-plugin, klio-wal or klio-restore.",
                    "maxLength": 63
                }
            },
            "x-kubernetes-preserve-unknown-fields": true,
            "x-kubernetes-validations": [
                {
                    "rule": "self.name in ['klio-plugin', 'klio-wal', 'klio-restore']",
                    "message": "spec.containers[].name must be one of klio-plugin, klio-wal, klio-restore",
                    "fieldPath": ".name",
                    "reason": "FieldValueInvalid"
                }
            ]
        }
    })
}

/// `spec.tier1`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginTier1 {
    /// Retention of Tier 1 backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
}

/// `spec.tier2`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginTier2 {
    /// Copy backups and WAL to Tier 2 after they land in Tier 1.
    #[serde(default)]
    pub enable_backup: bool,
    /// Look for backups and WAL in Tier 2 too when restoring (Tier 1 first).
    #[serde(default)]
    pub enable_recovery: bool,
    /// Retention of Tier 2 backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
}

/// A retention policy: how many backups each rule keeps. An omitted count takes Klio's
/// default; `0` disables the rule. The same fields as `klio_retention::PolicyOverrides`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// The newest N backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::count")]
    pub keep_latest: Option<u32>,
    /// The newest backup of each of the last N hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::count")]
    pub keep_hourly: Option<u32>,
    /// The newest backup of each of the last N days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::count")]
    pub keep_daily: Option<u32>,
    /// The newest backup of each of the last N weeks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::count")]
    pub keep_weekly: Option<u32>,
    /// The newest backup of each of the last N months.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::count")]
    pub keep_monthly: Option<u32>,
    /// The newest backup of each of the last N years.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::count")]
    pub keep_annual: Option<u32>,
}

/// The observed state of a `PluginConfiguration`, written through the status subresource.
pub type PluginConfigurationStatus = crate::status::ResourceStatus;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;
    use crate::test_crd::{crd, printer_columns, seed};

    fn spec_schema() -> serde_json::Value {
        crate::test_crd::spec_schema::<PluginConfiguration>()
    }

    #[test]
    fn crd_names_scope_version_status_and_columns() {
        let crd = crd::<PluginConfiguration>();
        assert_eq!(
            crd["metadata"]["name"],
            "pluginconfigurations.klio.enterprisedb.io"
        );
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], crate::VERSION);
        assert_eq!(version["subresources"]["status"], json!({}));
        assert_eq!(
            printer_columns(&crd),
            ["ServerAddress", "Mode", "Ready", "Age"]
        );
        let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"];
        assert!(status["properties"]["observedGeneration"].is_object());
        assert_eq!(
            status["properties"]["conditions"]["x-kubernetes-list-map-keys"],
            json!(["type"])
        );
    }

    #[test]
    fn read_only_rules_name_their_fields() {
        let spec = spec_schema();
        let rules = spec["x-kubernetes-validations"].as_array().unwrap();
        let paths: Vec<&str> = rules
            .iter()
            .map(|r| r["fieldPath"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            [".tier2.enableRecovery", ".tier1", ".tier2.enableBackup"]
        );
        for rule in rules {
            let field = rule["fieldPath"].as_str().unwrap();
            let message = rule["message"].as_str().unwrap();
            assert!(message.starts_with(&format!("spec{field} ")), "{rule}");
            assert!(message.ends_with("when spec.mode is read-only"), "{rule}");
        }
        assert!(spec["properties"]["mode"]["x-kubernetes-validations"].is_null());
    }

    #[test]
    fn containers_are_a_map_list_of_klio_sidecars() {
        let containers = &spec_schema()["properties"]["containers"];
        assert_eq!(containers["x-kubernetes-list-type"], "map");
        assert_eq!(containers["x-kubernetes-list-map-keys"], json!(["name"]));
        let rule = &containers["items"]["x-kubernetes-validations"][0];
        for name in SIDECAR_CONTAINER_NAMES {
            assert!(rule["rule"].as_str().unwrap().contains(name), "{rule}");
            assert!(rule["message"].as_str().unwrap().contains(name), "{rule}");
        }
        assert!(
            rule["message"]
                .as_str()
                .unwrap()
                .starts_with("spec.containers[].name ")
        );
        assert_eq!(
            containers["items"]["x-kubernetes-preserve-unknown-fields"],
            true
        );
    }

    #[test]
    fn retention_counts_are_non_negative_int32() {
        let retention =
            &spec_schema()["properties"]["tier2"]["properties"]["retention"]["properties"];
        for key in [
            "keepLatest",
            "keepHourly",
            "keepDaily",
            "keepWeekly",
            "keepMonthly",
            "keepAnnual",
        ] {
            assert_eq!(retention[key]["format"], "int32", "{key}");
            assert_eq!(retention[key]["minimum"].as_f64(), Some(0.0), "{key}");
        }
    }

    #[test]
    fn seed_manifests_deserialize_into_the_types() {
        let basic: PluginConfiguration = seed("pluginconfiguration-basic.yaml");
        assert_eq!(basic.spec.server_address, "klio-server.default");
        assert_eq!(basic.spec.mode, Mode::Standard);
        let retention: PluginConfiguration = seed("pluginconfiguration-retention.yaml");
        let tier2 = retention.spec.tier2.unwrap();
        assert!(tier2.enable_backup && tier2.enable_recovery);
        assert_eq!(tier2.retention.unwrap().keep_daily, Some(30));
        assert_eq!(
            retention.spec.tier1.unwrap().retention.unwrap().keep_hourly,
            Some(12)
        );
        let dr: PluginConfiguration = seed("pluginconfiguration-read-only.yaml");
        assert_eq!(dr.spec.mode, Mode::ReadOnly);
        assert!(!dr.spec.tier2.unwrap().enable_backup);
        let containers: PluginConfiguration = seed("pluginconfiguration-containers.yaml");
        let names: Vec<&str> = containers
            .spec
            .containers
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["klio-plugin", "klio-wal"]);
    }
}
