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

/// A block inside a frame: its id, its offset in the frame's plaintext and its length.
pub type FramedBlock = (BlockId, u32, u32);

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
    /// `finish` wrote everything.
    finished: bool,
    /// It wrote a pack and counts among the repository's active writers.
    active: bool,
}

impl PackWriter {
    pub(crate) fn new(repo: Repository) -> PackWriter {
        PackWriter {
            repo,
            open: None,
            stats: PackStats::default(),
            relocate: false,
            finished: false,
            active: false,
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
        let len = plaintext.len() as u32;
        Ok(self.add(&[(*id, len)], plaintext, None)? > 0)
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
        let len = plaintext.len() as u32;
        Ok(self.add(&[(*id, len)], plaintext, Some(compressed))? > 0)
    }

    /// Adds a run: several blocks (`pages`: id and length, in order) whose plaintexts,
    /// concatenated, are `plaintext`, sealed as **one frame** so they are compressed
    /// together. Each id is recomputed from its bytes: a wrong one is an error. The blocks
    /// already stored (or named twice) are not indexed again; the frame is written when at
    /// least one block is new. `compressed` as for
    /// [`add_encoded_block`](Self::add_encoded_block), or `None` to let the writer
    /// compress. Returns how many blocks are new.
    pub fn add_run(
        &mut self,
        pages: &[(BlockId, u32)],
        plaintext: &[u8],
        compressed: Option<Option<Vec<u8>>>,
    ) -> Result<u64, Error> {
        self.add(pages, plaintext, compressed)
    }

    /// Adds a frame as another repository stored it: `payload` is its stored form
    /// (zstd-compressed when `compressed`) of `frame_len` plaintext bytes, read from a frame
    /// that was authenticated, and `pages` (id, offset in the frame, length) are blocks
    /// that the other repository's index places in that frame (a relay from Tier 1). It is
    /// sealed again as it is, without being decompressed or hashed: the repository it
    /// comes from checked the ids when it stored the blocks, and every read checks them
    /// again. Returns how many of the blocks are new here.
    pub fn add_authenticated_run(
        &mut self,
        pages: &[FramedBlock],
        frame_len: u32,
        payload: Vec<u8>,
        compressed: bool,
    ) -> Result<u64, Error> {
        if frame_len as usize > MAX_BLOCK_SIZE {
            return Err(Error::InvalidRun(format!(
                "a frame of {frame_len} bytes is larger than the largest block size of {MAX_BLOCK_SIZE} bytes"
            )));
        }
        let mut end = 0u64;
        for (id, inner, len) in pages {
            if u64::from(*inner) < end || u64::from(*inner) + u64::from(*len) > u64::from(frame_len)
            {
                return Err(Error::InvalidRun(format!(
                    "block {id} at {inner}+{len} does not follow the previous block inside a frame of {frame_len} bytes"
                )));
            }
            end = u64::from(*inner) + u64::from(*len);
        }
        let new = self.new_pages(pages.iter().copied())?;
        if new.is_empty() {
            return Ok(0);
        }
        self.seal(&new, frame_len, |cipher, offset, out| {
            cipher.seal_payload(offset, frame_len, payload, compressed, out)
        })
    }

    /// The blocks of a frame that are not stored yet (each id once): (id, offset in the
    /// frame, length). Those already stored count as deduplicated.
    fn new_pages(
        &mut self,
        pages: impl Iterator<Item = FramedBlock>,
    ) -> Result<Vec<FramedBlock>, Error> {
        let pages: Vec<FramedBlock> = pages.collect();
        // One lookup of the whole run in the index (a read transaction per block cost more
        // than the block's hash).
        let stored = if self.relocate {
            vec![false; pages.len()]
        } else {
            let ids: Vec<BlockId> = pages.iter().map(|(id, _, _)| *id).collect();
            self.repo.has_blocks(&ids)?
        };
        let mut new: Vec<FramedBlock> = Vec::new();
        let mut taken: HashSet<BlockId> = HashSet::new();
        for ((id, inner, len), stored) in pages.into_iter().zip(stored) {
            let pending = self.open.as_ref().is_some_and(|p| p.ids.contains(&id));
            if pending || stored || !taken.insert(id) {
                self.stats.blocks_deduplicated += 1;
            } else {
                new.push((id, inner, len));
            }
        }
        Ok(new)
    }

    /// Appends a frame of `frame_len` plaintext bytes, which `frame` seals at the given
    /// plaintext offset, to the open pack (opened if needed), and indexes the blocks
    /// `pages` (id, offset in the frame, length) in it; writes the pack once it reaches the
    /// target size. Returns how many blocks were indexed.
    fn seal(
        &mut self,
        pages: &[FramedBlock],
        frame_len: u32,
        frame: impl FnOnce(&FrameCipher, u64, &mut Vec<u8>),
    ) -> Result<u64, Error> {
        let target = self.repo.options().pack_target_size;
        let master = self.repo.master();
        let pack = self
            .open
            .get_or_insert_with(|| OpenPack::new(master, target));
        let start = pack.buf.len();
        frame(&pack.cipher, pack.plain_len, &mut pack.buf);
        let len = (pack.buf.len() - start) as u32;
        for (id, inner, plain_len) in pages {
            pack.blocks.push((
                *id,
                BlockLocation {
                    offset: start as u32,
                    len,
                    plain_len: *plain_len,
                    inner: *inner,
                },
            ));
            pack.ids.insert(*id);
            self.stats.blocks_added += 1;
            self.stats.plain_bytes_added += u64::from(*plain_len);
        }
        pack.plain_len += u64::from(frame_len);
        if pack.buf.len() >= target {
            self.flush()?;
        }
        Ok(pages.len() as u64)
    }

    /// Whether the unfinished pack holds the block.
    pub fn contains(&self, id: &BlockId) -> bool {
        self.open.as_ref().is_some_and(|p| p.ids.contains(id))
    }

    fn add(
        &mut self,
        pages: &[(BlockId, u32)],
        plaintext: &[u8],
        encoded: Option<Option<Vec<u8>>>,
    ) -> Result<u64, Error> {
        let first = pages.first().map_or(BlockId([0; 16]), |(id, _)| *id);
        if plaintext.len() > MAX_BLOCK_SIZE {
            return Err(Error::BlockTooLarge {
                block: first,
                size: plaintext.len(),
                max: MAX_BLOCK_SIZE,
            });
        }
        let total: u64 = pages.iter().map(|(_, len)| u64::from(*len)).sum();
        if pages.is_empty() || total != plaintext.len() as u64 {
            return Err(Error::InvalidRun(format!(
                "{} blocks of {total} bytes in all for {} bytes of content",
                pages.len(),
                plaintext.len()
            )));
        }
        let mut placed = Vec::with_capacity(pages.len());
        let mut inner = 0usize;
        for (id, len) in pages {
            let end = inner + *len as usize;
            let actual = self.repo.block_id(&plaintext[inner..end]);
            if actual != *id {
                return Err(Error::BlockIdMismatch {
                    claimed: *id,
                    actual,
                });
            }
            placed.push((*id, inner as u32, *len));
            inner = end;
        }
        let new = self.new_pages(placed.into_iter())?;
        if new.is_empty() {
            return Ok(0);
        }
        let level = self.repo.options().compression_level;
        let frame_len = plaintext.len() as u32;
        self.seal(&new, frame_len, |cipher, offset, out| match encoded {
            Some(Some(c)) => cipher.seal_payload(offset, frame_len, c, true, out),
            Some(None) => cipher.seal_payload(offset, frame_len, plaintext.to_vec(), false, out),
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
        self.finished = true;
        if std::mem::take(&mut self.active) {
            self.repo.writer_active(false);
        }
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
        if !self.active {
            // Counted before anything is written: a collection meanwhile must not record
            // the repository as free of garbage while this pack may end up unreferenced.
            self.repo.writer_active(true);
            self.active = true;
        }
        self.repo.before_write()?;
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
        if !self.finished && (self.active || self.open.is_some()) {
            // Packs written (or half-written) by a writer that never finished: whatever
            // was to name them will not.
            self.repo.note_garbage();
        }
        if self.active {
            self.repo.writer_active(false);
        }
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

/// Authenticates the frame `frame` (exactly the bytes the index points to) and returns its
/// payload as stored and its plaintext length: (compressed, payload, frame length), after
/// checking that the block `loc` describes lies inside it. Errors are reasons.
pub(crate) fn open_block_payload(
    cipher: &FrameCipher,
    frame: &[u8],
    loc: &BlockLocation,
) -> Result<(bool, Vec<u8>, u32), String> {
    let raw = match FrameIter::new(frame).next_frame() {
        FrameRead::Frame(raw) if raw.end == frame.len() && !raw.is_final() => raw,
        _ => return Err("the index does not point to a complete block frame".to_string()),
    };
    check_inside(raw.plain_len, loc)?;
    let opened = cipher.open_frame(&raw).map_err(crypto_reason)?;
    Ok((opened.compressed, opened.payload, raw.plain_len))
}

/// The block `loc` describes lies inside a frame of `frame_len` plaintext bytes.
pub(crate) fn check_inside(frame_len: u32, loc: &BlockLocation) -> Result<(), String> {
    if u64::from(frame_len) < u64::from(loc.inner) + u64::from(loc.plain_len) {
        return Err(format!(
            "the frame holds {frame_len} bytes, the index places the block at {} bytes of {}",
            loc.inner, loc.plain_len
        ));
    }
    Ok(())
}

/// The reason of a crypto error, for messages that name the block and the pack themselves.
fn crypto_reason(e: klio_crypto::Error) -> String {
    match e {
        klio_crypto::Error::Corrupt { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// A block as stored, authenticated but not yet decompressed: the payload of the frame that
/// holds it (shared by the blocks of a run) and where the block lies in that frame.
#[derive(Clone, Debug)]
pub struct BlockPayload {
    pub id: BlockId,
    pub plain_len: u32,
    /// `payload` is zstd-compressed.
    pub compressed: bool,
    /// The frame's payload as stored.
    pub payload: bytes::Bytes,
    /// Offset of the block in the frame's plaintext (0 for a frame of one block).
    pub inner: u32,
    /// Plaintext length of the frame (`plain_len` for a frame of one block).
    pub frame_len: u32,
    /// The frame (pack and offset in it): blocks with the same one share `payload`.
    pub frame: (PackId, u32),
}

impl BlockPayload {
    /// Whether the frame holds exactly this block.
    pub fn is_single(&self) -> bool {
        self.inner == 0 && self.frame_len == self.plain_len
    }

    /// The plaintext of the frame that holds the block (decompressed). Errors are reasons.
    pub fn frame_plaintext(&self) -> Result<Vec<u8>, String> {
        frame_plaintext(self.compressed, &self.payload, self.frame_len)
    }

    /// The block's bytes in `frame`, the plaintext of its frame; `None` if they lie beyond it.
    pub fn block_in<'a>(&self, frame: &'a [u8]) -> Option<&'a [u8]> {
        slice_block(frame, self.inner, self.plain_len)
    }
}

/// Decompresses a frame's payload into its plaintext of `frame_len` bytes. Errors are
/// reasons.
fn frame_plaintext(compressed: bool, payload: &[u8], frame_len: u32) -> Result<Vec<u8>, String> {
    klio_crypto::decompress_payload(payload, compressed, frame_len, "block").map_err(crypto_reason)
}

/// The `len` bytes at `inner` of a frame's plaintext, if they lie inside it.
fn slice_block(plaintext: &[u8], inner: u32, len: u32) -> Option<&[u8]> {
    let start = inner as usize;
    plaintext.get(start..start.checked_add(len as usize)?)
}

/// The block at `inner` (`len` bytes) of its frame's plaintext, checked against its id.
pub(crate) fn block_in_frame<'a>(
    repo: &Repository,
    plaintext: &'a [u8],
    id: &BlockId,
    inner: u32,
    len: u32,
) -> Result<&'a [u8], String> {
    let block = slice_block(plaintext, inner, len)
        .ok_or_else(|| "the block lies beyond its frame".to_string())?;
    if repo.block_id(block) != *id {
        return Err("its content does not match the block id".to_string());
    }
    Ok(block)
}

/// A frame (offset and length in its pack) and its plaintext, or why it did not open.
type OpenedFrame = ((u32, u32), Result<Vec<u8>, String>);

/// Opens the frames of one pack for the blocks they hold, keeping the last frame's
/// plaintext: the blocks of a run, read one after the other, cost one decryption and one
/// decompression.
pub(crate) struct FrameReader<'r> {
    repo: &'r Repository,
    cipher: FrameCipher,
    last: Option<OpenedFrame>,
}

impl<'r> FrameReader<'r> {
    pub(crate) fn new(repo: &'r Repository, pack: &PackInfo) -> FrameReader<'r> {
        FrameReader {
            repo,
            cipher: pack_cipher(repo.master(), pack),
            last: None,
        }
    }

    /// Block `id` at `loc`, from `frame` (exactly the bytes `loc` points to): decrypted,
    /// decompressed and checked against its id. Errors are reasons.
    pub(crate) fn block(
        &mut self,
        frame: &[u8],
        id: &BlockId,
        loc: &BlockLocation,
    ) -> Result<&[u8], String> {
        if self.last.as_ref().is_none_or(|(k, _)| *k != loc.frame()) {
            let plain = open_block_payload(&self.cipher, frame, loc).and_then(
                |(compressed, payload, frame_len)| frame_plaintext(compressed, &payload, frame_len),
            );
            self.last = Some((loc.frame(), plain));
        }
        match &self.last {
            Some((_, Ok(plain))) => block_in_frame(self.repo, plain, id, loc.inner, loc.plain_len),
            Some((_, Err(reason))) => Err(reason.clone()),
            None => Err("no frame".to_string()),
        }
    }
}
