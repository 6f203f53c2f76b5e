//! End-to-end on the PostgreSQL majors CloudNativePG ships besides the default 15: 16, 17
//! and 18 (server builds installed by `scripts/install-pg-majors.sh`; a missing one fails the
//! test, naming the script).
//!
//! Each major runs the same journey: `klio wal-stream` as the only synchronous standby
//! (`synchronous_standby_names = 'klio'`), completed segments fetched back with `wal-get`
//! byte-identical to the server's own `pg_wal`, a base backup under pgbench load, a
//! point-in-time restore started by that major's PostgreSQL and judged by the exact tables
//! at the target, pgbench's balances and `pg_amcheck` (plus `pg_checksums` where a binary for
//! that major exists). As pgBackRest does, each major is paired with a different storage,
//! queue and restore combination instead of the full cross-product:
//!
//! | major | Tier 2 (moto)                | restore from | target   | also                      |
//! |-------|------------------------------|--------------|----------|---------------------------|
//! | 16    | relayed, embedded queue      | Tier 1       | time     | `verify --tier 2`         |
//! | 17    | relayed, nats-server queue   | Tier 2 only  | LSN      | Tier 1 lost first         |
//! | 18    | none                         | Tier 1       | name     | tablespace, then `--delta` |

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod common;

use std::time::{Duration, Instant};

use anyhow::Context;
use common::*;
use klio_pg::Lsn;
use klio_test_support::{Moto, NatsServer, PgCluster, PgMajor, PgOptions, scratch_dir, wait_until};

const BUCKET: &str = "klio-matrix";

/// `initdb`'s default WAL segment size, which every cluster here uses.
const WAL_SEGMENT_SIZE: u64 = 16 << 20;

/// The segment number of a WAL file name's last 16 hex digits (log and segment-in-log
/// numbers) read as one `u64`.
fn segno_of(log_and_seg: u64) -> u64 {
    (log_and_seg >> 32) * (0x1_0000_0000 / WAL_SEGMENT_SIZE) + (log_and_seg & 0xFFFF_FFFF)
}

/// The work queue of the Tier 2 relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queue {
    Embedded,
    Nats,
}

/// The recovery target of the restore.
#[derive(Clone, Copy, Debug)]
enum Target {
    Time,
    Lsn,
    Name,
}

/// What one major is paired with.
#[derive(Debug)]
struct Combination {
    major: PgMajor,
    /// Relay WAL and the backup to Tier 2 on moto through this queue; `None`: Tier 1 only.
    tier2: Option<Queue>,
    /// Lose Tier 1 (the server's data directory) before restoring, so the restore reads Tier 2.
    restore_from_tier2: bool,
    /// The pgbench tables and indexes live in a tablespace outside the data directory, which
    /// the restore maps to a new location.
    tablespace: bool,
    target: Target,
    /// Change the restored cluster, then restore again over it with `--delta`.
    delta_again: bool,
}

#[test]
fn pg16_sync_stream_backup_under_load_relayed_with_embedded_queue_pitr_to_time()
-> anyhow::Result<()> {
    journey(Combination {
        major: PgMajor::V16,
        tier2: Some(Queue::Embedded),
        restore_from_tier2: false,
        tablespace: false,
        target: Target::Time,
        delta_again: false,
    })
}

#[test]
fn pg17_sync_stream_backup_under_load_relayed_with_nats_queue_pitr_to_lsn_from_tier2()
-> anyhow::Result<()> {
    journey(Combination {
        major: PgMajor::V17,
        tier2: Some(Queue::Nats),
        restore_from_tier2: true,
        tablespace: false,
        target: Target::Lsn,
        delta_again: false,
    })
}

#[test]
fn pg18_sync_stream_tablespace_backup_under_load_pitr_to_name_then_delta_restore()
-> anyhow::Result<()> {
    journey(Combination {
        major: PgMajor::V18,
        tier2: None,
        restore_from_tier2: false,
        tablespace: true,
        target: Target::Name,
        delta_again: true,
    })
}

fn journey(c: Combination) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let cluster = format!("pg{}", c.major.number());
    let scratch = scratch_dir();

    // Services: moto and nats-server live as long as the test.
    let mut flags = Vec::new();
    let moto = c.tier2.map(|_| {
        let moto = Moto::start(&scratch.path().join("moto.log"));
        moto.create_bucket(BUCKET);
        moto
    });
    let nats =
        (c.tier2 == Some(Queue::Nats)).then(|| NatsServer::start(&scratch.path().join("js")));
    if let Some(moto) = &moto {
        let key = tier2_key(&scratch, "tier2.key", "the matrix's tier 2 passphrase\n");
        flags = tier2_flags(&moto.endpoint(), BUCKET, &key);
    }
    if let Some(nats) = &nats {
        flags.extend(["--queue-nats-url".to_string(), nats.url()]);
    }
    let tier2_flag: &[&str] = if c.tier2.is_some() {
        &["--tier2-backup"]
    } else {
        &[]
    };

    let pg = PgCluster::start(
        PgOptions::default()
            .with_major(c.major)
            .with_conf("synchronous_standby_names = 'klio'")
            .with_conf("synchronous_commit = on"),
    )?;
    let version_num: u32 = pg.psql("SHOW server_version_num")?.parse()?;
    assert_eq!(
        version_num / 10000,
        c.major.number(),
        "the cluster must run {}",
        c.major
    );
    let mut k = Klio::start_with(&[&cluster], flags)?;
    let mut streamer = k.spawn_streamer(&cluster, &pg, "streamer", tier2_flag)?;
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        "klio to be the synchronous standby",
        || {
            Ok(pg.psql(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'klio'",
            )? == "sync")
        },
    )
    .map_err(|e| with_logs(e, &k, "streamer"))?;

    // Every commit from here on waits for Klio.
    let mut init = vec!["-i", "-q", "-s", "2"];
    let ts_dir = scratch.subdir("ts1")?;
    if c.tablespace {
        pg.psql(&format!(
            "CREATE TABLESPACE ts1 LOCATION '{}'",
            ts_dir.display()
        ))?;
        init.extend(["--tablespace=ts1", "--index-tablespace=ts1"]);
    }
    pg.pgbench(&init)?;
    pg.psql("CREATE TABLE marker (tag text)")?;
    let out = pg.psql(
        "CREATE TABLE synced AS SELECT 1 AS i; \
         SELECT flush_lsn FROM pg_stat_replication WHERE application_name = 'klio'",
    )?;
    let reported: Lsn = out.trim().parse()?;
    let (_, archived) = k
        .archived_end(&cluster)?
        .context("the archive has no WAL")?;
    assert!(
        archived >= reported,
        "Klio reported {reported} flushed, the archive ends at {archived}"
    );

    // A segment switch: the segment it ends is archived, every completed segment equals the
    // server's own copy in pg_wal, and the archive has no hole.
    let switched = walfile_now(&pg)?;
    let end = switch_wal(&pg)?;
    k.wait_archived(&cluster, 1, end, Duration::from_secs(60))
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    // Segments before the one holding `end` are complete (`end` is where the switch left
    // the insert position, the first byte of a new segment).
    let end_segno = end.0 / WAL_SEGMENT_SIZE;
    let files: Vec<String> = k
        .archived_files(&cluster)?
        .into_iter()
        .filter(|f| f.len() == 24 && f.starts_with("00000001"))
        .filter(|f| u64::from_str_radix(&f[8..], 16).is_ok_and(|n| segno_of(n) < end_segno))
        .collect();
    assert!(
        files.contains(&switched),
        "{switched} is not archived: {files:?}"
    );
    let segnos: Vec<u64> = files
        .iter()
        .map(|f| segno_of(u64::from_str_radix(&f[8..], 16).unwrap()))
        .collect();
    for w in segnos.windows(2) {
        assert_eq!(w[1], w[0] + 1, "hole in the archive between {w:?}");
    }
    // The first archived segment may start where streaming started; compare the others.
    let fetched = scratch.subdir("fetched")?;
    for f in files.iter().skip(1) {
        let dest = fetched.join(f);
        let out = k.wal_get(&cluster, f, &dest, &["--prefetch", "0"])?;
        assert!(out.status.success(), "wal-get {f}: {}", output_text(&out));
        assert!(
            std::fs::read(&dest)? == std::fs::read(pg.wal_dir().join(f))?,
            "segment {f} differs from the server's pg_wal/{f}"
        );
    }
    assert!(files.len() >= 2, "no complete segment compared: {files:?}");
    eprintln!("{}: streaming checked after {:?}", c.major, t0.elapsed());

    // A base backup under pgbench load.
    let mut backup_flags = vec!["--jobs", "2"];
    backup_flags.extend(tier2_flag);
    let backup = backup_under_load(&k, &cluster, &pg, &backup_flags)?;
    let id = backup["backup_id"].as_str().unwrap().to_string();
    let spcs = backup["tablespaces"].as_array().context("no tablespaces")?;
    assert_eq!(spcs.len(), usize::from(c.tablespace), "{backup}");
    eprintln!("{}: backup {id} after {:?}", c.major, t0.elapsed());

    // The target, between a committed 'before' and a later 'after'.
    pgbench_burst(&pg)?;
    pg.psql("INSERT INTO marker VALUES ('before')")?;
    let expected = pg.table_checksums("postgres")?;
    let target = match c.target {
        Target::Time => {
            let t = pg.psql(
                r#"SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#,
            )?;
            std::thread::sleep(Duration::from_millis(200));
            vec!["--target-time".to_string(), t]
        }
        Target::Lsn => vec![
            "--target-lsn".to_string(),
            pg.psql("SELECT pg_current_wal_lsn()")?,
        ],
        Target::Name => {
            pg.psql("SELECT pg_create_restore_point('matrix')")?;
            vec!["--target-name".to_string(), "matrix".to_string()]
        }
    };
    pg.psql("INSERT INTO marker VALUES ('after')")?;
    pgbench_burst(&pg)?;
    assert_ne!(pg.table_checksums("postgres")?, expected);
    let last = walfile_now(&pg)?;
    let end = switch_wal(&pg)?;
    k.wait_archived(&cluster, 1, end, Duration::from_secs(120))
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    let out = k.verify(&cluster, &[])?;
    assert!(out.status.success(), "klio verify:\n{}", output_text(&out));
    if c.tier2.is_some() {
        wait_relayed(&k, &cluster, &id, &last)?;
        let out = k.verify(&cluster, &["--tier", "2"])?;
        assert!(
            out.status.success(),
            "klio verify --tier 2:\n{}",
            output_text(&out)
        );
    }

    // The restore.
    let mut restore_flags: Vec<String> = target;
    if c.restore_from_tier2 {
        streamer.kill()?;
        k.kill_server()?;
        std::fs::remove_dir_all(&k.data)?;
        k.start_server()?;
        restore_flags.push("--tier2-recovery".into());
    }
    let dirs = scratch_dir();
    let pgdata = dirs.path().join("pgdata");
    let ts_moved = dirs.path().join("ts1-moved");
    if c.tablespace {
        restore_flags.extend([
            "--tablespace-map".to_string(),
            format!("ts1={}", ts_moved.display()),
        ]);
    }
    let restore_args: Vec<&str> = restore_flags.iter().map(String::as_str).collect();
    restore_ok(&k, &cluster, &pgdata, &restore_args)?;
    let mut restored = start_restored(&pgdata)?;
    check_at_target(&c, &restored, &expected, &ts_moved, "the restore")?;

    if c.delta_again {
        restored.psql(
            "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= 5000;\n\
             INSERT INTO marker VALUES ('changed');\n\
             DROP TABLE synced;\n\
             CREATE TABLE extra AS SELECT g AS i FROM generate_series(1, 50000) g;\n\
             CHECKPOINT;",
        )?;
        assert_ne!(restored.table_checksums("postgres")?, expected);
        restored.stop()?;
        drop(restored);
        let mut delta_args = restore_args.clone();
        delta_args.push("--delta");
        restore_ok(&k, &cluster, &pgdata, &delta_args)?;
        restored = start_restored(&pgdata)?;
        check_at_target(&c, &restored, &expected, &ts_moved, "the delta restore")?;
    }
    restored.stop()?;
    run_pg_checksums(&pgdata)?;
    eprintln!("{}: done after {:?}", c.major, t0.elapsed());
    Ok(())
}

/// A restored cluster runs the same major, stopped recovery at the target and holds exactly
/// the source's tables there ('before' but not 'after' in `marker`), pgbench's balances add up, the tablespace
/// (if any) is at its mapped location, and `pg_amcheck` finds nothing.
fn check_at_target(
    c: &Combination,
    pg: &PgCluster,
    expected: &std::collections::BTreeMap<String, String>,
    ts_moved: &std::path::Path,
    what: &str,
) -> anyhow::Result<()> {
    assert_eq!(pg.major(), c.major, "{what}");
    assert!(
        pg.log_contents().contains("recovery stopping"),
        "{what}: recovery must stop at the target:\n{}",
        tail(&pg.log_contents(), 40)
    );
    let version_num: u32 = pg.psql("SHOW server_version_num")?.parse()?;
    assert_eq!(version_num / 10000, c.major.number(), "{what}");
    assert_eq!(
        pg.psql("SELECT string_agg(tag, ',' ORDER BY tag) FROM marker")?,
        "before",
        "{what}: marker at the target"
    );
    assert_eq!(
        &pg.table_checksums("postgres")?,
        expected,
        "{what}: the restored tables differ from the source's at the target"
    );
    check_pgbench_balanced(pg, what)?;
    if c.tablespace {
        assert_eq!(
            pg.psql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'")?,
            ts_moved.display().to_string(),
            "{what}"
        );
        assert!(
            pg.psql("SELECT pg_relation_filepath('pgbench_accounts')")?
                .starts_with("pg_tblspc/"),
            "{what}: pgbench_accounts is not in tablespace ts1"
        );
        let version_dir = format!("PG_{}_", c.major.number());
        assert!(
            std::fs::read_dir(ts_moved)?
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with(&version_dir)),
            "{what}: \"{}\" holds no {version_dir} directory",
            ts_moved.display()
        );
    }
    run_pg_amcheck(pg).with_context(|| format!("{what}: pg_amcheck"))?;
    Ok(())
}
