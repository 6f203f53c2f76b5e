//! Verification of a backup: read every object it needs and report what is missing or
//! corrupt, by object name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use klio_crypto::ObjectHeader;

use crate::index::{BlockLocation, PackInfo};
use crate::pack::FrameReader;
use crate::repository::{blocklist_key, pack_key, pack_name};
use crate::{BackupId, BlockId, BlocklistId, Error, FileKind, PackId, Repository};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    Missing,
    Corrupt,
}

/// One missing or corrupt object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyProblem {
    pub kind: ProblemKind,
    /// The object key (or `block <id>` for a block no index lists).
    pub object: String,
    pub detail: String,
}

impl fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ProblemKind::Missing => "missing",
            ProblemKind::Corrupt => "corrupt",
        };
        write!(f, "{kind} object \"{}\": {}", self.object, self.detail)
    }
}

/// The outcome of [`Repository::verify`].
#[derive(Clone, Debug)]
pub struct VerifyReport {
    pub cluster: String,
    pub backup_id: BackupId,
    /// Entries of the manifest.
    pub files: usize,
    /// Distinct blocklists the backup uses.
    pub blocklists: usize,
    /// Distinct blocks the backup uses.
    pub blocks: usize,
    /// Plaintext bytes of the distinct blocks read and found intact.
    pub bytes_verified: u64,
    pub problems: Vec<VerifyProblem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Collects problems, each object (and block) once.
struct Problems {
    list: Vec<VerifyProblem>,
    reported: HashSet<String>,
}

impl Problems {
    fn add(&mut self, kind: ProblemKind, object: String, detail: String) {
        if self.reported.insert(format!("{object}\0{detail}")) {
            self.list.push(VerifyProblem {
                kind,
                object,
                detail,
            });
        }
    }
}

impl Repository {
    /// Reads everything the backup needs (manifest, blocklists, every block, from the
    /// packs) and checks it: authentication, block ids, block lengths against file sizes.
    /// A missing or unreadable manifest is an error; everything else that is missing or
    /// corrupt is listed in the report. Storage I/O errors abort with an error.
    pub fn verify(&self, cluster: &str, backup_id: &BackupId) -> Result<VerifyReport, Error> {
        let manifest = self.get_manifest(cluster, backup_id)?;
        // Blocks and blocklists are read in the manifest's dedup domain.
        self.in_domain(&manifest.domain)?
            .verify_manifest(cluster, backup_id, manifest)
    }

    fn verify_manifest(
        &self,
        cluster: &str,
        backup_id: &BackupId,
        manifest: crate::Manifest,
    ) -> Result<VerifyReport, Error> {
        let manifest_key = crate::repository::manifest_key(cluster, backup_id);
        let mut problems = Problems {
            list: Vec::new(),
            reported: HashSet::new(),
        };
        for (key, reason) in self.damaged_indexes() {
            problems.add(
                ProblemKind::Corrupt,
                key.clone(),
                format!("{reason} (its blocks count as missing)"),
            );
        }

        let mut lists: HashMap<BlocklistId, Option<Vec<BlockId>>> = HashMap::new();
        // Located blocks by pack, each block once.
        let mut by_pack: BTreeMap<PackId, (PackInfo, Vec<(BlockId, BlockLocation)>)> =
            BTreeMap::new();
        let mut seen_blocks: HashSet<BlockId> = HashSet::new();
        let mut need = |id: &BlockId, len: u64, path: &str, problems: &mut Problems| {
            let located = match self.locate(id) {
                Ok(l) => l,
                Err(e) => {
                    problems.add(ProblemKind::Missing, format!("block {id}"), e.to_string());
                    return;
                }
            };
            let Some(located) = located else {
                seen_blocks.insert(*id);
                problems.add(
                    ProblemKind::Missing,
                    format!("block {id}"),
                    format!("no index lists it (needed by file \"{path}\")"),
                );
                return;
            };
            if u64::from(located.loc.plain_len) != len {
                problems.add(
                    ProblemKind::Corrupt,
                    manifest_key.clone(),
                    format!(
                        "file \"{path}\" needs block {id} to have {len} bytes, the index says {}",
                        located.loc.plain_len
                    ),
                );
            }
            if seen_blocks.insert(*id) {
                by_pack
                    .entry(located.pack.id)
                    .or_insert_with(|| (located.pack.clone(), Vec::new()))
                    .1
                    .push((*id, located.loc));
            }
        };

        for f in &manifest.files {
            match &f.kind {
                FileKind::Whole { block } => need(block, f.size, &f.path, &mut problems),
                FileKind::Listed { block_size, blocks } => {
                    // The manifest's validation checked the count against the size.
                    let block_size = u64::from(*block_size);
                    for (i, id) in blocks.iter().enumerate() {
                        let len = block_size.min(f.size - i as u64 * block_size);
                        need(id, len, &f.path, &mut problems);
                    }
                }
                FileKind::Blocks {
                    block_size,
                    blocklists,
                } => {
                    let block_size = u64::from(*block_size);
                    let count = f.size.div_ceil(block_size);
                    let mut position = 0u64;
                    let mut complete = true;
                    for list_id in blocklists {
                        if !lists.contains_key(list_id) {
                            let read = match self.get_blocklist(list_id) {
                                Ok(ids) => Some(ids),
                                Err(Error::BlocklistNotFound(_)) => {
                                    problems.add(
                                        ProblemKind::Missing,
                                        blocklist_key(list_id),
                                        format!("blocklist of file \"{}\"", f.path),
                                    );
                                    None
                                }
                                Err(Error::Corrupt { object, reason }) => {
                                    problems.add(ProblemKind::Corrupt, object, reason);
                                    None
                                }
                                Err(e) => return Err(e),
                            };
                            lists.insert(*list_id, read);
                        }
                        let Some(Some(ids)) = lists.get(list_id) else {
                            complete = false;
                            continue;
                        };
                        for id in ids {
                            if position < count {
                                let len = block_size.min(f.size - position * block_size);
                                need(id, len, &f.path, &mut problems);
                            }
                            position += 1;
                        }
                    }
                    if complete && position != count {
                        problems.add(
                            ProblemKind::Corrupt,
                            manifest_key.clone(),
                            format!(
                                "file \"{}\" of {} bytes needs {count} blocks, its blocklists list {position}",
                                f.path, f.size
                            ),
                        );
                    }
                }
                FileKind::Symlink { .. } | FileKind::Directory => {}
            }
        }

        let blocks = seen_blocks.len();
        let mut bytes_verified = 0u64;
        for (pack_id, (pack, mut blocks)) in by_pack {
            bytes_verified += self.verify_pack(&pack_id, &pack, &mut blocks, &mut problems)?;
            self.verify_pack_indexes(&pack_id, &mut problems)?;
        }

        Ok(VerifyReport {
            cluster: cluster.to_string(),
            backup_id: backup_id.clone(),
            files: manifest.files.len(),
            blocklists: lists.len(),
            blocks,
            bytes_verified,
            problems: problems.list,
        })
    }

    /// Reads the index objects that name a pack (the block index cache holds what they
    /// said, so a damaged one would only show when the cache is rebuilt): each must open
    /// and list the pack.
    fn verify_pack_indexes(&self, pack_id: &PackId, problems: &mut Problems) -> Result<(), Error> {
        for key in self.pack_index_keys(pack_id)? {
            match crate::index::read_object(self.store(), self.master(), &key) {
                Ok(None) => problems.add(
                    ProblemKind::Missing,
                    key,
                    format!("index object of pack {pack_id}"),
                ),
                Ok(Some(s)) if s.iter().any(|s| s.pack == *pack_id) => {}
                Ok(Some(_)) => problems.add(
                    ProblemKind::Corrupt,
                    key,
                    format!("it does not list pack {pack_id}"),
                ),
                Err(Error::Corrupt { object, reason }) => {
                    problems.add(ProblemKind::Corrupt, object, reason)
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads one pack whole and checks the given blocks in it; returns the plaintext bytes
    /// found intact.
    fn verify_pack(
        &self,
        pack_id: &PackId,
        pack: &PackInfo,
        blocks: &mut [(BlockId, BlockLocation)],
        problems: &mut Problems,
    ) -> Result<u64, Error> {
        let key = pack_key(pack_id);
        let Some(bytes) = self.store().get(&key)? else {
            problems.add(
                ProblemKind::Missing,
                key,
                format!("pack holding {} blocks of this backup", blocks.len()),
            );
            return Ok(0);
        };
        match ObjectHeader::decode(&bytes, &key) {
            Ok((header, _)) if header.salt == pack.salt && header.name == pack_name(pack_id) => {}
            _ => problems.add(
                ProblemKind::Corrupt,
                key.clone(),
                "the pack header does not match its index".to_string(),
            ),
        }
        let mut reader = FrameReader::new(self, pack);
        blocks.sort_by_key(|(_, loc)| (loc.offset, loc.inner));
        let mut verified = 0u64;
        for (id, loc) in blocks.iter() {
            let start = loc.offset as usize;
            let frame = start
                .checked_add(loc.len as usize)
                .and_then(|end| bytes.get(start..end));
            let result = match frame {
                Some(frame) => reader.block(frame, id, loc).map(|_| ()),
                None => Err(format!("the pack is truncated to {} bytes", bytes.len())),
            };
            match result {
                Ok(_) => verified += u64::from(loc.plain_len),
                Err(reason) => problems.add(
                    ProblemKind::Corrupt,
                    key.clone(),
                    format!("block {id}: {reason}"),
                ),
            }
        }
        Ok(verified)
    }
}
