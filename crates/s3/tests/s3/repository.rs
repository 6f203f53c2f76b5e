//! A Klio repository on S3: written, reopened, read back and verified.

use std::sync::Arc;

use klio_crypto::MasterKey;
use klio_repository::{
    BackupId, BlockId, FileEntry, FileKind, Manifest, ObjectStore, Repository, RepositoryOptions,
};
use serde_json::json;

use crate::moto::{S3Peer, open, runtime};
use crate::versitygw::on_both_servers;

/// Page-like content: compressible, different for each `seed`.
fn page(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 / 16) ^ seed.wrapping_mul(31)) as u8)
        .collect()
}

fn small_packs() -> RepositoryOptions {
    RepositoryOptions {
        compression_level: Some(3),
        pack_target_size: 64 << 10,
        index_cache: None,
    }
}

fn backup_id(n: u32) -> BackupId {
    BackupId::from_parts(2025, 3, 14, 9, 30, n).unwrap()
}

/// The files of a small cluster: a relation of 7½ blocks, small files, an empty one.
fn sample_files(seed: u64) -> Vec<(&'static str, Vec<u8>)> {
    let mut rel = Vec::new();
    for i in 0..7 {
        rel.extend(page(seed + i, 8192));
    }
    rel.extend(page(seed + 100, 1000));
    vec![
        ("base/5/16384", rel),
        ("PG_VERSION", b"15\n".to_vec()),
        ("base/5/16384_vm", Vec::new()),
        ("global/pg_control", page(seed + 7, 8192)),
    ]
}

/// Backs up `files` as the backup engine does: blocks into packs, blocklists of at most 3
/// blocks for files larger than a block, the manifest last.
fn backup(repo: &Repository, cluster: &str, id: &BackupId, files: &[(&str, Vec<u8>)]) {
    const BLOCK: usize = 8192;
    let mut w = repo.pack_writer();
    let mut entries = vec![FileEntry {
        path: "base".into(),
        size: 0,
        mode: 0o700,
        mtime: 1_741_944_600,
        kind: FileKind::Directory,
    }];
    let mut pending = Vec::new();
    for (path, data) in files {
        let ids: Vec<BlockId> = if data.len() <= BLOCK {
            vec![repo.block_id(data)]
        } else {
            data.chunks(BLOCK).map(|c| repo.block_id(c)).collect()
        };
        let chunks: Vec<&[u8]> = if data.len() <= BLOCK {
            vec![data]
        } else {
            data.chunks(BLOCK).collect()
        };
        for (id, c) in ids.iter().zip(chunks) {
            w.add_block(id, c).unwrap();
        }
        pending.push((path.to_string(), data.len(), ids));
    }
    w.finish().unwrap();
    for (path, size, ids) in pending {
        let kind = if size <= BLOCK {
            FileKind::Whole { block: ids[0] }
        } else {
            FileKind::Blocks {
                block_size: BLOCK as u32,
                blocklists: ids
                    .chunks(3)
                    .map(|c| repo.put_blocklist(c).unwrap())
                    .collect(),
            }
        };
        entries.push(FileEntry {
            path,
            size: size as u64,
            mode: 0o600,
            mtime: 1_741_944_590,
            kind,
        });
    }
    repo.put_manifest(&Manifest {
        domain: klio_repository::Domain::legacy(),
        cluster: cluster.to_string(),
        backup_id: id.clone(),
        metadata: json!({"start_lsn": "0/3000028", "timeline": 1}),
        files: entries,
    })
    .unwrap();
}

fn repository_on_s3_reopens_with_everything_written_and_verifies(server: &dyn S3Peer) {
    server.create_bucket("backups");
    let rt = runtime();
    let master = MasterKey::generate();
    let files = sample_files(8);

    let store: Arc<dyn ObjectStore> = Arc::new(open(server, &rt, "backups", "klio/repo1"));
    let repo = Repository::open_or_init(store, master.clone(), small_packs()).unwrap();
    assert_eq!(repo.location(), "s3://backups/klio/repo1");
    backup(&repo, "c1", &backup_id(12), &files);
    backup(&repo, "c2", &backup_id(13), &sample_files(20));
    let count = repo.block_count().unwrap();
    assert!(count > 10, "{count} blocks");
    drop(repo);

    // A new handle sees only what is in the bucket.
    let store: Arc<dyn ObjectStore> = Arc::new(open(server, &rt, "backups", "klio/repo1"));
    let repo = Repository::open(store.clone(), master.clone(), small_packs()).unwrap();
    assert_eq!(repo.block_count().unwrap(), count);
    assert!(repo.damaged_indexes().is_empty());
    assert_eq!(
        repo.list_clusters().unwrap(),
        vec!["c1".to_string(), "c2".to_string()]
    );
    assert_eq!(repo.list_manifests("c1").unwrap(), vec![backup_id(12)]);
    let m = repo.get_manifest("c1", &backup_id(12)).unwrap();
    for (path, data) in &files {
        let f = m.files.iter().find(|f| f.path == *path).unwrap();
        assert_eq!(
            &klio_repository::testing::read_file(&repo, f),
            data,
            "{path}"
        );
    }
    for (c, id) in [("c1", backup_id(12)), ("c2", backup_id(13))] {
        let report = repo.verify(c, &id).unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
    }
    // open_or_init on the existing repository opens it.
    let again = Repository::open_or_init(store.clone(), master, small_packs()).unwrap();
    assert_eq!(again.repository_id(), repo.repository_id());

    // Damage in the bucket (overwritten behind the store's back): verify names the pack.
    let packs = store.list("packs/").unwrap();
    assert!(!packs.is_empty());
    let mut bytes = store.get(&packs[0]).unwrap().unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    server.overwrite_object(&rt, "backups", &format!("klio/repo1/{}", packs[0]), bytes);
    let bad: Vec<_> = [("c1", backup_id(12)), ("c2", backup_id(13))]
        .iter()
        .flat_map(|(c, id)| repo.verify(c, id).unwrap().problems)
        .collect();
    assert!(!bad.is_empty());
    assert!(bad.iter().all(|p| p.object == packs[0]), "{bad:?}");
}

fn repository_is_not_created_in_a_prefix_holding_other_objects(server: &dyn S3Peer) {
    server.create_bucket("backups");
    let rt = runtime();
    let store = open(server, &rt, "backups", "used");
    store.put("something/else", b"x").unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    let err =
        Repository::open_or_init(store.clone(), MasterKey::generate(), small_packs()).unwrap_err();
    assert!(
        matches!(err, klio_repository::Error::NotEmpty { ref location } if location == "s3://backups/used"),
        "{err}"
    );
    let err = Repository::open(store, MasterKey::generate(), small_packs()).unwrap_err();
    assert!(
        matches!(err, klio_repository::Error::NotARepository { .. }),
        "{err}"
    );
}

on_both_servers!(
    repository_on_s3_reopens_with_everything_written_and_verifies,
    repository_is_not_created_in_a_prefix_holding_other_objects,
);
