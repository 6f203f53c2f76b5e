//! Tier 2 on an S3-compatible server: the server flags, the work queue's status through
//! `klio admin queue`, and waiting for the relay.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use klio_test_support::{ScratchDir, wait_until};
use serde_json::Value;

use super::{Klio, klio, output_text, run_ok, tail};

/// The server flags of Tier 2 in `bucket` (prefix `dr`) at `endpoint`, encrypted with
/// `key_file`, relaying every half second and retrying failed jobs after at most 2 s.
pub fn tier2_flags(endpoint: &str, bucket: &str, key_file: &Path) -> Vec<String> {
    vec![
        "--tier2-s3-bucket".into(),
        bucket.into(),
        "--tier2-s3-prefix".into(),
        "dr".into(),
        "--tier2-s3-endpoint".into(),
        endpoint.into(),
        "--tier2-s3-region".into(),
        "us-east-1".into(),
        "--tier2-encryption-key-file".into(),
        key_file.display().to_string(),
        "--tier2-relay-interval".into(),
        "0.5".into(),
        "--queue-max-backoff".into(),
        "2".into(),
    ]
}

/// A Tier 2 passphrase different from Tier 1's.
pub fn tier2_key(dir: &ScratchDir, name: &str, passphrase: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, passphrase).unwrap();
    p
}

/// `klio admin queue <args>` with the admin certificate; the caller judges the exit status.
pub fn admin_queue(k: &Klio, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let p = |f: &str| k.pki.join(f).display().to_string();
    let mut cmd = klio();
    cmd.arg("admin")
        .arg("queue")
        .args(args)
        .args(["--server-address", "127.0.0.1"])
        .args(["--base-port", &k.base_port.to_string()])
        .args(["--client-cert", &p("admin.crt")])
        .args(["--client-key", &p("admin.key")])
        .args(["--server-ca", &p("ca.crt")]);
    cmd.output().context("run klio admin queue")
}

/// `klio admin queue status --json`.
pub fn queue_status(k: &Klio) -> anyhow::Result<Value> {
    let out = admin_queue(k, &["status", "--json"])?;
    if !out.status.success() {
        bail!("klio admin queue status failed:\n{}", output_text(&out));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The last WAL file relayed to Tier 2 for `cluster`, per a [`queue_status`].
pub fn last_wal_relayed(status: &Value, cluster: &str) -> String {
    status["relay"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["cluster"] == cluster)
        .and_then(|r| r["last_wal_relayed"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Backups as `klio backups list --tier2-recovery --json` shows them.
pub fn backups_both_tiers(k: &Klio, cluster: &str) -> anyhow::Result<Vec<Value>> {
    let mut cmd = k.client_command(&["backups", "list", "--tier2-recovery", "--json"], cluster);
    let out = run_ok(&mut cmd)?;
    Ok(serde_json::from_slice::<Vec<Value>>(&out.stdout)?)
}

/// Waits until Tier 2 holds backup `id` and the WAL up to `segment`, and the queue is empty.
pub fn wait_relayed(k: &Klio, cluster: &str, id: &str, segment: &str) -> anyhow::Result<()> {
    let what = format!("Tier 2 to hold backup {id} and WAL up to {segment}");
    wait_until(
        Duration::from_secs(180),
        Duration::from_millis(500),
        &what,
        || {
            // A failed look (S3 just came back) is a "not yet".
            let look = || -> anyhow::Result<bool> {
                let backups = backups_both_tiers(k, cluster)?;
                let has_backup = backups
                    .iter()
                    .any(|b| b["backup_id"] == id && b["in_tier2"] == true);
                let status = queue_status(k)?;
                Ok(has_backup
                    && last_wal_relayed(&status, cluster).as_str() >= segment
                    && status["pending"] == 0)
            };
            Ok(look().unwrap_or_else(|e| {
                eprintln!("not yet: {e:#}");
                false
            }))
        },
    )
    .map_err(|e| e.context(format!("server log:\n{}", tail(&k.server_log(), 60))))
}
