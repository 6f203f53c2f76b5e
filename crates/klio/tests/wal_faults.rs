//! End-to-end: faults and limits of one cluster stay with that cluster. A damaged
//! in-progress segment, a cluster over a WAL limit and a full disk each get their own clear
//! status (`DATA_LOSS`, `RESOURCE_EXHAUSTED`), while other clusters keep streaming, and
//! nothing acknowledged is lost.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use klio_pg::Lsn;
use klio_proto::wal::v1 as pb;
use klio_proto::wal::v1::wal_client::WalClient;
use klio_test_support::{PgCluster, PgOptions, wait_until};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn wal_client(k: &Klio, cluster: &str) -> WalClient<tonic::transport::Channel> {
    WalClient::new(k.grpc_channel(k.port, &format!("client-{cluster}")).await)
        .max_decoding_message_size(64 << 20)
}

/// A WAL client with HTTP/2's small default flow-control windows (64 KiB), so that the
/// server cannot push a whole segment into a stream nobody reads.
async fn small_window_client(k: &Klio, cluster: &str) -> WalClient<tonic::transport::Channel> {
    klio_tls::install_crypto_provider();
    let p = |f: String| k.pki.join(f);
    let tls = klio_tls::client_tls(
        &p("ca.crt".into()),
        &p(format!("client-{cluster}.crt")),
        &p(format!("client-{cluster}.key")),
        "localhost",
    )
    .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", k.port))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    WalClient::new(channel).max_decoding_message_size(64 << 20)
}

/// Inserts rows and waits until `cluster`'s archive holds the WAL they wrote.
fn write_and_archive(k: &Klio, cluster: &str, pg: &PgCluster, rows: u32) -> anyhow::Result<Lsn> {
    pg.psql(&format!(
        "CREATE TABLE IF NOT EXISTS t (i int); INSERT INTO t SELECT generate_series(1, {rows})"
    ))?;
    let (tli, end) = current_lsn(pg)?;
    k.wait_archived(cluster, tli, end, Duration::from_secs(90))
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", tail(&k.log(cluster), 20)))?;
    Ok(end)
}

/// The in-progress segments of `cluster` on timeline 1.
fn open_files(k: &Klio, cluster: &str) -> Vec<PathBuf> {
    let dir = k.data.join("wal").join(cluster).join("00000001");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "open"))
        .collect();
    v.sort();
    v
}

/// A byte flipped in `a`'s in-progress segment while the server is down: the server
/// starts, `a` gets DATA_LOSS naming the file (and the server log says what to do), `b`
/// streams and backs up as before; once the file is moved aside, `a` streams again.
#[test]
fn damaged_open_segment_refuses_only_its_cluster_and_the_server_starts() -> anyhow::Result<()> {
    let mut k = Klio::start(&["a", "b"])?;
    let pg_a = PgCluster::start(PgOptions::default())?;
    let pg_b = PgCluster::start(PgOptions::default())?;
    let mut streamer_a = k.spawn_streamer("a", &pg_a, "a", &[])?;
    let _streamer_b = k.spawn_streamer("b", &pg_b, "b", &[])?;
    // A sealed segment, then a few writes (frames) into the next, in-progress one.
    write_and_archive(&k, "a", &pg_a, 1000)?;
    let end = switch_wal(&pg_a)?;
    k.wait_archived("a", 1, end, Duration::from_secs(60))?;
    for _ in 0..3 {
        write_and_archive(&k, "a", &pg_a, 1000)?;
    }
    write_and_archive(&k, "b", &pg_b, 1000)?;

    streamer_a.kill()?;
    k.kill_server()?;
    let open = open_files(&k, "a");
    assert_eq!(open.len(), 1, "{open:?}");
    let open = open[0].clone();
    let mut bytes = std::fs::read(&open)?;
    // Past the header (about 80 bytes) and the first frame's header: its ciphertext.
    assert!(bytes.len() > 1000, "{} bytes", bytes.len());
    bytes[150] ^= 0x01;
    std::fs::write(&open, &bytes)?;

    k.start_server()?;
    let open_name = open.file_name().unwrap().to_string_lossy().into_owned();
    let log = k.server_log();
    assert!(
        log.contains("could not recover the WAL archive") && log.contains(&open_name),
        "the server log must name the damaged file:\n{}",
        tail(&log, 20)
    );

    // a: every WAL call is DATA_LOSS naming the file, with what to do.
    let system_id: u64 = pg_a
        .psql("SELECT system_identifier FROM pg_control_system()")?
        .parse()?;
    let rt = runtime();
    rt.block_on(async {
        let mut c = wal_client(&k, "a").await;
        let hello = c
            .hello(pb::HelloRequest {
                cluster: "a".into(),
                system_id,
                segment_size: 16 << 20,
                ..Default::default()
            })
            .await
            .unwrap_err();
        let list = c
            .list(pb::ListRequest {
                cluster: "a".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        for s in [hello, list] {
            assert_eq!(s.code(), tonic::Code::DataLoss, "{s:?}");
            assert!(
                s.message().contains(&open.display().to_string()) && s.message().contains("mv "),
                "{}",
                s.message()
            );
        }
    });
    let mut streamer_a = k.spawn_streamer("a", &pg_a, "a2", &[])?;

    // b: streams and backs up.
    let end_b = switch_wal(&pg_b)?;
    k.wait_archived("b", 1, end_b, Duration::from_secs(60))?;
    write_and_archive(&k, "b", &pg_b, 1000)?;
    let backup = k.backup("b", &pg_b, &[])?;
    assert!(backup.is_object(), "{backup}");
    assert!(
        k.log("a2").contains(&open_name),
        "a's streamer must be told which file is damaged:\n{}",
        tail(&k.log("a2"), 10)
    );
    assert!(
        streamer_a.is_running(),
        "a's streamer retries, it does not give up"
    );

    // The operator moves the file aside, as the hint says: a streams again.
    let aside = PathBuf::from(format!("{}.damaged", open.display()));
    std::fs::rename(&open, &aside)?;
    write_and_archive(&k, "a", &pg_a, 1000)
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", tail(&k.server_log(), 20)))?;
    let end = switch_wal(&pg_a)?;
    k.wait_archived("a", 1, end, Duration::from_secs(60))?;
    assert!(aside.exists());
    streamer_a.kill()?;
    Ok(())
}

/// Each WAL limit refuses the next stream or file of one cluster with RESOURCE_EXHAUSTED
/// naming its flag, and leaves another cluster alone.
#[test]
fn wal_limits_refuse_the_next_stream_or_file_and_spare_other_clusters() -> anyhow::Result<()> {
    let flags = [
        "--wal-max-get-streams",
        "2",
        "--wal-max-put-file-bytes",
        "1000",
        "--wal-max-put-files",
        "2",
    ];
    let k = Klio::start_with(&["a", "b"], flags.iter().map(|s| s.to_string()).collect())?;
    let pg = PgCluster::start(PgOptions::default())?;
    let _streamer = k.spawn_streamer("a", &pg, "a", &[])?;
    // WAL that compresses badly: a sealed segment much larger than what the flow-control
    // windows and the server's buffers hold, so that a Get stream nobody reads cannot
    // finish.
    k.wait_archived("a", 1, Lsn(1), Duration::from_secs(60))?;
    pg.psql(
        "CREATE TABLE r AS SELECT md5(random()::text) || md5(random()::text) AS x FROM generate_series(1, 400000)",
    )?;
    let end = switch_wal(&pg)?;
    k.wait_archived("a", 1, end, Duration::from_secs(120))?;
    let dir = k.data.join("wal/a/00000001");
    let mut sealed = Vec::new();
    for f in k.archived_files("a")?.into_iter().filter(|f| f.len() == 24) {
        let path = dir.join(&f);
        wait_until(
            Duration::from_secs(60),
            Duration::from_millis(100),
            "the segment to be sealed",
            || Ok(path.exists()),
        )?;
        sealed.push((std::fs::metadata(&path)?.len(), f));
    }
    let (sealed_len, seg) = sealed.into_iter().max().unwrap();
    assert!(
        sealed_len > 6 << 20,
        "segment {seg} has only {sealed_len} bytes"
    );

    let rt = runtime();
    rt.block_on(async {
        let mut a = wal_client(&k, "a").await;
        let mut b = wal_client(&k, "b").await;
        b.hello(pb::HelloRequest {
            cluster: "b".into(),
            system_id: 7,
            segment_size: 16 << 20,
            ..Default::default()
        })
        .await
        .unwrap();
        let get = |cluster: &str, name: &str| pb::GetRequest {
            cluster: cluster.into(),
            name: name.into(),
            ..Default::default()
        };
        let put = |cluster: &str, name: &str, len: usize| pb::PutFileRequest {
            cluster: cluster.into(),
            name: name.into(),
            content: vec![b'1'; len].into(),
        };
        let resource_exhausted = |r: Result<_, tonic::Status>, flag: &str| {
            let s: tonic::Status = r.expect_err("refused");
            assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
            assert!(s.message().contains(flag), "{}", s.message());
        };

        // Get streams: two held open unread (each on its own connection, whose window
        // they fill), the third refused.
        let (mut c1, mut c2) = (
            small_window_client(&k, "a").await,
            small_window_client(&k, "a").await,
        );
        let g1 = c1.get(get("a", &seg)).await.unwrap();
        let g2 = c2.get(get("a", &seg)).await.unwrap();
        resource_exhausted(
            a.get(get("a", &seg)).await.map(|_| ()),
            "--wal-max-get-streams",
        );

        // PutFile: size and count.
        resource_exhausted(
            a.put_file(put("a", "00000002.history", 1001))
                .await
                .map(|_| ()),
            "--wal-max-put-file-bytes",
        );
        for n in ["00000002.history", "00000003.history"] {
            assert!(
                a.put_file(put("a", n, 1000))
                    .await
                    .unwrap()
                    .into_inner()
                    .created
            );
        }
        resource_exhausted(
            a.put_file(put("a", "00000004.history", 10))
                .await
                .map(|_| ()),
            "--wal-max-put-files",
        );
        // A file already stored is no new file.
        assert!(
            !a.put_file(put("a", "00000002.history", 1000))
                .await
                .unwrap()
                .into_inner()
                .created
        );

        // b is not affected by any of a's limits.
        for n in ["00000002.history", "00000003.history"] {
            b.put_file(put("b", n, 1000)).await.unwrap();
        }
        for _ in 0..3 {
            let mut s = b
                .get(get("b", "00000002.history"))
                .await
                .unwrap()
                .into_inner();
            while s.message().await.unwrap().is_some() {}
        }

        // Closing the held streams gives their permits back.
        drop((g1, g2, c1, c2));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match a.get(get("a", &seg)).await {
                Ok(r) => {
                    let mut s = r.into_inner();
                    while s.message().await.unwrap().is_some() {}
                    break;
                }
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the permits of closed Get streams are not returned"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => panic!("{s:?}"),
            }
        }
    });
    Ok(())
}

/// A tmpfs mounted for the test, unmounted (lazily, even if a process still uses it) when
/// dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> anyhow::Result<Mount> {
        std::fs::create_dir_all(dir)?;
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
                .arg("tmpfs")
                .arg(dir),
        )?;
        Ok(Mount(dir.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `path` with a file until it is full.
fn fill(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    loop {
        match f.write_all(&chunk).and_then(|()| f.sync_all()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// What the `klio` slot says the archive acknowledged (a physical slot's restart_lsn is
/// the flush position its client reported).
fn slot_flushed(pg: &PgCluster) -> anyhow::Result<Lsn> {
    Ok(pg
        .psql("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'klio'")?
        .parse()?)
}

/// The data volume fills up under load: the streamer is told RESOURCE_EXHAUSTED, the
/// server keeps serving reads, nothing acknowledged is lost, and once space is freed
/// archiving resumes by itself, without a hole.
#[test]
fn disk_full_is_resource_exhausted_and_archiving_resumes_losing_nothing() -> anyhow::Result<()> {
    anyhow::ensure!(
        klio_test_support::running_as_root(),
        "this test mounts a small filesystem and must run as root"
    );
    let pg = PgCluster::start(PgOptions::default())?;
    pg.pgbench_init(1)?;
    let mut k = Klio::start(&["full"])?;
    k.kill_server()?;
    let _mount = Mount::tmpfs(&k.data, "128m")?;
    k.start_server()?;
    let mut streamer = k.spawn_streamer("full", &pg, "streamer", &[])?;
    write_and_archive(&k, "full", &pg, 1000)?;
    let mut load = pgbench_background(&pg, 30)?;

    let filler = k.data.join("filler");
    fill(&filler)?;
    // However much room the server still had, this WAL does not fit.
    pg.psql("CREATE TABLE big AS SELECT md5(random()::text) AS x FROM generate_series(1, 400000)")?;
    wait_until(
        Duration::from_secs(120),
        Duration::from_millis(200),
        "the streamer to be told that the disk is full",
        || Ok(k.log("streamer").contains("data volume is full")),
    )
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", tail(&k.log("streamer"), 20)))?;
    let log = k.log("streamer");
    assert!(
        !log.contains("Internal") && !log.contains("INTERNAL"),
        "{}",
        tail(&log, 20)
    );
    assert!(streamer.is_running(), "{}", tail(&log, 20));

    // Reads are served; everything acknowledged is in the archive.
    let acked = slot_flushed(&pg)?;
    let (_, end) = k.archived_end("full")?.expect("the archive has WAL");
    assert!(end >= acked, "acknowledged {acked}, archive ends at {end}");
    let first = k
        .archived_files("full")?
        .into_iter()
        .find(|f| f.len() == 24)
        .unwrap();
    let scratch = klio_test_support::scratch_dir();
    let o = k.wal_get(
        "full",
        &first,
        &scratch.path().join("seg"),
        &["--prefetch", "0"],
    )?;
    assert!(o.status.success(), "{}", output_text(&o));

    // A backup meanwhile fails on the full volume, clearly, and leaves no backup listed.
    let out = k.backup_command("full", &pg, &[]).output()?;
    let text = output_text(&out);
    assert!(!out.status.success(), "a backup onto a full volume: {text}");
    assert!(text.contains("data volume is full"), "{text}");
    assert!(k.backups_list("full")?.is_empty(), "{text}");

    // Space comes back: archiving resumes by itself and catches up.
    std::fs::remove_file(&filler)?;
    wait_until(
        Duration::from_secs(120),
        Duration::from_millis(500),
        "pgbench to finish",
        || Ok(!load.is_running()),
    )?;
    let end = switch_wal(&pg)?;
    k.wait_archived("full", 1, end, Duration::from_secs(180))
        .map_err(|e| {
            anyhow::anyhow!(
                "{e:#}\n{}\n{}",
                tail(&k.log("streamer"), 20),
                tail(&k.server_log(), 20)
            )
        })?;
    assert!(streamer.is_running());
    let segnos: Vec<u64> = k
        .archived_files("full")?
        .iter()
        .filter(|f| f.len() == 24)
        .map(|f| u64::from_str_radix(&f[16..], 16).unwrap())
        .collect();
    for w in segnos.windows(2) {
        assert_eq!(w[1], w[0] + 1, "hole in the archive between {w:?}");
    }
    assert!(end >= acked);
    // And backups work again.
    k.backup("full", &pg, &["--no-retention"])?;
    assert_eq!(k.backups_list("full")?.len(), 1);
    streamer.kill()?;
    k.kill_server()?;
    Ok(())
}
