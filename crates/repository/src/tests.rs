#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use klio_crypto::MasterKey;
use serde_json::json;

use super::*;

/// splitmix64: a small deterministic PRNG for reproducible "random" tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

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

fn mem_repo(options: RepositoryOptions) -> (Arc<MemStore>, MasterKey, Repository) {
    let store = Arc::new(MemStore::new());
    let master = MasterKey::generate();
    let repo = Repository::open_or_init(store.clone(), master.clone(), options).unwrap();
    (store, master, repo)
}

fn reopen(store: &Arc<MemStore>, master: &MasterKey) -> Repository {
    Repository::open(store.clone(), master.clone(), small_packs()).unwrap()
}

fn keys(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    store.list(prefix).unwrap()
}

fn flip(store: &MemStore, key: &str, at: usize) {
    let mut data = store.get(key).unwrap().unwrap();
    let at = at % data.len();
    data[at] ^= 0x20;
    store.replace(key, data).unwrap();
}

fn add_all(repo: &Repository, blocks: &[Vec<u8>]) -> (Vec<BlockId>, PackStats) {
    let mut w = repo.pack_writer();
    let ids: Vec<BlockId> = blocks
        .iter()
        .map(|b| {
            let id = repo.block_id(b);
            w.add_block(&id, b).unwrap();
            id
        })
        .collect();
    (ids, w.finish().unwrap())
}

fn backup_id(n: u32) -> BackupId {
    BackupId::from_parts(2025, 3, 14, 9, 30, n).unwrap()
}

/// Backs up `files` the way the backup engine will: blocks of `block_size`, blocklists of
/// at most 3 blocks, files of at most `block_size` bytes stored whole.
fn backup(
    repo: &Repository,
    cluster: &str,
    id: &BackupId,
    files: &[(&str, Vec<u8>)],
    block_size: usize,
) -> Manifest {
    let mut w = repo.pack_writer();
    let mut pending = Vec::new();
    for (path, data) in files {
        if data.len() <= block_size {
            let id = repo.block_id(data);
            w.add_block(&id, data).unwrap();
            pending.push((path.to_string(), data.len(), vec![id], true));
        } else {
            let ids: Vec<BlockId> = data
                .chunks(block_size)
                .map(|c| {
                    let id = repo.block_id(c);
                    w.add_block(&id, c).unwrap();
                    id
                })
                .collect();
            pending.push((path.to_string(), data.len(), ids, false));
        }
    }
    w.finish().unwrap();
    let mut entries = vec![FileEntry {
        path: "base".into(),
        size: 0,
        mode: 0o700,
        mtime: 1_741_944_600,
        kind: FileKind::Directory,
    }];
    for (path, size, ids, whole) in pending {
        let kind = if whole {
            FileKind::Whole { block: ids[0] }
        } else {
            FileKind::Blocks {
                block_size: block_size as u32,
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
    entries.push(FileEntry {
        path: "pg_tblspc/16385".into(),
        size: 0,
        mode: 0o777,
        mtime: 1_741_900_000,
        kind: FileKind::Symlink {
            target: "/mnt/ts1".into(),
        },
    });
    let manifest = Manifest {
        domain: repo.domain().clone(),
        cluster: cluster.to_string(),
        backup_id: id.clone(),
        metadata: json!({"start_lsn": "0/3000028", "timeline": 1}),
        files: entries,
    };
    repo.put_manifest(&manifest).unwrap();
    manifest
}

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

// ---------------------------------------------------------------------------------------
// blocks and packs

#[test]
fn blocks_roundtrip_through_packs() {
    let (store, master, repo) = mem_repo(small_packs());
    let blocks: Vec<Vec<u8>> = (0..20).map(|i| page(i, 8192)).collect();
    let (ids, stats) = add_all(&repo, &blocks);
    assert_eq!(stats.blocks_added, 20);
    assert_eq!(stats.plain_bytes_added, 20 * 8192);
    assert!(
        stats.pack_bytes < 20 * 8192 / 4,
        "pages compress: {stats:?}"
    );
    for (id, b) in ids.iter().zip(&blocks) {
        assert!(repo.has_block(id).unwrap());
        assert_eq!(&repo.read_block(id).unwrap(), b);
    }
    let again = reopen(&store, &master);
    assert_eq!(again.block_count().unwrap(), 20);
    for (id, b) in ids.iter().zip(&blocks) {
        assert_eq!(&again.read_block(id).unwrap(), b);
    }
}

#[test]
fn pack_is_a_complete_sealed_object() {
    let (store, master, repo) = mem_repo(small_packs());
    let blocks = vec![page(1, 100), Vec::new(), page(2, 5000)];
    add_all(&repo, &blocks);
    let packs = keys(store.as_ref(), "packs/");
    assert_eq!(packs.len(), 1);
    let id = packs[0].rsplit('/').next().unwrap();
    assert_eq!(&packs[0][6..8], &id[..2], "fan-out directory");
    let sealed = store.get(&packs[0]).unwrap().unwrap();
    // Every frame authenticates, in order, and the final frame has the total length; the
    // final hash is not computed (zeros): blocks are checked frame by frame.
    let name = format!("pack/{id}");
    let (header, hlen) = klio_crypto::ObjectHeader::decode(&sealed, &name).unwrap();
    assert_eq!(header.kind, klio_crypto::ObjectKind::Blob);
    let cipher = klio_crypto::FrameCipher::new(&master, &header);
    let (frames, summary) = cipher.open_all(&sealed[hlen..]).unwrap();
    let plain: Vec<u8> = frames
        .iter()
        .flat_map(|f| f.plaintext(&name).unwrap())
        .collect();
    assert_eq!(plain, blocks.concat());
    assert_eq!(summary.total_len, plain.len() as u64);
    assert_eq!(summary.blake3, [0; 32]);
}

#[test]
fn same_block_twice_is_stored_once() {
    let (store, master, repo) = mem_repo(small_packs());
    let b = page(7, 8192);
    let id = repo.block_id(&b);
    let mut w = repo.pack_writer();
    assert!(w.add_block(&id, &b).unwrap());
    assert!(!w.add_block(&id, &b).unwrap(), "same writer");
    let first = w.finish().unwrap();
    assert_eq!((first.blocks_added, first.blocks_deduplicated), (1, 1));

    let mut w = repo.pack_writer();
    assert!(!w.add_block(&id, &b).unwrap(), "second writer");
    let second = w.finish().unwrap();
    assert_eq!((second.blocks_added, second.packs_written), (0, 0));

    let again = reopen(&store, &master);
    let mut w = again.pack_writer();
    assert!(!w.add_block(&id, &b).unwrap(), "after reopening");
    w.finish().unwrap();
    assert_eq!(keys(store.as_ref(), "packs/").len(), 1);
    assert_eq!(keys(store.as_ref(), "index/").len(), 1);
}

#[test]
fn incompressible_blocks_are_stored_raw() {
    let (_store, _master, repo) = mem_repo(small_packs());
    let mut rng = Rng(42);
    let noise = rng.bytes(8192);
    let (ids, stats) = add_all(&repo, std::slice::from_ref(&noise));
    // 45 bytes of frame, the pack header and final frame; no expansion by compression
    assert!(
        stats.pack_bytes < 8192 + 300,
        "raw block costs {} bytes",
        stats.pack_bytes
    );
    assert_eq!(repo.read_block(&ids[0]).unwrap(), noise);
    let (_, stats) = add_all(&repo, &[vec![0u8; 8192]]);
    assert!(stats.pack_bytes < 400, "a zero page compresses: {stats:?}");
}

#[test]
fn packs_roll_over_at_the_target_size() {
    let options = RepositoryOptions {
        compression_level: None,
        pack_target_size: 20_000,
        index_cache: None,
    };
    let (store, master, repo) = mem_repo(options);
    let mut rng = Rng(1);
    let blocks: Vec<Vec<u8>> = (0..10).map(|_| rng.bytes(8192)).collect();
    let (ids, stats) = add_all(&repo, &blocks);
    // three 8 KiB blocks reach 20,000 bytes: packs of 3, 3, 3 and 1 blocks
    assert_eq!(stats.packs_written, 4);
    assert_eq!(keys(store.as_ref(), "packs/").len(), 4);
    assert_eq!(keys(store.as_ref(), "index/").len(), 4);
    for p in keys(store.as_ref(), "packs/") {
        let len = store.get(&p).unwrap().unwrap().len();
        assert!(len < 20_000 + 8192 + 300, "pack of {len} bytes");
    }
    let again = reopen(&store, &master);
    for (id, b) in ids.iter().zip(&blocks) {
        assert_eq!(&again.read_block(id).unwrap(), b);
    }
}

#[test]
fn blocks_are_found_as_soon_as_their_pack_is_written() {
    let options = RepositoryOptions {
        compression_level: None,
        pack_target_size: 10_000,
        index_cache: None,
    };
    let (_store, _master, repo) = mem_repo(options);
    let mut rng = Rng(5);
    let a = rng.bytes(6000);
    let b = rng.bytes(6000);
    let (ia, ib) = (repo.block_id(&a), repo.block_id(&b));
    let mut w = repo.pack_writer();
    w.add_block(&ia, &a).unwrap();
    assert_eq!(w.pending_blocks(), 1);
    assert!(
        !repo.has_block(&ia).unwrap(),
        "not stored before its pack is written"
    );
    w.add_block(&ib, &b).unwrap();
    assert_eq!(w.pending_blocks(), 0, "the pack rolled over");
    assert!(repo.has_block(&ia).unwrap() && repo.has_block(&ib).unwrap());
    assert_eq!(repo.read_block(&ib).unwrap(), b);
    w.finish().unwrap();
}

#[test]
fn add_block_checks_the_claimed_id_and_the_size() {
    let (_store, _master, repo) = mem_repo(small_packs());
    let mut w = repo.pack_writer();
    let wrong = repo.block_id(b"other");
    let err = w.add_block(&wrong, b"data").unwrap_err();
    assert!(matches!(err, Error::BlockIdMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&wrong.to_hex()), "{err}");
    let big = vec![1u8; MAX_BLOCK_SIZE + 1];
    let err = w.add_block(&repo.block_id(&big), &big).unwrap_err();
    assert!(matches!(err, Error::BlockTooLarge { .. }), "{err}");
    let max = vec![2u8; MAX_BLOCK_SIZE];
    assert!(w.add_block(&repo.block_id(&max), &max).unwrap());
    w.finish().unwrap();
}

#[test]
fn block_ids_are_keyed_per_repository() {
    let (_s1, _m1, r1) = mem_repo(small_packs());
    let (_s2, _m2, r2) = mem_repo(small_packs());
    assert_eq!(r1.block_id(b"x"), r1.block_id(b"x"));
    assert_ne!(r1.block_id(b"x"), r2.block_id(b"x"));
    assert_ne!(r1.block_id(b"x").0[..], blake3::hash(b"x").as_bytes()[..16]);
}

#[test]
fn random_block_sizes_roundtrip() {
    let options = RepositoryOptions {
        compression_level: Some(1),
        pack_target_size: 256 << 10,
        index_cache: None,
    };
    let (store, master, repo) = mem_repo(options);
    let mut rng = Rng(0x5eed);
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    for round in 0..4 {
        let mut w = repo.pack_writer();
        for _ in 0..60 {
            let len = match rng.below(10) {
                0 => 0,
                1 => 1 + rng.below(100) as usize,
                2 => MAX_BLOCK_SIZE - rng.below(4) as usize,
                _ => rng.below(64 << 10) as usize,
            };
            let b = if rng.below(2) == 0 {
                rng.bytes(len)
            } else {
                page(rng.next(), len)
            };
            // sometimes offer an earlier block again
            let b = if !blocks.is_empty() && rng.below(5) == 0 {
                blocks[rng.below(blocks.len() as u64) as usize].clone()
            } else {
                b
            };
            let id = repo.block_id(&b);
            let known = repo.has_block(&id).unwrap() || blocks.contains(&b);
            assert_eq!(w.add_block(&id, &b).unwrap(), !known, "round {round}");
            if !known {
                blocks.push(b);
            }
        }
        w.finish().unwrap();
    }
    let again = reopen(&store, &master);
    assert_eq!(again.block_count().unwrap(), blocks.len() as u64);
    for b in &blocks {
        assert_eq!(&again.read_block(&again.block_id(b)).unwrap(), b);
    }
}

// ---------------------------------------------------------------------------------------
// blocklists and manifests

#[test]
fn manifest_and_blocklists_roundtrip() {
    let (store, master, repo) = mem_repo(small_packs());
    let files = sample_files(1);
    let m = backup(&repo, "orders-db", &backup_id(0), &files, 8192);
    let again = reopen(&store, &master);
    let back = again.get_manifest("orders-db", &backup_id(0)).unwrap();
    assert_eq!(back, m);
    for (path, data) in &files {
        let f = back.files.iter().find(|f| f.path == *path).unwrap();
        assert_eq!(&crate::testing::read_file(&again, f), data, "{path}");
    }
    assert_eq!(
        again.list_manifests("orders-db").unwrap(),
        vec![backup_id(0)]
    );
    assert_eq!(
        again.list_clusters().unwrap(),
        vec!["orders-db".to_string()]
    );
    assert!(again.list_manifests("other").unwrap().is_empty());
    let report = again.verify("orders-db", &backup_id(0)).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.files, 6);
    assert_eq!(report.blocklists, 3);
    assert_eq!(report.blocks, 8 + 3);
}

#[test]
fn identical_blocklists_are_stored_once() {
    let (store, _master, repo) = mem_repo(small_packs());
    let blocks: Vec<Vec<u8>> = (0..4).map(|i| page(i, 8192)).collect();
    let (ids, _) = add_all(&repo, &blocks);
    let a = repo.put_blocklist(&ids).unwrap();
    let b = repo.put_blocklist(&ids).unwrap();
    assert_eq!(a, b);
    let c = repo.put_blocklist(&ids[..3]).unwrap();
    assert_ne!(a, c);
    assert_eq!(keys(store.as_ref(), "blocklists/").len(), 2);
    assert_eq!(repo.get_blocklist(&a).unwrap(), ids);

    // a second backup of unchanged files adds no blocks and no blocklists, only a manifest
    let files = sample_files(9);
    backup(&repo, "c1", &backup_id(1), &files, 8192);
    let (packs, lists) = (
        keys(store.as_ref(), "packs/").len(),
        keys(store.as_ref(), "blocklists/").len(),
    );
    backup(&repo, "c1", &backup_id(2), &files, 8192);
    assert_eq!(keys(store.as_ref(), "packs/").len(), packs);
    assert_eq!(keys(store.as_ref(), "blocklists/").len(), lists);
    assert_eq!(
        repo.list_manifests("c1").unwrap(),
        vec![backup_id(1), backup_id(2)]
    );
}

#[test]
fn blocklists_and_manifests_refuse_unstored_references() {
    let (_store, _master, repo) = mem_repo(small_packs());
    let b = page(3, 8192);
    let id = repo.block_id(&b);
    let mut w = repo.pack_writer();
    w.add_block(&id, &b).unwrap();
    let err = repo.put_blocklist(&[id]).unwrap_err();
    assert!(matches!(err, Error::UnstoredBlock { .. }), "{err}");
    assert!(
        err.to_string().contains("HINT: finish the pack writer"),
        "{err}"
    );
    w.finish().unwrap();
    let list = repo.put_blocklist(&[id]).unwrap();

    let mut m = Manifest {
        domain: Domain::legacy(),
        cluster: "c1".into(),
        backup_id: backup_id(3),
        metadata: json!(null),
        files: vec![FileEntry {
            path: "base/1/1".into(),
            size: 8192,
            mode: 0o600,
            mtime: 0,
            kind: FileKind::Blocks {
                block_size: 8192,
                blocklists: vec![BlocklistId([9; 32])],
            },
        }],
    };
    let err = repo.put_manifest(&m).unwrap_err();
    assert!(matches!(err, Error::BlocklistNotFound(_)), "{err}");
    m.files[0].kind = FileKind::Whole {
        block: BlockId([8; 16]),
    };
    assert!(matches!(
        repo.put_manifest(&m).unwrap_err(),
        Error::UnstoredBlock { .. }
    ));
    m.files[0].kind = FileKind::Blocks {
        block_size: 8192,
        blocklists: vec![list],
    };
    repo.put_manifest(&m).unwrap();
    let err = repo.put_manifest(&m).unwrap_err();
    assert!(matches!(err, Error::BackupExists { .. }), "{err}");
    assert!(
        err.to_string().contains("\"backup-20250314093003\""),
        "{err}"
    );
}

#[test]
fn invalid_manifests_are_refused() {
    let (_store, _master, repo) = mem_repo(small_packs());
    let entry = |path: &str, kind: FileKind| FileEntry {
        path: path.into(),
        size: 0,
        mode: 0o600,
        mtime: 0,
        kind,
    };
    let cases = vec![
        ("c1", vec![entry("../etc/passwd", FileKind::Directory)]),
        ("c1", vec![entry("/abs", FileKind::Directory)]),
        ("c1", vec![entry("a//b", FileKind::Directory)]),
        ("c1", vec![entry("a/./b", FileKind::Directory)]),
        ("c1", vec![entry("", FileKind::Directory)]),
        (
            "c1",
            vec![
                entry("a", FileKind::Directory),
                entry("a", FileKind::Directory),
            ],
        ),
        (
            "c1",
            vec![entry(
                "a",
                FileKind::Blocks {
                    block_size: 0,
                    blocklists: vec![],
                },
            )],
        ),
        (
            "c1",
            vec![entry(
                "l",
                FileKind::Symlink {
                    target: String::new(),
                },
            )],
        ),
        ("Bad_Cluster", vec![entry("a", FileKind::Directory)]),
    ];
    for (cluster, files) in cases {
        let m = Manifest {
            domain: Domain::legacy(),
            cluster: cluster.into(),
            backup_id: backup_id(4),
            metadata: json!({}),
            files: files.clone(),
        };
        assert!(repo.put_manifest(&m).is_err(), "{cluster} {files:?}");
    }
}

#[test]
fn backup_ids_and_cluster_names_are_validated() {
    assert!(BackupId::new("backup-20250314093000").is_ok());
    for bad in [
        "backup-2025031409300",
        "backup-202503140930000",
        "backup-20251314093000",
        "backup-20250300093000",
        "backup-20250314243000",
        "backup-20250314096000",
        "Backup-20250314093000",
        "backup-2025031409300x",
        "../backup-20250314093000",
        "",
    ] {
        let err = BackupId::new(bad).unwrap_err();
        assert!(err.to_string().contains("HINT"), "{bad}: {err}");
    }
    assert_eq!(
        serde_json::from_str::<BackupId>("\"backup-20250314093000\"").unwrap(),
        backup_id(0)
    );
    assert!(serde_json::from_str::<BackupId>("\"backup-x\"").is_err());
    for ok in ["a", "orders-db", "db.prod-1", &"a".repeat(63)] {
        assert!(validate_cluster_name(ok).is_ok(), "{ok}");
    }
    for bad in ["", "-a", "a-", "A", "a_b", "a/b", "..", &"a".repeat(64)] {
        assert!(validate_cluster_name(bad).is_err(), "{bad}");
    }
    assert!("ab".repeat(32).parse::<BlockId>().is_ok());
    assert!("AB".repeat(32).parse::<BlockId>().is_err());
    assert!("ab".repeat(31).parse::<BlockId>().is_err());
}

// ---------------------------------------------------------------------------------------
// damage

#[test]
fn flipped_byte_in_a_pack_fails_read_and_verify_naming_it() {
    let (store, master, repo) = mem_repo(small_packs());
    let files = sample_files(2);
    let m = backup(&repo, "c1", &backup_id(5), &files, 8192);
    let FileKind::Whole { block } = &m
        .files
        .iter()
        .find(|f| f.path == "PG_VERSION")
        .unwrap()
        .kind
    else {
        panic!("PG_VERSION is stored whole");
    };
    let pack = keys(store.as_ref(), "packs/").remove(0);
    // find the frame of PG_VERSION's block and damage its ciphertext
    let located = repo.locate(block).unwrap().unwrap();
    flip(
        &store,
        &pack,
        (located.loc.offset + located.loc.len - 5) as usize,
    );
    let err = repo.read_block(block).unwrap_err();
    assert!(matches!(err, Error::BlockCorrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&block.to_hex()) && msg.contains(&pack),
        "{msg}"
    );

    let report = reopen(&store, &master).verify("c1", &backup_id(5)).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert_eq!(
        (p.kind, p.object.as_str()),
        (ProblemKind::Corrupt, pack.as_str())
    );
    assert!(p.detail.contains(&block.to_hex()), "{p}");
    assert_eq!(report.blocks, 11);
}

#[test]
fn every_flipped_byte_of_a_block_frame_is_detected() {
    let (store, _master, repo) = mem_repo(small_packs());
    let b = page(11, 3000);
    let (ids, _) = add_all(&repo, &[b]);
    let pack = keys(store.as_ref(), "packs/").remove(0);
    let loc = repo.locate(&ids[0]).unwrap().unwrap().loc;
    let original = store.get(&pack).unwrap().unwrap();
    for i in loc.offset..loc.offset + loc.len {
        flip(&store, &pack, i as usize);
        assert!(repo.read_block(&ids[0]).is_err(), "flip at {i}");
        store.replace(&pack, original.clone()).unwrap();
    }
    assert!(repo.read_block(&ids[0]).is_ok());
}

#[test]
fn swapped_index_entries_are_detected_by_the_block_id() {
    // An index that points a block at another block's frame (a buggy or malicious index
    // writer with the key) still cannot make a read return the wrong data.
    let (store, master, repo) = mem_repo(small_packs());
    let (ids, _) = add_all(&repo, &[page(1, 8192), page(2, 8192)]);
    let mut a = repo.locate(&ids[0]).unwrap().unwrap();
    let b = repo.locate(&ids[1]).unwrap().unwrap();
    a.loc = b.loc;
    let section = index::PackSection {
        pack: a.pack.id,
        salt: a.pack.salt,
        domain: Domain::legacy(),
        blocks: vec![(ids[0], a.loc)],
    };
    for k in keys(store.as_ref(), "index/") {
        store.delete(&k).unwrap();
    }
    let key = format!("index/{}", "cd".repeat(32));
    let sealed = klio_crypto::seal_object(
        &master,
        klio_crypto::ObjectKind::Blob,
        &key,
        &index::encode(&[section]),
        None,
    );
    store.put(&key, &sealed).unwrap();
    let err = reopen(&store, &master).read_block(&ids[0]).unwrap_err();
    assert!(
        err.to_string().contains("does not match the block id"),
        "{err}"
    );
}

#[test]
fn flipped_byte_in_an_index_makes_its_blocks_missing_naming_it() {
    let (store, master, repo) = mem_repo(small_packs());
    backup(&repo, "c1", &backup_id(6), &sample_files(3), 8192);
    let index = keys(store.as_ref(), "index/").remove(0);
    flip(&store, &index, 200);
    let again = reopen(&store, &master);
    assert_eq!(again.block_count().unwrap(), 0);
    assert_eq!(again.damaged_indexes().len(), 1);
    let m = again.get_manifest("c1", &backup_id(6)).unwrap();
    let FileKind::Whole { block } = &m
        .files
        .iter()
        .find(|f| f.path == "PG_VERSION")
        .unwrap()
        .kind
    else {
        panic!("whole file");
    };
    let err = again.read_block(block).unwrap_err();
    assert!(matches!(err, Error::BlockNotFound { .. }), "{err}");
    assert!(err.to_string().contains(&index), "{err}");

    let report = again.verify("c1", &backup_id(6)).unwrap();
    assert!(!report.is_ok());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::Corrupt && p.object == index),
        "{:?}",
        report.problems
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::Missing && p.object == format!("block {block}")),
        "{:?}",
        report.problems
    );
}

#[test]
fn flipped_byte_in_a_manifest_or_blocklist_is_detected_naming_it() {
    let (store, master, repo) = mem_repo(small_packs());
    backup(&repo, "c1", &backup_id(7), &sample_files(4), 8192);
    let list = keys(store.as_ref(), "blocklists/").remove(0);
    flip(&store, &list, 150);
    let report = reopen(&store, &master).verify("c1", &backup_id(7)).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::Corrupt && p.object == list),
        "{:?}",
        report.problems
    );

    let manifest = "manifests/c1/backup-20250314093007";
    flip(&store, manifest, 150);
    let again = reopen(&store, &master);
    for err in [
        again.get_manifest("c1", &backup_id(7)).unwrap_err(),
        again.verify("c1", &backup_id(7)).unwrap_err(),
    ] {
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(manifest), "{err}");
    }
}

#[test]
fn objects_renamed_to_another_key_are_detected() {
    let (store, master, repo) = mem_repo(small_packs());
    backup(&repo, "c1", &backup_id(8), &sample_files(5), 8192);
    let data = store
        .get("manifests/c1/backup-20250314093008")
        .unwrap()
        .unwrap();
    store
        .put("manifests/c1/backup-20250314093009", &data)
        .unwrap();
    let err = reopen(&store, &master)
        .get_manifest("c1", &backup_id(9))
        .unwrap_err();
    assert!(err.to_string().contains("holds object"), "{err}");
}

#[test]
fn missing_pack_is_reported_naming_it() {
    let (store, master, repo) = mem_repo(small_packs());
    let m = backup(&repo, "c1", &backup_id(10), &sample_files(6), 8192);
    let pack = keys(store.as_ref(), "packs/").remove(0);
    store.delete(&pack).unwrap();
    let again = reopen(&store, &master);
    let FileKind::Whole { block } = &m
        .files
        .iter()
        .find(|f| f.path == "PG_VERSION")
        .unwrap()
        .kind
    else {
        panic!("whole file");
    };
    let err = again.read_block(block).unwrap_err();
    assert!(matches!(err, Error::PackMissing { .. }), "{err}");
    assert!(err.to_string().contains(&pack), "{err}");
    let report = again.verify("c1", &backup_id(10)).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].kind, ProblemKind::Missing);
    assert_eq!(report.problems[0].object, pack);
}

#[test]
fn pack_without_index_is_ignored_and_its_blocks_are_missing() {
    let (store, master, repo) = mem_repo(small_packs());
    let blocks = vec![page(1, 8192), page(2, 8192)];
    let (ids, _) = add_all(&repo, &blocks);
    // a crash between writing the pack and writing its index
    for k in keys(store.as_ref(), "index/") {
        store.delete(&k).unwrap();
    }
    let again = reopen(&store, &master);
    assert_eq!(again.block_count().unwrap(), 0);
    assert!(!again.has_block(&ids[0]).unwrap());
    assert!(matches!(
        again.read_block(&ids[0]).unwrap_err(),
        Error::BlockNotFound { .. }
    ));
    // the next writer stores the blocks again, in a new pack
    let (_, stats) = add_all(&again, &blocks);
    assert_eq!(stats.blocks_added, 2);
    assert_eq!(keys(store.as_ref(), "packs/").len(), 2);
    assert_eq!(again.read_block(&ids[1]).unwrap(), blocks[1]);
}

#[test]
fn verify_reports_a_file_whose_blocks_do_not_cover_its_size() {
    let (_store, _master, repo) = mem_repo(small_packs());
    let blocks = vec![page(1, 8192), page(2, 100)];
    let (ids, _) = add_all(&repo, &blocks);
    let list = repo.put_blocklist(&ids).unwrap();
    let m = Manifest {
        domain: Domain::legacy(),
        cluster: "c1".into(),
        backup_id: backup_id(11),
        metadata: json!({}),
        files: vec![FileEntry {
            path: "base/1/2".into(),
            size: 8192 * 2 + 100,
            mode: 0o600,
            mtime: 0,
            kind: FileKind::Blocks {
                block_size: 8192,
                blocklists: vec![list],
            },
        }],
    };
    repo.put_manifest(&m).unwrap();
    let report = repo.verify("c1", &backup_id(11)).unwrap();
    let details: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        details.iter().any(|d| d.contains("needs block")),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.contains("needs 3 blocks")),
        "{details:?}"
    );
}

// ---------------------------------------------------------------------------------------
// opening, keys, stores

#[test]
fn wrong_master_key_is_a_clear_error() {
    let (store, master, _repo) = mem_repo(small_packs());
    let other = MasterKey::generate();
    let err = Repository::open(store.clone(), other.clone(), small_packs()).unwrap_err();
    assert!(matches!(err, Error::WrongKey { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&master.key_id()) && msg.contains(&other.key_id()),
        "{msg}"
    );
    assert!(msg.contains("\nHINT: "), "{msg}");
    // open_or_init must not "repair" it either
    assert!(Repository::open_or_init(store, other, small_packs()).is_err());
}

#[test]
fn open_requires_a_repository_and_init_requires_an_empty_store() {
    let store = Arc::new(MemStore::new());
    let master = MasterKey::generate();
    let err = Repository::open(store.clone(), master.clone(), small_packs()).unwrap_err();
    assert!(matches!(err, Error::NotARepository { .. }), "{err}");

    store.put("keys.json", b"{}").unwrap();
    let a = Repository::open_or_init(store.clone(), master.clone(), small_packs()).unwrap();
    let b = Repository::open_or_init(store.clone(), master.clone(), small_packs()).unwrap();
    assert_eq!(a.repository_id(), b.repository_id());
    assert_eq!(a.block_id(b"x"), b.block_id(b"x"));

    let other = Arc::new(MemStore::new());
    other.put("base/1/1", b"not a repository").unwrap();
    let err = Repository::open_or_init(other, master, small_packs()).unwrap_err();
    assert!(matches!(err, Error::NotEmpty { .. }), "{err}");
}

#[test]
fn invalid_options_are_refused() {
    let store = Arc::new(MemStore::new());
    for options in [
        RepositoryOptions {
            compression_level: Some(23),
            pack_target_size: 1 << 20,
            index_cache: None,
        },
        RepositoryOptions {
            compression_level: None,
            pack_target_size: 0,
            index_cache: None,
        },
    ] {
        let err =
            Repository::open_or_init(store.clone(), MasterKey::generate(), options).unwrap_err();
        assert!(matches!(err, Error::InvalidOption { .. }), "{err}");
    }
}

#[test]
fn config_is_plain_json_without_secrets_in_clear() {
    let (store, master, repo) = mem_repo(small_packs());
    let raw = store.get("config").unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(v["format"], "klio-repository/1");
    assert_eq!(v["key_id"], master.key_id());
    assert_eq!(v["repository_id"], repo.repository_id());
    assert!(
        v["secrets"]
            .as_str()
            .unwrap()
            .starts_with(&hex::encode("KLIOSEAL"))
    );
}

#[test]
fn local_store_refuses_invalid_keys() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStore::open(&dir.path().join("repo")).unwrap();
    for bad in [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a//b",
        "a/./b",
        "a/",
        ".hidden",
        "a/.x.klio-tmp",
        "a b",
        "a\\b",
        "ä",
    ] {
        let err = s.put(bad, b"x").unwrap_err();
        assert!(matches!(err, Error::InvalidKey { .. }), "{bad}: {err}");
        assert!(s.get(bad).is_err() && s.exists(bad).is_err(), "{bad}");
        assert!(
            s.delete(bad).is_err() && s.get_range(bad, 0, 1).is_err(),
            "{bad}"
        );
    }
    assert!(s.list("../").is_err());
    assert!(s.list("/").is_err());
    assert!(!dir.path().join("x").exists());
}

#[test]
fn local_and_memory_stores_behave_alike() {
    crate::testing::exercise_store(&MemStore::new());
    let dir = tempfile::tempdir().unwrap();
    crate::testing::exercise_store(&LocalStore::open(dir.path()).unwrap());
}

#[test]
fn local_store_listing_ignores_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStore::open(dir.path()).unwrap();
    s.put("index/a", b"x").unwrap();
    std::fs::write(dir.path().join("index/.b.1.2.klio-tmp"), b"torn").unwrap();
    assert_eq!(s.list("index/").unwrap(), vec!["index/a".to_string()]);
    let names: Vec<_> = std::fs::read_dir(dir.path().join("index"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "put leaves no temporary file: {names:?}");
}

#[test]
fn local_repository_reopens_with_everything_written() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let master = MasterKey::generate();
    let files = sample_files(8);
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(&root).unwrap());
    let repo = Repository::open_or_init(store, master.clone(), small_packs()).unwrap();
    backup(&repo, "c1", &backup_id(12), &files, 8192);
    backup(&repo, "c2", &backup_id(13), &sample_files(20), 4096);
    let count = repo.block_count().unwrap();
    drop(repo);

    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(&root).unwrap());
    let repo = Repository::open(store, master.clone(), small_packs()).unwrap();
    assert_eq!(repo.block_count().unwrap(), count);
    assert_eq!(
        repo.list_clusters().unwrap(),
        vec!["c1".to_string(), "c2".to_string()]
    );
    let m = repo.get_manifest("c1", &backup_id(12)).unwrap();
    for (path, data) in &files {
        let f = m.files.iter().find(|f| f.path == *path).unwrap();
        assert_eq!(&crate::testing::read_file(&repo, f), data, "{path}");
    }
    for (c, id) in [("c1", backup_id(12)), ("c2", backup_id(13))] {
        let report = repo.verify(c, &id).unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
    }

    // damage on disk: flip a byte of a pack file
    let packs = repo.store().list("packs/").unwrap();
    let path = root.join(&packs[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let bad: Vec<_> = [("c1", backup_id(12)), ("c2", backup_id(13))]
        .iter()
        .flat_map(|(c, id)| repo.verify(c, id).unwrap().problems)
        .collect();
    assert!(!bad.is_empty());
    assert!(bad.iter().all(|p| p.object == packs[0]), "{bad:?}");
}

/// The per-block costs docs/formats/repository.md quotes (printed with --nocapture).
#[test]
fn storage_costs_per_block_stay_as_documented() {
    let (store, _master, repo) = mem_repo(RepositoryOptions::default());
    let mut rng = Rng(7);
    let n = 4096;
    let blocks: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            // half-filled heap pages: a header, random tuples, zeroed free space
            let mut p = vec![0u8; 8192];
            let fill = rng.bytes(4096);
            p[8192 - 4096..].copy_from_slice(&fill);
            p[..8].copy_from_slice(&(i as u64).to_be_bytes());
            p
        })
        .collect();
    let (ids, stats) = add_all(&repo, &blocks);
    let lists: Vec<BlocklistId> = ids
        .chunks(4096)
        .map(|c| repo.put_blocklist(c).unwrap())
        .collect();
    let list_bytes: usize = keys(store.as_ref(), "blocklists/")
        .iter()
        .map(|k| store.get(k).unwrap().unwrap().len())
        .sum();
    let payload: u64 = ids
        .iter()
        .map(|id| u64::from(repo.locate(id).unwrap().unwrap().loc.len))
        .sum();
    println!(
        "{n} blocks: pack bytes {} (frames {payload}, {:.1} bytes/block beyond frames), \
         index bytes {} ({:.1}/block), blocklists {} bytes ({:.1}/block, {} lists)",
        stats.pack_bytes,
        (stats.pack_bytes - payload) as f64 / n as f64,
        stats.index_bytes,
        stats.index_bytes as f64 / n as f64,
        list_bytes,
        list_bytes as f64 / n as f64,
        lists.len(),
    );
    assert!(
        (stats.pack_bytes - payload) as f64 / n as f64 <= 46.0,
        "frame overhead per block"
    );
    assert!(
        stats.index_bytes as f64 / n as f64 <= 44.0,
        "index bytes per block"
    );
    assert!(
        list_bytes as f64 / n as f64 <= 33.0,
        "blocklist bytes per block"
    );
}

#[test]
fn handles_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Repository>();
    send::<PackWriter>();
    send_sync::<LocalStore>();
    send_sync::<MemStore>();
}

#[test]
fn pack_writers_on_several_threads_share_the_index() {
    let (store, master, repo) = mem_repo(small_packs());
    let blocks: Vec<Vec<u8>> = (0..40).map(|i| page(i % 20, 8192)).collect();
    std::thread::scope(|s| {
        for part in blocks.chunks(10) {
            let repo = repo.clone();
            s.spawn(move || add_all(&repo, part));
        }
    });
    let again = reopen(&store, &master);
    assert_eq!(again.block_count().unwrap(), 20);
    for b in &blocks {
        assert_eq!(&again.read_block(&again.block_id(b)).unwrap(), b);
    }
}

#[test]
fn manifest_json_has_the_documented_shape() {
    let m = Manifest {
        domain: Domain::legacy(),
        cluster: "orders-db".into(),
        backup_id: backup_id(0),
        metadata: json!({"timeline": 1}),
        files: vec![
            FileEntry {
                path: "base".into(),
                size: 0,
                mode: 0o700,
                mtime: 5,
                kind: FileKind::Directory,
            },
            FileEntry {
                path: "base/5/16384".into(),
                size: 24576,
                mode: 0o600,
                mtime: 6,
                kind: FileKind::Blocks {
                    block_size: 8192,
                    blocklists: vec![BlocklistId([0xab; 32])],
                },
            },
            FileEntry {
                path: "PG_VERSION".into(),
                size: 3,
                mode: 0o600,
                mtime: 7,
                kind: FileKind::Whole {
                    block: BlockId([0xcd; 16]),
                },
            },
            FileEntry {
                path: "pg_tblspc/16385".into(),
                size: 0,
                mode: 0o777,
                mtime: 8,
                kind: FileKind::Symlink {
                    target: "/mnt/ts1".into(),
                },
            },
        ],
    };
    let v: serde_json::Value = serde_json::from_slice(&m.encode().unwrap()).unwrap();
    assert_eq!(
        v,
        json!({
            "format": "klio-manifest/1",
            "cluster": "orders-db",
            "backup_id": "backup-20250314093000",
            "metadata": {"timeline": 1},
            "files": [
                {"path": "base", "type": "directory", "size": 0, "mode": 448, "mtime": 5},
                {"path": "base/5/16384", "type": "blocks", "size": 24576, "mode": 384,
                 "mtime": 6, "block_size": 8192, "blocklists": ["ab".repeat(32)]},
                {"path": "PG_VERSION", "type": "whole", "size": 3, "mode": 384, "mtime": 7,
                 "block": "cd".repeat(16)},
                {"path": "pg_tblspc/16385", "type": "symlink", "size": 0, "mode": 511,
                 "mtime": 8, "target": "/mnt/ts1"}
            ]
        })
    );
    let back = Manifest::decode(&serde_json::to_vec(&v).unwrap(), "m").unwrap();
    assert_eq!(back, m);
    let mut unknown = v.clone();
    unknown["extra"] = json!(1);
    assert!(Manifest::decode(&serde_json::to_vec(&unknown).unwrap(), "m").is_err());
}

#[test]
fn clusters_are_listed_sorted_once_each() {
    let (_store, _master, repo) = mem_repo(small_packs());
    for (cluster, n) in [("c1", 20), ("c1.x", 21), ("c1", 22), ("a", 23)] {
        let m = Manifest {
            domain: Domain::legacy(),
            cluster: cluster.into(),
            backup_id: backup_id(n),
            metadata: json!({}),
            files: vec![],
        };
        repo.put_manifest(&m).unwrap();
    }
    assert_eq!(repo.list_clusters().unwrap(), vec!["a", "c1", "c1.x"]);
    assert_eq!(
        repo.list_manifests("c1").unwrap(),
        vec![backup_id(20), backup_id(22)]
    );
}

// ---------------------------------------------------------------------------------------
// garbage collection

#[test]
fn gc_deletes_what_only_deleted_backups_needed_and_keeps_the_rest() {
    let (store, master, repo) = mem_repo(small_packs());
    let old = backup(&repo, "c1", &backup_id(1), &sample_files(1), 8192);
    let kept = backup(&repo, "c1", &backup_id(2), &sample_files(500), 8192);
    let other = backup(&repo, "c2", &backup_id(1), &sample_files(1), 8192);
    // Blocks written by a backup still in progress: protected, not in any manifest.
    let (in_progress, _) = add_all(&repo, &[page(999, 8192)]);
    // A pack a crashed writer left without its index.
    store
        .put(
            "packs/ab/ab00000000000000000000000000000000000000000000000000000000000000",
            b"x",
        )
        .unwrap();

    let protected: std::collections::HashSet<BlockId> = in_progress.iter().copied().collect();
    let nothing = repo.gc_plan(&protected).unwrap();
    assert!(nothing.dead_packs.is_empty(), "{nothing:?}");
    assert_eq!(nothing.unindexed_packs.len(), 1, "{nothing:?}");

    repo.delete_backup("c1", &old.backup_id).unwrap();
    // c2 still needs the same content as the deleted backup: nothing of it may go.
    let plan = repo.gc_plan(&protected).unwrap();
    assert!(
        plan.dead_packs.is_empty(),
        "c2 shares every block: {plan:?}"
    );
    repo.delete_backup("c2", &other.backup_id).unwrap();
    let packs_before = keys(store.as_ref(), "packs/").len();
    let plan = repo.gc_plan(&protected).unwrap();
    assert!(
        !plan.dead_packs.is_empty() || !plan.repack.is_empty(),
        "{plan:?}"
    );
    assert!(!plan.dead_blocklists.is_empty(), "{plan:?}");
    assert!(plan.reclaimable_bytes > 0);
    let gone = repo.block_id(&page(1, 8192));
    assert!(repo.has_block(&gone).unwrap());
    let report = repo.gc_execute(&plan).unwrap();
    assert!(
        !repo.has_block(&gone).unwrap(),
        "a collected block must not count as stored (a backup would dedup against it)"
    );
    assert!(!reopen(&store, &master).has_block(&gone).unwrap());
    assert_eq!(report.packs_deleted, plan.dead_packs.len() + 1);
    assert_eq!(report.packs_rewritten, plan.repack.len());
    let _ = packs_before;
    assert!(report.bytes_reclaimed > 0, "{report:?}");

    // The kept backup is whole, in this handle and after reopening; the protected block too.
    for r in [&repo, &reopen(&store, &master)] {
        let report = r.verify("c1", &kept.backup_id).unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
        for f in &kept.files {
            if let FileKind::Blocks { .. } | FileKind::Whole { .. } = f.kind {
                let want = &sample_files(500)
                    .into_iter()
                    .find(|(p, _)| *p == f.path)
                    .unwrap()
                    .1;
                assert_eq!(&crate::testing::read_file(r, f), want, "{}", f.path);
            }
        }
        assert_eq!(r.read_block(&in_progress[0]).unwrap(), page(999, 8192));
    }
    // A second collection finds nothing more to do.
    let again = repo.gc_plan(&protected).unwrap();
    assert!(
        again.dead_packs.is_empty() && again.unindexed_packs.is_empty(),
        "{again:?}"
    );
    assert!(again.repack.is_empty(), "{again:?}");
    assert!(again.dead_blocklists.is_empty(), "{again:?}");
    // Without the protection, the in-progress block's pack is garbage.
    let unprotected = repo.gc_plan(&Default::default()).unwrap();
    assert_eq!(
        unprotected.dead_packs.len() + unprotected.repack.len(),
        1,
        "{unprotected:?}"
    );
}

#[test]
fn gc_is_due_only_when_something_may_have_become_garbage() {
    let hour = std::time::Duration::from_secs(3600);
    let dir = tempfile::tempdir().unwrap();
    let options = RepositoryOptions {
        index_cache: Some(dir.path().join("index.redb")),
        ..small_packs()
    };
    let store = Arc::new(MemStore::new());
    let master = MasterKey::generate();
    let open = || Repository::open(store.clone(), master.clone(), options.clone()).unwrap();
    let collect = |repo: &Repository| {
        let plan = repo.gc_plan(&Default::default()).unwrap();
        repo.gc_execute(&plan).unwrap();
    };
    // A new repository holds nothing to collect, also when opened again.
    let repo = Repository::open_or_init(store.clone(), master.clone(), options.clone()).unwrap();
    assert!(!repo.gc_due(hour));
    drop(repo);
    let repo = open();
    assert!(!repo.gc_due(hour));
    // A committed backup leaves no garbage; the age limit still applies.
    let first = backup(&repo, "c1", &backup_id(1), &sample_files(1), 8192);
    assert!(!repo.gc_due(hour));
    assert!(repo.gc_due(std::time::Duration::ZERO));
    // But a restart cannot know whether a write was interrupted: due until collected.
    drop(repo);
    let repo = open();
    assert!(repo.gc_due(hour));
    collect(&repo);
    assert!(!repo.gc_due(hour));
    drop(repo);
    let repo = open();
    assert!(
        !repo.gc_due(hour),
        "a collection with nothing half-way is recorded"
    );
    // A writer dropped after writing packs, without finishing: those packs are garbage.
    let mut w = repo.pack_writer();
    for n in 0..64 {
        let b = page(5000 + n, 8192);
        w.add_block(&repo.block_id(&b), &b).unwrap();
    }
    assert!(!repo.gc_due(hour), "nothing is lost while the writer lives");
    // A collection while it is half-way is not recorded as leaving no garbage.
    collect(&repo);
    drop(w);
    assert!(repo.gc_due(hour));
    let other = open();
    assert!(other.gc_due(hour));
    drop(other);
    collect(&repo);
    assert!(!repo.gc_due(hour));
    // A writer that finishes, or never wrote anything, leaves none.
    add_all(&repo, &[page(6000, 8192)]);
    drop(repo.pack_writer());
    assert!(!repo.gc_due(hour));
    // A deleted backup; another handle on the same repository shares the knowledge.
    repo.in_domain(&Domain::legacy())
        .unwrap()
        .delete_backup("c1", &first.backup_id)
        .unwrap();
    assert!(repo.gc_due(hour));
    collect(&repo);
    assert!(!repo.gc_due(hour));
    // What the caller reports (a session that ended without its manifest).
    repo.note_garbage();
    assert!(repo.gc_due(hour));
    // Whatever happens while a plan is made counts for the next collection.
    let plan = repo.gc_plan(&Default::default()).unwrap();
    repo.note_garbage();
    repo.gc_execute(&plan).unwrap();
    assert!(repo.gc_due(hour));
    drop(repo);
    assert!(open().gc_due(hour));
    // A cache that never saw a collection (lost, rebuilt) knows nothing either.
    let (_store, _master, fresh) = mem_repo(small_packs());
    backup(&fresh, "c1", &backup_id(1), &sample_files(1), 8192);
    collect(&fresh);
    drop(fresh);
    assert!(reopen(&_store, &_master).gc_due(hour));
}

#[test]
fn gc_stops_on_an_unreadable_manifest() {
    let (store, _master, repo) = mem_repo(small_packs());
    let m = backup(&repo, "c1", &backup_id(1), &sample_files(1), 8192);
    flip(&store, &format!("manifests/c1/{}", m.backup_id), 60);
    let err = repo.gc_plan(&Default::default()).unwrap_err();
    assert!(err.to_string().contains("manifests/c1/"), "{err}");
}

#[test]
fn a_mirror_created_with_the_id_key_gives_blocks_the_same_ids() {
    let (_, _, first) = mem_repo(small_packs());
    let mirror_store: Arc<dyn ObjectStore> = Arc::new(MemStore::new());
    // The mirror has its own master key (Tier 2 may use another passphrase).
    let mirror = Repository::open_or_init_with_id_key(
        mirror_store.clone(),
        MasterKey::generate(),
        small_packs(),
        Some(first.id_key()),
    )
    .unwrap();
    let p = page(7, 8192);
    assert_eq!(first.block_id(&p), mirror.block_id(&p));
    assert_ne!(first.repository_id(), mirror.repository_id());

    // A repository with another id key is refused as a mirror, naming where it is.
    let (_, _, other) = mem_repo(small_packs());
    let other_store: Arc<dyn ObjectStore> = Arc::new(MemStore::new());
    let master = MasterKey::generate();
    Repository::open_or_init(other_store.clone(), master.clone(), small_packs()).unwrap();
    let err = Repository::open_or_init_with_id_key(
        other_store,
        master,
        small_packs(),
        Some(other.id_key()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::IdKeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("memory"), "{err}");
}

#[test]
fn domains_isolate_blocks_blocklists_and_manifests() {
    let (store, master, legacy) = mem_repo(small_packs());
    let a = legacy.in_domain(&Domain::cluster("a").unwrap()).unwrap();
    let b = legacy.in_domain(&Domain::cluster("b").unwrap()).unwrap();
    let data = page(7, 8192);
    assert_ne!(
        a.block_id(&data),
        b.block_id(&data),
        "ids are keyed per domain"
    );
    assert_ne!(a.block_id(&data), legacy.block_id(&data));
    let m = backup(&a, "a", &backup_id(1), &sample_files(1), 8192);
    assert_eq!(m.domain, Domain::cluster("a").unwrap());

    // Nothing of a's is visible through b or the legacy domain, even by a's own ids.
    let again = reopen(&store, &master);
    let (a2, b2) = (
        again.in_domain(&Domain::cluster("a").unwrap()).unwrap(),
        again.in_domain(&Domain::cluster("b").unwrap()).unwrap(),
    );
    let got = again.get_manifest("a", &backup_id(1)).unwrap();
    assert_eq!(got.domain, m.domain, "the manifest records its domain");
    for f in &got.files {
        match &f.kind {
            FileKind::Whole { block } => {
                assert!(a2.has_block(block).unwrap());
                assert!(!b2.has_block(block).unwrap());
                assert!(!again.has_block(block).unwrap());
                assert!(matches!(
                    b2.read_block(block),
                    Err(Error::BlockNotFound { .. })
                ));
            }
            FileKind::Blocks { blocklists, .. } => {
                for l in blocklists {
                    assert!(a2.get_blocklist(l).is_ok());
                    assert!(b2.get_blocklist(l).is_err(), "another domain's blocklist");
                }
            }
            _ => {}
        }
    }
    assert!(
        again
            .verify("a", &backup_id(1))
            .unwrap()
            .problems
            .is_empty()
    );
    // A manifest of one domain cannot be written through another's handle.
    let mut foreign = got.clone();
    foreign.backup_id = backup_id(2);
    let err = b2.put_manifest(&foreign).unwrap_err();
    assert!(matches!(err, Error::InvalidManifest { .. }), "{err}");
    // b cannot list a's blocks in its own manifest either.
    foreign.domain = b2.domain().clone();
    let err = b2.put_manifest(&foreign).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnstoredBlock { .. } | Error::BlocklistNotFound(_)
        ),
        "{err}"
    );
}

#[test]
fn repository_written_before_domains_still_restores() {
    // A repository of the previous format: legacy domain, version 1 index objects (with
    // 32-byte ids), manifests without a domain.
    let (store, master, legacy) = mem_repo(small_packs());
    let files = sample_files(4);
    backup(&legacy, "old", &backup_id(3), &files, 8192);
    for k in keys(store.as_ref(), "index/") {
        let (_, plain) =
            klio_crypto::open_object(&master, &k, &store.get(&k).unwrap().unwrap()).unwrap();
        let sections = index::decode(&plain, &k).unwrap();
        assert!(sections.iter().all(|s| s.domain.is_legacy()));
        let v1 = index::encode_legacy(&sections, 1, 0x5a);
        let sealed =
            klio_crypto::seal_object(&master, klio_crypto::ObjectKind::Blob, &k, &v1, None);
        store.delete(&k).unwrap();
        store.put(&k, &sealed).unwrap();
    }
    let m = keys(store.as_ref(), "manifests/").remove(0);
    let (_, plain) = klio_crypto::open_object(
        &master,
        "manifest/old/backup-20250314093003",
        &store.get(&m).unwrap().unwrap(),
    )
    .unwrap();
    assert!(!String::from_utf8_lossy(&plain).contains("\"domain\""));

    let again = reopen(&store, &master);
    let got = again.get_manifest("old", &backup_id(3)).unwrap();
    assert!(got.domain.is_legacy());
    let repo = again.in_domain(&got.domain).unwrap();
    for (path, data) in &files {
        let f = got.files.iter().find(|f| f.path == *path).unwrap();
        assert_eq!(&crate::testing::read_file(&repo, f), data, "{path}");
    }
    assert!(
        again
            .verify("old", &backup_id(3))
            .unwrap()
            .problems
            .is_empty()
    );
    // The cluster's own domain starts empty: its first backup after the change uploads
    // everything again.
    let own = again.in_domain(&Domain::cluster("old").unwrap()).unwrap();
    let f = got.files.iter().find(|f| f.path == files[0].0).unwrap();
    if let FileKind::Whole { block } = &f.kind {
        assert!(!own.has_block(block).unwrap());
    }
}

#[test]
fn authenticated_payloads_move_between_repositories_as_stored() {
    // A relay: blocks read from one repository's frames are sealed into another with the
    // same id key, without being decompressed; they read back intact there.
    let (_, _, t1) = mem_repo(small_packs());
    let blocks = vec![page(1, 8192), page(2, 8192), vec![9u8; 100]];
    let (ids, _) = add_all(&t1, &blocks);
    let t2 = with_same_ids(&t1);
    let payloads = t1.read_block_payloads(&ids).unwrap();
    assert!(payloads.iter().any(|p| p.compressed), "a page compresses");
    let mut w = t2.pack_writer();
    for p in payloads.clone() {
        let pages = [(p.id, p.inner, p.plain_len)];
        assert_eq!(
            w.add_authenticated_run(&pages, p.frame_len, p.payload.to_vec(), p.compressed)
                .unwrap(),
            1
        );
    }
    // Offered again: deduplicated.
    let p = &payloads[0];
    let pages = [(p.id, p.inner, p.plain_len)];
    assert_eq!(
        w.add_authenticated_run(&pages, p.frame_len, p.payload.to_vec(), p.compressed)
            .unwrap(),
        0
    );
    let stats = w.finish().unwrap();
    assert_eq!(stats.blocks_added, 3);
    assert_eq!(stats.blocks_deduplicated, 1);
    for (id, b) in ids.iter().zip(&blocks) {
        assert_eq!(&t2.read_block(id).unwrap(), b);
    }

    // A payload under another block's id is not checked when sealed, but every read finds
    // that it does not match the id.
    let t3 = with_same_ids(&t1);
    let mut w = t3.pack_writer();
    let lie = &payloads[1];
    let pages = [(ids[0], lie.inner, lie.plain_len)];
    w.add_authenticated_run(&pages, lie.frame_len, lie.payload.to_vec(), lie.compressed)
        .unwrap();
    w.finish().unwrap();
    let err = t3.read_block(&ids[0]).unwrap_err();
    assert!(
        err.to_string().contains("does not match the block id"),
        "{err}"
    );
}

/// A new repository (other store, other master key) whose block ids are `t1`'s: a Tier 2.
fn with_same_ids(t1: &Repository) -> Repository {
    Repository::open_or_init_with_id_key(
        Arc::new(MemStore::new()),
        MasterKey::generate(),
        small_packs(),
        Some(t1.id_key()),
    )
    .unwrap()
}

/// Adds `pages` as runs of `per_run` blocks; returns the ids.
fn add_runs(repo: &Repository, pages: &[Vec<u8>], per_run: usize) -> Vec<BlockId> {
    let ids: Vec<BlockId> = pages.iter().map(|p| repo.block_id(p)).collect();
    let mut w = repo.pack_writer();
    for (n, chunk) in pages.chunks(per_run).enumerate() {
        let run: Vec<(BlockId, u32)> = chunk
            .iter()
            .enumerate()
            .map(|(i, p)| (ids[n * per_run + i], p.len() as u32))
            .collect();
        w.add_run(&run, &chunk.concat(), None).unwrap();
    }
    w.finish().unwrap();
    ids
}

#[test]
fn runs_store_blocks_in_shared_frames_readable_one_by_one() {
    let (store, master, repo) = mem_repo(small_packs());
    let pages: Vec<Vec<u8>> = (0..40).map(|i| page(i, 8192)).collect();
    // One frame per 16 pages: far smaller than one frame per page.
    let ids = add_runs(&repo, &pages, 16);
    let run_bytes: usize = keys(&*store, "packs/")
        .iter()
        .map(|k| store.get(k).unwrap().unwrap().len())
        .sum();
    let (_, _, single) = mem_repo(small_packs());
    add_all(&single, &pages);
    let single_bytes: usize = keys(single.store(), "packs/")
        .iter()
        .map(|k| single.store().get(k).unwrap().unwrap().len())
        .sum();
    assert!(run_bytes < single_bytes, "{run_bytes} vs {single_bytes}");

    for (id, p) in ids.iter().zip(&pages) {
        assert_eq!(&repo.read_block(id).unwrap(), p);
    }
    // Payloads: the blocks of one frame share it; each lies at its offset.
    let payloads = repo.read_block_payloads(&ids).unwrap();
    let frames: std::collections::HashSet<_> = payloads.iter().map(|p| p.frame).collect();
    assert_eq!(frames.len(), 3);
    for (p, page) in payloads.iter().zip(&pages) {
        assert!(!p.is_single());
        let plain = p.frame_plaintext().unwrap();
        let at = p.inner as usize;
        assert_eq!(&plain[at..at + p.plain_len as usize], &page[..]);
    }
    // A repeated block in the same answer is counted and read once.
    let twice = [ids[0], ids[1], ids[0]];
    assert_eq!(
        repo.read_block_payloads_within(&twice, 1 << 20, true)
            .unwrap()
            .len(),
        3
    );

    // After a reopen (index objects of version 3), the same.
    let again = reopen(&store, &master);
    for (id, p) in ids.iter().zip(&pages) {
        assert_eq!(&again.read_block(id).unwrap(), p);
    }
}

#[test]
fn a_run_indexes_only_its_new_blocks_and_checks_every_id() {
    let (_, _, repo) = mem_repo(small_packs());
    let pages: Vec<Vec<u8>> = (0..8).map(|i| page(i, 8192)).collect();
    let ids = add_runs(&repo, &pages[..4], 4);
    // Pages 0..4 are stored; a run of 0..8 with page 5 named twice stores 4..8 once each.
    let mut run: Vec<(BlockId, u32)> = pages.iter().map(|p| (repo.block_id(p), 8192)).collect();
    let mut plain = pages.concat();
    run.push(run[5]);
    plain.extend_from_slice(&pages[5]);
    let mut w = repo.pack_writer();
    assert_eq!(w.add_run(&run, &plain, None).unwrap(), 4);
    // Nothing new: no frame written.
    assert_eq!(w.add_run(&run, &plain, None).unwrap(), 0);
    let stats = w.finish().unwrap();
    assert_eq!(stats.blocks_added, 4);
    for (id, p) in run.iter().zip(pages.iter()) {
        assert_eq!(&repo.read_block(&id.0).unwrap(), p);
    }
    assert_eq!(ids[0], run[0].0);

    // A wrong id anywhere in the run, or lengths that do not add up, are refused.
    let mut w = repo.pack_writer();
    let mut lie = run[..2].to_vec();
    lie[1].0 = lie[0].0;
    let err = w.add_run(&lie, &pages[..2].concat(), None).unwrap_err();
    assert!(matches!(err, Error::BlockIdMismatch { .. }), "{err}");
    let err = w
        .add_run(&[(ids[0], 8192), (ids[1], 100)], &pages[..2].concat(), None)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidRun(_)), "{err}");
    assert_eq!(w.finish().unwrap().blocks_added, 0);
}

#[test]
fn a_flipped_byte_in_a_run_frame_is_detected_for_each_of_its_blocks() {
    let (store, _, repo) = mem_repo(small_packs());
    let pages: Vec<Vec<u8>> = (0..4).map(|i| page(i, 8192)).collect();
    let ids = add_runs(&repo, &pages, 4);
    let pack = keys(&*store, "packs/").pop().unwrap();
    flip(&store, &pack, 300);
    for id in &ids {
        let err = repo.read_block(id).unwrap_err();
        assert!(matches!(err, Error::BlockCorrupt { .. }), "{err}");
    }
    let files = vec![FileEntry {
        path: "base/1/1".into(),
        size: 4 * 8192,
        mode: 0o600,
        mtime: 0,
        kind: FileKind::Blocks {
            block_size: 8192,
            blocklists: vec![repo.put_blocklist(&ids).unwrap()],
        },
    }];
    let id = backup_id(1);
    repo.put_manifest(&Manifest {
        cluster: "c".into(),
        backup_id: id.clone(),
        metadata: json!({}),
        domain: Domain::legacy(),
        files,
    })
    .unwrap();
    let report = repo.verify("c", &id).unwrap();
    assert_eq!(report.problems.len(), 4, "{:?}", report.problems);
}

#[test]
fn collection_moves_the_live_blocks_of_partly_dead_runs() {
    let (_, _, repo) = mem_repo(small_packs());
    let pages: Vec<Vec<u8>> = (0..32).map(|i| page(i, 8192)).collect();
    let ids = add_runs(&repo, &pages, 16);
    // Only every fourth page stays alive (a protected set stands for a backup).
    let live: std::collections::HashSet<BlockId> = ids.iter().step_by(4).copied().collect();
    let plan = repo.gc_plan(&live).unwrap();
    assert_eq!(plan.live_blocks, 8);
    let report = repo.gc_execute(&plan).unwrap();
    assert_eq!(report.blocks_moved, 8, "{report:?}");
    for (i, (id, p)) in ids.iter().zip(&pages).enumerate() {
        if i % 4 == 0 {
            assert_eq!(&repo.read_block(id).unwrap(), p);
        } else {
            assert!(!repo.has_block(id).unwrap());
        }
    }
}

#[test]
fn authenticated_runs_move_between_repositories_as_stored() {
    let (_, _, t1) = mem_repo(small_packs());
    let pages: Vec<Vec<u8>> = (0..10).map(|i| page(i, 8192)).collect();
    let ids = add_runs(&t1, &pages, 10);
    let t2 = with_same_ids(&t1);
    // Only some blocks of the frame are wanted in t2: only those are indexed there.
    let want = [ids[2], ids[3], ids[7]];
    let payloads = t1.read_block_payloads(&want).unwrap();
    let p = &payloads[0];
    let pages_in: Vec<(BlockId, u32, u32)> = payloads
        .iter()
        .map(|p| (p.id, p.inner, p.plain_len))
        .collect();
    let mut w = t2.pack_writer();
    let n = w
        .add_authenticated_run(&pages_in, p.frame_len, p.payload.to_vec(), p.compressed)
        .unwrap();
    assert_eq!(n, 3);
    w.finish().unwrap();
    for id in &want {
        let i = ids.iter().position(|x| x == id).unwrap();
        assert_eq!(t2.read_block(id).unwrap(), pages[i]);
    }
    assert!(!t2.has_block(&ids[0]).unwrap());
    // Blocks out of order or beyond the frame are refused.
    let mut w = t2.pack_writer();
    let bad = [(ids[3], pages_in[1].1, 8192), (ids[2], pages_in[0].1, 8192)];
    assert!(
        w.add_authenticated_run(&bad, p.frame_len, p.payload.to_vec(), p.compressed)
            .is_err()
    );
    let beyond = [(ids[2], p.frame_len - 100, 8192)];
    assert!(
        w.add_authenticated_run(&beyond, p.frame_len, p.payload.to_vec(), p.compressed)
            .is_err()
    );
}

#[test]
fn a_frame_holding_more_than_its_indexed_block_is_indexed_and_read_back() {
    // Pages 1..4 are stored one per frame; a run of 0..4 then indexes only page 0, at the
    // start of a frame that holds four pages.
    let (store, master, repo) = mem_repo(small_packs());
    let pages: Vec<Vec<u8>> = (0..4).map(|i| page(i, 8192)).collect();
    add_all(&repo, &pages[1..]);
    let before = keys(&*store, "index/");
    let run: Vec<(BlockId, u32)> = pages.iter().map(|p| (repo.block_id(p), 8192)).collect();
    let mut w = repo.pack_writer();
    assert_eq!(w.add_run(&run, &pages.concat(), None).unwrap(), 1);
    w.finish().unwrap();
    let new: Vec<String> = keys(&*store, "index/")
        .into_iter()
        .filter(|k| !before.contains(k))
        .collect();
    assert_eq!(new.len(), 1);
    let (_, plain) =
        klio_crypto::open_object(&master, &new[0], &store.get(&new[0]).unwrap().unwrap()).unwrap();
    assert_eq!(&plain[..8], b"KLIOIDX4");
    assert_eq!(
        reopen(&store, &master).read_block(&run[0].0).unwrap(),
        pages[0]
    );
}

#[test]
fn a_file_listed_in_its_manifest_restores_verifies_and_keeps_its_blocks_through_gc() {
    let (store, master, repo) = mem_repo(small_packs());
    // Two whole pages and a last one of 5000 bytes.
    let pages: Vec<Vec<u8>> = (0..3u64)
        .map(|i| page(700 + i, if i == 2 { 5000 } else { 8192 }))
        .collect();
    let (ids, _) = add_all(&repo, &pages);
    let data: Vec<u8> = pages.concat();
    let listed = |blocks: Vec<BlockId>, size: u64| Manifest {
        domain: repo.domain().clone(),
        cluster: "c".into(),
        backup_id: backup_id(40),
        metadata: json!({}),
        files: vec![FileEntry {
            path: "base/5/2619_fsm".into(),
            size,
            mode: 0o600,
            mtime: 1,
            kind: FileKind::Listed {
                block_size: 8192,
                blocks,
            },
        }],
    };
    // The count must match the size; every block must be stored.
    let err = repo
        .put_manifest(&listed(ids[..2].to_vec(), data.len() as u64))
        .unwrap_err();
    assert!(err.to_string().contains("lists 2 blocks"), "{err}");
    let err = repo
        .put_manifest(&listed(
            vec![ids[0], ids[1], BlockId([9; 16])],
            data.len() as u64,
        ))
        .unwrap_err();
    assert!(matches!(err, Error::UnstoredBlock { .. }), "{err}");
    let m = listed(ids.clone(), data.len() as u64);
    repo.put_manifest(&m).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&m.encode().unwrap()).unwrap();
    assert_eq!(json["files"][0]["type"], "listed");
    assert_eq!(json["files"][0]["blocks"][0], ids[0].to_hex());

    // Another backup's own pages go with it; the listed file's stay, verify and read back.
    backup(&repo, "c", &backup_id(41), &sample_files(5), 8192);
    repo.delete_backup("c", &backup_id(41)).unwrap();
    let plan = repo.gc_plan(&std::collections::HashSet::new()).unwrap();
    repo.gc_execute(&plan).unwrap();
    let again = reopen(&store, &master);
    let got = again.get_manifest("c", &backup_id(40)).unwrap();
    assert_eq!(got, m);
    assert_eq!(crate::testing::read_file(&again, &got.files[0]), data);
    let report = again.verify("c", &backup_id(40)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.blocks, 3);
}
