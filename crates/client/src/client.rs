//! The flags every client subcommand shares, and the connection they describe.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use klio_proto::wal::v1::wal_client::WalClient;
use tonic::transport::Channel;

/// Where the Klio server is and which certificate proves who we are.
#[derive(Args, Clone, Debug)]
pub struct Connection {
    /// Host name or address of the Klio server
    #[arg(long, env = "KLIO_SERVER_ADDRESS")]
    pub server_address: String,
    /// Port of the server's base-backup service
    #[arg(long, env = "KLIO_BASE_PORT", default_value_t = 51515)]
    pub base_port: u16,
    /// Client certificate (PEM): CN `<user>@<cluster>`, or `admin@klio` for `klio admin`
    #[arg(long, env = "KLIO_CLIENT_CERT")]
    pub client_cert: PathBuf,
    /// Private key of the client certificate (PEM)
    #[arg(long, env = "KLIO_CLIENT_KEY")]
    pub client_key: PathBuf,
    /// CA certificate that signed the server's certificate (PEM); several comma-separated
    /// files are all trusted and missing ones skipped (a Secret's ca.crt,tls.crt)
    #[arg(long, env = "KLIO_SERVER_CA", value_delimiter = ',', required = true)]
    pub server_ca: Vec<PathBuf>,
    /// Name to verify in the server certificate (default: the server address)
    #[arg(long, env = "KLIO_SERVER_NAME")]
    pub server_name: Option<String>,
}

impl Connection {
    /// A mutual-TLS HTTP/2 channel to the server's `port`.
    pub async fn channel(&self, port: u16) -> anyhow::Result<Channel> {
        let domain = self.server_name.as_deref().unwrap_or(&self.server_address);
        let tls =
            klio_tls::client_tls_any(&self.server_ca, &self.client_cert, &self.client_key, domain)
                .context("load client TLS settings")?;
        Ok(klio_tls::connect(&self.server_address, port, tls).await?)
    }
}

/// The connection, and the cluster whose WAL and backups are handled.
#[derive(Args, Clone, Debug)]
pub struct ClientArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// Port of the server's WAL service
    #[arg(long, env = "KLIO_WAL_PORT", default_value_t = 52000)]
    pub wal_port: u16,
    /// Name of the cluster whose WAL and backups are handled
    #[arg(long, env = "KLIO_CLUSTER")]
    pub cluster: String,
    /// Copy this cluster's WAL and backups to Tier 2 (PluginConfiguration enableBackup;
    /// wal-stream and backup)
    #[arg(long, env = "KLIO_TIER2_BACKUP")]
    pub tier2_backup: bool,
    /// Look in Tier 2 for what Tier 1 lacks (PluginConfiguration enableRecovery; restore,
    /// wal-get, backups, wal-list)
    #[arg(long, env = "KLIO_TIER2_RECOVERY")]
    pub tier2_recovery: bool,
}

impl ClientArgs {
    /// Connects to the WAL service.
    pub async fn wal_client(&self) -> anyhow::Result<WalClient<Channel>> {
        let channel = self.channel(self.wal_port).await?;
        Ok(WalClient::new(channel)
            .max_decoding_message_size(klio_proto::limits::MAX_WAL_MESSAGE)
            .max_encoding_message_size(klio_proto::limits::MAX_WAL_MESSAGE))
    }

    /// A mutual-TLS HTTP/2 channel to the server's `port`.
    pub async fn channel(&self, port: u16) -> anyhow::Result<Channel> {
        self.conn.channel(port).await
    }

    /// The flags that reach the same server as the same cluster, for a command line (as
    /// `restore_command` needs them).
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--server-address".to_string(),
            self.conn.server_address.clone(),
            "--wal-port".to_string(),
            self.wal_port.to_string(),
            "--base-port".to_string(),
            self.conn.base_port.to_string(),
            "--cluster".to_string(),
            self.cluster.clone(),
            "--client-cert".to_string(),
            absolute(&self.conn.client_cert),
            "--client-key".to_string(),
            absolute(&self.conn.client_key),
            "--server-ca".to_string(),
            self.conn
                .server_ca
                .iter()
                .map(|p| absolute(p))
                .collect::<Vec<_>>()
                .join(","),
        ];
        if let Some(n) = &self.conn.server_name {
            v.push("--server-name".to_string());
            v.push(n.clone());
        }
        if self.tier2_recovery {
            v.push("--tier2-recovery".to_string());
        }
        v
    }
}

fn absolute(p: &std::path::Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// Turns a gRPC status into an error a person can act on.
pub fn status_error(what: &str, s: tonic::Status) -> anyhow::Error {
    let hint = match s.code() {
        tonic::Code::PermissionDenied => {
            "\nHINT: the client certificate's CN must be \"<user>@<cluster>\" for this cluster"
        }
        tonic::Code::Unauthenticated => "\nHINT: the server did not accept the client certificate",
        tonic::Code::Unavailable => "\nHINT: is the Klio server running and reachable?",
        tonic::Code::ResourceExhausted if !s.message().contains("HINT:") => {
            "\nHINT: the server is out of space or over one of its limits (RESOURCE_EXHAUSTED)"
        }
        tonic::Code::DataLoss if !s.message().contains("HINT:") => {
            "\nHINT: the server found damaged data (DATA_LOSS); see its log"
        }
        _ => "",
    };
    anyhow::anyhow!("could not {what}: {}{hint}", s.message())
}
