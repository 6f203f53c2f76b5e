//! Packs: one sealed object per pack whose frames are the blocks, and the writer that fills
//! them. After a pack is stored, its index object is stored; only then are its blocks part
//! of the repository.

use std::collections::HashSet;

use klio_crypto::{
    FrameCipher, FrameIter, FrameRead, MasterKey, ObjectHeader, ObjectKind, SealedSummary,
    seal_object,
};

use crate::index::{BlockLocation, PackInfo, PackSection};
use crate::repository::{index_key, pack_key, pack_name};
use crate::{BlockId, Error, MAX_BLOCK_SIZE, PackId, Repository};

/// What a [`PackWriter`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Blocks stored by this writer.
    pub blocks_added: u64,
    /// Blocks offered that were already stored (in the repository or in this writer).
    pub blocks_deduplicated: u64,
    /// Plaintext bytes of the blocks stored.
    pub plain_bytes_added: u64,
    pub packs_written: u64,
    /// Bytes of the pack objects written.
    pub pack_bytes: u64,
    /// Bytes of the index objects written.
    pub index_bytes: u64,
}

impl PackStats {
    /// Everything written to the store.
    pub fn stored_bytes(&self) -> u64 {
        self.pack_bytes + self.index_bytes
    }
}

/// The pack being filled.
struct OpenPack {
    id: PackId,
    salt: [u8; 32],
    cipher: FrameCipher,
    buf: Vec<u8>,
    blocks: Vec<(BlockId, BlockLocation)>,
    ids: HashSet<BlockId>,
    plain_len: u64,
}

impl OpenPack {
    fn new(master: &MasterKey, target: usize) -> OpenPack {
        let id = PackId::random();
        let header = ObjectHeader::new(ObjectKind::Blob, &pack_name(&id));
        let cipher = FrameCipher::new(master, &header);
        let mut buf = Vec::with_capacity(target + (target >> 3));
        buf.extend_from_slice(cipher.header_bytes());
        OpenPack {
            id,
            salt: header.salt,
            cipher,
            buf,
            blocks: Vec::new(),
            ids: HashSet::new(),
            plain_len: 0,
        }
    }
}

/// Adds blocks to the repository, deduplicated, in packs of about
/// [`RepositoryOptions::pack_target_size`](crate::RepositoryOptions::pack_target_size) bytes.
///
/// A pack is written when it reaches the target size and by [`PackWriter::finish`]; its
/// index object is written right after it, and from then on its blocks are found by
/// [`Repository::has_block`] and [`Repository::read_block`] in this process. Blocks in the
/// unfinished pack are not stored: dropping the writer (or an error from it) loses them, and
/// the backup must not refer to them.
pub struct PackWriter {
    repo: Repository,
    open: Option<OpenPack>,
    stats: PackStats,
    /// Rewrites blocks that are already stored (garbage collection): no dedup against the
    /// repository, and the new pack takes over their locations.
    relocate: bool,
}

impl PackWriter {
    pub(crate) fn new(repo: Repository) -> PackWriter {
        PackWriter {
            repo,
            open: None,
            stats: PackStats::default(),
            relocate: false,
        }
    }

    /// A writer that stores blocks again even though they are stored, for rewriting packs.
    pub(crate) fn relocating(repo: Repository) -> PackWriter {
        let mut w = PackWriter::new(repo);
        w.relocate = true;
        w
    }

    /// Adds one block whose id is `id`. Returns `true` if the block is new, `false` if it was
    /// already stored. The id is recomputed from `plaintext`: a wrong id is an error.
    pub fn add_block(&mut self, id: &BlockId, plaintext: &[u8]) -> Result<bool, Error> {
        self.add(id, plaintext, None)
    }

    /// Like [`add_block`](Self::add_block), with the compression already decided (by a
    /// client): `Some(compressed)` must be the zstd compression of `plaintext` (the caller
    /// checked that it decompresses to it) and is stored as is; `None` stores `plaintext`
    /// uncompressed without trying to compress it.
    pub fn add_encoded_block(
        &mut self,
        id: &BlockId,
        plaintext: &[u8],
        compressed: Option<Vec<u8>>,
    ) -> Result<bool, Error> {
        self.add(id, plaintext, Some(compressed))
    }

    /// Adds block `id` as another repository stored it: `payload` is its stored form
    /// (zstd-compressed when `compressed`) of `plain_len` bytes, read from a frame that was
    /// authenticated and that the index binds to `id` (a relay from Tier 1). It is sealed
    /// again as it is, without being decompressed or hashed: the repository it comes from
    /// checked the id when it stored the block, and every read checks it again. Returns
    /// `true` if the block is new here.
    pub fn add_authenticated_payload(
        &mut self,
        id: &BlockId,
        plain_len: u32,
        payload: Vec<u8>,
        compressed: bool,
    ) -> Result<bool, Error> {
        if plain_len as usize > MAX_BLOCK_SIZE {
            return Err(Error::BlockTooLarge {
                block: *id,
                size: plain_len as usize,
                max: MAX_BLOCK_SIZE,
            });
        }
        if self.is_stored(id)? {
            return Ok(false);
        }
        self.seal(id, plain_len, |cipher, offset, out| {
            cipher.seal_payload(offset, plain_len, payload, compressed, out)
        })
    }

    /// Whether the block is stored already (counted as deduplicated).
    fn is_stored(&mut self, id: &BlockId) -> Result<bool, Error> {
        let pending = self.open.as_ref().is_some_and(|p| p.ids.contains(id));
        if pending || (!self.relocate && self.repo.has_block(id)?) {
            self.stats.blocks_deduplicated += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// Appends block `id`'s frame, which `frame` seals at the given plaintext offset, to the
    /// open pack (opened if needed); writes the pack once it reaches the target size.
    fn seal(
        &mut self,
        id: &BlockId,
        plain_len: u32,
        frame: impl FnOnce(&FrameCipher, u64, &mut Vec<u8>),
    ) -> Result<bool, Error> {
        let target = self.repo.options().pack_target_size;
        let master = self.repo.master();
        let pack = self
            .open
            .get_or_insert_with(|| OpenPack::new(master, target));
        let start = pack.buf.len();
        frame(&pack.cipher, pack.plain_len, &mut pack.buf);
        let loc = BlockLocation {
            offset: start as u32,
            len: (pack.buf.len() - start) as u32,
            plain_len,
        };
        pack.blocks.push((*id, loc));
        pack.ids.insert(*id);
        pack.plain_len += u64::from(plain_len);
        self.stats.blocks_added += 1;
        self.stats.plain_bytes_added += u64::from(plain_len);
        if pack.buf.len() >= target {
            self.flush()?;
        }
        Ok(true)
    }

    /// Whether the unfinished pack holds the block.
    pub fn contains(&self, id: &BlockId) -> bool {
        self.open.as_ref().is_some_and(|p| p.ids.contains(id))
    }

    fn add(
        &mut self,
        id: &BlockId,
        plaintext: &[u8],
        encoded: Option<Option<Vec<u8>>>,
    ) -> Result<bool, Error> {
        if plaintext.len() > MAX_BLOCK_SIZE {
            return Err(Error::BlockTooLarge {
                block: *id,
                size: plaintext.len(),
                max: MAX_BLOCK_SIZE,
            });
        }
        let actual = self.repo.block_id(plaintext);
        if actual != *id {
            return Err(Error::BlockIdMismatch {
                claimed: *id,
                actual,
            });
        }
        if self.is_stored(id)? {
            return Ok(false);
        }
        let level = self.repo.options().compression_level;
        let plain_len = plaintext.len() as u32;
        self.seal(id, plain_len, |cipher, offset, out| match encoded {
            Some(Some(c)) => cipher.seal_payload(offset, plain_len, c, true, out),
            Some(None) => cipher.seal_payload(offset, plain_len, plaintext.to_vec(), false, out),
            None => cipher.seal_frame(offset, plaintext, level, out),
        })
    }

    /// Blocks added but not yet written (in the unfinished pack).
    pub fn pending_blocks(&self) -> usize {
        self.open.as_ref().map_or(0, |p| p.blocks.len())
    }

    /// Writes the unfinished pack and its index, and returns what this writer did.
    pub fn finish(mut self) -> Result<PackStats, Error> {
        self.flush()?;
        Ok(self.stats)
    }

    /// Writes the open pack, then its index object, then adds it to the in-memory index.
    fn flush(&mut self) -> Result<(), Error> {
        let Some(mut pack) = self.open.take() else {
            return Ok(());
        };
        // No hash of the plaintexts: every block frame is authenticated and bound to its
        // position on its own, and no reader opens a pack as a whole (docs/formats/
        // repository.md, "Packs").
        let summary = SealedSummary {
            total_len: pack.plain_len,
            blake3: [0; 32],
        };
        pack.cipher.seal_final(&summary, &mut pack.buf);
        let store = self.repo.store();
        store.put(&pack_key(&pack.id), &pack.buf)?;
        let section = PackSection {
            pack: pack.id,
            salt: pack.salt,
            domain: self.repo.domain().clone(),
            blocks: pack.blocks,
        };
        let index_id = hex::encode(klio_crypto::random_bytes::<32>());
        let key = index_key(&index_id);
        let sealed = seal_object(
            self.repo.master(),
            ObjectKind::Blob,
            &key,
            &crate::index::encode(std::slice::from_ref(&section)),
            self.repo.options().compression_level,
        );
        store.put(&key, &sealed)?;
        self.repo.index_add(&key, &section, self.relocate)?;
        self.stats.packs_written += 1;
        self.stats.pack_bytes += pack.buf.len() as u64;
        self.stats.index_bytes += sealed.len() as u64;
        tracing::debug!(
            pack = %pack.id,
            blocks = section.blocks.len(),
            bytes = pack.buf.len(),
            "wrote pack"
        );
        Ok(())
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if let Some(p) = &self.open
            && !p.blocks.is_empty()
        {
            tracing::warn!(
                pack = %p.id,
                blocks = p.blocks.len(),
                "pack writer dropped without finish: its unwritten blocks are not stored"
            );
        }
    }
}

/// The cipher of a pack, from its id and salt as recorded in the index.
pub(crate) fn pack_cipher(master: &MasterKey, pack: &PackInfo) -> FrameCipher {
    let header = ObjectHeader {
        kind: ObjectKind::Blob,
        salt: pack.salt,
        name: pack_name(&pack.id),
    };
    FrameCipher::new(master, &header)
}

/// Authenticates the frame `frame` (exactly the bytes the index points to) and returns
/// its payload as stored: (compressed, payload). Errors are reasons.
pub(crate) fn open_block_payload(
    cipher: &FrameCipher,
    frame: &[u8],
    loc: &BlockLocation,
) -> Result<(bool, Vec<u8>), String> {
    let raw = match FrameIter::new(frame).next_frame() {
        FrameRead::Frame(raw) if raw.end == frame.len() && !raw.is_final() => raw,
        _ => return Err("the index does not point to a complete block frame".to_string()),
    };
    if raw.plain_len != loc.plain_len {
        return Err(format!(
            "the frame holds {} bytes, the index says {}",
            raw.plain_len, loc.plain_len
        ));
    }
    let opened = cipher.open_frame(&raw).map_err(crypto_reason)?;
    Ok((opened.compressed, opened.payload))
}

/// The reason of a crypto error, for messages that name the block and the pack themselves.
fn crypto_reason(e: klio_crypto::Error) -> String {
    match e {
        klio_crypto::Error::Corrupt { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// A block as stored, authenticated but not yet decompressed.
#[derive(Clone, Debug)]
pub struct BlockPayload {
    pub id: BlockId,
    pub plain_len: u32,
    /// `payload` is zstd-compressed.
    pub compressed: bool,
    pub payload: Vec<u8>,
}

/// Opens the frame `frame` (exactly the bytes the index points to) as block `id`: decrypts,
/// decompresses, and checks the length and the keyed hash. Errors are reasons, to be
/// reported with the block and the pack.
pub(crate) fn open_block_frame(
    repo: &Repository,
    cipher: &FrameCipher,
    frame: &[u8],
    id: &BlockId,
    loc: &BlockLocation,
) -> Result<Vec<u8>, String> {
    let (compressed, payload) = open_block_payload(cipher, frame, loc)?;
    let plaintext = klio_crypto::decompress_payload(&payload, compressed, loc.plain_len, "block")
        .map_err(crypto_reason)?;
    if repo.block_id(&plaintext) != *id {
        return Err("its content does not match the block id".to_string());
    }
    Ok(plaintext)
}
