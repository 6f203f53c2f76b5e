//! What a base backup leaves out, and why.
//!
//! The rules are those `pg_basebackup` applies in PostgreSQL 15 (the `excludeDirContents` and
//! `excludeFiles` lists and the temporary and unlogged relation checks of the server's base
//! backup code, `basebackup.c`), plus Klio's own temporary files. Like PostgreSQL, the name
//! rules apply at every depth of the data directory and of the tablespaces, while the
//! temporary and unlogged relation rules apply only inside database directories.

use crate::relation::{Fork, parse_digits};

/// Directories kept (empty, with their permissions) but whose contents are left out,
/// wherever a directory of that name appears. PostgreSQL removes, zeroes or rebuilds what
/// they hold when it starts, or (`pg_replslot`) it would be wrong to restore it:
/// - `pg_stat_tmp`: temporary statistics files, also used by extensions;
/// - `pg_replslot`: replication slots, which belong to the original server;
/// - `pg_dynshmem`: dynamic shared memory segments, removed at startup;
/// - `pg_notify`: `LISTEN`/`NOTIFY` queue, reset at startup;
/// - `pg_serial`: serializable transaction state, only kept for debugging;
/// - `pg_snapshots`: exported snapshots, removed at startup;
/// - `pg_subtrans`: subtransaction state, zeroed at startup.
///
/// A symbolic link with one of these names is kept as a directory.
pub const EXCLUDED_DIR_CONTENTS: &[&str] = &[
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Files left out wherever they appear, by exact name:
/// - `postgresql.auto.conf.tmp` and `current_logfiles.tmp`: the server's own temporary files;
/// - `backup_label`, `tablespace_map`: left by an earlier backup or a restore, and wrong for
///   this one (a backup supplies its own);
/// - `backup_manifest`: the manifest of the backup this server was restored from;
/// - `postmaster.pid`, `postmaster.opts`: describe the running server process, and a stale
///   `postmaster.pid` would stop the restored server from starting.
pub const EXCLUDED_FILES: &[&str] = &[
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postmaster.pid",
    "postmaster.opts",
];

/// Files and directories left out wherever they appear, by name prefix:
/// - `pg_internal.init`: the relation cache, rebuilt at startup (the prefix also covers the
///   server's temporary copies of it);
/// - `pgsql_tmp`: temporary files and directories of sorts, hashes and the like.
pub const EXCLUDED_FILE_PREFIXES: &[&str] = &["pg_internal.init", "pgsql_tmp"];

/// The suffix of Klio's own temporary files (the same as `klio_durable::TMP_SUFFIX`), left out
/// wherever they appear.
pub const KLIO_TMP_SUFFIX: &str = ".klio-tmp";

/// The write-ahead log directory at the top of the data directory. It is kept (as a
/// directory, even when it is a symbolic link) with an empty [`ARCHIVE_STATUS_DIR`] inside;
/// the WAL itself is backed up from the archive, not from here.
pub const WAL_DIR: &str = "pg_wal";

/// The directory inside [`WAL_DIR`] that is kept, empty.
pub const ARCHIVE_STATUS_DIR: &str = "archive_status";

/// Why `name` is left out wherever it appears (by [`EXCLUDED_FILES`],
/// [`EXCLUDED_FILE_PREFIXES`] or [`KLIO_TMP_SUFFIX`]), or `None` if those rules keep it.
pub(crate) fn excluded_name(name: &str) -> Option<&'static str> {
    if EXCLUDED_FILES.contains(&name) {
        return Some("excluded file");
    }
    if EXCLUDED_FILE_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Some("excluded file prefix");
    }
    if name.ends_with(KLIO_TMP_SUFFIX) {
        return Some("Klio temporary file");
    }
    None
}

/// Whether `name` is a file of a temporary relation: `t<backend>_<relfilenode>`, optionally
/// followed by `_fsm`, `_vm` or `_init` and then optionally by `.<segment>`. Those files die
/// with the session that made them, so backups leave them out.
pub fn is_temp_relation_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('t') else {
        return false;
    };
    let (stem, segment) = match rest.split_once('.') {
        Some((stem, segment)) => (stem, Some(segment)),
        None => (rest, None),
    };
    if let Some(segment) = segment
        && !all_digits(segment)
    {
        return false;
    }
    let mut parts = stem.split('_');
    let backend = parts.next().unwrap_or_default();
    let Some(node) = parts.next() else {
        return false;
    };
    let fork_ok = match parts.next() {
        None => true,
        Some(fork) => Fork::from_suffix_name(fork).is_some(),
    };
    fork_ok && parts.next().is_none() && all_digits(backend) && all_digits(node)
}

/// A non-empty run of ASCII digits (of any length).
fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `name` is all digits and fits an OID: the name of a database directory in `base/`
/// or in a tablespace's version directory.
pub(crate) fn is_oid_name(name: &str) -> bool {
    parse_digits(name).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_relation_names_are_recognised() {
        for name in [
            "t3_16384",
            "t3_16384_fsm",
            "t3_16384_vm",
            "t3_16384_init",
            "t3_16384.1",
            "t12_16384_fsm.2",
            "t99999999999_1",
        ] {
            assert!(is_temp_relation_name(name), "{name:?}");
        }
    }

    #[test]
    fn other_names_are_not_temp_relations() {
        for name in [
            "16384",
            "t",
            "t_16384",
            "t3_",
            "t3",
            "t3_16384_main",
            "t3_16384_fsm_vm",
            "t3_16384.",
            "t3_16384.1.2",
            "t3_16384.x",
            "tx_16384",
            "T3_16384",
            "t3_16384_fsmx",
            "t3__16384",
        ] {
            assert!(!is_temp_relation_name(name), "{name:?}");
        }
    }

    #[test]
    fn excluded_names_match_exactly_or_by_prefix_or_suffix() {
        assert!(excluded_name("postmaster.pid").is_some());
        assert!(excluded_name("postmaster.opts").is_some());
        assert!(excluded_name("backup_label").is_some());
        assert!(excluded_name("backup_manifest").is_some());
        assert!(excluded_name("tablespace_map").is_some());
        assert!(excluded_name("postgresql.auto.conf.tmp").is_some());
        assert!(excluded_name("current_logfiles.tmp").is_some());
        assert!(excluded_name("pg_internal.init").is_some());
        assert!(excluded_name("pg_internal.init.4711").is_some());
        assert!(excluded_name("pgsql_tmp").is_some());
        assert!(excluded_name("pgsql_tmp4711.0").is_some());
        assert!(excluded_name(".16384.42.0.klio-tmp").is_some());

        assert!(excluded_name("postmaster.pid.old").is_none());
        assert!(excluded_name("backup_label.old").is_none());
        assert!(excluded_name("current_logfiles").is_none());
        assert!(excluded_name("postgresql.auto.conf").is_none());
        assert!(excluded_name("16384").is_none());
        assert!(excluded_name("pg_control").is_none());
    }
}
