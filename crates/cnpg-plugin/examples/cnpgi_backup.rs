//! Calls `Backup.Backup` on a sidecar's socket the way CloudNativePG's instance manager does,
//! and prints the result as JSON (used by `bench/cnpg-sidecar.sh` to time a backup through
//! the plugin).
//!
//!     cnpgi_backup <socket> <cluster.json> [backup-name [key=value...]]

use klio_cnpg_plugin::sidecar::socket_channel;
use klio_proto::cnpgi::backup::v1 as backup;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(socket), Some(cluster)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: cnpgi_backup <socket> <cluster.json> [backup-name]");
    };
    let name = args.next().unwrap_or_else(|| "bench".to_string());
    let parameters = args
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => anyhow::bail!("parameter \"{kv}\" is not key=value"),
        })
        .collect::<anyhow::Result<_>>()?;
    let cluster = std::fs::read(&cluster)?;
    let backup_cr = serde_json::json!({"apiVersion": "postgresql.cnpg.io/v1", "kind": "Backup", "metadata": {"name": name}});
    let channel = socket_channel(std::path::Path::new(&socket)).await?;
    let r = backup::backup_client::BackupClient::new(channel)
        .backup(backup::BackupRequest {
            cluster_definition: cluster.into(),
            backup_definition: serde_json::to_vec(&backup_cr)?.into(),
            parameters,
        })
        .await
        .map_err(|s| anyhow::anyhow!("Backup.Backup: {}", s.message()))?
        .into_inner();
    println!(
        "{}",
        serde_json::json!({
            "backup_id": r.backup_id,
            "begin_lsn": r.begin_lsn,
            "end_lsn": r.end_lsn,
            "started_at": r.started_at,
            "stopped_at": r.stopped_at,
        })
    );
    Ok(())
}
