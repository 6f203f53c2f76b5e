//! Restoring with `klio restore`, starting PostgreSQL on the result, and checking it.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use klio_test_support::{PgCluster, PgMajor, PgOptions, postgres_command};

use super::{Klio, output_text};

/// Whether `extra` asks `klio restore` for a recovery target.
pub fn has_target(extra: &[&str]) -> bool {
    extra
        .iter()
        .any(|a| a.starts_with("--target-") && *a != "--target-timeline")
}

/// Runs `klio restore` into `pgdata` and fails with its output unless it succeeds; checks
/// that it wrote a data directory set up for archive recovery, and returns what it printed.
pub fn restore_ok(
    k: &Klio,
    cluster: &str,
    pgdata: &Path,
    extra: &[&str],
) -> anyhow::Result<String> {
    let out = k.restore(cluster, pgdata, extra)?;
    let text = output_text(&out);
    if !out.status.success() {
        bail!("klio restore {extra:?} failed with {}:\n{text}", out.status);
    }
    eprintln!("klio restore {extra:?}:\n{}", text.trim_end());
    for f in [
        "PG_VERSION",
        "global/pg_control",
        "backup_label",
        "recovery.signal",
    ] {
        assert!(pgdata.join(f).exists(), "restore wrote no {f}:\n{text}");
    }
    assert!(
        !pgdata.join("standby.signal").exists(),
        "a restore recovers and promotes; it must not make a standby"
    );
    let auto = fs::read_to_string(pgdata.join("postgresql.auto.conf"))
        .context("read the restored postgresql.auto.conf")?;
    assert!(
        auto.contains("restore_command") && auto.contains("wal-get"),
        "postgresql.auto.conf has no restore_command running klio wal-get:\n{auto}"
    );
    if has_target(extra) {
        assert!(
            auto.contains("recovery_target") && auto.contains("recovery_target_action"),
            "postgresql.auto.conf lacks the recovery target of {extra:?}:\n{auto}"
        );
    }
    Ok(text)
}

/// Starts PostgreSQL on a restored data directory (giving it, and its tablespaces, to the
/// `postgres` user) and waits until recovery has ended: the target reached, or the end of
/// the archive, then promotion.
pub fn start_restored(pgdata: &Path) -> anyhow::Result<PgCluster> {
    let opts = PgOptions {
        start_timeout: Duration::from_secs(300),
        ..PgOptions::default()
    };
    let pg = PgCluster::from_data_path(pgdata, opts)?;
    pg.wait_for_recovery_end(Duration::from_secs(300))?;
    Ok(pg)
}

/// `pg_amcheck --all --heapallindexed` (installing amcheck where missing) against `pg`.
pub fn run_pg_amcheck(pg: &PgCluster) -> anyhow::Result<()> {
    let mut cmd = pg.client_command("pg_amcheck");
    cmd.arg("-h").arg(pg.socket_dir());
    cmd.args([
        "-p",
        &pg.port().to_string(),
        "-U",
        "postgres",
        "--all",
        "--install-missing",
        "--heapallindexed",
    ]);
    cmd.stdin(Stdio::null());
    let out = cmd.output().context("run pg_amcheck")?;
    if !out.status.success() {
        bail!(
            "pg_amcheck failed with {}:\n{}",
            out.status,
            output_text(&out)
        );
    }
    Ok(())
}

/// `pg_checksums --check` of a cleanly stopped data directory.
///
/// PostgreSQL 15's `pg_checksums` reads `pg_control` layout 1300, which 16 shares; 17 and 18
/// changed it and 15's refuses their data directories, and the npm builds of those majors
/// ship no `pg_checksums`. For them the check is skipped unless the major's binary directory
/// has its own: [`run_pg_amcheck`] with `--heapallindexed` has already read every heap and
/// B-tree page through the buffer manager, which verifies each page's checksum.
pub fn run_pg_checksums(data_dir: &Path) -> anyhow::Result<()> {
    let major = PgMajor::of_data_dir(data_dir)?;
    let mut cmd = if major.has_own("pg_checksums") {
        postgres_command(major.bin_dir().join("pg_checksums"))
    } else if major <= PgMajor::V16 {
        postgres_command("pg_checksums")
    } else {
        eprintln!("{major}: no pg_checksums of its own, PostgreSQL 15's refuses it; skipped");
        return Ok(());
    };
    cmd.arg("--check").arg("-D").arg(data_dir);
    cmd.stdin(Stdio::null());
    let out = cmd.output().context("run pg_checksums")?;
    if !out.status.success() {
        bail!(
            "pg_checksums --check failed with {}:\n{}",
            out.status,
            output_text(&out)
        );
    }
    Ok(())
}
