//! End-to-end: a standby is promoted while WAL is being streamed; the archive follows the
//! new timeline with its history file, and recovery across the switch works.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod common;

use std::time::Duration;

use common::*;
use klio_test_support::{PgCluster, PgOptions, scratch_dir, wait_until};

#[test]
fn promotion_continues_archive_on_new_timeline_and_recovery_crosses_it() -> anyhow::Result<()> {
    let mut primary = PgCluster::start(PgOptions::default())?;
    primary.pgbench_init(2)?;
    let k = Klio::start(&["prom"])?;
    let mut s1 = k.spawn_streamer("prom", &primary, "s1", &[])?;
    let (_base, base_dir) = base_backup_once_archiving(&k, "prom", &primary)?;
    let standby = PgCluster::standby_of(&primary, PgOptions::default())?;
    // The standby's streamer waits while it is in recovery.
    let _s2 = k.spawn_streamer("prom", &standby, "s2", &[])?;

    primary.pgbench(&["-c", "2", "-t", "300"])?;
    primary.psql("CREATE TABLE before_switch AS SELECT generate_series(1, 1000) AS i")?;
    let (_, lsn) = current_lsn(&primary)?;
    k.wait_archived("prom", 1, lsn, Duration::from_secs(60))?;
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        "the standby to replay the primary's WAL",
        || {
            let replayed: klio_pg::Lsn =
                standby.psql("SELECT pg_last_wal_replay_lsn()")?.parse()?;
            Ok(replayed >= lsn)
        },
    )?;

    // Old primary goes away (its streamer too), the standby is promoted.
    s1.kill()?;
    primary.stop()?;
    standby.promote()?;
    standby.psql("CREATE TABLE after_switch AS SELECT generate_series(1, 500) AS i")?;
    standby.pgbench(&["-c", "2", "-t", "200"])?;
    let end = switch_wal(&standby)?;
    let (tli, _) = current_lsn(&standby)?;
    assert_eq!(tli, 2);
    k.wait_archived("prom", 2, end, Duration::from_secs(90))
        .map_err(|e| {
            anyhow::anyhow!(
                "{e:#}\ns2 log:\n{}\nserver log:\n{}",
                k.log("s2"),
                k.server_log()
            )
        })?;

    let files: Vec<String> = k.archived_files("prom")?.into_iter().collect();
    assert!(files.contains(&"00000002.history".to_string()), "{files:?}");
    assert!(
        files
            .iter()
            .any(|f| f.starts_with("00000002") && f.len() == 24),
        "{files:?}"
    );
    // The history file served back is PostgreSQL's own.
    let out = scratch_dir();
    let h = out.path().join("h");
    let o = k.wal_get("prom", "00000002.history", &h, &[])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read_to_string(&h)?.starts_with("1\t"));

    // Recovery of the old base backup across the switch, to the end of the archive.
    let expected = standby.table_checksums("postgres")?;
    configure_recovery(
        &base_dir,
        &k.restore_command("prom", ""),
        &["recovery_target_timeline = 'latest'"],
    )?;
    let restored = PgCluster::from_data_path(&base_dir, PgOptions::default())?;
    restored.wait_for_recovery_end(Duration::from_secs(300))?;
    assert_eq!(restored.table_checksums("postgres")?, expected);
    let tli: u32 = restored
        .psql("SELECT timeline_id FROM pg_control_checkpoint()")?
        .parse()?;
    assert!(
        tli >= 2,
        "recovery should end on timeline 2 or later, got {tli}"
    );
    Ok(())
}
