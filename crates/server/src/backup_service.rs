//! The base-backup service (`klio.backup.v1.Backup`): backup sessions that upload only the
//! blocks the repository lacks, the catalog, block reads for restores, and verification.
//!
//! A session owns a small pool of [`PackWriter`]s (one per concurrent `PutBlocks` call, so
//! parallel uploads do not serialize on one pack) and a spool file of the file entries the
//! client adds as it goes (`AddFiles`), so that neither side holds the block ids of a whole
//! database in memory. `Commit` finishes every writer (packs and their indexes become
//! durable), reads the spool back a bounded batch at a time and stores its blocklists, then
//! the manifest: a backup is in the catalog exactly when its manifest exists. A session that
//! is abandoned (client killed, server killed) leaves at worst packs that no manifest
//! references.
//!
//! Every cluster works in its own dedup domain (unless the server puts it in a shared one):
//! `Missing`, `PutBlocks`, `Commit`, `GetBlocks` and `GetBlocklist` see only the blocks of
//! the caller's domains, so no cluster learns anything about another's data.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use klio_proto::backup::v1::{self as pb, backup_server::Backup};
use klio_proto::limits::MAX_RUN_BLOCKS;
use klio_proto::manifest_rules;
use klio_repository::{
    BackupId, BlockId, BlockPayload, BlocklistId, Domain, FileEntry, FileKind, MAX_BLOCK_SIZE,
    Manifest, PackId, PackStats, PackWriter, ProblemKind, Repository,
};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::Context;

/// A session nobody used for this long is dropped with its unfinished packs.
pub const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A retention run collects garbage when something may have become garbage since the last
/// collection (a backup expired or deleted, a session or a relay that stopped half-way, a
/// server start), and at least this often otherwise: blocks a client uploaded but never
/// named, and temporary files of failed writes, are found only by a collection.
pub const GC_MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Most block ids one `Missing` or `GetBlocks` call may name.
pub const MAX_IDS_PER_CALL: usize = 65_536;
// The block size clients are told (`Begin`) and check manifests against is the one the
// repository enforces.
const _: () = assert!(klio_proto::limits::MAX_BLOCK_SIZE == MAX_BLOCK_SIZE);

/// Largest gRPC message of this service.
pub const MAX_BACKUP_MESSAGE: usize = klio_proto::limits::MAX_BACKUP_MESSAGE;
/// Block ids per blocklist the server writes: 1 GiB of 8 KiB pages, one default relation
/// segment file, so an unchanged segment costs one blocklist reference in a new manifest.
pub const BLOCKLIST_LEN: usize = klio_proto::limits::MAX_PIECE_IDS;
/// Block ids a client puts in one `AddFiles` piece at most (what it holds in memory per
/// reading thread); a multiple of [`BLOCKLIST_LEN`] so pieces cut blocklists the same way.
pub const MAX_PIECE_IDS: usize = BLOCKLIST_LEN;
/// File entries (pieces included) one backup may add: what the server holds per file at
/// commit is small, but not nothing.
pub const MAX_FILE_ENTRIES: u64 = 10_000_000;
/// Files per `GetManifest` message.
const MANIFEST_FILES_PER_MESSAGE: usize = 4096;
/// Block ids of the spool read at once by `Commit` (32 MiB).
const COMMIT_BATCH_IDS: usize = 1 << 20;
/// Ids a session lists as protected from garbage collection before it pins the whole
/// repository instead (collections wait for it), so that its memory stays bounded.
const MAX_PROTECTED_IDS: usize = 1 << 18;

/// Settings of the base-backup service: dedup domains and per-cluster capacity limits.
#[derive(Clone, Debug)]
pub struct BackupSettings {
    /// Cluster → name of the shared dedup domain it is in (an explicit opt-in; every other
    /// cluster has its own domain).
    pub shared_domains: BTreeMap<String, String>,
    /// Backup sessions one cluster may have open at once (`--max-backup-sessions`).
    pub max_sessions_per_cluster: usize,
    /// Bytes one cluster may have uploaded in sessions not yet committed
    /// (`--max-uncommitted-bytes`).
    pub max_uncommitted_bytes_per_cluster: u64,
    /// Where sessions spool their file entries (on the data volume).
    pub spool_dir: Option<PathBuf>,
}

impl Default for BackupSettings {
    fn default() -> BackupSettings {
        BackupSettings {
            shared_domains: BTreeMap::new(),
            max_sessions_per_cluster: 2,
            max_uncommitted_bytes_per_cluster: 4 << 40,
            spool_dir: None,
        }
    }
}

impl BackupSettings {
    /// The dedup domain of a cluster's new backups.
    pub fn domain_of(&self, cluster: &str) -> Result<Domain, klio_repository::Error> {
        match self.shared_domains.get(cluster) {
            Some(shared) => Domain::shared(shared),
            None => Domain::cluster(cluster),
        }
    }
}

/// The file entries a session was given, spooled to disk: `u32` length (big-endian) then
/// the protobuf `FileEntry`, one after the other. Removed with the session.
struct Spool {
    path: PathBuf,
    out: Option<BufWriter<std::fs::File>>,
    /// Entries written so far.
    entries: u64,
}

impl Spool {
    fn create(dir: &Path, session_id: &str) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{session_id}.files"));
        let file = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new().write(true).create_new(true),
            0o600,
        )
        .open(&path)?;
        Ok(Spool {
            path,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            entries: 0,
        })
    }

    fn append(&mut self, entries: &[pb::FileEntry]) -> std::io::Result<()> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the spool is closed"))?;
        for e in entries {
            let bytes = e.encode_to_vec();
            out.write_all(&(bytes.len() as u32).to_be_bytes())?;
            out.write_all(&bytes)?;
        }
        self.entries += entries.len() as u64;
        Ok(())
    }

    /// Flushes and reopens the spool for reading.
    fn reader(&mut self) -> std::io::Result<SpoolReader> {
        if let Some(out) = self.out.take() {
            out.into_inner().map_err(|e| e.into_error())?;
        }
        Ok(SpoolReader {
            input: std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&self.path)?),
        })
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct SpoolReader {
    input: std::io::BufReader<std::fs::File>,
}

impl SpoolReader {
    fn next_entry(&mut self) -> Result<Option<pb::FileEntry>, Status> {
        let mut len = [0u8; 4];
        match self.input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(Status::internal(format!("read the session spool: {e}"))),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_BACKUP_MESSAGE {
            return Err(Status::internal("the session spool is damaged"));
        }
        let mut buf = vec![0u8; len];
        self.input
            .read_exact(&mut buf)
            .map_err(|e| Status::internal(format!("read the session spool: {e}")))?;
        pb::FileEntry::decode(buf.as_slice())
            .map(Some)
            .map_err(|e| Status::internal(format!("the session spool is damaged: {e}")))
    }
}

struct Session {
    cluster: String,
    backup_id: BackupId,
    /// The repository in the cluster's dedup domain.
    repo: Repository,
    /// File entries added so far.
    spool: Mutex<Spool>,
    /// Bytes uploaded (as sent) in this session.
    uploaded: AtomicU64,
    /// Set when the protected set outgrew [`MAX_PROTECTED_IDS`]: garbage collection of the
    /// repository waits for this session.
    pins_repository: AtomicBool,
    /// Idle writers; a `PutBlocks` call takes one (or makes one) and puts it back.
    writers: Mutex<Vec<PackWriter>>,
    /// One permit per pack writer a call may use at once: each writer fills a pack in
    /// memory, so they bound the session's memory (and more than the cores buys nothing).
    writer_slots: tokio::sync::Semaphore,
    last_used: Mutex<Instant>,
    /// Blocks this backup relies on before its manifest exists: those `Missing` reported
    /// stored and those uploaded. Garbage collection keeps them.
    protected: Mutex<HashSet<BlockId>>,
    /// Copy the backup to Tier 2 once committed.
    tier2: bool,
    /// Its manifest is written.
    committed: AtomicBool,
}

impl Session {
    fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.committed.load(Ordering::Relaxed) && self.uploaded.load(Ordering::Relaxed) > 0 {
            // Aborted, idle too long or failed: what it uploaded is named by no manifest.
            self.repo.note_garbage();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The gRPC base-backup service over the Tier 1 repository (Tier 2's on a read-only
/// server), with Tier 2 behind it when configured.
#[derive(Clone)]
pub struct BackupService {
    repo: Repository,
    ctx: Context,
    sessions: Arc<Mutex<HashMap<String, Arc<Session>>>>,
    /// Held shared by every call that reports, stores or commits blocks, and exclusively by
    /// garbage collection: a block reported stored cannot be collected before the session
    /// that relies on it has recorded it in its protected set.
    gc_lock: Arc<tokio::sync::RwLock<()>>,
    settings: Arc<BackupSettings>,
    /// (cluster, domain) pairs known to be readable by the cluster: the domains of its
    /// manifests.
    readable_domains: Arc<Mutex<HashSet<(String, Domain)>>>,
}

use klio_repository::is_disk_full;

fn disk_full_status(what: &str, e: &dyn std::fmt::Display) -> Status {
    Status::resource_exhausted(format!(
        "the server's data volume is full: could not {what}: {e}\nHINT: free space on the Klio server's volume (or enlarge it); nothing acknowledged was lost, start the backup again"
    ))
}

fn repo_status(e: klio_repository::Error) -> Status {
    use klio_repository::Error as E;
    if e.is_disk_full() {
        return disk_full_status("store backup data", &e);
    }
    match e {
        E::ForeignBlock { .. } | E::InvalidDomain(_) => Status::permission_denied(e.to_string()),
        E::ReadTooLarge { .. } => Status::resource_exhausted(e.to_string()),
        E::BackupNotFound { .. } => Status::not_found(e.to_string()),
        E::BlockIdMismatch { .. }
        | E::BlockTooLarge { .. }
        | E::InvalidRun(_)
        | E::InvalidManifest { .. }
        | E::InvalidBackupId(_)
        | E::InvalidKey { .. } => Status::invalid_argument(e.to_string()),
        E::UnstoredBlock { .. } | E::BackupExists { .. } => {
            Status::failed_precondition(e.to_string())
        }
        E::BlockCorrupt { .. } | E::PackMissing { .. } | E::BlockNotFound { .. } => {
            Status::data_loss(e.to_string())
        }
        other => Status::internal(other.to_string()),
    }
}

fn join_error(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("a server task failed: {e}"))
}

fn parse_ids(bytes: &[u8]) -> Result<Vec<BlockId>, Status> {
    if !bytes.len().is_multiple_of(32) {
        return Err(Status::invalid_argument(
            "block ids must be a multiple of 32 bytes",
        ));
    }
    if bytes.len() / 32 > MAX_IDS_PER_CALL {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_IDS_PER_CALL} block ids per call"
        )));
    }
    Ok(BlockId::list_from_bytes(bytes))
}

fn parse_backup_id(s: &str) -> Result<BackupId, Status> {
    BackupId::new(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The id for a backup starting now: the UTC time to the second, moved forward past ids
/// that are taken.
fn new_backup_id(taken: impl Fn(&BackupId) -> bool) -> Result<BackupId, Status> {
    let mut t = time::OffsetDateTime::now_utc();
    for _ in 0..3600 {
        let id = BackupId::from_parts(
            t.year() as u32,
            u32::from(u8::from(t.month())),
            u32::from(t.day()),
            u32::from(t.hour()),
            u32::from(t.minute()),
            u32::from(t.second()),
        )
        .map_err(|e| Status::internal(e.to_string()))?;
        if !taken(&id) {
            return Ok(id);
        }
        t += time::Duration::seconds(1);
    }
    Err(Status::resource_exhausted(
        "no free backup id in the next hour",
    ))
}

impl BackupService {
    /// The service over `repo` (Tier 1's; Tier 2's on a read-only server), whose garbage
    /// collection `gc_lock` serializes.
    pub fn new(
        repo: Repository,
        gc_lock: Arc<tokio::sync::RwLock<()>>,
        ctx: Context,
        settings: BackupSettings,
    ) -> BackupService {
        if let Some(dir) = &settings.spool_dir {
            // Spools of sessions a previous process left behind.
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        BackupService {
            repo,
            ctx,
            sessions: Arc::default(),
            gc_lock,
            settings: Arc::new(settings),
            readable_domains: Arc::default(),
        }
    }

    /// Refuses a new session of `cluster` once it has `--max-backup-sessions` open.
    fn check_session_limit(
        &self,
        sessions: &HashMap<String, Arc<Session>>,
        cluster: &str,
    ) -> Result<(), Status> {
        let limit = self.settings.max_sessions_per_cluster;
        let open = sessions.values().filter(|s| s.cluster == cluster).count();
        if open >= limit {
            return Err(Status::resource_exhausted(format!(
                "cluster \"{cluster}\" already has {open} backup sessions open, the limit (max-backup-sessions, --max-backup-sessions) is {limit}\nHINT: wait for the running backups to finish, or abort them"
            )));
        }
        Ok(())
    }

    /// `repo` in dedup domain `requested` (empty: the cluster's own), if `cluster` may read
    /// it: its own domain, or the domain of one of its backups.
    async fn readable(
        &self,
        repo: &Repository,
        cluster: &str,
        requested: &str,
    ) -> Result<Repository, Status> {
        let own = self
            .settings
            .domain_of(cluster)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let domain = if requested.is_empty() {
            own.clone()
        } else {
            Domain::parse(requested).map_err(|e| Status::invalid_argument(e.to_string()))?
        };
        let known = domain == own
            || lock(&self.readable_domains).contains(&(cluster.to_string(), domain.clone()));
        if !known {
            // The domains of the cluster's backups (a backup taken before the cluster
            // joined a shared domain, or before domains existed).
            let (r, c) = (repo.clone(), cluster.to_string());
            let domains = tokio::task::spawn_blocking(move || -> Result<Vec<Domain>, Status> {
                let mut out = Vec::new();
                for id in r.list_manifests(&c).map_err(repo_status)? {
                    if let Ok(m) = r.get_manifest(&c, &id) {
                        out.push(m.domain);
                    }
                }
                Ok(out)
            })
            .await
            .map_err(join_error)??;
            let mut readable = lock(&self.readable_domains);
            for d in domains {
                readable.insert((cluster.to_string(), d));
            }
            if !readable.contains(&(cluster.to_string(), domain.clone())) {
                return Err(Status::permission_denied(format!(
                    "cluster \"{cluster}\" has no backup in dedup domain \"{domain}\""
                )));
            }
        }
        repo.in_domain(&domain).map_err(repo_status)
    }

    /// The repository of `tier` (0 and 1: Tier 1; 2: Tier 2), its garbage-collection lock,
    /// and whether it is the one backup sessions write to. A read-only server has only
    /// Tier 2 and answers every tier with it.
    pub(crate) async fn tier_repo(
        &self,
        tier: u32,
    ) -> Result<(Repository, Arc<tokio::sync::RwLock<()>>, bool), Status> {
        match tier {
            _ if self.ctx.read_only => Ok((self.repo.clone(), self.gc_lock.clone(), true)),
            0 | 1 => Ok((self.repo.clone(), self.gc_lock.clone(), true)),
            2 => {
                let t2 = self.ctx.tier2().await?;
                Ok((t2.repo.clone(), t2.gc_lock.clone(), false))
            }
            other => Err(Status::invalid_argument(format!(
                "tier {other} does not exist: tiers are 1 (local volume) and 2 (object storage)"
            ))),
        }
    }

    /// Tier 1's garbage-collection lock (the Tier 2 relay reads Tier 1 blocks under it).
    pub(crate) fn gc_lock(&self) -> Arc<tokio::sync::RwLock<()>> {
        self.gc_lock.clone()
    }

    /// The repository sessions write to.
    pub(crate) fn repo(&self) -> &Repository {
        &self.repo
    }

    /// Plans, and unless `dry_run` executes, a garbage collection of the repository of
    /// `tier`, with every running backup's blocks protected.
    pub async fn collect_garbage(
        &self,
        tier: u32,
        dry_run: bool,
    ) -> Result<pb::GcResponse, Status> {
        let result = self.collect_garbage_inner(tier, dry_run).await;
        if !dry_run {
            let t = if tier == 2 || self.ctx.read_only {
                2
            } else {
                1
            };
            let reclaimed = result.as_ref().ok().map(|r| r.bytes_reclaimed);
            self.ctx.metrics.gc_ran(t, reclaimed);
        }
        result
    }

    async fn collect_garbage_inner(
        &self,
        tier: u32,
        dry_run: bool,
    ) -> Result<pb::GcResponse, Status> {
        if !dry_run {
            self.ctx.writable("garbage collection")?;
        }
        let (repo, gc_lock, sessions_write_here) = self.tier_repo(tier).await?;
        // A plan only reads: backups and restores go on beside it; executing one excludes them.
        let _shared = if dry_run {
            Some(gc_lock.read().await)
        } else {
            None
        };
        let _exclusive = if dry_run {
            None
        } else {
            Some(gc_lock.write().await)
        };
        if sessions_write_here
            && !dry_run
            && let Some(s) = lock(&self.sessions)
                .values()
                .find(|s| s.pins_repository.load(Ordering::Relaxed))
        {
            return Err(Status::unavailable(format!(
                "garbage collection waits for backup {} of cluster \"{}\", which relies on more stored blocks than a session lists\nHINT: it runs again at the next retention run",
                s.backup_id, s.cluster
            )));
        }
        let protected: HashSet<BlockId> = if sessions_write_here {
            lock(&self.sessions)
                .values()
                .flat_map(|s| lock(&s.protected).iter().copied().collect::<Vec<_>>())
                .collect()
        } else {
            HashSet::new()
        };
        // Tier 1 only: temporary files of writes that failed without cleaning up.
        let sweep_dir = (tier == 1 && !dry_run)
            .then(|| self.ctx.data_dir.clone())
            .flatten();
        let response = tokio::task::spawn_blocking(move || -> Result<_, Status> {
            let plan = repo.gc_plan(&protected).map_err(repo_status)?;
            let mut r = pb::GcResponse {
                executed: !dry_run,
                live_blocks: plan.live_blocks as u64,
                dead_packs: plan.dead_packs.len() as u64,
                packs_rewritten: plan.repack.len() as u64,
                unindexed_packs: plan.unindexed_packs.len() as u64,
                dead_blocklists: plan.dead_blocklists.len() as u64,
                reclaimable_bytes: plan.reclaimable_bytes,
                bytes_reclaimed: 0,
                mixed_packs_kept: plan.mixed_packs as u64,
                temp_files_removed: 0,
                skipped: false,
            };
            if let Some(dir) = sweep_dir {
                // No write takes an hour: older temporary files belong to no writer.
                match klio_durable::sweep_stale_temp_files(&dir, Duration::from_secs(3600)) {
                    Ok(n) => r.temp_files_removed = n,
                    Err(e) => tracing::warn!(error = %e, dir = %dir.display(), "could not sweep temporary files"),
                }
            }
            if !dry_run {
                let report = repo.gc_execute(&plan).map_err(repo_status)?;
                r.bytes_reclaimed = report.bytes_reclaimed;
                tracing::info!(
                    tier,
                    packs_deleted = report.packs_deleted,
                    packs_rewritten = report.packs_rewritten,
                    blocks_moved = report.blocks_moved,
                    blocklists_deleted = report.blocklists_deleted,
                    bytes = report.bytes_reclaimed,
                    "garbage collected"
                );
            }
            Ok(r)
        })
        .await
        .map_err(join_error)??;
        Ok(response)
    }

    /// One cluster's state for `klio status` (facts only: the client judges them).
    async fn cluster_status_json(&self, cluster: &str) -> Result<serde_json::Value, Status> {
        use serde_json::json;
        let now = std::time::SystemTime::now();
        let metrics = self.ctx.metrics.clone();
        let snap = metrics.snapshot();
        let seconds = |t: Option<std::time::SystemTime>| t.map(crate::metrics::unix_seconds);

        // The archive: the stream's live state, else what the store says.
        let store_end = match &self.ctx.wal {
            Some(wal) => {
                let cw = wal.cluster(cluster).map_err(crate::status::store_status)?;
                tokio::task::spawn_blocking(move || cw.status().ok())
                    .await
                    .map_err(join_error)?
                    .and_then(|s| s.latest)
            }
            None => None,
        };
        let ws = metrics.wal_state(cluster);
        let wal = json!({
            "stream_connected": ws.connected,
            "synchronous": ws.synchronous,
            "timeline": store_end.map(|(tli, _)| tli.0),
            "archive_end_lsn": store_end.map(|(_, end)| end.to_string()),
            "primary_lsn": (ws.primary.0 > 0).then(|| ws.primary.to_string()),
            "lag_bytes": ws.lag_bytes(),
            "lag_seconds": ws.lag_seconds(now),
            "last_archived_at": seconds(ws.last_archived),
            "archive_complete_at": seconds(ws.complete_at),
        });

        // Backups per tier, read now (metadata cached).
        let tier1 = (!self.ctx.read_only).then(|| self.repo.clone());
        let uses_tier2 = self.ctx.read_only || self.ctx.uses_tier2(cluster);
        let tier2 = if uses_tier2 {
            match tokio::time::timeout(Duration::from_secs(10), self.ctx.tier2()).await {
                Ok(Ok(t2)) => Ok(Some(t2.repo.clone())),
                Ok(Err(e)) => Err(e.message().to_string()),
                Err(_) => Err("Tier 2 did not open within 10 s".to_string()),
            }
        } else {
            Ok(None)
        };
        let (m, c, t2repo) = (
            metrics.clone(),
            cluster.to_string(),
            tier2.clone().ok().flatten(),
        );
        let (b1, b2) = tokio::task::spawn_blocking(move || {
            (
                tier1.map(|r| m.tier_backups(1, &r, &c)),
                t2repo.map(|r| m.tier_backups(2, &r, &c)),
            )
        })
        .await
        .map_err(join_error)?;
        // A tier can restore from its oldest backup's end to the end of its WAL: Tier 1's
        // archive end (now while the stream keeps it complete); Tier 2 lags by the relay.
        let relay = metrics.relay_state(cluster);
        let tier1_to = if ws.connected && ws.lag_bytes() == 0 {
            Some(crate::metrics::unix_seconds(now))
        } else {
            seconds(ws.complete_at).or(seconds(ws.last_archived))
        };
        let window = |b: &Option<crate::metrics::TierBackups>, to: Option<f64>| {
            b.as_ref()
                .and_then(|b| b.first_recoverability_point)
                .map(|from| json!({"from": from, "to": to}))
        };
        let tier2_to = relay.as_ref().and_then(|r| {
            if r.pending_files == 0 && r.last_error.is_none() {
                tier1_to
            } else {
                seconds(r.complete_at)
            }
        });

        // The queue: dead letters of this cluster.
        let (pending, failed) = match &self.ctx.queue {
            Some(q) => {
                let failed = q
                    .list_failed()
                    .await
                    .map(|f| {
                        f.into_iter()
                            .filter(|f| f.task.cluster == cluster)
                            .map(|f| json!({"id": f.task.id, "kind": f.task.kind, "attempts": f.attempts, "last_error": f.last_error}))
                            .collect::<Vec<_>>()
                    })
                    .ok();
                (q.pending_count().await.ok(), failed)
            }
            None => (None, None),
        };
        let progress = self
            .ctx
            .progress
            .as_ref()
            .and_then(|p| p.all().ok())
            .and_then(|all| all.into_iter().find(|p| p.cluster == cluster));
        Ok(json!({
            "cluster": cluster,
            "server_time": crate::metrics::unix_seconds(now),
            "read_only": self.ctx.read_only,
            "wal": wal,
            "backups": {"tier1": b1, "tier2": b2},
            "recovery_window": {
                "tier1": window(&b1, tier1_to),
                "tier2": window(&b2, tier2_to),
            },
            "tier2": {
                "used": uses_tier2,
                "error": tier2.err(),
                "relay": relay.map(|r| json!({
                    "pending_files": r.pending_files,
                    "pending_bytes": r.pending_bytes,
                    "lag_seconds": r.lag_seconds(now),
                    "last_error": r.last_error,
                })),
                "progress": progress.map(|p| json!({
                    "wal_files_relayed": p.wal_files_relayed,
                    "last_wal_relayed": p.last_wal_relayed,
                    "backups_relayed": p.backups_relayed,
                    "last_backup_relayed": p.last_backup_relayed,
                    "updated_at": p.updated_at,
                    "last_error": p.last_error,
                })),
            },
            "queue": {"pending_all_clusters": pending, "failed": failed},
            "disk": {
                "wal_bytes": snap.wal_bytes.get(cluster),
                "volume_size": snap.volume.map(|v| v.0),
                "volume_free": snap.volume.map(|v| v.1),
            },
        }))
    }

    /// Drops sessions idle for longer than [`SESSION_IDLE_TIMEOUT`]; run periodically.
    pub fn reap_idle_sessions(&self) {
        let mut sessions = lock(&self.sessions);
        sessions.retain(|id, s| {
            let keep = lock(&s.last_used).elapsed() < SESSION_IDLE_TIMEOUT;
            if !keep {
                tracing::warn!(session = %id, cluster = %s.cluster, backup = %s.backup_id, "dropping an idle backup session");
            }
            keep
        });
    }

    fn session<T>(&self, req: &Request<T>, id: &str) -> Result<Arc<Session>, Status> {
        let session = lock(&self.sessions).get(id).cloned().ok_or_else(|| {
            Status::not_found(format!(
                "backup session \"{id}\" does not exist (it was committed, aborted, idle for too long, or the server restarted)\nHINT: start the backup again"
            ))
        })?;
        let principal = klio_tls::principal_of(req)?;
        klio_tls::authorize_cluster(&principal, &session.cluster)?;
        session.touch();
        Ok(session)
    }

    fn authorize<T>(req: &Request<T>, cluster: &str) -> Result<(), Status> {
        let principal = klio_tls::principal_of(req)?;
        klio_tls::authorize_cluster(&principal, cluster)
    }

    fn authorize_read<T>(req: &Request<T>, cluster: &str) -> Result<(), Status> {
        let principal = klio_tls::principal_of(req)?;
        klio_tls::authorize_catalog_read(&principal, cluster)
    }
}

/// A manifest that breaks one of the [`manifest_rules`], refused.
fn refused(backup: &str, v: &manifest_rules::Violation) -> Status {
    Status::invalid_argument(format!(
        "the manifest of {backup} {v}: refusing to commit it"
    ))
}

/// Checks one entry (or piece) a client sends against the [`manifest_rules`].
fn check_entry(backup: &str, f: &pb::FileEntry) -> Result<(), Status> {
    manifest_rules::check_entry(f)
        .map(|_| ())
        .map_err(|v| refused(backup, &v))
}

/// Checks the tablespaces of a backup's metadata: well formed, each location absolute and
/// normalized (or in place).
fn check_tablespaces(backup: &str, metadata: &serde_json::Value) -> Result<(), Status> {
    let spcs = manifest_rules::tablespaces(metadata).map_err(|v| refused(backup, &v))?;
    for t in &spcs {
        manifest_rules::check_tablespace_location(t.oid, &t.location)
            .map_err(|v| refused(backup, &v))?;
    }
    Ok(())
}

/// "backup X of cluster \"c\"", as messages name a session's backup.
fn backup_label(session: &Session) -> String {
    format!(
        "backup {} of cluster \"{}\"",
        session.backup_id, session.cluster
    )
}

/// A file entry as the manifest will hold it, being assembled from its pieces.
struct PartialFile {
    entry: FileEntry,
    /// Blocks received so far (the index the next piece must start at).
    next_block: u64,
    /// Blocks the file has in all.
    blocks: u64,
    /// The ids of a small file that came whole in its first piece: listed in the manifest
    /// itself ([`FileKind::Listed`]) unless another piece follows.
    held: Vec<BlockId>,
}

/// The most blocks of a file the manifest lists itself instead of a blocklist object: a
/// PostgreSQL catalog, free space map or visibility map file is usually smaller than that,
/// and each blocklist costs a durable write on Tier 1 and a request on Tier 2.
const LISTED_BLOCKS: u64 = 16;

/// Builds a manifest's files from `AddFiles` pieces (any order between files, in order
/// within a file), storing blocklists a bounded batch at a time. Every entry is checked
/// against the [`manifest_rules`] as it comes, and how the entries nest when the last has
/// come.
struct ManifestBuilder<'r> {
    repo: &'r Repository,
    /// "backup X of cluster \"c\"", for messages.
    backup: String,
    files: BTreeMap<String, PartialFile>,
    /// (path, ids) of pieces whose blocklists are still to be stored, in arrival order.
    batch: Vec<(String, Vec<BlockId>)>,
    batch_ids: usize,
}

impl<'r> ManifestBuilder<'r> {
    fn new(repo: &'r Repository, backup: String) -> ManifestBuilder<'r> {
        ManifestBuilder {
            repo,
            backup,
            files: BTreeMap::new(),
            batch: Vec::new(),
            batch_ids: 0,
        }
    }

    fn add(&mut self, mut f: pb::FileEntry) -> Result<(), Status> {
        check_entry(&self.backup, &f)?;
        f.mode = manifest_rules::permission_bits(f.mode);
        let bad = |reason: &str| {
            Status::invalid_argument(format!("file \"{}\" in the manifest: {reason}", f.path))
        };
        if !f.block_ids.len().is_multiple_of(32) {
            return Err(bad("block ids must be a multiple of 32 bytes"));
        }
        let ids = BlockId::list_from_bytes(&f.block_ids);
        let kind = match pb::file_entry::Kind::try_from(f.kind) {
            Ok(pb::file_entry::Kind::Directory) => FileKind::Directory,
            Ok(pb::file_entry::Kind::Symlink) => FileKind::Symlink {
                target: f.target.clone(),
            },
            Ok(pb::file_entry::Kind::File) if f.block_size == 0 => {
                if ids.len() != 1 || f.first_block != 0 {
                    return Err(bad("a file stored whole has exactly one block"));
                }
                FileKind::Whole { block: ids[0] }
            }
            Ok(pb::file_entry::Kind::File) => {
                if f.block_size as usize > MAX_BLOCK_SIZE {
                    return Err(bad("block size too large"));
                }
                let blocks = f.size.div_ceil(u64::from(f.block_size));
                let partial = match self.files.get_mut(&f.path) {
                    Some(p) => p,
                    None if f.first_block == 0 => {
                        self.files.insert(
                            f.path.clone(),
                            PartialFile {
                                entry: FileEntry {
                                    path: f.path.clone(),
                                    size: f.size,
                                    mode: f.mode,
                                    mtime: f.mtime,
                                    kind: FileKind::Blocks {
                                        block_size: f.block_size,
                                        blocklists: Vec::new(),
                                    },
                                },
                                next_block: 0,
                                blocks,
                                held: Vec::new(),
                            },
                        );
                        self.files
                            .get_mut(&f.path)
                            .ok_or_else(|| Status::internal("file entry vanished"))?
                    }
                    None => return Err(bad("a piece arrived before the file's first piece")),
                };
                // A file read while it grows: each piece says the size read so far.
                let same_file = matches!(
                    partial.entry.kind,
                    FileKind::Blocks { block_size, .. } if block_size == f.block_size
                ) && partial.entry.size <= f.size;
                if !same_file || partial.next_block != f.first_block {
                    return Err(bad(&format!(
                        "a piece starting at block {} does not continue the file (next block {})",
                        f.first_block, partial.next_block
                    )));
                }
                partial.entry.size = f.size;
                partial.blocks = blocks;
                if partial.next_block + ids.len() as u64 > partial.blocks {
                    return Err(bad("the number of blocks does not match the size"));
                }
                partial.next_block += ids.len() as u64;
                if !partial.held.is_empty() {
                    // The file grew after a first piece that held it whole.
                    let held = std::mem::take(&mut partial.held);
                    self.batch_ids += held.len();
                    self.batch.push((f.path.clone(), held));
                }
                if f.first_block == 0
                    && partial.next_block == partial.blocks
                    && partial.blocks <= LISTED_BLOCKS
                {
                    partial.held = ids;
                } else if !ids.is_empty() {
                    self.batch_ids += ids.len();
                    self.batch.push((f.path.clone(), ids));
                    if self.batch_ids >= COMMIT_BATCH_IDS {
                        self.store_batch()?;
                    }
                }
                return Ok(());
            }
            _ => return Err(bad("unknown kind")),
        };
        let entry = FileEntry {
            path: f.path.clone(),
            size: f.size,
            mode: f.mode,
            mtime: f.mtime,
            kind,
        };
        let previous = self.files.insert(
            f.path.clone(),
            PartialFile {
                entry,
                next_block: 0,
                blocks: 0,
                held: Vec::new(),
            },
        );
        if previous.is_some() {
            return Err(bad("it appears twice"));
        }
        Ok(())
    }

    /// Stores the blocklists of the pieces gathered so far and appends them to their files.
    fn store_batch(&mut self) -> Result<(), Status> {
        let pieces = std::mem::take(&mut self.batch);
        self.batch_ids = 0;
        let lists = put_blocklists(self.repo, &pieces)?;
        for ((path, _), lists) in pieces.iter().zip(lists) {
            if let Some(PartialFile {
                entry:
                    FileEntry {
                        kind: FileKind::Blocks { blocklists, .. },
                        ..
                    },
                ..
            }) = self.files.get_mut(path)
            {
                blocklists.extend(lists);
            }
        }
        Ok(())
    }

    /// The manifest's files, in path order; refused if a file lacks blocks, or if an entry
    /// lies under a file or a symbolic link other than a tablespace link.
    fn finish(mut self) -> Result<Vec<FileEntry>, Status> {
        let kind_of = |path: &str| {
            self.files.get(path).map(|p| match p.entry.kind {
                FileKind::Directory => manifest_rules::Kind::Directory,
                FileKind::Symlink { .. } => manifest_rules::Kind::Symlink,
                FileKind::Blocks { .. } | FileKind::Listed { .. } | FileKind::Whole { .. } => {
                    manifest_rules::Kind::File
                }
            })
        };
        for path in self.files.keys() {
            manifest_rules::check_ancestors(path, kind_of)
                .map_err(|v| refused(&self.backup, &v))?;
        }
        self.store_batch()?;
        let mut out = Vec::with_capacity(self.files.len());
        for (path, mut p) in self.files {
            if p.next_block != p.blocks {
                return Err(Status::invalid_argument(format!(
                    "file \"{path}\" in the manifest: {} of its {} blocks were sent",
                    p.next_block, p.blocks
                )));
            }
            if let FileKind::Blocks { block_size, .. } = p.entry.kind
                && !p.held.is_empty()
            {
                p.entry.kind = FileKind::Listed {
                    block_size,
                    blocks: p.held,
                };
            }
            out.push(p.entry);
        }
        Ok(out)
    }
}

/// Stores the blocklists of many file pieces with several threads: each is a small durable
/// write (fsync of file and directory), and concurrent fsyncs share the file system's
/// journal commits instead of waiting for one each.
fn put_blocklists(
    repo: &Repository,
    pieces: &[(String, Vec<BlockId>)],
) -> Result<Vec<Vec<BlocklistId>>, Status> {
    const THREADS: usize = 8;
    let next = std::sync::atomic::AtomicUsize::new(0);
    type Slot = Mutex<Option<Result<Vec<BlocklistId>, Status>>>;
    let results: Vec<Slot> = pieces.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..THREADS.min(pieces.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((_, ids)) = pieces.get(i) else { break };
                    let r = ids
                        .chunks(BLOCKLIST_LEN)
                        .map(|chunk| repo.put_blocklist(chunk).map_err(repo_status))
                        .collect::<Result<Vec<_>, _>>();
                    *lock(&results[i]) = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .unwrap_or_else(|| Err(Status::internal("a blocklist was not stored")))
        })
        .collect()
}

/// A manifest entry as sent to a restore: a file cut into blocks names its blocklists.
fn file_to_pb(f: &FileEntry) -> pb::FileEntry {
    let mut e = pb::FileEntry {
        path: f.path.clone(),
        size: f.size,
        mode: f.mode,
        mtime: f.mtime,
        ..Default::default()
    };
    match &f.kind {
        FileKind::Directory => e.kind = pb::file_entry::Kind::Directory as i32,
        FileKind::Symlink { target } => {
            e.kind = pb::file_entry::Kind::Symlink as i32;
            e.target = target.clone();
        }
        FileKind::Whole { block } => {
            e.kind = pb::file_entry::Kind::File as i32;
            e.block_ids = block.to_wire().to_vec().into();
        }
        FileKind::Blocks {
            block_size,
            blocklists,
        } => {
            e.kind = pb::file_entry::Kind::File as i32;
            e.block_size = *block_size;
            e.blocklists = blocklists.iter().map(|l| l.0.to_vec().into()).collect();
        }
        FileKind::Listed { block_size, blocks } => {
            e.kind = pb::file_entry::Kind::File as i32;
            e.block_size = *block_size;
            e.block_ids = blocks.iter().flat_map(|b| b.to_wire()).collect();
        }
    }
    e
}

/// Pack writers a backup session uses at once: the cores, at most 4 (each holds a pack of
/// up to the pack target size in memory).
fn writers_per_session() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4))
}

fn finish_all(writers: Vec<PackWriter>) -> Result<PackStats, klio_repository::Error> {
    let mut total = PackStats::default();
    let finished: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = writers
            .into_iter()
            .map(|w| s.spawn(|| w.finish()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    for s in finished {
        let s = s?;
        total.blocks_added += s.blocks_added;
        total.blocks_deduplicated += s.blocks_deduplicated;
        total.plain_bytes_added += s.plain_bytes_added;
        total.packs_written += s.packs_written;
        total.pack_bytes += s.pack_bytes;
        total.index_bytes += s.index_bytes;
    }
    Ok(total)
}

#[tonic::async_trait]
impl Backup for BackupService {
    async fn begin(
        &self,
        request: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        self.ctx.writable("backups")?;
        let cluster = request.get_ref().cluster.clone();
        Self::authorize(&request, &cluster)?;
        klio_repository::validate_cluster_name(&cluster)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let domain = self
            .settings
            .domain_of(&cluster)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Checked before any work, and again when the session is added.
        self.check_session_limit(&lock(&self.sessions), &cluster)?;
        let tier2 = request.get_ref().tier2_backup;
        self.ctx.declare_tier2_backup(&cluster, tier2, false)?;
        let repo = self.repo.clone();
        let c = cluster.clone();
        let (existing, repo) = tokio::task::spawn_blocking(move || -> Result<_, Status> {
            let existing = repo.list_manifests(&c).map_err(repo_status)?;
            Ok((existing, repo.in_domain(&domain).map_err(repo_status)?))
        })
        .await
        .map_err(join_error)??;
        let session_id = hex::encode(klio_crypto::random_bytes::<16>());
        let spool_dir = self
            .settings
            .spool_dir
            .clone()
            .ok_or_else(|| Status::failed_precondition("this server takes no backups"))?;
        let spool = Spool::create(&spool_dir, &session_id).map_err(|e| {
            if is_disk_full(&e) {
                disk_full_status("create the session spool", &e)
            } else {
                Status::internal(format!(
                    "create the session spool in \"{}\": {e}",
                    spool_dir.display()
                ))
            }
        })?;
        let mut sessions = lock(&self.sessions);
        self.check_session_limit(&sessions, &cluster)?;
        let backup_id = new_backup_id(|id| {
            existing.contains(id)
                || sessions
                    .values()
                    .any(|s| s.cluster == cluster && s.backup_id == *id)
        })?;
        let block_id_key = repo.block_id_key();
        sessions.insert(
            session_id.clone(),
            Arc::new(Session {
                cluster: cluster.clone(),
                backup_id: backup_id.clone(),
                repo,
                spool: Mutex::new(spool),
                uploaded: AtomicU64::new(0),
                pins_repository: AtomicBool::new(false),
                writers: Mutex::new(Vec::new()),
                writer_slots: tokio::sync::Semaphore::new(writers_per_session()),
                last_used: Mutex::new(Instant::now()),
                protected: Mutex::new(HashSet::new()),
                tier2,
                committed: AtomicBool::new(false),
            }),
        );
        tracing::info!(%cluster, backup = %backup_id, session = %session_id, tier2, "backup started");
        Ok(Response::new(pb::BeginResponse {
            session_id,
            backup_id: backup_id.to_string(),
            block_id_key: block_id_key.to_vec().into(),
            max_block_size: MAX_BLOCK_SIZE as u32,
            accepts_runs: true,
        }))
    }

    async fn missing(
        &self,
        request: Request<pb::MissingRequest>,
    ) -> Result<Response<pb::MissingResponse>, Status> {
        self.ctx.writable("backups")?;
        let session = self.session(&request, &request.get_ref().session_id)?;
        let ids = parse_ids(&request.get_ref().ids)?;
        let _shared = self.gc_lock.read().await;
        let s = session.clone();
        let stored = tokio::task::spawn_blocking(move || s.repo.has_blocks(&ids).map(|r| (ids, r)))
            .await
            .map_err(join_error)?
            .map_err(repo_status)?;
        let (ids, stored) = stored;
        let pending = lock(&session.writers);
        let mut protected = lock(&session.protected);
        let missing: Vec<u8> = ids
            .iter()
            .zip(stored)
            .map(|(id, in_repo)| {
                let stored = in_repo || pending.iter().any(|w| w.contains(id));
                if stored {
                    protect(&session, &mut protected, *id);
                }
                u8::from(!stored)
            })
            .collect();
        Ok(Response::new(pb::MissingResponse {
            missing: missing.into(),
        }))
    }

    async fn put_blocks(
        &self,
        request: Request<pb::PutBlocksRequest>,
    ) -> Result<Response<pb::PutBlocksResponse>, Status> {
        self.ctx.writable("backups")?;
        let session = self.session(&request, &request.get_ref().session_id)?;
        let blocks = request.into_inner().blocks;
        let bytes: u64 = blocks.iter().map(|b| b.data.len() as u64).sum();
        let limit = self.settings.max_uncommitted_bytes_per_cluster;
        let in_flight: u64 = lock(&self.sessions)
            .values()
            .filter(|s| s.cluster == session.cluster)
            .map(|s| s.uploaded.load(Ordering::Relaxed))
            .sum();
        if in_flight.saturating_add(bytes) > limit {
            return Err(Status::resource_exhausted(format!(
                "cluster \"{}\" has {in_flight} bytes uploaded in backups not committed yet; the limit (max-uncommitted-bytes, --max-uncommitted-bytes) is {limit}\nHINT: raise --max-uncommitted-bytes on the server, or run fewer backups of the cluster at once",
                session.cluster
            )));
        }
        session.uploaded.fetch_add(bytes, Ordering::Relaxed);
        // Calls beyond the writers wait here, before holding anything else.
        let _slot = session
            .writer_slots
            .acquire()
            .await
            .map_err(|_| Status::aborted("the backup session was closed"))?;
        let _shared = self.gc_lock.read().await;
        let mut writer = lock(&session.writers)
            .pop()
            .unwrap_or_else(|| session.repo.pack_writer());
        let s = session.clone();
        let (writer, result) = tokio::task::spawn_blocking(move || {
            let result = store_blocks(&mut writer, blocks);
            (writer, result)
        })
        .await
        .map_err(join_error)?;
        lock(&s.writers).push(writer);
        let (new, ids) = result?;
        // Only blocks that were checked and stored are protected.
        let mut protected = lock(&s.protected);
        for id in ids {
            protect(&s, &mut protected, id);
        }
        Ok(Response::new(pb::PutBlocksResponse { blocks_new: new }))
    }

    async fn add_files(
        &self,
        request: Request<pb::AddFilesRequest>,
    ) -> Result<Response<pb::AddFilesResponse>, Status> {
        self.ctx.writable("backups")?;
        let session = self.session(&request, &request.get_ref().session_id)?;
        let files = request.into_inner().files;
        let backup = backup_label(&session);
        for f in &files {
            if f.block_ids.len() / 32 > MAX_PIECE_IDS.max(1) {
                return Err(Status::invalid_argument(format!(
                    "file \"{}\": more than {MAX_PIECE_IDS} block ids in one piece",
                    f.path.escape_debug()
                )));
            }
            check_entry(&backup, f)?;
        }
        let count = lock(&session.spool).entries + files.len() as u64;
        if count > MAX_FILE_ENTRIES {
            return Err(Status::resource_exhausted(format!(
                "backup {} of cluster \"{}\" has more than {MAX_FILE_ENTRIES} file entries, the limit of one backup",
                session.backup_id, session.cluster
            )));
        }
        let s = session.clone();
        tokio::task::spawn_blocking(move || lock(&s.spool).append(&files))
            .await
            .map_err(join_error)?
            .map_err(|e| {
                if is_disk_full(&e) {
                    disk_full_status("spool the backup's file list", &e)
                } else {
                    Status::internal(format!("spool the backup's file list: {e}"))
                }
            })?;
        Ok(Response::new(pb::AddFilesResponse {}))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        self.ctx.writable("backups")?;
        let session_id = request.get_ref().session_id.clone();
        let session = self.session(&request, &session_id)?;
        let req = request.into_inner();
        let mut metadata: serde_json::Value = serde_json::from_slice(&req.metadata_json)
            .map_err(|e| Status::invalid_argument(format!("backup metadata: {e}")))?;
        if !metadata.is_object() {
            return Err(Status::invalid_argument(
                "backup metadata must be a JSON object",
            ));
        }
        let backup = backup_label(&session);
        check_tablespaces(&backup, &metadata)?;
        let _shared = self.gc_lock.read().await;
        // Nobody else uses the session from here on.
        lock(&self.sessions).remove(&session_id);
        let writers = std::mem::take(&mut *lock(&session.writers));
        let s = session.clone();
        let metadata = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, Status> {
            let repo = &s.repo;
            let t0 = Instant::now();
            let stats = finish_all(writers).map_err(repo_status)?;
            let t1 = Instant::now();
            let mut builder = ManifestBuilder::new(repo, backup);
            let mut reader = lock(&s.spool)
                .reader()
                .map_err(|e| Status::internal(format!("read the session spool: {e}")))?;
            while let Some(f) = reader.next_entry()? {
                builder.add(f)?;
            }
            for f in req.files {
                builder.add(f)?;
            }
            let files = builder.finish()?;
            tracing::info!(
                packs_ms = (t1 - t0).as_millis() as u64,
                blocklists_ms = t1.elapsed().as_millis() as u64,
                "backup data durable"
            );
            if let Some(obj) = metadata.as_object_mut() {
                obj.insert("cluster".into(), s.cluster.clone().into());
                obj.insert("backup_id".into(), s.backup_id.to_string().into());
                obj.insert("bytes_new".into(), stats.stored_bytes().into());
                obj.insert("blocks_new".into(), stats.blocks_added.into());
                obj.insert("plain_bytes_new".into(), stats.plain_bytes_added.into());
                obj.insert("packs_new".into(), stats.packs_written.into());
                obj.insert("dedup_domain".into(), repo.domain().to_string().into());
            }
            let manifest = Manifest {
                cluster: s.cluster.clone(),
                backup_id: s.backup_id.clone(),
                metadata: metadata.clone(),
                domain: repo.domain().clone(),
                files,
            };
            repo.put_manifest(&manifest).map_err(repo_status)?;
            s.committed.store(true, Ordering::Relaxed);
            Ok(metadata)
        })
        .await
        .map_err(join_error)??;
        tracing::info!(cluster = %session.cluster, backup = %session.backup_id, "backup committed");
        if session.tier2 {
            self.ctx
                .enqueue_backup_relay(&session.cluster, session.backup_id.as_str())
                .await;
        }
        let metadata_json = serde_json::to_vec(&metadata)
            .map_err(|e| Status::internal(e.to_string()))?
            .into();
        Ok(Response::new(pb::CommitResponse { metadata_json }))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        self.ctx.writable("backups")?;
        let session_id = request.get_ref().session_id.clone();
        let session = self.session(&request, &session_id)?;
        lock(&self.sessions).remove(&session_id);
        tracing::info!(cluster = %session.cluster, backup = %session.backup_id, "backup aborted");
        Ok(Response::new(pb::AbortResponse {}))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let cluster = request.get_ref().cluster.clone();
        Self::authorize_read(&request, &cluster)?;
        let with_tier2 = request.get_ref().tier2_recovery && !self.ctx.read_only;
        let mut sources = vec![(self.repo.clone(), !self.ctx.read_only)];
        if with_tier2 {
            sources.push((self.ctx.tier2().await?.repo.clone(), false));
        }
        // Read once per backup, shared with the metrics refresh.
        let cache = self.ctx.metrics.metadata_cache();
        let backups = tokio::task::spawn_blocking(move || -> Result<_, Status> {
            // By id: (metadata, in Tier 1, in Tier 2); Tier 1's metadata wins.
            let mut found: std::collections::BTreeMap<String, (serde_json::Value, bool, bool)> =
                std::collections::BTreeMap::new();
            for (repo, is_tier1) in sources {
                let tier = if is_tier1 { 1 } else { 2 };
                let ids = repo.list_manifests(&cluster).map_err(repo_status)?;
                cache.retain_listed(tier, &cluster, &ids);
                for id in ids {
                    let entry = found.entry(id.to_string()).or_insert_with(|| {
                        let metadata = match cache.get(tier, &repo, &cluster, &id) {
                            Ok(m) => m,
                            Err(e) => serde_json::json!({ "backup_id": id.to_string(), "error": e.to_string() }),
                        };
                        (metadata, false, false)
                    });
                    if is_tier1 {
                        entry.1 = true;
                    } else {
                        entry.2 = true;
                    }
                }
            }
            found
                .into_iter()
                .map(|(id, (metadata, in_tier1, in_tier2))| {
                    Ok(pb::BackupSummary {
                        backup_id: id,
                        metadata_json: serde_json::to_vec(&metadata)
                            .map_err(|e| Status::internal(e.to_string()))?
                            .into(),
                        in_tier1,
                        in_tier2,
                    })
                })
                .collect::<Result<Vec<_>, Status>>()
        })
        .await
        .map_err(join_error)??;
        Ok(Response::new(pb::ListResponse { backups }))
    }

    type GetManifestStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::GetManifestResponse, Status>> + Send>,
    >;

    async fn get_manifest(
        &self,
        request: Request<pb::GetManifestRequest>,
    ) -> Result<Response<Self::GetManifestStream>, Status> {
        let cluster = request.get_ref().cluster.clone();
        Self::authorize(&request, &cluster)?;
        if !request.get_ref().short_ids {
            return Err(Status::failed_precondition(
                "this server names blocks by 16-byte ids, which this client does not know: restore with a klio client of the same version as the server",
            ));
        }
        let backup_id = parse_backup_id(&request.get_ref().backup_id)?;
        let primary_tier = if self.ctx.read_only { 2 } else { 1 };
        let mut sources = vec![(self.repo.clone(), primary_tier)];
        if request.get_ref().tier2_recovery && !self.ctx.read_only {
            // Tier 2 is only needed when Tier 1 lacks the backup; an unreachable Tier 2
            // must not fail a restore Tier 1 can serve.
            match self.ctx.tier2().await {
                Ok(t2) => sources.push((t2.repo.clone(), 2)),
                Err(e) => {
                    tracing::warn!(error = %e.message(), "Tier 2 not available for a manifest lookup")
                }
            }
        }
        let c = cluster.clone();
        let (manifest, block_id_key, tier) =
            tokio::task::spawn_blocking(move || -> Result<_, Status> {
                let mut last = None;
                for (repo, tier) in sources {
                    match repo.get_manifest(&c, &backup_id) {
                        Ok(m) => {
                            let key = repo
                                .in_domain(&m.domain)
                                .map_err(repo_status)?
                                .block_id_key();
                            return Ok((m, key, tier));
                        }
                        Err(e @ klio_repository::Error::BackupNotFound { .. }) => last = Some(e),
                        Err(e) => return Err(repo_status(e)),
                    }
                }
                Err(repo_status(last.unwrap_or(
                    klio_repository::Error::BackupNotFound {
                        cluster: c.clone(),
                        backup_id: backup_id.clone(),
                    },
                )))
            })
            .await
            .map_err(join_error)??;
        lock(&self.readable_domains).insert((cluster, manifest.domain.clone()));
        let first = pb::GetManifestResponse {
            backup_id: request.get_ref().backup_id.clone(),
            metadata_json: serde_json::to_vec(&manifest.metadata)
                .map_err(|e| Status::internal(e.to_string()))?
                .into(),
            files: Vec::new(),
            block_id_key: block_id_key.to_vec().into(),
            tier,
            domain: manifest.domain.as_str().to_string(),
        };
        // Built lazily, one message at a time, as the client reads.
        let files = manifest.files;
        let rest = (0..files.len().div_ceil(MANIFEST_FILES_PER_MESSAGE)).map(move |i| {
            let end = ((i + 1) * MANIFEST_FILES_PER_MESSAGE).min(files.len());
            pb::GetManifestResponse {
                files: files[i * MANIFEST_FILES_PER_MESSAGE..end]
                    .iter()
                    .map(file_to_pb)
                    .collect(),
                ..Default::default()
            }
        });
        let stream = futures::stream::iter(std::iter::once(first).chain(rest).map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_blocklist(
        &self,
        request: Request<pb::GetBlocklistRequest>,
    ) -> Result<Response<pb::GetBlocklistResponse>, Status> {
        let cluster = request.get_ref().cluster.clone();
        Self::authorize(&request, &cluster)?;
        let id = <[u8; 32]>::try_from(request.get_ref().id.as_ref())
            .map(BlocklistId)
            .map_err(|_| Status::invalid_argument("a blocklist id has 32 bytes"))?;
        let (repo, _, _) = self.tier_repo(request.get_ref().tier).await?;
        let repo = self
            .readable(&repo, &cluster, &request.get_ref().domain)
            .await?;
        let ids = tokio::task::spawn_blocking(move || repo.get_blocklist(&id))
            .await
            .map_err(join_error)?
            .map_err(|e| match e {
                klio_repository::Error::BlocklistNotFound(_) => Status::not_found(e.to_string()),
                // A blocklist of another domain does not match its id under this one's key.
                klio_repository::Error::Corrupt { .. } => Status::data_loss(e.to_string()),
                other => repo_status(other),
            })?;
        let mut out = Vec::with_capacity(ids.len() * BlockId::WIRE_LEN);
        for id in ids {
            out.extend_from_slice(&id.to_wire());
        }
        Ok(Response::new(pb::GetBlocklistResponse { ids: out.into() }))
    }

    async fn get_blocks(
        &self,
        request: Request<pb::GetBlocksRequest>,
    ) -> Result<Response<pb::GetBlocksResponse>, Status> {
        let cluster = request.get_ref().cluster.clone();
        Self::authorize(&request, &cluster)?;
        let ids = parse_ids(&request.get_ref().ids)?;
        let runs = request.get_ref().runs;
        let (repo, gc_lock, _) = self.tier_repo(request.get_ref().tier).await?;
        let repo = self
            .readable(&repo, &cluster, &request.get_ref().domain)
            .await?;
        // A collection may move blocks between packs: it waits for reads in progress.
        let _shared = gc_lock.read().await;
        // Within the answer's size limit, less room for the framing of each block.
        let budget = (klio_proto::limits::MAX_BACKUP_MESSAGE - ids.len() * 64 - 4096) as u64;
        let payloads = tokio::task::spawn_blocking(move || {
            repo.read_block_payloads_within(&ids, budget, runs)
        })
        .await
        .map_err(join_error)?
        .map_err(repo_status)?;
        let blocks = blocks_answer(payloads, runs)?;
        Ok(Response::new(pb::GetBlocksResponse { blocks }))
    }

    async fn retention(
        &self,
        request: Request<pb::RetentionRequest>,
    ) -> Result<Response<pb::RetentionResponse>, Status> {
        let cluster = request.get_ref().cluster.clone();
        Self::authorize(&request, &cluster)?;
        klio_repository::validate_cluster_name(&cluster)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let dry_run = request.get_ref().dry_run;
        if !dry_run {
            self.ctx.writable("retention runs")?;
        }
        let tier = request.get_ref().tier.max(1);
        let p = request.get_ref().policy.unwrap_or_default();
        let overrides = klio_retention::PolicyOverrides {
            keep_latest: p.keep_latest,
            keep_hourly: p.keep_hourly,
            keep_daily: p.keep_daily,
            keep_weekly: p.keep_weekly,
            keep_monthly: p.keep_monthly,
            keep_annual: p.keep_annual,
        };
        if !dry_run && let Some(settings) = &self.ctx.settings {
            // Scheduled runs apply the policy of the last run.
            settings
                .update(&cluster, |s| {
                    if tier == 2 {
                        s.tier2_retention = Some(overrides);
                    } else {
                        s.tier1_retention = Some(overrides);
                    }
                })
                .map_err(|e| Status::internal(format!("{e:#}")))?;
        }
        let policy = klio_retention::Policy::merged(&overrides);
        Ok(Response::new(
            self.retention_run(cluster, policy, dry_run, tier).await?,
        ))
    }

    async fn gc(
        &self,
        request: Request<pb::GcRequest>,
    ) -> Result<Response<pb::GcResponse>, Status> {
        let principal = klio_tls::principal_of(&request)?;
        if !principal.is_admin() {
            return Err(Status::permission_denied(format!(
                "certificate \"{principal}\" may not run garbage collection: it spans every cluster's data\nHINT: use the administration certificate {}; a cluster's retention (klio retention run) collects garbage after expiring its backups",
                klio_tls::ADMIN_CN
            )));
        }
        let r = request.get_ref();
        Ok(Response::new(
            self.collect_garbage(r.tier.max(1), r.dry_run).await?,
        ))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let cluster = request.get_ref().cluster.clone();
        // Reads every block of the cluster: its own principal only, not the catalog reader.
        Self::authorize(&request, &cluster)?;
        let only = match request.get_ref().backup_id.as_str() {
            "" => None,
            id => Some(parse_backup_id(id)?),
        };
        let tier = request.get_ref().tier;
        let (repo, gc_lock, _) = self.tier_repo(tier).await?;
        // Tier 2 verification also reads every WAL object of the cluster.
        let tier2_wal = if tier == 2 || self.ctx.read_only {
            Some(self.ctx.tier2().await?)
        } else {
            None
        };
        let _shared = gc_lock.read().await;
        let response = tokio::task::spawn_blocking(move || -> Result<_, Status> {
            let ids = match only {
                Some(id) => vec![id],
                None => repo.list_manifests(&cluster).map_err(repo_status)?,
            };
            let mut response = pb::VerifyResponse::default();
            for id in ids {
                match repo.verify(&cluster, &id) {
                    Ok(report) => {
                        response.backups.push(pb::VerifiedBackup {
                            backup_id: id.to_string(),
                            files: report.files as u64,
                            blocks: report.blocks as u64,
                            bytes_verified: report.bytes_verified,
                        });
                        for p in report.problems {
                            response.problems.push(pb::Problem {
                                backup_id: id.to_string(),
                                kind: match p.kind {
                                    ProblemKind::Missing => "missing",
                                    ProblemKind::Corrupt => "corrupt",
                                }
                                .to_string(),
                                object: p.object,
                                detail: p.detail,
                            });
                        }
                    }
                    Err(klio_repository::Error::BackupNotFound { .. }) => {
                        return Err(Status::not_found(format!(
                            "cluster \"{cluster}\" has no backup \"{id}\""
                        )));
                    }
                    Err(e) => response.problems.push(pb::Problem {
                        backup_id: id.to_string(),
                        kind: "corrupt".to_string(),
                        object: format!("manifests/{cluster}/{id}"),
                        detail: e.to_string(),
                    }),
                }
            }
            if let Some(t2) = tier2_wal {
                let (ok, problems) = t2
                    .verify_wal(&cluster)
                    .map_err(|e| Status::unavailable(format!("{e:#}")))?;
                response.wal_files_verified = ok;
                for (object, detail) in problems {
                    response.problems.push(pb::Problem {
                        backup_id: String::new(),
                        kind: "corrupt".to_string(),
                        object,
                        detail,
                    });
                }
            }
            Ok(response)
        })
        .await
        .map_err(join_error)??;
        Ok(Response::new(response))
    }

    async fn queue_status(
        &self,
        request: Request<pb::QueueStatusRequest>,
    ) -> Result<Response<pb::QueueStatusResponse>, Status> {
        klio_tls::authorize_admin(&klio_tls::principal_of(&request)?)?;
        Ok(Response::new(self.ctx.queue_status().await?))
    }

    async fn queue_list_failed(
        &self,
        request: Request<pb::QueueListFailedRequest>,
    ) -> Result<Response<pb::QueueListFailedResponse>, Status> {
        klio_tls::authorize_admin(&klio_tls::principal_of(&request)?)?;
        let queue = self.ctx.queue()?;
        let tasks = queue
            .list_failed()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .into_iter()
            .map(|f| pb::FailedTask {
                id: f.task.id,
                kind: f.task.kind,
                cluster: f.task.cluster,
                attempts: f.attempts,
                last_error: f.last_error,
                failed_at: f
                    .failed_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::QueueListFailedResponse { tasks }))
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let cluster = request.get_ref().cluster.clone();
        // More than the catalog (stream state, relay and queue errors): the cluster's own
        // certificate only, not the snapshot reader.
        Self::authorize(&request, &cluster)?;
        klio_repository::validate_cluster_name(&cluster).map_err(repo_status)?;
        let status = self.cluster_status_json(&cluster).await?;
        Ok(Response::new(pb::ClusterStatusResponse {
            status_json: serde_json::to_vec(&status)
                .map_err(|e| Status::internal(e.to_string()))?
                .into(),
        }))
    }

    async fn list_clusters(
        &self,
        request: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        let principal = klio_tls::principal_of(&request)?;
        let with_tier2 = request.get_ref().tier2_recovery && !self.ctx.read_only;
        let mut repos = vec![self.repo.clone()];
        if with_tier2 {
            repos.push(self.ctx.tier2().await?.repo.clone());
        }
        let clusters = tokio::task::spawn_blocking(move || -> Result<_, Status> {
            let mut all = std::collections::BTreeSet::new();
            for repo in repos {
                all.extend(repo.list_clusters().map_err(repo_status)?);
            }
            Ok(all)
        })
        .await
        .map_err(join_error)??;
        let clusters = clusters
            .into_iter()
            .filter(|c| klio_tls::authorize_catalog_read(&principal, c).is_ok())
            .collect();
        Ok(Response::new(pb::ListClustersResponse { clusters }))
    }

    async fn queue_retry(
        &self,
        request: Request<pb::QueueRetryRequest>,
    ) -> Result<Response<pb::QueueRetryResponse>, Status> {
        klio_tls::authorize_admin(&klio_tls::principal_of(&request)?)?;
        self.ctx.writable("queue changes")?;
        let queue = self.ctx.queue()?;
        let mut ids = request.into_inner().ids;
        if ids.is_empty() {
            ids = queue
                .list_failed()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?
                .into_iter()
                .map(|f| f.task.id)
                .collect();
        }
        let mut response = pb::QueueRetryResponse::default();
        for id in ids {
            let found = queue
                .retry_failed(&id)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            if found {
                tracing::info!(task = %id, "failed task made pending again");
                response.retried.push(id);
            } else {
                response.unknown.push(id);
            }
        }
        Ok(Response::new(response))
    }
}

fn decision_to_pb(d: &klio_retention::Decision) -> pb::RetentionDecision {
    pb::RetentionDecision {
        backup_id: d.id.clone(),
        keep: d.keep,
        reasons: d.reasons.iter().map(|r| r.to_string()).collect(),
        time: d
            .time
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    }
}

impl BackupService {
    /// The retention RPC's work on `tier`: plan, then (unless a dry run) expire backups one
    /// manifest at a time, remove the WAL the oldest kept backup does not need, and collect
    /// garbage. In Tier 1, a backup of a cluster that uses Tier 2 is kept until Tier 2 has
    /// it, and WAL Tier 2 lacks is never removed.
    pub(crate) async fn retention_run(
        &self,
        cluster: String,
        policy: klio_retention::Policy,
        dry_run: bool,
        tier: u32,
    ) -> Result<pb::RetentionResponse, Status> {
        let c = cluster.clone();
        let result = self
            .retention_run_inner(cluster, policy, dry_run, tier)
            .await;
        if !dry_run {
            let tier = if tier == 2 || self.ctx.read_only {
                2
            } else {
                1
            };
            let expired = result.as_ref().ok().map(|r| r.deleted_backups.len() as u64);
            self.ctx.metrics.retention_ran(&c, tier, expired);
        }
        result
    }

    async fn retention_run_inner(
        &self,
        cluster: String,
        policy: klio_retention::Policy,
        dry_run: bool,
        tier: u32,
    ) -> Result<pb::RetentionResponse, Status> {
        let (repo, _, _) = self.tier_repo(tier).await?;
        let tier1 = tier != 2 && !self.ctx.read_only;
        // In Tier 1, what Tier 2 must receive first: None when the cluster does not use
        // Tier 2; Some(None) when Tier 2 cannot be reached (then nothing it lacks may go).
        let tier2 = if tier1 && self.ctx.uses_tier2(&cluster) {
            Some(self.ctx.tier2().await.ok())
        } else {
            None
        };
        let c = cluster.clone();
        let r = repo.clone();
        // Candidates: every readable complete backup, at its start time.
        let backups = tokio::task::spawn_blocking(move || -> Result<_, Status> {
            let mut out = Vec::new();
            for id in r.list_manifests(&c).map_err(repo_status)? {
                let m = r.get_manifest(&c, &id).map_err(repo_status)?;
                let time = m.metadata["started_at"]
                    .as_str()
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .ok_or_else(|| {
                        Status::internal(format!("backup {id} has no valid started_at"))
                    })?;
                out.push((id, time, m.metadata));
            }
            Ok(out)
        })
        .await
        .map_err(join_error)??;
        let candidates: Vec<klio_retention::Candidate> = backups
            .iter()
            .map(|(id, time, _)| klio_retention::Candidate {
                id: id.to_string(),
                time: *time,
            })
            .collect();
        let decisions = klio_retention::plan(&policy, &candidates);
        let mut response = pb::RetentionResponse {
            decisions: decisions.iter().map(decision_to_pb).collect(),
            tier: if tier1 { 1 } else { 2 },
            ..Default::default()
        };
        // Expired backups Tier 2 does not have yet stay until the relay has copied them.
        if let Some(t2) = &tier2 {
            let in_tier2: HashSet<String> = match t2 {
                Some(t2) => {
                    let (t2, c) = (t2.clone(), cluster.clone());
                    match tokio::task::spawn_blocking(move || t2.repo.list_manifests(&c))
                        .await
                        .map_err(join_error)?
                    {
                        Ok(ids) => ids.iter().map(ToString::to_string).collect(),
                        // Unknown what Tier 2 holds: every expired backup waits.
                        Err(e) => {
                            tracing::warn!(%cluster, error = %e, "cannot list Tier 2: no backup expires from Tier 1 now");
                            HashSet::new()
                        }
                    }
                }
                None => HashSet::new(),
            };
            for d in response.decisions.iter_mut().filter(|d| !d.keep) {
                if !in_tier2.contains(&d.backup_id) {
                    d.keep = true;
                    d.reasons.push("awaiting Tier 2 relay".to_string());
                    response.held_for_tier2.push(d.backup_id.clone());
                }
            }
        }
        let kept: HashSet<&str> = response
            .decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.backup_id.as_str())
            .collect();
        // The oldest kept backup's first WAL segment: older WAL is not needed.
        let oldest_kept = backups
            .iter()
            .filter(|(id, _, _)| kept.contains(id.as_str()))
            .min_by_key(|(_, t, _)| *t);
        if let Some((_, _, meta)) = oldest_kept {
            response.first_wal_kept = meta["start_wal"].as_str().unwrap_or_default().to_string();
        }
        if dry_run {
            response.gc = Some(self.collect_garbage(tier, true).await?);
            return Ok(response);
        }
        let expired: Vec<String> = response
            .decisions
            .iter()
            .filter(|d| !d.keep)
            .map(|d| d.backup_id.clone())
            .collect();
        for id in expired {
            let backup_id = parse_backup_id(&id)?;
            let (r, c) = (repo.clone(), cluster.clone());
            tokio::task::spawn_blocking(move || r.delete_backup(&c, &backup_id))
                .await
                .map_err(join_error)?
                .map_err(repo_status)?;
            tracing::info!(%cluster, backup = %id, tier = response.tier, "backup expired by retention");
            response.deleted_backups.push(id);
        }
        if !response.first_wal_kept.is_empty() {
            response.deleted_wal = self
                .remove_old_wal(&cluster, &response.first_wal_kept, tier1, tier2)
                .await?;
        }
        response.gc = Some(if repo.gc_due(GC_MAX_INTERVAL) {
            self.collect_garbage(tier, false).await?
        } else {
            // Nothing became garbage since the last collection: marking every live block
            // again (and holding off every other backup meanwhile) would reclaim nothing.
            pb::GcResponse {
                skipped: true,
                ..Default::default()
            }
        });
        Ok(response)
    }

    /// Removes the WAL before `first` (a segment name) from Tier 1 (`tier1`) or Tier 2.
    async fn remove_old_wal(
        &self,
        cluster: &str,
        first: &str,
        tier1: bool,
        tier2: Option<Option<Arc<crate::tier2::Tier2>>>,
    ) -> Result<Vec<String>, Status> {
        if tier1 {
            let Some(wal) = self.ctx.wal.clone() else {
                return Ok(Vec::new());
            };
            // Only what Tier 2 holds may go, when the cluster uses Tier 2.
            let relayed = match tier2 {
                None => None,
                Some(None) => {
                    tracing::warn!(%cluster, "Tier 2 is not reachable: no Tier 1 WAL removed");
                    return Ok(Vec::new());
                }
                Some(Some(t2)) => {
                    let c = cluster.to_string();
                    match tokio::task::spawn_blocking(move || t2.files(&c))
                        .await
                        .map_err(join_error)?
                    {
                        Ok(files) => Some(files),
                        Err(e) => {
                            tracing::warn!(%cluster, error = %format!("{e:#}"), "cannot list Tier 2: no Tier 1 WAL removed");
                            return Ok(Vec::new());
                        }
                    }
                }
            };
            let (c, first) = (cluster.to_string(), first.to_string());
            return tokio::task::spawn_blocking(move || -> Result<_, Status> {
                let cw = wal.cluster(&c).map_err(crate::store_status)?;
                let Some(meta) = cw.meta().map_err(crate::store_status)? else {
                    return Ok(Vec::new());
                };
                let keep_from = first_segment(&first, meta.segment_size)?;
                cw.remove_before(keep_from, |name| {
                    relayed.as_ref().is_none_or(|r| r.contains(name))
                })
                .map_err(crate::store_status)
            })
            .await
            .map_err(join_error)?;
        }
        let t2 = self.ctx.tier2().await?;
        let (c, first) = (cluster.to_string(), first.to_string());
        tokio::task::spawn_blocking(move || -> Result<_, Status> {
            let Some(meta) = t2
                .meta(&c)
                .map_err(|e| Status::unavailable(format!("{e:#}")))?
            else {
                return Ok(Vec::new());
            };
            let keep_from = first_segment(&first, meta.segment_size)?;
            t2.remove_wal_before(&c, keep_from)
                .map_err(|e| Status::unavailable(format!("{e:#}")))
        })
        .await
        .map_err(join_error)?
    }
}

/// The segment number of WAL file `name`.
fn first_segment(name: &str, segment_size: u64) -> Result<klio_pg::SegmentNo, Status> {
    let size =
        klio_pg::SegmentSize::new(segment_size).map_err(|e| Status::internal(e.to_string()))?;
    klio_pg::WalFileName::parse(name, size)
        .ok()
        .and_then(|f| f.segno())
        .ok_or_else(|| Status::internal(format!("invalid start WAL \"{name}\"")))
}

/// The blocks of a `GetBlocks` answer. With `runs`, each frame's payload is sent once, with
/// the first block of the answer it holds; without, each block of a run is decompressed
/// and sent on its own, as a client that does not know runs expects.
fn blocks_answer(payloads: Vec<BlockPayload>, runs: bool) -> Result<Vec<pb::Block>, Status> {
    let mut out = Vec::with_capacity(payloads.len());
    let mut sent: HashMap<(PackId, u32), u32> = HashMap::new();
    let mut plain: Option<((PackId, u32), Vec<u8>)> = None;
    for p in payloads {
        let mut b = pb::Block {
            id: p.id.to_wire().to_vec().into(),
            plain_len: p.plain_len,
            compressed: p.compressed,
            ..Default::default()
        };
        if runs {
            b.frame_offset = p.inner;
            b.frame_len = p.frame_len;
            match sent.get(&p.frame) {
                Some(&k) if p.frame_len != 0 => b.frame_block = k,
                _ => {
                    sent.insert(p.frame, out.len() as u32 + 1);
                    b.data = p.payload;
                }
            }
        } else if p.is_single() {
            b.data = p.payload;
        } else {
            if plain.as_ref().is_none_or(|(f, _)| *f != p.frame) {
                let bytes = p.frame_plaintext().map_err(|e| {
                    Status::data_loss(format!("block {}: the frame holding it: {e}", p.id))
                })?;
                plain = Some((p.frame, bytes));
            }
            let Some((_, bytes)) = &plain else {
                continue;
            };
            let Some(block) = p.block_in(bytes) else {
                return Err(Status::data_loss(format!(
                    "block {} lies beyond the frame holding it",
                    p.id
                )));
            };
            b.compressed = false;
            b.data = bytes::Bytes::copy_from_slice(block);
        }
        out.push(b);
    }
    Ok(out)
}

/// Checks and stores uploaded blocks and runs; returns how many blocks were new and the
/// ids of every block checked and stored.
fn store_blocks(
    writer: &mut PackWriter,
    blocks: Vec<pb::Block>,
) -> Result<(u64, Vec<BlockId>), Status> {
    let mut new = 0;
    let mut stored = Vec::with_capacity(blocks.len());
    // One decompression context for the call: making one per block cost more than the
    // decompression itself.
    let mut dctx = zstd::bulk::Decompressor::new()
        .map_err(|e| Status::internal(format!("zstd decompressor: {e}")))?;
    for b in blocks {
        let (pages, what) = if b.run_ids.is_empty() {
            let hash = <&[u8; BlockId::WIRE_LEN]>::try_from(&b.id[..])
                .ok()
                .filter(|_| b.run_lens.is_empty())
                .ok_or_else(|| {
                    Status::invalid_argument(
                        "a block id has 32 bytes (or a run has run_ids and run_lens)",
                    )
                })?;
            let id = BlockId::from_hash(hash);
            (vec![(id, b.plain_len)], format!("block {id}"))
        } else {
            (run_pages(&b)?, "a run of blocks".to_string())
        };
        if b.plain_len as usize > MAX_BLOCK_SIZE {
            return Err(Status::invalid_argument(format!(
                "{what} claims {} bytes; the limit is {MAX_BLOCK_SIZE}",
                b.plain_len
            )));
        }
        let (plain, compressed) = if b.compressed {
            let plain = dctx
                .decompress(&b.data, b.plain_len as usize)
                .map_err(|e| {
                    Status::invalid_argument(format!("{what} does not decompress: {e}"))
                })?;
            if plain.len() != b.plain_len as usize {
                return Err(Status::invalid_argument(format!(
                    "{what} decompresses to {} bytes, not {}",
                    plain.len(),
                    b.plain_len
                )));
            }
            (plain, Some(b.data.to_vec()))
        } else {
            if b.data.len() != b.plain_len as usize {
                return Err(Status::invalid_argument(format!(
                    "{what} has {} bytes, not {}",
                    b.data.len(),
                    b.plain_len
                )));
            }
            (b.data.to_vec(), None)
        };
        new += writer
            .add_run(&pages, &plain, Some(compressed))
            .map_err(repo_status)?;
        stored.extend(pages.into_iter().map(|(id, _)| id));
    }
    Ok((new, stored))
}

/// The blocks of an uploaded run (id and length), checked against the limits.
fn run_pages(b: &pb::Block) -> Result<Vec<(BlockId, u32)>, Status> {
    let count = b.run_lens.len();
    if !b.id.is_empty() || b.run_ids.len() != count * 32 {
        return Err(Status::invalid_argument(format!(
            "a run names {} bytes of block ids for {count} lengths; it has 32 bytes of id per length and no id of its own",
            b.run_ids.len()
        )));
    }
    if count > MAX_RUN_BLOCKS {
        return Err(Status::invalid_argument(format!(
            "a run of {count} blocks; the limit is {MAX_RUN_BLOCKS}"
        )));
    }
    let total: u64 = b.run_lens.iter().map(|l| u64::from(*l)).sum();
    if total != u64::from(b.plain_len) || b.run_lens.contains(&0) {
        return Err(Status::invalid_argument(format!(
            "a run's block lengths add up to {total} bytes, not its {} (and none is empty)",
            b.plain_len
        )));
    }
    Ok(BlockId::list_from_bytes(&b.run_ids)
        .into_iter()
        .zip(b.run_lens.iter().copied())
        .collect())
}

/// Adds a block to a session's protected set, or pins the repository once the set is full.
fn protect(session: &Session, protected: &mut HashSet<BlockId>, id: BlockId) {
    if session.pins_repository.load(Ordering::Relaxed) {
        return;
    }
    if protected.len() >= MAX_PROTECTED_IDS {
        session.pins_repository.store(true, Ordering::Relaxed);
        protected.clear();
        protected.shrink_to_fit();
        return;
    }
    protected.insert(id);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use klio_repository::{MemStore, Repository, RepositoryOptions};

    use super::*;

    fn piece(path: &str, size: u64, first_block: u64, ids: &[BlockId]) -> pb::FileEntry {
        pb::FileEntry {
            path: path.into(),
            size,
            mode: 0o600,
            mtime: 1,
            kind: pb::file_entry::Kind::File as i32,
            block_size: 8192,
            block_ids: ids.iter().flat_map(|i| i.to_wire()).collect(),
            first_block,
            ..Default::default()
        }
    }

    #[test]
    fn small_files_are_listed_in_the_manifest_and_larger_or_grown_ones_get_blocklists() {
        let repo = Repository::open_or_init(
            Arc::new(MemStore::new()),
            klio_crypto::MasterKey::generate(),
            RepositoryOptions::default(),
        )
        .unwrap();
        let pages: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 8192]).collect();
        let ids: Vec<BlockId> = pages.iter().map(|p| repo.block_id(p)).collect();
        let mut w = repo.pack_writer();
        for (id, p) in ids.iter().zip(&pages) {
            w.add_block(id, p).unwrap();
        }
        w.finish().unwrap();
        let mut b = ManifestBuilder::new(&repo, "backup x".into());
        // 16 blocks in one piece: listed.
        b.add(piece("small", 16 * 8192, 0, &ids[..16])).unwrap();
        // 17 blocks: a blocklist.
        b.add(piece("large", 17 * 8192, 0, &ids[..17])).unwrap();
        // Whole in its first piece, then grown by a second: blocklists, in order.
        b.add(piece("grown", 2 * 8192, 0, &ids[..2])).unwrap();
        b.add(piece("grown", 3 * 8192, 2, &ids[2..3])).unwrap();
        let files = b.finish().unwrap();
        let kind = |path: &str| files.iter().find(|f| f.path == path).unwrap().kind.clone();
        assert_eq!(
            kind("small"),
            FileKind::Listed {
                block_size: 8192,
                blocks: ids[..16].to_vec()
            }
        );
        for (path, want) in [("large", &ids[..17]), ("grown", &ids[..3])] {
            let FileKind::Blocks { blocklists, .. } = kind(path) else {
                panic!("{path} has no blocklists");
            };
            let listed: Vec<BlockId> = blocklists
                .iter()
                .flat_map(|l| repo.get_blocklist(l).unwrap())
                .collect();
            assert_eq!(listed, want, "{path}");
        }
    }
}
