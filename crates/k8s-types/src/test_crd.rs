//! Accessors the unit tests of both resources use on their generated CRDs and seed manifests.

#![allow(clippy::unwrap_used)] // test fixtures: a failure is a panic with the reason

use kube::CustomResourceExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The CRD of `K` as JSON.
pub(crate) fn crd<K: CustomResourceExt>() -> Value {
    serde_json::to_value(K::crd()).unwrap()
}

/// The schema of `spec` in the CRD of `K`.
pub(crate) fn spec_schema<K: CustomResourceExt>() -> Value {
    crd::<K>()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

/// The names of the printer columns of the CRD's first version.
pub(crate) fn printer_columns(crd: &Value) -> Vec<String> {
    crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

/// The `(rule, message)` pairs of a schema's CEL validations.
pub(crate) fn rules(schema: &Value) -> Vec<(String, String)> {
    schema["x-kubernetes-validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["rule"].as_str().unwrap().to_string(),
                r["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A seed manifest of `tests/data`, deserialized.
pub(crate) fn seed<T: DeserializeOwned>(file: &str) -> T {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(file);
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}
