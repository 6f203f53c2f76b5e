//! The Klio operator (`klio operator`): reconciles each `Server` resource into a StatefulSet
//! `<name>-klio`, a Service `<name>` and PersistentVolumeClaims, and reports its status.
//!
//! - [`render`]: the desired objects, pure functions of the spec (and the layout of the pod);
//! - [`secrets`]: the Secrets a `Server` needs, checked and hashed (rolling restart on change);
//! - [`status`]: the `Ready`, `Progressing` and `Degraded` conditions;
//! - [`controller`]: the reconcile loop (kube-runtime), server-side apply, events;
//! - [`leader`]: leader election through a Lease, so several replicas are safe;
//! - [`health`]: the HTTP probes of the operator pod.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

pub mod controller;
pub mod health;
pub mod leader;
pub mod render;
pub mod secrets;
pub mod status;

/// How `klio operator` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Watch only this namespace (all when `None`).
    pub namespace: Option<String>,
    /// Leader election (`None`: this process reconciles without one; for a single replica).
    pub lease: Option<leader::LeaseSettings>,
    /// The address of `/healthz` and `/readyz` (`None`: not served).
    pub health_listen: Option<SocketAddr>,
    /// This replica's identity in events and the Lease.
    pub identity: String,
}

/// Connects to the API server (in-cluster service account, else `KUBECONFIG` or
/// `~/.kube/config`) and reconciles until `shutdown` fires. Losing the leader lease is an
/// error: the process exits and the Deployment restarts it as a candidate.
pub async fn run(options: Options, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let client = kube::Client::try_default().await.context(
        "connect to the Kubernetes API server (in-cluster service account or KUBECONFIG)",
    )?;
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = options.health_listen {
        // Bound before anything else, so a port in use is reported at once.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr} for health probes"))?;
        tasks.spawn(health::serve(listener, shutdown.clone()));
    }
    let lost = CancellationToken::new();
    if let Some(settings) = options.lease.clone() {
        let mut elector = leader::Elector::new(client.clone(), settings);
        tracing::info!("waiting for the leader lease");
        if !elector.acquire(&shutdown).await {
            return Ok(());
        }
        tasks.spawn(elector.hold(shutdown.clone(), lost.clone()));
    }
    let stop = CancellationToken::new();
    {
        let (stop, shutdown, lost) = (stop.clone(), shutdown.clone(), lost.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = lost.cancelled() => {}
            }
            stop.cancel();
        });
    }
    tracing::info!(
        namespace = options.namespace.as_deref().unwrap_or("(all)"),
        "reconciling Servers"
    );
    controller::run(
        client,
        options.namespace.as_deref(),
        &options.identity,
        stop,
    )
    .await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    if lost.is_cancelled() {
        anyhow::bail!(
            "lost the leader lease; exiting so that this replica starts again as a candidate"
        );
    }
    Ok(())
}
