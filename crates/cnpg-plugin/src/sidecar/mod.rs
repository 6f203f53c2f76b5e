//! The sidecars' half of the plugin: the CNPG-I services CloudNativePG's instance manager
//! calls over the unix socket `/plugins/klio.enterprisedb.io` inside the pod (no TLS; the
//! socket is on an emptyDir only the pod's containers mount).
//!
//! - `klio cnpg-sidecar instance` (container `klio-plugin` of every instance pod): `Identity`,
//!   `Backup` (a base backup of the local PostgreSQL, primary or standby) and `WAL` (restore
//!   only: WAL is streamed by `klio-wal`, so archiving is never advertised);
//! - `klio cnpg-sidecar restore` (container `klio-restore` of recovery Jobs): `Identity`,
//!   `RestoreJobHooks` (PGDATA from a backup chosen by the Cluster's recovery target) and
//!   `WAL` for the replay that follows;
//! - both serve `grpc.health.v1.Health`, which `klio cnpg-sidecar healthcheck` (the startup
//!   probe) calls, so the instance manager, which scans `/plugins` once when it starts, finds
//!   the socket serving.
//!
//! Everything comes from the environment the lifecycle hook injects (see
//! [`crate::lifecycle`]); the Cluster itself arrives as JSON with every call and is read
//! leniently ([`crate::cluster`]). The sidecars never call the Kubernetes API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use klio_client::catalog::RetentionFlags;
use klio_client::client::ClientArgs;
use klio_k8s_types::{Mode, Retention};
use klio_proto::cnpgi::backup::v1::backup_server::BackupServer;
use klio_proto::cnpgi::identity::v1::identity_server::IdentityServer;
use klio_proto::cnpgi::wal::v1::restore_job_hooks_server::RestoreJobHooksServer;
use klio_proto::cnpgi::wal::v1::wal_server::WalServer;
use klio_proto::grpc_health::v1 as health;
use tokio_util::sync::CancellationToken;

use crate::PLUGIN_NAME;

mod archive;
mod services;

pub use archive::{ArchiveNames, archive_for};
pub use services::Sidecar;

/// Where CloudNativePG writes the instance manager's log, as its `restore_command` names it.
pub const CNPG_RESTORE_COMMAND: &str =
    "/controller/manager wal-restore --log-destination /controller/log/postgres.json %f %p";
/// Where CloudNativePG mounts the WAL volume's `pg_wal` when `walStorage` is set.
pub const CNPG_PG_WAL_DIR: &str = "/var/lib/postgresql/wal/pg_wal";

#[derive(Subcommand, Debug)]
pub enum SidecarCommand {
    /// Serve an instance pod's socket (container klio-plugin): backups and WAL restore
    Instance(SidecarArgs),
    /// Serve a recovery Job's socket (container klio-restore): PGDATA restore and WAL restore
    Restore(SidecarArgs),
    /// Exit 0 when the sidecar's socket answers its health check (the startup probe)
    Healthcheck(HealthcheckArgs),
}

/// Which sidecar runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Instance,
    Restore,
}

#[derive(Args, Debug, Clone)]
pub struct HealthcheckArgs {
    /// Directory of the CNPG-I sockets
    #[arg(long, env = "KLIO_SOCKET_DIR", default_value = "/plugins")]
    pub socket_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct SidecarArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub metrics: klio_telemetry::MetricsArgs,
    /// standard, or read-only (restores only: backups are refused)
    #[arg(long, env = "KLIO_MODE", default_value = "standard")]
    pub mode: String,
    /// Directory of the CNPG-I sockets (the pod's `plugins` volume)
    #[arg(long, env = "KLIO_SOCKET_DIR", default_value = "/plugins")]
    pub socket_dir: PathBuf,
    /// Connection string of the local PostgreSQL (backups)
    #[arg(
        long,
        env = "KLIO_PG_DSN",
        default_value = "host=/controller/run user=postgres dbname=postgres"
    )]
    pub pg_dsn: String,
    /// The data directory (CloudNativePG's PGDATA; restores write it)
    #[arg(long, env = "PGDATA")]
    pub pgdata: Option<PathBuf>,
    /// Where `pg_wal` lives when the Cluster sets walStorage (restores link it there)
    #[arg(long, env = "KLIO_PG_WAL_DIR", default_value = CNPG_PG_WAL_DIR)]
    pub pg_wal_dir: PathBuf,
    /// Prefetch spool of WAL restores (default: `klio-wal-spool` beside PGDATA)
    #[arg(long, env = "KLIO_WAL_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Segments fetched ahead on a miss during recovery (0: none; pg_rewind never prefetches)
    #[arg(long, env = "KLIO_WAL_PREFETCH", default_value_t = 8)]
    pub prefetch: u32,
    /// The archive a bootstrap recovery reads (the recovery source's cluster name)
    #[arg(long, env = "KLIO_RECOVERY_SOURCE_CLUSTER")]
    pub recovery_source: Option<String>,
    /// The archive a replica cluster's designated primary reads (the replica source's name)
    #[arg(long, env = "KLIO_REPLICA_SOURCE_CLUSTER")]
    pub replica_source: Option<String>,
    /// The PluginConfiguration these settings come from (named in messages)
    #[arg(long, env = "KLIO_PLUGIN_CONFIGURATION", default_value = "")]
    pub plugin_configuration: String,
    /// Tier 1 retention applied after each backup (PluginConfiguration tier1.retention, JSON)
    #[arg(long, env = "KLIO_RETENTION")]
    pub retention: Option<String>,
    /// Tier 2 retention applied after each backup (PluginConfiguration tier2.retention, JSON)
    #[arg(long, env = "KLIO_TIER2_RETENTION")]
    pub tier2_retention: Option<String>,
    /// Seconds a backup waits, after pg_backup_stop, for its WAL to be archived
    #[arg(long, env = "KLIO_WAL_WAIT_TIMEOUT", default_value_t = 300)]
    pub wal_wait_timeout: u64,
    /// This pod's name (CloudNativePG's POD_NAME; reported as the backup's instance)
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,
}

/// A sidecar's settings, checked.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub client: ClientArgs,
    pub mode: Mode,
    pub socket_dir: PathBuf,
    pub pg_dsn: String,
    pub pgdata: Option<PathBuf>,
    pub pg_wal_dir: PathBuf,
    pub spool_dir: PathBuf,
    pub prefetch: u32,
    pub names: ArchiveNames,
    pub plugin_configuration: String,
    pub retention: RetentionFlags,
    pub tier2_retention: RetentionFlags,
    pub wal_wait_timeout: u64,
    pub pod_name: String,
}

fn retention(flag: &str, json: Option<&str>) -> anyhow::Result<RetentionFlags> {
    let Some(json) = json.filter(|s| !s.trim().is_empty()) else {
        return Ok(RetentionFlags::default());
    };
    let r: Retention = serde_json::from_str(json).with_context(|| {
        format!("{flag} is not a retention object such as {{\"keepDaily\":7}}: {json}")
    })?;
    Ok(RetentionFlags {
        keep_latest: r.keep_latest,
        keep_hourly: r.keep_hourly,
        keep_daily: r.keep_daily,
        keep_weekly: r.keep_weekly,
        keep_monthly: r.keep_monthly,
        keep_annual: r.keep_annual,
    })
}

impl SidecarArgs {
    /// The settings, checked; a bad value is named with what to do.
    pub fn config(self) -> anyhow::Result<SidecarConfig> {
        let mode = match self.mode.as_str() {
            "standard" | "" => Mode::Standard,
            "read-only" => Mode::ReadOnly,
            other => anyhow::bail!(
                "KLIO_MODE (--mode) is \"{other}\": use standard or read-only (the PluginConfiguration's spec.mode)"
            ),
        };
        let spool_dir = match (&self.spool_dir, &self.pgdata) {
            (Some(d), _) => d.clone(),
            (None, Some(p)) => p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("/tmp"))
                .join("klio-wal-spool"),
            (None, None) => std::env::temp_dir().join("klio-wal-spool"),
        };
        Ok(SidecarConfig {
            names: ArchiveNames {
                own: self.client.cluster.clone(),
                recovery_source: self.recovery_source.filter(|s| !s.is_empty()),
                replica_source: self.replica_source.filter(|s| !s.is_empty()),
            },
            retention: retention("KLIO_RETENTION", self.retention.as_deref())?,
            tier2_retention: retention("KLIO_TIER2_RETENTION", self.tier2_retention.as_deref())?,
            client: self.client,
            mode,
            socket_dir: self.socket_dir,
            pg_dsn: self.pg_dsn,
            pgdata: self.pgdata,
            pg_wal_dir: self.pg_wal_dir,
            spool_dir,
            prefetch: self.prefetch,
            plugin_configuration: self.plugin_configuration,
            wal_wait_timeout: self.wal_wait_timeout,
            pod_name: self.pod_name,
        })
    }
}

/// The socket of the plugin in `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(PLUGIN_NAME)
}

/// Serves the sidecar of `role` on its socket until `shutdown` fires, then removes the socket.
pub async fn serve(
    role: Role,
    config: SidecarConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    klio_tls::install_crypto_provider();
    let path = socket_path(&config.socket_dir);
    // A socket left by a previous run of the container would refuse the bind.
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove \"{}\"", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("listen on the CNPG-I socket \"{}\"", path.display()))?;
    tracing::info!(path = %path.display(), ?role, cluster = %config.names.own, mode = config.mode.as_str(), "serving the CNPG-I sidecar");
    let sidecar = Sidecar::new(role, config);
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    // CNPG-I calls counted and timed like the server's requests (klio_rpc_*).
    let mut builder = tonic::transport::Server::builder()
        .layer(klio_telemetry::RpcMetricsLayer::new("klio-plugin"));
    let router = builder
        .add_service(IdentityServer::new(sidecar.clone()))
        .add_service(WalServer::new(sidecar.clone()))
        .add_service(health::health_server::HealthServer::new(sidecar.clone()));
    let router = match role {
        Role::Instance => router.add_service(BackupServer::new(sidecar)),
        Role::Restore => router.add_service(RestoreJobHooksServer::new(sidecar)),
    };
    let result = router
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await
        .context("serve the CNPG-I sidecar");
    let _ = std::fs::remove_file(&path);
    result
}

/// A gRPC channel over the unix socket at `path` (the instance manager's view of a sidecar).
pub async fn socket_channel(path: &Path) -> anyhow::Result<tonic::transport::Channel> {
    let path = path.to_path_buf();
    let shown = path.display().to_string();
    // The URI is required by the API and ignored: every connection goes to the socket.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("connect to the CNPG-I socket \"{shown}\""))
}

/// `klio cnpg-sidecar healthcheck`: whether the sidecar in `dir` answers SERVING.
pub async fn healthcheck(args: &HealthcheckArgs) -> anyhow::Result<()> {
    let path = socket_path(&args.socket_dir);
    let channel = socket_channel(&path).await?;
    let mut client = health::health_client::HealthClient::new(channel);
    let status = tokio::time::timeout(
        Duration::from_secs(5),
        client.check(health::HealthCheckRequest::default()),
    )
    .await
    .context("the sidecar did not answer its health check within 5 s")?
    .map_err(|s| anyhow::anyhow!("health check of \"{}\": {}", path.display(), s.message()))?
    .into_inner()
    .status;
    anyhow::ensure!(
        status == health::health_check_response::ServingStatus::Serving as i32,
        "the sidecar on \"{}\" is not serving (status {status})",
        path.display()
    );
    Ok(())
}
