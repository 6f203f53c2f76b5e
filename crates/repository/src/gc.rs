//! Garbage collection: what no backup needs any more is deleted, planned first, then
//! executed.
//!
//! Mark: every manifest of every cluster, the blocklists they name and the blocks those
//! list, plus the blocks the caller protects (those a running backup relies on). Sweep:
//! - packs none of whose blocks is live: their index objects are deleted first, then the
//!   pack (a crash in between leaves a pack no index names: ignored by readers, deleted by
//!   the next collection);
//! - packs no index object names (left by a writer that crashed between pack and index);
//! - blocklists no manifest names.
//!
//! Packs holding live and dead blocks are rewritten when at least a quarter of their bytes
//! is dead: the live blocks go into a new pack (and its index), the index then points to
//! the new pack, and only then are the old index objects and pack deleted; a crash at any
//! point leaves every live block readable from one of the two. Packs with less dead data
//! are kept whole (their dead bytes are reported). The caller must make sure no writer is between writing
//! a pack and its index while the sweep runs (the server holds its collection lock), and
//! must protect the blocks of every backup in progress.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::repository::pack_key;
use crate::{BlockId, BlocklistId, Error, FileKind, PackId, Repository, index};

/// The blocks some manifest (or the caller) needs, in a temporary on-disk table, so that a
/// collection's memory does not grow with the repository.
pub(crate) struct LiveSet {
    db: redb::Database,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

const LIVE: redb::TableDefinition<[u8; BlockId::LEN], ()> = redb::TableDefinition::new("live");

impl LiveSet {
    fn new() -> Result<LiveSet, Error> {
        let dir = tempfile::Builder::new()
            .prefix("klio-gc-")
            .tempdir()
            .map_err(|e| live_err(std::path::Path::new("<temporary directory>"), &e))?;
        let path = dir.path().join("live.redb");
        let db = redb::Database::builder()
            .set_cache_size(16 << 20)
            .create(&path)
            .map_err(|e| live_err(&path, &e))?;
        Ok(LiveSet {
            db,
            path,
            _dir: dir,
        })
    }

    fn insert(&self, ids: &[BlockId]) -> Result<(), Error> {
        let e = |e: &dyn std::fmt::Display| live_err(&self.path, e);
        let mut txn = self.db.begin_write().map_err(|x| e(&x))?;
        txn.set_durability(redb::Durability::None)
            .map_err(|x| e(&x))?;
        {
            let mut t = txn.open_table(LIVE).map_err(|x| e(&x))?;
            for id in ids {
                t.insert(id.as_bytes(), ()).map_err(|x| e(&x))?;
            }
        }
        txn.commit().map_err(|x| e(&x))
    }

    fn contains_many(&self, ids: &[BlockId]) -> Result<Vec<bool>, Error> {
        use redb::ReadableDatabase;
        let e = |e: &dyn std::fmt::Display| live_err(&self.path, e);
        let txn = self.db.begin_read().map_err(|x| e(&x))?;
        let t = match txn.open_table(LIVE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![false; ids.len()]),
            Err(x) => return Err(e(&x)),
        };
        ids.iter()
            .map(|id| Ok(t.get(id.as_bytes()).map_err(|x| e(&x))?.is_some()))
            .collect()
    }

    fn len(&self) -> Result<u64, Error> {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        let e = |e: &dyn std::fmt::Display| live_err(&self.path, e);
        let txn = self.db.begin_read().map_err(|x| e(&x))?;
        match txn.open_table(LIVE) {
            Ok(t) => t.len().map_err(|x| e(&x)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(x) => Err(e(&x)),
        }
    }
}

fn live_err(path: &std::path::Path, e: &dyn std::fmt::Display) -> Error {
    Error::IndexCache {
        path: path.display().to_string(),
        reason: format!("garbage collection's live set: {e}"),
        disk_full: false,
    }
}

impl std::fmt::Debug for LiveSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSet").field("path", &self.path).finish()
    }
}

/// What a collection would delete.
#[derive(Clone, Debug, Default)]
pub struct GcPlan {
    /// Blocks some manifest (or the caller) needs.
    pub live_blocks: usize,
    /// Packs to delete, with the index objects naming them.
    pub dead_packs: Vec<DeadPack>,
    /// Packs no index object names.
    pub unindexed_packs: Vec<String>,
    /// Blocklist objects no manifest names.
    pub dead_blocklists: Vec<String>,
    /// Packs with live and dead blocks whose live blocks will be rewritten.
    pub repack: Vec<Repack>,
    /// Packs kept as they are although some of their blocks are dead, and those bytes.
    pub mixed_packs: usize,
    pub mixed_dead_bytes: u64,
    /// Bytes of the block frames the plan deletes (packs it deletes entirely).
    pub reclaimable_bytes: u64,
    /// The live blocks, for rewriting mixed packs.
    live: Option<std::sync::Arc<LiveSet>>,
    /// The handle's garbage events when the plan began.
    events: u64,
}

/// A pack whose blocks are all dead.
#[derive(Clone, Debug)]
pub struct DeadPack {
    pub pack: String,
    pub indexes: Vec<String>,
    pub pack_id: PackId,
    pub bytes: u64,
}

/// A pack whose live blocks are rewritten into a new pack before it is deleted.
#[derive(Clone, Debug)]
pub struct Repack {
    pub pack: String,
    pub indexes: Vec<String>,
    pub pack_id: PackId,
    /// How many of its blocks are live (and will be moved).
    pub live_blocks: usize,
    pub dead_bytes: u64,
}

/// Share of dead bytes from which a mixed pack is rewritten.
pub const REPACK_DEAD_SHARE: f64 = 0.25;

/// What a collection deleted.
#[derive(Clone, Debug, Default)]
pub struct GcReport {
    pub packs_deleted: usize,
    pub packs_rewritten: usize,
    pub blocks_moved: usize,
    pub indexes_deleted: usize,
    pub blocklists_deleted: usize,
    pub bytes_reclaimed: u64,
}

/// What a repository handle knows about its garbage: how many times something may have
/// become garbage since it was opened (a backup deleted, a write abandoned), and how many of
/// those the last complete collection had seen, and when it ran.
///
/// The index cache also records, durably, that the repository holds no garbage: set by a
/// complete collection when no writer is half-way, removed before the next write of a
/// pack, blocklist or manifest and before a backup is deleted. A handle opened on a
/// repository so recorded (or just created) starts with no collection due; any other
/// starts with one due, since a crash may have left garbage.
#[derive(Debug)]
pub(crate) struct GarbageWatch {
    events: AtomicU64,
    collected: Mutex<(u64, Option<Instant>)>,
    /// Pack writers that wrote a pack and have not finished.
    active_writers: AtomicUsize,
    /// The index cache records the repository as holding no garbage.
    clean_on_disk: AtomicBool,
}

impl GarbageWatch {
    /// `clean`: the repository is known to hold no garbage.
    pub(crate) fn new(clean: bool) -> GarbageWatch {
        GarbageWatch {
            events: AtomicU64::new(u64::from(!clean)),
            collected: Mutex::new((0, clean.then(Instant::now))),
            active_writers: AtomicUsize::new(0),
            clean_on_disk: AtomicBool::new(clean),
        }
    }
}

impl Repository {
    /// Deletes one backup: its manifest, the single object that makes it exist. What it
    /// referenced becomes garbage for the next collection.
    pub fn delete_backup(&self, cluster: &str, backup_id: &crate::BackupId) -> Result<(), Error> {
        crate::validate_cluster_name(cluster)?;
        self.before_write()?;
        let deleted = self
            .store()
            .delete(&crate::repository::manifest_key(cluster, backup_id));
        // Even a failed delete may have happened.
        self.note_garbage();
        deleted
    }

    /// Called before anything is written that could end up unreferenced (a pack, a
    /// blocklist, a manifest) or before a backup is deleted: the index cache stops
    /// recording the repository as free of garbage, so that a crash in between leaves a
    /// collection due.
    pub(crate) fn before_write(&self) -> Result<(), Error> {
        let w = self.inner_garbage();
        if w.clean_on_disk.load(Ordering::SeqCst) {
            self.index().set_gc_clean(false)?;
            w.clean_on_disk.store(false, Ordering::SeqCst);
        }
        Ok(())
    }

    /// A pack writer wrote its first pack (`true`), or finished or was dropped after that.
    pub(crate) fn writer_active(&self, active: bool) {
        let w = &self.inner_garbage().active_writers;
        if active {
            w.fetch_add(1, Ordering::SeqCst);
        } else {
            w.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Records a repository just created as holding no garbage.
    pub(crate) fn record_clean(&self) -> Result<(), Error> {
        let events = self.inner_garbage().events.load(Ordering::SeqCst);
        self.record_collected(events, true)
    }

    /// Records a complete collection, or a new repository, that accounted for the first
    /// `events` garbage events; `clean`: nothing was half-way, so the repository holds no
    /// garbage and the index cache records it (a restart then needs no collection).
    fn record_collected(&self, events: u64, clean: bool) -> Result<(), Error> {
        let w = self.inner_garbage();
        *w.collected.lock().unwrap_or_else(PoisonError::into_inner) =
            (events, Some(Instant::now()));
        if clean {
            self.index().set_gc_clean(true)?;
            w.clean_on_disk.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Records that something may have become garbage: a backup session that ended without
    /// a manifest (its packs are referenced by nothing), a copy that failed half-way. A
    /// pack writer dropped without [`finish`](crate::PackWriter::finish) and
    /// [`delete_backup`](Self::delete_backup) record it themselves.
    pub fn note_garbage(&self) {
        self.inner_garbage().events.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a collection is worth running: something may have become garbage since the
    /// last complete collection by this handle, or that collection is older than `max_age`
    /// (a client can upload blocks that its committed backup never names; only a
    /// collection finds them), or none ran yet.
    pub fn gc_due(&self, max_age: Duration) -> bool {
        let w = self.inner_garbage();
        let (seen, at) = *w.collected.lock().unwrap_or_else(PoisonError::into_inner);
        seen != w.events.load(Ordering::SeqCst) || at.is_none_or(|t| t.elapsed() >= max_age)
    }

    /// Plans a collection. `protected` blocks are kept as if a manifest named them. Memory
    /// does not grow with the repository: the live blocks go to a temporary on-disk table,
    /// index objects are read one at a time.
    pub fn gc_plan(&self, protected: &HashSet<BlockId>) -> Result<GcPlan, Error> {
        // Taken first: whatever becomes garbage while the plan is made counts for the next.
        let events = self.inner_garbage().events.load(Ordering::SeqCst);
        let live = LiveSet::new()?;
        let protected: Vec<BlockId> = protected.iter().copied().collect();
        live.insert(&protected)?;
        let mut live_lists: HashSet<BlocklistId> = HashSet::new();
        for cluster in self.list_clusters()? {
            for id in self.list_manifests(&cluster)? {
                // An unreadable manifest stops the collection: what it needs is unknown.
                let m = self.get_manifest(&cluster, &id)?;
                let repo = self.in_domain(&m.domain)?;
                let mut wholes = Vec::new();
                for f in &m.files {
                    match &f.kind {
                        FileKind::Whole { block } => wholes.push(*block),
                        FileKind::Listed { blocks, .. } => wholes.extend(blocks.iter()),
                        FileKind::Blocks { blocklists, .. } => {
                            for l in blocklists {
                                if live_lists.insert(*l) {
                                    live.insert(&repo.get_blocklist(l)?)?;
                                }
                            }
                        }
                        FileKind::Symlink { .. } | FileKind::Directory => {}
                    }
                }
                live.insert(&wholes)?;
            }
        }
        let mut plan = GcPlan {
            live_blocks: live.len()? as usize,
            events,
            ..GcPlan::default()
        };

        // Per pack: the index objects naming it, its blocks, live blocks and frame bytes.
        struct PackStat {
            indexes: Vec<String>,
            blocks: usize,
            live: usize,
            bytes: u64,
        }
        let mut named: HashMap<PackId, PackStat> = HashMap::new();
        for key in self.store().list("index/")? {
            let Some(sections) = index::read_object(self.store(), self.master(), &key)? else {
                continue;
            };
            for s in sections {
                if let Some(stat) = named.get_mut(&s.pack) {
                    // Another index object naming the same pack: the same blocks.
                    stat.indexes.push(key.clone());
                    continue;
                }
                let ids: Vec<BlockId> = s.blocks.iter().map(|(id, _)| *id).collect();
                let alive = live.contains_many(&ids)?.into_iter().filter(|l| *l).count();
                named.insert(
                    s.pack,
                    PackStat {
                        indexes: vec![key.clone()],
                        blocks: ids.len(),
                        live: alive,
                        // Each frame once: the blocks of a run share theirs.
                        bytes: s
                            .blocks
                            .iter()
                            .enumerate()
                            .filter(|(i, (_, l))| *i == 0 || s.blocks[i - 1].1.offset != l.offset)
                            .map(|(_, (_, l))| u64::from(l.len))
                            .sum(),
                    },
                );
            }
        }
        for (pack_id, stat) in &named {
            if stat.live == 0 {
                plan.reclaimable_bytes += stat.bytes;
                plan.dead_packs.push(DeadPack {
                    pack: pack_key(pack_id),
                    indexes: stat.indexes.clone(),
                    pack_id: *pack_id,
                    bytes: stat.bytes,
                });
            } else if stat.live < stat.blocks {
                let dead_share = 1.0 - stat.live as f64 / stat.blocks as f64;
                let dead_bytes = (stat.bytes as f64 * dead_share) as u64;
                if dead_share >= REPACK_DEAD_SHARE {
                    plan.reclaimable_bytes += dead_bytes;
                    plan.repack.push(Repack {
                        pack: pack_key(pack_id),
                        indexes: stat.indexes.clone(),
                        pack_id: *pack_id,
                        live_blocks: stat.live,
                        dead_bytes,
                    });
                } else {
                    plan.mixed_packs += 1;
                    plan.mixed_dead_bytes += dead_bytes;
                }
            }
        }
        plan.live = Some(std::sync::Arc::new(live));
        plan.dead_packs.sort_by(|a, b| a.pack.cmp(&b.pack));
        for key in self.store().list("packs/")? {
            let id = key
                .rsplit('/')
                .next()
                .and_then(|s| s.parse::<PackId>().ok());
            if id.is_some_and(|id| !named.contains_key(&id)) {
                plan.unindexed_packs.push(key);
            }
        }
        for key in self.store().list("blocklists/")? {
            let id = key
                .rsplit('/')
                .next()
                .and_then(|s| s.parse::<BlocklistId>().ok());
            if id.is_some_and(|id| !live_lists.contains(&id)) {
                plan.dead_blocklists.push(key);
            }
        }
        Ok(plan)
    }

    /// Executes a plan made by [`gc_plan`](Self::gc_plan) with the same protection, with no
    /// backup committed in between (the server holds its collection lock across both).
    pub fn gc_execute(&self, plan: &GcPlan) -> Result<GcReport, Error> {
        let mut report = GcReport::default();
        for dead in &plan.dead_packs {
            // Forget the blocks first, so nothing is read from or deduplicated against a
            // pack being deleted; then the index objects; then the pack.
            self.index_remove_pack(&dead.pack_id)?;
            for key in &dead.indexes {
                self.store().delete(key)?;
                report.indexes_deleted += 1;
            }
            self.store().delete(&dead.pack)?;
            report.packs_deleted += 1;
            report.bytes_reclaimed += dead.bytes;
        }
        if !plan.repack.is_empty() {
            // A pack holds the blocks of one dedup domain; so does each rewritten pack.
            let mut writers: std::collections::BTreeMap<crate::Domain, crate::PackWriter> =
                std::collections::BTreeMap::new();
            let live = plan.live.as_ref().ok_or_else(|| {
                live_err(
                    std::path::Path::new("<gc plan>"),
                    &"a plan to rewrite packs carries its live set",
                )
            })?;
            for r in &plan.repack {
                let domain = self.pack_domain(&r.pack_id)?.unwrap_or_default();
                let repo = self.in_domain(&domain)?;
                let writer = writers
                    .entry(domain)
                    .or_insert_with(|| crate::PackWriter::relocating(repo.clone()));
                // The pack's blocks, from its first readable index object; the live ones move.
                let mut ids: Vec<BlockId> = Vec::new();
                for key in &r.indexes {
                    let Some(sections) = index::read_object(self.store(), self.master(), key)?
                    else {
                        continue;
                    };
                    if let Some(s) = sections.into_iter().find(|s| s.pack == r.pack_id) {
                        ids = s.blocks.into_iter().map(|(id, _)| id).collect();
                        break;
                    }
                }
                let alive: Vec<BlockId> = ids
                    .iter()
                    .zip(live.contains_many(&ids)?)
                    .filter_map(|(id, alive)| alive.then_some(*id))
                    .collect();
                report.blocks_moved += move_blocks(&repo, writer, &alive)? as usize;
            }
            // The new packs are durable and the index points to them before anything goes.
            for writer in writers.into_values() {
                writer.finish()?;
            }
            for r in &plan.repack {
                // What still points to the old pack are its dead blocks: forget them, or a
                // later backup would count them as stored.
                self.index_remove_pack(&r.pack_id)?;
                for key in &r.indexes {
                    self.store().delete(key)?;
                    report.indexes_deleted += 1;
                }
                self.store().delete(&r.pack)?;
                report.packs_rewritten += 1;
                report.bytes_reclaimed += r.dead_bytes;
            }
        }
        for key in &plan.unindexed_packs {
            self.store().delete(key)?;
            report.packs_deleted += 1;
        }
        for key in &plan.dead_blocklists {
            self.store().delete(key)?;
            report.blocklists_deleted += 1;
        }
        self.forget_blocklists(
            plan.dead_blocklists
                .iter()
                .filter_map(|k| k.rsplit('/').next()?.parse::<BlocklistId>().ok()),
        );
        let w = self.inner_garbage();
        let nothing_half_way = w.events.load(Ordering::SeqCst) == plan.events
            && w.active_writers.load(Ordering::SeqCst) == 0;
        self.record_collected(plan.events, nothing_half_way)?;
        Ok(report)
    }
}

/// Plaintext bytes of the runs a collection writes when it moves blocks.
const MOVE_RUN_BYTES: usize = 512 << 10;

/// Copies blocks `ids` into `writer` (a relocating writer): each frame read and decompressed
/// once, each block checked against its id, and the blocks written again as runs of up to
/// [`MOVE_RUN_BYTES`]. Returns how many were moved.
fn move_blocks(
    repo: &Repository,
    writer: &mut crate::PackWriter,
    ids: &[BlockId],
) -> Result<u64, Error> {
    let mut moved = 0u64;
    let mut run: Vec<(BlockId, u32)> = Vec::new();
    let mut plain: Vec<u8> = Vec::new();
    let mut flush = |run: &mut Vec<(BlockId, u32)>, plain: &mut Vec<u8>| -> Result<(), Error> {
        if !run.is_empty() {
            moved += writer.add_run(run, plain, None)?;
            run.clear();
            plain.clear();
        }
        Ok(())
    };
    for chunk in ids.chunks(4096) {
        let payloads = repo.read_block_payloads(chunk)?;
        let mut frame: Option<((crate::PackId, u32), Vec<u8>)> = None;
        for p in payloads {
            let corrupt = |reason| Error::BlockCorrupt {
                block: p.id,
                pack: pack_key(&p.frame.0),
                reason,
            };
            if frame.as_ref().is_none_or(|(f, _)| *f != p.frame) {
                frame = Some((p.frame, p.frame_plaintext().map_err(corrupt)?));
            }
            let Some((_, bytes)) = &frame else { continue };
            let block = crate::pack::block_in_frame(repo, bytes, &p.id, p.inner, p.plain_len)
                .map_err(corrupt)?;
            if !run.is_empty() && plain.len() + block.len() > MOVE_RUN_BYTES {
                flush(&mut run, &mut plain)?;
            }
            run.push((p.id, p.plain_len));
            plain.extend_from_slice(block);
        }
    }
    flush(&mut run, &mut plain)?;
    Ok(moved)
}
