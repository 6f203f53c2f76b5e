//! Index objects (block id → pack, offset, length) and the block index: an on-disk cache
//! of every readable index object, so that memory does not grow with the repository.
//!
//! Plaintext of an index object, integers big-endian. Version 1 (blocks of the legacy
//! dedup domain): `"KLIOIDX1" | pack_count u32 | per pack: pack_id [32] | salt [32] |
//! count u32 | per block: block_id [32] | offset u32 | length u32 | plain_len u32`.
//! Version 2 adds each pack's dedup domain: `"KLIOIDX2" | pack_count u32 | per pack:
//! domain_len u16 | domain | pack_id [32] | salt [32] | count u32 | per block: as in 1`.
//! Version 3 adds `inner u32` (the block's offset in its frame) to each block. Version 4,
//! the one written: 16-byte block ids, each frame once: `"KLIOIDX4" | pack_count u32 |
//! per pack: domain_len u16 | domain | pack_id [32] | salt [32] | count u32 | frame_count
//! u32 | per frame: offset u32 | length u32 | blocks u32 | per block: block_id [16] | inner
//! u32 | plain_len u32`. Readers keep the first 16 bytes of the ids of versions 1 to 3.
//!
//! The cache ([`BlockIndex`]) is a redb database: block id → (domain, pack, location), the
//! packs, and which index objects it holds. It is only a cache: the index objects are the
//! truth, and [`BlockIndex::sync`] brings the cache up to date with them (reading only the
//! index objects it does not hold yet), so a lost or stale cache costs a rebuild, never data.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use klio_crypto::{MasterKey, open_object};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};

use crate::{BlockId, Domain, Error, MAX_BLOCK_SIZE, ObjectStore, PackId, sealed_error};

const MAGIC_V1: &[u8; 8] = b"KLIOIDX1";
const MAGIC_V2: &[u8; 8] = b"KLIOIDX2";
const MAGIC_V3: &[u8; 8] = b"KLIOIDX3";
const MAGIC_V4: &[u8; 8] = b"KLIOIDX4";
/// Bytes of one block entry in an index object of version 1 or 2.
const ENTRY_LEN: usize = 32 + 4 + 4 + 4;
/// Bytes of one block entry in a version 3 index object (with the offset inside the frame).
const ENTRY_LEN_V3: usize = ENTRY_LEN + 4;
/// Bytes of one block entry in a version 4 index object (besides its frame's 12 bytes).
pub(crate) const ENTRY_LEN_V4: usize = BlockId::LEN + 4 + 4;
/// Bytes of a frame's header in a version 4 index object.
const FRAME_LEN_V4: usize = 4 + 4 + 4;
/// The longest domain name in an index object.
const MAX_DOMAIN_LEN: usize = 128;

/// Where a block is inside a pack: the frame that holds it, and where it lies in that
/// frame's plaintext (a frame holds one block, or a run of several).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockLocation {
    /// Byte offset of the frame in the pack object.
    pub offset: u32,
    /// Byte length of the frame (header, ciphertext, tag).
    pub len: u32,
    /// Plaintext length of the block.
    pub plain_len: u32,
    /// Offset of the block in the frame's plaintext (0 for a frame of one block).
    pub inner: u32,
}

impl BlockLocation {
    /// The frame that holds the block, as a key for reading each frame once.
    pub fn frame(&self) -> (u32, u32) {
        (self.offset, self.len)
    }
}

/// One pack's section of an index object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PackSection {
    pub pack: PackId,
    /// The salt of the pack's sealed header (needed to derive its key and rebuild the AAD).
    pub salt: [u8; 32],
    /// Every block of a pack belongs to this dedup domain.
    pub domain: Domain,
    pub blocks: Vec<(BlockId, BlockLocation)>,
}

/// Encodes sections as a version 4 index object. The blocks of each section are sorted by
/// frame offset, then by offset in the frame (as [`PackWriter`](crate::PackWriter) and the
/// collection's rewriting list them).
pub(crate) fn encode(sections: &[PackSection]) -> Vec<u8> {
    let entries: usize = sections.iter().map(|s| s.blocks.len()).sum();
    let mut out = Vec::with_capacity(12 + sections.len() * 210 + entries * (ENTRY_LEN_V4 + 4));
    out.extend_from_slice(MAGIC_V4);
    out.extend_from_slice(&(sections.len() as u32).to_be_bytes());
    for s in sections {
        put_pack_header(&mut out, s, true);
        let frames = s.blocks.chunk_by(|a, b| a.1.frame() == b.1.frame());
        out.extend_from_slice(&(frames.clone().count() as u32).to_be_bytes());
        for frame in frames {
            let (offset, len) = frame[0].1.frame();
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
            for (id, loc) in frame {
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(&loc.inner.to_be_bytes());
                out.extend_from_slice(&loc.plain_len.to_be_bytes());
            }
        }
    }
    out
}

/// What every version writes before a pack's blocks: its domain (from version 2 on), id,
/// salt and block count.
fn put_pack_header(out: &mut Vec<u8>, s: &PackSection, with_domain: bool) {
    if with_domain {
        let d = s.domain.as_str().as_bytes();
        out.extend_from_slice(&(d.len() as u16).to_be_bytes());
        out.extend_from_slice(d);
    }
    out.extend_from_slice(s.pack.as_bytes());
    out.extend_from_slice(&s.salt);
    out.extend_from_slice(&(s.blocks.len() as u32).to_be_bytes());
}

/// Encodes sections in the layout of version 1, 2 or 3 (what writers before December 2026
/// wrote), each id as the 32-byte hash it was then: the id followed by `pad`.
#[cfg(test)]
pub(crate) fn encode_legacy(sections: &[PackSection], version: u8, pad: u8) -> Vec<u8> {
    let mut out = match version {
        1 => MAGIC_V1,
        2 => MAGIC_V2,
        _ => MAGIC_V3,
    }
    .to_vec();
    out.extend_from_slice(&(sections.len() as u32).to_be_bytes());
    for s in sections {
        put_pack_header(&mut out, s, version >= 2);
        for (id, loc) in &s.blocks {
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&[pad; 16]);
            for n in [loc.offset, loc.len, loc.plain_len] {
                out.extend_from_slice(&n.to_be_bytes());
            }
            if version >= 3 {
                out.extend_from_slice(&loc.inner.to_be_bytes());
            }
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

    fn u16(&mut self) -> Result<u16, Error> {
        let mut a = [0u8; 2];
        a.copy_from_slice(self.take(2)?);
        Ok(u16::from_be_bytes(a))
    }
}

/// Decodes an index object's plaintext (version 1 to 4); `object` names it in errors.
pub(crate) fn decode(buf: &[u8], object: &str) -> Result<Vec<PackSection>, Error> {
    let mut r = Reader { buf, object };
    let version = match r.take(8)? {
        m if m == MAGIC_V1 => 1,
        m if m == MAGIC_V2 => 2,
        m if m == MAGIC_V3 => 3,
        m if m == MAGIC_V4 => 4,
        _ => return Err(Error::corrupt(object, "not an index (bad magic)")),
    };
    let packs = r.u32()?;
    let mut sections = Vec::new();
    for _ in 0..packs {
        let domain = if version >= 2 {
            let len = r.u16()? as usize;
            if len > MAX_DOMAIN_LEN {
                return Err(Error::corrupt(object, "a domain name is too long"));
            }
            let name = std::str::from_utf8(r.take(len)?)
                .map_err(|_| Error::corrupt(object, "a domain name is not UTF-8"))?;
            Domain::parse(name)
                .map_err(|_| Error::corrupt(object, format!("invalid domain \"{name}\"")))?
        } else {
            Domain::legacy()
        };
        let pack = PackId(r.array32()?);
        let salt = r.array32()?;
        let count = r.u32()? as usize;
        let blocks = if version == 4 {
            decode_frames_v4(&mut r, count)?
        } else {
            let entry_len = if version == 3 {
                ENTRY_LEN_V3
            } else {
                ENTRY_LEN
            };
            if r.buf.len() < count.saturating_mul(entry_len) {
                return Err(Error::corrupt(object, "index is truncated"));
            }
            let mut blocks = Vec::with_capacity(count);
            for _ in 0..count {
                let id = BlockId::from_hash(&r.array32()?);
                let loc = BlockLocation {
                    offset: r.u32()?,
                    len: r.u32()?,
                    plain_len: r.u32()?,
                    inner: if version == 3 { r.u32()? } else { 0 },
                };
                blocks.push((id, loc));
            }
            blocks
        };
        check_layout(&blocks, &pack, object)?;
        sections.push(PackSection {
            pack,
            salt,
            domain,
            blocks,
        });
    }
    if !r.buf.is_empty() {
        return Err(Error::corrupt(object, "trailing bytes after the index"));
    }
    Ok(sections)
}

/// The `count` blocks of one pack in a version 4 index object, frame by frame.
fn decode_frames_v4(
    r: &mut Reader<'_>,
    count: usize,
) -> Result<Vec<(BlockId, BlockLocation)>, Error> {
    let object = r.object;
    let frames = r.u32()? as usize;
    let least = frames
        .saturating_mul(FRAME_LEN_V4)
        .saturating_add(count.saturating_mul(ENTRY_LEN_V4));
    if r.buf.len() < least {
        return Err(Error::corrupt(object, "index is truncated"));
    }
    let mut blocks = Vec::with_capacity(count);
    for _ in 0..frames {
        let offset = r.u32()?;
        let len = r.u32()?;
        let in_frame = r.u32()? as usize;
        if in_frame == 0 || in_frame > count - blocks.len() {
            return Err(Error::corrupt(
                object,
                "a frame lists no blocks, or more than its pack's count",
            ));
        }
        for _ in 0..in_frame {
            let id = BlockId::from_prefix(r.take(BlockId::LEN)?);
            let inner = r.u32()?;
            let plain_len = r.u32()?;
            blocks.push((
                id,
                BlockLocation {
                    offset,
                    len,
                    plain_len,
                    inner,
                },
            ));
        }
    }
    if blocks.len() != count {
        return Err(Error::corrupt(
            object,
            format!(
                "a pack claims {count} blocks but its frames list {}",
                blocks.len()
            ),
        ));
    }
    Ok(blocks)
}

/// Checks where one pack's blocks lie: each within the largest frame, the blocks of a frame
/// in order and without overlap, frames in order and without overlap.
fn check_layout(
    blocks: &[(BlockId, BlockLocation)],
    pack: &PackId,
    object: &str,
) -> Result<(), Error> {
    let mut next_free = 0u64;
    let mut prev: Option<&BlockLocation> = None;
    for (_, loc) in blocks {
        let end_in_frame = u64::from(loc.inner) + u64::from(loc.plain_len);
        if end_in_frame > MAX_BLOCK_SIZE as u64 {
            return Err(Error::corrupt(
                object,
                format!("an entry of pack {pack} lies beyond the largest frame"),
            ));
        }
        let ordered = match prev {
            Some(prev) if prev.offset == loc.offset => {
                prev.len == loc.len
                    && u64::from(loc.inner) >= u64::from(prev.inner) + u64::from(prev.plain_len)
            }
            _ => u64::from(loc.offset) >= next_free,
        };
        if !ordered {
            return Err(Error::corrupt(
                object,
                format!("entries of pack {pack} overlap or are not sorted"),
            ));
        }
        next_free = u64::from(loc.offset) + u64::from(loc.len);
        prev = Some(loc);
    }
    Ok(())
}

/// Reads and decodes index object `key`: `None` if it does not exist (any more); a damaged
/// one is [`Error::Corrupt`] naming it; storage errors are returned as they are.
pub(crate) fn read_object(
    store: &dyn ObjectStore,
    master: &MasterKey,
    key: &str,
) -> Result<Option<Vec<PackSection>>, Error> {
    let Some(sealed) = store.get(key)? else {
        return Ok(None);
    };
    let (_, plain) = open_object(master, key, &sealed).map_err(|e| sealed_error(key, e))?;
    decode(&plain, key).map(Some)
}

/// A pack known to the index.
#[derive(Clone, Debug)]
pub(crate) struct PackInfo {
    pub id: PackId,
    pub salt: [u8; 32],
}

/// A located block, as returned by lookups.
#[derive(Clone, Debug)]
pub(crate) struct Located {
    pub pack: PackInfo,
    pub loc: BlockLocation,
}

/// block id → domain number | pack number | offset | len | plain_len (u32 each, big-endian)
const BLOCKS: TableDefinition<[u8; BlockId::LEN], [u8; 24]> = TableDefinition::new("blocks");
/// pack number → pack id | salt | domain number
const PACKS: TableDefinition<u32, [u8; 68]> = TableDefinition::new("packs");
const PACK_NUMBERS: TableDefinition<[u8; 32], u32> = TableDefinition::new("pack_numbers");
/// (pack number, chunk) → the ids of up to [`CHUNK`] of its blocks, concatenated (to forget
/// a pack without a scan)
const PACK_BLOCKS: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("pack_blocks");
/// Blocks added or removed per write transaction: what a transaction holds in memory is
/// bounded, however many blocks a pack has.
const CHUNK: usize = 16_384;
/// pack number → the keys of the index objects naming it, one per line
const PACK_INDEXES: TableDefinition<u32, &str> = TableDefinition::new("pack_indexes");
/// domain name → domain number (the legacy domain, "", is 0)
const DOMAINS: TableDefinition<&str, u32> = TableDefinition::new("domains");
/// key of an index object held → the numbers of its packs (u32 big-endian, concatenated)
const INDEX_OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("index_objects");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Key in [`META`], present ("yes") while the repository is known to hold no garbage.
const GC_CLEAN: &str = "gc_clean";
const NEXT_PACK: TableDefinition<(), u32> = TableDefinition::new("next_pack");

const CACHE_FORMAT: &str = "klio-index-cache/4";

/// The positions of `ids` in key order: looked up in that order, neighbouring ids share the
/// B-tree's pages instead of visiting them at random.
fn key_order(ids: &[BlockId]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_unstable_by_key(|i| ids[*i]);
    order
}
/// redb's page cache: what the block index may keep in memory, whatever its size on disk.
const CACHE_BYTES: usize = 32 << 20;

fn db_err(path: &Path, e: impl Into<redb::Error>) -> Error {
    let e: redb::Error = e.into();
    let disk_full = matches!(&e, redb::Error::Io(io) if crate::is_disk_full(io));
    Error::IndexCache {
        path: path.display().to_string(),
        reason: e.to_string(),
        disk_full,
    }
}

fn entry_bytes(domain: u32, pack: u32, loc: &BlockLocation) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[0..4].copy_from_slice(&domain.to_be_bytes());
    v[4..8].copy_from_slice(&pack.to_be_bytes());
    v[8..12].copy_from_slice(&loc.offset.to_be_bytes());
    v[12..16].copy_from_slice(&loc.len.to_be_bytes());
    v[16..20].copy_from_slice(&loc.plain_len.to_be_bytes());
    v[20..24].copy_from_slice(&loc.inner.to_be_bytes());
    v
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// (domain number, pack number, location) of a stored entry.
fn parse_entry(v: &[u8; 24]) -> (u32, u32, BlockLocation) {
    (
        be32(&v[0..4]),
        be32(&v[4..8]),
        BlockLocation {
            offset: be32(&v[8..12]),
            len: be32(&v[12..16]),
            plain_len: be32(&v[16..20]),
            inner: be32(&v[20..24]),
        },
    )
}

fn pack_bytes(id: &PackId, salt: &[u8; 32], domain: u32) -> [u8; 68] {
    let mut v = [0u8; 68];
    v[0..32].copy_from_slice(id.as_bytes());
    v[32..64].copy_from_slice(salt);
    v[64..68].copy_from_slice(&domain.to_be_bytes());
    v
}

fn parse_pack(v: &[u8; 68]) -> (PackInfo, u32) {
    let mut id = [0u8; 32];
    id.copy_from_slice(&v[0..32]);
    let mut salt = [0u8; 32];
    salt.copy_from_slice(&v[32..64]);
    (
        PackInfo {
            id: PackId(id),
            salt,
        },
        be32(&v[64..68]),
    )
}

/// A read guard on an open database.
struct DbGuard<'a>(std::sync::RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for DbGuard<'_> {
    type Target = Database;

    fn deref(&self) -> &Database {
        // Checked when the guard was made.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("checked by BlockIndex::db"))
    }
}

/// The block index: an on-disk cache of the repository's index objects (see the module
/// documentation). Memory use is bounded by its page cache, not by the repository's size.
pub(crate) struct BlockIndex {
    /// `None` while it is being reopened (or could not be).
    db: std::sync::RwLock<Option<Database>>,
    /// Set by an I/O error: redb refuses further use of a database after one, so the next
    /// operation reopens it (a full disk must not disable the cache until a restart).
    broken: std::sync::atomic::AtomicBool,
    repository_id: String,
    path: PathBuf,
    /// Holds a cache that lives only as long as this handle (no path configured).
    _temp: Option<tempfile::TempDir>,
}

impl BlockIndex {
    /// Opens (or creates) the cache at `path` for the repository `repository_id`; a cache
    /// of another repository, of another cache format, or one that cannot be opened is
    /// replaced by an empty one. Without a path the cache is a temporary file.
    pub fn open(path: Option<&Path>, repository_id: &str) -> Result<BlockIndex, Error> {
        let (path, temp) = match path {
            Some(p) => (p.to_path_buf(), None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("klio-index-")
                    .tempdir()
                    .map_err(|e| db_err(Path::new("<temporary directory>"), e))?;
                (dir.path().join("index.redb"), Some(dir))
            }
        };
        if let Some(parent) = path.parent() {
            klio_durable::create_dir_all_durable(parent).map_err(|e| db_err(&path, e))?;
        }
        let db = match Self::open_db(&path, repository_id) {
            Ok(Some(db)) => db,
            other => {
                if let Err(e) = other {
                    tracing::warn!(cache = %path.display(), error = %e, "rebuilding the block index cache");
                }
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(db_err(&path, e)),
                }
                Self::open_db(&path, repository_id)?.ok_or_else(|| Error::IndexCache {
                    path: path.display().to_string(),
                    reason: "a new cache could not be initialized".to_string(),
                    disk_full: false,
                })?
            }
        };
        Ok(BlockIndex {
            db: std::sync::RwLock::new(Some(db)),
            broken: std::sync::atomic::AtomicBool::new(false),
            repository_id: repository_id.to_string(),
            path,
            _temp: temp,
        })
    }

    /// Opens the database; `None` if it belongs to another repository or cache format.
    fn open_db(path: &Path, repository_id: &str) -> Result<Option<Database>, Error> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| db_err(path, e))?;
        let txn = db.begin_write().map_err(|e| db_err(path, e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| db_err(path, e))?;
            let format = meta
                .get("format")
                .map_err(|e| db_err(path, e))?
                .map(|v| v.value().to_string());
            let repo = meta
                .get("repository_id")
                .map_err(|e| db_err(path, e))?
                .map(|v| v.value().to_string());
            match (format, repo) {
                (None, None) => {
                    meta.insert("format", CACHE_FORMAT)
                        .map_err(|e| db_err(path, e))?;
                    meta.insert("repository_id", repository_id)
                        .map_err(|e| db_err(path, e))?;
                    let mut domains = txn.open_table(DOMAINS).map_err(|e| db_err(path, e))?;
                    domains.insert("", 0).map_err(|e| db_err(path, e))?;
                    txn.open_table(PACK_BLOCKS).map_err(|e| db_err(path, e))?;
                    txn.open_table(BLOCKS).map_err(|e| db_err(path, e))?;
                    txn.open_table(PACKS).map_err(|e| db_err(path, e))?;
                    txn.open_table(PACK_NUMBERS).map_err(|e| db_err(path, e))?;
                    txn.open_table(PACK_INDEXES).map_err(|e| db_err(path, e))?;
                    txn.open_table(INDEX_OBJECTS).map_err(|e| db_err(path, e))?;
                    txn.open_table(NEXT_PACK).map_err(|e| db_err(path, e))?;
                }
                (Some(f), Some(r)) if f == CACHE_FORMAT && r == repository_id => {}
                _ => return Ok(None),
            }
        }
        txn.commit().map_err(|e| db_err(path, e))?;
        Ok(Some(db))
    }

    fn err(&self, e: impl Into<redb::Error>) -> Error {
        let e: redb::Error = e.into();
        if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
            self.broken
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        db_err(&self.path, e)
    }

    /// The database, reopened first if an I/O error broke it.
    fn db(&self) -> Result<DbGuard<'_>, Error> {
        use std::sync::PoisonError;
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::Relaxed) {
            let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
            if self.broken.load(Ordering::Relaxed) {
                // Closed before it is opened again: redb holds a lock on the file.
                *slot = None;
                let db = Self::open_db(&self.path, &self.repository_id)?.ok_or_else(|| {
                    Error::IndexCache {
                        path: self.path.display().to_string(),
                        reason: "it changed while it was reopened".to_string(),
                        disk_full: false,
                    }
                })?;
                *slot = Some(db);
                self.broken.store(false, Ordering::Relaxed);
                tracing::info!(cache = %self.path.display(), "reopened the block index cache after an I/O error");
            }
        }
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            self.broken.store(true, Ordering::Relaxed);
            return Err(Error::IndexCache {
                path: self.path.display().to_string(),
                reason: "it could not be reopened after an I/O error".to_string(),
                disk_full: false,
            });
        }
        Ok(DbGuard(guard))
    }

    /// Brings the cache up to date with the index objects in `store`: reads those it does
    /// not hold yet and forgets those that no longer exist. Returns the index objects that
    /// could not be read, with the reason (their blocks count as missing); storage errors
    /// fail.
    pub fn sync(
        &self,
        store: &dyn ObjectStore,
        master: &MasterKey,
    ) -> Result<Vec<(String, String)>, Error> {
        let listed: Vec<String> = store.list("index/")?;
        let held: HashSet<String> = {
            let txn = self.db()?.begin_read().map_err(|e| self.err(e))?;
            let t = txn.open_table(INDEX_OBJECTS).map_err(|e| self.err(e))?;
            let mut held = HashSet::new();
            for row in t.iter().map_err(|e| self.err(e))? {
                let (k, _) = row.map_err(|e| self.err(e))?;
                held.insert(k.value().to_string());
            }
            held
        };
        let listed_set: HashSet<&str> = listed.iter().map(String::as_str).collect();
        let vanished: Vec<&String> = held
            .iter()
            .filter(|k| !listed_set.contains(k.as_str()))
            .collect();
        for key in &vanished {
            self.forget_index_object(key)?;
        }
        let mut damaged = Vec::new();
        let mut read = 0usize;
        for key in &listed {
            if held.contains(key) {
                continue;
            }
            let named_by_id = key
                .strip_prefix("index/")
                .is_some_and(|id| id.parse::<PackId>().is_ok());
            if !named_by_id {
                damaged.push((key.clone(), "not an index object name".to_string()));
                continue;
            }
            match read_object(store, master, key) {
                Ok(Some(sections)) => {
                    self.add_sections(key, &sections, false, redb::Durability::None)?;
                    read += 1;
                }
                // Deleted since the listing (a concurrent index merge): its blocks are
                // elsewhere.
                Ok(None) => {}
                Err(Error::Corrupt { reason, .. }) => {
                    tracing::warn!(object = %key, %reason, "ignoring unreadable index object");
                    damaged.push((key.clone(), reason));
                }
                Err(e) => return Err(e),
            }
        }
        // One durable commit makes everything above durable.
        let txn = self.db()?.begin_write().map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))?;
        tracing::debug!(
            cache = %self.path.display(),
            index_objects_read = read,
            index_objects_forgotten = vanished.len(),
            "block index cache synchronized"
        );
        Ok(damaged)
    }

    /// The number of a domain in this cache, allocated on first use.
    pub fn domain_number(&self, domain: &Domain) -> Result<u32, Error> {
        {
            let txn = self.db()?.begin_read().map_err(|e| self.err(e))?;
            let t = txn.open_table(DOMAINS).map_err(|e| self.err(e))?;
            if let Some(n) = t.get(domain.as_str()).map_err(|e| self.err(e))? {
                return Ok(n.value());
            }
        }
        let txn = self.db()?.begin_write().map_err(|e| self.err(e))?;
        let n = self.domain_number_in(&txn, domain)?;
        txn.commit().map_err(|e| self.err(e))?;
        Ok(n)
    }

    fn domain_number_in(&self, txn: &WriteTransaction, domain: &Domain) -> Result<u32, Error> {
        let mut t = txn.open_table(DOMAINS).map_err(|e| self.err(e))?;
        if let Some(n) = t.get(domain.as_str()).map_err(|e| self.err(e))? {
            return Ok(n.value());
        }
        let n = t.len().map_err(|e| self.err(e))? as u32;
        t.insert(domain.as_str(), n).map_err(|e| self.err(e))?;
        Ok(n)
    }

    /// The domain a domain number stands for.
    fn domain_name(&self, number: u32) -> Result<Option<Domain>, Error> {
        let txn = self.db()?.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(DOMAINS).map_err(|e| self.err(e))?;
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            if v.value() == number {
                return Ok(Domain::parse(k.value()).ok());
            }
        }
        Ok(None)
    }

    /// Adds the packs of index object `key` (just written, or read from the store). A block
    /// already located keeps its location unless `relocate` (a rewritten pack takes over).
    /// The blocks go in durable transactions of [`CHUNK`]; the last one records the index
    /// object with `durability` (a crash before it leaves blocks the next
    /// [`sync`](Self::sync) adds again, which changes nothing).
    pub fn add_sections(
        &self,
        key: &str,
        sections: &[PackSection],
        relocate: bool,
        durability: redb::Durability,
    ) -> Result<(), Error> {
        let mut numbers = Vec::with_capacity(sections.len());
        for s in sections {
            let mut n = None;
            let chunks = s.blocks.chunks(CHUNK);
            // A pack without blocks still gets its number.
            let chunks: Vec<&[(BlockId, BlockLocation)]> = if s.blocks.is_empty() {
                vec![&[]]
            } else {
                chunks.collect()
            };
            for (c, chunk) in chunks.into_iter().enumerate() {
                // Durable: redb keeps the pages of non-durable commits in memory until the
                // next durable one, which would let a large sync grow without bound.
                let txn = self.db()?.begin_write().map_err(|e| self.err(e))?;
                let domain = self.domain_number_in(&txn, &s.domain)?;
                let number = match n {
                    Some(n) => n,
                    None => self.pack_number_in(&txn, s, domain)?,
                };
                n = Some(number);
                {
                    let mut blocks = txn.open_table(BLOCKS).map_err(|e| self.err(e))?;
                    let mut ids = Vec::with_capacity(chunk.len() * BlockId::LEN);
                    for (id, _) in chunk {
                        ids.extend_from_slice(id.as_bytes());
                    }
                    // In key order, the B-tree's pages are visited once each, not at random;
                    // one insert per block, the previous entry put back when there was one
                    // (rare: another writer stored the block meanwhile).
                    let mut sorted: Vec<&(BlockId, BlockLocation)> = chunk.iter().collect();
                    sorted.sort_unstable_by_key(|a| a.0);
                    for (id, loc) in sorted {
                        let previous = blocks
                            .insert(id.as_bytes(), entry_bytes(domain, number, loc))
                            .map_err(|e| self.err(e))?
                            .map(|v| v.value());
                        if let Some(previous) = previous
                            && !relocate
                        {
                            blocks
                                .insert(id.as_bytes(), previous)
                                .map_err(|e| self.err(e))?;
                        }
                    }
                    let mut pack_blocks = txn.open_table(PACK_BLOCKS).map_err(|e| self.err(e))?;
                    pack_blocks
                        .insert((number, c as u32), ids.as_slice())
                        .map_err(|e| self.err(e))?;
                }
                txn.commit().map_err(|e| self.err(e))?;
            }
            if let Some(n) = n {
                numbers.push(n);
            }
        }
        let mut txn = self.db()?.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(durability).map_err(|e| self.err(e))?;
        {
            let mut pack_indexes = txn.open_table(PACK_INDEXES).map_err(|e| self.err(e))?;
            let mut numbers_of_object = Vec::with_capacity(numbers.len() * 4);
            for n in &numbers {
                numbers_of_object.extend_from_slice(&n.to_be_bytes());
                let keys = pack_indexes
                    .get(*n)
                    .map_err(|e| self.err(e))?
                    .map(|v| v.value().to_string());
                let keys = match keys {
                    Some(k) if k.lines().any(|l| l == key) => k,
                    Some(k) => format!("{k}\n{key}"),
                    None => key.to_string(),
                };
                pack_indexes
                    .insert(*n, keys.as_str())
                    .map_err(|e| self.err(e))?;
            }
            let mut objects = txn.open_table(INDEX_OBJECTS).map_err(|e| self.err(e))?;
            objects
                .insert(key, numbers_of_object.as_slice())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The number of pack `s`, allocated (with its record) on first sight.
    fn pack_number_in(
        &self,
        txn: &WriteTransaction,
        s: &PackSection,
        domain: u32,
    ) -> Result<u32, Error> {
        let mut pack_numbers = txn.open_table(PACK_NUMBERS).map_err(|e| self.err(e))?;
        if let Some(n) = pack_numbers
            .get(s.pack.as_bytes())
            .map_err(|e| self.err(e))?
        {
            return Ok(n.value());
        }
        let mut next = txn.open_table(NEXT_PACK).map_err(|e| self.err(e))?;
        let n = next
            .get(())
            .map_err(|e| self.err(e))?
            .map_or(0, |v| v.value());
        next.insert((), n + 1).map_err(|e| self.err(e))?;
        pack_numbers
            .insert(s.pack.as_bytes(), n)
            .map_err(|e| self.err(e))?;
        let mut packs = txn.open_table(PACKS).map_err(|e| self.err(e))?;
        packs
            .insert(n, pack_bytes(&s.pack, &s.salt, domain))
            .map_err(|e| self.err(e))?;
        Ok(n)
    }

    /// Forgets an index object and every pack it names.
    fn forget_index_object(&self, key: &str) -> Result<(), Error> {
        let numbers: Vec<u32> = {
            let txn = self.db()?.begin_read().map_err(|e| self.err(e))?;
            let t = txn.open_table(INDEX_OBJECTS).map_err(|e| self.err(e))?;
            let v = t.get(key).map_err(|e| self.err(e))?;
            v.map(|v| v.value().chunks_exact(4).map(be32).collect())
                .unwrap_or_default()
        };
        for n in numbers {
            self.forget_pack_number(n)?;
        }
        let txn = self.db()?.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = txn.open_table(INDEX_OBJECTS).map_err(|e| self.err(e))?;
            t.remove(key).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Forgets pack `n`: first the index objects naming it (so that one that still exists is
    /// read again at the next [`sync`](Self::sync), should a crash interrupt what follows),
    /// then the blocks still located in it, [`CHUNK`] per transaction, then the pack.
    fn forget_pack_number(&self, n: u32) -> Result<(), Error> {
        let txn = self.db()?.begin_write().map_err(|e| self.err(e))?;
        {
            let keys = {
                let mut t = txn.open_table(PACK_INDEXES).map_err(|e| self.err(e))?;
                let v = t.remove(n).map_err(|e| self.err(e))?;
                v.map(|v| v.value().to_string()).unwrap_or_default()
            };
            let mut objects = txn.open_table(INDEX_OBJECTS).map_err(|e| self.err(e))?;
            for k in keys.lines() {
                objects.remove(k).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        loop {
            let txn = self.db()?.begin_write().map_err(|e| self.err(e))?;
            let done = {
                let mut pack_blocks = txn.open_table(PACK_BLOCKS).map_err(|e| self.err(e))?;
                let first = pack_blocks
                    .range((n, 0)..=(n, u32::MAX))
                    .map_err(|e| self.err(e))?
                    .next()
                    .transpose()
                    .map_err(|e| self.err(e))?
                    .map(|(k, v)| (k.value(), v.value().to_vec()));
                match first {
                    None => true,
                    Some((chunk_key, ids)) => {
                        pack_blocks.remove(chunk_key).map_err(|e| self.err(e))?;
                        let mut blocks = txn.open_table(BLOCKS).map_err(|e| self.err(e))?;
                        for id in ids.chunks_exact(BlockId::LEN) {
                            let mut a = [0u8; BlockId::LEN];
                            a.copy_from_slice(id);
                            let here = blocks
                                .get(&a)
                                .map_err(|e| self.err(e))?
                                .is_some_and(|v| parse_entry(&v.value()).1 == n);
                            if here {
                                blocks.remove(&a).map_err(|e| self.err(e))?;
                            }
                        }
                        false
                    }
                }
            };
            txn.commit().map_err(|e| self.err(e))?;
            if done {
                break;
            }
        }
        let txn = self.db()?.begin_write().map_err(|e| self.err(e))?;
        {
            let pack = {
                let mut t = txn.open_table(PACKS).map_err(|e| self.err(e))?;
                let v = t.remove(n).map_err(|e| self.err(e))?;
                v.map(|v| parse_pack(&v.value()).0)
            };
            if let Some(p) = pack {
                let mut t = txn.open_table(PACK_NUMBERS).map_err(|e| self.err(e))?;
                t.remove(p.id.as_bytes()).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Forgets every block located in pack `id` (the pack is being deleted).
    pub fn remove_pack(&self, id: &PackId) -> Result<(), Error> {
        let n = {
            let txn = self.db()?.begin_read().map_err(|e| self.err(e))?;
            let t = txn.open_table(PACK_NUMBERS).map_err(|e| self.err(e))?;
            t.get(id.as_bytes())
                .map_err(|e| self.err(e))?
                .map(|v| v.value())
        };
        match n {
            Some(n) => self.forget_pack_number(n),
            None => Ok(()),
        }
    }

    /// Where each block is, if it is stored in `domain` (a block of another domain is not
    /// found).
    pub fn locate_many(&self, domain: u32, ids: &[BlockId]) -> Result<Vec<Option<Located>>, Error> {
        let txn = self.db()?.begin_read().map_err(|e| self.err(e))?;
        let blocks = txn.open_table(BLOCKS).map_err(|e| self.err(e))?;
        let packs = txn.open_table(PACKS).map_err(|e| self.err(e))?;
        let mut pack_cache: std::collections::HashMap<u32, PackInfo> =
            std::collections::HashMap::new();
        let mut out = vec![None; ids.len()];
        for i in key_order(ids) {
            let Some(v) = blocks.get(ids[i].as_bytes()).map_err(|e| self.err(e))? else {
                continue;
            };
            let (d, n, loc) = parse_entry(&v.value());
            if d != domain {
                continue;
            }
            let pack = match pack_cache.get(&n) {
                Some(p) => p.clone(),
                None => {
                    let Some(p) = packs.get(n).map_err(|e| self.err(e))? else {
                        continue;
                    };
                    let (info, _) = parse_pack(&p.value());
                    pack_cache.insert(n, info.clone());
                    info
                }
            };
            out[i] = Some(Located { pack, loc });
        }
        Ok(out)
    }

    /// Whether each block is stored in `domain`.
    pub fn contains_many(&self, domain: u32, ids: &[BlockId]) -> Result<Vec<bool>, Error> {
        let txn = self.db()?.begin_read().map_err(|e| self.err(e))?;
        let blocks = txn.open_table(BLOCKS).map_err(|e| self.err(e))?;
        let mut found = vec![false; ids.len()];
        for i in key_order(ids) {
            found[i] = blocks
                .get(ids[i].as_bytes())
                .map_err(|e| self.err(e))?
                .is_some_and(|v| parse_entry(&v.value()).0 == domain);
        }
        Ok(found)
    }

    /// The keys of the index objects naming pack `id`.
    pub fn pack_index_keys(&self, id: &PackId) -> Result<Vec<String>, Error> {
        let txn = self.db()?.begin_read().map_err(|e| self.err(e))?;
        let numbers = txn.open_table(PACK_NUMBERS).map_err(|e| self.err(e))?;
        let Some(n) = numbers.get(id.as_bytes()).map_err(|e| self.err(e))? else {
            return Ok(Vec::new());
        };
        let t = txn.open_table(PACK_INDEXES).map_err(|e| self.err(e))?;
        let keys = t.get(n.value()).map_err(|e| self.err(e))?;
        Ok(keys
            .map(|k| k.value().lines().map(str::to_string).collect())
            .unwrap_or_default())
    }

    /// The dedup domain of pack `id`, if the cache holds it.
    pub fn pack_domain(&self, id: &PackId) -> Result<Option<Domain>, Error> {
        let number = {
            let txn = self.db()?.begin_read().map_err(|e| self.err(e))?;
            let numbers = txn.open_table(PACK_NUMBERS).map_err(|e| self.err(e))?;
            let Some(n) = numbers.get(id.as_bytes()).map_err(|e| self.err(e))? else {
                return Ok(None);
            };
            let packs = txn.open_table(PACKS).map_err(|e| self.err(e))?;
            let Some(p) = packs.get(n.value()).map_err(|e| self.err(e))? else {
                return Ok(None);
            };
            parse_pack(&p.value()).1
        };
        self.domain_name(number)
    }

    /// Whether the repository held no garbage when this cache last recorded it (a complete
    /// collection with no write since; see [`Repository::gc_due`](crate::Repository::gc_due)).
    pub fn gc_clean(&self) -> Result<bool, Error> {
        let txn = self.db()?.begin_read().map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        Ok(meta
            .get(GC_CLEAN)
            .map_err(|e| self.err(e))?
            .is_some_and(|v| v.value() == "yes"))
    }

    /// Records (durably) whether the repository holds no garbage.
    pub fn set_gc_clean(&self, clean: bool) -> Result<(), Error> {
        let txn = self.db()?.begin_write().map_err(|e| self.err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            if clean {
                meta.insert(GC_CLEAN, "yes").map_err(|e| self.err(e))?;
            } else {
                meta.remove(GC_CLEAN).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// How many distinct blocks are stored.
    pub fn len(&self) -> Result<u64, Error> {
        let txn = self.db()?.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(BLOCKS).map_err(|e| self.err(e))?;
        t.len().map_err(|e| self.err(e))
    }

    pub fn pack_count(&self) -> Result<u64, Error> {
        let txn = self.db()?.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(PACKS).map_err(|e| self.err(e))?;
        t.len().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn section(pack: u8, n: u8, domain: Domain) -> PackSection {
        PackSection {
            pack: PackId([pack; 32]),
            salt: [pack ^ 0xff; 32],
            domain,
            blocks: (0..n)
                .map(|i| {
                    (
                        BlockId([i; 16]),
                        BlockLocation {
                            offset: 100 + u32::from(i) * 50,
                            len: 50,
                            plain_len: 8192,
                            inner: 0,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn index_encoding_roundtrips_and_rejects_damage() {
        let legacy = vec![
            section(1, 3, Domain::legacy()),
            section(2, 0, Domain::legacy()),
            section(3, 5, Domain::legacy()),
        ];
        let bytes = encode_legacy(&legacy, 1, 0xee);
        assert_eq!(bytes.len(), 12 + 3 * 68 + 8 * ENTRY_LEN);
        assert_eq!(
            decode(&bytes, "i").unwrap(),
            legacy,
            "ids are the hashes' first 16 bytes"
        );
        let mixed = vec![
            section(1, 3, Domain::cluster("a").unwrap()),
            section(2, 2, Domain::legacy()),
        ];
        let v2 = encode_legacy(&mixed, 2, 0);
        assert_eq!(decode(&v2, "i").unwrap(), mixed);
        let mut runs = mixed.clone();
        runs[0].blocks[1].1.offset = runs[0].blocks[0].1.offset;
        runs[0].blocks[1].1.inner = 8192;
        let v3 = encode_legacy(&runs, 3, 1);
        assert_eq!(decode(&v3, "i").unwrap(), runs);
        let v4 = encode(&runs);
        assert_eq!(&v4[..8], MAGIC_V4);
        assert_eq!(
            v4.len(),
            12 + 2 * 74 + "cluster/a".len() + 4 * FRAME_LEN_V4 + 5 * ENTRY_LEN_V4,
            "the two blocks of one frame share its header"
        );
        assert_eq!(decode(&v4, "i").unwrap(), runs);
        for bytes in [bytes, v2, v3, v4] {
            assert!(decode(&bytes[..bytes.len() - 1], "i").is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode(&longer, "i").is_err());
            let mut bad = bytes.clone();
            bad[0] ^= 1;
            assert!(decode(&bad, "i").is_err());
        }
    }

    #[test]
    fn index_v2_refuses_an_invalid_domain() {
        let mut bytes = encode_legacy(&[section(1, 1, Domain::cluster("a").unwrap())], 2, 0);
        // "cluster/a" -> "cluster/A"
        let at = 8 + 4 + 2 + "cluster/".len();
        bytes[at] = b'A';
        let e = decode(&bytes, "index/x").unwrap_err().to_string();
        assert!(e.contains("index/x") && e.contains("invalid domain"), "{e}");
    }

    #[test]
    fn block_index_finds_blocks_only_in_their_domain() {
        let idx = BlockIndex::open(None, "r1").unwrap();
        let a = Domain::cluster("a").unwrap();
        let b = Domain::cluster("b").unwrap();
        let (da, db) = (
            idx.domain_number(&a).unwrap(),
            idx.domain_number(&b).unwrap(),
        );
        assert_eq!(idx.domain_number(&Domain::legacy()).unwrap(), 0);
        idx.add_sections(
            "index/1",
            &[section(1, 3, a.clone())],
            false,
            redb::Durability::Immediate,
        )
        .unwrap();
        let mut s = section(2, 5, a.clone());
        s.blocks.retain(|(id, _)| id.0[0] >= 2);
        idx.add_sections("index/2", &[s], false, redb::Durability::Immediate)
            .unwrap();
        assert_eq!(idx.len().unwrap(), 5);
        assert_eq!(idx.pack_count().unwrap(), 2);
        let ids: Vec<BlockId> = (0..6).map(|i| BlockId([i; 16])).collect();
        let found = idx.locate_many(da, &ids).unwrap();
        // block 2 was in pack 1 first: that location is kept
        assert_eq!(found[2].as_ref().unwrap().pack.id, PackId([1; 32]));
        assert_eq!(found[4].as_ref().unwrap().pack.id, PackId([2; 32]));
        assert!(found[5].is_none());
        assert_eq!(
            idx.contains_many(db, &ids).unwrap(),
            vec![false; 6],
            "another domain sees nothing"
        );
        assert_eq!(idx.pack_domain(&PackId([2; 32])).unwrap(), Some(a.clone()));
        idx.remove_pack(&PackId([1; 32])).unwrap();
        assert_eq!(
            idx.contains_many(da, &ids).unwrap(),
            vec![false, false, false, true, true, false]
        );
    }

    #[test]
    fn block_index_adds_and_forgets_a_pack_larger_than_a_transaction_chunk() {
        let idx = BlockIndex::open(None, "r1").unwrap();
        let n = CHUNK * 2 + 5;
        let blocks: Vec<(BlockId, BlockLocation)> = (0..n)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                let loc = BlockLocation {
                    offset: i as u32 * 60,
                    len: 60,
                    plain_len: 8,
                    inner: 0,
                };
                (BlockId(id), loc)
            })
            .collect();
        let ids: Vec<BlockId> = blocks.iter().map(|(id, _)| *id).collect();
        let s = PackSection {
            pack: PackId([7; 32]),
            salt: [1; 32],
            domain: Domain::legacy(),
            blocks,
        };
        idx.add_sections("index/7", &[s], false, redb::Durability::Immediate)
            .unwrap();
        assert_eq!(idx.len().unwrap(), n as u64);
        assert!(idx.contains_many(0, &ids).unwrap().iter().all(|c| *c));
        assert_eq!(
            idx.pack_index_keys(&PackId([7; 32])).unwrap(),
            vec!["index/7"]
        );
        idx.remove_pack(&PackId([7; 32])).unwrap();
        assert_eq!(idx.len().unwrap(), 0);
        assert_eq!(idx.pack_count().unwrap(), 0);
        assert!(idx.pack_index_keys(&PackId([7; 32])).unwrap().is_empty());
    }

    #[test]
    fn block_index_cache_of_another_repository_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.redb");
        {
            let idx = BlockIndex::open(Some(&path), "r1").unwrap();
            idx.add_sections(
                "index/1",
                &[section(1, 3, Domain::legacy())],
                false,
                redb::Durability::Immediate,
            )
            .unwrap();
        }
        assert_eq!(
            BlockIndex::open(Some(&path), "r1").unwrap().len().unwrap(),
            3
        );
        assert_eq!(
            BlockIndex::open(Some(&path), "r2").unwrap().len().unwrap(),
            0
        );
        std::fs::write(&path, b"not a database").unwrap();
        assert_eq!(
            BlockIndex::open(Some(&path), "r2").unwrap().len().unwrap(),
            0
        );
    }
}
