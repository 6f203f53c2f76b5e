//! `klio`: one binary whose subcommands are the roles.
//!
//! - `klio server`: the Klio server (WAL and base-backup services);
//! - `klio backup`, `klio restore`, `klio backups list|show`, `klio verify`: base backups
//!   (the `klio-plugin` and `klio-restore` roles);
//! - `klio wal-stream`: the `klio-wal` sidecar, streaming WAL from PostgreSQL;
//! - `klio wal-get`: PostgreSQL's `restore_command`;
//! - `klio wal-list`: what the archive of a cluster holds;
//! - `klio status`: one cluster's state, with a non-zero exit when it needs attention;
//! - `klio report`: an HTML page of charts about one cluster's backups;
//! - `klio admin queue ...`: the server's work queue (dead-letter list, retries);
//! - `klio pki init`: development certificates;
//! - `klio operator`, `klio cnpg-plugin`: the Kubernetes operator and the CloudNativePG
//!   plugin's operator side; `klio cnpg-sidecar instance|restore|healthcheck`: its sidecars.
//!
//! Exit status (see `docs/cli.md`): 0 success; 1 failure (for `wal-get`: the file is not
//! in the archive); 2 invalid command line; 200 `wal-get` failure other than "not found".

mod cnpg_plugin;
mod operator;

/// jemalloc, with heap profiling available (`--pprof` on the server and the sidecars).
#[global_allocator]
static ALLOC: klio_heap_profile::Allocator = klio_heap_profile::ALLOCATOR;

use klio_client::{admin, backup, catalog, client, report, restore, status, wal_get, wal_stream};
use klio_cnpg_plugin::sidecar::{self, Role, SidecarCommand};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "klio",
    version,
    about = "Backup and WAL archiving for PostgreSQL on Kubernetes"
)]
struct Cli {
    /// Log lines as text (colours only on a terminal) or one JSON object per line
    #[arg(
        long,
        global = true,
        env = "KLIO_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: klio_telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the Klio server
    Server(Box<ServerArgs>),
    /// Stream WAL from the local PostgreSQL to the Klio server (the klio-wal sidecar)
    WalStream(WalStreamCmd),
    /// Fetch an archived WAL file (use as restore_command = 'klio wal-get ... %f %p')
    WalGet(wal_get::WalGetArgs),
    /// List what the archive of a cluster holds
    WalList(WalListArgs),
    /// Take an online base backup into the server's repository (the klio-plugin role)
    Backup(backup::BackupArgs),
    /// The catalog of base backups
    #[command(subcommand)]
    Backups(catalog::BackupsCommand),
    /// Restore a base backup and set up point-in-time recovery (the klio-restore role)
    Restore(restore::RestoreArgs),
    /// Check that every object a backup needs is present and intact
    Verify(catalog::VerifyArgs),
    /// One cluster's state: archive and streamer, backups and recovery window per tier,
    /// Tier 2 relay, queue, disk (exit 1 when something needs attention)
    Status(status::StatusArgs),
    /// Write an HTML report of one cluster (charts of its backups, WAL and recovery window,
    /// what each backup cost) into a directory
    Report(report::ReportArgs),
    /// Retention of a cluster's backups and WAL
    #[command(subcommand)]
    Retention(catalog::RetentionCommand),
    /// Garbage collection of the backup repository
    #[command(subcommand)]
    Gc(catalog::GcCommand),
    /// Server administration (certificate admin@klio)
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Development certificates
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Run the Kubernetes operator: reconciles Server resources into StatefulSets
    Operator(operator::OperatorArgs),
    /// Run the operator side of the CloudNativePG plugin (sidecar injection, hooks)
    CnpgPlugin(cnpg_plugin::CnpgPluginArgs),
    /// The CloudNativePG plugin's sidecars (klio-plugin, klio-restore) and their probe
    #[command(subcommand)]
    CnpgSidecar(SidecarCommand),
    /// Serve the catalog as KlioBackup resources to Kubernetes' API aggregation layer
    /// (`kubectl get kliobackups`); also `klio server api-server`, as the seed runs it
    ApiServer(ApiServerCmd),
}

#[derive(Args, Debug)]
struct ApiServerCmd {
    #[command(flatten)]
    args: klio_api_service::ApiServiceArgs,
    #[command(flatten)]
    metrics: klio_telemetry::MetricsArgs,
}

/// `klio [global flags] server api-server ...` (the seed's Deployment) is `klio api-server
/// ...`: the API service is a role of its own, not a flag of the server.
fn rewrite_server_api_server(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    // Only global flags (and their values) may come before the subcommand, and none of
    // them takes "server" as a value: the first "server api-server" pair is the command.
    if let Some(i) = args
        .windows(2)
        .position(|w| w[0] == "server" && w[1] == "api-server")
    {
        args.remove(i);
    }
    args
}

#[derive(Args, Debug)]
struct WalStreamCmd {
    #[command(flatten)]
    args: wal_stream::WalStreamArgs,
    #[command(flatten)]
    metrics: klio_telemetry::MetricsArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ModeArg {
    /// Tier 1 on the local volume (and Tier 2 when configured)
    Standard,
    /// Tier 2 only; serves the catalog, restores and wal-get; refuses every write
    ReadOnly,
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// standard: Tier 1 (+ Tier 2); read-only: a disaster-recovery server on Tier 2 alone
    #[arg(long, env = "KLIO_MODE", value_enum, default_value = "standard")]
    mode: ModeArg,
    /// Tier 1 data directory (WAL archive, repository, key file, embedded queue); standard
    /// mode only
    #[arg(long, env = "KLIO_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// File holding the Tier 1 encryption key (passphrase); its trailing newline is ignored.
    /// Also Tier 2's when --tier2-encryption-key-file is not given
    #[arg(long, env = "KLIO_ENCRYPTION_KEY_FILE")]
    encryption_key_file: Option<PathBuf>,
    /// Server certificate (PEM)
    #[arg(long, env = "KLIO_TLS_CERT")]
    tls_cert: PathBuf,
    /// Server private key (PEM)
    #[arg(long, env = "KLIO_TLS_KEY")]
    tls_key: PathBuf,
    /// CA that signs client certificates (PEM); clients must present one
    #[arg(long, env = "KLIO_CLIENT_CA")]
    client_ca: PathBuf,
    /// Certificate revocation list(s) of the client CA (PEM): revoked client certificates are
    /// refused. Re-read when it changes, like the certificates
    #[arg(long, env = "KLIO_CLIENT_CRL")]
    client_crl: Option<PathBuf>,
    /// Address of the WAL service
    #[arg(long, env = "KLIO_WAL_LISTEN", default_value = "0.0.0.0:52000")]
    wal_listen: SocketAddr,
    /// Address of the base-backup service
    #[arg(long, env = "KLIO_BASE_LISTEN", default_value = "0.0.0.0:51515")]
    base_listen: SocketAddr,
    /// zstd level of archived WAL segments (1-19)
    #[arg(long, env = "KLIO_WAL_COMPRESSION_LEVEL", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    wal_compression_level: i32,
    /// NATS JetStream server of the work queue (default: the embedded queue in the data
    /// directory)
    #[arg(long, env = "KLIO_QUEUE_NATS_URL")]
    queue_nats_url: Option<String>,
    /// NATS credentials file (user JWT and nkey seed, as nsc writes it)
    #[arg(long, env = "KLIO_QUEUE_NATS_CREDS_FILE")]
    queue_nats_creds_file: Option<PathBuf>,
    /// File holding the NATS nkey seed
    #[arg(long, env = "KLIO_QUEUE_NATS_NKEY_FILE")]
    queue_nats_nkey_file: Option<PathBuf>,
    /// File holding the NATS authentication token
    #[arg(long, env = "KLIO_QUEUE_NATS_TOKEN_FILE")]
    queue_nats_token_file: Option<PathBuf>,
    /// NATS user (its password in --queue-nats-password-file)
    #[arg(long, env = "KLIO_QUEUE_NATS_USER")]
    queue_nats_user: Option<String>,
    /// File holding the NATS user's password
    #[arg(long, env = "KLIO_QUEUE_NATS_PASSWORD_FILE")]
    queue_nats_password_file: Option<PathBuf>,
    /// CA certificates (PEM) that verify the NATS server; implies TLS
    #[arg(long, env = "KLIO_QUEUE_NATS_CA_FILE")]
    queue_nats_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a NATS server that verifies clients
    #[arg(long, env = "KLIO_QUEUE_NATS_CLIENT_CERT")]
    queue_nats_client_cert: Option<PathBuf>,
    /// Key of the NATS client certificate (PEM)
    #[arg(long, env = "KLIO_QUEUE_NATS_CLIENT_KEY")]
    queue_nats_client_key: Option<PathBuf>,
    /// Refuse a NATS connection without TLS
    #[arg(long, env = "KLIO_QUEUE_NATS_REQUIRE_TLS")]
    queue_nats_require_tls: bool,
    /// Queue tasks run at once (at most one per kind and cluster)
    #[arg(long, env = "KLIO_QUEUE_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    queue_workers: u32,
    /// Attempts a failing task gets before it goes to the dead-letter list
    #[arg(long, env = "KLIO_QUEUE_MAX_ATTEMPTS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    queue_max_attempts: u32,
    /// Longest wait between two attempts of a failing task, in seconds
    #[arg(long, env = "KLIO_QUEUE_MAX_BACKOFF", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    queue_max_backoff: u64,
    /// Tier 2 bucket (S3 or S3-compatible); credentials come from the standard AWS
    /// environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, web identity/IRSA, ...)
    #[arg(long, env = "KLIO_TIER2_S3_BUCKET")]
    tier2_s3_bucket: Option<String>,
    /// Key prefix in the Tier 2 bucket
    #[arg(long, env = "KLIO_TIER2_S3_PREFIX", default_value = "")]
    tier2_s3_prefix: String,
    /// Endpoint of an S3-compatible server (default: AWS)
    #[arg(long, env = "KLIO_TIER2_S3_ENDPOINT")]
    tier2_s3_endpoint: Option<String>,
    /// Region of the Tier 2 bucket (default: AWS_REGION, else us-east-1)
    #[arg(long, env = "KLIO_TIER2_S3_REGION")]
    tier2_s3_region: Option<String>,
    /// PEM bundle of CAs trusted for the Tier 2 endpoint, besides the system's
    #[arg(long, env = "KLIO_TIER2_S3_CA_BUNDLE")]
    tier2_s3_ca_bundle: Option<PathBuf>,
    /// File holding the Tier 2 encryption key (passphrase); default: Tier 1's
    #[arg(long, env = "KLIO_TIER2_ENCRYPTION_KEY_FILE")]
    tier2_encryption_key_file: Option<PathBuf>,
    /// Files (WAL) or block streams (backups) one relay task copies to Tier 2 at once
    #[arg(long, env = "KLIO_TIER2_RELAY_JOBS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    tier2_relay_jobs: u32,
    /// Seconds between two WAL relay runs of a cluster that uses Tier 2
    #[arg(long, env = "KLIO_TIER2_RELAY_INTERVAL", default_value_t = 10.0)]
    tier2_relay_interval: f64,
    /// Seconds between scheduled retention runs (each cluster's last policy, both tiers)
    /// and garbage collections; 0 disables them
    #[arg(long, env = "KLIO_RETENTION_INTERVAL", default_value_t = 3600.0)]
    retention_interval: f64,
    /// Puts clusters that trust each other in one dedup domain: NAME=CLUSTER[,CLUSTER...]
    /// (repeatable; ';'-separated in the environment). Every other cluster has its own
    /// domain: no cluster can find, read or reference another's blocks
    #[arg(
        long = "shared-dedup-domain",
        env = "KLIO_SHARED_DEDUP_DOMAINS",
        value_delimiter = ';'
    )]
    shared_dedup_domains: Vec<String>,
    /// Backup sessions one cluster may have open at once
    #[arg(long, env = "KLIO_MAX_BACKUP_SESSIONS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_backup_sessions: u32,
    /// Bytes one cluster may have uploaded in backups not yet committed (suffixes K, M, G, T)
    #[arg(long, env = "KLIO_MAX_UNCOMMITTED_BYTES", default_value = "4T", value_parser = parse_bytes)]
    max_uncommitted_bytes: u64,
    /// Directory of the block index caches (default: `<data-dir>/cache`; a read-only server
    /// without it uses a temporary directory)
    #[arg(long, env = "KLIO_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Directory of Tier 2's block index cache (default: --cache-dir), e.g. its own volume
    #[arg(long, env = "KLIO_TIER2_CACHE_DIR")]
    tier2_cache_dir: Option<PathBuf>,
    /// Directory of the embedded work queue (default: `<data-dir>/queue`), e.g. its own volume;
    /// standard mode without --queue-nats-url only
    #[arg(long, env = "KLIO_QUEUE_DIR")]
    queue_dir: Option<PathBuf>,
    /// WAL Get streams (wal-get, restores) one cluster may have open at once; more are
    /// refused with RESOURCE_EXHAUSTED
    #[arg(long, env = "KLIO_WAL_MAX_GET_STREAMS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    wal_max_get_streams: u32,
    /// Largest history or .backup file a cluster may store through PutFile, in bytes
    #[arg(long, env = "KLIO_WAL_MAX_PUT_FILE_BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(1..=(16 << 20)))]
    wal_max_put_file_bytes: u32,
    /// History and .backup files one cluster's WAL archive may hold
    #[arg(long, env = "KLIO_WAL_MAX_PUT_FILES", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    wal_max_put_files: u32,
    #[command(flatten)]
    metrics: klio_telemetry::MetricsArgs,
}

/// Parses a byte count with an optional K, M, G or T suffix (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("\"{s}\": unknown unit {c:?} (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("\"{s}\" is not a byte count"))?;
    n.checked_mul(1u64 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("\"{s}\" is not a positive byte count that fits 64 bits"))
}

/// Parses --shared-dedup-domain values into cluster -> domain name.
fn parse_shared_domains(
    values: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for v in values.iter().filter(|v| !v.trim().is_empty()) {
        let (name, clusters) = v.split_once('=').with_context(|| {
            format!("--shared-dedup-domain \"{v}\": expected NAME=CLUSTER[,CLUSTER...]")
        })?;
        klio_repository::Domain::shared(name.trim())
            .with_context(|| format!("--shared-dedup-domain \"{v}\""))?;
        for c in clusters.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            klio_repository::validate_cluster_name(c)
                .with_context(|| format!("--shared-dedup-domain \"{v}\""))?;
            if let Some(other) = out.insert(c.to_string(), name.trim().to_string()) {
                anyhow::bail!(
                    "--shared-dedup-domain: cluster \"{c}\" is in two domains, \"{other}\" and \"{}\"",
                    name.trim()
                );
            }
        }
    }
    Ok(out)
}

impl ServerArgs {
    fn into_config(self) -> anyhow::Result<klio_server::ServerConfig> {
        let seconds = |name: &str, v: f64| {
            std::time::Duration::try_from_secs_f64(v)
                .map_err(|_| anyhow::anyhow!("--{name} must be a number of seconds, not {v}"))
        };
        let read_only = self.mode == ModeArg::ReadOnly;
        if read_only && self.data_dir.is_some() {
            anyhow::bail!(
                "--mode read-only has no Tier 1: drop --data-dir (a read-only server keeps nothing locally)"
            );
        }
        if !read_only && (self.data_dir.is_none() || self.encryption_key_file.is_none()) {
            anyhow::bail!(
                "the server needs --data-dir and --encryption-key-file (or --mode read-only with Tier 2)"
            );
        }
        if self.queue_dir.is_some() && (read_only || self.queue_nats_url.is_some()) {
            anyhow::bail!(
                "--queue-dir is the embedded queue's directory: a read-only server or one using --queue-nats-url has none"
            );
        }
        let nats_settings = self.queue_nats_creds_file.is_some()
            || self.queue_nats_nkey_file.is_some()
            || self.queue_nats_token_file.is_some()
            || self.queue_nats_user.is_some()
            || self.queue_nats_password_file.is_some()
            || self.queue_nats_ca_file.is_some()
            || self.queue_nats_client_cert.is_some()
            || self.queue_nats_client_key.is_some()
            || self.queue_nats_require_tls;
        let queue_nats = match self.queue_nats_url {
            Some(url) => Some(klio_queue::NatsOptions {
                url,
                creds_file: self.queue_nats_creds_file,
                nkey_file: self.queue_nats_nkey_file,
                token_file: self.queue_nats_token_file,
                user: self.queue_nats_user,
                password_file: self.queue_nats_password_file,
                ca_file: self.queue_nats_ca_file,
                client_cert: self.queue_nats_client_cert,
                client_key: self.queue_nats_client_key,
                require_tls: self.queue_nats_require_tls,
            }),
            None if nats_settings => {
                anyhow::bail!("the --queue-nats-* credential and TLS options need --queue-nats-url")
            }
            None => None,
        };
        let tier2 = match self.tier2_s3_bucket {
            None => {
                if self.tier2_encryption_key_file.is_some() || self.tier2_s3_endpoint.is_some() {
                    anyhow::bail!("Tier 2 options need --tier2-s3-bucket");
                }
                None
            }
            Some(bucket) => Some(klio_server::Tier2Config {
                s3: klio_s3::S3Config {
                    bucket,
                    prefix: self.tier2_s3_prefix,
                    endpoint: self.tier2_s3_endpoint,
                    region: self.tier2_s3_region,
                    ca_bundle: self.tier2_s3_ca_bundle,
                },
                key_file: self
                    .tier2_encryption_key_file
                    .or_else(|| self.encryption_key_file.clone())
                    .context(
                        "Tier 2 needs --tier2-encryption-key-file (or --encryption-key-file)",
                    )?,
                index_cache: None,
            }),
        };
        Ok(klio_server::ServerConfig {
            mode: if read_only {
                klio_server::Mode::ReadOnly
            } else {
                klio_server::Mode::Standard
            },
            data_dir: self.data_dir,
            encryption_key_file: self.encryption_key_file,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            client_ca: self.client_ca,
            client_crl: self.client_crl,
            wal_listen: self.wal_listen,
            base_listen: self.base_listen,
            wal_compression_level: self.wal_compression_level,
            tier2,
            queue_nats,
            queue_workers: self.queue_workers as usize,
            relay_jobs: self.tier2_relay_jobs as usize,
            relay_interval: seconds("tier2-relay-interval", self.tier2_relay_interval)?,
            retention_interval: seconds("retention-interval", self.retention_interval)?,
            retry: klio_queue::RetryPolicy {
                max_attempts: self.queue_max_attempts,
                base: std::time::Duration::from_secs(1),
                max: std::time::Duration::from_secs(self.queue_max_backoff),
            },
            backups: klio_server::BackupSettings {
                shared_domains: parse_shared_domains(&self.shared_dedup_domains)?,
                max_sessions_per_cluster: self.max_backup_sessions as usize,
                max_uncommitted_bytes_per_cluster: self.max_uncommitted_bytes,
                spool_dir: None,
            },
            cache_dir: self.cache_dir,
            tier2_cache_dir: self.tier2_cache_dir,
            queue_dir: self.queue_dir,
            wal_limits: klio_server::WalLimits {
                max_get_streams: self.wal_max_get_streams as usize,
                max_put_file_bytes: self.wal_max_put_file_bytes as usize,
                max_put_files: self.wal_max_put_files as usize,
            },
        })
    }
}

#[derive(Args, Debug)]
struct WalListArgs {
    #[command(flatten)]
    client: client::ClientArgs,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum PkiCommand {
    /// Write a CA, a server certificate and client certificates into DIR
    Init {
        dir: PathBuf,
        /// Cluster to issue a client certificate (CN klio@NAME) for; repeatable
        #[arg(long = "cluster")]
        clusters: Vec<String>,
        /// Extra DNS name for the server certificate; repeatable
        #[arg(long = "dns")]
        dns: Vec<String>,
    },
    /// Add certificates to DIR/crl.pem, the CA's revocation list (`klio server --client-crl`)
    Revoke {
        dir: PathBuf,
        /// Certificate files (PEM) issued by the CA in DIR
        #[arg(required = true)]
        certs: Vec<PathBuf>,
    },
}

impl Command {
    /// The `service.name` of the process's telemetry, after its role.
    fn service_name(&self) -> &'static str {
        match self {
            Command::Server(_) => "klio-server",
            Command::WalStream(_) => "klio-wal",
            Command::CnpgSidecar(SidecarCommand::Instance(_)) => "klio-plugin",
            Command::CnpgSidecar(SidecarCommand::Restore(_)) => "klio-restore",
            Command::Operator(_) => "klio-operator",
            Command::CnpgPlugin(_) => "klio-cnpg-plugin",
            Command::ApiServer(_) => "klio-api-server",
            _ => "klio",
        }
    }

    /// The metrics endpoint's options of the long-running roles.
    fn metrics(&self) -> Option<&klio_telemetry::MetricsArgs> {
        match self {
            Command::Server(a) => Some(&a.metrics),
            Command::WalStream(a) => Some(&a.metrics),
            Command::ApiServer(a) => Some(&a.metrics),
            Command::CnpgSidecar(SidecarCommand::Instance(a) | SidecarCommand::Restore(a)) => {
                Some(&a.metrics)
            }
            _ => None,
        }
    }
}

/// Cancels the token on SIGINT or SIGTERM (Kubernetes stops containers with SIGTERM).
fn cancel_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

async fn wal_list(args: WalListArgs) -> anyhow::Result<()> {
    let mut c = args.client.wal_client().await?;
    let r = c
        .list(klio_proto::wal::v1::ListRequest {
            cluster: args.client.cluster.clone(),
            tier2_recovery: args.client.tier2_recovery,
            flush: false,
        })
        .await
        .map_err(|s| client::status_error("list the WAL archive", s))?
        .into_inner();
    let end = klio_pg::Lsn(r.end_lsn);
    if args.json {
        let v = serde_json::json!({
            "cluster": args.client.cluster,
            "system_id": r.system_id.to_string(),
            "segment_size": r.segment_size,
            "timeline": r.has_wal.then_some(r.timeline),
            "end_lsn": r.has_wal.then(|| end.to_string()),
            "files": r.files,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("cluster:       {}", args.client.cluster);
        println!("system id:     {}", r.system_id);
        if r.has_wal {
            println!("archived to:   {end} on timeline {}", r.timeline);
        } else {
            println!("archived to:   (no WAL yet)");
        }
        println!("files:         {}", r.files.len());
        for f in &r.files {
            println!("  {f}");
        }
    }
    Ok(())
}

/// Output piped into a reader that stopped reading (`klio wal-list | head`) ends the
/// process quietly with the shell's status for SIGPIPE, as other tools do, instead of a
/// panic report.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse_from(rewrite_server_api_server(std::env::args_os().collect()));
    klio_tls::install_crypto_provider();
    // Clients (the sidecars above all) mostly wait on sockets: one thread avoids the
    // cross-thread wake-ups that dominated their CPU profile, and leaves the cores to
    // PostgreSQL. The server serves many clients and uses every core.
    let mut builder = match cli.command {
        Command::Server(_)
        | Command::Backup(_)
        | Command::Restore(_)
        | Command::Operator(_)
        | Command::ApiServer(_)
        | Command::CnpgPlugin(_)
        | Command::CnpgSidecar(SidecarCommand::Instance(_) | SidecarCommand::Restore(_)) => {
            tokio::runtime::Builder::new_multi_thread()
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let is_wal_get = matches!(cli.command, Command::WalGet(_));
    let telemetry = {
        let _inside = rt.enter();
        match klio_telemetry::init(cli.command.service_name(), cli.log_format) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    };
    let stop_endpoint = CancellationToken::new();
    let result: anyhow::Result<ExitCode> = rt.block_on(async {
        let outcome = run(cli.command, &telemetry, &stop_endpoint).await;
        stop_endpoint.cancel();
        // Buffered spans and metrics are sent while the runtime still drives the exporters'
        // connections (a blocking flush on the runtime's own thread would starve them).
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        outcome
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if is_wal_get {
                ExitCode::from(wal_get::EXIT_ERROR as u8)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs the subcommand (its metrics endpoint first, for the long-running roles).
async fn run(
    command: Command,
    telemetry: &klio_telemetry::Telemetry,
    stop_endpoint: &CancellationToken,
) -> anyhow::Result<ExitCode> {
    if let Some(m) = command.metrics() {
        telemetry.serve(m, stop_endpoint.clone()).await?;
    }
    match command {
        Command::Server(a) => {
            let cfg = a.into_config()?;
            klio_server::run(cfg, cancel_on_signals())
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::ApiServer(a) => klio_api_service::run(a.args)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::WalStream(a) => wal_stream::run(a.args, cancel_on_signals())
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::WalGet(a) => match wal_get::run(&a).await? {
            wal_get::Outcome::Restored => Ok(ExitCode::SUCCESS),
            wal_get::Outcome::NotFound => {
                eprintln!("klio wal-get: \"{}\" is not in the archive", a.wal_name);
                Ok(ExitCode::from(wal_get::EXIT_NOT_FOUND as u8))
            }
        },
        Command::WalList(a) => wal_list(a).await.map(|()| ExitCode::SUCCESS),
        Command::Backup(a) => backup::run(a).await.map(|()| ExitCode::SUCCESS),
        Command::Backups(c) => catalog::backups(c).await.map(|()| ExitCode::SUCCESS),
        Command::Restore(a) => restore::run(a).await.map(|()| ExitCode::SUCCESS),
        Command::Verify(a) => catalog::verify(a).await,
        Command::Status(a) => status::run(a).await,
        Command::Report(a) => report::run(a).await.map(|()| ExitCode::SUCCESS),
        Command::Retention(c) => catalog::retention(c).await.map(|()| ExitCode::SUCCESS),
        Command::Gc(c) => catalog::gc(c).await.map(|()| ExitCode::SUCCESS),
        Command::Admin(c) => admin::run(c).await.map(|()| ExitCode::SUCCESS),
        Command::CnpgPlugin(a) => cnpg_plugin::run(a, cancel_on_signals())
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::CnpgSidecar(c) => {
            let (role, args) = match c {
                SidecarCommand::Instance(a) => (Role::Instance, a),
                SidecarCommand::Restore(a) => (Role::Restore, a),
                SidecarCommand::Healthcheck(a) => {
                    return sidecar::healthcheck(&a).await.map(|()| ExitCode::SUCCESS);
                }
            };
            sidecar::serve(role, args.config()?, cancel_on_signals())
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Operator(a) => klio_operator::run(a.into_options(), cancel_on_signals())
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Pki(PkiCommand::Revoke { dir, certs }) => {
            let crl = klio_tls::revoke_dev_certs(&dir, &certs)
                .with_context(|| format!("revoke certificates of \"{}\"", dir.display()))?;
            println!("{}", crl.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki(PkiCommand::Init { dir, clusters, dns }) => {
            let layout = klio_tls::init_dev_pki(&dir, &clusters, &dns)
                .with_context(|| format!("initialize certificates in \"{}\"", dir.display()))?;
            println!("certificates written to {}", dir.display());
            let _ = layout;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
