//! The backup repository: deduplicated, compressed, encrypted storage for base backups.
//!
//! Principal types:
//! - [`ObjectStore`]: whole-object storage by `/`-separated key, with [`LocalStore`] (a
//!   directory, durable create-only writes) and [`MemStore`] (memory, for tests); S3 comes
//!   later behind the same trait;
//! - [`Repository`]: opens a store with the [`MasterKey`](klio_crypto::MasterKey), loads the
//!   block index, reads blocks, blocklists and manifests, and [verifies](Repository::verify)
//!   backups;
//! - [`PackWriter`]: adds blocks, deduplicated against the repository, into packs of tens of
//!   MiB, each followed by its index object;
//! - [`BlockId`], [`BlocklistId`], [`BackupId`]: the names of what is stored;
//! - [`Manifest`]: one backup's file list, written last.
//!
//! The format is specified in `docs/formats/repository.md`. Everything here is synchronous;
//! async callers run it on blocking threads.

mod blocklist;
mod gc;
mod ids;
mod index;
mod manifest;
mod pack;
mod repository;
mod store;
mod verify;

#[cfg(test)]
mod properties;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

/// Entry points for the fuzz targets of `fuzz/` (built only by `cargo fuzz`, which sets
/// `--cfg fuzzing`): the decoders of object plaintexts; `true` when the input is accepted.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    pub fn index(bytes: &[u8]) -> bool {
        crate::index::decode(bytes, "fuzz").is_ok()
    }

    pub fn blocklist(bytes: &[u8]) -> bool {
        crate::blocklist::decode(bytes, "fuzz").is_ok()
    }

    /// Decodes, then validates what decoded.
    pub fn manifest(bytes: &[u8]) -> bool {
        crate::Manifest::decode(bytes, "fuzz").is_ok_and(|m| m.validate().is_ok())
    }
}

pub use gc::{DeadPack, GcPlan, GcReport, REPACK_DEAD_SHARE, Repack};
pub use ids::{BackupId, BlockId, BlocklistId, Domain, PackId, validate_cluster_name};
pub use manifest::{FileEntry, FileKind, MAX_LISTED_BLOCKS, Manifest};
pub use pack::{BlockPayload, FramedBlock, PackStats, PackWriter};
pub use repository::{
    DEFAULT_COMPRESSION_LEVEL, DEFAULT_PACK_TARGET_SIZE, MAX_BLOCK_SIZE, MAX_BLOCKLIST_LEN,
    Repository, RepositoryOptions,
};
pub use store::{LocalStore, MemStore, ObjectStore, validate_key};
pub use verify::{ProblemKind, VerifyProblem, VerifyReport};

/// Errors of the repository and its object stores.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid object key \"{key}\": {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("could not {action} \"{key}\" in repository \"{location}\": {source}")]
    Io {
        action: &'static str,
        location: String,
        key: String,
        source: std::io::Error,
    },
    #[error("could not create repository directory \"{location}\": {source}")]
    CreateDirectory {
        location: String,
        source: std::io::Error,
    },
    #[error("object \"{key}\" does not exist in repository \"{location}\"")]
    ObjectNotFound { location: String, key: String },
    #[error(
        "object \"{key}\" is too short: {len} bytes were wanted at offset {offset}, but it has {size} bytes"
    )]
    ShortObject {
        key: String,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error(
        "there is no Klio repository in \"{location}\"\nHINT: check the repository location; a new repository is created by the server"
    )]
    NotARepository { location: String },
    #[error(
        "the encryption key does not open repository \"{location}\": it was created with key {repository_key_id}, the key given is {given_key_id}\nHINT: use the key file and encryption key the repository was created with"
    )]
    WrongKey {
        location: String,
        repository_key_id: String,
        given_key_id: String,
    },
    #[error("object \"{object}\" is corrupt: {reason}")]
    Corrupt { object: String, reason: String },
    #[error("block {block} in pack \"{pack}\" is corrupt: {reason}")]
    BlockCorrupt {
        block: BlockId,
        pack: String,
        reason: String,
    },
    #[error("block {block} is not in the repository{}", damaged_hint(.damaged_indexes))]
    BlockNotFound {
        block: BlockId,
        damaged_indexes: Vec<String>,
    },
    #[error(
        "block {claimed} does not match its content, whose id is {actual}\nHINT: the block id must be computed with Repository::block_id of this repository"
    )]
    BlockIdMismatch { claimed: BlockId, actual: BlockId },
    #[error(
        "the blocks asked for hold {bytes} bytes, more than the {budget} bytes one answer may carry\nHINT: ask for fewer blocks per call"
    )]
    ReadTooLarge { bytes: u64, budget: u64 },
    #[error("invalid run of blocks: {0}")]
    InvalidRun(String),
    #[error("block {block} has {size} bytes, more than the largest block size of {max} bytes")]
    BlockTooLarge {
        block: BlockId,
        size: usize,
        max: usize,
    },
    #[error(
        "block {block} is referred to but not in the repository\nHINT: finish the pack writer that holds the block before writing blocklists or manifests that refer to it"
    )]
    UnstoredBlock { block: BlockId },
    #[error(
        "block {block} is in pack \"{pack}\", which does not exist\nHINT: verify the repository's backups to see which ones are affected"
    )]
    PackMissing { block: BlockId, pack: String },
    #[error("blocklist of {len} blocks is longer than the limit of {max} blocks")]
    BlocklistTooLong { len: usize, max: usize },
    #[error("blocklist {0} does not exist")]
    BlocklistNotFound(BlocklistId),
    #[error(
        "invalid cluster name \"{0}\"\nHINT: cluster names use lowercase letters, digits, '-' and '.', at most 63 characters"
    )]
    InvalidClusterName(String),
    #[error(
        "invalid backup id \"{0}\"\nHINT: backup ids look like \"backup-YYYYMMDDhhmmss\", for example \"backup-20250314093000\""
    )]
    InvalidBackupId(String),
    #[error("invalid manifest for backup \"{backup_id}\" of cluster \"{cluster}\": {reason}")]
    InvalidManifest {
        cluster: String,
        backup_id: String,
        reason: String,
    },
    #[error(
        "backup \"{backup_id}\" of cluster \"{cluster}\" already exists\nHINT: backup ids are the start time to the second; start the backup again"
    )]
    BackupExists {
        cluster: String,
        backup_id: BackupId,
    },
    #[error(
        "backup \"{backup_id}\" of cluster \"{cluster}\" does not exist\nHINT: list the cluster's backups to see which exist"
    )]
    BackupNotFound {
        cluster: String,
        backup_id: BackupId,
    },
    #[error(
        "cannot create a repository in \"{location}\": it is not empty and holds no repository \"config\"\nHINT: choose an empty directory or bucket prefix for a new repository"
    )]
    NotEmpty { location: String },
    #[error(
        "the repository in \"{location}\" was not created for this server's repository: their block id keys differ\nHINT: point Tier 2 at an empty bucket prefix, or at the prefix this server's repository was copied to"
    )]
    IdKeyMismatch { location: String },
    #[error(
        "invalid dedup domain \"{0}\"\nHINT: a domain is \"cluster/<cluster name>\" or \"shared/<name>\" with a name like a cluster name"
    )]
    InvalidDomain(String),
    #[error(
        "block {block} is not in dedup domain \"{domain}\"\nHINT: blocks are only shared inside one domain; upload the block in this backup"
    )]
    ForeignBlock { block: BlockId, domain: Domain },
    #[error(
        "the block index cache \"{path}\" failed: {reason}\nHINT: the cache is rebuilt from the repository's index objects; remove the file if it is damaged and restart"
    )]
    IndexCache {
        path: String,
        reason: String,
        /// The file system is full (or over quota).
        disk_full: bool,
    },
    #[error("invalid repository option {option}: {reason}")]
    InvalidOption {
        option: &'static str,
        reason: String,
    },
}

fn damaged_hint(damaged: &[String]) -> String {
    if damaged.is_empty() {
        return String::new();
    }
    let names: Vec<String> = damaged.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        "\nHINT: index object(s) {} could not be read; the block may be listed there",
        names.join(", ")
    )
}

impl Error {
    pub(crate) fn corrupt(object: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            object: object.into(),
            reason: reason.into(),
        }
    }

    /// Whether the error is a full file system (or quota): the caller can say so, and
    /// retrying once space is freed succeeds.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Io { source, .. } | Error::CreateDirectory { source, .. } => {
                is_disk_full(source)
            }
            Error::IndexCache { disk_full, .. } => *disk_full,
            _ => false,
        }
    }

    /// Whether retrying the same operation later could succeed (I/O trouble, as opposed to
    /// missing or corrupt data and invalid input).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Io { .. } | Error::CreateDirectory { .. } | Error::IndexCache { .. }
        )
    }
}

/// Whether an I/O error is a full file system or an exceeded quota.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(ENOSPC) | Some(EDQUOT))
}

/// Converts a sealed-object error into a repository error naming the object by its key.
pub(crate) fn sealed_error(key: &str, e: klio_crypto::Error) -> Error {
    match e {
        klio_crypto::Error::Corrupt { reason, .. } => Error::corrupt(key, reason),
        other => Error::corrupt(key, other.to_string()),
    }
}
