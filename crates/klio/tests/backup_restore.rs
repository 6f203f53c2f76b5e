//! End-to-end: base backups of a real PostgreSQL 15 (under load, with tablespaces) and
//! their restore to every kind of recovery target, incremental deduplication, restores in
//! place with `--delta`, crashes of the server and of the client mid-backup, corruption of
//! each kind of repository object, and certificates that may only reach their own cluster.
//!
//! Every restored cluster is started by PostgreSQL itself (archive recovery through
//! `klio wal-get`) and judged by what PostgreSQL sees: per-table md5 against the source at
//! the recovery target, pgbench's balances, `pg_amcheck` and `pg_checksums`.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::*;
use klio_pg::Lsn;
use klio_test_support::{ChildGuard, PgCluster, PgOptions, ScratchDir, scratch_dir, wait_until};
use serde_json::Value;

/// `initdb`'s default WAL segment size, which every cluster here uses.
const WAL_SEGMENT_SIZE: u64 = 16 << 20;

// ---------------------------------------------------------------------------------------
// Load

// ---------------------------------------------------------------------------------------
// Backups

fn str_field<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("\"{field}\" is not a string in {v}"))
}

fn u64_field(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("\"{field}\" is not an unsigned integer in {v}"))
}

fn lsn_field(v: &Value, field: &str) -> Lsn {
    str_field(v, field)
        .parse()
        .unwrap_or_else(|e| panic!("\"{field}\" is not an LSN in {v}: {e}"))
}

fn backup_id(v: &Value) -> String {
    str_field(v, "backup_id").to_string()
}

fn backup_ids(list: &[Value]) -> Vec<String> {
    list.iter().map(backup_id).collect()
}

/// The name of the WAL segment holding `lsn` (PostgreSQL's `XLByteToSeg`, as in
/// `backup_label`'s "START WAL LOCATION ... (file ...)").
fn wal_file_name(tli: u32, lsn: Lsn) -> String {
    let segno = lsn.0 / WAL_SEGMENT_SIZE;
    let per_id = 0x1_0000_0000 / WAL_SEGMENT_SIZE;
    format!("{tli:08X}{:08X}{:08X}", segno / per_id, segno % per_id)
}

/// Checks what `klio backup --json` (and `klio backups list --json`) says of a completed
/// backup of `cluster` on timeline 1.
fn check_backup_json(b: &Value, cluster: &str) {
    let id = str_field(b, "backup_id");
    assert!(
        id.len() == 21 && id.starts_with("backup-") && id[7..].bytes().all(|c| c.is_ascii_digit()),
        "backup id {id:?} is not backup-YYYYMMDDhhmmss"
    );
    assert_eq!(str_field(b, "cluster"), cluster, "{b}");
    assert_eq!(b["timeline"].as_u64(), Some(1), "{b}");
    let (start, end) = (lsn_field(b, "start_lsn"), lsn_field(b, "end_lsn"));
    assert!(start < end, "the backup must end after it starts: {b}");
    let (start_wal, end_wal) = (str_field(b, "start_wal"), str_field(b, "end_wal"));
    for w in [start_wal, end_wal] {
        assert!(
            w.len() == 24 && w.starts_with("00000001") && w.bytes().all(|c| c.is_ascii_hexdigit()),
            "{w:?} is not a WAL file name of timeline 1: {b}"
        );
    }
    assert_eq!(start_wal, wal_file_name(1, start), "{b}");
    assert!(end_wal >= start_wal, "{b}");
    for t in ["started_at", "stopped_at"] {
        let s = str_field(b, t);
        assert!(
            s.len() >= 20 && s.contains('T'),
            "{t} {s:?} is not RFC 3339"
        );
    }
    let blocks_total = u64_field(b, "blocks_total");
    assert!(u64_field(b, "blocks_new") <= blocks_total, "{b}");
    assert!(blocks_total > 0 && u64_field(b, "files") > 0, "{b}");
    assert!(u64_field(b, "logical_size") > 0, "{b}");
    u64_field(b, "bytes_new");
    assert!(b["tablespaces"].is_array(), "{b}");
    assert_eq!(
        b["checksum_failures"],
        serde_json::json!([]),
        "a healthy cluster has no checksum failures"
    );
}

/// Waits until `child` exits, at most `timeout`.
fn wait_exit(child: &mut ChildGuard, timeout: Duration, what: &str) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("poll child")? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("{what} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------
// Restores

/// A cluster started on a data directory `klio restore` wrote. The cluster is declared
/// first so that it stops before its directories are removed.
struct Restored {
    pg: PgCluster,
    /// What `klio restore` printed.
    output: String,
    /// Holds the data directory (`pgdata`).
    _dirs: ScratchDir,
}

/// `klio restore` into a fresh directory, then [`start_restored`].
fn restore_and_start(k: &Klio, cluster: &str, extra: &[&str]) -> anyhow::Result<Restored> {
    let dirs = scratch_dir();
    let pgdata = dirs.path().join("pgdata");
    let output = restore_ok(k, cluster, &pgdata, extra)?;
    let pg = start_restored(&pgdata)?;
    Ok(Restored {
        pg,
        output,
        _dirs: dirs,
    })
}

/// Judges a restored, running cluster: its tables equal `expected` (when known), pgbench's
/// balances add up (when `balanced`: the source was written by pgbench only), `pg_amcheck`
/// finds nothing; then stops it cleanly and runs `pg_checksums --check`.
fn check_restored(
    pg: &mut PgCluster,
    expected: Option<&BTreeMap<String, String>>,
    balanced: bool,
    what: &str,
) -> anyhow::Result<()> {
    if let Some(expected) = expected {
        assert_eq!(
            &pg.table_checksums("postgres")?,
            expected,
            "{what}: the restored tables differ from the source's at the target"
        );
    }
    if balanced {
        check_pgbench_balanced(pg, what)?;
    }
    run_pg_amcheck(pg).with_context(|| format!("{what}: check the restored cluster"))?;
    pg.stop()?;
    run_pg_checksums(pg.data_dir()).with_context(|| format!("{what}: check data checksums"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Tests

/// A backup taken under pgbench load, then points recorded between bursts of pgbench (a
/// time, an LSN, a named restore point, the final state): a restore to each target yields
/// exactly the tables the source had at that point, and every restored cluster passes
/// `pg_amcheck` and `pg_checksums`. `--target-immediate` stops at the end of the backup, a
/// state under load of which no checksum exists: it must be consistent (pgbench's balances
/// add up) and intact.
#[test]
fn pitr_targets_backup_under_load_restores_each_target_exactly() -> anyhow::Result<()> {
    let pg = PgCluster::start(PgOptions::default())?;
    pg.pgbench_init(5)?;
    let k = Klio::start(&["pitr"])?;
    let _streamer = k.spawn_streamer("pitr", &pg, "streamer", &[])?;
    k.wait_archived("pitr", 1, Lsn(1), Duration::from_secs(60))?;
    let db_size: u64 = pg.psql("SELECT pg_database_size('postgres')")?.parse()?;

    let backup = backup_under_load(&k, "pitr", &pg, &["--jobs", "2"])?;
    eprintln!("backup under load: {backup}");
    check_backup_json(&backup, "pitr");
    let id = backup_id(&backup);
    assert!(
        u64_field(&backup, "logical_size") >= db_size,
        "the backup holds less than the database \"postgres\" alone ({db_size} bytes): {backup}"
    );
    assert_eq!(backup["tablespaces"], serde_json::json!([]));

    // The catalog agrees with what the backup printed.
    let list = k.backups_list("pitr")?;
    assert_eq!(backup_ids(&list), std::slice::from_ref(&id));
    for field in [
        "start_lsn",
        "end_lsn",
        "start_wal",
        "end_wal",
        "bytes_new",
        "files",
    ] {
        assert_eq!(list[0][field], backup[field], "backups list: {field}");
    }
    let show = k.backups_show("pitr", &id)?;
    assert_eq!(backup_id(&show), id);
    let label = str_field(&show, "backup_label");
    assert!(
        label.contains("START WAL LOCATION")
            && label.contains(&format!("(file {})", str_field(&backup, "start_wal"))),
        "backup_label does not match start_wal:\n{label}"
    );
    assert!(
        str_field(&show, "tablespace_map").trim().is_empty(),
        "no tablespaces, so an empty tablespace_map: {show}"
    );

    // Points after the backup, each between two bursts of pgbench with nothing written in
    // between, so the tables at each point are known exactly.
    pgbench_burst(&pg)?;
    let at_time = pg.table_checksums("postgres")?;
    // Every commit so far precedes now(); the next burst's commits follow it.
    let target_time =
        pg.psql(r#"SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#)?;
    std::thread::sleep(Duration::from_millis(200));
    pgbench_burst(&pg)?;
    let at_lsn = pg.table_checksums("postgres")?;
    let target_lsn = pg.psql("SELECT pg_current_wal_lsn()")?;
    pgbench_burst(&pg)?;
    let at_name = pg.table_checksums("postgres")?;
    pg.psql("SELECT pg_create_restore_point('rp1')")?;
    pgbench_burst(&pg)?;
    let at_end = pg.table_checksums("postgres")?;
    let end = switch_wal(&pg)?;
    k.wait_archived("pitr", 1, end, Duration::from_secs(120))
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    let points = [&at_time, &at_lsn, &at_name, &at_end];
    for (i, a) in points.iter().enumerate() {
        for b in &points[i + 1..] {
            assert_ne!(a, b, "two recorded points have the same tables");
        }
    }
    let v = k.verify("pitr", &[])?;
    assert!(v.status.success(), "klio verify:\n{}", output_text(&v));

    // Immediate: the end of the backup.
    let mut r = restore_and_start(&k, "pitr", &["--backup-id", &id, "--target-immediate"])?;
    assert!(
        r.output.contains(&id),
        "restore must say which backup it uses:\n{}",
        r.output
    );
    assert!(
        r.pg.log_contents()
            .contains("recovery stopping after reaching consistency"),
        "--target-immediate must stop at consistency:\n{}",
        tail(&r.pg.log_contents(), 40)
    );
    check_restored(&mut r.pg, None, true, "--target-immediate")?;
    drop(r);

    let cases: [(&str, Vec<&str>, &BTreeMap<String, String>); 4] = [
        ("the end of the archive", vec![], &at_end),
        (
            "--target-time",
            vec!["--target-time", target_time.as_str()],
            &at_time,
        ),
        (
            "--target-lsn",
            vec!["--target-lsn", target_lsn.as_str()],
            &at_lsn,
        ),
        ("--target-name", vec!["--target-name", "rp1"], &at_name),
    ];
    for (what, extra, expected) in cases {
        let mut r = restore_and_start(&k, "pitr", &extra)?;
        assert!(
            r.output.contains(&id),
            "{what}: restore must say which backup it chose:\n{}",
            r.output
        );
        let log = r.pg.log_contents();
        assert_eq!(
            log.contains("recovery stopping"),
            !extra.is_empty(),
            "{what}: recovery must stop at the target, or run to the end of the archive without one:\n{}",
            tail(&log, 40)
        );
        check_restored(&mut r.pg, Some(expected), true, what)?;
    }
    Ok(())
}

/// A second backup after updating 1% of pgbench_accounts stores a small fraction of what
/// the first stored, and restores completely (its unchanged blocks come from the first).
#[test]
fn incremental_dedup_second_backup_after_small_update_stores_little() -> anyhow::Result<()> {
    let pg = PgCluster::start(PgOptions::default())?;
    pg.pgbench_init(10)?;
    let k = Klio::start(&["inc"])?;
    let _streamer = k.spawn_streamer("inc", &pg, "streamer", &[])?;
    k.wait_archived("inc", 1, Lsn(1), Duration::from_secs(60))?;

    let first = k
        .backup("inc", &pg, &[])
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    check_backup_json(&first, "inc");
    // 1% of the rows, contiguous: about 1% of the table's pages (plus as many new pages for
    // the new row versions, and the index pages of those keys). The same number of rows
    // spread evenly (aid % 100 = 0) would touch most pages, 61 rows sharing each.
    let rows: u64 = pg.psql("SELECT count(*) FROM pgbench_accounts")?.parse()?;
    pg.psql(&format!(
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= {}",
        rows / 100
    ))?;
    pg.psql("CHECKPOINT")?;
    let second = k
        .backup("inc", &pg, &[])
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    check_backup_json(&second, "inc");

    let (b1, b2) = (
        u64_field(&first, "bytes_new"),
        u64_field(&second, "bytes_new"),
    );
    let ratio = b2 as f64 / b1 as f64;
    eprintln!(
        "incremental_dedup: first backup {b1} bytes new ({} of {} blocks, logical {} bytes); \
         second {b2} bytes new ({} of {} blocks, logical {} bytes); ratio {ratio:.4}",
        u64_field(&first, "blocks_new"),
        u64_field(&first, "blocks_total"),
        u64_field(&first, "logical_size"),
        u64_field(&second, "blocks_new"),
        u64_field(&second, "blocks_total"),
        u64_field(&second, "logical_size"),
    );
    assert!(b1 > 0, "the first backup stored nothing: {first}");
    assert!(
        ratio < 0.3,
        "the second backup stored {b2} bytes, {ratio:.3} of the first's {b1}"
    );
    assert!(
        u64_field(&second, "logical_size") * 100 >= u64_field(&first, "logical_size") * 95,
        "the second backup is a full backup of the same data"
    );

    let list = k.backups_list("inc")?;
    assert_eq!(backup_ids(&list), [backup_id(&first), backup_id(&second)]);
    let v = k.verify("inc", &[])?;
    assert!(v.status.success(), "klio verify:\n{}", output_text(&v));

    // Nothing is written after the update: the second backup's end is the current state.
    let expected = pg.table_checksums("postgres")?;
    let mut r = restore_and_start(
        &k,
        "inc",
        &["--backup-id", &backup_id(&second), "--target-immediate"],
    )?;
    check_restored(&mut r.pg, Some(&expected), false, "the second backup")?;
    Ok(())
}

/// Checks where tablespace `oid` ("ts1", holding table `in_ts`) of a running restored
/// cluster is: the `pg_tblspc` link and PostgreSQL both say `location`, which holds the
/// version directory.
fn check_tablespace_location(pg: &PgCluster, oid: u32, location: &Path) -> anyhow::Result<()> {
    let link = pg.data_dir().join("pg_tblspc").join(oid.to_string());
    assert_eq!(
        fs::read_link(&link).with_context(|| format!("read link \"{}\"", link.display()))?,
        location,
        "pg_tblspc/{oid}"
    );
    assert_eq!(
        pg.psql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'")?,
        location.display().to_string()
    );
    assert!(
        pg.psql("SELECT pg_relation_filepath('in_ts')")?
            .starts_with(&format!("pg_tblspc/{oid}/")),
        "table in_ts is not in tablespace ts1"
    );
    let version_dirs = fs::read_dir(location)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("PG_15_"))
        .count();
    assert_eq!(
        version_dirs,
        1,
        "\"{}\" holds no PG_15_ directory",
        location.display()
    );
    Ok(())
}

/// A cluster with a tablespace outside its data directory: the backup lists it; a restore
/// beside the running source must map it elsewhere (by name or by OID) and refuses to write
/// over the location the source uses; once the source is gone, a restore without a map puts
/// it back where it was. Each restored cluster has the source's tables.
#[test]
fn tablespaces_restore_to_mapped_or_original_locations() -> anyhow::Result<()> {
    let ts_scratch = scratch_dir();
    let ts_dir = ts_scratch.subdir("ts1")?;
    let ts_loc = ts_dir.display().to_string();
    let mut pg = PgCluster::start(PgOptions::default())?;
    pg.psql(&format!("CREATE TABLESPACE ts1 LOCATION '{ts_loc}'"))?;
    pg.psql(
        "CREATE TABLE in_ts TABLESPACE ts1 AS \
         SELECT g AS i, md5(g::text) AS s FROM generate_series(1, 100000) g",
    )?;
    pg.psql("CREATE INDEX in_ts_s ON in_ts (s) TABLESPACE ts1")?;
    pg.psql("CREATE TABLE in_default AS SELECT g AS i FROM generate_series(1, 1000) g")?;
    let oid: u32 = pg
        .psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'")?
        .parse()?;
    let k = Klio::start(&["ts"])?;
    let _streamer = k.spawn_streamer("ts", &pg, "streamer", &[])?;
    k.wait_archived("ts", 1, Lsn(1), Duration::from_secs(60))?;

    let backup = k
        .backup("ts", &pg, &[])
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    check_backup_json(&backup, "ts");
    let id = backup_id(&backup);
    assert_eq!(
        backup["tablespaces"],
        serde_json::json!([{ "oid": oid, "name": "ts1", "location": ts_loc }]),
        "{backup}"
    );
    let show = k.backups_show("ts", &id)?;
    let map = str_field(&show, "tablespace_map");
    assert!(
        map.lines().any(|l| l == format!("{oid} {ts_loc}")),
        "tablespace_map does not map {oid} to {ts_loc}:\n{map}"
    );
    let expected = pg.table_checksums("postgres")?;
    let end = switch_wal(&pg)?;
    k.wait_archived("ts", 1, end, Duration::from_secs(60))?;

    // Beside the running source, without a map: the location is in use, nothing is written.
    let refused = scratch_dir();
    let out = k.restore("ts", &refused.path().join("pgdata"), &[])?;
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "a restore must not write tablespace ts1 over \"{ts_loc}\", which the source uses:\n{text}"
    );
    assert!(
        text.contains(&ts_loc) || text.contains("ts1"),
        "the refusal must name the tablespace or its location:\n{text}"
    );
    assert_eq!(pg.table_checksums("postgres")?, expected);

    // Mapped by name, then by OID, to new locations.
    let moved = scratch_dir();
    for (what, key) in [
        ("mapped by name", "ts1".to_string()),
        ("mapped by OID", oid.to_string()),
    ] {
        let location = moved.path().join(format!("ts1-{}", key));
        let map = format!("{key}={}", location.display());
        let mut r = restore_and_start(&k, "ts", &["--tablespace-map", &map])?;
        check_tablespace_location(&r.pg, oid, &location)?;
        check_restored(&mut r.pg, Some(&expected), false, what)?;
    }

    // The source is gone (its tablespace's contents moved aside, the empty directory kept):
    // without a map, the tablespace goes back to its original location.
    pg.stop()?;
    for entry in fs::read_dir(&ts_dir)? {
        let entry = entry?;
        fs::rename(
            entry.path(),
            ts_scratch
                .path()
                .join(format!("aside-{}", entry.file_name().to_string_lossy())),
        )?;
    }
    let mut r = restore_and_start(&k, "ts", &[])?;
    check_tablespace_location(&r.pg, oid, &ts_dir)?;
    check_restored(&mut r.pg, Some(&expected), false, "original location")?;
    Ok(())
}

/// Content hashes of the files under `global/`, `base/`, `pg_xact/` and `pg_multixact/` of
/// a data directory, by relative path; `pg_internal.init` (a cache PostgreSQL rebuilds)
/// and temporary files are left out.
fn relation_files(pgdata: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> anyhow::Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("list \"{}\"", dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name == "pg_internal.init" || name.starts_with("pgsql_tmp") {
                continue;
            }
            let meta = fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                walk(root, &path, out)?;
            } else {
                let rel = path.strip_prefix(root)?.display().to_string();
                let bytes =
                    fs::read(&path).with_context(|| format!("read \"{}\"", path.display()))?;
                out.insert(rel, blake3::hash(&bytes).to_hex().to_string());
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    for sub in ["global", "base", "pg_xact", "pg_multixact"] {
        let dir = pgdata.join(sub);
        if dir.exists() {
            walk(pgdata, &dir, &mut out)?;
        }
    }
    Ok(out)
}

/// A restored cluster is started and changed (rows updated and inserted, a table dropped,
/// another created, one rewritten); `klio restore --delta` over it yields the same relation
/// files as a fresh restore of the same backup and, once recovered, the source's tables.
/// A running cluster, and a non-empty directory without `--delta`, are refused.
#[test]
fn delta_restore_over_changed_cluster_equals_fresh_restore() -> anyhow::Result<()> {
    let pg = PgCluster::start(PgOptions::default())?;
    pg.pgbench_init(5)?;
    pg.psql(
        "CREATE TABLE keepme AS SELECT g AS i, repeat('x', 100) AS s FROM generate_series(1, 20000) g",
    )?;
    let k = Klio::start(&["delta"])?;
    let _streamer = k.spawn_streamer("delta", &pg, "streamer", &[])?;
    k.wait_archived("delta", 1, Lsn(1), Duration::from_secs(60))?;
    let backup = k
        .backup("delta", &pg, &[])
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    let id = backup_id(&backup);
    let end = switch_wal(&pg)?;
    k.wait_archived("delta", 1, end, Duration::from_secs(60))?;
    let expected = pg.table_checksums("postgres")?;

    let dirs = scratch_dir();
    let pgdata = dirs.path().join("pgdata");
    restore_ok(&k, "delta", &pgdata, &["--backup-id", &id])?;
    {
        let mut restored = start_restored(&pgdata)?;
        assert_eq!(restored.table_checksums("postgres")?, expected);

        let out = k.restore("delta", &pgdata, &["--backup-id", &id, "--delta"])?;
        assert!(
            !out.status.success(),
            "restore --delta must refuse a directory with a running cluster:\n{}",
            output_text(&out)
        );
        assert_eq!(restored.psql("SELECT count(*) FROM keepme")?, "20000");

        restored.psql(
            "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= 5000;\n\
             INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 7, now());\n\
             DROP TABLE keepme;\n\
             CREATE TABLE extra AS SELECT g AS i FROM generate_series(1, 50000) g;\n\
             VACUUM FULL pgbench_tellers;\n\
             CHECKPOINT;",
        )?;
        assert_ne!(restored.table_checksums("postgres")?, expected);
        restored.stop()?;
    }

    let out = k.restore("delta", &pgdata, &["--backup-id", &id])?;
    assert!(
        !out.status.success(),
        "restore without --delta must refuse a non-empty directory:\n{}",
        output_text(&out)
    );
    assert!(pgdata.join("PG_VERSION").exists());

    restore_ok(&k, "delta", &pgdata, &["--backup-id", &id, "--delta"])?;
    let fresh_dirs = scratch_dir();
    let fresh = fresh_dirs.path().join("pgdata");
    restore_ok(&k, "delta", &fresh, &["--backup-id", &id])?;
    let (want, got) = (relation_files(&fresh)?, relation_files(&pgdata)?);
    let differences: Vec<String> = want
        .iter()
        .filter(|(p, h)| got.get(*p) != Some(*h))
        .map(|(p, _)| format!("differs or missing: {p}"))
        .chain(
            got.keys()
                .filter(|p| !want.contains_key(*p))
                .map(|p| format!("left over: {p}")),
        )
        .collect();
    assert!(
        differences.is_empty(),
        "the delta restore differs from a fresh restore of the same backup in {} files:\n{}",
        differences.len(),
        differences[..differences.len().min(30)].join("\n")
    );

    let mut restored = start_restored(&pgdata)?;
    check_restored(&mut restored, Some(&expected), true, "the delta restore")?;
    Ok(())
}

/// `klio backup --json` of `pg` as a child; its output goes to `<name>.out` and `<name>.log`
/// in the Klio scratch directory. One reading thread, so that it is still running when it is
/// killed.
fn spawn_backup(k: &Klio, cluster: &str, pg: &PgCluster, name: &str) -> anyhow::Result<ChildGuard> {
    let mut cmd = k.backup_command(cluster, pg, &["--jobs", "1"]);
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(k.dir.path().join(format!("{name}.out")))?)
        .stderr(fs::File::create(k.dir.path().join(format!("{name}.log")))?);
    ChildGuard::spawn(&mut cmd)
}

/// Lets a backup child get under way: until its log says PostgreSQL is in backup mode (at
/// most 20 s, so a changed message only costs time), then one more second of reading and
/// uploading.
fn let_backup_run(k: &Klio, child: &mut ChildGuard, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline
        && !k.log(name).contains("backup started in PostgreSQL")
        && child.is_running()
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
}

/// The names of the replication slots of `pg`.
fn slots(pg: &PgCluster) -> anyhow::Result<String> {
    pg.psql("SELECT coalesce(string_agg(slot_name, ',' ORDER BY slot_name), '') FROM pg_replication_slots")
}

/// Waits until nothing of a killed backup is left in PostgreSQL: no session other than the
/// streamer's (its replication connection, and the ordinary one that watches
/// `synchronous_standby_names`), no `BASE_BACKUP` in progress, no replication slot other than
/// `slots_before`. A non-exclusive backup ends with its session.
fn wait_backup_sessions_gone(pg: &PgCluster, slots_before: &str) -> anyhow::Result<()> {
    let result = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "PostgreSQL to end the sessions of the killed backup",
        || {
            let left: i64 = pg
                .psql(
                    "SELECT (SELECT count(*) FROM pg_stat_activity \
                             WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' \
                             AND query NOT ILIKE '%synchronous_standby_names%') \
                          + (SELECT count(*) FROM pg_stat_progress_basebackup)",
                )?
                .parse()?;
            Ok(left == 0 && slots(pg)? == slots_before)
        },
    );
    result.map_err(|e| {
        let activity = pg
            .psql(
                "SELECT pid, backend_type, application_name, state, query FROM pg_stat_activity \
                 WHERE pid <> pg_backend_pid()",
            )
            .unwrap_or_default();
        let slots = slots(pg).unwrap_or_default();
        anyhow::anyhow!("{e:#}\nsessions:\n{activity}\nslots: {slots} (before: {slots_before})")
    })
}

/// kill -9 of the server during a backup, then of the backup client during another: both
/// backups fail, neither is listed, PostgreSQL is left with no backup session, and the next
/// backup succeeds, verifies and restores to the source's tables.
#[test]
fn crash_during_backup_server_or_client_kill9_leaves_no_backup_and_next_succeeds()
-> anyhow::Result<()> {
    let pg = PgCluster::start(PgOptions::default())?;
    pg.pgbench_init(20)?;
    let mut k = Klio::start(&["crash"])?;
    let _streamer = k.spawn_streamer("crash", &pg, "streamer", &[])?;
    k.wait_archived("crash", 1, Lsn(1), Duration::from_secs(60))?;
    let slots_before = slots(&pg)?;

    // The server dies mid-backup.
    let mut backup = spawn_backup(&k, "crash", &pg, "backup-1")?;
    let_backup_run(&k, &mut backup, "backup-1");
    assert!(
        backup.is_running(),
        "the first backup ended before the server was killed; make the data larger:\n{}",
        k.log("backup-1")
    );
    k.kill_server()?;
    let status = wait_exit(&mut backup, Duration::from_secs(180), "klio backup")?;
    assert!(
        !status.success(),
        "a backup whose server died must fail:\n{}",
        k.log("backup-1")
    );
    eprintln!(
        "backup-1 after the server was killed:\n{}",
        tail(&k.log("backup-1"), 10)
    );
    wait_backup_sessions_gone(&pg, &slots_before)?;
    k.start_server()?;

    // The client dies mid-backup.
    let mut backup = spawn_backup(&k, "crash", &pg, "backup-2")?;
    let_backup_run(&k, &mut backup, "backup-2");
    assert!(
        backup.is_running(),
        "the second backup ended before it was killed; make the data larger:\n{}",
        k.log("backup-2")
    );
    backup.kill()?;
    wait_backup_sessions_gone(&pg, &slots_before)?;

    let list = k.backups_list("crash")?;
    assert!(
        list.is_empty(),
        "killed backups must not be listed as complete: {list:?}"
    );

    let t0 = Instant::now();
    let good = k
        .backup("crash", &pg, &[])
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    eprintln!("a complete backup took {:?}: {good}", t0.elapsed());
    check_backup_json(&good, "crash");
    let id = backup_id(&good);
    assert_eq!(
        backup_ids(&k.backups_list("crash")?),
        std::slice::from_ref(&id)
    );
    wait_backup_sessions_gone(&pg, &slots_before)?;
    let v = k.verify("crash", &[])?;
    assert!(
        v.status.success(),
        "klio verify after the crashes:\n{}",
        output_text(&v)
    );

    let expected = pg.table_checksums("postgres")?;
    let mut r = restore_and_start(&k, "crash", &["--backup-id", &id, "--target-immediate"])?;
    check_restored(
        &mut r.pg,
        Some(&expected),
        true,
        "the backup after the crashes",
    )?;
    Ok(())
}

/// Files below `dir` (any depth) whose name is an object id (64 lowercase hex digits).
fn object_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("list \"{}\"", dir.display()))? {
        let path = entry?.path();
        if fs::symlink_metadata(&path)?.is_dir() {
            out.extend(object_files(&path)?);
        } else {
            let name = path.file_name().unwrap().to_string_lossy();
            if name.len() == 64 && name.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
                out.push(path);
            }
        }
    }
    Ok(out)
}

/// The largest object file below `dir`.
fn largest_object(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut files = object_files(dir)?;
    files.sort_by_key(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    files
        .pop()
        .with_context(|| format!("no object in \"{}\"", dir.display()))
}

/// Writes `bytes` over `path` (objects may be read-only), keeping its permissions.
fn overwrite(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let perms = fs::metadata(path)?.permissions();
    fs::set_permissions(path, fs::Permissions::from_mode(perms.mode() | 0o200))?;
    fs::write(path, bytes).with_context(|| format!("write \"{}\"", path.display()))?;
    fs::set_permissions(path, perms)?;
    Ok(())
}

/// Runs `klio server` expecting it to exit (not to serve), at most 60 s; returns its status
/// and standard error.
fn server_exits(k: &Klio, name: &str) -> anyhow::Result<(ExitStatus, String)> {
    let log = k.dir.path().join(format!("{name}.log"));
    let mut cmd = k.server_command();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?);
    let mut child = ChildGuard::spawn(&mut cmd)?;
    let status = wait_exit(&mut child, Duration::from_secs(60), "klio server")?;
    Ok((status, fs::read_to_string(&log)?))
}

/// One byte flipped in the middle of a pack, an index object, a blocklist or the manifest:
/// `klio verify` exits 1 naming the object, and `klio restore` fails naming it. Each case is
/// undone (and verify passes again) before the next. A wrong encryption key stops the
/// server with an error naming `keys.json`.
#[test]
fn corruption_detected_in_each_object_kind_and_wrong_key_refused() -> anyhow::Result<()> {
    let pg = PgCluster::start(PgOptions::default())?;
    pg.pgbench_init(2)?;
    let mut k = Klio::start(&["corrupt"])?;
    let _streamer = k.spawn_streamer("corrupt", &pg, "streamer", &[])?;
    k.wait_archived("corrupt", 1, Lsn(1), Duration::from_secs(60))?;
    let backup = k
        .backup("corrupt", &pg, &[])
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    let id = backup_id(&backup);
    let v = k.verify("corrupt", &[])?;
    assert!(v.status.success(), "klio verify:\n{}", output_text(&v));

    let repo = k.data.join("repository");
    let manifest = repo.join("manifests/corrupt").join(&id);
    assert!(
        manifest.is_file(),
        "no manifest at \"{}\"",
        manifest.display()
    );
    let id_of = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let pack = largest_object(&repo.join("packs"))?;
    let index = largest_object(&repo.join("index"))?;
    let blocklist = largest_object(&repo.join("blocklists"))?;
    let cases = [
        ("pack", id_of(&pack), pack),
        ("index object", id_of(&index), index),
        ("blocklist", id_of(&blocklist), blocklist),
        ("manifest", format!("manifests/corrupt/{id}"), manifest),
    ];
    for (what, name, path) in cases {
        let original = fs::read(&path)?;
        let mut bytes = original.clone();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x5a;
        overwrite(&path, &bytes)?;
        // The server reads the index objects when it starts.
        k.kill_server()?;
        k.start_server()?;

        let v = k.verify("corrupt", &[])?;
        let text = output_text(&v);
        assert_eq!(
            v.status.code(),
            Some(1),
            "{what}: klio verify must fail:\n{text}"
        );
        assert!(
            text.contains(&name),
            "{what}: klio verify must name \"{name}\":\n{text}"
        );

        if what == "index object" {
            // The server's block index cache still knows where every block is, so the data
            // restores (each block is authenticated and checked against its id); the
            // damaged index object shows in verify above, and once the cache is rebuilt
            // its blocks count as missing.
            k.kill_server()?;
            fs::remove_dir_all(k.data.join("cache"))?;
            k.start_server()?;
        }
        let dir = scratch_dir();
        let out = k.restore("corrupt", &dir.path().join("pgdata"), &["--backup-id", &id])?;
        let text = output_text(&out);
        assert!(
            !out.status.success(),
            "{what}: a restore of a corrupt backup must fail:\n{text}"
        );
        assert!(
            text.contains(&name),
            "{what}: klio restore must name \"{name}\":\n{text}"
        );

        overwrite(&path, &original)?;
        k.kill_server()?;
        k.start_server()?;
        let v = k.verify("corrupt", &[])?;
        assert!(
            v.status.success(),
            "{what} restored: klio verify:\n{}",
            output_text(&v)
        );
    }

    // Wrong encryption key: the server refuses to start and says why.
    k.kill_server()?;
    let key = fs::read(&k.key_file)?;
    fs::write(&k.key_file, "another key entirely\n")?;
    let (status, err) = server_exits(&k, "server-wrong-key")?;
    assert!(
        !status.success(),
        "the server must not start with another key"
    );
    assert!(
        err.contains("encryption key") && err.contains("keys.json"),
        "{err}"
    );
    fs::write(&k.key_file, &key)?;
    k.start_server()?;
    let v = k.verify("corrupt", &[])?;
    assert!(
        v.status.success(),
        "with the right key again: klio verify:\n{}",
        output_text(&v)
    );
    Ok(())
}

/// Asserts that a command run with another cluster's certificate was refused for cluster
/// "b": a permission error naming the certificate and the cluster.
fn assert_denied(out: &Output, cert: &str, what: &str) {
    let text = output_text(out);
    assert!(
        !out.status.success(),
        "{what} with certificate {cert} against cluster \"b\" must fail:\n{text}"
    );
    assert!(
        text.contains(&format!("\"{cert}\" may not")) && text.contains("cluster \"b\""),
        "{what}: the error must name the certificate and the cluster:\n{text}"
    );
}

/// With cluster a's certificate, nothing of cluster b's backups can be listed, shown,
/// taken, restored or verified; the snapshot reader cannot restore it either.
#[test]
fn authorization_other_clusters_certificate_cannot_touch_backups() -> anyhow::Result<()> {
    let k = Klio::start(&["a", "b"])?;
    let pg = PgCluster::start(PgOptions::default())?;
    pg.psql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i")?;
    let _streamer = k.spawn_streamer("b", &pg, "streamer-b", &[])?;
    k.wait_archived("b", 1, Lsn(1), Duration::from_secs(60))?;
    let backup = k
        .backup("b", &pg, &[])
        .map_err(|e| with_logs(e, &k, "streamer-b"))?;
    let id = backup_id(&backup);
    assert_eq!(backup_ids(&k.backups_list("b")?), std::slice::from_ref(&id));
    assert!(k.backups_list("a")?.is_empty());

    let as_a = |sub: &[&str]| k.client_command_with_cert(sub, "b", "client-a");
    let out = as_a(&["backups", "list"]).arg("--json").output()?;
    assert_denied(&out, "klio@a", "backups list");
    let out = as_a(&["backups", "show"]).args([&id, "--json"]).output()?;
    assert_denied(&out, "klio@a", "backups show");
    let out = as_a(&["backup"])
        .args(["--pg-dsn", &pg.dsn()])
        .arg("--pgdata")
        .arg(pg.data_dir())
        .arg("--json")
        .output()?;
    assert_denied(&out, "klio@a", "backup");
    let out = as_a(&["verify"]).output()?;
    assert_denied(&out, "klio@a", "verify");
    let dir = scratch_dir();
    let pgdata = dir.path().join("pgdata");
    let out = as_a(&["restore"])
        .arg("--pgdata")
        .arg(&pgdata)
        .args(["--backup-id", &id])
        .output()?;
    assert_denied(&out, "klio@a", "restore");
    assert!(
        !pgdata.join("PG_VERSION").exists(),
        "a refused restore wrote files"
    );

    let out = k
        .client_command_with_cert(&["restore"], "b", "snapshot-reader")
        .arg("--pgdata")
        .arg(&pgdata)
        .args(["--backup-id", &id])
        .output()?;
    assert_denied(
        &out,
        "snapshot_reader@klio",
        "restore as the snapshot reader",
    );
    assert!(
        !pgdata.join("PG_VERSION").exists(),
        "a refused restore wrote files"
    );

    // Nothing changed for cluster b.
    assert_eq!(backup_ids(&k.backups_list("b")?), [id]);
    Ok(())
}

/// A backup taken from a hot standby (CloudNativePG's default backup target) while the
/// primary is written to and archived: the restore reaches the primary's state.
#[test]
fn standby_backup_restores_to_the_primarys_state() -> anyhow::Result<()> {
    let primary = PgCluster::start(PgOptions::default())?;
    primary.pgbench_init(5)?;
    let standby = PgCluster::standby_of(&primary, PgOptions::default())?;
    let k = Klio::start(&["sb"])?;
    let _streamer = k.spawn_streamer("sb", &primary, "streamer", &[])?;
    k.wait_archived("sb", 1, Lsn(1), Duration::from_secs(60))?;
    // The standby must have replayed the pgbench tables before its backup starts.
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        "the standby to replay pgbench_accounts",
        || Ok(standby.psql("SELECT to_regclass('pgbench_accounts') IS NOT NULL")? == "t"),
    )?;

    let b = k
        .backup("sb", &standby, &[])
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    check_backup_json(&b, "sb");
    assert_eq!(b["from_standby"], true, "{b}");

    pgbench_burst(&primary)?;
    primary.psql("CREATE TABLE after_backup AS SELECT 42 AS answer")?;
    let end = switch_wal(&primary)?;
    k.wait_archived("sb", 1, end, Duration::from_secs(60))?;
    let expected = primary.table_checksums("postgres")?;
    let mut r = restore_and_start(&k, "sb", &[])?;
    check_restored(&mut r.pg, Some(&expected), true, "the standby's backup")?;
    Ok(())
}

/// A page whose checksum is wrong on disk is reported by the backup (file and block), as
/// pgBackRest does, and the backup still completes.
#[test]
fn checksum_failures_are_reported_with_file_and_block() -> anyhow::Result<()> {
    let mut pg = PgCluster::start(PgOptions::default())?;
    pg.psql(
        "CREATE TABLE cold AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 2000) g;
         CHECKPOINT",
    )?;
    let rel: String = pg.psql("SELECT pg_relation_filepath('cold')")?;
    pg.stop()?;
    // Damage block 3 of the table behind PostgreSQL's back.
    let path = pg.data_dir().join(&rel);
    let mut bytes = fs::read(&path)?;
    bytes[3 * 8192 + 4000] ^= 0xFF;
    fs::write(&path, &bytes)?;
    pg.start_again()?;

    let k = Klio::start(&["cs"])?;
    let _streamer = k.spawn_streamer("cs", &pg, "streamer", &[])?;
    k.wait_archived("cs", 1, Lsn(1), Duration::from_secs(60))?;
    let b = k
        .backup("cs", &pg, &[])
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    let failures = b["checksum_failures"]
        .as_array()
        .context("checksum_failures is not an array")?;
    assert_eq!(
        failures.len(),
        1,
        "exactly the damaged page must be reported: {failures:?}"
    );
    assert_eq!(failures[0]["path"], rel.as_str(), "{failures:?}");
    assert_eq!(failures[0]["block"], 3, "{failures:?}");
    Ok(())
}

const ONLY_LATEST_2: [&str; 12] = [
    "--keep-latest",
    "2",
    "--keep-hourly",
    "0",
    "--keep-daily",
    "0",
    "--keep-weekly",
    "0",
    "--keep-monthly",
    "0",
    "--keep-annual",
    "0",
];

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                total += dir_bytes(&e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

fn retention(k: &Klio, cluster: &str, sub: &str, extra: &[&str]) -> anyhow::Result<Value> {
    let mut cmd = k.client_command(&["retention", sub], cluster);
    cmd.arg("--json").args(extra);
    let out = run_ok(&mut cmd)?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// After four backups, `keepLatest: 2` keeps the two newest (planned first, then run), the
/// WAL before the older one's start is gone (history kept), garbage collection gives bytes
/// back, and a backup taken while retention and GC run restores exactly.
#[test]
fn retention_keeps_latest_2_removes_old_wal_and_gc_reclaims_space_during_a_backup()
-> anyhow::Result<()> {
    let pg = PgCluster::start(PgOptions::default())?;
    pg.pgbench_init(5)?;
    let k = Klio::start(&["ret"])?;
    let _streamer = k.spawn_streamer("ret", &pg, "streamer", &[])?;
    k.wait_archived("ret", 1, Lsn(1), Duration::from_secs(60))?;
    let mut backups = Vec::new();
    for _ in 0..4 {
        // Rewrite a good part of the table so each backup has blocks of its own.
        pg.psql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 3 = 0")?;
        let end = switch_wal(&pg)?;
        k.wait_archived("ret", 1, end, Duration::from_secs(60))?;
        let b = k
            .backup("ret", &pg, &["--no-retention"])
            .map_err(|e| with_logs(e, &k, "streamer"))?;
        backups.push(b);
        // Backup ids are seconds: keep them distinct.
        std::thread::sleep(Duration::from_millis(1100));
    }
    let ids: Vec<String> = backups.iter().map(backup_id).collect();
    assert_eq!(backup_ids(&k.backups_list("ret")?), ids);

    let plan = retention(&k, "ret", "plan", &ONLY_LATEST_2)?;
    let decisions = plan["decisions"].as_array().context("decisions")?;
    let kept: Vec<&str> = decisions
        .iter()
        .filter(|d| d["keep"] == true)
        .filter_map(|d| d["backup_id"].as_str())
        .collect();
    assert_eq!(kept, [ids[3].as_str(), ids[2].as_str()], "{plan}");
    assert!(
        decisions
            .iter()
            .filter(|d| d["keep"] == true)
            .all(|d| d["reasons"][0]
                .as_str()
                .is_some_and(|r| r.starts_with("latest-"))),
        "{plan}"
    );
    assert_eq!(
        k.backups_list("ret")?.len(),
        4,
        "a plan must not delete anything"
    );
    let first_kept_wal = str_field(&backups[2], "start_wal").to_string();
    assert_eq!(plan["first_wal_kept"], first_kept_wal.as_str(), "{plan}");
    let old_wal: Vec<String> = k
        .archived_files("ret")?
        .into_iter()
        .filter(|f| f.len() == 24 && *f < first_kept_wal)
        .collect();
    assert!(
        !old_wal.is_empty(),
        "the test needs WAL older than the kept backups"
    );

    // A fifth backup runs while retention expires two backups and collects garbage.
    let expected = pg.table_checksums("postgres")?;
    let repo = k.data.join("repository");
    let bytes_before = dir_bytes(&repo);
    let mut fifth = {
        let mut cmd = k.backup_command("ret", &pg, &["--jobs", "1", "--no-retention"]);
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(k.dir.path().join("fifth.out"))?)
            .stderr(fs::File::create(k.dir.path().join("fifth.log"))?);
        ChildGuard::spawn(&mut cmd)?
    };
    let run = retention(&k, "ret", "run", &ONLY_LATEST_2)?;
    let status = wait_exit(&mut fifth, Duration::from_secs(120), "the fifth backup")?;
    assert!(
        status.success(),
        "the backup running during GC failed:\n{}",
        fs::read_to_string(k.dir.path().join("fifth.log"))?
    );
    let fifth_json: Value = serde_json::from_slice(&fs::read(k.dir.path().join("fifth.out"))?)?;
    let deleted: Vec<&str> = run["deleted_backups"]
        .as_array()
        .context("deleted_backups")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        deleted.contains(&ids[0].as_str()) && deleted.contains(&ids[1].as_str()),
        "{run}"
    );
    let listed = backup_ids(&k.backups_list("ret")?);
    assert!(
        !listed.contains(&ids[0]) && !listed.contains(&ids[1]),
        "{listed:?}"
    );
    assert!(
        listed.contains(&ids[2]) && listed.contains(&ids[3]),
        "{listed:?}"
    );
    let files = k.archived_files("ret")?;
    for f in &old_wal {
        assert!(
            !files.contains(f),
            "{f} is older than every kept backup and must be gone"
        );
    }
    assert!(
        files.contains(&first_kept_wal),
        "{first_kept_wal} is needed: {files:?}"
    );
    let bytes_after = dir_bytes(&repo);
    eprintln!(
        "retention: repository {bytes_before} -> {bytes_after} bytes; gc {}",
        run["gc"]
    );
    assert!(
        run["gc"]["bytes_reclaimed"].as_u64().unwrap_or(0) > 0,
        "garbage collection reclaimed nothing: {run}"
    );

    let v = k.verify("ret", &[])?;
    assert!(v.status.success(), "klio verify:\n{}", output_text(&v));
    let mut r = restore_and_start(
        &k,
        "ret",
        &["--backup-id", &backup_id(&fifth_json), "--target-immediate"],
    )?;
    check_restored(
        &mut r.pg,
        Some(&expected),
        false,
        "the backup taken during GC",
    )?;
    Ok(())
}

/// A relation larger than one piece of a file list (a full 1 GiB segment is 131,072 block
/// ids, sent as its own piece, then a second segment): built cheaply by extending a table's
/// files with zeroed pages while PostgreSQL is stopped. The backup commits, `klio verify`
/// passes, and the restore gives files of the same sizes and contents, which PostgreSQL
/// reads. (`bench/large.sh` does the same with more than 20 GiB.)
#[test]
fn relation_larger_than_a_piece_is_backed_up_and_restored_byte_for_byte() -> anyhow::Result<()> {
    let mut pg = PgCluster::start(PgOptions::default())?;
    pg.psql("CREATE TABLE big (id int, payload text); INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 500) g; CHECKPOINT")?;
    let rel = pg
        .psql("SELECT pg_relation_filepath('big')")?
        .trim()
        .to_string();
    pg.stop()?;
    let first = pg.data_dir().join(&rel);
    let second = pg.data_dir().join(format!("{rel}.1"));
    fs::OpenOptions::new()
        .write(true)
        .open(&first)?
        .set_len(1 << 30)?;
    let f = fs::File::create(&second)?;
    f.set_len(3 << 20)?;
    drop(f);
    let status = std::process::Command::new("chown")
        .arg("postgres:postgres")
        .arg(&second)
        .status()?;
    anyhow::ensure!(status.success(), "chown {}", second.display());
    pg.start_again()?;

    let k = Klio::start(&["big"])?;
    let _streamer = k.spawn_streamer("big", &pg, "streamer", &[])?;
    let backup = k
        .backup("big", &pg, &["--no-retention"])
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    let blocks = backup["blocks_total"].as_u64().unwrap_or(0);
    assert!(blocks >= 131_072 + 384, "{blocks} blocks");
    let v = k.verify("big", &[])?;
    assert!(v.status.success(), "klio verify:\n{}", output_text(&v));

    let restored = restore_and_start(&k, "big", &["--target-immediate"])?;
    for (source, name) in [(&first, rel.clone()), (&second, format!("{rel}.1"))] {
        let copy = restored.pg.data_dir().join(&name);
        assert_eq!(
            fs::metadata(source)?.len(),
            fs::metadata(&copy)?.len(),
            "size of {name}"
        );
        assert!(same_content(source, &copy)?, "content of {name} differs");
    }
    assert_eq!(restored.pg.psql("SELECT count(*) FROM big")?.trim(), "500");
    Ok(())
}

/// Whether two files hold the same bytes (read 8 MiB at a time).
fn same_content(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        let mut m = 0;
        while m < n {
            let k = fb.read(&mut bb[m..n])?;
            if k == 0 {
                return Ok(false);
            }
            m += k;
        }
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(fb.read(&mut bb[..1])? == 0);
        }
    }
}
