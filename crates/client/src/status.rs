//! `klio status`: one screen per cluster (archive and stream, backups and recovery window
//! per tier, Tier 2 relay, queue, disk), and an exit status that says whether something
//! needs attention, so that it can serve as a probe.

use std::process::ExitCode;

use clap::Args;
use klio_proto::backup::v1 as pb;
use serde_json::Value;

use crate::backup::backup_client;
use crate::client::{ClientArgs, status_error};

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print JSON (the server's facts plus the problems found)
    #[arg(long)]
    pub json: bool,
    /// Archive lag, in seconds, beyond which the archive needs attention
    #[arg(long, default_value_t = 300)]
    pub max_archive_lag: u64,
    /// Age of the newest backup, in hours, beyond which backups need attention
    #[arg(long, default_value_t = 26)]
    pub max_backup_age: u64,
    /// Tier 2 relay lag, in seconds, beyond which the relay needs attention
    #[arg(long, default_value_t = 900)]
    pub max_relay_lag: u64,
    /// Free space of the server's data volume, in percent, below which it needs attention
    #[arg(long, default_value_t = 10)]
    pub min_free_percent: u64,
}

/// Exit status when something needs attention.
pub const EXIT_ATTENTION: u8 = 1;

/// Fetches the cluster's state, prints it and returns 0, or [`EXIT_ATTENTION`] with the
/// problems listed.
pub async fn run(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut c = backup_client(&a.client).await?;
    let r = c
        .cluster_status(pb::ClusterStatusRequest {
            cluster: a.client.cluster.clone(),
        })
        .await
        .map_err(|s| status_error("read the cluster's status", s))?
        .into_inner();
    let mut status: Value = serde_json::from_slice(&r.status_json)
        .map_err(|e| anyhow::anyhow!("the server's status is not JSON: {e}"))?;
    if !status.is_object() {
        anyhow::bail!("the server's status is not a JSON object");
    }
    let problems = problems(&status, &a);
    status["problems"] = Value::from(problems.clone());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_screen(&status, &problems);
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_ATTENTION)
    })
}

/// What needs attention, in words.
pub fn problems(s: &Value, a: &StatusArgs) -> Vec<String> {
    let mut out = Vec::new();
    let now = s["server_time"].as_f64().unwrap_or_default();
    let read_only = s["read_only"].as_bool().unwrap_or(false);
    let wal = &s["wal"];
    if !read_only {
        if !wal["stream_connected"].as_bool().unwrap_or(false) {
            out.push(match wal["last_archived_at"].as_f64() {
                Some(t) => format!(
                    "the WAL streamer is not connected (WAL last archived {} ago)",
                    ago(now - t)
                ),
                None => "the WAL streamer is not connected".to_string(),
            });
        }
        let lag = wal["lag_seconds"].as_f64().unwrap_or_default();
        if lag > a.max_archive_lag as f64 {
            out.push(format!(
                "the archive lags behind the primary by {} ({} bytes), more than --max-archive-lag {} s",
                ago(lag),
                wal["lag_bytes"].as_u64().unwrap_or_default(),
                a.max_archive_lag
            ));
        }
    }
    let tiers: &[&str] = if read_only { &["tier2"] } else { &["tier1"] };
    for tier in tiers {
        let b = &s["backups"][tier];
        match b["last_success"].as_f64() {
            None => out.push(format!(
                "{} holds no backup of the cluster",
                tier_name(tier)
            )),
            Some(t) if now - t > (a.max_backup_age * 3600) as f64 => out.push(format!(
                "the newest backup in {} ended {} ago, more than --max-backup-age {} h",
                tier_name(tier),
                ago(now - t),
                a.max_backup_age
            )),
            Some(_) => {}
        }
    }
    let t2 = &s["tier2"];
    if t2["used"].as_bool().unwrap_or(false) {
        if let Some(e) = t2["error"].as_str() {
            out.push(format!("Tier 2 is not available: {e}"));
        }
        let relay = &t2["relay"];
        if let Some(e) = relay["last_error"].as_str() {
            out.push(format!("the Tier 2 relay is failing: {e}"));
        }
        let lag = relay["lag_seconds"].as_f64().unwrap_or_default();
        if lag > a.max_relay_lag as f64 {
            out.push(format!(
                "Tier 2 lags behind Tier 1 by {} ({} WAL files), more than --max-relay-lag {} s",
                ago(lag),
                relay["pending_files"].as_u64().unwrap_or_default(),
                a.max_relay_lag
            ));
        }
    }
    if let Some(failed) = s["queue"]["failed"].as_array()
        && !failed.is_empty()
    {
        out.push(format!(
            "{} task(s) of the cluster are in the dead-letter list (klio admin queue list-failed)",
            failed.len()
        ));
    }
    let disk = &s["disk"];
    if let (Some(size), Some(free)) = (disk["volume_size"].as_u64(), disk["volume_free"].as_u64())
        && size > 0
        && free.saturating_mul(100) < size.saturating_mul(a.min_free_percent)
    {
        out.push(format!(
            "the server's data volume has {:.1}% free, less than --min-free-percent {}",
            free as f64 * 100.0 / size as f64,
            a.min_free_percent
        ));
    }
    out
}

fn tier_name(tier: &str) -> &'static str {
    if tier == "tier2" { "Tier 2" } else { "Tier 1" }
}

/// A duration in words: 42 s, 5 min, 3.2 h, 2.1 d.
fn ago(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} d", s / 86400.0)
    }
}

fn time_text(t: Option<f64>) -> String {
    let Some(t) = t else {
        return "-".to_string();
    };
    time::OffsetDateTime::from_unix_timestamp(t as i64)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".to_string())
}

fn bytes_text(b: Option<u64>) -> String {
    match b {
        None => "-".to_string(),
        Some(b) if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
        Some(b) if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        Some(b) => format!("{b} B"),
    }
}

fn print_screen(s: &Value, problems: &[String]) {
    let now = s["server_time"].as_f64().unwrap_or_default();
    let wal = &s["wal"];
    println!("cluster {}", s["cluster"].as_str().unwrap_or_default());
    println!(
        "  WAL archive   end {} on timeline {}; streamer {}{}",
        wal["archive_end_lsn"].as_str().unwrap_or("-"),
        wal["timeline"]
            .as_u64()
            .map_or("-".to_string(), |t| t.to_string()),
        if wal["stream_connected"].as_bool().unwrap_or(false) {
            "connected"
        } else {
            "NOT connected"
        },
        if wal["synchronous"].as_bool().unwrap_or(false) {
            " (synchronous)"
        } else {
            ""
        }
    );
    println!(
        "                lag {} bytes, {}; last archived {}",
        wal["lag_bytes"].as_u64().unwrap_or_default(),
        ago(wal["lag_seconds"].as_f64().unwrap_or_default()),
        time_text(wal["last_archived_at"].as_f64())
    );
    for tier in ["tier1", "tier2"] {
        let b = &s["backups"][tier];
        if b.is_null() {
            continue;
        }
        println!(
            "  {}        {} backups; newest {} ({}, {} ago, {} s, {} logical, {} new)",
            tier_name(tier),
            b["count"].as_u64().unwrap_or_default(),
            b["last_backup_id"].as_str().unwrap_or("-"),
            time_text(b["last_success"].as_f64()),
            b["last_success"]
                .as_f64()
                .map_or("-".to_string(), |t| ago(now - t)),
            b["last_duration_seconds"]
                .as_f64()
                .map_or("-".to_string(), |d| format!("{d:.0}")),
            bytes_text(b["last_logical_bytes"].as_u64()),
            bytes_text(b["last_new_bytes"].as_u64()),
        );
        let w = &s["recovery_window"][tier];
        if !w.is_null() {
            println!(
                "                recovery window {} .. {}",
                time_text(w["from"].as_f64()),
                time_text(w["to"].as_f64())
            );
        }
    }
    let t2 = &s["tier2"];
    if t2["used"].as_bool().unwrap_or(false) {
        let r = &t2["relay"];
        println!(
            "  Tier 2 relay  {} files ({}) behind, {}{}",
            r["pending_files"].as_u64().unwrap_or_default(),
            bytes_text(r["pending_bytes"].as_u64()),
            ago(r["lag_seconds"].as_f64().unwrap_or_default()),
            r["last_error"]
                .as_str()
                .map_or(String::new(), |e| format!("; FAILING: {e}"))
        );
    }
    let q = &s["queue"];
    println!(
        "  queue         {} pending (all clusters), {} failed for this cluster",
        q["pending_all_clusters"]
            .as_u64()
            .map_or("-".to_string(), |n| n.to_string()),
        q["failed"].as_array().map_or(0, Vec::len)
    );
    let d = &s["disk"];
    println!(
        "  disk          WAL {}; volume {} free of {}",
        bytes_text(d["wal_bytes"].as_u64()),
        bytes_text(d["volume_free"].as_u64()),
        bytes_text(d["volume_size"].as_u64())
    );
    if problems.is_empty() {
        println!("  OK");
    } else {
        for p in problems {
            println!("  ATTENTION: {p}");
        }
    }
}
