//! References from Klio's resources to other objects in their namespace.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One key of a Secret in the resource's namespace (`{name, key}`), e.g. an encryption key or
/// an S3 credential. Both fields are required.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// The Secret's name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The key in the Secret's `data`.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// An object in the resource's namespace, by name (e.g. an image pull Secret).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    /// The object's name.
    #[schemars(length(min = 1))]
    pub name: String,
}
