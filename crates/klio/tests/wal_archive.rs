//! End-to-end: WAL streamed from a real PostgreSQL 15 under load, stored, served back and
//! replayed, through crashes of every component.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod common;

use std::time::Duration;

use common::*;
use klio_test_support::{ChildGuard, PgCluster, PgOptions, PgReceiveWal, scratch_dir, wait_until};

fn pgbench_load(pg: &PgCluster, secs: u64) -> anyhow::Result<ChildGuard> {
    let mut cmd = pg.client_command("pgbench");
    cmd.arg("-h").arg(pg.socket_dir());
    cmd.args([
        "-p",
        &pg.port().to_string(),
        "-U",
        "postgres",
        "-c",
        "4",
        "-j",
        "2",
        "-T",
        &secs.to_string(),
        "postgres",
    ]);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    ChildGuard::spawn(&mut cmd)
}

fn wait_child(c: &mut ChildGuard, timeout: Duration) -> anyhow::Result<()> {
    wait_until(
        timeout,
        Duration::from_millis(200),
        "pgbench to finish",
        || Ok(!c.is_running()),
    )
}

/// Under pgbench load, with a kill -9 of the server and of the streamer and a PostgreSQL
/// restart along the way, every completed segment fetched back with `wal-get` equals what
/// `pg_receivewal` captured, the archive has no hole, and a base backup taken before the
/// load replays from the archive to the same table contents.
#[test]
fn wal_stream_matches_pg_receivewal_through_crashes_and_replays() -> anyhow::Result<()> {
    let mut pg = PgCluster::start(PgOptions::default())?;
    pg.pgbench_init(5)?;
    let mut k = Klio::start(&["c1"])?;
    let mut recv = PgReceiveWal::start(&pg, Some("recv"))?;
    let mut streamer = k.spawn_streamer("c1", &pg, "streamer", &[])?;
    // A base backup taken before the load.
    let (_base, base_dir) = base_backup_once_archiving(&k, "c1", &pg)?;

    let secs = load_secs();
    let mut load = pgbench_load(&pg, secs)?;
    std::thread::sleep(Duration::from_secs(secs / 3));
    k.kill_server()?;
    std::thread::sleep(Duration::from_millis(500));
    k.start_server()?;
    std::thread::sleep(Duration::from_secs(secs / 3));
    streamer.kill()?;
    streamer = k.spawn_streamer("c1", &pg, "streamer", &[])?;
    wait_child(&mut load, Duration::from_secs(secs + 60))?;

    pg.restart()?;
    let mut load = pgbench_load(&pg, 5)?;
    wait_child(&mut load, Duration::from_secs(120))?;
    pg.psql("CREATE TABLE marker AS SELECT 'after restart'::text AS note")?;
    let end = switch_wal(&pg)?;
    let (tli, _) = current_lsn(&pg)?;
    k.wait_archived("c1", tli, end, Duration::from_secs(120))
        .map_err(|e| {
            anyhow::anyhow!(
                "{e:#}\nstreamer log:\n{}\nserver log:\n{}",
                k.log("streamer"),
                k.server_log()
            )
        })?;
    assert!(
        streamer.is_running(),
        "the streamer must still be running:\n{}",
        k.log("streamer")
    );

    // No hole: archived segments of timeline 1 are consecutive.
    let files: Vec<String> = k
        .archived_files("c1")?
        .into_iter()
        .filter(|f| f.len() == 24)
        .collect();
    assert!(
        files.len() >= 6,
        "expected the load to cross many segments, got {files:?}"
    );
    let segnos: Vec<u64> = files
        .iter()
        .map(|f| u64::from_str_radix(&f[16..], 16).unwrap())
        .collect();
    for w in segnos.windows(2) {
        assert_eq!(w[1], w[0] + 1, "hole in the archive between {:?}", w);
    }

    // Byte-identical to pg_receivewal for every segment both have complete.
    let last = files.last().unwrap().clone();
    recv.wait_for_segment(&last, Duration::from_secs(60))?;
    let out = scratch_dir();
    let mut compared = 0;
    for f in &files {
        let theirs = recv.dir().join(f);
        if !theirs.exists() {
            continue;
        }
        let dest = out.path().join(f);
        let o = k.wal_get("c1", f, &dest, &["--prefetch", "0"])?;
        assert!(
            o.status.success(),
            "wal-get {f}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            std::fs::read(&dest)? == std::fs::read(&theirs)?,
            "segment {f} differs from pg_receivewal's"
        );
        compared += 1;
    }
    assert!(compared >= 5, "only {compared} segments compared");

    // Replay: the base backup taken before the load, recovered from the archive to its end.
    let expected = pg.table_checksums("postgres")?;
    configure_recovery(&base_dir, &k.restore_command("c1", ""), &[])?;
    let restored = PgCluster::from_data_path(&base_dir, PgOptions::default())?;
    restored.wait_for_recovery_end(Duration::from_secs(300))?;
    assert_eq!(restored.table_checksums("postgres")?, expected);
    drop(recv);
    Ok(())
}

/// With Klio as the only synchronous standby, a commit returns only once its WAL is on the
/// Klio server: kill -9 the server right after each commit and the archive, after a
/// restart, reaches at least the flush position Klio had reported.
#[test]
fn synchronous_commit_survives_server_kill9() -> anyhow::Result<()> {
    let pg = PgCluster::start(
        PgOptions::default()
            .with_conf("synchronous_standby_names = 'klio'")
            .with_conf("synchronous_commit = on"),
    )?;
    let mut k = Klio::start(&["sync1"])?;
    let _streamer = k.spawn_streamer("sync1", &pg, "streamer", &[])?;
    pg.psql("CREATE TABLE t (i int)")?;
    let iterations: u32 = std::env::var("KLIO_SYNC_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for i in 0..iterations {
        let out = pg.psql(&format!(
            "INSERT INTO t VALUES ({i}); SELECT flush_lsn FROM pg_stat_replication WHERE application_name = 'klio'"
        ))?;
        let reported: klio_pg::Lsn = out.trim().parse()?;
        k.kill_server()?;
        k.start_server()?;
        let (_, end) = k.archived_end("sync1")?.expect("archive has WAL");
        assert!(
            end >= reported,
            "iteration {i}: Klio reported {reported} flushed but the archive ends at {end}"
        );
    }
    let rows = pg.psql("SELECT count(*) FROM t")?;
    assert_eq!(rows, iterations.to_string());
    Ok(())
}
