//! `klio admin queue status|list-failed|retry`: the server's work queue, with the
//! administration certificate (`admin@klio`).

use clap::{Args, Subcommand};
use klio_proto::backup::v1 as pb;
use klio_proto::backup::v1::backup_client::BackupClient;

use crate::client::{Connection, status_error};

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// The server's work queue
    #[command(subcommand)]
    Queue(QueueCommand),
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Pending and failed task counts, and each cluster's Tier 2 relay progress
    Status(AdminArgs),
    /// The dead-letter list: tasks that failed every attempt, with their last error
    ListFailed(AdminArgs),
    /// Make failed tasks pending again (all of them when no id is given)
    Retry {
        #[command(flatten)]
        admin: AdminArgs,
        /// Task ids, as list-failed shows them
        ids: Vec<String>,
    },
}

/// Where the server is, with the administration certificate.
#[derive(Args, Debug)]
pub struct AdminArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

async fn client(a: &AdminArgs) -> anyhow::Result<BackupClient<tonic::transport::Channel>> {
    Ok(BackupClient::new(a.conn.channel(a.conn.base_port).await?))
}
/// Runs `klio admin ...`.
pub async fn run(cmd: AdminCommand) -> anyhow::Result<()> {
    let AdminCommand::Queue(cmd) = cmd;
    match cmd {
        QueueCommand::Status(a) => {
            let r = client(&a)
                .await?
                .queue_status(pb::QueueStatusRequest {})
                .await
                .map_err(|s| status_error("read the queue status", s))?
                .into_inner();
            if a.json {
                let v = serde_json::json!({
                    "backend": r.backend, "pending": r.pending, "failed": r.failed,
                    "relay": r.relay.iter().map(|p| serde_json::json!({
                        "cluster": p.cluster, "wal_files_relayed": p.wal_files_relayed,
                        "wal_bytes_relayed": p.wal_bytes_relayed, "last_wal_relayed": p.last_wal_relayed,
                        "backups_relayed": p.backups_relayed, "last_backup_relayed": p.last_backup_relayed,
                        "updated_at": p.updated_at, "last_error": p.last_error,
                    })).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("queue:   {}", r.backend);
            println!("pending: {}", r.pending);
            println!("failed:  {}", r.failed);
            for p in &r.relay {
                println!(
                    "{}: {} WAL files ({:.1} MB) relayed up to {}, {} backups up to {} ({}){}",
                    p.cluster,
                    p.wal_files_relayed,
                    p.wal_bytes_relayed as f64 / 1e6,
                    if p.last_wal_relayed.is_empty() {
                        "-"
                    } else {
                        &p.last_wal_relayed
                    },
                    p.backups_relayed,
                    if p.last_backup_relayed.is_empty() {
                        "-"
                    } else {
                        &p.last_backup_relayed
                    },
                    p.updated_at,
                    if p.last_error.is_empty() {
                        String::new()
                    } else {
                        format!("; last error: {}", p.last_error)
                    }
                );
            }
        }
        QueueCommand::ListFailed(a) => {
            let r = client(&a)
                .await?
                .queue_list_failed(pb::QueueListFailedRequest {})
                .await
                .map_err(|s| status_error("list failed tasks", s))?
                .into_inner();
            if a.json {
                let v: Vec<_> = r
                    .tasks
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "id": t.id, "kind": t.kind, "cluster": t.cluster,
                            "attempts": t.attempts, "last_error": t.last_error, "failed_at": t.failed_at,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if r.tasks.is_empty() {
                println!("no failed tasks");
            }
            for t in &r.tasks {
                println!(
                    "{}  ({} of cluster {}, {} attempts, failed at {})\n  {}",
                    t.id, t.kind, t.cluster, t.attempts, t.failed_at, t.last_error
                );
            }
        }
        QueueCommand::Retry { admin, ids } => {
            let r = client(&admin)
                .await?
                .queue_retry(pb::QueueRetryRequest { ids })
                .await
                .map_err(|s| status_error("retry failed tasks", s))?
                .into_inner();
            for id in &r.retried {
                println!("retrying {id}");
            }
            if !r.unknown.is_empty() {
                anyhow::bail!(
                    "no failed task with id {}\nHINT: klio admin queue list-failed shows the ids",
                    r.unknown.join(", ")
                );
            }
            if r.retried.is_empty() {
                println!("no failed tasks");
            }
        }
    }
    Ok(())
}
