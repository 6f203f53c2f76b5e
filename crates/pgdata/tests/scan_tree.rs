#![allow(clippy::unwrap_used)]
//! `scan` on synthetic data directories: exclusions, relation names, tablespaces and links.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use klio_pgdata::{Entry, EntryKind, Error, Fork, RelationFile, Scan, Tablespace, scan};

const CATVERSION_DIR: &str = "PG_15_202209061";

fn file(root: &Path, rel: &str, contents: &[u8]) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

fn dir(root: &Path, rel: &str) {
    fs::create_dir_all(root.join(rel)).unwrap();
}

fn paths(scan: &Scan) -> Vec<&str> {
    scan.entries.iter().map(|e| e.path.as_str()).collect()
}

fn entry<'a>(scan: &'a Scan, path: &str) -> &'a Entry {
    scan.entries
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no entry {path:?} in {:#?}", paths(scan)))
}

/// Asserts that entries are ordered component by component and every entry's parent
/// directory is listed before it.
fn assert_ordered(scan: &Scan) {
    let mut seen_dirs = BTreeSet::new();
    for pair in scan.entries.windows(2) {
        assert!(
            pair[0].path.split('/').lt(pair[1].path.split('/')),
            "{} before {}",
            pair[0].path,
            pair[1].path
        );
    }
    for e in &scan.entries {
        if let Some((parent, _)) = e.path.rsplit_once('/') {
            assert!(
                seen_dirs.contains(parent),
                "{} before its directory",
                e.path
            );
        }
        if e.kind == EntryKind::Directory
            || matches!(&e.kind, EntryKind::Symlink { .. }) && e.path.starts_with("pg_tblspc/")
        {
            seen_dirs.insert(e.path.clone());
        }
    }
}

/// A data directory with one of everything, and a tablespace outside it.
fn build_tree(root: &Path, tablespace: &Path) {
    file(root, "PG_VERSION", b"15\n");
    for name in [
        "postmaster.pid",
        "postmaster.opts",
        "backup_label",
        "tablespace_map",
        "backup_manifest",
        "postgresql.auto.conf.tmp",
        "current_logfiles.tmp",
        "postgresql.conf",
        "postgresql.auto.conf",
        "current_logfiles",
        "backup_label.old",
    ] {
        file(root, name, b"x");
    }
    for name in [
        "pg_control",
        "pg_filenode.map",
        "pg_internal.init",
        "1262",
        "1262_fsm",
        "1262_vm",
    ] {
        file(root, &format!("global/{name}"), b"g");
    }
    for name in [
        "PG_VERSION",
        "pg_filenode.map",
        "pg_internal.init",
        "pg_internal.init.4711",
        "16384",
        "16384.1",
        "16384_fsm",
        "16384_vm",
        // a temporary relation
        "t3_16400",
        "t3_16400_fsm",
        "t3_16400.2",
        // an unlogged relation
        "16500",
        "16500.1",
        "16500_fsm",
        "16500_vm",
        "16500_init",
        // Klio's own temporary file
        ".16384.1.42.0.klio-tmp",
        // not a relation name
        "16384_main",
    ] {
        file(root, &format!("base/5/{name}"), b"b");
    }
    file(root, "base/5/pgsql_tmp/pgsql_tmp4711.0", b"t");
    file(root, "base/pgsql_tmp/pgsql_tmp4712.0", b"t");
    file(root, "base/1/1259", b"b");
    // Temporary and unlogged names outside database directories are ordinary files.
    file(root, "pg_xact/0000", b"x");
    file(root, "pg_logical/t3_16400", b"x");
    file(root, "pg_logical/16500", b"x");
    file(root, "pg_logical/16500_init", b"x");
    file(root, "pg_wal/000000010000000000000001", b"w");
    file(
        root,
        "pg_wal/archive_status/000000010000000000000001.done",
        b"",
    );
    file(root, "pg_replslot/slot1/state", b"s");
    file(root, "pg_stat_tmp/global.stat", b"s");
    file(root, "pg_dynshmem/mmap.1", b"s");
    file(root, "pg_notify/0000", b"s");
    file(root, "pg_serial/0000", b"s");
    file(root, "pg_snapshots/00000003-00000002-1", b"s");
    file(root, "pg_subtrans/0000", b"s");
    dir(root, "pg_stat");
    dir(root, "pg_tblspc");
    symlink("/nonexistent/elsewhere", root.join("log")).unwrap();

    let version_dir = tablespace.join(CATVERSION_DIR);
    file(&version_dir, "5/16391", b"t");
    file(&version_dir, "5/16391_fsm", b"t");
    file(&version_dir, "5/t4_16392", b"t");
    file(&version_dir, "5/16393", b"t");
    file(&version_dir, "5/16393_init", b"t");
    file(&version_dir, "5/pgsql_tmp/pgsql_tmp1.0", b"t");
    file(&version_dir, "pgsql_tmp/pgsql_tmp2.0", b"t");
    file(tablespace, "PG_14_202107181/5/16391", b"old");
    symlink(tablespace, root.join("pg_tblspc/16390")).unwrap();
}

#[test]
fn scan_synthetic_tree_applies_basebackup_exclusions() {
    let data = tempfile::tempdir().unwrap();
    let ts = tempfile::tempdir().unwrap();
    build_tree(data.path(), ts.path());

    let scan = scan(data.path()).unwrap();
    let tsv = format!("pg_tblspc/16390/{CATVERSION_DIR}");
    let mut expected: Vec<String> = [
        "PG_VERSION",
        "backup_label.old",
        "base",
        "base/1",
        "base/1/1259",
        "base/5",
        "base/5/16384",
        "base/5/16384.1",
        "base/5/16384_fsm",
        "base/5/16384_main",
        "base/5/16384_vm",
        "base/5/16500_init",
        "base/5/PG_VERSION",
        "base/5/pg_filenode.map",
        "current_logfiles",
        "global",
        "global/1262",
        "global/1262_fsm",
        "global/1262_vm",
        "global/pg_control",
        "global/pg_filenode.map",
        "log",
        "pg_dynshmem",
        "pg_logical",
        "pg_logical/16500",
        "pg_logical/16500_init",
        "pg_logical/t3_16400",
        "pg_notify",
        "pg_replslot",
        "pg_serial",
        "pg_snapshots",
        "pg_stat",
        "pg_stat_tmp",
        "pg_subtrans",
        "pg_tblspc",
        "pg_tblspc/16390",
        "pg_wal",
        "pg_wal/archive_status",
        "pg_xact",
        "pg_xact/0000",
        "postgresql.auto.conf",
        "postgresql.conf",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for rel in ["", "/5", "/5/16391", "/5/16391_fsm", "/5/16393_init"] {
        expected.push(format!("{tsv}{rel}"));
    }
    expected.sort_by(|a, b| a.split('/').cmp(b.split('/')));
    assert_eq!(paths(&scan), expected);
    assert_ordered(&scan);

    assert_eq!(
        scan.tablespaces,
        vec![Tablespace {
            oid: 16390,
            location: ts.path().to_path_buf(),
        }]
    );
    let link = entry(&scan, "pg_tblspc/16390");
    assert_eq!(
        link.kind,
        EntryKind::Symlink {
            target: ts.path().to_str().unwrap().to_string()
        }
    );
    let ts_file = entry(&scan, &format!("{tsv}/5/16391_fsm"));
    assert_eq!(
        ts_file.abs_path,
        data.path()
            .join("pg_tblspc/16390")
            .join(CATVERSION_DIR)
            .join("5/16391_fsm")
    );
    assert_eq!(
        ts_file.relation,
        Some(RelationFile {
            relfilenode: 16391,
            fork: Fork::Fsm,
            segment: 0
        })
    );
    assert_eq!(fs::read(&ts_file.abs_path).unwrap(), b"t");

    let other = entry(&scan, "log");
    assert_eq!(
        other.kind,
        EntryKind::Symlink {
            target: "/nonexistent/elsewhere".into()
        }
    );
    assert_eq!(entry(&scan, "pg_wal").kind, EntryKind::Directory);
    assert_eq!(entry(&scan, "pg_replslot").kind, EntryKind::Directory);
}

#[test]
fn scan_synthetic_tree_classifies_relation_files() {
    let data = tempfile::tempdir().unwrap();
    let ts = tempfile::tempdir().unwrap();
    build_tree(data.path(), ts.path());
    let scan = scan(data.path()).unwrap();

    let rel = |path: &str| entry(&scan, path).relation;
    let some = |relfilenode, fork, segment| {
        Some(RelationFile {
            relfilenode,
            fork,
            segment,
        })
    };
    assert_eq!(rel("base/5/16384"), some(16384, Fork::Main, 0));
    assert_eq!(rel("base/5/16384.1"), some(16384, Fork::Main, 1));
    assert_eq!(rel("base/5/16384_vm"), some(16384, Fork::Vm, 0));
    assert_eq!(rel("base/5/16500_init"), some(16500, Fork::Init, 0));
    assert_eq!(rel("global/1262_fsm"), some(1262, Fork::Fsm, 0));
    assert_eq!(rel("base/1/1259"), some(1259, Fork::Main, 0));
    for path in [
        "global/pg_control",
        "global/pg_filenode.map",
        "base/5/PG_VERSION",
        "base/5/pg_filenode.map",
        "base/5/16384_main",
        "pg_xact/0000",
        "pg_logical/16500",
        "PG_VERSION",
        "postgresql.conf",
        "base/5",
    ] {
        assert_eq!(rel(path), None, "{path}");
    }
}

#[test]
fn scan_reports_size_mode_and_mtime() {
    let data = tempfile::tempdir().unwrap();
    file(data.path(), "PG_VERSION", b"15\n");
    file(data.path(), "base/5/16384", &[7u8; 8192 * 3]);
    let path = data.path().join("base/5/16384");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(data.path().join("base"), fs::Permissions::from_mode(0o750)).unwrap();
    let scan = scan(data.path()).unwrap();

    let f = entry(&scan, "base/5/16384");
    assert_eq!(f.kind, EntryKind::File);
    assert_eq!(f.size, 8192 * 3);
    assert_eq!(f.mode, 0o640);
    assert_eq!(f.abs_path, path);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - f.mtime).abs() < 600, "mtime {} now {now}", f.mtime);
    let d = entry(&scan, "base");
    assert_eq!(
        (d.kind.clone(), d.size, d.mode),
        (EntryKind::Directory, 0, 0o750)
    );
}

#[test]
fn scan_symlinked_wal_and_stat_tmp_are_directories_without_contents() {
    let data = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    file(data.path(), "PG_VERSION", b"15\n");
    file(elsewhere.path(), "wal/000000010000000000000001", b"w");
    file(elsewhere.path(), "wal/archive_status/x.ready", b"");
    file(elsewhere.path(), "stat/global.stat", b"s");
    fs::set_permissions(
        elsewhere.path().join("wal"),
        fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    symlink(elsewhere.path().join("wal"), data.path().join("pg_wal")).unwrap();
    symlink(
        elsewhere.path().join("stat"),
        data.path().join("pg_stat_tmp"),
    )
    .unwrap();
    symlink("/nonexistent", data.path().join("pg_notify")).unwrap();

    let scan = scan(data.path()).unwrap();
    assert_eq!(
        paths(&scan),
        [
            "PG_VERSION",
            "pg_notify",
            "pg_stat_tmp",
            "pg_wal",
            "pg_wal/archive_status"
        ]
    );
    for e in &scan.entries[1..] {
        assert_eq!(e.kind, EntryKind::Directory, "{}", e.path);
    }
    assert_eq!(entry(&scan, "pg_wal").mode, 0o750);
    assert_eq!(entry(&scan, "pg_notify").mode, 0o700);
    assert!(scan.tablespaces.is_empty());
}

#[test]
fn scan_wal_without_archive_status_still_lists_it() {
    let data = tempfile::tempdir().unwrap();
    file(data.path(), "PG_VERSION", b"15\n");
    file(data.path(), "pg_wal/000000010000000000000001", b"w");
    let scan = scan(data.path()).unwrap();
    assert_eq!(
        paths(&scan),
        ["PG_VERSION", "pg_wal", "pg_wal/archive_status"]
    );
}

#[test]
fn scan_tablespace_inside_data_directory_is_listed_once() {
    let data = tempfile::tempdir().unwrap();
    file(data.path(), "PG_VERSION", b"15\n");
    file(
        data.path(),
        &format!("inside/{CATVERSION_DIR}/5/16391"),
        b"t",
    );
    dir(data.path(), "pg_tblspc");
    symlink(
        data.path().join("inside"),
        data.path().join("pg_tblspc/16390"),
    )
    .unwrap();
    let scan = scan(data.path()).unwrap();
    let tsv = format!("pg_tblspc/16390/{CATVERSION_DIR}");
    let mut expected = vec![
        "PG_VERSION".to_string(),
        "inside".into(),
        "pg_tblspc".into(),
        "pg_tblspc/16390".into(),
        tsv.clone(),
        format!("{tsv}/5"),
        format!("{tsv}/5/16391"),
    ];
    expected.sort_by(|a, b| a.split('/').cmp(b.split('/')));
    assert_eq!(paths(&scan), expected);
}

#[test]
fn scan_in_place_tablespace_is_walked_as_a_directory() {
    let data = tempfile::tempdir().unwrap();
    file(data.path(), "PG_VERSION", b"15\n");
    file(
        data.path(),
        &format!("pg_tblspc/16390/{CATVERSION_DIR}/5/16391"),
        b"t",
    );
    file(
        data.path(),
        &format!("pg_tblspc/16390/{CATVERSION_DIR}/5/t3_16392"),
        b"t",
    );
    let scan = scan(data.path()).unwrap();
    let rel = format!("pg_tblspc/16390/{CATVERSION_DIR}/5/16391");
    assert!(paths(&scan).contains(&rel.as_str()), "{:?}", paths(&scan));
    assert!(entry(&scan, &rel).relation.is_some());
    assert_eq!(entry(&scan, "pg_tblspc/16390").kind, EntryKind::Directory);
    assert_eq!(scan.entries.len(), 6, "{:?}", paths(&scan));
    assert!(scan.tablespaces.is_empty());
}

#[test]
fn scan_without_pg_version_is_not_a_data_directory() {
    let data = tempfile::tempdir().unwrap();
    let err = scan(data.path()).unwrap_err();
    assert!(matches!(err, Error::NotADataDirectory { .. }), "{err}");
    assert!(err.to_string().contains("no PG_VERSION"), "{err}");
    assert!(!err.is_retryable());
}

#[test]
fn scan_unreadable_tablespace_is_an_error_naming_the_path() {
    let data = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    file(data.path(), "PG_VERSION", b"15\n");
    file(elsewhere.path(), "not-a-directory", b"x");
    dir(data.path(), "pg_tblspc");
    symlink(
        elsewhere.path().join("not-a-directory"),
        data.path().join("pg_tblspc/16390"),
    )
    .unwrap();
    let err = scan(data.path()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Io { .. }), "{text}");
    assert!(
        text.starts_with("could not read directory \"")
            && text.contains("pg_tblspc/16390\"")
            && text.contains("\nhint: "),
        "{text}"
    );
}

#[test]
fn scan_dangling_tablespace_link_is_kept_without_contents() {
    let data = tempfile::tempdir().unwrap();
    file(data.path(), "PG_VERSION", b"15\n");
    dir(data.path(), "pg_tblspc");
    symlink("/nonexistent/ts", data.path().join("pg_tblspc/16390")).unwrap();
    let scan = scan(data.path()).unwrap();
    assert_eq!(paths(&scan), ["PG_VERSION", "pg_tblspc", "pg_tblspc/16390"]);
    assert_eq!(scan.tablespaces.len(), 1);
}
