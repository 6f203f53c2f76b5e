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
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("does not match"),
        "{}",
        err.message()
    );

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
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // A manifest naming a block never stored is refused; nothing appears in the catalog.
    let err = c
        .commit(pb::CommitRequest {
            session_id: begin.session_id.clone(),
            metadata_json: b"{}".to_vec().into(),
            files: vec![file("base/1/1234", 8192, &[id], 8192)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let list = c
        .list(pb::ListRequest {
            cluster: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.backups.is_empty(), "{:?}", list.backups);

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
