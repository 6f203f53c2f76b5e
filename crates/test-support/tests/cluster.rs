//! Component tests of the test-support crate itself, against real PostgreSQL.

use std::time::{Duration, Instant};

use klio_test_support::{
    Auth, PgCluster, PgMajor, PgOptions, PgReceiveWal, scratch_dir, wait_until,
};

#[test]
fn cluster_trust_kill9_then_start_again_keeps_committed_rows() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut pg = PgCluster::start(PgOptions::default())?;
    assert_eq!(pg.psql("SELECT 1")?, "1");
    assert_eq!(pg.psql("SHOW data_checksums")?, "on");
    assert_eq!(pg.psql("SHOW wal_level")?, "replica");
    assert_eq!(pg.psql("SHOW port")?, pg.port().to_string());
    pg.psql("CREATE TABLE t (i int, s text); INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 1000) g;")?;
    let before = pg.table_checksums("postgres")?;
    assert_eq!(before.keys().collect::<Vec<_>>(), ["public.t"]);

    pg.kill9()?;
    assert!(pg.psql("SELECT 1").is_err());
    pg.start_again()?;
    assert_eq!(pg.psql("SELECT count(*) FROM t")?, "1000");
    assert_eq!(pg.table_checksums("postgres")?, before);
    assert!(
        pg.log_contents()
            .contains("database system was interrupted")
    );

    pg.restart()?;
    pg.append_conf("work_mem = '7MB'")?;
    pg.reload()?;
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        "work_mem reload",
        || Ok(pg.psql("SHOW work_mem")? == "7MB"),
    )?;
    eprintln!("took {:?}", t0.elapsed());
    Ok(())
}

#[test]
fn cluster_password_auth_methods_accept_the_right_password_only() -> anyhow::Result<()> {
    for auth in [
        Auth::scram("s3cret pass"),
        Auth::Md5 {
            password: "md5'pw".into(),
        },
    ] {
        let pg = PgCluster::start(PgOptions::default().with_auth(auth.clone()))?;
        assert_eq!(pg.psql("SELECT current_user")?, "postgres");
        let method = auth.hba_method();
        let rules = pg.psql(&format!(
            "SELECT count(*) FROM pg_hba_file_rules WHERE auth_method = '{method}'"
        ))?;
        assert_eq!(rules, "4");
        if let Auth::Md5 { .. } = auth {
            assert_eq!(
                pg.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'postgres'")?,
                "md5"
            );
        }
        let mut wrong = klio_test_support::postgres_command("psql");
        wrong
            .env("PGPASSWORD", "wrong")
            .args(["-X", "-At", "-c", "SELECT 1", "-d"]);
        wrong.arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            pg.port()
        ));
        let out = wrong.output()?;
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("password authentication failed"));

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let n: i32 = rt.block_on(async {
            let client = pg.connect().await?;
            anyhow::Ok(client.query_one("SELECT 41 + 1", &[]).await?.get(0))
        })?;
        assert_eq!(n, 42);
    }
    Ok(())
}

#[test]
fn standby_of_streams_then_promote_ends_recovery() -> anyhow::Result<()> {
    let primary = PgCluster::start(PgOptions::default().with_auth(Auth::scram("pw")))?;
    primary.psql("CREATE TABLE t AS SELECT generate_series(1, 100) AS i")?;
    let standby = PgCluster::standby_of(&primary, PgOptions::default())?;
    assert_ne!(standby.port(), primary.port());
    assert!(standby.is_in_recovery()?);
    primary.psql("INSERT INTO t SELECT generate_series(101, 200)")?;
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "standby to replay",
        || Ok(standby.psql("SELECT count(*) FROM t")? == "200"),
    )?;
    standby.promote()?;
    standby.wait_for_recovery_end(Duration::from_secs(30))?;
    assert!(
        standby
            .psql("SELECT pg_walfile_name(pg_current_wal_lsn())")?
            .starts_with("00000002")
    );
    standby.psql("INSERT INTO t VALUES (201)")?;
    assert_eq!(standby.psql("SELECT count(*) FROM t")?, "201");
    Ok(())
}

#[test]
fn basebackup_restores_with_from_data_dir_and_receivewal_completes_segments() -> anyhow::Result<()>
{
    let primary = PgCluster::start(PgOptions::default())?;
    let mut receiver = PgReceiveWal::start(&primary, Some("test_slot"))?;
    assert_eq!(
        primary.psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'test_slot'")?,
        "t"
    );
    primary.psql("CREATE TABLE t AS SELECT generate_series(1, 5000) AS i")?;
    let segment = primary.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")?;
    primary.psql("SELECT pg_switch_wal()")?;
    let path = receiver.wait_for_segment(&segment, Duration::from_secs(30))?;
    assert_eq!(std::fs::metadata(path)?.len(), 16 << 20);

    let dest = scratch_dir();
    primary.basebackup(dest.path(), &["-X", "stream"])?;
    let expected = primary.table_checksums("postgres")?;
    let restored = PgCluster::from_data_dir(dest, PgOptions::default())?;
    assert_ne!(restored.port(), primary.port());
    assert!(!restored.is_in_recovery()?);
    assert_eq!(restored.table_checksums("postgres")?, expected);
    Ok(())
}

/// Every major runs its own server (initdb, pg_ctl, postgres of that version), clients from
/// PostgreSQL 15 work against it, and a stopped data directory is adopted with the major
/// `PG_VERSION` names. Fails (naming `scripts/install-pg-majors.sh`) when a major is missing.
#[test]
fn each_major_initdb_start_and_adopt_run_that_majors_server() -> anyhow::Result<()> {
    for major in PgMajor::ALL {
        let mut pg = PgCluster::start(PgOptions::default().with_major(major))?;
        assert_eq!(pg.major(), major);
        let version_num: u32 = pg.psql("SHOW server_version_num")?.parse()?;
        assert_eq!(version_num / 10000, major.number(), "{major}");
        assert_eq!(pg.psql("SHOW data_checksums")?, "on", "{major}");
        pg.pgbench_init(1)?;
        pg.stop()?;
        let copy = scratch_dir();
        let data = copy.path().join("data");
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(pg.data_dir())
            .arg(&data)
            .status()?;
        assert!(status.success());
        let wrong = PgMajor::ALL.into_iter().find(|&m| m != major).unwrap();
        let e = PgCluster::from_data_path(&data, PgOptions::default().with_major(wrong))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&major.to_string()), "{e}");
        let adopted = PgCluster::from_data_path(&data, PgOptions::default())?;
        assert_eq!(adopted.major(), major);
        assert_eq!(adopted.psql("SELECT count(*) FROM pgbench_branches")?, "1");
    }
    Ok(())
}

/// PostgreSQL 15's pg_basebackup refuses newer servers: copying a cluster of a major whose
/// directory has no pg_basebackup fails early and says what to do instead.
#[test]
fn standby_of_a_newer_major_without_its_pg_basebackup_fails_clearly() -> anyhow::Result<()> {
    let major = PgMajor::V18;
    if major.has_own("pg_basebackup") {
        return Ok(()); // a full installation: standby_of works
    }
    let primary = PgCluster::start(PgOptions::default().with_major(major))?;
    let e = PgCluster::standby_of(&primary, PgOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("pg_basebackup of PostgreSQL 18"), "{e}");
    Ok(())
}
