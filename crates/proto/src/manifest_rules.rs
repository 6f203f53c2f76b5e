//! The rules every backup manifest obeys, in one place: the server checks them before a
//! manifest enters the catalog (`AddFiles`, `Commit`), and a restore checks them again
//! before it writes a byte, because the manifest it reads comes from a server it does not
//! have to trust (a compromised server, or a backup committed with a stolen certificate).
//!
//! - [`check_path`]: a path is relative to the data directory, `/`-separated, normalized: not
//!   empty, not absolute, no empty, `.` or `..` component, no NUL byte, at most
//!   [`MAX_PATH_LEN`] bytes.
//! - [`check_entry`]: one entry — its path, a known [`Kind`], symbolic links only at
//!   `pg_tblspc/<oid>` (the tablespace links, [`tablespace_link_oid`]), block sizes within
//!   [`limits::MAX_BLOCK_SIZE`](crate::limits::MAX_BLOCK_SIZE), one block for a file stored
//!   whole.
//! - [`check_ancestors`] and [`check_manifest`]: the entries together — no path twice, nothing
//!   under a file, nothing under a symbolic link other than a tablespace link (whose
//!   contents a restore writes into the tablespace's location, never through the link).
//! - [`permission_bits`]: modes are masked to `0o777`, never setuid, setgid or sticky.
//! - [`tablespaces`] and [`check_tablespace_location`]: the `tablespaces` of a backup's
//!   metadata (`oid`, `name`, `location`), whose locations are absolute and normalized (or
//!   `pg_tblspc/<oid>` for an in-place tablespace).
//!
//! Every rule is a pure function of its input: no I/O. A broken rule is a [`Violation`]
//! whose message completes the sentence "the manifest of backup X ...", e.g. `lists
//! "a/passwd" under the symbolic link "a"`.

use std::collections::HashMap;

use crate::backup::v1::{FileEntry, file_entry};
use crate::limits::MAX_BLOCK_SIZE;

/// Longest path a manifest may list, in bytes (PostgreSQL's `MAXPGPATH` is 1024).
pub const MAX_PATH_LEN: usize = 4096;

/// The directory of the tablespace links, in the data directory.
pub const TABLESPACE_LINK_DIR: &str = "pg_tblspc";

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
    Symlink,
}

impl Kind {
    /// The kind of a protobuf entry; `None` for an unknown one.
    pub fn of(entry: &FileEntry) -> Option<Kind> {
        match file_entry::Kind::try_from(entry.kind) {
            Ok(file_entry::Kind::File) => Some(Kind::File),
            Ok(file_entry::Kind::Directory) => Some(Kind::Directory),
            Ok(file_entry::Kind::Symlink) => Some(Kind::Symlink),
            _ => None,
        }
    }
}

/// A broken rule. The message completes "the manifest of backup X ..." and names the entry
/// (paths are shown with control characters escaped).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("lists an entry with an empty path")]
    EmptyPath,
    #[error("lists \"{}...\", a path of {len} bytes (at most {MAX_PATH_LEN})", shown_prefix(.path))]
    PathTooLong { path: String, len: usize },
    #[error("lists \"{}\", an absolute path", shown(.path))]
    AbsolutePath { path: String },
    #[error("lists \"{}\", a path with a NUL byte", shown(.path))]
    NulByte { path: String },
    #[error("lists \"{}\", a path with an empty component", shown(.path))]
    EmptyComponent { path: String },
    #[error("lists \"{}\", a path with a \"{component}\" component", shown(.path))]
    DotComponent {
        path: String,
        component: &'static str,
    },
    #[error("lists \"{}\" of unknown kind {kind}", shown(.path))]
    UnknownKind { path: String, kind: i32 },
    #[error(
        "lists the symbolic link \"{}\": only the tablespace links {TABLESPACE_LINK_DIR}/<oid> may be symbolic links",
        shown(.path)
    )]
    SymlinkOutsideTablespaces { path: String },
    #[error("lists the symbolic link \"{}\" with an empty or invalid target", shown(.path))]
    InvalidLinkTarget { path: String },
    #[error("lists \"{}\" twice", shown(.path))]
    Duplicate { path: String },
    #[error("lists \"{}\" under the symbolic link \"{}\"", shown(.path), shown(.link))]
    UnderSymlink { path: String, link: String },
    #[error("lists \"{}\" under the file \"{}\"", shown(.path), shown(.file))]
    UnderFile { path: String, file: String },
    #[error("lists the file \"{}\" with block ids that are not a list of 32-byte ids", shown(.path))]
    BlockIds { path: String },
    #[error(
        "lists the file \"{}\" with blocks of {block_size} bytes (at most {MAX_BLOCK_SIZE})",
        shown(.path)
    )]
    BlockSizeTooLarge { path: String, block_size: u32 },
    #[error(
        "lists the file \"{}\" of {size} bytes stored whole (at most {MAX_BLOCK_SIZE})",
        shown(.path)
    )]
    WholeFileTooLarge { path: String, size: u64 },
    #[error(
        "lists the file \"{}\" stored whole with {ids} block ids and {blocklists} blocklists, not one block id",
        shown(.path)
    )]
    WholeFileBlocks {
        path: String,
        ids: usize,
        blocklists: usize,
    },
    #[error(
        "lists the file \"{}\" of {size} bytes in blocks of {block_size} bytes with {blocks} blocks, not {expected}",
        shown(.path)
    )]
    BlockCount {
        path: String,
        size: u64,
        block_size: u32,
        blocks: u64,
        expected: u64,
    },
    #[error("has tablespace metadata that is not valid: {reason}")]
    TablespaceMetadata { reason: String },
    #[error("names tablespace {oid} twice in its metadata")]
    TablespaceTwice { oid: u32 },
    #[error(
        "names the location \"{}\" for tablespace {oid}: {reason}",
        shown(.location)
    )]
    TablespaceLocation {
        oid: u32,
        location: String,
        reason: &'static str,
    },
}

/// A path as shown in a message: control characters and quotes escaped.
fn shown(path: &str) -> String {
    path.escape_debug().to_string()
}

/// The start of a path too long to show whole.
fn shown_prefix(path: &str) -> String {
    shown(&path.chars().take(64).collect::<String>())
}

/// Checks a path relative to the data directory: not empty, at most [`MAX_PATH_LEN`]
/// bytes, not absolute, no NUL byte, no empty, `.` or `..` component.
pub fn check_path(path: &str) -> Result<(), Violation> {
    let owned = || path.to_string();
    if path.is_empty() {
        return Err(Violation::EmptyPath);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(Violation::PathTooLong {
            path: owned(),
            len: path.len(),
        });
    }
    if path.starts_with('/') {
        return Err(Violation::AbsolutePath { path: owned() });
    }
    if path.contains('\0') {
        return Err(Violation::NulByte { path: owned() });
    }
    for component in path.split('/') {
        match component {
            "" => return Err(Violation::EmptyComponent { path: owned() }),
            "." => {
                return Err(Violation::DotComponent {
                    path: owned(),
                    component: ".",
                });
            }
            ".." => {
                return Err(Violation::DotComponent {
                    path: owned(),
                    component: "..",
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// The OID of a tablespace link path `pg_tblspc/<oid>` (decimal, as PostgreSQL names the
/// links: digits only, no leading zero, within 32 bits); `None` for every other path.
pub fn tablespace_link_oid(path: &str) -> Option<&str> {
    let oid = path.strip_prefix(TABLESPACE_LINK_DIR)?.strip_prefix('/')?;
    parse_oid(oid).map(|_| oid)
}

/// A decimal OID as PostgreSQL prints it.
fn parse_oid(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.starts_with('0') && s != "0") {
        return None;
    }
    s.parse().ok()
}

/// The permission bits a restore gives an entry: `mode & 0o777`.
///
/// Masked, not refused: the setuid, setgid and sticky bits (and any file-type bits) mean
/// nothing to PostgreSQL, so dropping them loses nothing, while refusing them would fail
/// the backup of a data directory where someone set, say, setgid on a directory. The server
/// stores the masked mode, and a restore masks again whatever it reads.
pub fn permission_bits(mode: u32) -> u32 {
    mode & 0o777
}

/// Blocks a file of `size` bytes has in blocks of `block_size` bytes (0: stored whole, one
/// block).
pub fn expected_blocks(size: u64, block_size: u32) -> u64 {
    if block_size == 0 {
        1
    } else {
        size.div_ceil(u64::from(block_size))
    }
}

/// Checks one entry on its own: its path, its kind, where a symbolic link may be, and the
/// sizes a reader allocates (block size, a file stored whole). Returns its kind.
///
/// A file's block count is not checked here: an `AddFiles` piece holds part of a file's ids
/// and a manifest lists blocklists instead; see [`check_block_count`].
pub fn check_entry(entry: &FileEntry) -> Result<Kind, Violation> {
    check_path(&entry.path)?;
    let path = || entry.path.clone();
    let kind = Kind::of(entry).ok_or_else(|| Violation::UnknownKind {
        path: path(),
        kind: entry.kind,
    })?;
    match kind {
        Kind::Symlink => {
            if tablespace_link_oid(&entry.path).is_none() {
                return Err(Violation::SymlinkOutsideTablespaces { path: path() });
            }
            if entry.target.is_empty() || entry.target.contains('\0') {
                return Err(Violation::InvalidLinkTarget { path: path() });
            }
        }
        Kind::File => {
            if !entry.block_ids.len().is_multiple_of(32) {
                return Err(Violation::BlockIds { path: path() });
            }
            if entry.block_size as usize > MAX_BLOCK_SIZE {
                return Err(Violation::BlockSizeTooLarge {
                    path: path(),
                    block_size: entry.block_size,
                });
            }
            if entry.block_size == 0 {
                if entry.size > MAX_BLOCK_SIZE as u64 {
                    return Err(Violation::WholeFileTooLarge {
                        path: path(),
                        size: entry.size,
                    });
                }
                if entry.block_ids.len() != 32 || !entry.blocklists.is_empty() {
                    return Err(Violation::WholeFileBlocks {
                        path: path(),
                        ids: entry.block_ids.len() / 32,
                        blocklists: entry.blocklists.len(),
                    });
                }
            }
        }
        Kind::Directory => {}
    }
    Ok(kind)
}

/// Checks that a file has as many blocks as its size calls for.
pub fn check_block_count(entry: &FileEntry, blocks: u64) -> Result<(), Violation> {
    let expected = expected_blocks(entry.size, entry.block_size);
    if blocks != expected {
        return Err(Violation::BlockCount {
            path: entry.path.clone(),
            size: entry.size,
            block_size: entry.block_size,
            blocks,
            expected,
        });
    }
    Ok(())
}

/// Checks that `path` (already [`check_path`]ed) lies under no file and no symbolic link
/// other than a tablespace link; `kind_of` tells the kind of the manifest's entry at a path,
/// if it has one. The outermost offending entry is named.
pub fn check_ancestors(
    path: &str,
    kind_of: impl Fn(&str) -> Option<Kind>,
) -> Result<(), Violation> {
    for (i, _) in path.match_indices('/') {
        let ancestor = &path[..i];
        match kind_of(ancestor) {
            Some(Kind::File) => {
                return Err(Violation::UnderFile {
                    path: path.to_string(),
                    file: ancestor.to_string(),
                });
            }
            Some(Kind::Symlink) if tablespace_link_oid(ancestor).is_none() => {
                return Err(Violation::UnderSymlink {
                    path: path.to_string(),
                    link: ancestor.to_string(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks a whole manifest as a restore reads it (one entry per path, files with their
/// blocklists or block ids): every path, then how the entries nest (no path twice, nothing
/// under a file or a symbolic link other than a tablespace link), then each entry on its
/// own ([`check_entry`]); a file listing its block ids must list exactly as many as its
/// size calls for. The first violation found is returned.
pub fn check_manifest<'a>(
    entries: impl IntoIterator<Item = &'a FileEntry>,
) -> Result<(), Violation> {
    let entries: Vec<&FileEntry> = entries.into_iter().collect();
    for e in &entries {
        check_path(&e.path)?;
    }
    let mut kinds: HashMap<&str, Option<Kind>> = HashMap::with_capacity(entries.len());
    for e in &entries {
        if kinds.insert(e.path.as_str(), Kind::of(e)).is_some() {
            return Err(Violation::Duplicate {
                path: e.path.clone(),
            });
        }
    }
    for e in &entries {
        check_ancestors(&e.path, |p| kinds.get(p).copied().flatten())?;
    }
    for e in &entries {
        if check_entry(e)? == Kind::File && e.block_size != 0 && e.blocklists.is_empty() {
            check_block_count(e, (e.block_ids.len() / 32) as u64)?;
        }
    }
    Ok(())
}

/// A tablespace as a backup's metadata names it (`tablespaces`: `oid`, `name`,
/// `location`, as `pg_tablespace` and `pg_tablespace_location` gave them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tablespace {
    pub oid: u32,
    pub name: String,
    /// As recorded: check it with [`check_tablespace_location`] before using it.
    pub location: String,
}

/// Where a tablespace's location says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TablespaceLocation<'a> {
    /// An absolute, normalized directory outside the data directory's `pg_tblspc`.
    Absolute(&'a str),
    /// `pg_tblspc/<oid>`: an in-place tablespace (`allow_in_place_tablespaces`), a directory
    /// of the data directory whose contents the manifest lists like any other.
    InPlace,
}

/// Reads the `tablespaces` of a backup's metadata: absent, or an array of objects with an
/// `oid` (a 32-bit number, each once), a `name` and a `location` (strings). Locations are
/// not checked here.
pub fn tablespaces(metadata: &serde_json::Value) -> Result<Vec<Tablespace>, Violation> {
    let bad = |reason: String| Violation::TablespaceMetadata { reason };
    let list = match metadata.get("tablespaces") {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Array(list)) => list,
        Some(_) => return Err(bad("\"tablespaces\" is not an array".to_string())),
    };
    let mut out: Vec<Tablespace> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let oid = t["oid"]
            .as_u64()
            .and_then(|o| u32::try_from(o).ok())
            .ok_or_else(|| bad(format!("tablespace {i} has no \"oid\" that is an OID")))?;
        let name = t["name"]
            .as_str()
            .ok_or_else(|| bad(format!("tablespace {oid} has no \"name\" string")))?;
        let location = t["location"]
            .as_str()
            .ok_or_else(|| bad(format!("tablespace {oid} has no \"location\" string")))?;
        if out.iter().any(|o| o.oid == oid) {
            return Err(Violation::TablespaceTwice { oid });
        }
        out.push(Tablespace {
            oid,
            name: name.to_string(),
            location: location.to_string(),
        });
    }
    Ok(out)
}

/// Checks the location of tablespace `oid`: an absolute, normalized path (no empty, `.` or
/// `..` component, no trailing `/`, no control character), not the root directory, not inside
/// `pg_tblspc` of some data directory; or exactly `pg_tblspc/<oid>` for an in-place
/// tablespace.
pub fn check_tablespace_location(
    oid: u32,
    location: &str,
) -> Result<TablespaceLocation<'_>, Violation> {
    let bad = |reason: &'static str| Violation::TablespaceLocation {
        oid,
        location: location.to_string(),
        reason,
    };
    if location == format!("{TABLESPACE_LINK_DIR}/{oid}") {
        return Ok(TablespaceLocation::InPlace);
    }
    if location.chars().any(char::is_control) {
        // A line break would add a line to the tablespace_map a restore writes.
        return Err(bad("it contains a control character"));
    }
    if location.len() > MAX_PATH_LEN {
        return Err(bad("it is too long"));
    }
    let Some(rest) = location.strip_prefix('/') else {
        return Err(bad("it is not an absolute path"));
    };
    if rest.is_empty() {
        return Err(bad("it is the root directory"));
    }
    let components: Vec<&str> = rest.split('/').collect();
    if components
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == "..")
    {
        return Err(bad(
            "it is not normalized (an empty, \".\" or \"..\" component, or a trailing \"/\")",
        ));
    }
    if components[..components.len() - 1].contains(&TABLESPACE_LINK_DIR) {
        return Err(bad("it lies inside a pg_tblspc directory"));
    }
    Ok(TablespaceLocation::Absolute(location))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(path: &str, kind: file_entry::Kind) -> FileEntry {
        FileEntry {
            path: path.to_string(),
            kind: kind as i32,
            mode: 0o600,
            ..Default::default()
        }
    }

    fn dir(path: &str) -> FileEntry {
        entry(path, file_entry::Kind::Directory)
    }

    fn link(path: &str, target: &str) -> FileEntry {
        FileEntry {
            target: target.to_string(),
            ..entry(path, file_entry::Kind::Symlink)
        }
    }

    /// A file stored whole (one id) of `size` bytes.
    fn whole(path: &str, size: u64) -> FileEntry {
        FileEntry {
            size,
            block_ids: vec![1u8; 32].into(),
            ..entry(path, file_entry::Kind::File)
        }
    }

    /// A file in blocks of 8 KiB listing `ids` ids.
    fn blocks(path: &str, size: u64, ids: usize) -> FileEntry {
        FileEntry {
            size,
            block_size: 8192,
            block_ids: vec![2u8; 32 * ids].into(),
            ..entry(path, file_entry::Kind::File)
        }
    }

    #[test]
    fn check_path_table_accepts_relative_normalized_paths_only() {
        let good = [
            "PG_VERSION",
            "base/5/16384",
            "pg_tblspc/16390/PG_16_202307071/5/16391",
            "a..b/.hidden/x.",
            "ünïcode",
        ];
        for p in good {
            assert_eq!(check_path(p), Ok(()), "{p}");
        }
        let long = "a/".repeat(MAX_PATH_LEN);
        let bad = [
            ("", "an empty path"),
            ("/etc/passwd", "an absolute path"),
            ("base/../../etc", "a \"..\" component"),
            ("..", "a \"..\" component"),
            ("./base", "a \".\" component"),
            ("base/.", "a \".\" component"),
            ("base//5", "an empty component"),
            ("base/", "an empty component"),
            ("a\0b", "a NUL byte"),
            (long.as_str(), "bytes (at most 4096)"),
        ];
        for (p, why) in bad {
            let msg = check_path(p).expect_err(p).to_string();
            assert!(msg.contains(why), "{p:?}: {msg}");
        }
    }

    #[test]
    fn tablespace_link_oid_accepts_canonical_oids_under_pg_tblspc_only() {
        assert_eq!(tablespace_link_oid("pg_tblspc/16390"), Some("16390"));
        assert_eq!(
            tablespace_link_oid("pg_tblspc/4294967295"),
            Some("4294967295")
        );
        for p in [
            "pg_tblspc",
            "pg_tblspc/",
            "pg_tblspc/4294967296",
            "pg_tblspc/016390",
            "pg_tblspc/16390/PG_16_1",
            "pg_tblspc/ts",
            "pg_tblspc/-1",
            "pg_tblspc/+1",
            "base/pg_tblspc/16390",
            "pg_tblspcx/16390",
        ] {
            assert_eq!(tablespace_link_oid(p), None, "{p}");
        }
    }

    #[test]
    fn check_entry_table_refuses_links_outside_pg_tblspc_and_unbounded_sizes() {
        let good = [
            dir("base"),
            link("pg_tblspc/16390", "/mnt/ts"),
            whole("PG_VERSION", 3),
            whole("empty", 0),
            blocks("base/5/16384", 16384, 2),
            blocks("base/5/big", 1 << 30, 0),
            FileEntry {
                block_ids: Default::default(),
                blocklists: vec![vec![3u8; 32].into()],
                ..blocks("base/5/16385", 8192, 0)
            },
        ];
        for e in &good {
            assert!(check_entry(e).is_ok(), "{e:?}: {:?}", check_entry(e));
        }
        let cases: Vec<(FileEntry, &str)> = vec![
            (
                link("a", "/etc"),
                "lists the symbolic link \"a\": only the tablespace links pg_tblspc/<oid> may be symbolic links",
            ),
            (link("pg_wal", "/wal"), "symbolic link \"pg_wal\""),
            (
                link("pg_tblspc/16390/PG_16_1", "/x"),
                "symbolic link \"pg_tblspc/16390/PG_16_1\"",
            ),
            (link("pg_tblspc/16390", ""), "empty or invalid target"),
            (
                entry("x", file_entry::Kind::Unspecified),
                "lists \"x\" of unknown kind 0",
            ),
            (
                FileEntry {
                    kind: 7,
                    ..dir("y")
                },
                "of unknown kind 7",
            ),
            (whole("../escape", 1), "a \"..\" component"),
            (
                whole("big", 1 << 40),
                "lists the file \"big\" of 1099511627776 bytes stored whole (at most 1048576)",
            ),
            (
                FileEntry {
                    block_ids: vec![1u8; 64].into(),
                    ..whole("two", 1)
                },
                "stored whole with 2 block ids and 0 blocklists, not one block id",
            ),
            (
                FileEntry {
                    block_ids: Default::default(),
                    ..whole("none", 1)
                },
                "stored whole with 0 block ids and 0 blocklists, not one block id",
            ),
            (
                FileEntry {
                    block_size: (1 << 20) + 1,
                    ..blocks("huge", 1, 1)
                },
                "with blocks of 1048577 bytes (at most 1048576)",
            ),
            (
                FileEntry {
                    block_ids: vec![1u8; 33].into(),
                    ..blocks("odd", 1, 1)
                },
                "not a list of 32-byte ids",
            ),
        ];
        for (e, want) in cases {
            let msg = check_entry(&e).expect_err(&e.path).to_string();
            assert!(msg.contains(want), "{:?}: {msg}", e.path);
        }
    }

    #[test]
    fn check_manifest_table_refuses_entries_under_links_or_files_and_duplicates() {
        let ts = [
            dir("pg_tblspc"),
            link("pg_tblspc/16390", "/mnt/ts"),
            dir("pg_tblspc/16390/PG_16_202307071"),
            blocks("pg_tblspc/16390/PG_16_202307071/5/16391", 8192, 1),
            // An in-place tablespace is a directory of the data directory.
            dir("pg_tblspc/16391"),
            whole("pg_tblspc/16391/PG_16_202307071/x", 1),
        ];
        assert_eq!(check_manifest(&ts), Ok(()));
        // Parents need not be listed: a restore creates them as plain directories.
        assert_eq!(check_manifest(&[whole("base/1/1234", 1)]), Ok(()));
        assert_eq!(check_manifest(&[]), Ok(()));

        let cases: Vec<(Vec<FileEntry>, &str)> = vec![
            (
                vec![link("a", "/etc"), whole("a/passwd", 10)],
                "lists \"a/passwd\" under the symbolic link \"a\"",
            ),
            (
                vec![whole("a/b/c", 1), link("a", "/etc")],
                "lists \"a/b/c\" under the symbolic link \"a\"",
            ),
            (
                vec![whole("base", 1), dir("base/1")],
                "lists \"base/1\" under the file \"base\"",
            ),
            (vec![dir("base"), whole("base", 1)], "lists \"base\" twice"),
            (
                vec![link("pg_tblspc/1", "/a"), dir("pg_tblspc/1")],
                "lists \"pg_tblspc/1\" twice",
            ),
            (vec![link("pg_wal", "/wal")], "symbolic link \"pg_wal\""),
            (vec![dir("x"), dir("/x")], "\"/x\", an absolute path"),
            (
                vec![blocks("base/5/1", 8193, 1)],
                "of 8193 bytes in blocks of 8192 bytes with 1 blocks, not 2",
            ),
        ];
        for (entries, want) in cases {
            let msg = check_manifest(&entries).expect_err(want).to_string();
            assert!(msg.contains(want), "want {want:?}, got {msg}");
        }
    }

    #[test]
    fn permission_bits_drop_setuid_setgid_sticky_and_type_bits() {
        assert_eq!(permission_bits(0o6755), 0o755);
        assert_eq!(permission_bits(0o1777), 0o777);
        assert_eq!(permission_bits(0o100600), 0o600);
        assert_eq!(permission_bits(0o700), 0o700);
    }

    #[test]
    fn check_tablespace_location_table() {
        assert_eq!(
            check_tablespace_location(16390, "/mnt/ts1"),
            Ok(TablespaceLocation::Absolute("/mnt/ts1"))
        );
        assert_eq!(
            check_tablespace_location(16390, "pg_tblspc/16390"),
            Ok(TablespaceLocation::InPlace)
        );
        for (loc, why) in [
            ("", "not an absolute path"),
            ("ts1", "not an absolute path"),
            ("pg_tblspc/16391", "not an absolute path"),
            ("/", "the root directory"),
            ("/mnt/../etc", "not normalized"),
            ("/mnt/./ts", "not normalized"),
            ("/mnt//ts", "not normalized"),
            ("/mnt/ts/", "not normalized"),
            ("/mnt/\0", "a control character"),
            ("/mnt/a\n16391 /etc", "a control character"),
            ("/data/pg_tblspc/16390", "inside a pg_tblspc directory"),
        ] {
            let msg = check_tablespace_location(16390, loc)
                .expect_err(loc)
                .to_string();
            assert!(
                msg.contains(why) && msg.contains("tablespace 16390"),
                "{loc:?}: {msg}"
            );
        }
    }

    #[test]
    fn tablespaces_reads_metadata_and_refuses_malformed_lists() {
        let meta = serde_json::json!({"tablespaces": [
            {"oid": 16390, "name": "ts1", "location": "/mnt/ts1"}
        ]});
        assert_eq!(
            tablespaces(&meta).unwrap(),
            vec![Tablespace {
                oid: 16390,
                name: "ts1".into(),
                location: "/mnt/ts1".into()
            }]
        );
        assert_eq!(tablespaces(&serde_json::json!({})).unwrap(), vec![]);
        for (meta, why) in [
            (serde_json::json!({"tablespaces": {}}), "not an array"),
            (
                serde_json::json!({"tablespaces": [{"oid": "16390", "name": "a", "location": "/a"}]}),
                "no \"oid\"",
            ),
            (
                serde_json::json!({"tablespaces": [{"oid": 4294967296u64, "name": "a", "location": "/a"}]}),
                "no \"oid\"",
            ),
            (
                serde_json::json!({"tablespaces": [{"oid": 1, "name": "a"}]}),
                "no \"location\"",
            ),
            (
                serde_json::json!({"tablespaces": [
                    {"oid": 1, "name": "a", "location": "/a"},
                    {"oid": 1, "name": "b", "location": "/b"}
                ]}),
                "tablespace 1 twice",
            ),
        ] {
            let msg = tablespaces(&meta).expect_err(why).to_string();
            assert!(msg.contains(why), "{meta}: {msg}");
        }
    }
}
