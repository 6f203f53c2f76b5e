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
            let list = list_backups(&mut c, &a.client.cluster).await?;
            if a.json {
                let v: Vec<&Value> = list.iter().map(|b| &b.metadata).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<22} {:>3} {:<20} {:<20} {:>12} {:>12}",
                "BACKUP", "TLI", "START LSN", "STOPPED AT", "SIZE", "NEW"
            );
            for b in &list {
                let m = &b.metadata;
                if let Some(e) = m.get("error") {
                    println!("{:<22} unreadable: {e}", b.id);
                    continue;
                }
                println!(
                    "{:<22} {:>3} {:<20} {:<20} {:>12} {:>12}",
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
            let list = list_backups(&mut c, &a.client.cluster).await?;
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
        })
        .await
        .map_err(|s| status_error("verify backups", s))?
        .into_inner();
    if a.json {
        let v = serde_json::json!({
            "cluster": a.client.cluster,
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
        for p in &r.problems {
            println!("{}: {} {}: {}", p.backup_id, p.kind, p.object, p.detail);
        }
    }
    if r.problems.is_empty() {
        if !a.json {
            println!("OK: every object the backups need is present and intact");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "verification failed: {} problems in the backups of cluster \"{}\"",
            r.problems.len(),
            a.client.cluster
        );
        Ok(ExitCode::FAILURE)
    }
}
