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

use klio_crypto::open_object;

use crate::repository::pack_key;
use crate::{BlockId, BlocklistId, Error, FileKind, PackId, Repository, index, sealed_error};

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
    pub live: Vec<BlockId>,
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

impl Repository {
    /// Deletes one backup: its manifest, the single object that makes it exist. What it
    /// referenced becomes garbage for the next collection.
    pub fn delete_backup(&self, cluster: &str, backup_id: &crate::BackupId) -> Result<(), Error> {
        crate::validate_cluster_name(cluster)?;
        self.store()
            .delete(&crate::repository::manifest_key(cluster, backup_id))
    }

    /// Plans a collection. `protected` blocks are kept as if a manifest named them.
    pub fn gc_plan(&self, protected: &HashSet<BlockId>) -> Result<GcPlan, Error> {
        let mut live: HashSet<BlockId> = protected.clone();
        let mut live_lists: HashSet<BlocklistId> = HashSet::new();
        for cluster in self.list_clusters()? {
            for id in self.list_manifests(&cluster)? {
                // An unreadable manifest stops the collection: what it needs is unknown.
                let m = self.get_manifest(&cluster, &id)?;
                let repo = self.in_domain(&m.domain)?;
                for f in &m.files {
                    match &f.kind {
                        FileKind::Whole { block } => {
                            live.insert(*block);
                        }
                        FileKind::Blocks { blocklists, .. } => {
                            for l in blocklists {
                                if live_lists.insert(*l) {
                                    live.extend(repo.get_blocklist(l)?);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        let mut plan = GcPlan {
            live_blocks: live.len(),
            ..GcPlan::default()
        };

        // Which index objects name which packs, and the blocks of each pack.
        let mut named: HashMap<PackId, (Vec<String>, HashSet<BlockId>, u64)> = HashMap::new();
        for key in self.store().list("index/")? {
            let Some(sealed) = self.store().get(&key)? else {
                continue;
            };
            let sections = open_object(self.master(), &key, &sealed)
                .map_err(|e| sealed_error(&key, e))
                .and_then(|(_, plain)| index::decode(&plain, &key))?;
            for s in sections {
                let e = named.entry(s.pack).or_default();
                e.0.push(key.clone());
                for (id, loc) in &s.blocks {
                    if e.1.insert(*id) {
                        e.2 += u64::from(loc.len);
                    }
                }
            }
        }
        for (pack_id, (indexes, blocks, bytes)) in &named {
            let live_here: Vec<BlockId> = blocks
                .iter()
                .filter(|b| live.contains(b))
                .copied()
                .collect();
            if live_here.is_empty() {
                plan.reclaimable_bytes += bytes;
                plan.dead_packs.push(DeadPack {
                    pack: pack_key(pack_id),
                    indexes: indexes.clone(),
                    pack_id: *pack_id,
                    bytes: *bytes,
                });
            } else if live_here.len() < blocks.len() {
                let dead_share = 1.0 - live_here.len() as f64 / blocks.len() as f64;
                let dead_bytes = (*bytes as f64 * dead_share) as u64;
                if dead_share >= REPACK_DEAD_SHARE {
                    plan.reclaimable_bytes += dead_bytes;
                    plan.repack.push(Repack {
                        pack: pack_key(pack_id),
                        indexes: indexes.clone(),
                        pack_id: *pack_id,
                        live: live_here,
                        dead_bytes,
                    });
                } else {
                    plan.mixed_packs += 1;
                    plan.mixed_dead_bytes += dead_bytes;
                }
            }
        }
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
            for r in &plan.repack {
                let domain = self.pack_domain(&r.pack_id)?.unwrap_or_default();
                let repo = self.in_domain(&domain)?;
                let writer = writers
                    .entry(domain)
                    .or_insert_with(|| crate::PackWriter::relocating(repo.clone()));
                for id in &r.live {
                    let plain = repo.read_block(id)?;
                    writer.add_block(id, &plain)?;
                    report.blocks_moved += 1;
                }
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
        Ok(report)
    }
}
