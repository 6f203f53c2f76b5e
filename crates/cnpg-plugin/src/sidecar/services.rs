//! The sidecars' gRPC services over one [`Sidecar`]: thin adapters from CNPG-I requests to
//! `klio-client` calls, so the sidecars and the CLI run the same backup, restore and WAL code.
//!
//! CloudNativePG does not interpret gRPC codes (except that any error is a failure), so every
//! refusal carries what is wrong and what to do in its message.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use klio_client::backup::BackupArgs;
use klio_client::restore::RestoreArgs;
use klio_client::wal_get::{self, Outcome, WalRequest};
use klio_k8s_types::Mode;
use klio_proto::cnpgi::backup::v1 as backup;
use klio_proto::cnpgi::identity::v1 as identity;
use klio_proto::cnpgi::wal::v1 as wal;
use klio_proto::grpc_health::v1 as health;
use klio_proto::wal::v1::wal_client::WalClient;
use serde_json::Value;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{CNPG_RESTORE_COMMAND, Role, SidecarConfig, archive_for};
use crate::PLUGIN_NAME;
use crate::cluster::Cluster;

/// Backup parameters a `Backup` (or `ScheduledBackup`) may pass in
/// `spec.pluginConfiguration.parameters`.
pub const BACKUP_PARAMETERS: [&str; 4] = [
    "jobs",
    "compressionLevel",
    "skipRetention",
    crate::PARAMETER_CONFIGURATION_REF,
];

/// Size and modification time of each client certificate file.
type Stamp = Vec<Option<(SystemTime, u64)>>;

/// A sidecar's services (a cheap handle: clones share one state).
#[derive(Clone)]
pub struct Sidecar(Arc<Inner>);

struct Inner {
    role: Role,
    config: SidecarConfig,
    /// The WAL service channel, reused by every call (CloudNativePG starts a process per WAL
    /// file; the TLS handshake with the server is paid once) and rebuilt when a certificate
    /// file changes.
    wal: tokio::sync::Mutex<Option<(Stamp, WalClient<Channel>)>>,
    /// Held while a backup runs: one at a time per pod.
    backup: tokio::sync::Mutex<()>,
    /// WAL prefetched in the background while PostgreSQL replays what it was given.
    prefetcher: wal_get::Prefetcher,
}

fn internal(e: anyhow::Error) -> Status {
    Status::internal(format!("{e:#}"))
}

fn parse_json(bytes: &[u8], what: &str) -> Result<Value, Status> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(Status::invalid_argument(format!(
            "the {what} definition is not a JSON object"
        ))),
        Err(e) => Err(Status::invalid_argument(format!(
            "the {what} definition is not JSON: {e}"
        ))),
    }
}

impl Sidecar {
    pub fn new(role: Role, config: SidecarConfig) -> Sidecar {
        Sidecar(Arc::new(Inner {
            role,
            config,
            wal: tokio::sync::Mutex::new(None),
            backup: tokio::sync::Mutex::new(()),
            prefetcher: wal_get::Prefetcher::default(),
        }))
    }

    fn config(&self) -> &SidecarConfig {
        &self.0.config
    }

    fn stamp(&self) -> Stamp {
        let c = &self.config().client.conn;
        [&c.client_cert, &c.client_key]
            .into_iter()
            .chain(c.server_ca.iter())
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }

    /// The WAL service client, connected once and kept while the certificates stay the same.
    async fn wal_client(&self) -> anyhow::Result<WalClient<Channel>> {
        let stamp = self.stamp();
        let mut cached = self.0.wal.lock().await;
        if let Some((s, c)) = cached.as_ref()
            && *s == stamp
        {
            return Ok(c.clone());
        }
        let client = self.config().client.wal_client().await?;
        *cached = Some((stamp, client.clone()));
        Ok(client)
    }

    /// Refuses a destination outside PGDATA (or not absolute, or climbing with `..`).
    fn check_destination(&self, dest: &str) -> Result<PathBuf, Status> {
        let path = PathBuf::from(dest);
        let climbs = path.components().any(|c| matches!(c, Component::ParentDir));
        let outside = self
            .config()
            .pgdata
            .as_ref()
            .is_some_and(|d| !path.starts_with(d));
        if !path.is_absolute() || climbs || outside {
            return Err(Status::invalid_argument(format!(
                "destination_file_name \"{}\" is not a path inside the data directory{}",
                dest.escape_debug(),
                self.config()
                    .pgdata
                    .as_ref()
                    .map(|d| format!(" \"{}\"", d.display()))
                    .unwrap_or_default()
            )));
        }
        Ok(path)
    }
}

#[tonic::async_trait]
impl identity::identity_server::Identity for Sidecar {
    async fn get_plugin_metadata(
        &self,
        _: Request<identity::GetPluginMetadataRequest>,
    ) -> Result<Response<identity::GetPluginMetadataResponse>, Status> {
        Ok(Response::new(crate::service::plugin_metadata()))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<identity::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<identity::GetPluginCapabilitiesResponse>, Status> {
        use identity::plugin_capability::service::Type;
        let types: &[Type] = match self.0.role {
            Role::Instance => &[Type::WalService, Type::BackupService],
            Role::Restore => &[Type::RestoreJob, Type::WalService],
        };
        Ok(Response::new(crate::service::plugin_capabilities(types)))
    }

    /// Called before every use of a pooled connection: answered from memory, never waiting
    /// on the Klio server.
    async fn probe(
        &self,
        _: Request<identity::ProbeRequest>,
    ) -> Result<Response<identity::ProbeResponse>, Status> {
        Ok(Response::new(identity::ProbeResponse { ready: true }))
    }
}

#[tonic::async_trait]
impl health::health_server::Health for Sidecar {
    async fn check(
        &self,
        request: Request<health::HealthCheckRequest>,
    ) -> Result<Response<health::HealthCheckResponse>, Status> {
        use health::health_check_response::ServingStatus;
        let service = request.into_inner().service;
        let known = service.is_empty()
            || service == "cnpgi.identity.v1.Identity"
            || service == "cnpgi.wal.v1.WAL"
            || (self.0.role == Role::Instance && service == "cnpgi.backup.v1.Backup")
            || (self.0.role == Role::Restore && service == "cnpgi.wal.v1.RestoreJobHooks");
        let status = if known {
            ServingStatus::Serving
        } else {
            ServingStatus::ServiceUnknown
        };
        Ok(Response::new(health::HealthCheckResponse {
            status: status as i32,
        }))
    }
}

#[tonic::async_trait]
impl wal::wal_server::Wal for Sidecar {
    /// Restore only: WAL reaches the archive by streaming (`klio-wal`), so archiving is never
    /// advertised and CloudNativePG's `wal-archive` never calls this plugin.
    async fn get_capabilities(
        &self,
        _: Request<wal::WalCapabilitiesRequest>,
    ) -> Result<Response<wal::WalCapabilitiesResult>, Status> {
        Ok(Response::new(wal::WalCapabilitiesResult {
            capabilities: vec![wal::WalCapability {
                r#type: Some(wal::wal_capability::Type::Rpc(wal::wal_capability::Rpc {
                    r#type: wal::wal_capability::rpc::Type::RestoreWal as i32,
                })),
            }],
        }))
    }

    async fn archive(
        &self,
        _: Request<wal::WalArchiveRequest>,
    ) -> Result<Response<wal::WalArchiveResult>, Status> {
        Err(Status::unimplemented(format!(
            "{PLUGIN_NAME} streams WAL (klio-wal) and does not archive through archive_command: remove isWALArchiver from the Cluster's plugin entry"
        )))
    }

    async fn restore(
        &self,
        request: Request<wal::WalRestoreRequest>,
    ) -> Result<Response<wal::WalRestoreResult>, Status> {
        let r = request.into_inner();
        let cluster = Cluster::parse(&r.cluster_definition).map_err(Status::invalid_argument)?;
        let config = self.config();
        let archive = archive_for(&cluster, &config.names).map_err(Status::failed_precondition)?;
        if !wal_get::is_plausible_wal_name(&r.source_wal_name) {
            return Err(Status::invalid_argument(format!(
                "source_wal_name \"{}\" is not the name of a WAL, history or backup history file",
                r.source_wal_name.escape_debug()
            )));
        }
        let dest = self.check_destination(&r.destination_file_name)?;
        // pg_rewind asks for exactly the files it needs: no prefetch, no spool.
        let rewind = r.mode == wal::wal_restore_request::Mode::Rewind as i32;
        let spool = config.spool_dir.join(&archive);
        let req = WalRequest {
            cluster: &archive,
            tier2_recovery: config.client.tier2_recovery,
            wal_name: &r.source_wal_name,
            dest_path: &dest,
            prefetch: if rewind { 0 } else { config.prefetch },
            spool: &spool,
        };
        match wal_get::restore(&req, Some(&self.0.prefetcher), || self.wal_client()).await {
            Ok(Outcome::Restored) => Ok(Response::new(wal::WalRestoreResult {})),
            Ok(Outcome::NotFound) => Err(Status::not_found(format!(
                "\"{}\" is not in the WAL archive of cluster \"{archive}\"",
                r.source_wal_name
            ))),
            Err(e) => {
                tracing::warn!(name = %r.source_wal_name, error = %format!("{e:#}"), "WAL restore failed");
                Err(internal(e))
            }
        }
    }

    async fn status(
        &self,
        _: Request<wal::WalStatusRequest>,
    ) -> Result<Response<wal::WalStatusResult>, Status> {
        Err(Status::unimplemented(
            "WAL status is not a capability of this plugin",
        ))
    }

    async fn set_first_required(
        &self,
        _: Request<wal::SetFirstRequiredRequest>,
    ) -> Result<Response<wal::SetFirstRequiredResult>, Status> {
        Err(Status::unimplemented(
            "SetFirstRequired is not a capability of this plugin",
        ))
    }
}

/// Parses a backup parameter, naming it on failure.
fn parameter<T>(
    params: &HashMap<String, String>,
    key: &str,
    range: std::ops::RangeInclusive<T>,
) -> Result<Option<T>, Status>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let Some(raw) = params.get(key) else {
        return Ok(None);
    };
    match raw.trim().parse::<T>() {
        Ok(v) if range.contains(&v) => Ok(Some(v)),
        _ => Err(Status::invalid_argument(format!(
            "backup parameter {key}=\"{}\" is not a number from {} to {}",
            raw.escape_debug(),
            range.start(),
            range.end()
        ))),
    }
}

/// Unix seconds of an RFC 3339 time in the backup's metadata (0 only when absent).
fn unix_seconds(metadata: &Value, field: &str) -> i64 {
    metadata[field]
        .as_str()
        .and_then(|s| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        })
        .map_or(0, |t| t.unix_timestamp())
}

impl Sidecar {
    /// The backup settings for a request's parameters, checked.
    fn backup_args(&self, params: &HashMap<String, String>) -> Result<BackupArgs, Status> {
        let config = self.config();
        if let Some(unknown) = params
            .keys()
            .find(|k| !BACKUP_PARAMETERS.contains(&k.as_str()))
        {
            return Err(Status::invalid_argument(format!(
                "unknown backup parameter \"{}\" in the Backup's spec.pluginConfiguration.parameters: {PLUGIN_NAME} takes {}",
                unknown.escape_debug(),
                BACKUP_PARAMETERS.join(", ")
            )));
        }
        if let Some(pc) = params.get(crate::PARAMETER_CONFIGURATION_REF)
            && !config.plugin_configuration.is_empty()
            && *pc != config.plugin_configuration
        {
            return Err(Status::invalid_argument(format!(
                "the Backup names PluginConfiguration \"{pc}\", but this cluster's plugin uses \"{}\": backups always go to the Cluster's PluginConfiguration; remove the parameter",
                config.plugin_configuration
            )));
        }
        let skip_retention = match params.get("skipRetention").map(|s| s.trim()) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(Status::invalid_argument(format!(
                    "backup parameter skipRetention=\"{}\" must be true or false",
                    other.escape_debug()
                )));
            }
        };
        Ok(BackupArgs {
            client: config.client.clone(),
            pg_dsn: config.pg_dsn.clone(),
            pgdata: None,
            jobs: parameter(params, "jobs", 1u16..=64)?.unwrap_or(2),
            compression_level: parameter(params, "compressionLevel", -7i32..=19)?.unwrap_or(1),
            wal_wait_timeout: config.wal_wait_timeout,
            json: true,
            retention: config.retention.clone(),
            tier2_retention: klio_client::catalog::Tier2RetentionFlags::from_flags(
                &config.tier2_retention,
            ),
            no_retention: skip_retention,
        })
    }
}

#[tonic::async_trait]
impl backup::backup_server::Backup for Sidecar {
    async fn get_capabilities(
        &self,
        _: Request<backup::BackupCapabilitiesRequest>,
    ) -> Result<Response<backup::BackupCapabilitiesResult>, Status> {
        Ok(Response::new(backup::BackupCapabilitiesResult {
            capabilities: vec![backup::BackupCapability {
                r#type: Some(backup::backup_capability::Type::Rpc(
                    backup::backup_capability::Rpc {
                        r#type: backup::backup_capability::rpc::Type::Backup as i32,
                    },
                )),
            }],
        }))
    }

    /// A base backup of this pod's PostgreSQL (a standby too: CloudNativePG prefers one),
    /// then the PluginConfiguration's retention in each tier. No deadline: it runs as long as
    /// the database needs.
    async fn backup(
        &self,
        request: Request<backup::BackupRequest>,
    ) -> Result<Response<backup::BackupResult>, Status> {
        let config = self.config();
        if config.mode == Mode::ReadOnly {
            return Err(Status::failed_precondition(format!(
                "PluginConfiguration \"{}\" is read-only: it restores from Tier 2 and takes no backups\nHINT: back up through a standard-mode PluginConfiguration",
                config.plugin_configuration
            )));
        }
        let r = request.into_inner();
        let cluster = Cluster::parse(&r.cluster_definition).map_err(Status::invalid_argument)?;
        let backup_cr = parse_json(&r.backup_definition, "Backup")?;
        let args = self.backup_args(&r.parameters)?;
        let Ok(_running) = self.0.backup.try_lock() else {
            return Err(Status::aborted(
                "another backup is already running in this pod; try again when it ends",
            ));
        };
        let backup_name = backup_cr["metadata"]["name"].as_str().unwrap_or_default();
        tracing::info!(backup = backup_name, cluster = %config.names.own, "backup requested by CloudNativePG");
        let m = klio_client::backup::take(&args).await.map_err(internal)?;
        let text = |k: &str| m[k].as_str().unwrap_or_default().to_string();
        let mut metadata = HashMap::new();
        let c = Cluster(&cluster);
        for (k, v) in [
            ("timeline", m["timeline"].to_string()),
            (
                "clusterUID",
                cluster["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ),
            ("clusterName", c.name().to_string()),
            ("archive", config.names.own.clone()),
            ("backupId", text("backup_id")),
            ("fromStandby", m["from_standby"].to_string()),
            ("systemIdentifier", text("system_id")),
            ("pluginName", PLUGIN_NAME.to_string()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("displayName", "Klio".to_string()),
        ] {
            metadata.insert(k.to_string(), v);
        }
        Ok(Response::new(backup::BackupResult {
            backup_id: text("backup_id"),
            backup_name: backup_name.to_string(),
            started_at: unix_seconds(&m, "started_at"),
            stopped_at: unix_seconds(&m, "stopped_at"),
            begin_wal: text("start_wal"),
            end_wal: text("end_wal"),
            begin_lsn: text("start_lsn"),
            end_lsn: text("end_lsn"),
            backup_label_file: text("backup_label").into_bytes().into(),
            tablespace_map_file: text("tablespace_map").into_bytes().into(),
            instance_id: config.pod_name.clone(),
            online: true,
            metadata,
        }))
    }
}

/// The recovery target of `bootstrap.recovery.recoveryTarget`, as restore arguments.
fn recovery_target(cluster: &Value, args: &mut RestoreArgs) -> Result<(), Status> {
    let t = &cluster["spec"]["bootstrap"]["recovery"]["recoveryTarget"];
    let text = |k: &str| t[k].as_str().filter(|s| !s.is_empty()).map(str::to_string);
    args.backup_id = text("backupID");
    args.target_time = text("targetTime");
    args.target_lsn = text("targetLSN");
    args.target_xid = text("targetXID");
    args.target_name = text("targetName");
    args.target_immediate = t["targetImmediate"].as_bool() == Some(true);
    args.target_timeline = text("targetTLI");
    let set = [
        args.target_time.is_some(),
        args.target_lsn.is_some(),
        args.target_xid.is_some(),
        args.target_name.is_some(),
        args.target_immediate,
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set > 1 {
        return Err(Status::invalid_argument(
            "spec.bootstrap.recovery.recoveryTarget sets more than one of targetTime, targetLSN, targetXID, targetName and targetImmediate: keep one",
        ));
    }
    if let Some(t) = &args.target_time {
        klio_client::restore::parse_target_time(t).map_err(|e| {
            Status::invalid_argument(format!(
                "spec.bootstrap.recovery.recoveryTarget.targetTime: {e:#}"
            ))
        })?;
    }
    Ok(())
}

impl Sidecar {
    /// Refuses a recovery whose new cluster would stream into an archive that already holds
    /// WAL (CloudNativePG's `check_empty_wal_archive`).
    async fn check_empty_archive(&self) -> Result<(), Status> {
        let own = &self.config().names.own;
        let mut client = self.wal_client().await.map_err(internal)?;
        let r = client
            .list(klio_proto::wal::v1::ListRequest {
                cluster: own.clone(),
                tier2_recovery: false,
                flush: false,
            })
            .await;
        match r {
            Ok(r) if r.get_ref().has_wal => Err(Status::failed_precondition(format!(
                "the WAL archive of cluster \"{own}\" on the Klio server already holds WAL (up to timeline {}): the recovered cluster would write into an archive another cluster owns\nHINT: give the new cluster another archive name (PluginConfiguration spec.clusterName), or retire the old archive first",
                r.get_ref().timeline
            ))),
            Ok(_) => Ok(()),
            // This certificate may read only the source's archive; the new cluster's sidecars
            // check their own archive when they first stream (the server refuses a foreign
            // system identifier).
            Err(s) if s.code() == tonic::Code::PermissionDenied => {
                tracing::warn!(archive = %own, "cannot check that the new cluster's archive is empty with this certificate: {}", s.message());
                Ok(())
            }
            Err(s) => Err(internal(klio_client::client::status_error(
                &format!("check that the WAL archive of cluster \"{own}\" is empty"),
                s,
            ))),
        }
    }
}

/// Moves what is in `pgdata/pg_wal` to `wal_dir` and links `pg_wal` there (`walStorage`).
fn link_pg_wal(pgdata: &Path, wal_dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let link = pgdata.join("pg_wal");
    if std::fs::read_link(&link).is_ok_and(|t| t == wal_dir) {
        return Ok(());
    }
    std::fs::create_dir_all(wal_dir)
        .with_context(|| format!("create the WAL directory \"{}\"", wal_dir.display()))?;
    if link.is_dir() {
        for e in std::fs::read_dir(&link)? {
            let e = e?;
            let to = wal_dir.join(e.file_name());
            std::fs::rename(e.path(), &to)
                .or_else(|_| {
                    if e.path().is_dir() {
                        std::fs::create_dir_all(&to)
                    } else {
                        std::fs::copy(e.path(), &to).map(|_| ())
                    }
                })
                .with_context(|| {
                    format!("move \"{}\" to \"{}\"", e.path().display(), to.display())
                })?;
        }
        std::fs::remove_dir_all(&link).with_context(|| format!("remove \"{}\"", link.display()))?;
    }
    std::os::unix::fs::symlink(wal_dir, &link)
        .with_context(|| format!("link \"{}\" to \"{}\"", link.display(), wal_dir.display()))?;
    klio_durable::sync_dir(pgdata)?;
    Ok(())
}

#[tonic::async_trait]
impl wal::restore_job_hooks_server::RestoreJobHooks for Sidecar {
    async fn get_capabilities(
        &self,
        _: Request<wal::RestoreJobHooksCapabilitiesRequest>,
    ) -> Result<Response<wal::RestoreJobHooksCapabilitiesResult>, Status> {
        Ok(Response::new(wal::RestoreJobHooksCapabilitiesResult {
            capabilities: vec![wal::RestoreJobHooksCapability {
                kind: wal::restore_job_hooks_capability::Kind::Restore as i32,
            }],
        }))
    }

    /// Writes PGDATA from the backup the Cluster's recovery target calls for and returns the
    /// settings CloudNativePG appends for the replay (the target itself it writes on its own).
    async fn restore(
        &self,
        request: Request<wal::RestoreRequest>,
    ) -> Result<Response<wal::RestoreResponse>, Status> {
        let r = request.into_inner();
        let cluster = Cluster::parse(&r.cluster_definition).map_err(Status::invalid_argument)?;
        let config = self.config();
        let source = archive_for(&cluster, &config.names).map_err(Status::failed_precondition)?;
        let pgdata = config.pgdata.clone().ok_or_else(|| {
            Status::failed_precondition(
                "PGDATA is not set in the klio-restore container: the data directory to write is unknown",
            )
        })?;
        if r.check_empty_wal_archive == Some(true) {
            self.check_empty_archive().await?;
        }
        let mut client = config.client.clone();
        client.cluster = source.clone();
        let mut args = RestoreArgs::new(client, pgdata.clone());
        recovery_target(&cluster, &mut args)?;
        tracing::info!(archive = %source, pgdata = %pgdata.display(), "restore requested by CloudNativePG");
        let restored = klio_client::restore::restore_data(&args)
            .await
            .map_err(|e| {
                Status::internal(format!(
                    "restore from the archive of cluster \"{source}\": {e:#}"
                ))
            })?;
        tracing::info!(backup = %restored.backup_id, why = %restored.why, "backup restored into PGDATA");
        if !cluster["spec"]["walStorage"].is_null() {
            link_pg_wal(&pgdata, &config.pg_wal_dir).map_err(internal)?;
        }
        Ok(Response::new(wal::RestoreResponse {
            restore_config: format!(
                "recovery_target_action = 'promote'\nrestore_command = '{CNPG_RESTORE_COMMAND}'\n"
            ),
            envs: Vec::new(),
        }))
    }
}
