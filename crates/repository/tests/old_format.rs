//! Repositories written by earlier versions stay readable, verifiable and collectable, and
//! take new backups that deduplicate against their blocks. The fixtures are never
//! rewritten:
//!
//! - `tests/fixtures/format-2026-11` was written by Klio at commit cd18393 (the last one
//!   before runs): two backups of cluster `fixture-db`, one in the domain
//!   `cluster/fixture-db` (index version 2), one in the legacy domain (version 1), packs of
//!   16 KiB, zstd level 3, one block per frame.
//! - `tests/fixtures/format-2026-12` was written at commit 9009004 (the last one with
//!   32-byte block ids in blocklists and index objects): two backups in the domain
//!   `cluster/fixture-db`, the relation in runs of 16 pages (index version 3), the second
//!   backup with pages 20..30 changed, packs of 64 KiB.
//!
//! `content` below is the generators' content function.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use klio_crypto::{KeyEnvelope, Passphrase};
use klio_repository::{
    BackupId, BlockId, Domain, FileEntry, FileKind, LocalStore, Manifest, Repository,
    RepositoryOptions,
};

/// The fixture's file content: 3/4 of each 64 bytes compressible, the rest pseudo-random.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|i| {
            if i % 64 < 48 {
                ((i / 16) as u64 ^ seed.wrapping_mul(31)) as u8
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

const RELATION_SIZE: usize = 40 * 8192 + 100;

/// What `base/1/1234` holds in the fixture: 41 blocks, pages 10..14 equal to page 3.
fn relation() -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0u64;
    while out.len() < RELATION_SIZE {
        let len = (RELATION_SIZE - out.len()).min(8192);
        let seed = if (10..14).contains(&i) { 3 } else { i + 100 };
        out.extend(content(seed, len));
        i += 1;
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Opens the copy at `root` of a fixture (every fixture has the same passphrase).
fn open(root: &Path, cache: &Path) -> Repository {
    let passphrase = Passphrase::from_file(&fixture("format-2026-11").join("passphrase")).unwrap();
    let master = KeyEnvelope::load_or_create(&root.join("keys.json"), &passphrase).unwrap();
    Repository::open(
        Arc::new(LocalStore::open(root).unwrap()),
        master,
        RepositoryOptions {
            index_cache: Some(cache.to_path_buf()),
            pack_target_size: 64 << 10,
            ..RepositoryOptions::default()
        },
    )
    .unwrap()
}

/// A file's content, read block by block.
fn read_file(repo: &Repository, f: &FileEntry) -> Vec<u8> {
    match &f.kind {
        FileKind::Whole { block } => repo.read_block(block).unwrap(),
        FileKind::Blocks { blocklists, .. } => {
            let mut out = Vec::new();
            for l in blocklists {
                for id in repo.get_blocklist(l).unwrap() {
                    out.extend(repo.read_block(&id).unwrap());
                }
            }
            assert_eq!(out.len() as u64, f.size, "{}", f.path);
            out
        }
        _ => Vec::new(),
    }
}

fn check_backup(base: &Repository, backup: &str, expected: &[(&str, Vec<u8>)]) {
    let id: BackupId = backup.parse().unwrap();
    let m = base.get_manifest("fixture-db", &id).unwrap();
    let repo = base.in_domain(&m.domain).unwrap();
    for (path, want) in expected {
        let f = m.files.iter().find(|f| f.path == *path).unwrap();
        assert!(read_file(&repo, f) == *want, "{backup}: {path} differs");
    }
    let report = repo.verify("fixture-db", &id).unwrap();
    assert!(report.is_ok(), "{backup}: {:?}", report.problems);
}

/// Backs up `file` as `base/1/1234` in `backup` of the domain of `repo`, in runs of 16
/// pages; returns how many pages were new and how many deduplicated.
fn back_up_relation(repo: &Repository, backup: &str, file: &[u8], mtime: i64) -> (u64, u64) {
    let ids: Vec<BlockId> = file.chunks(8192).map(|p| repo.block_id(p)).collect();
    let mut w = repo.pack_writer();
    let mut new = 0;
    for (n, run) in file.chunks(16 * 8192).enumerate() {
        let pages: Vec<(BlockId, u32)> = run
            .chunks(8192)
            .zip(&ids[n * 16..])
            .map(|(p, id)| (*id, p.len() as u32))
            .collect();
        new += w.add_run(&pages, run, None).unwrap();
    }
    let stats = w.finish().unwrap();
    let list = repo.put_blocklist(&ids).unwrap();
    repo.put_manifest(&Manifest {
        cluster: "fixture-db".into(),
        backup_id: backup.parse().unwrap(),
        metadata: serde_json::json!({}),
        domain: repo.domain().clone(),
        files: vec![FileEntry {
            path: "base/1/1234".into(),
            size: file.len() as u64,
            mode: 0o600,
            mtime,
            kind: FileKind::Blocks {
                block_size: 8192,
                blocklists: vec![list],
            },
        }],
    })
    .unwrap();
    (new, stats.blocks_deduplicated)
}

/// Deletes `backup` and collects: something must go.
fn delete_and_collect(base: &Repository, backup: &str) {
    base.delete_backup("fixture-db", &backup.parse().unwrap())
        .unwrap();
    let plan = base.gc_plan(&HashSet::new()).unwrap();
    let report = base.gc_execute(&plan).unwrap();
    assert!(
        report.packs_deleted + report.packs_rewritten > 0,
        "{backup}'s own pages go: {report:?}"
    );
}

fn old_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("base/1/1234", relation()),
        ("global/pg_control", content(7, 8192)),
        ("PG_VERSION", b"15\n".to_vec()),
    ]
}

#[test]
fn a_repository_written_before_runs_restores_verifies_collects_and_takes_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repository");
    copy_dir(&fixture("format-2026-11").join("repository"), &root);
    let base = open(&root, &tmp.path().join("cache-1.redb"));

    // Both old backups read back byte for byte and verify.
    check_backup(&base, "backup-20261201000000", &old_files());
    check_backup(&base, "backup-20261201010000", &old_files());

    // A new backup in the cluster's domain, written in runs of 16 pages: its first 20 pages
    // are the old relation's (deduplicated against the old one-block frames), the other 20
    // are new.
    let domain = Domain::cluster("fixture-db").unwrap();
    let repo = base.in_domain(&domain).unwrap();
    let old = relation();
    let mut new_file = old[..20 * 8192].to_vec();
    for i in 0..20u64 {
        new_file.extend(content(1000 + i, 8192));
    }
    let (new, deduplicated) =
        back_up_relation(&repo, "backup-20261202000000", &new_file, 1764633600);
    assert_eq!(new, 20, "only the 20 new pages are stored");
    assert_eq!(deduplicated, 20);
    check_backup(
        &base,
        "backup-20261202000000",
        &[("base/1/1234", new_file.clone())],
    );

    // Collecting after the first old backup is deleted keeps the other two intact: the
    // second old one is in the legacy domain, the new one shares 20 old pages.
    delete_and_collect(&base, "backup-20261201000000");
    check_backup(&base, "backup-20261201010000", &old_files());
    check_backup(
        &base,
        "backup-20261202000000",
        &[("base/1/1234", new_file.clone())],
    );

    // A fresh cache reads every index object again (versions 1, 2 and 3).
    drop(base);
    let base = open(&root, &tmp.path().join("cache-2.redb"));
    check_backup(&base, "backup-20261201010000", &old_files());
    check_backup(&base, "backup-20261202000000", &[("base/1/1234", new_file)]);
}

/// What `base/1/1234` holds in the second backup of `format-2026-12`.
fn relation_changed() -> Vec<u8> {
    let mut out = relation();
    for i in 20..30 {
        out[i * 8192..(i + 1) * 8192].copy_from_slice(&content(5000 + i as u64, 8192));
    }
    out
}

#[test]
fn a_repository_with_runs_and_long_block_ids_restores_verifies_collects_and_deduplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repository");
    copy_dir(&fixture("format-2026-12").join("repository"), &root);
    let base = open(&root, &tmp.path().join("cache-1.redb"));
    let first = old_files();
    let mut second = old_files();
    second[0].1 = relation_changed();
    check_backup(&base, "backup-20261203000000", &first);
    check_backup(&base, "backup-20261203010000", &second);

    // A new backup of the second backup's relation with 10 more pages changed stores only
    // those 10: the other 31 deduplicate against the blocks the fixture indexed.
    let domain = Domain::cluster("fixture-db").unwrap();
    let repo = base.in_domain(&domain).unwrap();
    let mut new_file = relation_changed();
    for i in 0..10 {
        new_file[i * 8192..(i + 1) * 8192].copy_from_slice(&content(9000 + i as u64, 8192));
    }
    let (new, _) = back_up_relation(&repo, "backup-20261204000000", &new_file, 1764806400);
    assert_eq!(new, 10, "only the 10 changed pages are stored");
    let newest = [("base/1/1234", new_file)];
    check_backup(&base, "backup-20261204000000", &newest);

    // Collecting after the first backup is deleted keeps the others intact.
    delete_and_collect(&base, "backup-20261203000000");
    check_backup(&base, "backup-20261203010000", &second);
    check_backup(&base, "backup-20261204000000", &newest);

    // A fresh cache reads the old and the new index objects again.
    drop(base);
    let base = open(&root, &tmp.path().join("cache-2.redb"));
    check_backup(&base, "backup-20261203010000", &second);
    check_backup(&base, "backup-20261204000000", &newest);
}
