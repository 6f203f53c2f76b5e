//! Klio's CloudNativePG plugin (CNPG-I), operator side: the TCP service CloudNativePG's
//! operator discovers through a Service in its namespace and calls over mutual TLS 1.3.
//!
//! - [`cluster`]: what is read from a Cluster JSON (leniently);
//! - [`lifecycle`]: sidecar injection into instance Pods and recovery Jobs, pure functions on
//!   JSON, and the JSON Patch returned;
//! - [`service`]: `Identity`, `OperatorLifecycle` and `ReconcilerHooks`;
//! - [`sidecar`]: the sidecars' half (`klio cnpg-sidecar`), served on the pod's unix socket;
//! - [`serve`]: the mTLS listener; certificates are re-read when their files change, so a
//!   rotation needs no restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use klio_proto::cnpgi::identity::v1::identity_server::IdentityServer;
use klio_proto::cnpgi::operator_lifecycle::v1::operator_lifecycle_server::OperatorLifecycleServer;
use klio_proto::cnpgi::reconciler::v1::reconciler_hooks_server::ReconcilerHooksServer;
use tokio_util::sync::CancellationToken;

pub mod cluster;
pub mod lifecycle;
pub mod service;
pub mod sidecar;

pub use lifecycle::SidecarDefaults;
pub use service::{Configurations, KubeConfigurations, Plugin};

/// The plugin's name: the Service label `cnpg.io/pluginName`, `GetPluginMetadata.name`, the
/// socket file of the sidecars and `Cluster.spec.plugins[].name`.
pub const PLUGIN_NAME: &str = "klio.enterprisedb.io";
/// The plugin parameter naming the PluginConfiguration.
pub const PARAMETER_CONFIGURATION_REF: &str = "pluginConfigurationRef";

/// The certificate files of the listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server certificate (its SANs must include the Service name) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificates trusted as issuers of the operator's client certificate: the client
    /// Secret's `tls.crt` (a self-signed certificate is its own issuer) and, for a CA-issued
    /// one, the CA. Missing files are skipped.
    pub client_anchors: Vec<PathBuf>,
}

impl TlsFiles {
    /// The server configuration from the files (the client anchors that exist).
    fn build(&self) -> Result<Arc<rustls::ServerConfig>, klio_tls::Error> {
        let read = |p: &PathBuf| std::fs::read(p);
        let io = |p: &PathBuf, e: std::io::Error| klio_tls::Error::ReadFile {
            what: "plugin TLS",
            path: p.clone(),
            source: e,
        };
        let mut anchors = Vec::new();
        for p in &self.client_anchors {
            if p.exists() {
                anchors.extend(read(p).map_err(|e| io(p, e))?);
                anchors.push(b'\n');
            }
        }
        klio_tls::server_config_without_ca_hints(
            &read(&self.cert).map_err(|e| io(&self.cert, e))?,
            &read(&self.key).map_err(|e| io(&self.key, e))?,
            &anchors,
        )
    }
}

/// Serves the plugin on `addr` until `shutdown` fires. The certificates must load at start.
pub async fn serve<C: Configurations>(
    addr: SocketAddr,
    tls: TlsFiles,
    plugin: Plugin<C>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    klio_tls::install_crypto_provider();
    // Loaded once here, so a bad file stops the start; later handshakes reuse it until a
    // file changes.
    let files: Vec<PathBuf> = [tls.cert.clone(), tls.key.clone()]
        .into_iter()
        .chain(tls.client_anchors.iter().cloned())
        .collect();
    let reloader =
        klio_tls::FileReloader::new("the plugin's TLS certificates", files, move || tls.build())
            .context("load the plugin's TLS certificates")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr} for CloudNativePG"))?;
    tracing::info!(%addr, plugin = PLUGIN_NAME, "serving the CNPG-I plugin");
    let provider = reloader.provider();
    let incoming = klio_tls::tls_incoming_reloading(listener, provider);
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(plugin.clone()))
        .add_service(OperatorLifecycleServer::new(plugin.clone()))
        .add_service(ReconcilerHooksServer::new(plugin))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await
        .context("serve the CNPG-I plugin")
}
