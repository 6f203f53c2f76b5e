//! The `Server` resource (`servers.klio.enterprisedb.io`): a Klio server and its storage.
//!
//! Rules checked by the API server (CEL, on `spec` unless said otherwise):
//!
//! | rule | message |
//! |---|---|
//! | `mode: read-only` needs `tier2` | `spec.tier2 is required when spec.mode is read-only` |
//! | `mode: read-only` has no `tier1` | `spec.tier1 is not allowed when spec.mode is read-only` |
//! | `mode: read-only` has no `queue` | `spec.queue is not allowed when spec.mode is read-only` |
//! | `mode: standard` needs `tier1` | `spec.tier1 is required when spec.mode is standard` |
//! | `mode: standard` needs `queue` | `spec.queue is required when spec.mode is standard` |
//! | `spec.mode` never changes (transition rule) | `spec.mode is immutable` |

use k8s_openapi::api::core::v1::{PersistentVolumeClaimSpec, PodTemplateSpec};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{LocalObjectReference, Mode, SecretKeySelector};

/// The desired state of a Klio server: a StatefulSet running `klio server` with its volumes.
// clippy's duplicated_attributes mistakes the repeated `type_ = "string"` of separate
// `printcolumn(...)` lists for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "klio.enterprisedb.io",
    version = "v1alpha1",
    kind = "Server",
    namespaced,
    status = "ServerStatus",
    category = "klio",
    doc = "A Klio server: receives base backups and WAL from PostgreSQL clusters and keeps them in Tier 1 (local volumes) and Tier 2 (object storage)",
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".spec.mode",
        description = "standard or read-only"
    ),
    printcolumn(
        name = "Image",
        type_ = "string",
        json_path = ".spec.image",
        priority = 1
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
        "rule": "self.mode != 'read-only' || has(self.tier2)",
        "message": "spec.tier2 is required when spec.mode is read-only",
        "fieldPath": ".tier2",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "self.mode != 'read-only' || !has(self.tier1)",
        "message": "spec.tier1 is not allowed when spec.mode is read-only",
        "fieldPath": ".tier1",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "self.mode != 'read-only' || !has(self.queue)",
        "message": "spec.queue is not allowed when spec.mode is read-only",
        "fieldPath": ".queue",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "self.mode != 'standard' || has(self.tier1)",
        "message": "spec.tier1 is required when spec.mode is standard",
        "fieldPath": ".tier1",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "self.mode != 'standard' || has(self.queue)",
        "message": "spec.queue is required when spec.mode is standard",
        "fieldPath": ".queue",
        "reason": "FieldValueRequired"
    }
]))]
pub struct ServerSpec {
    /// The container image of the Klio server.
    #[schemars(length(min = 1))]
    pub image: String,
    /// When the kubelet pulls the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub image_pull_policy: Option<String>,
    /// Secrets used to pull the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// The Secret (`kubernetes.io/tls`) with the server's certificate and key.
    #[schemars(length(min = 1))]
    pub tls_secret_name: String,
    /// The Secret with the CA that signs client certificates (mTLS).
    #[schemars(length(min = 1))]
    pub ca_secret_name: String,
    /// `standard` (Tier 1, the work queue and optionally Tier 2) or `read-only` (Tier 2 only,
    /// no writes). Cannot be changed after creation.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [
        { "rule": "self == oldSelf", "message": "spec.mode is immutable" }
    ]))]
    pub mode: Mode,
    /// Tier 1: local volumes for backups and WAL. Required in standard mode, not allowed in
    /// read-only mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier1: Option<ServerTier1>,
    /// The work queue's volume. Required in standard mode, not allowed in read-only mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueSpec>,
    /// Tier 2: object storage. Required in read-only mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier2: Option<ServerTier2>,
    /// A pod template merged into the server's pods (labels, annotations, scheduling,
    /// resources). Its fields are kept as given; the API server checks the resulting pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::preserve_unknown_object")]
    pub template: Option<PodTemplateSpec>,
}

/// A PersistentVolumeClaim to create (`{pvcTemplate: <PersistentVolumeClaimSpec>}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcTemplate {
    /// The claim's spec: storage class, access modes, requested size.
    pub pvc_template: PersistentVolumeClaimSpec,
}

/// `spec.tier1`: local storage, the landing zone of backups and WAL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerTier1 {
    /// The repository cache volume.
    pub cache: PvcTemplate,
    /// The data volume: base backups and the WAL archive.
    pub data: PvcTemplate,
    /// The key that encrypts Tier 1 data at rest.
    pub encryption_key: SecretKeySelector,
}

/// `spec.queue`: the work queue's volume (retention and Tier 2 replication).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// The queue's claim.
    pub pvc_template: PersistentVolumeClaimSpec,
}

/// `spec.tier2`: object storage for long-term retention and disaster recovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerTier2 {
    /// The repository cache volume for Tier 2.
    pub cache: PvcTemplate,
    /// The key that encrypts Tier 2 data; may differ from Tier 1's.
    pub encryption_key: SecretKeySelector,
    /// The S3 (or S3-compatible) bucket.
    pub s3: S3Spec,
}

/// `spec.tier2.s3`: an S3 or S3-compatible bucket. Without `accessKeyId` and
/// `secretAccessKey` the server uses the ambient credentials (IAM role, IRSA, Pod Identity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.accessKeyId) == has(self.secretAccessKey)",
        "message": "spec.tier2.s3.accessKeyId and spec.tier2.s3.secretAccessKey must be set together"
    }
]))]
pub struct S3Spec {
    /// The bucket.
    #[schemars(length(min = 1))]
    pub bucket_name: String,
    /// The key prefix of everything the server writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The endpoint URL of an S3-compatible service; AWS's when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The access key id, from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<SecretKeySelector>,
    /// The secret access key, from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<SecretKeySelector>,
    /// A PEM CA bundle to trust for the endpoint, from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_ca_bundle: Option<SecretKeySelector>,
}

/// The observed state of a `Server`, written by the operator through the status subresource.
pub type ServerStatus = crate::status::ResourceStatus;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;
    use crate::test_crd::{crd, printer_columns, rules, seed};

    fn spec_schema() -> serde_json::Value {
        crate::test_crd::spec_schema::<Server>()
    }

    #[test]
    fn crd_names_scope_version_and_status_subresource() {
        let crd = crd::<Server>();
        assert_eq!(crd["metadata"]["name"], "servers.klio.enterprisedb.io");
        assert_eq!(crd["spec"]["group"], crate::GROUP);
        assert_eq!(crd["spec"]["names"]["kind"], "Server");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], crate::VERSION);
        assert_eq!(version["subresources"]["status"], json!({}));
        assert_eq!(printer_columns(&crd), ["Mode", "Image", "Ready", "Age"]);
    }

    #[test]
    fn spec_rules_guard_tiers_and_queue_by_mode() {
        let spec = spec_schema();
        let rules = rules(&spec);
        let messages: Vec<&str> = rules.iter().map(|(_, m)| m.as_str()).collect();
        assert_eq!(
            messages,
            [
                "spec.tier2 is required when spec.mode is read-only",
                "spec.tier1 is not allowed when spec.mode is read-only",
                "spec.queue is not allowed when spec.mode is read-only",
                "spec.tier1 is required when spec.mode is standard",
                "spec.queue is required when spec.mode is standard",
            ]
        );
        // Each rule points at the field its message names.
        for rule in spec["x-kubernetes-validations"].as_array().unwrap() {
            let field = rule["fieldPath"].as_str().unwrap();
            assert!(
                rule["message"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("spec{field} ")),
                "{rule}"
            );
        }
    }

    #[test]
    fn mode_defaults_to_standard_and_is_immutable() {
        let mode = &spec_schema()["properties"]["mode"];
        assert_eq!(mode["default"], "standard");
        assert_eq!(mode["enum"], json!(["standard", "read-only"]));
        assert_eq!(
            rules(mode),
            [(
                "self == oldSelf".to_string(),
                "spec.mode is immutable".to_string()
            )]
        );
    }

    #[test]
    fn template_is_kept_as_given_and_pvc_templates_are_checked() {
        let spec = spec_schema();
        assert_eq!(
            spec["properties"]["template"]["x-kubernetes-preserve-unknown-fields"],
            true
        );
        let data = &spec["properties"]["tier1"]["properties"]["data"]["properties"]["pvcTemplate"];
        assert!(data["properties"]["accessModes"].is_object(), "{data}");
        assert_eq!(
            spec["properties"]["tier2"]["properties"]["s3"]["required"],
            json!(["bucketName"])
        );
        assert_eq!(
            spec["required"],
            json!(["caSecretName", "image", "tlsSecretName"])
        );
    }

    #[test]
    fn seed_manifests_deserialize_into_the_types() {
        let server: Server = seed("server.yaml");
        assert_eq!(server.spec.mode, Mode::Standard);
        let tier1 = server.spec.tier1.unwrap();
        assert_eq!(tier1.encryption_key.key, "encryptionKey");
        let s3 = server.spec.tier2.unwrap().s3;
        assert_eq!(s3.custom_ca_bundle.unwrap().name, "rustfs-tls");
        let dr: Server = seed("server-read-only.yaml");
        assert_eq!(dr.spec.mode, Mode::ReadOnly);
        assert!(dr.spec.tier1.is_none() && dr.spec.queue.is_none());
    }
}
