//! pgbench load for the end-to-end tests, and pgbench's invariant to judge a restore by.

use std::process::Stdio;
use std::time::Duration;

use klio_test_support::{ChildGuard, PgCluster, wait_until};

use super::{Klio, with_logs};

/// `klio backup` of `pg` for `cluster` with `flags`, taken while pgbench writes (checked:
/// the load still runs when the backup ends); then the load is stopped and its sessions
/// are gone. Returns the backup's JSON.
pub fn backup_under_load(
    k: &Klio,
    cluster: &str,
    pg: &PgCluster,
    flags: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut load = pgbench_background(pg, 600)?;
    std::thread::sleep(Duration::from_secs(1));
    let backup = k
        .backup(cluster, pg, flags)
        .map_err(|e| with_logs(e, k, "streamer"))?;
    assert!(
        load.is_running(),
        "pgbench stopped before the backup ended: the backup was not taken under load"
    );
    load.kill()?;
    wait_no_pgbench(pg)?;
    Ok(backup)
}

/// pgbench (TPC-B, 2 clients) for at most `secs` seconds, in the background. `-n`: no
/// vacuum step, which would truncate `pgbench_history`; so the balances keep adding up (see
/// [`check_pgbench_balanced`]).
pub fn pgbench_background(pg: &PgCluster, secs: u64) -> anyhow::Result<ChildGuard> {
    let mut cmd = pg.client_command("pgbench");
    cmd.arg("-h").arg(pg.socket_dir());
    cmd.args([
        "-p",
        &pg.port().to_string(),
        "-U",
        "postgres",
        "-n",
        "-c",
        "2",
        "-T",
        &secs.to_string(),
        "postgres",
    ]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ChildGuard::spawn(&mut cmd)
}

/// A burst of pgbench transactions, run to completion: nothing is written once it returns.
pub fn pgbench_burst(pg: &PgCluster) -> anyhow::Result<()> {
    pg.pgbench(&["-n", "-c", "2", "-t", "250"])?;
    Ok(())
}

/// Waits until the sessions of a killed pgbench are gone (their transactions rolled back).
pub fn wait_no_pgbench(pg: &PgCluster) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        "the killed pgbench's sessions to end",
        || {
            Ok(pg
                .psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'")?
                == "0")
        },
    )
}

/// pgbench's invariant in every committed state: each transaction adds the same delta to an
/// account, its teller and its branch and records it in the history, all starting from 0.
/// A restore that mixes states from different moments breaks it.
pub fn check_pgbench_balanced(pg: &PgCluster, what: &str) -> anyhow::Result<()> {
    let out = pg.psql(
        "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts), \
                (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers), \
                (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches), \
                (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
    )?;
    let sums: Vec<&str> = out.split('|').collect();
    assert_eq!(sums.len(), 4, "{what}: unexpected psql output {out:?}");
    assert!(
        sums.iter().all(|s| *s == sums[0]),
        "{what}: pgbench's balances do not add up (accounts|tellers|branches|history): {out}"
    );
    Ok(())
}
