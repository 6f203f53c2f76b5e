//! `klio cnpg-plugin`: the operator-side half of Klio's CloudNativePG plugin (see the
//! `klio-cnpg-plugin` crate), run by the chart's plugin Deployment.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use klio_cnpg_plugin::{KubeConfigurations, Plugin, SidecarDefaults, TlsFiles};
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct CnpgPluginArgs {
    /// Address CloudNativePG's operator dials (through the plugin Service)
    #[arg(long, env = "KLIO_PLUGIN_LISTEN", default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    /// The plugin's server certificate (PEM; SANs include the Service name)
    #[arg(long, env = "KLIO_PLUGIN_SERVER_CERT")]
    server_cert: PathBuf,
    /// The plugin's server key (PEM)
    #[arg(long, env = "KLIO_PLUGIN_SERVER_KEY")]
    server_key: PathBuf,
    /// Certificate(s) trusted for the operator's client certificate: the client Secret's
    /// tls.crt (and its ca.crt when CA-issued); repeatable, missing files skipped
    #[arg(
        long = "client-cert",
        env = "KLIO_PLUGIN_CLIENT_CERTS",
        value_delimiter = ',',
        required = true
    )]
    client_certs: Vec<PathBuf>,
    /// Image of the injected sidecars when the PluginConfiguration's containers do not set one
    #[arg(long, env = "KLIO_SIDECAR_IMAGE")]
    sidecar_image: String,
    /// Pull policy of the injected sidecars when not set per PluginConfiguration
    #[arg(long, env = "KLIO_SIDECAR_IMAGE_PULL_POLICY")]
    sidecar_image_pull_policy: Option<String>,
    /// Resources (ResourceRequirements JSON) of the sidecars when not set per PluginConfiguration
    #[arg(long, env = "KLIO_SIDECAR_RESOURCES")]
    sidecar_resources: Option<String>,
}

pub async fn run(args: CnpgPluginArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let resources = args
        .sidecar_resources
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let v: serde_json::Value = serde_json::from_str(s)
                .context("--sidecar-resources is not JSON (a ResourceRequirements object)")?;
            anyhow::ensure!(v.is_object(), "--sidecar-resources must be a JSON object such as {{\"requests\":{{\"cpu\":\"100m\"}}}}");
            Ok(v)
        })
        .transpose()?;
    let client = kube::Client::try_default().await.context(
        "connect to the Kubernetes API server (in-cluster service account or KUBECONFIG)",
    )?;
    let plugin = Plugin::new(
        KubeConfigurations(client),
        SidecarDefaults {
            image: args.sidecar_image,
            image_pull_policy: args.sidecar_image_pull_policy,
            resources,
        },
    );
    let tls = TlsFiles {
        cert: args.server_cert,
        key: args.server_key,
        client_anchors: args.client_certs,
    };
    klio_cnpg_plugin::serve(args.listen, tls, plugin, shutdown).await
}
