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
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

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

/// Size and modification time of each certificate file (`None`: unreadable).
type Stamp = Vec<Option<(SystemTime, u64)>>;

/// Rebuilds the TLS configuration when a file's size or modification time changes; keeps
/// the last good one when a rotation is half-written.
struct Reloader {
    files: TlsFiles,
    current: Mutex<Option<(Stamp, Arc<rustls::ServerConfig>)>>,
}

impl Reloader {
    fn stamp(&self) -> Stamp {
        let f = &self.files;
        std::iter::once(&f.cert)
            .chain(std::iter::once(&f.key))
            .chain(f.client_anchors.iter())
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }

    fn build(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("read \"{}\"", p.display()));
        let mut anchors = Vec::new();
        for p in &self.files.client_anchors {
            if p.exists() {
                anchors.extend(read(p)?);
                anchors.push(b'\n');
            }
        }
        Ok(klio_tls::server_config_without_ca_hints(
            &read(&self.files.cert)?,
            &read(&self.files.key)?,
            &anchors,
        )?)
    }

    fn get(&self) -> Option<Arc<rustls::ServerConfig>> {
        let stamp = self.stamp();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, c)) = current.as_ref()
            && *s == stamp
        {
            return Some(c.clone());
        }
        match self.build() {
            Ok(c) => {
                tracing::info!("loaded the plugin's TLS certificates");
                *current = Some((stamp, c.clone()));
                Some(c)
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot load the plugin's TLS certificates; keeping the previous ones");
                current.as_ref().map(|(_, c)| c.clone())
            }
        }
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
    let reloader = Arc::new(Reloader {
        files: tls,
        current: Mutex::new(None),
    });
    // Loaded once here, so a bad file stops the start; later handshakes reuse it until a
    // file changes.
    let stamp = reloader.stamp();
    let first = reloader
        .build()
        .context("load the plugin's TLS certificates")?;
    *reloader.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((stamp, first));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr} for CloudNativePG"))?;
    tracing::info!(%addr, plugin = PLUGIN_NAME, "serving the CNPG-I plugin");
    let provider: klio_tls::ConfigProvider = {
        let r = reloader.clone();
        Arc::new(move || r.get())
    };
    let incoming = klio_tls::tls_incoming_reloading(listener, provider);
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(plugin.clone()))
        .add_service(OperatorLifecycleServer::new(plugin.clone()))
        .add_service(ReconcilerHooksServer::new(plugin))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await
        .context("serve the CNPG-I plugin")
}
