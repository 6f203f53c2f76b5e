//! The server's metrics, on the OpenTelemetry API (exported by `klio-telemetry` as a
//! Prometheus endpoint and over OTLP). Names follow Prometheus conventions; labels are
//! `cluster`, `tier` and small enumerations only (no per-file or per-backup labels).
//! `docs/observability.md` lists them with their meaning.
//!
//! Two kinds of values: what the services record as it happens (WAL streams, relays,
//! retention and collection outcomes, requests), kept in [`Metrics`]; and what is read from
//! the stores (backups per tier, recovery windows, queue depth, disk use), refreshed by
//! [`Metrics::refresh`] in the background and read by the exporters from that snapshot.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use klio_pg::Lsn;
use klio_repository::{BackupId, Repository};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Meter};
use serde_json::Value;

/// Seconds since the Unix epoch.
pub(crate) fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Parses an RFC 3339 time of a backup's metadata.
pub(crate) fn parse_time(v: &Value) -> Option<f64> {
    let t =
        time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

/// One cluster's WAL stream, as the WAL service sees it.
#[derive(Clone, Debug, Default)]
pub struct WalState {
    pub connected: bool,
    /// The last data asked for an immediate flush: PostgreSQL waits on this stream.
    pub synchronous: bool,
    /// Durably stored up to here.
    pub archived: Lsn,
    /// The primary's end of WAL, as the streamer last reported it.
    pub primary: Lsn,
    /// When WAL was last made durable.
    pub last_archived: Option<SystemTime>,
    /// When the archive was last known to hold everything the primary had written (a
    /// connected stream with nothing outstanding); `None` before any stream.
    pub complete_at: Option<SystemTime>,
}

impl WalState {
    pub fn lag_bytes(&self) -> u64 {
        self.primary.0.saturating_sub(self.archived.0)
    }

    /// Seconds since the archive was last known complete (0 while it is).
    pub fn lag_seconds(&self, now: SystemTime) -> f64 {
        klio_telemetry::archive_lag_seconds(self.connected, self.lag_bytes(), self.complete_at, now)
    }
}

/// One cluster's Tier 2 relay.
#[derive(Clone, Debug, Default)]
pub struct RelayState {
    pub pending_files: u64,
    pub pending_bytes: u64,
    /// When Tier 2 last held every WAL file Tier 1 had.
    pub complete_at: Option<SystemTime>,
    /// The first relay of this process has not finished yet.
    pub started: Option<SystemTime>,
    pub last_error: Option<String>,
}

impl RelayState {
    pub fn lag_seconds(&self, now: SystemTime) -> f64 {
        if self.pending_files == 0 && self.last_error.is_none() {
            return 0.0;
        }
        self.complete_at.or(self.started).map_or(0.0, |t| {
            now.duration_since(t).unwrap_or_default().as_secs_f64()
        })
    }
}

/// What one tier holds of one cluster's backups.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TierBackups {
    pub count: u64,
    /// Oldest backup's end: the earliest point a restore from this tier can reach.
    pub first_recoverability_point: Option<f64>,
    pub last_success: Option<f64>,
    pub last_backup_id: Option<String>,
    pub last_duration_seconds: Option<f64>,
    pub last_logical_bytes: Option<u64>,
    pub last_new_bytes: Option<u64>,
    pub last_new_plain_bytes: Option<u64>,
    pub checksum_failures: u64,
}

/// What the background refresh reads from the stores.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// (cluster, tier) -> backups.
    pub backups: BTreeMap<(String, u32), TierBackups>,
    /// Archive end per cluster (for clusters without a stream in this process).
    pub archive_end: BTreeMap<String, Lsn>,
    pub wal_bytes: BTreeMap<String, u64>,
    pub repository_bytes: Option<u64>,
    pub volume: Option<(u64, u64)>,
    pub queue_pending: Option<u64>,
    pub queue_failed: Option<u64>,
    pub refreshed: Option<SystemTime>,
}

/// The server's metrics. One per server; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    /// When this server started: an archive no streamer has joined since is known
    /// complete only up to then.
    started: SystemTime,
    wal: Mutex<BTreeMap<String, WalState>>,
    relay: Mutex<BTreeMap<String, RelayState>>,
    snapshot: Mutex<Snapshot>,
    metadata: Arc<MetadataCache>,
    in_flight: AtomicI64,
    wal_received: Counter<u64>,
    relay_errors: Counter<u64>,
    relayed_files: Counter<u64>,
    relayed_bytes: Counter<u64>,
    retention_runs: Counter<u64>,
    retention_expired: Counter<u64>,
    gc_runs: Counter<u64>,
    gc_reclaimed: Counter<u64>,
}

impl Inner {
    fn idle_since_start(&self, end: Option<Lsn>) -> WalState {
        let end = end.unwrap_or_default();
        WalState {
            archived: end,
            primary: end,
            complete_at: Some(self.started),
            ..WalState::default()
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn cluster_label(c: &str) -> KeyValue {
    KeyValue::new("cluster", c.to_string())
}

fn tier_label(t: u32) -> KeyValue {
    KeyValue::new("tier", i64::from(t))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates the instruments on the global meter provider (set up by `klio-telemetry`
    /// before the server starts; without it they record nothing).
    pub fn new() -> Metrics {
        let meter = opentelemetry::global::meter("klio-server");
        let inner = Arc::new(Inner {
            started: SystemTime::now(),
            wal: Mutex::default(),
            relay: Mutex::default(),
            snapshot: Mutex::default(),
            metadata: Arc::default(),
            in_flight: AtomicI64::new(0),
            wal_received: meter
                .u64_counter("klio_wal_received_bytes")
                .with_description("WAL bytes received from the streamers")
                .with_unit("By")
                .build(),
            relay_errors: meter
                .u64_counter("klio_tier2_relay_errors")
                .with_description("Failed Tier 2 relay attempts, by kind (wal, backup)")
                .build(),
            relayed_files: meter
                .u64_counter("klio_tier2_relayed_wal_files")
                .with_description("WAL files copied to Tier 2")
                .build(),
            relayed_bytes: meter
                .u64_counter("klio_tier2_relayed_wal_bytes")
                .with_description("Bytes of WAL files copied to Tier 2")
                .with_unit("By")
                .build(),
            retention_runs: meter
                .u64_counter("klio_retention_runs")
                .with_description("Retention runs, by outcome (success, failure)")
                .build(),
            retention_expired: meter
                .u64_counter("klio_retention_expired_backups")
                .with_description("Backups removed by retention")
                .build(),
            gc_runs: meter
                .u64_counter("klio_gc_runs")
                .with_description("Executed garbage collections, by outcome")
                .build(),
            gc_reclaimed: meter
                .u64_counter("klio_gc_reclaimed_bytes")
                .with_description("Bytes freed by garbage collection")
                .with_unit("By")
                .build(),
        });
        register_observers(&meter, &inner);
        Metrics { inner }
    }

    /// A WAL stream of `cluster` opened.
    pub fn stream_opened(&self, cluster: &str, archived: Lsn) {
        let mut wal = lock(&self.inner.wal);
        let s = wal.entry(cluster.to_string()).or_default();
        s.connected = true;
        s.archived = archived;
        s.primary = s.primary.max(archived);
    }

    /// Data arrived on the stream of `cluster`: `bytes` of WAL; the primary is at
    /// `primary` (0: not reported); `synchronous` when the streamer asked for a flush.
    pub fn wal_received(&self, cluster: &str, bytes: u64, primary: Lsn, synchronous: bool) {
        self.inner
            .wal_received
            .add(bytes, &[cluster_label(cluster)]);
        let mut wal = lock(&self.inner.wal);
        let s = wal.entry(cluster.to_string()).or_default();
        s.primary = s.primary.max(primary);
        s.synchronous = synchronous;
    }

    /// WAL of `cluster` is durable up to `archived`.
    pub fn wal_durable(&self, cluster: &str, archived: Lsn) {
        let now = SystemTime::now();
        let mut wal = lock(&self.inner.wal);
        let s = wal.entry(cluster.to_string()).or_default();
        if archived > s.archived {
            s.last_archived = Some(now);
        }
        s.archived = s.archived.max(archived);
        s.primary = s.primary.max(s.archived);
        if s.connected && s.lag_bytes() == 0 {
            s.complete_at = Some(now);
        }
    }

    /// The stream of `cluster` ended.
    pub fn stream_closed(&self, cluster: &str) {
        let now = SystemTime::now();
        let mut wal = lock(&self.inner.wal);
        if let Some(s) = wal.get_mut(cluster) {
            if s.lag_bytes() == 0 {
                s.complete_at = Some(now);
            }
            s.connected = false;
            s.synchronous = false;
        }
    }

    /// One cluster's stream state; for an archive no streamer has joined since this server
    /// started, a disconnected stream complete up to the start.
    pub fn wal_state(&self, cluster: &str) -> WalState {
        lock(&self.inner.wal)
            .get(cluster)
            .cloned()
            .unwrap_or_else(|| self.inner.idle_since_start(None))
    }

    /// A WAL relay of `cluster` found `files` (about `bytes`) that Tier 2 lacks.
    pub fn relay_started(&self, cluster: &str, files: u64, bytes: u64) {
        let mut relay = lock(&self.inner.relay);
        let r = relay.entry(cluster.to_string()).or_default();
        r.started.get_or_insert_with(SystemTime::now);
        r.pending_files = files;
        r.pending_bytes = bytes;
    }

    /// A WAL relay of `cluster` ended: `copied` files of `bytes`; `error` when it failed.
    pub fn relay_finished(&self, cluster: &str, copied: u64, bytes: u64, error: Option<String>) {
        self.inner
            .relayed_files
            .add(copied, &[cluster_label(cluster)]);
        self.inner
            .relayed_bytes
            .add(bytes, &[cluster_label(cluster)]);
        let mut relay = lock(&self.inner.relay);
        let r = relay.entry(cluster.to_string()).or_default();
        let left = r.pending_files.saturating_sub(copied);
        // Pending bytes are an estimate (segments counted whole): scaled with the files.
        r.pending_bytes = r
            .pending_bytes
            .checked_div(r.pending_files)
            .map_or(0, |each| each * left);
        r.pending_files = left;
        if error.is_some() {
            self.inner
                .relay_errors
                .add(1, &[cluster_label(cluster), KeyValue::new("kind", "wal")]);
        } else if r.pending_files == 0 {
            r.pending_bytes = 0;
            r.complete_at = Some(SystemTime::now());
        }
        r.last_error = error;
    }

    /// A backup relay of `cluster` failed.
    pub fn backup_relay_failed(&self, cluster: &str) {
        self.inner.relay_errors.add(
            1,
            &[cluster_label(cluster), KeyValue::new("kind", "backup")],
        );
    }

    /// One cluster's relay state.
    pub fn relay_state(&self, cluster: &str) -> Option<RelayState> {
        lock(&self.inner.relay).get(cluster).cloned()
    }

    /// A retention run of `cluster` on `tier` ended; `expired` backups removed.
    pub fn retention_ran(&self, cluster: &str, tier: u32, expired: Option<u64>) {
        let outcome = if expired.is_some() {
            "success"
        } else {
            "failure"
        };
        self.inner.retention_runs.add(
            1,
            &[
                cluster_label(cluster),
                tier_label(tier),
                KeyValue::new("outcome", outcome),
            ],
        );
        if let Some(n) = expired {
            self.inner
                .retention_expired
                .add(n, &[cluster_label(cluster), tier_label(tier)]);
        }
    }

    /// An executed garbage collection of `tier` ended; `reclaimed` bytes when it succeeded.
    pub fn gc_ran(&self, tier: u32, reclaimed: Option<u64>) {
        let outcome = if reclaimed.is_some() {
            "success"
        } else {
            "failure"
        };
        self.inner
            .gc_runs
            .add(1, &[tier_label(tier), KeyValue::new("outcome", outcome)]);
        if let Some(b) = reclaimed {
            self.inner.gc_reclaimed.add(b, &[tier_label(tier)]);
        }
    }

    /// A queue task started (`+1`) or ended (`-1`).
    pub fn task_in_flight(&self, delta: i64) {
        self.inner.in_flight.fetch_add(delta, Ordering::Relaxed);
    }

    /// The last snapshot of the stores.
    pub fn snapshot(&self) -> Snapshot {
        lock(&self.inner.snapshot).clone()
    }

    /// Reads the stores into the snapshot: backups of every cluster in each tier given,
    /// archive ends, queue depth, and (with `disk`) bytes on disk. Blocking.
    pub fn refresh(&self, sources: &RefreshSources, disk: bool) {
        let mut snap = Snapshot::default();
        for (tier, repo) in &sources.repos {
            match repo.list_clusters() {
                Ok(clusters) => {
                    for c in clusters {
                        let b = self.tier_backups(*tier, repo, &c);
                        snap.backups.insert((c, *tier), b);
                    }
                }
                Err(e) => tracing::debug!(tier, error = %e, "metrics: cannot list clusters"),
            }
        }
        if let Some(wal) = &sources.wal {
            for c in wal.clusters().unwrap_or_default() {
                if let Ok(Ok(status)) = wal.cluster(&c).map(|cw| cw.status())
                    && let Some((_, end)) = status.latest
                {
                    snap.archive_end.insert(c.clone(), end);
                }
                if disk {
                    snap.wal_bytes
                        .insert(c.clone(), dir_bytes(&wal.root().join(&c)));
                }
            }
        }
        if let Some(dir) = &sources.data_dir {
            snap.volume = volume(dir);
            if disk {
                snap.repository_bytes = Some(dir_bytes(&dir.join("repository")));
            }
        }
        snap.queue_pending = sources.queue_pending;
        snap.queue_failed = sources.queue_failed;
        snap.refreshed = Some(SystemTime::now());
        let mut current = lock(&self.inner.snapshot);
        if !disk {
            snap.wal_bytes = std::mem::take(&mut current.wal_bytes);
            snap.repository_bytes = current.repository_bytes;
        }
        // Tiers not read this time keep their last figures.
        let read: std::collections::HashSet<u32> = sources.repos.iter().map(|(t, _)| *t).collect();
        for (key, b) in std::mem::take(&mut current.backups) {
            if !read.contains(&key.1) {
                snap.backups.entry(key).or_insert(b);
            }
        }
        *current = snap;
    }

    /// The cache of backup metadata, shared with the catalog (`List`).
    pub fn metadata_cache(&self) -> Arc<MetadataCache> {
        self.inner.metadata.clone()
    }

    fn metadata(&self, tier: u32, repo: &Repository, cluster: &str, id: &BackupId) -> Value {
        self.inner
            .metadata
            .get(tier, repo, cluster, id)
            .unwrap_or(Value::Null)
    }

    /// The backups `repo` holds of `cluster` (metadata read once per backup).
    pub fn tier_backups(&self, tier: u32, repo: &Repository, cluster: &str) -> TierBackups {
        let Ok(ids) = repo.list_manifests(cluster) else {
            return TierBackups::default();
        };
        let mut out = TierBackups {
            count: ids.len() as u64,
            ..TierBackups::default()
        };
        // Ids sort by start time: the first is the oldest, the last the newest.
        let metas: Vec<(BackupId, Value)> = ids
            .iter()
            .map(|id| (id.clone(), self.metadata(tier, repo, cluster, id)))
            .collect();
        out.first_recoverability_point =
            metas.iter().find_map(|(_, m)| parse_time(&m["stopped_at"]));
        if let Some((id, m)) = metas.last() {
            out.last_backup_id = Some(id.to_string());
            out.last_success = parse_time(&m["stopped_at"]);
            out.last_duration_seconds = parse_time(&m["started_at"])
                .zip(out.last_success)
                .map(|(a, b)| (b - a).max(0.0));
            out.last_logical_bytes = m["logical_size"].as_u64();
            out.last_new_bytes = m["bytes_new"].as_u64();
            out.last_new_plain_bytes = m["plain_bytes_new"].as_u64();
            out.checksum_failures = m["checksum_failures"]
                .as_array()
                .map_or(0, |a| a.len() as u64);
        }
        // Backups that left the store leave the metadata cache too.
        self.inner.metadata.retain_listed(tier, cluster, &ids);
        out
    }
}

/// Most backup metadata a [`MetadataCache`] holds (about 2 KiB each, without file lists).
const MAX_CACHED_METADATA: usize = 20_000;

/// Metadata of committed backups by (tier, cluster, id), each read from the store once: a
/// manifest never changes after its commit. Shared by the metrics refresh and the
/// catalog's `List`; entries of backups a listing no longer shows are dropped, and all of
/// them when the cache is full.
#[derive(Default)]
pub struct MetadataCache(Mutex<HashMap<(u32, String, String), Value>>);

impl MetadataCache {
    /// Backup `id`'s metadata from `repo` (tier `tier`); a read that fails is not cached
    /// (a damaged manifest is reported until repaired).
    pub fn get(
        &self,
        tier: u32,
        repo: &Repository,
        cluster: &str,
        id: &BackupId,
    ) -> Result<Value, klio_repository::Error> {
        let key = (tier, cluster.to_string(), id.to_string());
        if let Some(v) = lock(&self.0).get(&key) {
            return Ok(v.clone());
        }
        let metadata = repo.get_manifest(cluster, id)?.metadata;
        let mut cache = lock(&self.0);
        if cache.len() >= MAX_CACHED_METADATA {
            cache.clear();
        }
        cache.insert(key, metadata.clone());
        Ok(metadata)
    }

    /// Forgets tier `tier`'s backups of `cluster` that `listed` does not hold.
    pub fn retain_listed(&self, tier: u32, cluster: &str, listed: &[BackupId]) {
        let live: std::collections::HashSet<String> =
            listed.iter().map(|i| i.to_string()).collect();
        lock(&self.0).retain(|(t, c, id), _| *t != tier || c != cluster || live.contains(id));
    }
}

/// What [`Metrics::refresh`] reads.
pub struct RefreshSources {
    pub repos: Vec<(u32, Repository)>,
    pub wal: Option<klio_wal_store::WalStore>,
    pub data_dir: Option<PathBuf>,
    pub queue_pending: Option<u64>,
    pub queue_failed: Option<u64>,
}

/// Bytes of the regular files under `dir` (symbolic links not followed).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

/// (size, free) bytes of the filesystem holding `dir`.
fn volume(dir: &Path) -> Option<(u64, u64)> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some((
        s.f_blocks.saturating_mul(s.f_frsize),
        s.f_bavail.saturating_mul(s.f_frsize),
    ))
}

/// The gauges, read by the exporters from the live state and the snapshot.
fn register_observers(meter: &Meter, inner: &Arc<Inner>) {
    let weak = Arc::downgrade(inner);
    let wal_gauge = |name, help, unit, f: fn(&WalState, SystemTime) -> f64| {
        let weak = weak.clone();
        klio_telemetry::gauge(meter, name, help, unit, move |obs| {
            let Some(inner) = weak.upgrade() else { return };
            let now = SystemTime::now();
            let snap_ends = lock(&inner.snapshot).archive_end.clone();
            let wal = lock(&inner.wal);
            for (c, s) in wal.iter() {
                obs.observe(f(s, now), &[cluster_label(c)]);
            }
            // Archives without a stream since this server started.
            for (c, end) in snap_ends {
                if !wal.contains_key(&c) {
                    obs.observe(
                        f(&inner.idle_since_start(Some(end)), now),
                        &[cluster_label(&c)],
                    );
                }
            }
        });
    };
    wal_gauge(
        "klio_wal_stream_connected",
        "1 while the cluster's WAL streamer is connected",
        "",
        |s, _| f64::from(u8::from(s.connected)),
    );
    wal_gauge(
        "klio_wal_stream_synchronous",
        "1 while the streamer acknowledges synchronously (PostgreSQL waits for the archive)",
        "",
        |s, _| f64::from(u8::from(s.synchronous)),
    );
    wal_gauge(
        "klio_wal_archived_position_bytes",
        "Position (LSN) up to which the cluster's WAL is durably archived",
        "By",
        |s, _| s.archived.0 as f64,
    );
    wal_gauge(
        "klio_wal_primary_position_bytes",
        "The primary's end of WAL (LSN) as its streamer last reported it",
        "By",
        |s, _| s.primary.0 as f64,
    );
    wal_gauge(
        "klio_wal_archive_lag_bytes",
        "WAL bytes the primary has written that the archive does not hold yet",
        "By",
        |s, _| s.lag_bytes() as f64,
    );
    wal_gauge(
        "klio_wal_archive_lag_seconds",
        "Seconds since the archive was last known to hold all of the primary's WAL (grows while the streamer is away)",
        "s",
        |s, now| s.lag_seconds(now),
    );
    wal_gauge(
        "klio_wal_last_archived_timestamp_seconds",
        "When WAL of the cluster was last made durable (Unix time; 0 before any since start)",
        "s",
        |s, _| s.last_archived.map_or(0.0, unix_seconds),
    );

    let relay_gauge = |name, help, unit, f: fn(&RelayState, SystemTime) -> f64| {
        let weak = weak.clone();
        klio_telemetry::gauge(meter, name, help, unit, move |obs| {
            let Some(inner) = weak.upgrade() else { return };
            let now = SystemTime::now();
            for (c, r) in lock(&inner.relay).iter() {
                obs.observe(f(r, now), &[cluster_label(c)]);
            }
        });
    };
    relay_gauge(
        "klio_tier2_relay_lag_files",
        "WAL files Tier 1 holds and Tier 2 does not yet (as of the last relay)",
        "",
        |r, _| r.pending_files as f64,
    );
    relay_gauge(
        "klio_tier2_relay_lag_bytes",
        "Approximate bytes of those files (segments counted whole)",
        "By",
        |r, _| r.pending_bytes as f64,
    );
    relay_gauge(
        "klio_tier2_relay_lag_seconds",
        "Seconds since Tier 2 last held every WAL file of Tier 1 (0 while it does)",
        "s",
        |r, now| r.lag_seconds(now),
    );
    relay_gauge(
        "klio_tier2_relay_failing",
        "1 while the last WAL relay of the cluster failed",
        "",
        |r, _| f64::from(u8::from(r.last_error.is_some())),
    );

    let backup_gauge = |name, help, unit, f: fn(&TierBackups) -> Option<f64>| {
        let weak = weak.clone();
        klio_telemetry::gauge(meter, name, help, unit, move |obs| {
            let Some(inner) = weak.upgrade() else { return };
            for ((c, tier), b) in lock(&inner.snapshot).backups.iter() {
                if let Some(v) = f(b) {
                    obs.observe(v, &[cluster_label(c), tier_label(*tier)]);
                }
            }
        });
    };
    backup_gauge("klio_backups", "Complete backups the tier holds", "", |b| {
        Some(b.count as f64)
    });
    backup_gauge(
        "klio_backup_last_success_timestamp_seconds",
        "End of the newest complete backup (Unix time)",
        "s",
        |b| b.last_success,
    );
    backup_gauge(
        "klio_backup_last_duration_seconds",
        "Duration of the newest complete backup",
        "s",
        |b| b.last_duration_seconds,
    );
    backup_gauge(
        "klio_backup_last_logical_bytes",
        "Size of the data directory in the newest backup",
        "By",
        |b| b.last_logical_bytes.map(|v| v as f64),
    );
    backup_gauge(
        "klio_backup_last_new_bytes",
        "Bytes the newest backup added to the repository (compressed, encrypted)",
        "By",
        |b| b.last_new_bytes.map(|v| v as f64),
    );
    backup_gauge(
        "klio_backup_last_new_plain_bytes",
        "Bytes of new blocks the newest backup added, before compression",
        "By",
        |b| b.last_new_plain_bytes.map(|v| v as f64),
    );
    backup_gauge(
        "klio_backup_last_checksum_failures",
        "Page checksum failures PostgreSQL reported in the newest backup",
        "",
        |b| Some(b.checksum_failures as f64),
    );
    backup_gauge(
        "klio_first_recoverability_point_timestamp_seconds",
        "Earliest point in time a restore from the tier can reach (end of its oldest backup)",
        "s",
        |b| b.first_recoverability_point,
    );

    let weak_q = weak.clone();
    klio_telemetry::gauge(
        meter,
        "klio_queue_tasks",
        "Work queue tasks, by state (pending includes in_flight; failed: the dead-letter list)",
        "",
        move |obs| {
            let Some(inner) = weak_q.upgrade() else {
                return;
            };
            let snap = lock(&inner.snapshot);
            if let Some(p) = snap.queue_pending {
                obs.observe(p as f64, &[KeyValue::new("state", "pending")]);
            }
            if let Some(f) = snap.queue_failed {
                obs.observe(f as f64, &[KeyValue::new("state", "failed")]);
            }
            let in_flight = inner.in_flight.load(Ordering::Relaxed).max(0);
            obs.observe(in_flight as f64, &[KeyValue::new("state", "in_flight")]);
        },
    );
    let weak_d = weak.clone();
    klio_telemetry::gauge(
        meter,
        "klio_disk_bytes",
        "Bytes on the data volume: used by the repository and each cluster's WAL archive; the volume's size and free space",
        "By",
        move |obs| {
            let Some(inner) = weak_d.upgrade() else {
                return;
            };
            let snap = lock(&inner.snapshot);
            if let Some(b) = snap.repository_bytes {
                obs.observe(b as f64, &[KeyValue::new("use", "repository")]);
            }
            for (c, b) in &snap.wal_bytes {
                obs.observe(*b as f64, &[KeyValue::new("use", "wal"), cluster_label(c)]);
            }
            if let Some((size, free)) = snap.volume {
                obs.observe(size as f64, &[KeyValue::new("use", "volume_size")]);
                obs.observe(free as f64, &[KeyValue::new("use", "volume_free")]);
            }
        },
    );
    klio_telemetry::gauge(
        meter,
        "klio_metrics_refresh_timestamp_seconds",
        "When the store-derived metrics were last refreshed",
        "s",
        move |obs| {
            let Some(inner) = weak.upgrade() else { return };
            if let Some(t) = lock(&inner.snapshot).refreshed {
                obs.observe(unix_seconds(t), &[]);
            }
        },
    );
}

/// Refreshes the snapshot every `every` (disk use and Tier 2 every tenth time) until
/// `cancel`.
pub async fn refresh_loop(
    metrics: Metrics,
    ctx: crate::context::Context,
    tier1: Option<Repository>,
    every: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut round = 0u64;
    loop {
        let started = Instant::now();
        let mut repos = Vec::new();
        if let Some(r) = &tier1 {
            repos.push((1, r.clone()));
        }
        // Tier 2 only once open (the relay or a request opens it): the refresh never
        // waits on an unreachable bucket; and every tenth time, as its listings are paid
        // requests.
        let slow = round.is_multiple_of(10);
        if slow && let Some(t2) = ctx.tier2_if_open() {
            repos.push((2, t2.repo.clone()));
        }
        let (pending, failed) = match &ctx.queue {
            Some(q) => (
                q.pending_count().await.ok().map(|n| n as u64),
                q.list_failed().await.ok().map(|f| f.len() as u64),
            ),
            None => (None, None),
        };
        let sources = RefreshSources {
            repos,
            wal: ctx.wal.clone(),
            data_dir: ctx.data_dir.clone(),
            queue_pending: pending,
            queue_failed: failed,
        };
        let m = metrics.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || m.refresh(&sources, slow)).await {
            tracing::warn!(error = %e, "metrics refresh failed");
        }
        round += 1;
        tracing::trace!(elapsed = ?started.elapsed(), "metrics refreshed");
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_zero_while_complete_and_grows_once_the_stream_is_away() {
        let m = Metrics::new();
        m.stream_opened("c", Lsn(100));
        m.wal_received("c", 50, Lsn(200), true);
        let s = m.wal_state("c");
        assert_eq!((s.lag_bytes(), s.synchronous), (100, true));
        m.wal_durable("c", Lsn(200));
        let s = m.wal_state("c");
        assert_eq!(s.lag_bytes(), 0);
        assert_eq!(s.lag_seconds(SystemTime::now()), 0.0);
        m.stream_closed("c");
        let later = SystemTime::now() + Duration::from_secs(30);
        let s = m.wal_state("c");
        assert!(!s.connected && s.lag_seconds(later) >= 29.0);
        // An archive no streamer joined since the start: complete up to the start.
        let idle = m.wal_state("other");
        assert!(!idle.connected && idle.lag_seconds(later) >= 29.0);
    }

    #[test]
    fn relay_lag_counts_files_until_a_clean_run() {
        let m = Metrics::new();
        m.relay_started("c", 3, 48);
        m.relay_finished("c", 1, 16, Some("S3 down".into()));
        let r = m.relay_state("c").unwrap_or_default();
        assert_eq!((r.pending_files, r.last_error.is_some()), (2, true));
        m.relay_started("c", 2, 32);
        m.relay_finished("c", 2, 32, None);
        let r = m.relay_state("c").unwrap_or_default();
        assert_eq!(
            (r.pending_files, r.lag_seconds(SystemTime::now())),
            (0, 0.0)
        );
    }
}
