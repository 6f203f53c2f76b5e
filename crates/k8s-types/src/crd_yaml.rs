//! The CRD YAML checked in under `deploy/charts/klio/crds/`, rendered from the types.
//!
//! Regenerate with `cargo run -p klio-k8s-types --example crd-yaml`; the test
//! `checked_in_yaml_matches_types` fails when a file differs from what the types generate.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{PluginConfiguration, Server};

/// The directory of the CRD files, relative to the repository root.
pub const CRD_DIR: &str = "deploy/charts/klio/crds";

/// The command that rewrites the files.
pub const REGENERATE: &str = "cargo run -p klio-k8s-types --example crd-yaml";

/// Every CRD with its file name in [`CRD_DIR`].
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("servers.yaml", Server::crd()),
        ("pluginconfigurations.yaml", PluginConfiguration::crd()),
    ]
}

/// One CRD as the YAML document written to its file, with a header naming the generator.
pub fn render(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(crd)?;
    Ok(format!(
        "# Generated from crates/k8s-types; do not edit.\n# Regenerate with: {REGENERATE}\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::PathBuf;

    use super::*;

    fn repo_root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn checked_in_yaml_matches_types() {
        for (file, crd) in crds() {
            let path = repo_root().join(CRD_DIR).join(file);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            let generated = render(&crd).unwrap();
            assert!(
                on_disk == generated,
                "{CRD_DIR}/{file} differs from what crates/k8s-types generates\nHINT: regenerate it with \"{REGENERATE}\" and commit the result"
            );
        }
    }
}
