//! Index objects (block id → pack, offset, length) and the in-memory block index.
//!
//! Plaintext of an index object, integers big-endian:
//! `"KLIOIDX1" | pack_count u32 | per pack: pack_id [32] | salt [32] | count u32 |
//! per block: block_id [32] | offset u32 | length u32 | plain_len u32`.

use std::collections::HashMap;

use crate::{BlockId, Error, PackId};

const MAGIC: &[u8; 8] = b"KLIOIDX1";
/// Bytes of one block entry in an index object.
pub(crate) const ENTRY_LEN: usize = 32 + 4 + 4 + 4;

/// Where a block's frame is inside a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockLocation {
    pub offset: u32,
    pub len: u32,
    pub plain_len: u32,
}

/// One pack's section of an index object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PackSection {
    pub pack: PackId,
    /// The salt of the pack's sealed header (needed to derive its key and rebuild the AAD).
    pub salt: [u8; 32],
    pub blocks: Vec<(BlockId, BlockLocation)>,
}

pub(crate) fn encode(sections: &[PackSection]) -> Vec<u8> {
    let entries: usize = sections.iter().map(|s| s.blocks.len()).sum();
    let mut out = Vec::with_capacity(12 + sections.len() * 68 + entries * ENTRY_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(sections.len() as u32).to_be_bytes());
    for s in sections {
        out.extend_from_slice(s.pack.as_bytes());
        out.extend_from_slice(&s.salt);
        out.extend_from_slice(&(s.blocks.len() as u32).to_be_bytes());
        for (id, loc) in &s.blocks {
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&loc.offset.to_be_bytes());
            out.extend_from_slice(&loc.len.to_be_bytes());
            out.extend_from_slice(&loc.plain_len.to_be_bytes());
        }
    }
    out
}

/// A cursor over a byte slice that reports short input as corruption of `object`.
struct Reader<'a> {
    buf: &'a [u8],
    object: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(Error::corrupt(self.object, "index is truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array32(&mut self) -> Result<[u8; 32], Error> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, Error> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }
}

/// Decodes an index object's plaintext; `object` names it in errors.
pub(crate) fn decode(buf: &[u8], object: &str) -> Result<Vec<PackSection>, Error> {
    let mut r = Reader { buf, object };
    if r.take(8)? != MAGIC {
        return Err(Error::corrupt(object, "not an index (bad magic)"));
    }
    let packs = r.u32()?;
    let mut sections = Vec::new();
    for _ in 0..packs {
        let pack = PackId(r.array32()?);
        let salt = r.array32()?;
        let count = r.u32()? as usize;
        if r.buf.len() < count.saturating_mul(ENTRY_LEN) {
            return Err(Error::corrupt(object, "index is truncated"));
        }
        let mut blocks = Vec::with_capacity(count);
        let mut next_free = 0u64;
        for _ in 0..count {
            let id = BlockId(r.array32()?);
            let loc = BlockLocation {
                offset: r.u32()?,
                len: r.u32()?,
                plain_len: r.u32()?,
            };
            if u64::from(loc.offset) < next_free {
                return Err(Error::corrupt(
                    object,
                    format!("entries of pack {pack} overlap or are not sorted"),
                ));
            }
            next_free = u64::from(loc.offset) + u64::from(loc.len);
            blocks.push((id, loc));
        }
        sections.push(PackSection { pack, salt, blocks });
    }
    if !r.buf.is_empty() {
        return Err(Error::corrupt(object, "trailing bytes after the index"));
    }
    Ok(sections)
}

/// A pack known to the index.
#[derive(Clone, Debug)]
pub(crate) struct PackInfo {
    pub id: PackId,
    pub salt: [u8; 32],
}

/// One block in memory: 48 bytes, no per-entry allocation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub id: [u8; 32],
    pub pack: u32,
    pub offset: u32,
    pub len: u32,
    pub plain_len: u32,
}

/// A located block, as returned by lookups.
#[derive(Clone, Debug)]
pub(crate) struct Located {
    pub pack: PackInfo,
    pub loc: BlockLocation,
}

/// The in-memory block index: a sorted array (binary search, no hash-table overhead) plus
/// a hash map of recently added blocks, merged into the array when it grows.
#[derive(Default)]
pub(crate) struct BlockIndex {
    packs: Vec<PackInfo>,
    pack_numbers: HashMap<PackId, u32>,
    sorted: Vec<Entry>,
    recent: HashMap<[u8; 32], Entry>,
}

impl BlockIndex {
    fn pack_number(&mut self, id: PackId, salt: [u8; 32]) -> u32 {
        if let Some(&n) = self.pack_numbers.get(&id) {
            return n;
        }
        let n = self.packs.len() as u32;
        self.packs.push(PackInfo { id, salt });
        self.pack_numbers.insert(id, n);
        n
    }

    /// Adds the sections of an index object read at open time; call [`BlockIndex::seal`]
    /// after the last one.
    pub fn load(&mut self, sections: Vec<PackSection>) {
        for s in sections {
            let pack = self.pack_number(s.pack, s.salt);
            self.sorted
                .extend(s.blocks.into_iter().map(|(id, loc)| Entry {
                    id: id.0,
                    pack,
                    offset: loc.offset,
                    len: loc.len,
                    plain_len: loc.plain_len,
                }));
        }
    }

    /// Sorts what [`BlockIndex::load`] added and keeps one location per block.
    pub fn seal(&mut self) {
        self.sorted.extend(self.recent.drain().map(|(_, e)| e));
        self.sorted.sort_unstable_by_key(|e| e.id);
        self.sorted.dedup_by(|a, b| a.id == b.id);
        self.sorted.shrink_to_fit();
    }

    /// Adds a pack just written; its blocks are found immediately.
    pub fn add(&mut self, section: &PackSection) {
        let pack = self.pack_number(section.pack, section.salt);
        for (id, loc) in &section.blocks {
            if self.find(id).is_some() {
                continue;
            }
            self.recent.insert(
                id.0,
                Entry {
                    id: id.0,
                    pack,
                    offset: loc.offset,
                    len: loc.len,
                    plain_len: loc.plain_len,
                },
            );
        }
        if self.recent.len() > (self.sorted.len() / 16).max(1 << 16) {
            self.seal();
        }
    }

    fn find(&self, id: &BlockId) -> Option<&Entry> {
        match self.sorted.binary_search_by(|e| e.id.cmp(&id.0)) {
            Ok(i) => self.sorted.get(i),
            Err(_) => self.recent.get(&id.0),
        }
    }

    pub fn contains(&self, id: &BlockId) -> bool {
        self.find(id).is_some()
    }

    pub fn locate(&self, id: &BlockId) -> Option<Located> {
        let e = self.find(id)?;
        let pack = self.packs.get(e.pack as usize)?.clone();
        Some(Located {
            pack,
            loc: BlockLocation {
                offset: e.offset,
                len: e.len,
                plain_len: e.plain_len,
            },
        })
    }

    pub fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    /// Adds a pack that takes over its blocks from wherever they were (a rewritten pack):
    /// unlike [`BlockIndex::add`], existing locations are replaced.
    pub fn relocate(&mut self, section: &PackSection) {
        let pack = self.pack_number(section.pack, section.salt);
        for (id, loc) in &section.blocks {
            let entry = Entry {
                id: id.0,
                pack,
                offset: loc.offset,
                len: loc.len,
                plain_len: loc.plain_len,
            };
            match self.sorted.binary_search_by(|e| e.id.cmp(&id.0)) {
                Ok(i) => self.sorted[i] = entry,
                Err(_) => {
                    self.recent.insert(id.0, entry);
                }
            }
        }
    }

    /// Forgets every block located in pack `id` (the pack is being deleted).
    pub fn remove_pack(&mut self, id: &PackId) {
        let Some(&n) = self.pack_numbers.get(id) else {
            return;
        };
        self.sorted.retain(|e| e.pack != n);
        self.recent.retain(|_, e| e.pack != n);
    }

    pub fn pack_count(&self) -> usize {
        self.packs.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn section(pack: u8, n: u8) -> PackSection {
        PackSection {
            pack: PackId([pack; 32]),
            salt: [pack ^ 0xff; 32],
            blocks: (0..n)
                .map(|i| {
                    (
                        BlockId([i; 32]),
                        BlockLocation {
                            offset: 100 + u32::from(i) * 50,
                            len: 50,
                            plain_len: 8192,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn index_encoding_roundtrips_and_rejects_damage() {
        let sections = vec![section(1, 3), section(2, 0), section(3, 5)];
        let bytes = encode(&sections);
        assert_eq!(bytes.len(), 12 + 3 * 68 + 8 * ENTRY_LEN);
        assert_eq!(decode(&bytes, "i").unwrap(), sections);
        assert!(decode(&bytes[..bytes.len() - 1], "i").is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer, "i").is_err());
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert!(decode(&bad, "i").is_err());
    }

    #[test]
    fn entry_is_48_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 48);
    }

    #[test]
    fn block_index_finds_loaded_and_added_blocks() {
        let mut idx = BlockIndex::default();
        idx.load(vec![section(1, 3)]);
        idx.seal();
        let mut s = section(2, 5);
        s.blocks.retain(|(id, _)| id.0[0] >= 2);
        idx.add(&s);
        assert_eq!(idx.len(), 5);
        assert_eq!(idx.pack_count(), 2);
        // block 2 was in pack 1 first: that location is kept
        assert_eq!(
            idx.locate(&BlockId([2; 32])).unwrap().pack.id,
            PackId([1; 32])
        );
        assert_eq!(
            idx.locate(&BlockId([4; 32])).unwrap().pack.id,
            PackId([2; 32])
        );
        assert!(!idx.contains(&BlockId([9; 32])));
        idx.seal();
        assert_eq!(idx.len(), 5);
        assert!(idx.contains(&BlockId([4; 32])));
    }
}
