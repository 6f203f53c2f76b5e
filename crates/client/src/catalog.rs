//! `klio backups list|show` and `klio verify`: the catalog of a cluster's base backups.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use klio_proto::backup::v1 as pb;
use serde_json::Value;

use crate::backup::backup_client;
use crate::client::{ClientArgs, status_error};
use crate::restore::list_backups;

#[derive(Subcommand, Debug)]
pub enum BackupsCommand {
    /// List the complete backups of the cluster, oldest first
    List(ListArgs),
    /// Show one backup
    Show(ShowArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The backup id (backup-YYYYMMDDhhmmss)
    pub backup_id: String,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The tier to verify: 1 (local volume) or 2 (object storage: its backups and the
    /// cluster's WAL objects)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub tier: u32,
    /// Verify only this backup (default: every backup of the cluster)
    #[arg(long)]
    pub backup_id: Option<String>,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

fn mb(v: &Value) -> String {
    v.as_u64()
        .map(|b| format!("{:.1} MB", b as f64 / 1e6))
        .unwrap_or_else(|| "?".into())
}

/// Runs `klio backups ...`.
pub async fn backups(cmd: BackupsCommand) -> anyhow::Result<()> {
    match cmd {
        BackupsCommand::List(a) => {
            let mut c = backup_client(&a.client).await?;
            let list = list_backups(&mut c, &a.client.cluster, a.client.tier2_recovery).await?;
            if a.json {
                let v: Vec<Value> = list
                    .iter()
                    .map(|b| {
                        let mut m = b.metadata.clone();
                        if let Some(o) = m.as_object_mut() {
                            o.insert("in_tier1".into(), b.in_tier1.into());
                            o.insert("in_tier2".into(), b.in_tier2.into());
                        }
                        m
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<22} {:>3} {:<20} {:<20} {:>12} {:>12}  TIERS",
                "BACKUP", "TLI", "START LSN", "STOPPED AT", "SIZE", "NEW"
            );
            for b in &list {
                let m = &b.metadata;
                if let Some(e) = m.get("error") {
                    println!("{:<22} unreadable: {e}", b.id);
                    continue;
                }
                let tiers = match (b.in_tier1, b.in_tier2) {
                    (true, true) => "1,2",
                    (true, false) => "1",
                    (false, true) => "2",
                    (false, false) => "-",
                };
                println!(
                    "{:<22} {:>3} {:<20} {:<20} {:>12} {:>12}  {tiers}",
                    b.id,
                    m["timeline"],
                    m["start_lsn"].as_str().unwrap_or("?"),
                    m["stopped_at"].as_str().unwrap_or("?"),
                    mb(&m["logical_size"]),
                    mb(&m["bytes_new"]),
                );
            }
            Ok(())
        }
        BackupsCommand::Show(a) => {
            let mut c = backup_client(&a.client).await?;
            let list = list_backups(&mut c, &a.client.cluster, a.client.tier2_recovery).await?;
            let b = list.iter().find(|b| b.id == a.backup_id).with_context(|| {
                format!(
                    "cluster \"{}\" has no complete backup \"{}\"",
                    a.client.cluster, a.backup_id
                )
            })?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&b.metadata)?);
            } else {
                let m = &b.metadata;
                if let Some(obj) = m.as_object() {
                    for (k, v) in obj {
                        if k == "backup_label" || k == "tablespace_map" {
                            continue;
                        }
                        println!("{k:<18} {v}");
                    }
                }
                println!(
                    "backup_label:\n{}",
                    m["backup_label"].as_str().unwrap_or("")
                );
                if let Some(map) = m["tablespace_map"].as_str()
                    && !map.is_empty()
                {
                    println!("tablespace_map:\n{map}");
                }
            }
            Ok(())
        }
    }
}

/// Runs `klio verify`: exit 0 when every object the backups need is present and intact.
pub async fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let mut c = backup_client(&a.client).await?;
    let r = c
        .verify(pb::VerifyRequest {
            cluster: a.client.cluster.clone(),
            backup_id: a.backup_id.clone().unwrap_or_default(),
            tier: a.tier,
        })
        .await
        .map_err(|s| status_error("verify backups", s))?
        .into_inner();
    if a.json {
        let v = serde_json::json!({
            "cluster": a.client.cluster,
            "tier": a.tier,
            "wal_files_verified": r.wal_files_verified,
            "ok": r.problems.is_empty(),
            "backups": r.backups.iter().map(|b| serde_json::json!({
                "backup_id": b.backup_id, "files": b.files, "blocks": b.blocks, "bytes_verified": b.bytes_verified,
            })).collect::<Vec<_>>(),
            "problems": r.problems.iter().map(|p| serde_json::json!({
                "backup_id": p.backup_id, "kind": p.kind, "object": p.object, "detail": p.detail,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for b in &r.backups {
            println!(
                "{}: {} files, {} blocks, {:.1} MB checked",
                b.backup_id,
                b.files,
                b.blocks,
                b.bytes_verified as f64 / 1e6
            );
        }
        if a.tier == 2 {
            println!("{} WAL files read and authenticated", r.wal_files_verified);
        }
        for p in &r.problems {
            let what = if p.backup_id.is_empty() {
                "WAL"
            } else {
                &p.backup_id
            };
            println!("{what}: {} {}: {}", p.kind, p.object, p.detail);
        }
    }
    if r.problems.is_empty() {
        if !a.json {
            println!("OK: every object the backups need is present and intact");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "verification failed: {} problems in Tier {} of cluster \"{}\"",
            r.problems.len(),
            a.tier,
            a.client.cluster
        );
        Ok(ExitCode::FAILURE)
    }
}

/// Retention counts (PluginConfiguration `retention`); unset ones take the defaults
/// (keepLatest 10, keepHourly 48, keepDaily 7, keepWeekly 4, keepMonthly 24, keepAnnual 1),
/// 0 disables a rule.
#[derive(Args, Debug, Clone, Default)]
pub struct RetentionFlags {
    /// Keep the N newest backups
    #[arg(long, value_name = "N")]
    pub keep_latest: Option<u32>,
    /// Keep the newest backup of each of the last N hours
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest backup of each of the last N days (UTC)
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the last N ISO weeks
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the last N months
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest backup of each of the last N years
    #[arg(long, value_name = "N")]
    pub keep_annual: Option<u32>,
}

/// The Tier 2 retention counts (`--tier2-keep-*`), as [`RetentionFlags`] for Tier 1.
#[derive(Args, Debug, Clone, Default)]
pub struct Tier2RetentionFlags {
    /// Tier 2: keep the N newest backups
    #[arg(long = "tier2-keep-latest", id = "tier2_keep_latest", value_name = "N")]
    pub keep_latest: Option<u32>,
    /// Tier 2: keep the newest backup of each of the last N hours
    #[arg(long = "tier2-keep-hourly", id = "tier2_keep_hourly", value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Tier 2: keep the newest backup of each of the last N days (UTC)
    #[arg(long = "tier2-keep-daily", id = "tier2_keep_daily", value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Tier 2: keep the newest backup of each of the last N ISO weeks
    #[arg(long = "tier2-keep-weekly", id = "tier2_keep_weekly", value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Tier 2: keep the newest backup of each of the last N months
    #[arg(
        long = "tier2-keep-monthly",
        id = "tier2_keep_monthly",
        value_name = "N"
    )]
    pub keep_monthly: Option<u32>,
    /// Tier 2: keep the newest backup of each of the last N years
    #[arg(long = "tier2-keep-annual", id = "tier2_keep_annual", value_name = "N")]
    pub keep_annual: Option<u32>,
}

impl Tier2RetentionFlags {
    /// Tier 2 flags with the counts of `f`.
    pub fn from_flags(f: &RetentionFlags) -> Tier2RetentionFlags {
        Tier2RetentionFlags {
            keep_latest: f.keep_latest,
            keep_hourly: f.keep_hourly,
            keep_daily: f.keep_daily,
            keep_weekly: f.keep_weekly,
            keep_monthly: f.keep_monthly,
            keep_annual: f.keep_annual,
        }
    }

    pub fn as_flags(&self) -> RetentionFlags {
        RetentionFlags {
            keep_latest: self.keep_latest,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_annual: self.keep_annual,
        }
    }
}

impl RetentionFlags {
    pub fn to_pb(&self) -> pb::RetentionPolicy {
        pb::RetentionPolicy {
            keep_latest: self.keep_latest,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_annual: self.keep_annual,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum RetentionCommand {
    /// Show which backups the policy keeps (and by which rule) and which it expires
    Plan(RetentionArgs),
    /// Expire backups, the WAL before the oldest kept backup, and collect garbage
    Run(RetentionArgs),
}

#[derive(Args, Debug)]
pub struct RetentionArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub policy: RetentionFlags,
    /// Tier 2's policy, applied to Tier 2 when --tier2-backup is given
    #[command(flatten)]
    pub tier2_policy: Tier2RetentionFlags,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum GcCommand {
    /// Show what garbage collection would delete
    Plan(GcArgs),
    /// Delete what no backup needs
    Run(GcArgs),
}

#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The tier whose repository is collected: 1 (local volume) or 2 (object storage)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub tier: u32,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

fn gc_json(g: &pb::GcResponse) -> Value {
    serde_json::json!({
        "executed": g.executed,
        "skipped": g.skipped,
        "live_blocks": g.live_blocks,
        "dead_packs": g.dead_packs,
        "packs_rewritten": g.packs_rewritten,
        "unindexed_packs": g.unindexed_packs,
        "dead_blocklists": g.dead_blocklists,
        "mixed_packs_kept": g.mixed_packs_kept,
        "reclaimable_bytes": g.reclaimable_bytes,
        "bytes_reclaimed": g.bytes_reclaimed,
        "temp_files_removed": g.temp_files_removed,
    })
}

fn print_gc(g: &pb::GcResponse) {
    if g.skipped {
        println!(
            "garbage collection: not needed (nothing became garbage since the last collection)"
        );
        return;
    }
    println!(
        "garbage collection{}: {} live blocks; {} packs to delete, {} to rewrite, {} without index; {} unused blocklists; {:.1} MB {}",
        if g.executed { "" } else { " (plan)" },
        g.live_blocks,
        g.dead_packs,
        g.packs_rewritten,
        g.unindexed_packs,
        g.dead_blocklists,
        if g.executed {
            g.bytes_reclaimed
        } else {
            g.reclaimable_bytes
        } as f64
            / 1e6,
        if g.executed {
            "reclaimed"
        } else {
            "reclaimable"
        },
    );
    if g.temp_files_removed > 0 {
        println!(
            "removed {} temporary files of failed writes",
            g.temp_files_removed
        );
    }
}

/// Runs the retention RPC and returns its answer as JSON.
pub async fn retention_call(
    client: &ClientArgs,
    policy: &RetentionFlags,
    dry_run: bool,
    tier: u32,
) -> anyhow::Result<Value> {
    let mut c = backup_client(client).await?;
    let r = c
        .retention(pb::RetentionRequest {
            cluster: client.cluster.clone(),
            policy: Some(policy.to_pb()),
            dry_run,
            tier,
        })
        .await
        .map_err(|s| status_error("apply the retention policy", s))?
        .into_inner();
    Ok(serde_json::json!({
        "cluster": client.cluster,
        "tier": tier,
        "dry_run": dry_run,
        "held_for_tier2": r.held_for_tier2,
        "decisions": r.decisions.iter().map(|d| serde_json::json!({
            "backup_id": d.backup_id, "keep": d.keep, "reasons": d.reasons, "time": d.time,
        })).collect::<Vec<_>>(),
        "deleted_backups": r.deleted_backups,
        "deleted_wal": r.deleted_wal,
        "first_wal_kept": r.first_wal_kept,
        "gc": r.gc.as_ref().map(gc_json),
    }))
}

/// Runs `klio retention plan|run`.
pub async fn retention(cmd: RetentionCommand) -> anyhow::Result<()> {
    let (a, dry_run) = match cmd {
        RetentionCommand::Plan(a) => (a, true),
        RetentionCommand::Run(a) => (a, false),
    };
    let mut v = retention_call(&a.client, &a.policy, dry_run, 1).await?;
    let tier2 = if a.client.tier2_backup {
        Some(retention_call(&a.client, &a.tier2_policy.as_flags(), dry_run, 2).await?)
    } else {
        None
    };
    if a.json {
        if let Some(t2) = tier2 {
            v["tier2"] = t2;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_retention(&v, dry_run);
    if let Some(t2) = tier2 {
        println!("\nTier 2:");
        print_retention(&t2, dry_run);
    }
    Ok(())
}

fn print_retention(v: &Value, dry_run: bool) {
    println!("{:<22} {:<8} REASONS", "BACKUP", "");
    for d in v["decisions"].as_array().into_iter().flatten() {
        let reasons: Vec<&str> = d["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "{:<22} {:<8} {}",
            d["backup_id"].as_str().unwrap_or("?"),
            if d["keep"] == true { "keep" } else { "expire" },
            reasons.join(", ")
        );
    }
    if let Some(w) = v["first_wal_kept"].as_str()
        && !w.is_empty()
    {
        println!("WAL before {w} is not needed by any kept backup");
    }
    if !dry_run {
        println!(
            "expired {} backups, removed {} WAL files",
            v["deleted_backups"].as_array().map_or(0, Vec::len),
            v["deleted_wal"].as_array().map_or(0, Vec::len)
        );
    }
}

/// Runs `klio gc plan|run`.
pub async fn gc(cmd: GcCommand) -> anyhow::Result<()> {
    let (a, dry_run) = match cmd {
        GcCommand::Plan(a) => (a, true),
        GcCommand::Run(a) => (a, false),
    };
    let mut c = backup_client(&a.client).await?;
    let g = c
        .gc(pb::GcRequest {
            dry_run,
            tier: a.tier,
        })
        .await
        .map_err(|s| status_error("collect garbage", s))?
        .into_inner();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&gc_json(&g))?);
    } else {
        print_gc(&g);
    }
    Ok(())
}
