//! [`Repository`]: the repository's config and keys, the block index, and the reading and
//! writing of blocks, blocklists and manifests.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use klio_crypto::{MasterKey, ObjectKind, open_object, seal_object};
use serde::{Deserialize, Serialize};

use crate::ids::Domain;
use crate::index::{self, BlockIndex, PackSection};
use crate::pack::{BlockPayload, FrameReader, check_inside, open_block_payload, pack_cipher};
use crate::{
    BackupId, BlockId, BlocklistId, Error, Manifest, ObjectStore, PackId, PackWriter, blocklist,
    sealed_error, validate_cluster_name,
};

/// The largest block: what one frame of a complete sealed object may carry.
pub const MAX_BLOCK_SIZE: usize = 1 << 20;
/// The most block ids in one blocklist.
pub const MAX_BLOCKLIST_LEN: usize = 1 << 20;
/// Default size at which a pack is closed.
pub const DEFAULT_PACK_TARGET_SIZE: usize = 16 << 20;
/// Default zstd level for blocks and metadata.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;

const CONFIG_KEY: &str = "config";
const KEY_ENVELOPE_KEY: &str = "keys.json";
const CONFIG_FORMAT: &str = "klio-repository/1";
const BLOCK_ID_CONTEXT: &str = "klio repository block id v1";
const BLOCKLIST_ID_CONTEXT: &str = "klio repository blocklist id v1";
const DOMAIN_BLOCK_ID_CONTEXT: &str = "klio repository block id v2 (per domain)";
const DOMAIN_BLOCKLIST_ID_CONTEXT: &str = "klio repository blocklist id v2 (per domain)";

pub(crate) fn pack_name(id: &PackId) -> String {
    format!("pack/{id}")
}

pub(crate) fn pack_key(id: &PackId) -> String {
    format!("packs/{}/{id}", id.fanout())
}

/// Index objects are bound to their key as their name.
pub(crate) fn index_key(index_id_hex: &str) -> String {
    format!("index/{index_id_hex}")
}

pub(crate) fn blocklist_key(id: &BlocklistId) -> String {
    format!("blocklists/{}/{id}", id.fanout())
}

fn blocklist_name(id: &BlocklistId) -> String {
    format!("blocklist/{id}")
}

pub(crate) fn manifest_key(cluster: &str, backup_id: &BackupId) -> String {
    format!("manifests/{cluster}/{backup_id}")
}

fn manifest_name(cluster: &str, backup_id: &BackupId) -> String {
    format!("manifest/{cluster}/{backup_id}")
}

/// Tunables of a [`Repository`] handle (not part of the format: readers need none of them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepositoryOptions {
    /// zstd level for blocks and metadata; `None` stores everything uncompressed. Data is
    /// only stored compressed when that saves at least 64 bytes.
    pub compression_level: Option<i32>,
    /// A pack is written once its stored size reaches this many bytes.
    pub pack_target_size: usize,
    /// Where the block index cache lives (a redb file, rebuilt from the index objects when
    /// lost); `None`: a temporary file removed when the repository is dropped.
    pub index_cache: Option<PathBuf>,
}

impl Default for RepositoryOptions {
    fn default() -> RepositoryOptions {
        RepositoryOptions {
            compression_level: Some(DEFAULT_COMPRESSION_LEVEL),
            pack_target_size: DEFAULT_PACK_TARGET_SIZE,
            index_cache: None,
        }
    }
}

impl RepositoryOptions {
    fn validate(&self) -> Result<(), Error> {
        if let Some(level) = self.compression_level
            && !(-7..=22).contains(&level)
        {
            return Err(Error::InvalidOption {
                option: "compression_level",
                reason: format!("{level} is not a zstd level from -7 to 22"),
            });
        }
        if !(1..=1 << 30).contains(&self.pack_target_size) {
            return Err(Error::InvalidOption {
                option: "pack_target_size",
                reason: format!("{} is not from 1 byte to 1 GiB", self.pack_target_size),
            });
        }
        Ok(())
    }
}

/// The `config` object.
#[derive(Serialize, Deserialize)]
struct ConfigFile {
    format: String,
    repository_id: String,
    key_id: String,
    /// hex of a sealed object named `config/<repository_id>` holding [`Secrets`]
    secrets: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Secrets {
    /// hex, 32 bytes
    id_key: String,
}

/// The repository's keys, from `config`.
struct Keys {
    repository_id: String,
    /// The secret every id key derives from.
    id: [u8; 32],
}

/// The id keys of one dedup domain.
struct DomainKeys {
    domain: Domain,
    /// The domain's number in the block index cache.
    number: u32,
    block: [u8; 32],
    blocklist: [u8; 32],
}

impl DomainKeys {
    fn new(id_key: &[u8; 32], domain: Domain, number: u32) -> DomainKeys {
        let (block, blocklist) = if domain.is_legacy() {
            (
                blake3::derive_key(BLOCK_ID_CONTEXT, id_key),
                blake3::derive_key(BLOCKLIST_ID_CONTEXT, id_key),
            )
        } else {
            let mut material = id_key.to_vec();
            material.extend_from_slice(domain.as_str().as_bytes());
            (
                blake3::derive_key(DOMAIN_BLOCK_ID_CONTEXT, &material),
                blake3::derive_key(DOMAIN_BLOCKLIST_ID_CONTEXT, &material),
            )
        };
        DomainKeys {
            domain,
            number,
            block,
            blocklist,
        }
    }
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    master: MasterKey,
    options: RepositoryOptions,
    keys: Keys,
    index: BlockIndex,
    /// Index objects that could not be read at open: (key, reason).
    damaged_indexes: Vec<(String, String)>,
    /// Blocklists known to exist (written or read by this handle).
    known_blocklists: Mutex<HashSet<BlocklistId>>,
    /// Whether a garbage collection could reclaim anything (see [`Repository::gc_due`]).
    garbage: crate::gc::GarbageWatch,
}

/// An open repository, working in one dedup [`Domain`]: blocks are named, found, read,
/// stored and listed only in it ([`in_domain`](Self::in_domain) gives a handle for another
/// one). Manifests, garbage collection and verification span every domain. Cheap to clone;
/// clones share the block index. `Send + Sync`.
#[derive(Clone)]
pub struct Repository {
    inner: Arc<Inner>,
    domain: Arc<DomainKeys>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.inner.store.location())
            .field("repository_id", &self.inner.keys.repository_id)
            .finish_non_exhaustive()
    }
}

impl Repository {
    /// Opens the repository in `store`: reads `config` (checking that `master` is the key it
    /// was created with) and brings the block index cache up to date with the index
    /// objects (reading only those it does not hold yet). The handle works in the legacy
    /// domain; see [`in_domain`](Self::in_domain).
    pub fn open(
        store: Arc<dyn ObjectStore>,
        master: MasterKey,
        options: RepositoryOptions,
    ) -> Result<Repository, Error> {
        options.validate()?;
        let raw = store
            .get(CONFIG_KEY)?
            .ok_or_else(|| Error::NotARepository {
                location: store.location(),
            })?;
        let keys = read_config(store.as_ref(), &master, &raw)?;
        let index = BlockIndex::open(options.index_cache.as_deref(), &keys.repository_id)?;
        let damaged_indexes = index.sync(store.as_ref(), &master)?;
        tracing::info!(
            location = %store.location(),
            repository_id = %keys.repository_id,
            blocks = index.len()?,
            packs = index.pack_count()?,
            damaged_indexes = damaged_indexes.len(),
            "opened repository"
        );
        let domain = Arc::new(DomainKeys::new(&keys.id, Domain::legacy(), 0));
        let clean = index.gc_clean()?;
        Ok(Repository {
            inner: Arc::new(Inner {
                store,
                master,
                options,
                keys,
                index,
                damaged_indexes,
                known_blocklists: Mutex::new(HashSet::new()),
                garbage: crate::gc::GarbageWatch::new(clean),
            }),
            domain,
        })
    }

    /// A handle on the same repository working in dedup domain `domain`.
    pub fn in_domain(&self, domain: &Domain) -> Result<Repository, Error> {
        if *domain == self.domain.domain {
            return Ok(self.clone());
        }
        let number = self.inner.index.domain_number(domain)?;
        Ok(Repository {
            inner: self.inner.clone(),
            domain: Arc::new(DomainKeys::new(&self.inner.keys.id, domain.clone(), number)),
        })
    }

    /// The dedup domain this handle works in.
    pub fn domain(&self) -> &Domain {
        &self.domain.domain
    }

    /// Opens the repository in `store`, first creating it (its `config`, with a new random
    /// id key) if the store is empty. A store holding other objects (except `keys.json`) but
    /// no `config` is refused. Two processes creating the same repository at once is safe:
    /// the first `config` written wins and both use it.
    pub fn open_or_init(
        store: Arc<dyn ObjectStore>,
        master: MasterKey,
        options: RepositoryOptions,
    ) -> Result<Repository, Error> {
        Repository::open_or_init_with_id_key(store, master, options, None)
    }

    /// Like [`open_or_init`](Self::open_or_init), with the id key of a repository this one
    /// mirrors (Tier 1 and Tier 2 share it, so that a block has the same id in both and
    /// manifests and blocklists copy unchanged). A new repository is created with `id_key`;
    /// an existing one whose id key differs is refused with [`Error::IdKeyMismatch`].
    pub fn open_or_init_with_id_key(
        store: Arc<dyn ObjectStore>,
        master: MasterKey,
        options: RepositoryOptions,
        id_key: Option<[u8; 32]>,
    ) -> Result<Repository, Error> {
        let repo = Repository::init_if_empty(store, master, options, id_key)?;
        if let Some(k) = id_key
            && repo.inner.keys.id != k
        {
            return Err(Error::IdKeyMismatch {
                location: repo.location(),
            });
        }
        Ok(repo)
    }

    /// The secret block and blocklist ids are derived from; see
    /// [`open_or_init_with_id_key`](Self::open_or_init_with_id_key). Keep it in memory.
    pub fn id_key(&self) -> [u8; 32] {
        self.inner.keys.id
    }

    fn init_if_empty(
        store: Arc<dyn ObjectStore>,
        master: MasterKey,
        options: RepositoryOptions,
        id_key: Option<[u8; 32]>,
    ) -> Result<Repository, Error> {
        options.validate()?;
        let mut created = false;
        if !store.exists(CONFIG_KEY)? {
            let foreign = store.list("")?.into_iter().any(|k| k != KEY_ENVELOPE_KEY);
            if foreign {
                return Err(Error::NotEmpty {
                    location: store.location(),
                });
            }
            store.put(CONFIG_KEY, &new_config(&master, id_key))?;
            tracing::info!(location = %store.location(), "created repository");
            created = true;
        }
        let repo = Repository::open(store, master, options)?;
        if created {
            // Empty: nothing to collect until something is written.
            repo.record_clean()?;
        }
        Ok(repo)
    }

    pub(crate) fn inner_garbage(&self) -> &crate::gc::GarbageWatch {
        &self.inner.garbage
    }

    pub(crate) fn index(&self) -> &crate::index::BlockIndex {
        &self.inner.index
    }

    pub(crate) fn store(&self) -> &dyn ObjectStore {
        self.inner.store.as_ref()
    }

    pub(crate) fn master(&self) -> &MasterKey {
        &self.inner.master
    }

    pub fn options(&self) -> &RepositoryOptions {
        &self.inner.options
    }

    /// The repository's random id (from `config`).
    pub fn repository_id(&self) -> &str {
        &self.inner.keys.repository_id
    }

    /// Where the repository is (for messages).
    pub fn location(&self) -> String {
        self.inner.store.location()
    }

    /// Records a pack whose index object `key` was just written; with `relocate` its
    /// blocks move there from wherever they were (a rewritten pack).
    pub(crate) fn index_add(
        &self,
        key: &str,
        section: &PackSection,
        relocate: bool,
    ) -> Result<(), Error> {
        self.inner.index.add_sections(
            key,
            std::slice::from_ref(section),
            relocate,
            redb::Durability::Immediate,
        )
    }

    pub(crate) fn index_remove_pack(&self, id: &PackId) -> Result<(), Error> {
        self.inner.index.remove_pack(id)
    }

    /// The keys of the index objects naming a pack, as the block index recorded them.
    pub(crate) fn pack_index_keys(&self, id: &PackId) -> Result<Vec<String>, Error> {
        self.inner.index.pack_index_keys(id)
    }

    /// The dedup domain of a pack, if the block index holds it.
    pub(crate) fn pack_domain(&self, id: &PackId) -> Result<Option<Domain>, Error> {
        self.inner.index.pack_domain(id)
    }

    pub(crate) fn forget_blocklists(&self, ids: impl Iterator<Item = BlocklistId>) {
        let mut known = self.known_blocklists();
        for id in ids {
            known.remove(&id);
        }
    }

    /// Where a block of this handle's domain is stored.
    pub(crate) fn locate(&self, id: &BlockId) -> Result<Option<index::Located>, Error> {
        Ok(self
            .inner
            .index
            .locate_many(self.domain.number, std::slice::from_ref(id))?
            .pop()
            .flatten())
    }

    fn not_found(&self, id: &BlockId) -> Error {
        Error::BlockNotFound {
            block: *id,
            damaged_indexes: self
                .inner
                .damaged_indexes
                .iter()
                .map(|(k, _)| k.clone())
                .collect(),
        }
    }

    /// Where a block is stored, or [`Error::BlockNotFound`] naming the index objects that
    /// could not be read (the block may have been listed in one of them).
    fn locate_stored(&self, id: &BlockId) -> Result<index::Located, Error> {
        self.locate(id)?.ok_or_else(|| self.not_found(id))
    }

    /// Index objects that could not be read when the repository was opened, with the
    /// reason; their blocks count as missing.
    pub fn damaged_indexes(&self) -> &[(String, String)] {
        &self.inner.damaged_indexes
    }

    /// The id of a block: keyed BLAKE3 of its plaintext under the block key of this
    /// handle's domain.
    pub fn block_id(&self, plaintext: &[u8]) -> BlockId {
        BlockId::from_hash(blake3::keyed_hash(&self.domain.block, plaintext).as_bytes())
    }

    /// Whether the block is stored in this handle's domain (listed by a readable index
    /// object, or written by a finished pack of this handle).
    pub fn has_block(&self, id: &BlockId) -> Result<bool, Error> {
        Ok(self.has_blocks(std::slice::from_ref(id))?[0])
    }

    /// [`has_block`](Self::has_block) of many blocks at once.
    pub fn has_blocks(&self, ids: &[BlockId]) -> Result<Vec<bool>, Error> {
        self.inner.index.contains_many(self.domain.number, ids)
    }

    /// How many distinct blocks are stored, in every domain.
    pub fn block_count(&self) -> Result<u64, Error> {
        self.inner.index.len()
    }

    /// A writer that adds blocks in new packs.
    pub fn pack_writer(&self) -> PackWriter {
        PackWriter::new(self.clone())
    }

    /// Reads one block with one ranged read of its pack, and checks it: authentication,
    /// length and keyed hash. Errors name the block and the pack.
    pub fn read_block(&self, id: &BlockId) -> Result<Vec<u8>, Error> {
        let located = self.locate_stored(id)?;
        let key = pack_key(&located.pack.id);
        let frame = match self.store().get_range(
            &key,
            u64::from(located.loc.offset),
            located.loc.len as usize,
        ) {
            Ok(frame) => frame,
            Err(Error::ObjectNotFound { .. }) => {
                return Err(Error::PackMissing {
                    block: *id,
                    pack: key,
                });
            }
            Err(Error::ShortObject { size, .. }) => {
                return Err(Error::BlockCorrupt {
                    block: *id,
                    pack: key,
                    reason: format!("the pack is truncated to {size} bytes"),
                });
            }
            Err(e) => return Err(e),
        };
        let mut reader = FrameReader::new(self, &located.pack);
        match reader.block(&frame, id, &located.loc) {
            Ok(block) => Ok(block.to_vec()),
            Err(reason) => Err(Error::BlockCorrupt {
                block: *id,
                pack: key,
                reason,
            }),
        }
    }

    /// The key of block ids (keyed BLAKE3) of this handle's domain, handed to authenticated
    /// backup clients of the domain so they can name blocks and ask which are missing
    /// without sending them.
    pub fn block_id_key(&self) -> [u8; 32] {
        self.domain.block
    }

    /// Reads many blocks, authenticated but still compressed as stored, one payload per id in
    /// the order of `ids`, for an answer that must stay within `budget` bytes: a block named
    /// several times (a file's repeated pages) is read and decrypted once, and the request is
    /// refused ([`Error::ReadTooLarge`]) before anything is read when the answer would exceed
    /// the budget. With `shared_frames`, the answer carries each frame once; without, it
    /// carries each block on its own (a frame's stored size, or the block's plaintext if
    /// larger, per id named).
    pub fn read_block_payloads_within(
        &self,
        ids: &[BlockId],
        budget: u64,
        shared_frames: bool,
    ) -> Result<Vec<BlockPayload>, Error> {
        let mut distinct: Vec<BlockId> = Vec::new();
        let mut slot_of: std::collections::HashMap<BlockId, usize> =
            std::collections::HashMap::with_capacity(ids.len());
        let slots: Vec<usize> = ids
            .iter()
            .map(|id| {
                *slot_of.entry(*id).or_insert_with(|| {
                    distinct.push(*id);
                    distinct.len() - 1
                })
            })
            .collect();
        let located = self
            .inner
            .index
            .locate_many(self.domain.number, &distinct)?;
        let mut bytes = 0u64;
        let mut frames: HashSet<(PackId, u32)> = HashSet::new();
        for &s in &slots {
            let Some(l) = &located[s] else {
                return Err(self.not_found(&distinct[s]));
            };
            let cost = if !shared_frames {
                l.loc.len.max(l.loc.plain_len)
            } else if frames.insert((l.pack.id, l.loc.offset)) {
                l.loc.len
            } else {
                0
            };
            bytes = bytes.saturating_add(u64::from(cost));
        }
        if bytes > budget {
            return Err(Error::ReadTooLarge { bytes, budget });
        }
        let payloads = self.read_block_payloads(&distinct)?;
        Ok(slots.into_iter().map(|s| payloads[s].clone()).collect())
    }

    /// Reads, decrypts and authenticates the stored payloads (still compressed) of the blocks
    /// `ids`. Blocks of the same pack are read with as few ranged reads as possible (runs
    /// closer than 256 KiB are read together); the blocks of one frame share its payload,
    /// decrypted once. The caller decompresses each payload and checks the block in it
    /// against its id (a restore client does so with [`block_id_key`]).
    ///
    /// [`block_id_key`]: Self::block_id_key
    pub fn read_block_payloads(&self, ids: &[BlockId]) -> Result<Vec<BlockPayload>, Error> {
        const MAX_GAP: u64 = 256 << 10;
        let mut located = Vec::with_capacity(ids.len());
        for (id, l) in ids
            .iter()
            .zip(self.inner.index.locate_many(self.domain.number, ids)?)
        {
            located.push(l.ok_or_else(|| self.not_found(id))?);
        }
        let mut order: Vec<usize> = (0..ids.len()).collect();
        // Grouped by pack (a prefix of its random id is enough to group), then by offset.
        order.sort_unstable_by_key(|&i| {
            let id = &located[i].pack.id.0;
            (
                u64::from_be_bytes([id[0], id[1], id[2], id[3], id[4], id[5], id[6], id[7]]),
                located[i].loc.offset,
            )
        });
        let mut out: Vec<Option<BlockPayload>> = (0..ids.len()).map(|_| None).collect();
        let mut i = 0;
        while i < order.len() {
            let first = &located[order[i]];
            let start = u64::from(first.loc.offset);
            let mut end = start + u64::from(first.loc.len);
            let mut j = i + 1;
            while j < order.len() {
                let l = &located[order[j]];
                let off = u64::from(l.loc.offset);
                if l.pack.id != first.pack.id || off > end + MAX_GAP {
                    break;
                }
                end = end.max(off + u64::from(l.loc.len));
                j += 1;
            }
            let key = pack_key(&first.pack.id);
            let span = match self.store().get_range(&key, start, (end - start) as usize) {
                Ok(span) => span,
                Err(Error::ObjectNotFound { .. }) => {
                    return Err(Error::PackMissing {
                        block: ids[order[i]],
                        pack: key,
                    });
                }
                Err(Error::ShortObject { size, .. }) => {
                    return Err(Error::BlockCorrupt {
                        block: ids[order[i]],
                        pack: key,
                        reason: format!("the pack is truncated to {size} bytes"),
                    });
                }
                Err(e) => return Err(e),
            };
            let cipher = pack_cipher(self.master(), &first.pack);
            let mut last: Option<((u32, u32), bool, bytes::Bytes, u32)> = None;
            for &k in &order[i..j] {
                let l = &located[k];
                let from = (u64::from(l.loc.offset) - start) as usize;
                let frame = &span[from..from + l.loc.len as usize];
                let corrupt = |reason| Error::BlockCorrupt {
                    block: ids[k],
                    pack: key.clone(),
                    reason,
                };
                let (compressed, payload, frame_len) = match &last {
                    Some((f, c, p, n)) if *f == l.loc.frame() => {
                        check_inside(*n, &l.loc).map_err(corrupt)?;
                        (*c, p.clone(), *n)
                    }
                    _ => {
                        let (c, p, n) =
                            open_block_payload(&cipher, frame, &l.loc).map_err(corrupt)?;
                        let p = bytes::Bytes::from(p);
                        last = Some((l.loc.frame(), c, p.clone(), n));
                        (c, p, n)
                    }
                };
                out[k] = Some(BlockPayload {
                    id: ids[k],
                    plain_len: l.loc.plain_len,
                    compressed,
                    payload,
                    inner: l.loc.inner,
                    frame_len,
                    frame: (first.pack.id, l.loc.offset),
                });
            }
            i = j;
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn blocklist_id(&self, plaintext: &[u8]) -> BlocklistId {
        BlocklistId(*blake3::keyed_hash(&self.domain.blocklist, plaintext).as_bytes())
    }

    fn known_blocklists(&self) -> std::sync::MutexGuard<'_, HashSet<BlocklistId>> {
        self.inner
            .known_blocklists
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a list of block ids (content addressed: an identical list is stored once) and
    /// returns its id. Every block must already be stored in this handle's domain.
    pub fn put_blocklist(&self, ids: &[BlockId]) -> Result<BlocklistId, Error> {
        if ids.len() > MAX_BLOCKLIST_LEN {
            return Err(Error::BlocklistTooLong {
                len: ids.len(),
                max: MAX_BLOCKLIST_LEN,
            });
        }
        let stored = self.has_blocks(ids)?;
        if let Some((missing, _)) = ids.iter().zip(&stored).find(|(_, s)| !**s) {
            return Err(Error::UnstoredBlock { block: *missing });
        }
        let plaintext = blocklist::encode(ids);
        let id = self.blocklist_id(&plaintext);
        if self.known_blocklists().contains(&id) {
            return Ok(id);
        }
        // A create-only write keeps an existing blocklist (the same list): one request, where
        // checking first would cost two for every new list.
        self.before_write()?;
        // Not compressed: a blocklist is random ids, which zstd only spends time on.
        let sealed = seal_object(
            self.master(),
            ObjectKind::Blob,
            &blocklist_name(&id),
            &plaintext,
            None,
        );
        self.store().put(&blocklist_key(&id), &sealed)?;
        self.known_blocklists().insert(id);
        Ok(id)
    }

    /// Reads a blocklist of this handle's domain, checking its authentication and that its
    /// content matches its id under the domain's key (a blocklist of another domain is
    /// refused as not matching).
    pub fn get_blocklist(&self, id: &BlocklistId) -> Result<Vec<BlockId>, Error> {
        let key = blocklist_key(id);
        let sealed = self
            .store()
            .get(&key)?
            .ok_or(Error::BlocklistNotFound(*id))?;
        let (_, plaintext) = open_object(self.master(), &blocklist_name(id), &sealed)
            .map_err(|e| sealed_error(&key, e))?;
        if self.blocklist_id(&plaintext) != *id {
            return Err(Error::corrupt(key, "its content does not match its id"));
        }
        let ids = blocklist::decode(&plaintext, &key)?;
        self.known_blocklists().insert(*id);
        Ok(ids)
    }

    fn blocklist_exists(&self, id: &BlocklistId) -> Result<bool, Error> {
        if self.known_blocklists().contains(id) {
            return Ok(true);
        }
        let exists = self.store().exists(&blocklist_key(id))?;
        if exists {
            self.known_blocklists().insert(*id);
        }
        Ok(exists)
    }

    /// Stores a backup's manifest: the last object of a backup, after all it refers to.
    /// Refused if the manifest is invalid, is of another domain than this handle's, refers
    /// to a block or blocklist that is not stored in it, or if a backup with the same id
    /// exists.
    pub fn put_manifest(&self, manifest: &Manifest) -> Result<(), Error> {
        manifest.validate()?;
        if manifest.domain != self.domain.domain {
            return Err(Error::InvalidManifest {
                cluster: manifest.cluster.clone(),
                backup_id: manifest.backup_id.to_string(),
                reason: format!(
                    "it is of dedup domain \"{}\", the repository handle of \"{}\"",
                    manifest.domain, self.domain.domain
                ),
            });
        }
        let mut blocklists = HashSet::new();
        let mut wholes = Vec::new();
        for f in &manifest.files {
            match &f.kind {
                crate::FileKind::Whole { block } => wholes.push(*block),
                crate::FileKind::Listed { blocks, .. } => wholes.extend(blocks.iter()),
                crate::FileKind::Blocks { blocklists: b, .. } => blocklists.extend(b.iter()),
                _ => {}
            }
        }
        for chunk in wholes.chunks(65_536) {
            let stored = self.has_blocks(chunk)?;
            if let Some((block, _)) = chunk.iter().zip(&stored).find(|(_, s)| !**s) {
                return Err(Error::UnstoredBlock { block: *block });
            }
        }
        for id in blocklists {
            if !self.blocklist_exists(id)? {
                return Err(Error::BlocklistNotFound(*id));
            }
        }
        let cluster = &manifest.cluster;
        let key = manifest_key(cluster, &manifest.backup_id);
        if self.store().exists(&key)? {
            return Err(Error::BackupExists {
                cluster: cluster.clone(),
                backup_id: manifest.backup_id.clone(),
            });
        }
        self.before_write()?;
        let sealed = seal_object(
            self.master(),
            ObjectKind::Blob,
            &manifest_name(cluster, &manifest.backup_id),
            &manifest.encode()?,
            self.options().compression_level,
        );
        self.store().put(&key, &sealed)
    }

    /// Reads and validates a backup's manifest.
    pub fn get_manifest(&self, cluster: &str, backup_id: &BackupId) -> Result<Manifest, Error> {
        validate_cluster_name(cluster)?;
        let key = manifest_key(cluster, backup_id);
        let sealed = self
            .store()
            .get(&key)?
            .ok_or_else(|| Error::BackupNotFound {
                cluster: cluster.to_string(),
                backup_id: backup_id.clone(),
            })?;
        let (_, plaintext) =
            open_object(self.master(), &manifest_name(cluster, backup_id), &sealed)
                .map_err(|e| sealed_error(&key, e))?;
        let manifest = Manifest::decode(&plaintext, &key)?;
        if manifest.cluster != cluster || manifest.backup_id != *backup_id {
            return Err(Error::corrupt(
                key,
                format!(
                    "it describes backup \"{}\" of cluster \"{}\"",
                    manifest.backup_id, manifest.cluster
                ),
            ));
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// The backups of a cluster, oldest first.
    pub fn list_manifests(&self, cluster: &str) -> Result<Vec<BackupId>, Error> {
        validate_cluster_name(cluster)?;
        let prefix = format!("manifests/{cluster}/");
        let mut ids: Vec<BackupId> = self
            .store()
            .list(&prefix)?
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter_map(|rest| BackupId::new(rest).ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The clusters that have at least one backup.
    pub fn list_clusters(&self) -> Result<Vec<String>, Error> {
        let mut clusters: Vec<String> = self
            .store()
            .list("manifests/")?
            .iter()
            .filter_map(|k| k.strip_prefix("manifests/")?.split_once('/'))
            .map(|(cluster, _)| cluster.to_string())
            .filter(|c| validate_cluster_name(c).is_ok())
            .collect();
        clusters.sort();
        clusters.dedup();
        Ok(clusters)
    }
}

fn new_config(master: &MasterKey, id_key: Option<[u8; 32]>) -> Vec<u8> {
    let repository_id = hex::encode(klio_crypto::random_bytes::<16>());
    let secrets = Secrets {
        id_key: hex::encode(id_key.unwrap_or_else(klio_crypto::random_bytes::<32>)),
    };
    let secrets_json = serde_json::to_vec(&secrets).expect("secrets serialize");
    let sealed = seal_object(
        master,
        ObjectKind::Blob,
        &format!("config/{repository_id}"),
        &secrets_json,
        None,
    );
    let config = ConfigFile {
        format: CONFIG_FORMAT.to_string(),
        repository_id,
        key_id: master.key_id(),
        secrets: hex::encode(sealed),
    };
    let mut out = serde_json::to_vec_pretty(&config).expect("config serializes");
    out.push(b'\n');
    out
}

fn read_config(store: &dyn ObjectStore, master: &MasterKey, raw: &[u8]) -> Result<Keys, Error> {
    let config: ConfigFile = serde_json::from_slice(raw)
        .map_err(|e| Error::corrupt(CONFIG_KEY, format!("invalid JSON: {e}")))?;
    if config.format != CONFIG_FORMAT {
        return Err(Error::corrupt(
            CONFIG_KEY,
            format!(
                "unsupported repository format \"{}\" (this version reads \"{CONFIG_FORMAT}\")",
                config.format
            ),
        ));
    }
    let given = master.key_id();
    if config.key_id != given {
        return Err(Error::WrongKey {
            location: store.location(),
            repository_key_id: config.key_id,
            given_key_id: given,
        });
    }
    let sealed = hex::decode(&config.secrets)
        .map_err(|_| Error::corrupt(CONFIG_KEY, "secrets are not hex"))?;
    let (_, plaintext) = open_object(master, &format!("config/{}", config.repository_id), &sealed)
        .map_err(|e| sealed_error(CONFIG_KEY, e))?;
    let secrets: Secrets = serde_json::from_slice(&plaintext)
        .map_err(|e| Error::corrupt(CONFIG_KEY, format!("invalid secrets: {e}")))?;
    let id_key: [u8; 32] = hex::decode(&secrets.id_key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| Error::corrupt(CONFIG_KEY, "the id key is not 32 hex bytes"))?;
    Ok(Keys {
        repository_id: config.repository_id,
        id: id_key,
    })
}
