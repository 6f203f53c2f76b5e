//! The Klio server: the WAL service on `--wal-listen` and the base-backup service on
//! `--base-listen`, over gRPC with mutual TLS.
//!
//! Principal items: [`ServerConfig`] (validated settings), [`run`] (starts the services and
//! serves until the cancellation token fires), [`WalService`], [`BackupService`].

mod backup_service;
mod status;
mod wal_service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use klio_crypto::{KeyEnvelope, Passphrase};
use klio_proto::backup::v1::backup_server::BackupServer;
use klio_proto::wal::v1::wal_server::WalServer;
use klio_repository::{LocalStore, Repository, RepositoryOptions};
use klio_wal_store::WalStore;
use tokio_util::sync::CancellationToken;

pub use backup_service::{BackupService, MAX_BACKUP_MESSAGE, SESSION_IDLE_TIMEOUT};
pub use status::store_status;
pub use wal_service::{ASYNC_FLUSH_INTERVAL, MAX_MESSAGE, WalService};

/// Validated server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub encryption_key_file: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: PathBuf,
    pub wal_listen: SocketAddr,
    pub base_listen: SocketAddr,
    /// zstd level for sealed WAL segments.
    pub wal_compression_level: i32,
}

/// Opens the data directory (creating its key file on first start; a wrong key is an
/// error and changes nothing), binds the listeners and serves until `shutdown` fires.
pub async fn run(cfg: ServerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    klio_tls::install_crypto_provider();
    klio_durable::create_dir_all_durable(&cfg.data_dir)
        .with_context(|| format!("create data directory \"{}\"", cfg.data_dir.display()))?;
    let passphrase = Passphrase::from_file(&cfg.encryption_key_file)?;
    let key_path = cfg.data_dir.join("keys.json");
    let master =
        tokio::task::spawn_blocking(move || KeyEnvelope::load_or_create(&key_path, &passphrase))
            .await??;
    let store = WalStore::open(
        &cfg.data_dir.join("wal"),
        master.clone(),
        cfg.wal_compression_level,
    )?;
    {
        let store = store.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for name in store.clusters()? {
                store
                    .cluster(&name)?
                    .recover()
                    .with_context(|| format!("recover the WAL archive of cluster \"{name}\""))?;
            }
            Ok(())
        })
        .await??;
    }
    let tls = klio_tls::load_server_config(&cfg.tls_cert, &cfg.tls_key, &cfg.client_ca)?;

    let repo = {
        let root = cfg.data_dir.join("repository");
        let key_file = cfg.data_dir.join("keys.json");
        tokio::task::spawn_blocking(move || -> anyhow::Result<Repository> {
            let store = LocalStore::open(&root)?;
            let repo =
                Repository::open_or_init(Arc::new(store), master, RepositoryOptions::default())?;
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

    let wal_listener = tokio::net::TcpListener::bind(cfg.wal_listen)
        .await
        .with_context(|| format!("listen on {} for the WAL service", cfg.wal_listen))?;
    let base_listener = tokio::net::TcpListener::bind(cfg.base_listen)
        .await
        .with_context(|| format!("listen on {} for the base-backup service", cfg.base_listen))?;
    tracing::info!(address = %wal_listener.local_addr()?, data_dir = %cfg.data_dir.display(), "WAL service listening");
    tracing::info!(address = %base_listener.local_addr()?, blocks = repo.block_count(), "base-backup service listening");

    let wal = WalService::new(store.clone(), shutdown.clone());
    let wal_svc = WalServer::new(wal)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let backup = BackupService::new(repo, store);
    {
        let backup = backup.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(std::time::Duration::from_secs(60)) => backup.reap_idle_sessions(),
                }
            }
        });
    }
    let backup_svc = BackupServer::new(backup)
        .max_decoding_message_size(MAX_BACKUP_MESSAGE)
        .max_encoding_message_size(MAX_BACKUP_MESSAGE);
    let builder = || {
        tonic::transport::Server::builder()
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20)
            .max_frame_size(1 << 20)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
    };
    let wal_server = builder().add_service(wal_svc).serve_with_incoming_shutdown(
        klio_tls::tls_incoming(wal_listener, tls.clone()),
        shutdown.cancelled(),
    );
    let base_server = builder()
        .add_service(backup_svc)
        .serve_with_incoming_shutdown(
            klio_tls::tls_incoming(base_listener, tls),
            shutdown.cancelled(),
        );
    let (w, b) = tokio::join!(wal_server, base_server);
    w.context("serve the WAL service")?;
    b.context("serve the base-backup service")?;
    tracing::info!("server stopped");
    Ok(())
}
