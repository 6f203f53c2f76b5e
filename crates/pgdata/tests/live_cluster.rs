#![allow(clippy::unwrap_used)]
//! `scan` and the page checks against a real PostgreSQL 15 cluster (initdb with data
//! checksums), with `pg_checksums` as the reference for checksum values.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, bail, ensure};
use klio_pgdata::{
    EntryKind, Fork, PAGE_SIZE, PageCheck, RELSEG_PAGES, Scan, check_page, check_relation_chunk,
    scan,
};
use klio_test_support::{PgCluster, PgOptions, ScratchDir, postgres_command};

/// One failure reported by `pg_checksums --check`.
#[derive(Debug, PartialEq, Eq)]
struct ChecksumFailure {
    file: String,
    block: u32,
    calculated: u16,
    stored: u16,
}

/// Runs `pg_checksums --check` on the stopped cluster in `data_dir` and returns the failures
/// it reports (none when it exits successfully).
fn pg_checksums(data_dir: &Path) -> anyhow::Result<Vec<ChecksumFailure>> {
    let mut cmd = postgres_command("pg_checksums");
    cmd.arg("--check").arg("-D").arg(data_dir);
    let output = cmd.output().context("run pg_checksums")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let mut failures = Vec::new();
    for line in text.lines() {
        let Some((_, rest)) = line.split_once("checksum verification failed in file \"") else {
            continue;
        };
        let parsed = (|| {
            let (file, rest) = rest.split_once("\", block ")?;
            let (block, rest) = rest.split_once(": calculated checksum ")?;
            let (calculated, stored) = rest.split_once(" but block contains ")?;
            Some(ChecksumFailure {
                file: file.to_string(),
                block: block.parse().ok()?,
                calculated: u16::from_str_radix(calculated.trim(), 16).ok()?,
                stored: u16::from_str_radix(stored.trim(), 16).ok()?,
            })
        })();
        match parsed {
            Some(failure) => failures.push(failure),
            None => bail!("cannot parse pg_checksums line {line:?}"),
        }
    }
    ensure!(
        output.status.success() == failures.is_empty(),
        "pg_checksums exited with {} and reported {} failures:\n{text}",
        output.status,
        failures.len()
    );
    Ok(failures)
}

/// Invalid pages (block number and outcome) by entry path.
type InvalidPages = BTreeMap<String, Vec<(u32, PageCheck)>>;

/// Checks every page of every relation file in the scan; returns the invalid pages by path,
/// and how many pages were valid.
fn check_all_relation_files(scan: &Scan) -> anyhow::Result<(InvalidPages, usize)> {
    let mut invalid = BTreeMap::new();
    let mut valid = 0;
    for entry in &scan.entries {
        let Some(relation) = entry.relation else {
            continue;
        };
        let data = fs::read(&entry.abs_path)
            .with_context(|| format!("read {}", entry.abs_path.display()))?;
        ensure!(
            data.len() % PAGE_SIZE == 0,
            "{} is not a whole number of pages",
            entry.path
        );
        let first = relation.segment * RELSEG_PAGES;
        let mut bad = Vec::new();
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let blkno = first + i as u32;
            match check_page(page, blkno, u64::MAX) {
                PageCheck::Valid => valid += 1,
                PageCheck::New => {}
                PageCheck::Newer => bail!("{} block {blkno} is newer than u64::MAX", entry.path),
                check @ PageCheck::Invalid { .. } => bad.push((blkno, check)),
            }
        }
        ensure!(
            check_relation_chunk(&data, first, u64::MAX) == bad,
            "check_relation_chunk disagrees with check_page on {}",
            entry.path
        );
        if !bad.is_empty() {
            invalid.insert(entry.path.clone(), bad);
        }
    }
    Ok((invalid, valid))
}

#[test]
fn scan_real_cluster_excludes_and_checksums_match_pg_checksums() -> anyhow::Result<()> {
    let ts_dir = ScratchDir::new()?;
    let mut pg = PgCluster::start(PgOptions::default())?;
    pg.psql("CREATE TABLE t (id int, payload text)")?;
    pg.psql("INSERT INTO t SELECT i, repeat(md5(i::text), 4) FROM generate_series(1, 5000) i")?;
    pg.psql("CREATE UNLOGGED TABLE u AS SELECT i FROM generate_series(1, 1000) i")?;
    pg.psql("VACUUM u")?; // gives the unlogged table _fsm and _vm forks too
    pg.psql(&format!(
        "CREATE TABLESPACE ts LOCATION '{}'",
        ts_dir.path().display()
    ))?;
    pg.psql("CREATE TABLE in_ts TABLESPACE ts AS SELECT i FROM generate_series(1, 1000) i")?;
    pg.psql("CHECKPOINT")?;
    let t_path = pg.psql("SELECT pg_relation_filepath('t')")?;
    let u_path = pg.psql("SELECT pg_relation_filepath('u')")?;
    let in_ts_path = pg.psql("SELECT pg_relation_filepath('in_ts')")?;
    let ts_oid: u32 = pg
        .psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'")?
        .parse()?;
    let data_dir = pg.data_dir().to_path_buf();

    // While the server runs, postmaster.pid and the relation cache files exist but are left out.
    ensure!(data_dir.join("postmaster.pid").exists());
    ensure!(data_dir.join("global/pg_internal.init").exists());
    let running = scan(&data_dir)?;
    let running_paths: Vec<&str> = running.entries.iter().map(|e| e.path.as_str()).collect();
    for absent in [
        "postmaster.pid",
        "postmaster.opts",
        "global/pg_internal.init",
    ] {
        ensure!(!running_paths.contains(&absent), "{absent} listed");
    }
    ensure!(running_paths.contains(&t_path.as_str()), "{t_path} missing");

    pg.stop()?;
    let stopped = scan(&data_dir)?;
    let paths: Vec<&str> = stopped.entries.iter().map(|e| e.path.as_str()).collect();
    for present in [
        "PG_VERSION",
        "global/pg_control",
        "global/pg_filenode.map",
        "pg_wal",
        "pg_wal/archive_status",
        "pg_xact/0000",
        t_path.as_str(),
        in_ts_path.as_str(),
    ] {
        ensure!(
            paths.contains(&present),
            "{present} missing from {paths:#?}"
        );
    }
    ensure!(!paths.contains(&"postmaster.pid"), "postmaster.pid listed");
    ensure!(
        !paths
            .iter()
            .any(|p| p.starts_with("pg_wal/") && *p != "pg_wal/archive_status"),
        "WAL listed"
    );
    ensure!(data_dir.join(&u_path).exists());
    ensure!(data_dir.join(format!("{u_path}_fsm")).exists());
    ensure!(
        !paths.contains(&u_path.as_str()),
        "unlogged main fork listed"
    );
    ensure!(
        !paths.contains(&format!("{u_path}_fsm").as_str()),
        "unlogged fsm fork listed"
    );
    let u_init = format!("{u_path}_init");
    ensure!(paths.contains(&u_init.as_str()), "{u_init} missing");
    let init_entry = stopped.entries.iter().find(|e| e.path == u_init).unwrap();
    ensure!(init_entry.relation.map(|r| r.fork) == Some(Fork::Init));

    // The tablespace: a link, its location, and its contents under pg_tblspc/<oid>.
    let link_path = format!("pg_tblspc/{ts_oid}");
    let link = stopped
        .entries
        .iter()
        .find(|e| e.path == link_path)
        .context("tablespace link missing")?;
    ensure!(
        link.kind
            == EntryKind::Symlink {
                target: ts_dir.path().to_str().unwrap().to_string()
            },
        "{link:?}"
    );
    ensure!(stopped.tablespaces.len() == 1);
    ensure!(stopped.tablespaces[0].oid == ts_oid);
    ensure!(stopped.tablespaces[0].location == ts_dir.path());
    ensure!(in_ts_path.starts_with(&format!("{link_path}/PG_15_")));
    let in_ts = stopped
        .entries
        .iter()
        .find(|e| e.path == in_ts_path)
        .unwrap();
    ensure!(in_ts.relation.is_some() && in_ts.size > 0);
    ensure!(fs::read(&in_ts.abs_path)?.len() as u64 == in_ts.size);

    // Every page of every relation file is valid (or new), as pg_checksums agrees.
    ensure!(pg_checksums(&data_dir)?.is_empty());
    let (invalid, valid) = check_all_relation_files(&stopped)?;
    ensure!(invalid.is_empty(), "invalid pages: {invalid:?}");
    ensure!(valid > 100, "only {valid} valid pages checked");

    // Flip one byte in the middle of block 2 of t: exactly that page is invalid, with the
    // checksums pg_checksums reports.
    let t_file = data_dir.join(&t_path);
    let mut data = fs::read(&t_file)?;
    ensure!(
        data.len() >= 4 * PAGE_SIZE,
        "t has only {} bytes",
        data.len()
    );
    let block = 2u32;
    data[block as usize * PAGE_SIZE + PAGE_SIZE / 2] ^= 0x5A;
    fs::write(&t_file, &data)?;

    let failures = pg_checksums(&data_dir)?;
    ensure!(failures.len() == 1, "pg_checksums: {failures:?}");
    let failure = &failures[0];
    ensure!(failure.file.ends_with(&t_path), "{failure:?}");
    ensure!(failure.block == block, "{failure:?}");

    let (invalid, _) = check_all_relation_files(&scan(&data_dir)?)?;
    assert_eq!(
        invalid,
        BTreeMap::from([(
            t_path.clone(),
            vec![(
                block,
                PageCheck::Invalid {
                    expected: failure.calculated,
                    found: failure.stored,
                }
            )]
        )])
    );
    Ok(())
}
