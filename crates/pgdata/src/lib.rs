//! The read side of a physical base backup of a PostgreSQL 15 data directory.
//!
//! Principal items:
//! - [`scan`]: walks `PGDATA` and every tablespace and returns a [`Scan`]: the [`Entry`]s to
//!   copy (directories, files and symbolic links, in path order, with the same exclusions as
//!   `pg_basebackup`) and the [`Tablespace`]s found in `pg_tblspc`;
//! - [`RelationFile`] and [`Fork`]: what a relation data file's name says (relfilenode, fork,
//!   segment number);
//! - [`page_checksum`], [`check_page`] and [`check_relation_chunk`]: PostgreSQL's data page
//!   checksums, to find corrupt pages while copying;
//! - the exclusion rules as constants: [`EXCLUDED_DIR_CONTENTS`], [`EXCLUDED_FILES`],
//!   [`EXCLUDED_FILE_PREFIXES`], [`KLIO_TMP_SUFFIX`], and [`is_temp_relation_name`].
//!
//! Everything here is synchronous and reads only; async callers run it on blocking threads.

mod checksum;
mod exclude;
mod relation;
mod scan;

use std::io;
use std::path::PathBuf;

pub use checksum::{
    PAGE_SIZE, PageCheck, RELSEG_PAGES, check_page, check_relation_chunk, page_checksum,
};
pub use exclude::{
    ARCHIVE_STATUS_DIR, EXCLUDED_DIR_CONTENTS, EXCLUDED_FILE_PREFIXES, EXCLUDED_FILES,
    KLIO_TMP_SUFFIX, WAL_DIR, is_temp_relation_name,
};
pub use relation::{Fork, RelationFile};
pub use scan::{Entry, EntryKind, Scan, Tablespace, scan};

/// Errors of this crate: the data directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory has no `PG_VERSION` file.
    #[error(
        "\"{}\" is not a PostgreSQL data directory (no PG_VERSION)\nhint: give the directory that holds PG_VERSION, global and base",
        .path.display()
    )]
    NotADataDirectory {
        /// The directory given to [`scan`].
        path: PathBuf,
    },
    /// A file system call failed (other than on a file that vanished, which is skipped).
    #[error("could not {action} \"{}\": {source}\nhint: {}", .path.display(), io_hint(.source))]
    Io {
        /// What was being done, as a verb phrase ("read directory", "stat file").
        action: &'static str,
        /// The path the call was made on.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A file name or symbolic link target that is not valid UTF-8 (PostgreSQL never makes
    /// those, so something else put it in the data directory).
    #[error(
        "file name or link target \"{}\" is not valid UTF-8\nhint: rename or remove it; PostgreSQL does not create such names",
        .path.display()
    )]
    NonUtf8Name {
        /// The offending path (for a link target: the link).
        path: PathBuf,
    },
}

impl Error {
    /// Whether scanning again may succeed: I/O errors other than missing permissions may be
    /// caused by concurrent changes to the data directory or by transient conditions.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { source, .. } => source.kind() != io::ErrorKind::PermissionDenied,
            Error::NotADataDirectory { .. } | Error::NonUtf8Name { .. } => false,
        }
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// What a person can do about an I/O error while reading the data directory.
fn io_hint(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::PermissionDenied => {
            "run Klio as the operating system user that owns the data directory (usually \"postgres\"), or as root"
        }
        io::ErrorKind::NotFound => {
            "the data directory or a tablespace location is missing; check that it is mounted"
        }
        _ => "check the file system holding the data directory; the backup can be retried",
    }
}
