//! Walking a data directory and its tablespaces into the list of entries a backup copies.

use std::collections::HashSet;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::exclude::{
    ARCHIVE_STATUS_DIR, EXCLUDED_DIR_CONTENTS, WAL_DIR, excluded_name, is_oid_name,
    is_temp_relation_name,
};
use crate::relation::{Fork, RelationFile, parse_digits};

/// The tablespace directory holding the symbolic links to the tablespaces.
const TBLSPC_DIR: &str = "pg_tblspc";

/// The mode given to a symbolic link reported as a directory when its target cannot be
/// followed (PostgreSQL's default directory mode).
const FALLBACK_DIR_MODE: u32 = 0o700;

/// The result of [`scan`]: what to copy, and where the tablespaces are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Everything to copy, ordered by path component by component (so a directory comes
    /// right before its contents, and its whole subtree is contiguous).
    pub entries: Vec<Entry>,
    /// The tablespaces linked from `pg_tblspc`, ordered by OID. In-place tablespaces
    /// (directories in `pg_tblspc`, made with `allow_in_place_tablespaces`) are part of the
    /// data directory and are not listed here.
    pub tablespaces: Vec<Tablespace>,
}

/// A tablespace: `pg_tblspc/<oid>` is a symbolic link to its location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tablespace {
    /// The tablespace's OID, the name of its link in `pg_tblspc`.
    pub oid: u32,
    /// The target of the link `pg_tblspc/<oid>`, as stored in the link.
    pub location: PathBuf,
}

/// One directory, file or symbolic link to copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the data directory, `/`-separated, such as `base/5/16384.1` or
    /// `pg_tblspc/16390/PG_15_202209061/5/16391` for tablespace contents.
    pub path: String,
    /// Where to read it; tablespace contents are reached through the `pg_tblspc` link.
    pub abs_path: PathBuf,
    /// Directory, file or symbolic link.
    pub kind: EntryKind,
    /// Length in bytes when scanned (0 for directories and symbolic links). Relation files
    /// may grow or shrink while they are copied.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    /// For relation data files (directly inside `global/`, `base/<dboid>/` or
    /// `pg_tblspc/<oid>/PG_15_<catversion>/<dboid>/`), what the name says. `None` for
    /// everything else.
    pub relation: Option<RelationFile>,
}

/// The kind of an [`Entry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory (also `pg_wal` and directories whose contents are excluded when they are
    /// symbolic links, which a restore recreates as plain directories).
    Directory,
    /// A regular file.
    File,
    /// A symbolic link, not followed (except `pg_tblspc/<oid>`, whose contents are listed
    /// under its path).
    Symlink {
        /// The link's target, as stored.
        target: String,
    },
}

/// Lists what a base backup of the data directory `pgdata` copies: every directory, file and
/// symbolic link of `pgdata` and of the tablespaces linked from `pg_tblspc`, less what
/// `pg_basebackup` leaves out (see [`EXCLUDED_DIR_CONTENTS`](crate::EXCLUDED_DIR_CONTENTS),
/// [`EXCLUDED_FILES`](crate::EXCLUDED_FILES),
/// [`EXCLUDED_FILE_PREFIXES`](crate::EXCLUDED_FILE_PREFIXES),
/// [`KLIO_TMP_SUFFIX`](crate::KLIO_TMP_SUFFIX), [`WAL_DIR`](crate::WAL_DIR), temporary
/// relations and all but the init fork of unlogged relations). `pgdata` itself is not an entry.
///
/// For each tablespace, `pg_tblspc/<oid>` is a [`EntryKind::Symlink`] entry and the
/// tablespace's version directory (`PG_<major>_<catversion>`, the major version taken from
/// `PG_VERSION`) and its contents follow under the `pg_tblspc/<oid>/` prefix; anything else in
/// the tablespace location (such as another major version's directory) is left out. A
/// tablespace located inside the data directory is listed under `pg_tblspc` only.
///
/// The server may run meanwhile: files and directories that vanish during the walk (dropped
/// relations and databases) are skipped, and the contents can change after the scan.
/// `pg_basebackup` copies `global/pg_control` last, and a copier should do the same.
///
/// # Errors
///
/// [`Error::NotADataDirectory`] when `pgdata` has no `PG_VERSION`, [`Error::Io`] for any other
/// I/O error (naming the path), [`Error::NonUtf8Name`] for a name that is not UTF-8.
pub fn scan(pgdata: &Path) -> Result<Scan, Error> {
    let version_file = pgdata.join("PG_VERSION");
    let version = match fs::read_to_string(&version_file) {
        Ok(text) => text.trim().to_string(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NotADataDirectory {
                path: pgdata.to_path_buf(),
            });
        }
        Err(e) => return Err(Error::io("read file", version_file, e)),
    };
    let mut walker = Walker {
        version_dir_prefix: format!("PG_{version}_"),
        nested_tablespaces: nested_tablespaces(pgdata),
        entries: Vec::new(),
        tablespaces: Vec::new(),
    };
    walker.walk_dir(pgdata, "", Role::Root)?;
    let Walker {
        mut entries,
        mut tablespaces,
        ..
    } = walker;
    entries.sort_by(|a, b| a.path.split('/').cmp(b.path.split('/')));
    tablespaces.sort_by_key(|t| t.oid);
    Ok(Scan {
        entries,
        tablespaces,
    })
}

/// What a directory is, which decides the rules for what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The data directory itself.
    Root,
    /// `base`.
    Base,
    /// `global`: holds the shared relations.
    Global,
    /// `pg_tblspc`: links to the tablespaces.
    Tblspc,
    /// `pg_tblspc/<oid>`: a tablespace location (through its link).
    Location,
    /// `pg_tblspc/<oid>/PG_<major>_<catversion>`.
    VersionDir,
    /// `base/<dboid>` or `pg_tblspc/<oid>/PG_<major>_<catversion>/<dboid>`.
    Database,
    /// Anything else.
    Other,
}

impl Role {
    /// The role of the subdirectory `name` of a directory with this role.
    fn child(self, name: &str, version_dir_prefix: &str) -> Role {
        match self {
            Role::Root => match name {
                "base" => Role::Base,
                "global" => Role::Global,
                TBLSPC_DIR => Role::Tblspc,
                _ => Role::Other,
            },
            Role::Base | Role::VersionDir if is_oid_name(name) => Role::Database,
            Role::Tblspc if is_oid_name(name) => Role::Location,
            Role::Location if name.starts_with(version_dir_prefix) => Role::VersionDir,
            _ => Role::Other,
        }
    }

    fn holds_relations(self) -> bool {
        matches!(self, Role::Global | Role::Database)
    }
}

struct Walker {
    /// `PG_<major>_`: the start of the name of this server's directory in a tablespace.
    version_dir_prefix: String,
    /// Relative paths of tablespace locations inside the data directory, not to be walked
    /// twice.
    nested_tablespaces: HashSet<String>,
    entries: Vec<Entry>,
    tablespaces: Vec<Tablespace>,
}

fn join_rel(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

impl Walker {
    /// Lists the directory `abs` (at `rel`) and visits what it holds. A directory other than
    /// the data directory that vanished is skipped.
    fn walk_dir(&mut self, abs: &Path, rel: &str, role: Role) -> Result<(), Error> {
        let names = match list_dir(abs) {
            Ok(names) => names,
            Err(Error::Io { source, .. }) if role != Role::Root && is_not_found(&source) => {
                tracing::debug!(path = %rel, "directory vanished during the scan");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let unlogged: HashSet<u32> = if role == Role::Database {
            names
                .iter()
                .filter_map(|n| RelationFile::parse(n))
                .filter(|r| r.fork == Fork::Init)
                .map(|r| r.relfilenode)
                .collect()
        } else {
            HashSet::new()
        };
        for name in &names {
            self.visit(abs, rel, role, name, &unlogged)?;
        }
        Ok(())
    }

    /// Adds the entry for `name` in the directory `dir_abs` (at `dir_rel`, with `role`) unless
    /// it is excluded, and walks it if it is a directory to walk. `unlogged` holds the
    /// relfilenodes with an init fork in this directory.
    fn visit(
        &mut self,
        dir_abs: &Path,
        dir_rel: &str,
        role: Role,
        name: &str,
        unlogged: &HashSet<u32>,
    ) -> Result<(), Error> {
        let rel = join_rel(dir_rel, name);
        if let Some(reason) = excluded_name(name) {
            tracing::debug!(path = %rel, reason, "left out of the backup");
            return Ok(());
        }
        if role == Role::Location && !name.starts_with(&self.version_dir_prefix) {
            tracing::debug!(path = %rel, "left out of the backup: not this server version's tablespace directory");
            return Ok(());
        }
        let relation = if role.holds_relations() {
            RelationFile::parse(name)
        } else {
            None
        };
        if role == Role::Database {
            if let Some(r) = relation
                && r.fork != Fork::Init
                && unlogged.contains(&r.relfilenode)
            {
                tracing::debug!(path = %rel, "left out of the backup: unlogged relation");
                return Ok(());
            }
            if is_temp_relation_name(name) {
                tracing::debug!(path = %rel, "left out of the backup: temporary relation");
                return Ok(());
            }
        }

        let abs = dir_abs.join(name);
        let meta = match fs::symlink_metadata(&abs) {
            Ok(meta) => meta,
            Err(e) if is_not_found(&e) => {
                tracing::debug!(path = %rel, "file vanished during the scan");
                return Ok(());
            }
            Err(e) => return Err(Error::io("stat file", abs, e)),
        };
        let file_type = meta.file_type();
        let dir_like = file_type.is_dir() || file_type.is_symlink();

        if dir_like && EXCLUDED_DIR_CONTENTS.contains(&name) {
            tracing::debug!(path = %rel, "contents left out of the backup");
            let (mode, mtime) = dir_attributes(&abs, &meta)?;
            self.push_dir(rel, abs, mode, mtime);
            return Ok(());
        }
        if role == Role::Root && name == WAL_DIR && dir_like {
            let (mode, mtime) = dir_attributes(&abs, &meta)?;
            let status_abs = abs.join(ARCHIVE_STATUS_DIR);
            let (status_mode, status_mtime) = match fs::metadata(&status_abs) {
                Ok(status) if status.is_dir() => (status.mode() & 0o7777, status.mtime()),
                _ => (mode, mtime),
            };
            let status_rel = join_rel(&rel, ARCHIVE_STATUS_DIR);
            self.push_dir(rel, abs, mode, mtime);
            self.push_dir(status_rel, status_abs, status_mode, status_mtime);
            return Ok(());
        }
        if file_type.is_symlink() {
            let target = match fs::read_link(&abs) {
                Ok(target) => target,
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => return Err(Error::io("read symbolic link", abs, e)),
            };
            let Some(target_text) = target.to_str().map(str::to_string) else {
                return Err(Error::NonUtf8Name { path: abs });
            };
            self.entries.push(Entry {
                path: rel.clone(),
                abs_path: abs.clone(),
                kind: EntryKind::Symlink {
                    target: target_text,
                },
                size: 0,
                mode: meta.mode() & 0o7777,
                mtime: meta.mtime(),
                relation: None,
            });
            if role == Role::Tblspc
                && let Some(oid) = parse_digits(name)
            {
                self.tablespaces.push(Tablespace {
                    oid,
                    location: target,
                });
                self.walk_dir(&abs, &rel, Role::Location)?;
            }
            return Ok(());
        }
        if file_type.is_dir() {
            let walk = !self.nested_tablespaces.contains(&rel);
            self.push_dir(rel.clone(), abs.clone(), meta.mode() & 0o7777, meta.mtime());
            if walk {
                let child = role.child(name, &self.version_dir_prefix);
                self.walk_dir(&abs, &rel, child)?;
            } else {
                tracing::debug!(path = %rel, "tablespace inside the data directory: listed under pg_tblspc only");
            }
            return Ok(());
        }
        if file_type.is_file() {
            self.entries.push(Entry {
                path: rel,
                abs_path: abs,
                kind: EntryKind::File,
                size: meta.len(),
                mode: meta.mode() & 0o7777,
                mtime: meta.mtime(),
                relation,
            });
            return Ok(());
        }
        tracing::warn!(path = %abs.display(), "skipping special file in the data directory");
        Ok(())
    }

    fn push_dir(&mut self, path: String, abs_path: PathBuf, mode: u32, mtime: i64) {
        self.entries.push(Entry {
            path,
            abs_path,
            kind: EntryKind::Directory,
            size: 0,
            mode,
            mtime,
            relation: None,
        });
    }
}

/// The names in directory `abs`.
fn list_dir(abs: &Path) -> Result<Vec<String>, Error> {
    let read_error = |e| Error::io("read directory", abs, e);
    let mut names = Vec::new();
    for entry in fs::read_dir(abs).map_err(read_error)? {
        let name = entry.map_err(read_error)?.file_name();
        match name.into_string() {
            Ok(name) => names.push(name),
            Err(name) => {
                return Err(Error::NonUtf8Name {
                    path: abs.join(name),
                });
            }
        }
    }
    Ok(names)
}

/// Permission bits and modification time for `abs`, reported as a directory even when it is
/// a symbolic link: those of the link's target when it is a directory, else the fallback
/// mode and the link's own time.
fn dir_attributes(abs: &Path, lstat: &Metadata) -> Result<(u32, i64), Error> {
    if !lstat.file_type().is_symlink() {
        return Ok((lstat.mode() & 0o7777, lstat.mtime()));
    }
    match fs::metadata(abs) {
        Ok(meta) if meta.is_dir() => Ok((meta.mode() & 0o7777, meta.mtime())),
        Ok(_) => Ok((FALLBACK_DIR_MODE, lstat.mtime())),
        Err(e) if is_not_found(&e) => Ok((FALLBACK_DIR_MODE, lstat.mtime())),
        Err(e) => Err(Error::io("stat symbolic link target", abs, e)),
    }
}

/// The paths, relative to `pgdata`, of the tablespace locations that lie inside `pgdata`
/// (PostgreSQL warns against that, but allows it). Best effort: anything unreadable here is
/// reported by the walk itself.
fn nested_tablespaces(pgdata: &Path) -> HashSet<String> {
    let mut nested = HashSet::new();
    let Ok(root) = fs::canonicalize(pgdata) else {
        return nested;
    };
    let tblspc = pgdata.join(TBLSPC_DIR);
    let Ok(entries) = fs::read_dir(&tblspc) else {
        return nested;
    };
    for entry in entries.flatten() {
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let Ok(location) = fs::canonicalize(tblspc.join(target)) else {
            continue;
        };
        if let Ok(inside) = location.strip_prefix(&root)
            && let Some(rel) = inside.to_str()
            && !rel.is_empty()
        {
            nested.insert(rel.to_string());
        }
    }
    nested
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn walker() -> Walker {
        Walker {
            version_dir_prefix: "PG_15_".into(),
            nested_tablespaces: HashSet::new(),
            entries: Vec::new(),
            tablespaces: Vec::new(),
        }
    }

    #[test]
    fn visit_vanished_file_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = walker();
        for role in [Role::Root, Role::Database, Role::Other] {
            w.visit(dir.path(), "base/5", role, "16384", &HashSet::new())
                .unwrap();
        }
        assert!(w.entries.is_empty());
    }

    #[test]
    fn walk_dir_vanished_directory_is_skipped_but_not_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("base/5");
        let mut w = walker();
        w.walk_dir(&gone, "base/5", Role::Database).unwrap();
        assert!(w.entries.is_empty());
        let err = w.walk_dir(&gone, "", Role::Root).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn roles_follow_the_data_directory_layout() {
        let p = "PG_15_";
        assert_eq!(Role::Root.child("base", p), Role::Base);
        assert_eq!(Role::Root.child("global", p), Role::Global);
        assert_eq!(Role::Root.child("pg_tblspc", p), Role::Tblspc);
        assert_eq!(Role::Root.child("pg_xact", p), Role::Other);
        assert_eq!(Role::Base.child("5", p), Role::Database);
        assert_eq!(Role::Base.child("pgsql_tmp", p), Role::Other);
        assert_eq!(Role::Tblspc.child("16390", p), Role::Location);
        assert_eq!(Role::Location.child("PG_15_202209061", p), Role::VersionDir);
        assert_eq!(Role::Location.child("PG_14_202107181", p), Role::Other);
        assert_eq!(Role::VersionDir.child("5", p), Role::Database);
        assert_eq!(Role::Database.child("5", p), Role::Other);
        assert_eq!(Role::Other.child("5", p), Role::Other);
    }
}
