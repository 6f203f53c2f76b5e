//! The work the queue carries: Tier 2 relays of WAL and backups, retention and garbage
//! collection, and the scheduler that enqueues them.
//!
//! Every handler is idempotent (tasks are delivered at least once): a relay copies only
//! what Tier 2 lacks (Tier 2's listing is the record of what it holds, so a relay that
//! crashed resumes where it stopped), and objects are written create-only.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use klio_proto::backup::v1 as pb;
use klio_queue::{BoxFuture, Handler, Task, kinds};
use klio_repository::{BackupId, BlockId, BlockPayload, FileKind, FramedBlock, PackId, Repository};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::BackupService;
use crate::context::{Context, gc_task, retention_task, wal_relay_task};
use crate::tier2::Tier2;

/// How far the relay of one cluster got, in `<data-dir>/tier2-progress/<cluster>.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProgressRecord {
    wal_files_relayed: u64,
    wal_bytes_relayed: u64,
    last_wal_relayed: String,
    backups_relayed: u64,
    last_backup_relayed: String,
    updated_at: String,
    last_error: String,
}

/// The relay progress records.
#[derive(Clone)]
pub struct Progress {
    dir: PathBuf,
    lock: Arc<std::sync::Mutex<()>>,
}

impl Progress {
    pub fn open(dir: PathBuf) -> anyhow::Result<Progress> {
        klio_durable::create_dir_all_durable(&dir)
            .with_context(|| format!("create \"{}\"", dir.display()))?;
        Ok(Progress {
            dir,
            lock: Arc::default(),
        })
    }

    fn update(&self, cluster: &str, change: impl FnOnce(&mut ProgressRecord)) {
        // The file is named after the cluster: only a valid name (a single path component).
        if let Err(e) = klio_repository::validate_cluster_name(cluster) {
            tracing::warn!(cluster = %cluster.escape_debug(), error = %e, "relay progress not recorded");
            return;
        }
        let _g = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = self.dir.join(format!("{cluster}.json"));
        let mut r: ProgressRecord = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        change(&mut r);
        r.updated_at = now();
        let written = serde_json::to_vec_pretty(&r)
            .map_err(anyhow::Error::from)
            .and_then(|j| Ok(klio_durable::write_atomic(&path, &j, 0o600)?));
        if let Err(e) = written {
            tracing::warn!(%cluster, error = %e, "could not record relay progress");
        }
    }

    /// Every cluster's record.
    pub fn all(&self) -> anyhow::Result<Vec<pb::RelayProgress>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let path = e?.path();
            let Some(cluster) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let r: ProgressRecord = serde_json::from_slice(&std::fs::read(&path)?)
                .with_context(|| format!("parse \"{}\"", path.display()))?;
            out.push(pb::RelayProgress {
                cluster: cluster.to_string(),
                wal_files_relayed: r.wal_files_relayed,
                wal_bytes_relayed: r.wal_bytes_relayed,
                last_wal_relayed: r.last_wal_relayed,
                backups_relayed: r.backups_relayed,
                last_backup_relayed: r.last_backup_relayed,
                updated_at: r.updated_at,
                last_error: r.last_error,
            });
        }
        out.sort_by(|a, b| a.cluster.cmp(&b.cluster));
        Ok(out)
    }
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Runs the queue's tasks.
pub struct Tasks {
    pub ctx: Context,
    pub backup: BackupService,
    /// Files (WAL) or block batches (backups) copied at once.
    pub jobs: usize,
}

/// Checks a task from the queue before anything runs: its kind is known, its cluster a valid
/// cluster name (the relay records progress in a file named after it), its payload of the
/// expected shape. Whoever can write to the queue must not reach past these.
pub fn check_task(task: &Task) -> Result<(), String> {
    let tier = || match task.payload.get("tier") {
        None => Ok(()),
        Some(t) if t.as_u64().is_some_and(|t| t == 1 || t == 2) => Ok(()),
        Some(t) => Err(format!(
            "task \"{}\": tier {t} is neither 1 nor 2",
            task.id.escape_debug()
        )),
    };
    let cluster = || {
        klio_repository::validate_cluster_name(&task.cluster)
            .map_err(|e| format!("task \"{}\": {e}", task.id.escape_debug()))
    };
    match task.kind.as_str() {
        kinds::WAL_RELAY => cluster(),
        kinds::BACKUP_RELAY => {
            cluster()?;
            let id = task.payload["backup_id"]
                .as_str()
                .ok_or_else(|| format!("task \"{}\" names no backup_id", task.id.escape_debug()))?;
            BackupId::new(id)
                .map(|_| ())
                .map_err(|e| format!("task \"{}\": {e}", task.id.escape_debug()))
        }
        kinds::RETENTION => {
            cluster()?;
            tier()
        }
        kinds::GC if task.cluster == "all" => tier(),
        kinds::GC => Err(format!(
            "task \"{}\": a garbage collection is repository-wide, its cluster must be \"all\"",
            task.id.escape_debug()
        )),
        other => Err(format!(
            "task \"{}\": unknown kind \"{}\"",
            task.id.escape_debug(),
            other.escape_debug()
        )),
    }
}

impl Handler for Tasks {
    fn check(&self, task: &Task) -> Result<(), String> {
        check_task(task)
    }

    fn handle<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.ctx.metrics.task_in_flight(1);
            let result = self.run(task).await;
            self.ctx.metrics.task_in_flight(-1);
            if result.is_err() && task.kind == kinds::BACKUP_RELAY {
                self.ctx.metrics.backup_relay_failed(&task.cluster);
            }
            if let (Err(e), Some(p)) = (&result, &self.ctx.progress)
                && (task.kind == kinds::WAL_RELAY || task.kind == kinds::BACKUP_RELAY)
            {
                let msg = format!("{e:#}");
                p.update(&task.cluster, |r| r.last_error = msg);
            }
            result.map_err(|e| {
                tracing::warn!(task = %task.id, error = %format!("{e:#}"), "task failed");
                format!("{e:#}")
            })
        })
    }
}

/// A service error as the attempt's error (its message, without the gRPC code).
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

#[cfg(test)]
mod task_tests {
    use klio_queue::Task;
    use serde_json::json;

    use super::*;

    #[test]
    fn tasks_from_the_queue_are_checked_before_they_run() {
        let ok = [
            Task::new("a", kinds::WAL_RELAY, "pg", json!({})),
            Task::new(
                "b",
                kinds::BACKUP_RELAY,
                "pg",
                json!({"backup_id": "backup-20261207101500"}),
            ),
            Task::new("c", kinds::RETENTION, "pg", json!({"tier": 2})),
            Task::new("d", kinds::GC, "all", json!({"tier": 1})),
        ];
        for t in &ok {
            assert_eq!(check_task(t), Ok(()), "{t:?}");
        }
        let bad = [
            (
                Task::new("e", kinds::WAL_RELAY, "../keys", json!({})),
                "cluster name",
            ),
            (
                Task::new("f", kinds::WAL_RELAY, "a/b", json!({})),
                "cluster name",
            ),
            (
                Task::new(
                    "g",
                    kinds::BACKUP_RELAY,
                    "pg",
                    json!({"backup_id": "../../x"}),
                ),
                "backup",
            ),
            (
                Task::new("h", kinds::BACKUP_RELAY, "pg", json!({})),
                "names no backup_id",
            ),
            (
                Task::new("i", kinds::RETENTION, "pg", json!({"tier": 7})),
                "neither 1 nor 2",
            ),
            (
                Task::new("j", kinds::GC, "pg", json!({"tier": 1})),
                "repository-wide",
            ),
            (Task::new("k", "rm-rf", "pg", json!({})), "unknown kind"),
        ];
        for (t, why) in &bad {
            let e = check_task(t).expect_err("refused");
            assert!(e.contains(why), "{t:?}: {e}");
        }
    }

    /// Tasks as anyone who can publish to the queue might write them: whatever parses as a
    /// task is either refused or names a valid cluster (a single path component).
    #[test]
    fn generated_tasks_are_refused_or_name_a_valid_cluster() {
        let pieces = [
            "pg",
            "..",
            "/",
            "a.b",
            "-x",
            "keys",
            "all",
            "é",
            "\u{0}",
            "backup-20261207101500",
            "A",
            "1",
            "",
        ];
        let kinds_ = [
            kinds::WAL_RELAY,
            kinds::BACKUP_RELAY,
            kinds::RETENTION,
            kinds::GC,
            "x",
        ];
        let mut x = 0x5EED_7A5Cu64;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for _ in 0..50_000 {
            let cluster: String = (0..1 + next(3))
                .map(|_| pieces[next(pieces.len())])
                .collect();
            let id: String = (0..next(3)).map(|_| pieces[next(pieces.len())]).collect();
            let payload = match next(4) {
                0 => json!({}),
                1 => json!({"tier": next(4)}),
                2 => json!({"backup_id": id}),
                _ => json!({"tier": "2", "backup_id": 7}),
            };
            let text = json!({"id": "t", "kind": kinds_[next(kinds_.len())], "cluster": cluster, "payload": payload}).to_string();
            let Ok(task) = serde_json::from_str::<Task>(&text) else {
                continue;
            };
            if check_task(&task).is_ok() && task.kind != kinds::GC {
                klio_repository::validate_cluster_name(&task.cluster).expect("checked");
                assert!(!task.cluster.contains('/') && task.cluster != "..");
            }
        }
    }
}

fn tier_of(task: &Task) -> u32 {
    task.payload["tier"].as_u64().unwrap_or(1) as u32
}

impl Tasks {
    async fn run(&self, task: &Task) -> anyhow::Result<()> {
        match task.kind.as_str() {
            kinds::WAL_RELAY => self.relay_wal(&task.cluster).await,
            kinds::BACKUP_RELAY => {
                let id = task.payload["backup_id"]
                    .as_str()
                    .context("the task names no backup_id")?;
                self.relay_backup(&task.cluster, &BackupId::new(id)?).await
            }
            kinds::RETENTION => {
                let tier = tier_of(task);
                let settings = self.ctx.settings.as_ref().context("no settings")?;
                let s = settings.get(&task.cluster);
                let Some(overrides) = (if tier == 2 {
                    s.tier2_retention
                } else {
                    s.tier1_retention
                }) else {
                    return Ok(());
                };
                let policy = klio_retention::Policy::merged(&overrides);
                let r = self
                    .backup
                    .retention_run(task.cluster.clone(), policy, false, tier)
                    .await
                    .map_err(status_error)?;
                tracing::info!(cluster = %task.cluster, tier, expired = r.deleted_backups.len(), wal_removed = r.deleted_wal.len(), "scheduled retention applied");
                Ok(())
            }
            kinds::GC => {
                self.backup
                    .collect_garbage(tier_of(task), false)
                    .await
                    .map_err(status_error)?;
                Ok(())
            }
            other => anyhow::bail!("unknown task kind \"{other}\""),
        }
    }

    /// Copies every archived WAL file of `cluster` that Tier 2 lacks, `jobs` at a time, then
    /// enqueues the relay of any backup Tier 2 lacks.
    #[tracing::instrument(name = "klio.relay.wal", skip(self))]
    async fn relay_wal(&self, cluster: &str) -> anyhow::Result<()> {
        let t2 = self.ctx.tier2().await.map_err(status_error)?;
        let wal = self.ctx.wal.clone().context("no Tier 1 WAL store")?;
        let cw = wal.cluster(cluster)?;
        let listed = {
            let (cw, t2, c) = (cw.clone(), t2.clone(), cluster.to_string());
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let Some(meta) = cw.meta()? else {
                    return Ok((Vec::new(), t2, 0));
                };
                t2.ensure_meta(&c, &meta)?;
                let have = t2.files(&c)?;
                let todo: Vec<String> = cw
                    .list_files()?
                    .into_iter()
                    .filter(|n| !have.contains(n))
                    .collect();
                Ok((todo, t2, meta.segment_size))
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r)
        };
        let (todo, t2c, segment_size) = match listed {
            Ok(l) => l,
            Err(e) => {
                self.ctx
                    .metrics
                    .relay_finished(cluster, 0, 0, Some(format!("{e:#}")));
                return Err(e);
            }
        };
        self.ctx.metrics.relay_started(
            cluster,
            todo.len() as u64,
            todo.len() as u64 * segment_size,
        );
        if !todo.is_empty() {
            tracing::debug!(%cluster, files = todo.len(), "relaying WAL to Tier 2");
        }
        let source = t2c.clone();
        let mut copies = futures::stream::iter(todo.into_iter().map(move |name| {
            let (cw, t2, c) = (cw.clone(), source.clone(), cluster.to_string());
            tokio::task::spawn_blocking(move || -> anyhow::Result<Option<(String, u64)>> {
                // Gone since the listing (retention): nothing to copy.
                let Some(data) = cw.read(&name, false)? else {
                    return Ok(None);
                };
                let bytes = t2.put_file(&c, &name, &data)?;
                Ok(Some((name, bytes)))
            })
        }))
        .buffer_unordered(self.jobs.max(1));
        let mut result = Ok(());
        let (mut files, mut bytes, mut last) = (0u64, 0u64, String::new());
        while let Some(r) = copies.next().await {
            match r.context("a relay thread failed").and_then(|r| r) {
                Ok(Some((name, b))) => {
                    files += 1;
                    bytes += b;
                    last = last.max(name);
                }
                Ok(None) => {}
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        self.ctx.metrics.relay_finished(
            cluster,
            files,
            bytes,
            result.as_ref().err().map(|e| format!("{e:#}")),
        );
        if files > 0
            && let Some(p) = &self.ctx.progress
        {
            p.update(cluster, |r| {
                r.wal_files_relayed += files;
                r.wal_bytes_relayed += bytes;
                if last > r.last_wal_relayed {
                    r.last_wal_relayed = last;
                }
                r.last_error.clear();
            });
        }
        result?;
        // Backups Tier 1 has and Tier 2 lacks (a commit whose enqueue was lost, a server
        // that gained Tier 2): each gets a relay task.
        let repo = self.backup.repo().clone();
        let c = cluster.to_string();
        let missing = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<BackupId>> {
            let there: HashSet<BackupId> = t2c.repo.list_manifests(&c)?.into_iter().collect();
            Ok(repo
                .list_manifests(&c)?
                .into_iter()
                .filter(|id| !there.contains(id))
                .collect())
        })
        .await??;
        for id in missing {
            self.ctx
                .enqueue(crate::context::backup_relay_task(cluster, id.as_str()))
                .await;
        }
        Ok(())
    }

    /// Copies one backup to Tier 2: the blocks Tier 2 lacks (each decompressed and checked
    /// against its id on the way), then the blocklists, then the manifest.
    #[tracing::instrument(name = "klio.relay.backup", skip(self, id), fields(backup_id = %id))]
    async fn relay_backup(&self, cluster: &str, id: &BackupId) -> anyhow::Result<()> {
        let t2 = self.ctx.tier2().await.map_err(status_error)?;
        // Tier 2's collection waits for the relay; Tier 1's is only held off while blocks
        // are read (it may move them between packs).
        let _t2_shared = t2.gc_lock.clone().read_owned().await;
        let t1 = self.backup.repo().clone();
        let t1_gc = self.backup.gc_lock();
        let (c, id2, jobs) = (cluster.to_string(), id.clone(), self.jobs.max(1));
        let t2c = t2.clone();
        let copied =
            tokio::task::spawn_blocking(move || copy_backup(&t1, &t1_gc, &t2c, &c, &id2, jobs))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
                .inspect_err(|_| {
                    // Packs of a copy that stopped half-way are named by no manifest.
                    t2.repo.note_garbage();
                })?;
        if let Some(stats) = copied {
            tracing::info!(%cluster, backup = %id, blocks = stats.0, bytes = stats.1, location = %t2.location(), "backup relayed to Tier 2");
            if let Some(p) = &self.ctx.progress {
                p.update(cluster, |r| {
                    r.backups_relayed += 1;
                    if id.as_str() > r.last_backup_relayed.as_str() {
                        r.last_backup_relayed = id.to_string();
                    }
                    r.last_error.clear();
                });
            }
        }
        Ok(())
    }
}

/// Blocks read from Tier 1 per call.
const RELAY_BATCH: usize = 2048;
/// The fewest blocks a backup relay gives one job (32 MiB of 8 KiB pages).
const MIN_BLOCKS_PER_JOB: usize = 4096;

/// The backup copy (blocking). `None` when Tier 2 already had it, else (blocks copied,
/// bytes of their packs).
fn copy_backup(
    t1: &Repository,
    t1_gc: &tokio::sync::RwLock<()>,
    t2: &Tier2,
    cluster: &str,
    id: &BackupId,
    jobs: usize,
) -> anyhow::Result<Option<(u64, u64)>> {
    if t2.repo.list_manifests(cluster)?.contains(id) {
        return Ok(None);
    }
    let manifest = match t1.get_manifest(cluster, id) {
        Ok(m) => m,
        // Expired from Tier 1 before the relay ran: nothing to copy any more.
        Err(klio_repository::Error::BackupNotFound { .. }) => {
            tracing::warn!(%cluster, backup = %id, "backup gone from Tier 1 before its relay");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    // Both tiers hold the backup's blocks in its dedup domain.
    let t1 = &t1.in_domain(&manifest.domain)?;
    let t2_repo = &t2.repo.in_domain(&manifest.domain)?;
    // Copied a bounded batch at a time (blocks, then the blocklists naming them), so memory
    // does not grow with the size of the backup.
    let mut batch = RelayBatch::default();
    let (mut blocks, mut bytes) = (0, 0);
    let mut flush = |batch: &mut RelayBatch| -> anyhow::Result<()> {
        let (b, n) = batch.copy(t1, t1_gc, t2_repo, jobs)?;
        blocks += b;
        bytes += n;
        Ok(())
    };
    for f in &manifest.files {
        match &f.kind {
            FileKind::Whole { block } => batch.want(t2_repo, std::slice::from_ref(block))?,
            FileKind::Listed { blocks, .. } => batch.want(t2_repo, blocks)?,
            FileKind::Blocks { blocklists, .. } => {
                for l in blocklists {
                    let ids = t1.get_blocklist(l)?;
                    batch.want(t2_repo, &ids)?;
                    batch.listed += ids.len();
                    batch.lists.push((*l, ids));
                    if batch.listed >= RELAY_BATCH_IDS {
                        flush(&mut batch)?;
                    }
                }
            }
            FileKind::Symlink { .. } | FileKind::Directory => {}
        }
    }
    flush(&mut batch)?;
    t2_repo.put_manifest(&manifest)?;
    Ok(Some((blocks, bytes)))
}

/// Block ids listed by the blocklists of one relay batch.
const RELAY_BATCH_IDS: usize = 1 << 20;

/// What one batch of a backup relay copies: the blocks Tier 2 lacks, then the blocklists.
#[derive(Default)]
struct RelayBatch {
    needed: Vec<BlockId>,
    seen: HashSet<BlockId>,
    lists: Vec<(klio_repository::BlocklistId, Vec<BlockId>)>,
    listed: usize,
}

impl RelayBatch {
    /// Adds the blocks of `ids` that Tier 2 lacks.
    fn want(&mut self, t2: &Repository, ids: &[BlockId]) -> anyhow::Result<()> {
        for (id, stored) in ids.iter().zip(t2.has_blocks(ids)?) {
            if !stored && self.seen.insert(*id) {
                self.needed.push(*id);
            }
        }
        Ok(())
    }

    /// Copies the batch's blocks (`jobs` streams), then writes its blocklists to Tier 2;
    /// returns (blocks copied, bytes of their packs) and empties the batch.
    fn copy(
        &mut self,
        t1: &Repository,
        t1_gc: &tokio::sync::RwLock<()>,
        t2: &Repository,
        jobs: usize,
    ) -> anyhow::Result<(u64, u64)> {
        let needed = std::mem::take(&mut self.needed);
        let lists = std::mem::take(&mut self.lists);
        self.seen.clear();
        self.listed = 0;
        // Each job fills its own packs: at least a pack's worth of 8 KiB pages per job, so a
        // small backup is not spread over many small packs.
        let per_job = needed.len().div_ceil(jobs).max(MIN_BLOCKS_PER_JOB);
        let started = std::time::Instant::now();
        let results: Vec<anyhow::Result<(u64, u64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = needed
                .chunks(per_job)
                .map(|chunk| s.spawn(move || copy_blocks(t1, t1_gc, t2, chunk)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let (mut blocks, mut bytes) = (0, 0);
        for r in results {
            let (b, n) = r?;
            blocks += b;
            bytes += n;
        }
        let blocks_ms = started.elapsed().as_millis() as u64;
        // Each distinct blocklist once (files with the same content share theirs).
        let mut distinct = HashSet::new();
        let lists: Vec<_> = lists
            .into_iter()
            .filter(|(l, _)| distinct.insert(*l))
            .collect();
        // Blocklists are small objects whose writes wait on the store's latency (one
        // create-only write each): written 4 x `jobs` at a time.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failures: Vec<anyhow::Error> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..(jobs * 4).min(lists.len()))
                .map(|_| {
                    s.spawn(|| -> anyhow::Result<()> {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some((l, ids)) = lists.get(i) else {
                                return Ok(());
                            };
                            let stored = t2.put_blocklist(ids)?;
                            anyhow::ensure!(
                                stored == *l,
                                "blocklist {l} gets another id in Tier 2: the tiers' id keys differ"
                            );
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| {
                    h.join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p))
                        .err()
                })
                .collect()
        });
        if let Some(e) = failures.into_iter().next() {
            return Err(e);
        }
        tracing::debug!(
            blocks,
            bytes,
            blocklists = lists.len(),
            blocks_ms,
            blocklists_ms = started.elapsed().as_millis() as u64 - blocks_ms,
            "relay batch copied"
        );
        Ok((blocks, bytes))
    }
}

fn copy_blocks(
    t1: &Repository,
    t1_gc: &tokio::sync::RwLock<()>,
    t2: &Repository,
    ids: &[BlockId],
) -> anyhow::Result<(u64, u64)> {
    let mut writer = t2.pack_writer();
    let (mut read_t, mut seal_t) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    for batch in ids.chunks(RELAY_BATCH) {
        let t0 = std::time::Instant::now();
        let payloads = {
            let _shared = t1_gc.blocking_read();
            t1.read_block_payloads(batch)?
        };
        read_t += t0.elapsed();
        let t0 = std::time::Instant::now();
        // Each payload comes from a Tier 1 frame that was just authenticated and that Tier
        // 1's index binds to its id (checked when the block was stored, and again by every
        // restore from Tier 2): it is sealed for Tier 2 as it is, not decompressed and
        // hashed again.
        // The blocks of one frame (a run) are sealed together, as one frame again.
        let mut frames: Vec<(BlockPayload, Vec<FramedBlock>)> = Vec::new();
        let mut slot: std::collections::HashMap<(PackId, u32), usize> =
            std::collections::HashMap::new();
        for p in payloads {
            let page = (p.id, p.inner, p.plain_len);
            match slot.get(&p.frame) {
                Some(&i) => frames[i].1.push(page),
                None => {
                    slot.insert(p.frame, frames.len());
                    frames.push((p, vec![page]));
                }
            }
        }
        for (p, mut pages) in frames {
            pages.sort_by_key(|(_, inner, _)| *inner);
            pages.dedup_by_key(|(_, inner, _)| *inner);
            let payload = Vec::<u8>::from(p.payload);
            writer.add_authenticated_run(&pages, p.frame_len, payload, p.compressed)?;
        }
        seal_t += t0.elapsed();
    }
    let t0 = std::time::Instant::now();
    let stats = writer.finish()?;
    tracing::debug!(
        read_ms = read_t.as_millis() as u64,
        seal_ms = seal_t.as_millis() as u64,
        finish_ms = t0.elapsed().as_millis() as u64,
        blocks = ids.len(),
        "relay job"
    );
    Ok((stats.blocks_added, stats.stored_bytes()))
}

/// Enqueues, until `shutdown`: every `relay_interval`, the WAL relay of each cluster that
/// uses Tier 2; every `retention_interval` (unless zero), each cluster's retention in each
/// tier it has a policy for, and the collection of each tier.
pub async fn schedule(
    ctx: Context,
    relay_interval: Duration,
    retention_interval: Duration,
    shutdown: CancellationToken,
) {
    let mut relay = tokio::time::interval(relay_interval.max(Duration::from_millis(100)));
    relay.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retention_every = (!retention_interval.is_zero()).then_some(retention_interval);
    let mut retention = tokio::time::interval(retention_every.unwrap_or(Duration::from_secs(3600)));
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick of an interval is immediate; retention waits a whole interval.
    retention.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = relay.tick() => {
                let Some(settings) = &ctx.settings else { continue };
                if ctx.tier2.is_none() {
                    continue;
                }
                for (cluster, s) in settings.all() {
                    if s.tier2_backup {
                        ctx.enqueue(wal_relay_task(&cluster)).await;
                    }
                }
            }
            _ = retention.tick(), if retention_every.is_some() => {
                let Some(settings) = &ctx.settings else { continue };
                for (cluster, s) in settings.all() {
                    if s.tier1_retention.is_some() {
                        ctx.enqueue(retention_task(&cluster, 1)).await;
                    }
                    if s.tier2_retention.is_some() && ctx.tier2.is_some() {
                        ctx.enqueue(retention_task(&cluster, 2)).await;
                    }
                }
                ctx.enqueue(gc_task(1)).await;
                if ctx.tier2.is_some() {
                    ctx.enqueue(gc_task(2)).await;
                }
            }
        }
    }
}
