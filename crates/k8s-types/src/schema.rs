//! Schema fragments that derive cannot express, used through `#[schemars(schema_with = ...)]`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{Schema, SchemaGenerator, json_schema};

/// An object whose fields the API server keeps without checking them. Used for embedded
/// Kubernetes types (a pod template) whose full schema would make the CRD large and pin it to
/// one Kubernetes version's fields; the API server validates the objects built from it.
pub(crate) fn preserve_unknown_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// A retention count: a non-negative 32-bit integer (`0` disables the rule).
pub(crate) fn count(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "integer",
        "format": "int32",
        "minimum": 0
    })
}

/// `status.conditions`: standard `metav1.Condition`s, one per `type`.
pub(crate) fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let condition = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "items": condition,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"]
    })
}
