//! The manifest of one backup: its files and the backup engine's opaque metadata.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::{BackupId, BlockId, BlocklistId, Domain, Error, MAX_BLOCK_SIZE, validate_cluster_name};

pub(crate) const FORMAT: &str = "klio-manifest/1";
/// The most blocks a [`FileKind::Listed`] file has.
pub const MAX_LISTED_BLOCKS: usize = 1024;

/// One backup of one cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub cluster: String,
    pub backup_id: BackupId,
    /// Owned by the backup engine (start and stop LSN, timeline, labels...); stored as is.
    pub metadata: serde_json::Value,
    /// The dedup domain of every block and blocklist the manifest names.
    pub domain: Domain,
    pub files: Vec<FileEntry>,
}

/// One file, directory or symbolic link of the backed-up data directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the data directory, `/`-separated.
    pub path: String,
    /// Length in bytes (0 for directories and symbolic links).
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    #[serde(flatten)]
    pub kind: FileKind,
}

/// How a file's content is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FileKind {
    /// Cut into `block_size` blocks (the last one shorter), listed in order by the blocklists.
    Blocks {
        block_size: u32,
        blocklists: Vec<BlocklistId>,
    },
    /// Cut into `block_size` blocks (the last one shorter), listed in order here: a small
    /// file (at most [`MAX_LISTED_BLOCKS`]), which a blocklist object would cost more to
    /// store, copy to Tier 2 and read than its ids in the manifest.
    Listed {
        block_size: u32,
        blocks: Vec<BlockId>,
    },
    /// Stored whole as one block.
    Whole {
        block: BlockId,
    },
    Symlink {
        target: String,
    },
    Directory,
}

/// The manifest as stored: the same fields plus the format tag.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestDoc {
    format: String,
    cluster: String,
    backup_id: BackupId,
    metadata: serde_json::Value,
    /// Absent in manifests written before dedup domains: the legacy domain.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    domain: String,
    files: Vec<FileEntry>,
}

impl Manifest {
    /// Checks what can be checked without the repository: cluster name, paths (relative,
    /// no `.`/`..` components, unique), block sizes and which fields each kind needs.
    pub fn validate(&self) -> Result<(), Error> {
        validate_cluster_name(&self.cluster)?;
        let bad = |reason: String| Error::InvalidManifest {
            cluster: self.cluster.clone(),
            backup_id: self.backup_id.to_string(),
            reason,
        };
        let mut seen = HashSet::new();
        for f in &self.files {
            validate_path(&f.path).map_err(|r| bad(format!("path \"{}\": {r}", f.path)))?;
            if !seen.insert(f.path.as_str()) {
                return Err(bad(format!("path \"{}\" appears twice", f.path)));
            }
            if let FileKind::Blocks { block_size, .. } | FileKind::Listed { block_size, .. } =
                &f.kind
                && (*block_size == 0 || *block_size as usize > MAX_BLOCK_SIZE)
            {
                return Err(bad(format!(
                    "file \"{}\" has block size {block_size}, not 1 to {MAX_BLOCK_SIZE}",
                    f.path
                )));
            }
            match &f.kind {
                FileKind::Blocks { blocklists, .. } => {
                    if f.size > 0 && blocklists.is_empty() {
                        return Err(bad(format!(
                            "file \"{}\" has {} bytes but no blocklists",
                            f.path, f.size
                        )));
                    }
                }
                FileKind::Listed { block_size, blocks } => {
                    let want = f.size.div_ceil(u64::from(*block_size));
                    if blocks.len() as u64 != want || blocks.len() > MAX_LISTED_BLOCKS {
                        return Err(bad(format!(
                            "file \"{}\" of {} bytes lists {} blocks of {block_size} bytes, not {want} (at most {MAX_LISTED_BLOCKS})",
                            f.path,
                            f.size,
                            blocks.len()
                        )));
                    }
                }
                FileKind::Whole { .. } => {
                    if f.size > MAX_BLOCK_SIZE as u64 {
                        return Err(bad(format!(
                            "file \"{}\" of {} bytes is too large to be stored whole",
                            f.path, f.size
                        )));
                    }
                }
                FileKind::Symlink { target } => {
                    if target.is_empty() || target.contains('\0') {
                        return Err(bad(format!(
                            "symbolic link \"{}\" has an empty or invalid target",
                            f.path
                        )));
                    }
                }
                FileKind::Directory => {}
            }
        }
        Ok(())
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, Error> {
        let doc = ManifestDoc {
            format: FORMAT.to_string(),
            cluster: self.cluster.clone(),
            backup_id: self.backup_id.clone(),
            metadata: self.metadata.clone(),
            domain: self.domain.as_str().to_string(),
            files: self.files.clone(),
        };
        serde_json::to_vec(&doc).map_err(|e| Error::InvalidManifest {
            cluster: self.cluster.clone(),
            backup_id: self.backup_id.to_string(),
            reason: format!("it cannot be encoded: {e}"),
        })
    }

    pub(crate) fn decode(buf: &[u8], object: &str) -> Result<Manifest, Error> {
        let doc: ManifestDoc = serde_json::from_slice(buf)
            .map_err(|e| Error::corrupt(object, format!("manifest is not valid: {e}")))?;
        if doc.format != FORMAT {
            return Err(Error::corrupt(
                object,
                format!("unsupported manifest format \"{}\"", doc.format),
            ));
        }
        let domain = Domain::parse(&doc.domain).map_err(|_| {
            Error::corrupt(object, format!("invalid dedup domain \"{}\"", doc.domain))
        })?;
        Ok(Manifest {
            cluster: doc.cluster,
            backup_id: doc.backup_id,
            metadata: doc.metadata,
            domain,
            files: doc.files,
        })
    }
}

/// Checks a path relative to the data directory: not empty, not absolute, no empty, `.` or
/// `..` components, no NUL byte.
pub(crate) fn validate_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("it is empty");
    }
    if path.len() > 4096 {
        return Err("it is too long");
    }
    if path.starts_with('/') {
        return Err("it is absolute");
    }
    if path.contains('\0') {
        return Err("it contains a NUL byte");
    }
    for c in path.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err("it has an empty, \".\" or \"..\" component");
        }
    }
    Ok(())
}
