//! The Klio server: the WAL service on `--wal-listen` and the base-backup service on
//! `--base-listen`, over gRPC with mutual TLS; Tier 2 relays, retention and garbage
//! collection through a durable work queue.
//!
//! Principal items: [`ServerConfig`] (validated settings), [`run`] (starts the services and
//! serves until the cancellation token fires), [`WalService`], [`BackupService`],
//! [`Context`] (what the services share), [`tier2`] (the S3 tier).

mod backup_service;
mod context;
pub mod metrics;
mod relay;
mod settings;
mod status;
pub mod tier2;
mod wal_service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use klio_crypto::{KeyEnvelope, Passphrase};
use klio_proto::backup::v1::backup_server::BackupServer;
use klio_proto::wal::v1::wal_server::WalServer;
use klio_queue::{EmbeddedQueue, NatsQueue, RetryPolicy, WorkQueue};
use klio_repository::{LocalStore, Repository, RepositoryOptions};
use klio_wal_store::WalStore;
use tokio_util::sync::CancellationToken;

pub use backup_service::{
    BLOCKLIST_LEN, BackupService, BackupSettings, MAX_BACKUP_MESSAGE, MAX_PIECE_IDS,
    SESSION_IDLE_TIMEOUT,
};
pub use context::{Context, read_only_status};
pub use status::store_status;
pub use tier2::Tier2Config;
pub use wal_service::{ASYNC_FLUSH_INTERVAL, MAX_MESSAGE, WalLimits, WalService};

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Tier 1 on the local volume, Tier 2 (when configured) filled through the work queue.
    Standard,
    /// Tier 2 only: serves the catalog, restores and `wal-get`; refuses every write.
    ReadOnly,
}

/// Validated server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub mode: Mode,
    /// Tier 1 data directory (standard mode).
    pub data_dir: Option<PathBuf>,
    /// The Tier 1 passphrase file (standard mode; Tier 2's too unless it has its own).
    pub encryption_key_file: Option<PathBuf>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: PathBuf,
    /// Revoked client certificates (PEM CRLs of the client CA), checked at every handshake.
    pub client_crl: Option<PathBuf>,
    pub wal_listen: SocketAddr,
    pub base_listen: SocketAddr,
    /// zstd level for sealed WAL segments.
    pub wal_compression_level: i32,
    pub tier2: Option<Tier2Config>,
    /// NATS JetStream URL; the embedded queue in `<data-dir>/queue` when absent.
    pub queue_nats: Option<klio_queue::NatsOptions>,
    /// Tasks run at once (across clusters; one per kind and cluster).
    pub queue_workers: usize,
    /// Files or block batches a relay task copies at once.
    pub relay_jobs: usize,
    /// How often each Tier 2 cluster's WAL relay is enqueued.
    pub relay_interval: Duration,
    /// How often the stored retention policies are applied (zero: never on a schedule).
    pub retention_interval: Duration,
    /// Backoff and attempts of failing tasks.
    pub retry: RetryPolicy,
    /// Dedup domains and per-cluster limits of backups.
    pub backups: BackupSettings,
    /// Where the block index caches live (default `<data-dir>/cache`; a read-only server
    /// without one uses a temporary directory).
    pub cache_dir: Option<PathBuf>,
    /// Where Tier 2's block index cache lives (default: `cache_dir`).
    pub tier2_cache_dir: Option<PathBuf>,
    /// The embedded queue's directory (default `<data-dir>/queue`).
    pub queue_dir: Option<PathBuf>,
    /// Per-cluster limits of the WAL service.
    pub wal_limits: WalLimits,
}

/// Opens everything, binds the listeners and serves until `shutdown` fires. A wrong key
/// (Tier 1 or Tier 2), a missing bucket or refused credentials stop the server before it
/// serves, with nothing changed; an unreachable Tier 2 does not (Tier 1 keeps archiving and
/// the relays wait for it).
pub async fn run(cfg: ServerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    klio_tls::install_crypto_provider();
    // Re-read when a file changes: renewed certificates, a new client CA or revocation list
    // apply to new connections without a restart.
    let tls = {
        let (cert, key, ca, crl) = (
            cfg.tls_cert.clone(),
            cfg.tls_key.clone(),
            cfg.client_ca.clone(),
            cfg.client_crl.clone(),
        );
        let mut files = vec![cert.clone(), key.clone(), ca.clone()];
        files.extend(crl.clone());
        klio_tls::FileReloader::new("the server's TLS certificates", files, move || {
            klio_tls::load_server_config_with_crl(&cert, &key, &ca, crl.as_deref())
        })?
    };
    // Held until this function returns: one server per data directory.
    let _data_dir_lock = match (&cfg.mode, &cfg.data_dir) {
        (Mode::Standard, Some(dir)) => Some(lock_data_dir(dir)?),
        _ => None,
    };
    let (ctx, backup) = match cfg.mode {
        Mode::Standard => open_standard(&cfg).await?,
        Mode::ReadOnly => open_read_only(&cfg).await?,
    };

    let wal_listener = tokio::net::TcpListener::bind(cfg.wal_listen)
        .await
        .with_context(|| format!("listen on {} for the WAL service", cfg.wal_listen))?;
    let base_listener = tokio::net::TcpListener::bind(cfg.base_listen)
        .await
        .with_context(|| format!("listen on {} for the base-backup service", cfg.base_listen))?;
    tracing::info!(address = %wal_listener.local_addr()?, mode = ?cfg.mode, "WAL service listening");
    tracing::info!(address = %base_listener.local_addr()?, blocks = backup.repo().block_count().unwrap_or_default(), "base-backup service listening");

    let mut background = tokio::task::JoinSet::new();
    if let Some(queue) = ctx.queue.clone() {
        let handler = Arc::new(relay::Tasks {
            ctx: ctx.clone(),
            backup: backup.clone(),
            jobs: cfg.relay_jobs,
        });
        background.spawn(klio_queue::run_workers(
            queue,
            handler,
            cfg.queue_workers,
            cfg.retry,
            shutdown.clone(),
        ));
        background.spawn(relay::schedule(
            ctx.clone(),
            cfg.relay_interval,
            cfg.retention_interval,
            shutdown.clone(),
        ));
    }
    {
        let backup = backup.clone();
        let shutdown = shutdown.clone();
        background.spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(60)) => backup.reap_idle_sessions(),
                }
            }
        });
    }

    {
        // The store-derived metrics, refreshed in the background.
        let (metrics, ctx, shutdown) = (ctx.metrics.clone(), ctx.clone(), shutdown.clone());
        let tier1 = (!ctx.read_only).then(|| backup.repo().clone());
        background.spawn(metrics::refresh_loop(
            metrics,
            ctx,
            tier1,
            METRICS_REFRESH,
            shutdown,
        ));
    }

    let wal_svc = WalServer::new(WalService::new(
        ctx.clone(),
        shutdown.clone(),
        cfg.wal_limits,
    ))
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    let backup_svc = BackupServer::new(backup)
        .max_decoding_message_size(MAX_BACKUP_MESSAGE)
        .max_encoding_message_size(MAX_BACKUP_MESSAGE);
    let rpc_metrics = klio_telemetry::RpcMetricsLayer::new("klio-server");
    let builder = || {
        tonic::transport::Server::builder()
            .layer(rpc_metrics.clone())
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20)
            .max_frame_size(1 << 20)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
    };
    let wal_server = builder().add_service(wal_svc).serve_with_incoming_shutdown(
        klio_tls::tls_incoming_reloading(wal_listener, tls.provider()),
        shutdown.cancelled(),
    );
    let base_server = builder()
        .add_service(backup_svc)
        .serve_with_incoming_shutdown(
            klio_tls::tls_incoming_reloading(base_listener, tls.provider()),
            shutdown.cancelled(),
        );
    let (w, b) = tokio::join!(wal_server, base_server);
    w.context("serve the WAL service")?;
    b.context("serve the base-backup service")?;
    // Workers finish the tasks they run (a task cut short is delivered again anyway).
    while background.join_next().await.is_some() {}
    tracing::info!("server stopped");
    Ok(())
}

/// Tier 1 (WAL store, repository), Tier 2 when configured, the settings and the queue.
/// The name of the lock file in the data directory.
pub const LOCK_FILE: &str = "klio.lock";

/// How often the metrics read from the stores (backups, recovery windows, queue depth) are
/// refreshed; disk use every tenth time.
const METRICS_REFRESH: Duration = Duration::from_secs(15);

/// Creates the data directory if needed and takes an exclusive lock on its lock file before
/// anything in it is read: a second server on the same directory stops here.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    klio_durable::create_dir_all_durable(dir)
        .with_context(|| format!("create data directory \"{}\"", dir.display()))?;
    // Everything below holds keys and every cluster's data: only this server's user may
    // enter. (A directory owned by someone else, such as a volume's root, is left as it is.)
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not make the data directory private (mode 0700)");
    }
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("open the lock file \"{}\"", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            // Half-written files of a crash (before their rename) are garbage now.
            match klio_durable::sweep_temp_files(dir) {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "removed temporary files a crash left"),
                Err(e) => tracing::warn!(error = %e, "could not sweep temporary files"),
            }
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another Klio server is using the data directory \"{}\" (it holds \"{}\"): refusing to start\nHINT: stop the other server first; two servers on one directory would corrupt it",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("lock \"{}\"", path.display()))
        }
    }
}

async fn open_standard(cfg: &ServerConfig) -> anyhow::Result<(Context, BackupService)> {
    let data_dir = cfg
        .data_dir
        .clone()
        .context("--data-dir is required in standard mode")?;
    let key_file = cfg
        .encryption_key_file
        .clone()
        .context("--encryption-key-file is required in standard mode")?;
    // (Created by lock_data_dir, which run() calls first.)
    let passphrase = Passphrase::from_file(&key_file)?;
    let key_path = data_dir.join("keys.json");
    let master =
        tokio::task::spawn_blocking(move || KeyEnvelope::load_or_create(&key_path, &passphrase))
            .await??;
    let cache_dir = cfg
        .cache_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("cache"));
    let store = WalStore::open(
        &data_dir.join("wal"),
        master.clone(),
        cfg.wal_compression_level,
    )?;
    {
        let store = store.clone();
        // A cluster whose archive cannot be recovered does not keep the others down: it
        // is refused (DATA_LOSS or the error's own kind) until the fault is repaired.
        let failed = tokio::task::spawn_blocking(move || store.recover_all()).await??;
        for (name, e) in failed {
            tracing::error!(cluster = %name, error = %e, "could not recover the WAL archive of the cluster; its WAL calls fail until this is repaired, other clusters are served");
        }
    }

    let root = data_dir.join("repository");
    // A new Tier 1 adopts the id key of the repository Tier 2 already holds (a server whose
    // volume was replaced), so that the two tiers keep sharing block ids.
    let mut tier2_found = None;
    let t2cfg_cached = cfg.tier2.clone().map(|mut c| {
        let dir = cfg.tier2_cache_dir.as_ref().unwrap_or(&cache_dir);
        c.index_cache = Some(dir.join("tier2-index.redb"));
        c
    });
    if let Some(t2cfg) = &t2cfg_cached
        && !root.join("config").exists()
    {
        let (c, rt) = (t2cfg.clone(), tokio::runtime::Handle::current());
        match tokio::task::spawn_blocking(move || tier2::Tier2::probe(&c, rt)).await? {
            Ok(found) => tier2_found = found,
            Err(e) if tier2::is_retryable(&e) => {
                tracing::warn!(error = %format!("{e:#}"), "Tier 2 is not reachable; Tier 1 starts without it");
            }
            Err(e) => return Err(e.context("open Tier 2")),
        }
    }
    let id_key = tier2_found.as_ref().map(|t| t.repo.id_key());
    let repo = {
        let key_file = data_dir.join("keys.json");
        let options = RepositoryOptions {
            index_cache: Some(cache_dir.join("tier1-index.redb")),
            ..RepositoryOptions::default()
        };
        tokio::task::spawn_blocking(move || -> anyhow::Result<Repository> {
            let store = LocalStore::open(&root)?;
            let repo = Repository::open_or_init_with_id_key(
                Arc::new(store),
                master,
                options,
                id_key,
            )?;
            // The repository carries its own copy of the key envelope, so that it can be
            // restored from its objects and the passphrase alone.
            let copy = root.join("keys.json");
            if !copy.exists() {
                let envelope = std::fs::read(&key_file)
                    .with_context(|| format!("read \"{}\"", key_file.display()))?;
                klio_durable::write_atomic(&copy, &envelope, 0o600)
                    .with_context(|| format!("write \"{}\"", copy.display()))?;
            }
            for (key, reason) in repo.damaged_indexes() {
                tracing::error!(object = %key, %reason, "unreadable index object: its blocks count as missing");
            }
            Ok(repo)
        })
        .await??
    };

    let tier2 = match (&t2cfg_cached, tier2_found) {
        (None, _) => None,
        (Some(c), Some(found)) => Some(Arc::new(tier2::Tier2Handle::opened(c.clone(), found))),
        (Some(c), None) => {
            let handle = tier2::Tier2Handle::new(c.clone(), true, Some(repo.id_key()));
            match handle.get().await {
                Ok(_) => {}
                Err(e) if tier2::is_retryable(&e) => {
                    tracing::warn!(error = %format!("{e:#}"), "Tier 2 is not reachable yet; relays wait for it");
                }
                Err(e) => return Err(e),
            }
            Some(Arc::new(handle))
        }
    };

    let (queue, backend): (Arc<dyn WorkQueue>, String) = match &cfg.queue_nats {
        Some(nats) => {
            let shown = klio_queue::redact_url(&nats.url);
            (
                Arc::new(
                    NatsQueue::connect_with(nats, &cfg.retry)
                        .await
                        .with_context(|| format!("connect to the NATS work queue at {shown}"))?,
                ),
                shown,
            )
        }
        None => {
            let dir = cfg
                .queue_dir
                .clone()
                .unwrap_or_else(|| data_dir.join("queue"));
            let retry = cfg.retry;
            let q =
                tokio::task::spawn_blocking(move || EmbeddedQueue::open(&dir, &retry)).await??;
            (Arc::new(q), "embedded".to_string())
        }
    };
    let ctx = Context {
        read_only: false,
        wal: Some(store),
        tier2,
        settings: Some(settings::Settings::open(data_dir.join("clusters"))?),
        queue: Some(queue),
        queue_backend: backend,
        progress: Some(relay::Progress::open(data_dir.join("tier2-progress"))?),
        data_dir: Some(data_dir.to_path_buf()),
        metrics: metrics::Metrics::new(),
    };
    let backups = BackupSettings {
        spool_dir: Some(data_dir.join("sessions")),
        ..cfg.backups.clone()
    };
    let backup = BackupService::new(repo, Arc::default(), ctx.clone(), backups);
    Ok((ctx, backup))
}

/// Tier 2 only.
async fn open_read_only(cfg: &ServerConfig) -> anyhow::Result<(Context, BackupService)> {
    let mut t2cfg = cfg.tier2.clone().context(
        "--mode read-only serves Tier 2 and needs it: give --tier2-s3-bucket (and --tier2-s3-endpoint for an S3-compatible server)",
    )?;
    t2cfg.index_cache = (cfg.tier2_cache_dir.as_ref())
        .or(cfg.cache_dir.as_ref())
        .map(|d| d.join("tier2-index.redb"));
    let (c, rt) = (t2cfg.clone(), tokio::runtime::Handle::current());
    let t2 = tokio::task::spawn_blocking(move || tier2::Tier2::open(&c, rt, None, false))
        .await?
        .context("open Tier 2")?;
    let (repo, gc_lock) = (t2.repo.clone(), t2.gc_lock.clone());
    let ctx = Context {
        read_only: true,
        wal: None,
        tier2: Some(Arc::new(tier2::Tier2Handle::opened(t2cfg, t2))),
        settings: None,
        queue: None,
        queue_backend: "none".to_string(),
        progress: None,
        data_dir: None,
        metrics: metrics::Metrics::new(),
    };
    let backups = BackupSettings {
        spool_dir: None,
        ..cfg.backups.clone()
    };
    let backup = BackupService::new(repo, gc_lock, ctx.clone(), backups);
    Ok((ctx, backup))
}
