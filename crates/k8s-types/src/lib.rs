//! Klio's Kubernetes custom resources and their CustomResourceDefinitions.
//!
//! Both resources are in the group [`GROUP`] (`klio.enterprisedb.io`), version [`VERSION`]
//! (`v1alpha1`), namespaced, with a status subresource:
//!
//! - [`Server`] (`servers.klio.enterprisedb.io`), spec [`ServerSpec`]: a Klio server, its
//!   image, TLS and CA secrets, [`Mode`], Tier 1 storage ([`ServerTier1`]), the work queue
//!   ([`QueueSpec`]), Tier 2 object storage ([`ServerTier2`], [`S3Spec`]) and an optional pod
//!   template.
//! - [`PluginConfiguration`] (`pluginconfigurations.klio.enterprisedb.io`), spec
//!   [`PluginConfigurationSpec`]: how the CNPG-I plugin of a PostgreSQL cluster reaches its
//!   server, its [`Mode`], the per-tier [`Retention`] and the sidecar containers' bases.
//!
//! The schemas are derived (`CustomResource`, `JsonSchema`). The rules of the user
//! documentation that the API server can check itself are CEL `x-kubernetes-validations`
//! declared next to the fields they guard (see [`server`] and [`plugin_configuration`]); every
//! message names the field. The generated YAML in `deploy/charts/klio/crds/` is an artifact:
//! [`crd_yaml`] renders it, `cargo run -p klio-k8s-types --example crd-yaml` rewrites it, and a
//! unit test fails when the checked-in files differ.

pub mod crd_yaml;
mod mode;
pub mod plugin_configuration;
mod references;
mod schema;
pub mod server;
mod status;
#[cfg(test)]
mod test_crd;

pub use mode::Mode;
pub use plugin_configuration::{
    PluginConfiguration, PluginConfigurationSpec, PluginConfigurationStatus, PluginTier1,
    PluginTier2, Retention,
};
pub use references::{LocalObjectReference, SecretKeySelector};
pub use server::{
    PvcTemplate, QueueSpec, S3Spec, Server, ServerSpec, ServerStatus, ServerTier1, ServerTier2,
};
pub use status::ResourceStatus;

/// The API group of Klio's resources.
pub const GROUP: &str = "klio.enterprisedb.io";
/// The API version of Klio's resources.
pub const VERSION: &str = "v1alpha1";
/// The condition type that says a resource is ready (the `Ready` printer column).
pub const CONDITION_READY: &str = "Ready";
