//! The base-backup service speaks for itself: a real `klio server`, a gRPC client with real
//! certificates, and uploads that lie. The server must recompute every block id, refuse a
//! manifest that names a block it does not hold, and keep sessions to their cluster.

#![allow(clippy::unwrap_used)]

mod common;

use common::Klio;
use klio_proto::backup::v1::{self as pb, backup_client::BackupClient};
use tonic::transport::Channel;

async fn connect(k: &Klio, cluster: &str, stem: &str) -> BackupClient<Channel> {
    let _ = cluster;
    BackupClient::new(k.grpc_channel(k.base_port, stem).await)
}

fn file(path: &str, data_len: u64, ids: &[[u8; 32]], block_size: u32) -> pb::FileEntry {
    pb::FileEntry {
        path: path.into(),
        size: data_len,
        mode: 0o600,
        mtime: 0,
        kind: pb::file_entry::Kind::File as i32,
        block_size,
        block_ids: ids.iter().flatten().copied().collect::<Vec<u8>>().into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn server_recomputes_ids_and_refuses_lies() {
    let k = Klio::start(&["a", "b"]).unwrap();
    let mut c = connect(&k, "a", "client-a").await;
    let begin = c
        .begin(pb::BeginRequest {
            cluster: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        begin.backup_id.starts_with("backup-"),
        "{}",
        begin.backup_id
    );
    let key: [u8; 32] = begin.block_id_key.as_ref().try_into().unwrap();
    let page = vec![7u8; 8192];
    let id = *blake3::keyed_hash(&key, &page).as_bytes();

    // Asked before upload: missing.
    let m = c
        .missing(pb::MissingRequest {
            session_id: begin.session_id.clone(),
            ids: id.to_vec().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.missing.as_ref(), &[1u8]);

    // A block whose content does not match its id is refused.
    let other = vec![8u8; 8192];
    let err = c
        .put_blocks(pb::PutBlocksRequest {
            session_id: begin.session_id.clone(),
            blocks: vec![pb::Block {
                id: id.to_vec().into(),
                plain_len: 8192,
                compressed: false,
                data: other.clone().into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    refused_with(&err, "does not match");

    // Compressed data that decompresses to something else is refused too.
    let lie = zstd::bulk::compress(&other, 1).unwrap();
    let err = c
        .put_blocks(pb::PutBlocksRequest {
            session_id: begin.session_id.clone(),
            blocks: vec![pb::Block {
                id: id.to_vec().into(),
                plain_len: 8192,
                compressed: true,
                data: lie.into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // A manifest naming a block never stored is refused; nothing appears in the catalog.
    commit_is_refused_and_nothing_listed(
        &mut c,
        &begin.session_id,
        "a",
        file("base/1/1234", 8192, &[id], 8192),
    )
    .await;

    // An honest session: the true block, then a commit that names it.
    let begin = c
        .begin(pb::BeginRequest {
            cluster: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let put = c
        .put_blocks(pb::PutBlocksRequest {
            session_id: begin.session_id.clone(),
            blocks: vec![pb::Block {
                id: id.to_vec().into(),
                plain_len: 8192,
                compressed: true,
                data: zstd::bulk::compress(&page, 1).unwrap().into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.blocks_new, 1);
    let m = c
        .missing(pb::MissingRequest {
            session_id: begin.session_id.clone(),
            ids: id.to_vec().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        m.missing.as_ref(),
        &[0u8],
        "a block of this session counts as present"
    );

    // Cluster b's certificate cannot use cluster a's session, nor read a's catalog.
    let mut b = connect(&k, "b", "client-b").await;
    let err = b
        .put_blocks(pb::PutBlocksRequest {
            session_id: begin.session_id.clone(),
            blocks: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = b
        .begin(pb::BeginRequest {
            cluster: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    let committed = c
        .commit(pb::CommitRequest {
            session_id: begin.session_id.clone(),
            metadata_json: br#"{"note": "honest"}"#.to_vec().into(),
            files: vec![file("base/1/1234", 8192, &[id], 8192)],
        })
        .await
        .unwrap()
        .into_inner();
    let meta: serde_json::Value = serde_json::from_slice(&committed.metadata_json).unwrap();
    assert_eq!(meta["note"], "honest");
    assert_eq!(meta["blocks_new"], 1);
    assert!(meta["bytes_new"].as_u64().unwrap() > 0);

    // The block comes back as stored and checks against its id.
    let got = c
        .get_blocks(pb::GetBlocksRequest {
            cluster: "a".into(),
            ids: id.to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let b0 = &got.blocks[0];
    let plain = if b0.compressed {
        zstd::bulk::decompress(&b0.data, b0.plain_len as usize).unwrap()
    } else {
        b0.data.to_vec()
    };
    assert_eq!(plain, page);
    let list = c
        .list(pb::ListRequest {
            cluster: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.backups.len(), 1);
    assert_eq!(list.backups[0].backup_id, begin.backup_id);

    // The session is gone after the commit.
    let err = c
        .put_blocks(pb::PutBlocksRequest {
            session_id: begin.session_id,
            blocks: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
}

/// A commit of `f` is refused (FAILED_PRECONDITION: it names a block the session's domain
/// does not hold) and `cluster` lists no backup.
async fn commit_is_refused_and_nothing_listed(
    c: &mut BackupClient<Channel>,
    session_id: &str,
    cluster: &str,
    f: pb::FileEntry,
) {
    let err = c
        .commit(pb::CommitRequest {
            session_id: session_id.into(),
            metadata_json: b"{}".to_vec().into(),
            files: vec![f],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let list = c
        .list(pb::ListRequest {
            cluster: cluster.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.backups.is_empty(), "{:?}", list.backups);
}

/// `err` is an INVALID_ARGUMENT whose message contains `want`.
fn refused_with(err: &tonic::Status, want: &str) {
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains(want), "{}", err.message());
}

/// Begins a backup of `cluster`; returns the server's answer.
async fn begin_response(c: &mut BackupClient<Channel>, cluster: &str) -> pb::BeginResponse {
    c.begin(pb::BeginRequest {
        cluster: cluster.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// Begins a backup of `cluster`; returns the session id and the block id key.
async fn begin(c: &mut BackupClient<Channel>, cluster: &str) -> (String, [u8; 32]) {
    let b = begin_response(c, cluster).await;
    (b.session_id, b.block_id_key.as_ref().try_into().unwrap())
}

fn raw_block(id: [u8; 32], data: &[u8]) -> pb::Block {
    pb::Block {
        id: id.to_vec().into(),
        plain_len: data.len() as u32,
        compressed: false,
        data: data.to_vec().into(),
        ..Default::default()
    }
}

/// Cluster b stores a small secret file. With cluster a's certificate: `Missing` reports b's
/// block as missing (whether named by b's id or by a's id of the same content), `GetBlocks`
/// cannot read it (nor name b's domain), and a commit that names it is refused. b still
/// reads its block.
#[tokio::test]
async fn tenants_cannot_probe_read_or_reference_each_others_blocks() {
    let k = Klio::start(&["a", "b"]).unwrap();
    let secret = b"password = 4711\n".to_vec();

    let mut b = connect(&k, "b", "client-b").await;
    let (sb, key_b) = begin(&mut b, "b").await;
    let id_b = *blake3::keyed_hash(&key_b, &secret).as_bytes();
    b.put_blocks(pb::PutBlocksRequest {
        session_id: sb.clone(),
        blocks: vec![raw_block(id_b, &secret)],
    })
    .await
    .unwrap();
    b.commit(pb::CommitRequest {
        session_id: sb,
        metadata_json: b"{}".to_vec().into(),
        files: vec![file("secret.conf", secret.len() as u64, &[id_b], 0)],
    })
    .await
    .unwrap();

    let mut a = connect(&k, "a", "client-a").await;
    let (sa, key_a) = begin(&mut a, "a").await;
    assert_ne!(key_a, key_b, "each cluster has its own block id key");
    let id_a = *blake3::keyed_hash(&key_a, &secret).as_bytes();
    let m = a
        .missing(pb::MissingRequest {
            session_id: sa.clone(),
            ids: [id_b, id_a].concat().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.missing.as_ref(), &[1u8, 1], "b's block is invisible to a");

    let err = a
        .get_blocks(pb::GetBlocksRequest {
            cluster: "a".into(),
            ids: id_b.to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("not in the repository"), "{err:?}");
    let err = a
        .get_blocks(pb::GetBlocksRequest {
            cluster: "a".into(),
            ids: id_b.to_vec().into(),
            domain: "cluster/b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    let stolen = file("stolen.conf", secret.len() as u64, &[id_b], 0);
    commit_is_refused_and_nothing_listed(&mut a, &sa, "a", stolen).await;

    let got = b
        .get_blocks(pb::GetBlocksRequest {
            cluster: "b".into(),
            ids: id_b.to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.blocks[0].data.as_ref(), secret.as_slice());
}

/// `--max-backup-sessions 1` and `--max-uncommitted-bytes 100K`: cluster a's second session
/// and the upload that crosses its byte budget are refused with RESOURCE_EXHAUSTED naming
/// the limit; cluster b is unaffected.
#[tokio::test]
async fn capacity_limits_refuse_the_next_session_or_upload_of_that_cluster_only() {
    let k = Klio::start_with(
        &["a", "b"],
        vec![
            "--max-backup-sessions".into(),
            "1".into(),
            "--max-uncommitted-bytes".into(),
            "100K".into(),
        ],
    )
    .unwrap();
    let mut a = connect(&k, "a", "client-a").await;
    let (sa, key_a) = begin(&mut a, "a").await;
    let err = a
        .begin(pb::BeginRequest {
            cluster: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--max-backup-sessions"), "{err:?}");

    let blocks = |key: &[u8; 32], seed: u8| -> Vec<pb::Block> {
        (0..8u8)
            .map(|i| {
                let data = vec![seed.wrapping_add(i); 8192];
                raw_block(*blake3::keyed_hash(key, &data).as_bytes(), &data)
            })
            .collect()
    };
    a.put_blocks(pb::PutBlocksRequest {
        session_id: sa.clone(),
        blocks: blocks(&key_a, 0),
    })
    .await
    .unwrap();
    let err = a
        .put_blocks(pb::PutBlocksRequest {
            session_id: sa.clone(),
            blocks: blocks(&key_a, 100),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--max-uncommitted-bytes"), "{err:?}");

    let mut b = connect(&k, "b", "client-b").await;
    let (sb, key_b) = begin(&mut b, "b").await;
    b.put_blocks(pb::PutBlocksRequest {
        session_id: sb.clone(),
        blocks: blocks(&key_b, 0),
    })
    .await
    .unwrap();
    // A's session ends: a new one may start and its budget is free again.
    a.abort(pb::AbortRequest { session_id: sa }).await.unwrap();
    let (sa2, _) = begin(&mut a, "a").await;
    a.put_blocks(pb::PutBlocksRequest {
        session_id: sa2,
        blocks: blocks(&key_a, 100),
    })
    .await
    .unwrap();
}

/// A session of `cluster` that has stored `content` as a block; returns the session id and
/// the block's id.
async fn session_with_block(
    c: &mut BackupClient<Channel>,
    cluster: &str,
    content: &[u8],
) -> (String, [u8; 32]) {
    let (session, key) = begin(c, cluster).await;
    let id = *blake3::keyed_hash(&key, content).as_bytes();
    c.put_blocks(pb::PutBlocksRequest {
        session_id: session.clone(),
        blocks: vec![raw_block(id, content)],
    })
    .await
    .unwrap();
    (session, id)
}

fn entry(path: &str, kind: pb::file_entry::Kind, target: &str) -> pb::FileEntry {
    pb::FileEntry {
        path: path.into(),
        mode: 0o700,
        kind: kind as i32,
        target: target.into(),
        ..Default::default()
    }
}

/// Manifests that would make a restore write outside its directories never enter the
/// catalog: a symbolic link outside pg_tblspc (with a file below it), an entry under a file,
/// a `..` path, a tablespace location that is not normalized. Each commit is refused with
/// INVALID_ARGUMENT naming the entry, an unsafe entry is refused by AddFiles already, and
/// the catalog stays empty. Setuid bits are dropped from what is stored.
#[tokio::test]
async fn commit_of_unsafe_manifest_is_refused_with_invalid_argument() {
    use pb::file_entry::Kind;
    let k = Klio::start(&["a"]).unwrap();
    let mut c = connect(&k, "a", "client-a").await;
    let content = b"16\n";
    let whole = |path: &str, id: [u8; 32]| file(path, content.len() as u64, &[id], 0);
    type Case = (
        fn([u8; 32]) -> Vec<pb::FileEntry>,
        &'static str,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            |id| {
                vec![
                    entry("a", Kind::Symlink, "/etc"),
                    file("a/passwd", 3, &[id], 0),
                ]
            },
            "{}",
            "lists the symbolic link \"a\": only the tablespace links pg_tblspc/<oid> may be symbolic links",
        ),
        (
            |id| {
                vec![
                    entry("pg_tblspc/16390", Kind::Symlink, "/mnt/ts"),
                    file("base", 3, &[id], 0),
                    file("base/1", 3, &[id], 0),
                ]
            },
            r#"{"tablespaces": [{"oid": 16390, "name": "ts", "location": "/mnt/ts"}]}"#,
            "lists \"base/1\" under the file \"base\"",
        ),
        (
            |id| vec![file("../escape", 3, &[id], 0)],
            "{}",
            "lists \"../escape\", a path with a \"..\" component",
        ),
        (
            |id| vec![file("PG_VERSION", 3, &[id], 0)],
            r#"{"tablespaces": [{"oid": 16390, "name": "ts", "location": "/mnt/../etc"}]}"#,
            "names the location \"/mnt/../etc\" for tablespace 16390: it is not normalized",
        ),
    ];
    for (files, metadata, want) in cases {
        let (session, id) = session_with_block(&mut c, "a", content).await;
        let err = c
            .commit(pb::CommitRequest {
                session_id: session.clone(),
                metadata_json: metadata.as_bytes().to_vec().into(),
                files: files(id),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{want}: {err:?}");
        assert!(
            err.message().starts_with("the manifest of backup backup-")
                && err.message().contains("of cluster \"a\"")
                && err.message().contains(want)
                && err.message().ends_with("refusing to commit it"),
            "want {want:?}, got {}",
            err.message()
        );
        // A refusal of the metadata keeps the session open (to abort); any other ends it.
        let _ = c
            .abort(pb::AbortRequest {
                session_id: session,
            })
            .await;
    }

    // AddFiles refuses an unsafe entry before spooling it.
    let (session, _) = session_with_block(&mut c, "a", content).await;
    let err = c
        .add_files(pb::AddFilesRequest {
            session_id: session.clone(),
            files: vec![entry("etc", Kind::Symlink, "/etc")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("lists the symbolic link \"etc\""),
        "{}",
        err.message()
    );
    c.abort(pb::AbortRequest {
        session_id: session,
    })
    .await
    .unwrap();
    let list = c
        .list(pb::ListRequest {
            cluster: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.backups.is_empty(), "{:?}", list.backups);

    // A setuid file, a sticky directory and a tablespace link are accepted; the stored
    // modes lose the setuid, setgid and sticky bits.
    let (session, id) = session_with_block(&mut c, "a", content).await;
    let mut setuid = whole("PG_VERSION", id);
    setuid.mode = 0o4755;
    let mut sticky = entry("base", Kind::Directory, "");
    sticky.mode = 0o3777;
    c.commit(pb::CommitRequest {
        session_id: session,
        metadata_json: br#"{"tablespaces": [{"oid": 16390, "name": "ts", "location": "/mnt/ts"}]}"#
            .to_vec()
            .into(),
        files: vec![
            setuid,
            sticky,
            entry("pg_tblspc/16390", Kind::Symlink, "/mnt/ts"),
            entry("pg_tblspc/16390/PG_16_202307071", Kind::Directory, ""),
        ],
    })
    .await
    .unwrap();
    let list = c
        .list(pb::ListRequest {
            cluster: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.backups.len(), 1);
    // A client that compares whole 32-byte ids (older than 16-byte ids) is refused.
    let refused = c
        .get_manifest(pb::GetManifestRequest {
            cluster: "a".into(),
            backup_id: list.backups[0].backup_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("16-byte ids"), "{refused:?}");
    let mut stream = c
        .get_manifest(pb::GetManifestRequest {
            cluster: "a".into(),
            backup_id: list.backups[0].backup_id.clone(),
            short_ids: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut modes = std::collections::BTreeMap::new();
    while let Some(m) = stream.message().await.unwrap() {
        for f in m.files {
            modes.insert(f.path, f.mode);
        }
    }
    assert_eq!(modes["PG_VERSION"], 0o755, "{modes:?}");
    assert_eq!(modes["base"], 0o777, "{modes:?}");
}

/// A run: several blocks uploaded as one compressed frame. The server checks every id in
/// it and the lengths; an honest run is stored, read back by a client that reads frames
/// (one frame payload for the run's blocks) and by one that does not (each block alone),
/// and committed.
#[tokio::test]
async fn runs_are_checked_block_by_block_and_read_back_either_way() {
    let k = Klio::start(&["a"]).unwrap();
    let mut c = connect(&k, "a", "client-a").await;
    let b = begin_response(&mut c, "a").await;
    assert!(b.accepts_runs);
    let session = b.session_id.clone();
    let key: [u8; 32] = b.block_id_key.as_ref().try_into().unwrap();
    let pages: Vec<Vec<u8>> = (0..8u8)
        .map(|i| (0..8192).map(|j| (j / 64) as u8 ^ i).collect())
        .collect();
    let ids: Vec<[u8; 32]> = pages
        .iter()
        .map(|p| *blake3::keyed_hash(&key, p).as_bytes())
        .collect();
    let plain = pages.concat();
    let run = |ids: &[[u8; 32]], lens: Vec<u32>, plain: &[u8]| pb::Block {
        plain_len: plain.len() as u32,
        compressed: true,
        data: zstd::bulk::compress(plain, 1).unwrap().into(),
        run_ids: ids.iter().flatten().copied().collect::<Vec<u8>>().into(),
        run_lens: lens,
        ..Default::default()
    };
    let put = |blocks| pb::PutBlocksRequest {
        session_id: session.clone(),
        blocks,
    };

    // One id in the middle of the run does not match its page.
    let mut lying = ids.clone();
    lying[5] = ids[4];
    let err = c
        .put_blocks(put(vec![run(&lying, vec![8192; 8], &plain)]))
        .await
        .unwrap_err();
    refused_with(&err, "does not match");
    // Lengths that do not add up to the run, an empty block, ids without lengths.
    for (lens, ids_given) in [
        (vec![8192; 7], ids.clone()),
        (vec![8192, 0, 8192 * 7], ids.clone()),
        (vec![8192; 8], ids[..7].to_vec()),
    ] {
        let err = c
            .put_blocks(put(vec![run(&ids_given, lens, &plain)]))
            .await
            .unwrap_err();
        refused_with(&err, "run");
    }

    // The honest runs (pages 0..4 and 4..8): all eight blocks are new.
    let put_ok = c
        .put_blocks(put(vec![
            run(&ids[..4], vec![8192; 4], &plain[..4 * 8192]),
            run(&ids[4..], vec![8192; 4], &plain[4 * 8192..]),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put_ok.blocks_new, 8);
    c.commit(pb::CommitRequest {
        session_id: session.clone(),
        metadata_json: b"{}".to_vec().into(),
        files: vec![file("base/1/2", plain.len() as u64, &ids, 8192)],
    })
    .await
    .unwrap();

    // Asked for interleaved (as a restore asks for a file whose pages came from two
    // backups): each frame is sent once, with the first block it holds.
    let order = [0usize, 4, 1, 5, 2, 6, 3, 7];
    for runs in [true, false] {
        let got = c
            .get_blocks(pb::GetBlocksRequest {
                cluster: "a".into(),
                ids: order
                    .iter()
                    .flat_map(|&i| ids[i])
                    .collect::<Vec<u8>>()
                    .into(),
                runs,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.blocks.len(), 8);
        for (n, (b, &i)) in got.blocks.iter().zip(&order).enumerate() {
            let block = if runs {
                assert_eq!(b.frame_block, if n < 2 { 0 } else { (n % 2 + 1) as u32 });
                let carrier = if n < 2 { b } else { &got.blocks[n % 2] };
                let frame = zstd::bulk::decompress(&carrier.data, b.frame_len as usize).unwrap();
                let at = b.frame_offset as usize;
                frame[at..at + b.plain_len as usize].to_vec()
            } else {
                assert_eq!(b.frame_len, 0);
                assert!(!b.compressed);
                b.data.to_vec()
            };
            assert!(block == pages[i], "block {i} with runs={runs}");
        }
    }
}
