//! A restore does not trust the server. A fake `klio.backup.v1.Backup` service, reached over
//! real mutual TLS, answers with hand-crafted manifests — a symbolic link with a file below
//! it leading out of the data directory, a path with `..`, setuid modes, tablespace
//! locations outside or not normalized, a file too large to be one block — and
//! `restore_data` must write nothing outside its directories, refusing with a message that
//! names the entry.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use klio_client::client::{ClientArgs, Connection};
use klio_client::restore::{RestoreArgs, restore_data};
use klio_proto::backup::v1::{
    self as pb,
    backup_server::{Backup, BackupServer},
};
use tonic::{Request, Response, Status};

const BACKUP_ID: &str = "backup-20260101000000";
const KEY: [u8; 32] = [7; 32];
const CLUSTER: &str = "evil";

/// How the fake server answers `GetBlocks`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Frames {
    /// Each block on its own (frame_len 0).
    Own,
    /// The blocks asked for as one run frame, sent once (honest).
    Run,
    /// As `Run`, but the first block points to a previous frame that was never sent.
    SameFrameFirst,
    /// As `Run`, but the last block lies past the end of the frame.
    BeyondFrame,
    /// As `Run`, but the frame holds the first two blocks in the wrong order.
    Swapped,
}

/// A server that lists one backup with the manifest it was given, and serves its blocks.
#[derive(Clone)]
struct FakeServer {
    metadata: serde_json::Value,
    files: Vec<pb::FileEntry>,
    blocks: Arc<HashMap<[u8; 32], Vec<u8>>>,
    frames: Frames,
}

impl FakeServer {
    fn new() -> FakeServer {
        FakeServer {
            metadata: serde_json::json!({
                "timeline": 1,
                "start_lsn": "0/2000028",
                "end_lsn": "0/2000100",
                "started_at": "2026-01-01T00:00:00Z",
                "stopped_at": "2026-01-01T00:00:01Z",
                "backup_label": "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n",
                "tablespaces": [],
            }),
            files: Vec::new(),
            blocks: Arc::default(),
            frames: Frames::Own,
        }
    }

    /// A file cut into 8 KiB blocks.
    fn paged_file(mut self, path: &str, content: &[u8]) -> FakeServer {
        let mut ids = Vec::new();
        for page in content.chunks(8192) {
            let id = *blake3::keyed_hash(&KEY, page).as_bytes();
            Arc::make_mut(&mut self.blocks).insert(id, page.to_vec());
            ids.extend_from_slice(&id);
        }
        self.files.push(pb::FileEntry {
            path: path.into(),
            size: content.len() as u64,
            mode: 0o600,
            kind: pb::file_entry::Kind::File as i32,
            block_size: 8192,
            block_ids: ids.into(),
            ..Default::default()
        });
        self
    }

    fn tablespace(mut self, oid: u32, name: &str, location: &str) -> FakeServer {
        self.metadata["tablespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"oid": oid, "name": name, "location": location}));
        self
    }

    fn dir(mut self, path: &str, mode: u32) -> FakeServer {
        self.files.push(pb::FileEntry {
            path: path.into(),
            mode,
            kind: pb::file_entry::Kind::Directory as i32,
            ..Default::default()
        });
        self
    }

    fn link(mut self, path: &str, target: &Path) -> FakeServer {
        self.files.push(pb::FileEntry {
            path: path.into(),
            mode: 0o777,
            kind: pb::file_entry::Kind::Symlink as i32,
            target: target.display().to_string(),
            ..Default::default()
        });
        self
    }

    /// A file stored whole, its block served.
    fn file(mut self, path: &str, content: &[u8], mode: u32) -> FakeServer {
        let id = *blake3::keyed_hash(&KEY, content).as_bytes();
        Arc::make_mut(&mut self.blocks).insert(id, content.to_vec());
        self.files.push(pb::FileEntry {
            path: path.into(),
            size: content.len() as u64,
            mode,
            kind: pb::file_entry::Kind::File as i32,
            block_ids: id.to_vec().into(),
            ..Default::default()
        });
        self
    }

    fn entry(mut self, e: pb::FileEntry) -> FakeServer {
        self.files.push(e);
        self
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not served by this fake"))
}

#[tonic::async_trait]
impl Backup for FakeServer {
    async fn begin(
        &self,
        _: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        unimplemented()
    }
    async fn missing(
        &self,
        _: Request<pb::MissingRequest>,
    ) -> Result<Response<pb::MissingResponse>, Status> {
        unimplemented()
    }
    async fn put_blocks(
        &self,
        _: Request<pb::PutBlocksRequest>,
    ) -> Result<Response<pb::PutBlocksResponse>, Status> {
        unimplemented()
    }
    async fn add_files(
        &self,
        _: Request<pb::AddFilesRequest>,
    ) -> Result<Response<pb::AddFilesResponse>, Status> {
        unimplemented()
    }
    async fn commit(
        &self,
        _: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        unimplemented()
    }
    async fn abort(
        &self,
        _: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        unimplemented()
    }

    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        Ok(Response::new(pb::ListResponse {
            backups: vec![pb::BackupSummary {
                backup_id: BACKUP_ID.into(),
                metadata_json: serde_json::to_vec(&self.metadata).unwrap().into(),
                in_tier1: true,
                in_tier2: false,
            }],
        }))
    }

    type GetManifestStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::GetManifestResponse, Status>> + Send>>;

    async fn get_manifest(
        &self,
        _: Request<pb::GetManifestRequest>,
    ) -> Result<Response<Self::GetManifestStream>, Status> {
        let first = pb::GetManifestResponse {
            backup_id: BACKUP_ID.into(),
            metadata_json: serde_json::to_vec(&self.metadata).unwrap().into(),
            files: self.files.clone(),
            block_id_key: KEY.to_vec().into(),
            tier: 1,
            domain: String::new(),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(first)]))))
    }

    async fn get_blocklist(
        &self,
        _: Request<pb::GetBlocklistRequest>,
    ) -> Result<Response<pb::GetBlocklistResponse>, Status> {
        unimplemented()
    }

    async fn get_blocks(
        &self,
        request: Request<pb::GetBlocksRequest>,
    ) -> Result<Response<pb::GetBlocksResponse>, Status> {
        let mut found = Vec::new();
        for id in request.get_ref().ids.chunks(32) {
            let data = self
                .blocks
                .get(id)
                .ok_or_else(|| Status::not_found("no such block"))?;
            found.push((id.to_vec(), data.clone()));
        }
        if self.frames == Frames::Own {
            let blocks = found
                .into_iter()
                .map(|(id, data)| pb::Block {
                    id: id.into(),
                    plain_len: data.len() as u32,
                    compressed: false,
                    data: data.into(),
                    ..Default::default()
                })
                .collect();
            return Ok(Response::new(pb::GetBlocksResponse { blocks }));
        }
        let mut frame: Vec<u8> = found.iter().flat_map(|(_, d)| d.clone()).collect();
        if self.frames == Frames::Swapped && found.len() > 1 {
            let (a, b) = (found[0].1.len(), found[1].1.len());
            frame = [&found[1].1[..], &found[0].1[..], &frame[a + b..]].concat();
        }
        let payload = zstd::bulk::compress(&frame, 1).unwrap();
        let mut blocks = Vec::new();
        let mut offset = 0u32;
        let last = found.len() - 1;
        for (i, (id, data)) in found.into_iter().enumerate() {
            let len = data.len() as u32;
            let first = i == 0 && self.frames != Frames::SameFrameFirst;
            blocks.push(pb::Block {
                id: id.into(),
                plain_len: len,
                compressed: true,
                data: if first {
                    payload.clone().into()
                } else {
                    Default::default()
                },
                frame_offset: if i == last && self.frames == Frames::BeyondFrame {
                    frame.len() as u32 - len / 2
                } else {
                    offset
                },
                frame_len: frame.len() as u32,
                frame_block: if first { 0 } else { 1 },
                ..Default::default()
            });
            offset += len;
        }
        Ok(Response::new(pb::GetBlocksResponse { blocks }))
    }

    async fn verify(
        &self,
        _: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        unimplemented()
    }
    async fn retention(
        &self,
        _: Request<pb::RetentionRequest>,
    ) -> Result<Response<pb::RetentionResponse>, Status> {
        unimplemented()
    }
    async fn gc(&self, _: Request<pb::GcRequest>) -> Result<Response<pb::GcResponse>, Status> {
        unimplemented()
    }
    async fn queue_status(
        &self,
        _: Request<pb::QueueStatusRequest>,
    ) -> Result<Response<pb::QueueStatusResponse>, Status> {
        unimplemented()
    }
    async fn queue_list_failed(
        &self,
        _: Request<pb::QueueListFailedRequest>,
    ) -> Result<Response<pb::QueueListFailedResponse>, Status> {
        unimplemented()
    }
    async fn queue_retry(
        &self,
        _: Request<pb::QueueRetryRequest>,
    ) -> Result<Response<pb::QueueRetryResponse>, Status> {
        unimplemented()
    }
    async fn cluster_status(
        &self,
        _: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        unimplemented()
    }
    async fn list_clusters(
        &self,
        _: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        unimplemented()
    }
}

/// A scratch directory holding the certificates, the data directory to restore (`pgdata`,
/// absent at first) and a directory `outside` with a file that must survive; and the fake
/// server, once it serves.
struct Scene {
    dir: tempfile::TempDir,
    pki: klio_tls::PkiLayout,
    client: Option<ClientArgs>,
}

impl Scene {
    fn new() -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let pki =
            klio_tls::init_dev_pki(&dir.path().join("pki"), &[CLUSTER.to_string()], &[]).unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/precious"), b"keep me").unwrap();
        Scene {
            dir,
            pki,
            client: None,
        }
    }

    /// Serves `fake` over mutual TLS on a free port.
    async fn serve(&mut self, fake: FakeServer) {
        let config = klio_tls::load_server_config(
            &self.pki.server.cert,
            &self.pki.server.key,
            &self.pki.ca.cert,
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let incoming = klio_tls::tls_incoming(listener, config);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(BackupServer::new(fake))
                .serve_with_incoming(incoming),
        );
        let cert = &self.pki.clients[CLUSTER];
        self.client = Some(ClientArgs {
            conn: Connection {
                server_address: "127.0.0.1".into(),
                base_port: port,
                client_cert: cert.cert.clone(),
                client_key: cert.key.clone(),
                server_ca: vec![self.pki.ca.cert.clone()],
                server_name: None,
            },
            wal_port: 1,
            cluster: CLUSTER.into(),
            tier2_backup: false,
            tier2_recovery: false,
        });
    }

    fn pgdata(&self) -> PathBuf {
        self.dir.path().join("pgdata")
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    fn args(&self, delta: bool, tablespace_map: Vec<String>) -> RestoreArgs {
        RestoreArgs {
            tablespace_map,
            delta,
            jobs: 2,
            ..RestoreArgs::new(self.client.clone().expect("serve first"), self.pgdata())
        }
    }

    /// Restores, expecting a refusal; returns its message.
    async fn refused(&self, delta: bool) -> String {
        let err = restore_data(&self.args(delta, Vec::new()))
            .await
            .expect_err("the restore must be refused");
        format!("{err:#}")
    }

    /// `outside` holds only its untouched file, and the scratch directory nothing but
    /// `outside`, `pki` and `pgdata`.
    fn assert_outside_untouched(&self) {
        assert_eq!(names(&self.outside()), ["precious"]);
        assert_eq!(
            std::fs::read(self.outside().join("precious")).unwrap(),
            b"keep me"
        );
        let mut top = names(self.dir.path());
        top.retain(|n| n != "pgdata");
        assert_eq!(top, ["outside", "pki"]);
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

fn assert_contains(text: &str, want: &str) {
    assert!(text.contains(want), "expected {want:?} in:\n{text}");
}

/// The attack itself: a link `a` to a directory outside, then `a/passwd`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_file_under_a_symbolic_link_is_refused_and_nothing_written() {
    let mut scene = Scene::new();
    let fake = FakeServer::new()
        .file("PG_VERSION", b"16\n", 0o600)
        .link("a", &scene.outside())
        .file("a/passwd", b"root::0:0::/:/bin/sh\n", 0o644);
    scene.serve(fake).await;
    let err = scene.refused(false).await;
    assert_contains(
        &err,
        &format!(
            "the manifest of backup {BACKUP_ID} lists \"a/passwd\" under the symbolic link \"a\": refusing to restore it"
        ),
    );
    scene.assert_outside_untouched();
    assert!(!scene.pgdata().exists(), "nothing may be written");
}

/// A link alone, anywhere but pg_tblspc/<oid> (older backups may list one), is not
/// restored: the rest of the backup is, and nothing is written through the link's target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_leaves_out_a_symbolic_link_outside_pg_tblspc() {
    let mut scene = Scene::new();
    let fake = FakeServer::new()
        .file("PG_VERSION", b"16\n", 0o600)
        .link("pg_log", &scene.outside());
    scene.serve(fake).await;
    restore_data(&scene.args(false, Vec::new()))
        .await
        .expect("the rest of the backup is restored");
    assert_eq!(
        std::fs::read(scene.pgdata().join("PG_VERSION")).unwrap(),
        b"16\n"
    );
    assert!(
        std::fs::symlink_metadata(scene.pgdata().join("pg_log")).is_err(),
        "no link is created"
    );
    scene.assert_outside_untouched();
}

/// A tablespace link the metadata gives no location for would be written through (to the
/// target the server names): refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_tablespace_link_without_a_location_is_refused() {
    let mut scene = Scene::new();
    let fake = FakeServer::new()
        .file("PG_VERSION", b"16\n", 0o600)
        .dir("pg_tblspc", 0o700)
        .link("pg_tblspc/16390", &scene.outside())
        .dir("pg_tblspc/16390/PG_16_202307071", 0o700)
        .file("pg_tblspc/16390/PG_16_202307071/evil", b"x", 0o600);
    scene.serve(fake).await;
    let err = scene.refused(false).await;
    assert_contains(
        &err,
        "lists the tablespace link \"pg_tblspc/16390\" but its metadata gives no location for tablespace 16390",
    );
    scene.assert_outside_untouched();
    assert!(!scene.pgdata().exists(), "nothing may be written");
}

/// `..` in a path would leave the data directory: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_path_with_dot_dot_is_refused() {
    let mut scene = Scene::new();
    let fake = FakeServer::new()
        .file("PG_VERSION", b"16\n", 0o600)
        .file("../escape", b"x", 0o600);
    scene.serve(fake).await;
    let err = scene.refused(false).await;
    assert_contains(&err, "lists \"../escape\", a path with a \"..\" component");
    scene.assert_outside_untouched();
    assert!(!scene.pgdata().exists(), "nothing may be written");
}

/// A file "stored whole" of a terabyte: refused before anything is allocated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_file_larger_than_a_block_stored_whole_is_refused() {
    let mut scene = Scene::new();
    let mut big = pb::FileEntry {
        path: "big".into(),
        size: 1 << 40,
        mode: 0o600,
        kind: pb::file_entry::Kind::File as i32,
        block_ids: vec![1u8; 32].into(),
        ..Default::default()
    };
    scene.serve(FakeServer::new().entry(big.clone())).await;
    let err = scene.refused(false).await;
    assert_contains(
        &err,
        "lists the file \"big\" of 1099511627776 bytes stored whole",
    );
    assert!(!scene.pgdata().exists(), "nothing may be written");

    // In blocks: the block count must agree with the size.
    let mut scene = Scene::new();
    big.block_size = 8192;
    scene.serve(FakeServer::new().entry(big)).await;
    let err = scene.refused(false).await;
    assert_contains(&err, "with 1 blocks, not 134217728");
    assert!(!scene.pgdata().exists(), "nothing may be written");
}

/// Setuid, setgid and sticky bits never come back: modes are masked to 0o777.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_modes_lose_setuid_setgid_and_sticky_bits() {
    let mut scene = Scene::new();
    let fake = FakeServer::new()
        .file("PG_VERSION", b"16\n", 0o6755)
        .dir("base", 0o3777)
        .file("base/x", b"data", 0o4700);
    scene.serve(fake).await;
    let restored = restore_data(&scene.args(false, Vec::new())).await.unwrap();
    assert_eq!(restored.backup_id, BACKUP_ID);
    let pgdata = scene.pgdata();
    assert_eq!(mode_of(&pgdata.join("PG_VERSION")), 0o755);
    assert_eq!(mode_of(&pgdata.join("base")), 0o777);
    assert_eq!(mode_of(&pgdata.join("base/x")), 0o700);
    assert_eq!(std::fs::read(pgdata.join("base/x")).unwrap(), b"data");
    scene.assert_outside_untouched();
}

/// A tablespace location that is not normalized (`..`) is refused; mapped by the user, the
/// same tablespace is restored where the user says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_tablespace_location_not_normalized_is_refused_unless_mapped() {
    let mut scene = Scene::new();
    let sneaky = format!("{}/../outside/ts", scene.outside().display());
    let fake = FakeServer::new()
        .tablespace(16390, "ts", &sneaky)
        .file("PG_VERSION", b"16\n", 0o600)
        .dir("pg_tblspc", 0o700)
        .link("pg_tblspc/16390", Path::new(&sneaky))
        .dir("pg_tblspc/16390/PG_16_202307071", 0o700)
        .file("pg_tblspc/16390/PG_16_202307071/16391", b"rows", 0o600);
    scene.serve(fake).await;
    let err = scene.refused(false).await;
    assert_contains(
        &err,
        &format!("names the location \"{sneaky}\" for tablespace 16390: it is not normalized"),
    );
    assert_contains(
        &err,
        "HINT: restore the tablespace elsewhere with --tablespace-map ts=PATH",
    );
    scene.assert_outside_untouched();
    assert!(!scene.pgdata().exists(), "nothing may be written");

    let mapped = scene.dir.path().join("pgdata-ts");
    let args = scene.args(false, vec![format!("ts={}", mapped.display())]);
    restore_data(&args).await.unwrap();
    assert_eq!(
        std::fs::read(mapped.join("PG_16_202307071/16391")).unwrap(),
        b"rows"
    );
    assert_eq!(
        std::fs::read_link(scene.pgdata().join("pg_tblspc/16390")).unwrap(),
        mapped,
        "the link leads to the mapped location, not to the target the manifest names"
    );
    let map = std::fs::read_to_string(scene.pgdata().join("tablespace_map")).unwrap();
    assert_eq!(map, format!("16390 {}\n", mapped.display()));
    assert_eq!(names(&scene.outside()), ["precious"]);
}

/// A tablespace located at or above the data directory is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_tablespace_location_containing_the_data_directory_is_refused() {
    let mut scene = Scene::new();
    let above = scene.dir.path().display().to_string();
    let fake = FakeServer::new()
        .tablespace(16390, "ts", &above)
        .file("PG_VERSION", b"16\n", 0o600)
        .link("pg_tblspc/16390", Path::new(&above));
    scene.serve(fake).await;
    let err = scene.refused(false).await;
    assert_contains(&err, "which is or contains the data directory");
    scene.assert_outside_untouched();
    assert!(!scene.pgdata().exists(), "nothing may be written");
}

/// A delta restore sweeps a tablespace location only when the data directory's own
/// pg_tblspc/<oid> already leads there (or the user mapped it): a location the metadata names
/// elsewhere is refused, and nothing in it is deleted. When it is the cluster's own, only
/// what the backup does not have inside the version directory it lists is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_restore_never_sweeps_a_tablespace_location_that_is_not_the_clusters() {
    let mut scene = Scene::new();
    let outside = scene.outside();
    let fake = FakeServer::new()
        .tablespace(16390, "ts", &outside.display().to_string())
        .file("PG_VERSION", b"16\n", 0o600)
        .dir("pg_tblspc", 0o700)
        .link("pg_tblspc/16390", &outside)
        .dir("pg_tblspc/16390/PG_16_202307071", 0o700)
        .file("pg_tblspc/16390/PG_16_202307071/16391", b"rows", 0o600);
    scene.serve(fake).await;
    // An existing cluster whose pg_tblspc/16390 leads elsewhere.
    let pgdata = scene.pgdata();
    std::fs::create_dir_all(pgdata.join("pg_tblspc")).unwrap();
    std::fs::write(pgdata.join("PG_VERSION"), b"16\n").unwrap();
    let own = scene.dir.path().join("own-ts");
    std::fs::create_dir(&own).unwrap();
    std::os::unix::fs::symlink(&own, pgdata.join("pg_tblspc/16390")).unwrap();
    let err = scene.refused(true).await;
    assert_contains(
        &err,
        &format!(
            "the location of tablespace 16390, \"{}\", is not empty and",
            outside.display()
        ),
    );
    assert_eq!(names(&outside), ["precious"]);
    assert_eq!(
        std::fs::read_link(pgdata.join("pg_tblspc/16390")).unwrap(),
        own,
        "nothing is written when the restore is refused"
    );

    // Now the location is the cluster's own tablespace: the sweep cleans the version
    // directory the backup lists and leaves the rest of the location alone.
    std::fs::remove_file(pgdata.join("pg_tblspc/16390")).unwrap();
    std::fs::remove_dir(&own).unwrap();
    std::os::unix::fs::symlink(&outside, pgdata.join("pg_tblspc/16390")).unwrap();
    std::fs::create_dir(outside.join("PG_16_202307071")).unwrap();
    std::fs::write(outside.join("PG_16_202307071/stale"), b"old").unwrap();
    std::fs::create_dir(outside.join("PG_15_202209061")).unwrap();
    std::fs::write(pgdata.join("stale"), b"old").unwrap();
    restore_data(&scene.args(true, Vec::new())).await.unwrap();
    assert_eq!(
        names(&outside),
        ["PG_15_202209061", "PG_16_202307071", "precious"]
    );
    assert_eq!(names(&outside.join("PG_16_202307071")), ["16391"]);
    assert!(
        !pgdata.join("stale").exists(),
        "the sweep removes what the backup lacks"
    );
    assert_eq!(
        std::fs::read_link(pgdata.join("pg_tblspc/16390")).unwrap(),
        outside
    );
}

/// In a delta restore, a symbolic link the data directory holds where the backup has a
/// directory is replaced by a directory (what it led to is not touched), and the files
/// below are written into the directory, not through the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_restore_does_not_write_through_an_existing_symbolic_link() {
    let mut scene = Scene::new();
    let fake = FakeServer::new()
        .file("PG_VERSION", b"16\n", 0o600)
        .dir("base", 0o700)
        .file("base/precious", b"restored", 0o600);
    scene.serve(fake).await;
    let pgdata = scene.pgdata();
    std::fs::create_dir_all(&pgdata).unwrap();
    std::fs::write(pgdata.join("PG_VERSION"), b"16\n").unwrap();
    std::os::unix::fs::symlink(scene.outside(), pgdata.join("base")).unwrap();
    restore_data(&scene.args(true, Vec::new())).await.unwrap();
    assert!(
        std::fs::symlink_metadata(pgdata.join("base"))
            .unwrap()
            .is_dir()
    );
    assert_eq!(
        std::fs::read(pgdata.join("base/precious")).unwrap(),
        b"restored"
    );
    scene.assert_outside_untouched();
}

/// A file listed where a tablespace inside the data directory is restored would replace
/// the location: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_file_over_a_nested_tablespace_location_is_refused() {
    let mut scene = Scene::new();
    let nested = scene.pgdata().join("ts");
    let fake = FakeServer::new()
        .tablespace(16390, "ts", &nested.display().to_string())
        .file("PG_VERSION", b"16\n", 0o600)
        .link("pg_tblspc/16390", &nested)
        .file("ts", b"not a directory", 0o600);
    scene.serve(fake).await;
    let err = scene.refused(false).await;
    assert_contains(
        &err,
        &format!(
            "lists \"ts\" where tablespace 16390 is restored (\"{}\")",
            nested.display()
        ),
    );
    assert!(!scene.pgdata().exists(), "nothing may be written");
}

/// A file of 20 pages in runs: honest run frames restore it byte for byte; a block that
/// points to a frame never sent, lies past its frame's end, or whose frame holds other
/// content is refused as corrupt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_reads_blocks_out_of_run_frames_and_refuses_lying_ones() {
    let content: Vec<u8> = (0..20 * 8192 + 77).map(|i| (i / 100 % 251) as u8).collect();
    let mut scene = Scene::new();
    let mut fake = FakeServer::new().paged_file("base/1/16384", &content);
    fake.frames = Frames::Run;
    scene.serve(fake).await;
    restore_data(&scene.args(false, Vec::new())).await.unwrap();
    assert!(std::fs::read(scene.pgdata().join("base/1/16384")).unwrap() == content);

    for (frames, why) in [
        (Frames::SameFrameFirst, "the server sent no frame for it"),
        (Frames::BeyondFrame, "beyond the frame"),
        (Frames::Swapped, "does not match its id"),
    ] {
        let mut scene = Scene::new();
        let mut fake = FakeServer::new().paged_file("base/1/16384", &content);
        fake.frames = frames;
        scene.serve(fake).await;
        let err = scene.refused(false).await;
        assert_contains(&err, "is corrupt");
        assert_contains(&err, why);
        scene.assert_outside_untouched();
    }
}
