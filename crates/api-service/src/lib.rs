//! The aggregated API service (`klio server api-server`): a Klio server's catalog of base
//! backups as `KlioBackup` resources of the API group `kliocatalog.enterprisedb.io/v1alpha1`,
//! served through Kubernetes' API aggregation layer, so `kubectl get kliobackups` lists the
//! backups, `-o yaml` shows one, `-w` follows new ones and `kubectl explain` describes them.
//!
//! It reads the catalog with the `snapshot_reader@klio` certificate (catalog only), serves
//! HTTPS to kube-apiserver, authenticates the front proxy's client certificate and the user
//! it names ([`auth`]), and authorizes every request with a SubjectAccessReview. See
//! docs/kubernetes.md ("Aggregated API service").

pub mod auth;
pub mod catalog;
mod http_api;
pub mod objects;
pub mod openapi;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use k8s_openapi::api::core::v1::ConfigMap;
use klio_client::client::Connection;
use klio_proto::backup::v1 as pb;
use klio_proto::backup::v1::backup_client::BackupClient;
use tokio_util::sync::CancellationToken;

use crate::auth::{AUTH_CONFIGMAP, FrontProxy};
use crate::catalog::{Catalog, Source};
use crate::objects::{CatalogEntry, DEFAULT_GROUP};

/// The flags of `klio server api-server`. Each also reads the variable the seed's
/// Deployment sets (`CLIENT_BASE_*`) when ours is not set.
#[derive(Args, Debug, Clone)]
pub struct ApiServiceArgs {
    /// Host name or address of the Klio server (else from CLIENT_BASE_URL, https://host:port)
    #[arg(long, env = "KLIO_SERVER_ADDRESS")]
    pub server_address: Option<String>,
    /// Port of the Klio server's base-backup service (else from CLIENT_BASE_URL; 51515)
    #[arg(long, env = "KLIO_BASE_PORT")]
    pub base_port: Option<u16>,
    /// CA certificate(s) that verify the Klio server (PEM; comma-separated, missing files
    /// skipped) [else CLIENT_BASE_SERVER_CERT_PATH]
    #[arg(long, env = "KLIO_SERVER_CA", value_delimiter = ',')]
    pub server_ca: Vec<PathBuf>,
    /// Name to verify in the Klio server's certificate [else CLIENT_BASE_HOSTNAME; default:
    /// the server address]
    #[arg(long, env = "KLIO_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Client certificate for the Klio server: CN snapshot_reader@klio (catalog only)
    /// [else CLIENT_BASE_CLIENT_CERT_PATH]
    #[arg(long, env = "KLIO_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// Its private key [else CLIENT_BASE_CLIENT_KEY_PATH]
    #[arg(long, env = "KLIO_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// This service's HTTPS certificate (PEM; its names must include SERVICE.NAMESPACE.svc)
    /// [else CLIENT_BASE_API_SERVER_CERTFILE]
    #[arg(long, env = "KLIO_API_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key [else CLIENT_BASE_API_SERVER_KEYFILE]
    #[arg(long, env = "KLIO_API_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Address to serve HTTPS on
    #[arg(long, env = "KLIO_API_LISTEN", default_value = "0.0.0.0:443")]
    pub listen: SocketAddr,
    /// The API group (a second Klio server needs a group of its own)
    #[arg(long, env = "KLIO_API_GROUP", default_value = DEFAULT_GROUP)]
    pub group: String,
    /// Namespace the KlioBackup objects appear in: the Klio Server's [default: this pod's
    /// namespace]
    #[arg(long, env = "KLIO_API_NAMESPACE")]
    pub namespace: Option<String>,
    /// Seconds between two reads of the catalog that feed watches (`kubectl get -w`)
    #[arg(long, env = "KLIO_API_POLL_INTERVAL", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub poll_interval: u64,
    /// Also read Tier 2's catalog: shows backups only Tier 2 holds and which tiers hold
    /// each (one object-storage listing per cluster per read)
    #[arg(long, env = "KLIO_API_TIER2")]
    pub tier2: bool,
}

/// Decodes `%XX` escapes; an incomplete or invalid escape stays as it is.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let hex = |c: u8| (c as char).to_digit(16);
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the service runs with, every setting resolved.
#[derive(Debug, Clone)]
struct Settings {
    conn: Connection,
    tls_cert: PathBuf,
    tls_key: PathBuf,
    listen: SocketAddr,
    group: String,
    namespace: String,
    poll_interval: Duration,
    tier2: bool,
}

/// `https://host:port` (the seed's CLIENT_BASE_URL) as host and port.
fn parse_base_url(url: &str) -> anyhow::Result<(String, Option<u16>)> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        bail!("CLIENT_BASE_URL {url:?} is not of the form https://host:port");
    }
    if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .with_context(|| format!("CLIENT_BASE_URL {url:?}: unclosed [ in the host"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(
                p.parse()
                    .with_context(|| format!("CLIENT_BASE_URL {url:?}: bad port"))?,
            ),
            None => None,
        };
        return Ok((host.to_string(), port));
    }
    match rest.rsplit_once(':') {
        Some((host, port)) => Ok((
            host.to_string(),
            Some(
                port.parse()
                    .with_context(|| format!("CLIENT_BASE_URL {url:?}: bad port {port:?}"))?,
            ),
        )),
        None => Ok((rest.to_string(), None)),
    }
}

/// Resolves the flags with the seed's variables (read through `env`) as fallbacks.
fn settings(a: ApiServiceArgs, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Settings> {
    let (url_host, url_port) = match env("CLIENT_BASE_URL").filter(|v| !v.is_empty()) {
        Some(u) => {
            let (h, p) = parse_base_url(&u)?;
            (Some(h), p)
        }
        None => (None, None),
    };
    let path = |v: Option<PathBuf>, var: &str, flag: &str| -> anyhow::Result<PathBuf> {
        v.or_else(|| env(var).filter(|v| !v.is_empty()).map(PathBuf::from))
            .with_context(|| format!("{flag} is required (or {var})"))
    };
    let server_address = a
        .server_address
        .or(url_host)
        .context("--server-address is required (or KLIO_SERVER_ADDRESS, or CLIENT_BASE_URL=https://host:port)")?;
    let mut server_ca = a.server_ca;
    if server_ca.is_empty() {
        server_ca.push(path(None, "CLIENT_BASE_SERVER_CERT_PATH", "--server-ca")?);
    }
    let conn = Connection {
        server_address,
        base_port: a.base_port.or(url_port).unwrap_or(51515),
        client_cert: path(
            a.client_cert,
            "CLIENT_BASE_CLIENT_CERT_PATH",
            "--client-cert",
        )?,
        client_key: path(a.client_key, "CLIENT_BASE_CLIENT_KEY_PATH", "--client-key")?,
        server_ca,
        server_name: a
            .server_name
            .or_else(|| env("CLIENT_BASE_HOSTNAME").filter(|v| !v.is_empty())),
    };
    let namespace = match a
        .namespace
        .or_else(|| env("POD_NAMESPACE").filter(|v| !v.is_empty()))
    {
        Some(n) => n,
        None => std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string()),
    };
    validate_dns_label(&namespace, "--namespace")?;
    validate_group(&a.group)?;
    Ok(Settings {
        conn,
        tls_cert: path(a.tls_cert, "CLIENT_BASE_API_SERVER_CERTFILE", "--tls-cert")?,
        tls_key: path(a.tls_key, "CLIENT_BASE_API_SERVER_KEYFILE", "--tls-key")?,
        listen: a.listen,
        group: a.group,
        namespace,
        poll_interval: Duration::from_secs(a.poll_interval),
        tier2: a.tier2,
    })
}

fn validate_dns_label(v: &str, what: &str) -> anyhow::Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if !ok {
        bail!(
            "{what} {v:?} is not a Kubernetes namespace name (lowercase letters, digits and '-', at most 63)"
        );
    }
    Ok(())
}

fn validate_group(g: &str) -> anyhow::Result<()> {
    let ok = g.len() <= 253
        && g.contains('.')
        && g.split('.').all(|l| validate_dns_label(l, "").is_ok());
    if !ok {
        bail!(
            "--group {g:?} is not an API group name (a DNS name with a dot, e.g. {DEFAULT_GROUP})"
        );
    }
    Ok(())
}

/// Reads the catalog: every cluster the certificate may read, each cluster's backups.
fn catalog_source(conn: Connection, tier2: bool) -> Source {
    let channel: Arc<tokio::sync::Mutex<Option<tonic::transport::Channel>>> = Arc::default();
    Arc::new(move || {
        let conn = conn.clone();
        let channel = channel.clone();
        Box::pin(async move {
            let place = format!("{}:{}", conn.server_address, conn.base_port);
            let mut slot = channel.lock().await;
            let ch = match slot.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let c = conn.channel(conn.base_port).await.map_err(|e| {
                        format!("cannot connect to the Klio server at {place}: {e:#}")
                    })?;
                    *slot = Some(c.clone());
                    c
                }
            };
            let result = read_catalog(ch, tier2).await;
            if result.is_err() {
                // Connect again next time (new certificates, a moved server).
                *slot = None;
            }
            result
                .map_err(|e| format!("cannot read the catalog of the Klio server at {place}: {e}"))
        })
    })
}

fn describe(s: &tonic::Status) -> String {
    let msg = s.message().lines().next().unwrap_or("").trim();
    match s.code() {
        tonic::Code::Unavailable => format!("it is unavailable ({msg})"),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => format!(
            "it refused the client certificate ({msg}); the API service needs a certificate \
             with CN snapshot_reader@klio signed by the server's client CA"
        ),
        _ => format!("{:?}: {msg}", s.code()),
    }
}

async fn read_catalog(
    channel: tonic::transport::Channel,
    tier2: bool,
) -> Result<Vec<CatalogEntry>, String> {
    let mut client =
        BackupClient::new(channel).max_decoding_message_size(klio_proto::limits::MAX_WAL_MESSAGE);
    let clusters = client
        .list_clusters(pb::ListClustersRequest {
            tier2_recovery: tier2,
        })
        .await
        .map_err(|s| describe(&s))?
        .into_inner()
        .clusters;
    let mut out = Vec::new();
    for cluster in clusters {
        let list = client
            .list(pb::ListRequest {
                cluster: cluster.clone(),
                tier2_recovery: tier2,
            })
            .await
            .map_err(|s| format!("listing cluster \"{cluster}\": {}", describe(&s)))?
            .into_inner();
        for b in list.backups {
            let metadata = serde_json::from_slice(&b.metadata_json).unwrap_or_else(|e| {
                serde_json::json!({"error": format!("the server sent unreadable metadata: {e}")})
            });
            out.push(CatalogEntry {
                cluster: cluster.clone(),
                backup_id: b.backup_id,
                metadata,
                in_tier1: b.in_tier1,
                in_tier2: b.in_tier2,
            });
        }
    }
    Ok(out)
}

/// The TLS configuration, rebuilt when the serving certificate files or the front-proxy
/// settings change.
struct TlsState {
    cert: PathBuf,
    key: PathBuf,
    /// (certificate, key, front-proxy CA) the current configuration was built from.
    built_from: Option<(Vec<u8>, Vec<u8>, String)>,
    current: Arc<RwLock<Option<Arc<rustls::ServerConfig>>>>,
}

impl TlsState {
    fn update(&mut self, fp: &FrontProxy) -> anyhow::Result<()> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        let source = (cert, key, fp.ca_pem.clone());
        if self.built_from.as_ref() == Some(&source) {
            return Ok(());
        }
        let config = klio_tls::https_server_config(&source.0, &source.1, source.2.as_bytes())
            .with_context(|| {
                format!(
                    "the serving certificate {} / {} or the front-proxy CA",
                    self.cert.display(),
                    self.key.display()
                )
            })?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(config);
        self.built_from = Some(source);
        Ok(())
    }
}

/// Reads the front-proxy settings.
async fn front_proxy(client: &kube::Client) -> anyhow::Result<FrontProxy> {
    let (ns, name) = AUTH_CONFIGMAP;
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), ns);
    let cm = api.get(name).await.with_context(|| {
        format!(
            "read ConfigMap {ns}/{name} (the service account needs the Role \
             extension-apiserver-authentication-reader in {ns})"
        )
    })?;
    let data = cm.data.unwrap_or_default();
    FrontProxy::from_configmap(&data).map_err(|e| anyhow::anyhow!("ConfigMap {ns}/{name}: {e}"))
}

/// How often the front-proxy settings and the serving certificate are re-read.
const RELOAD_INTERVAL: Duration = Duration::from_secs(30);

/// Runs the service until SIGTERM or SIGINT.
pub async fn run(args: ApiServiceArgs) -> anyhow::Result<()> {
    let s = settings(args, &|k| std::env::var(k).ok())?;
    klio_tls::install_crypto_provider();
    let client = kube::Client::try_default().await.context(
        "connect to the Kubernetes API server (in-cluster service account or KUBECONFIG)",
    )?;

    let stop = CancellationToken::new();
    let catalog = Catalog::new(
        &s.group,
        &s.namespace,
        catalog_source(s.conn.clone(), s.tier2),
    );
    tokio::spawn(catalog.clone().poll(s.poll_interval, stop.clone()));

    let tls_current: Arc<RwLock<Option<Arc<rustls::ServerConfig>>>> = Arc::default();
    let fp_current: Arc<RwLock<Option<Arc<FrontProxy>>>> = Arc::default();
    {
        let mut tls = TlsState {
            cert: s.tls_cert.clone(),
            key: s.tls_key.clone(),
            built_from: None,
            current: tls_current.clone(),
        };
        let (client, fp_current, stop) = (client.clone(), fp_current.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last_error = String::new();
            loop {
                let result = async {
                    let fp = front_proxy(&client).await?;
                    tls.update(&fp)?;
                    *fp_current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(fp));
                    anyhow::Ok(())
                }
                .await;
                match result {
                    Ok(()) => last_error.clear(),
                    Err(e) => {
                        let e = format!("{e:#}");
                        if e != last_error {
                            tracing::error!(error = %e, "cannot load the authentication settings; keeping the last good ones");
                            last_error = e;
                        }
                    }
                }
                let loaded = fp_current.read().map(|f| f.is_some()).unwrap_or(false);
                let wait = if loaded {
                    RELOAD_INTERVAL
                } else {
                    Duration::from_secs(2)
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        });
    }

    let listener = tokio::net::TcpListener::bind(s.listen)
        .await
        .with_context(|| format!("listen on {}", s.listen))?;
    tracing::info!(
        listen = %s.listen,
        group = %s.group,
        namespace = %s.namespace,
        server = %format!("{}:{}", s.conn.server_address, s.conn.base_port),
        "API service serving"
    );
    let api = Arc::new(http_api::Api {
        group: s.group.clone(),
        catalog,
        front_proxy: fp_current,
        authorizer: auth::Authorizer::new(client),
        stop: stop.clone(),
    });
    let provider: klio_tls::ConfigProvider = {
        let current = tls_current.clone();
        Arc::new(move || current.read().ok().and_then(|c| c.clone()))
    };
    let serving = tokio::spawn(http_api::serve(listener, provider, api, stop.clone()));
    shutdown_signal().await;
    tracing::info!("stopping the API service");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), serving).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: ApiServiceArgs,
    }

    fn args(flags: &[&str]) -> ApiServiceArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(flags);
        Cli::try_parse_from(v).unwrap().a
    }

    #[test]
    fn the_seed_environment_is_enough() {
        let env = |k: &str| {
            let v = match k {
                "CLIENT_BASE_HOSTNAME" => "klio",
                "CLIENT_BASE_URL" => "https://klio-server.db.svc:51515",
                "CLIENT_BASE_SERVER_CERT_PATH" => "/certs/tls.crt",
                "CLIENT_BASE_API_SERVER_CERTFILE" => "/klio-api/certs/tls.crt",
                "CLIENT_BASE_API_SERVER_KEYFILE" => "/klio-api/certs/tls.key",
                "CLIENT_BASE_CLIENT_CERT_PATH" => "/client-certs/tls.crt",
                "CLIENT_BASE_CLIENT_KEY_PATH" => "/client-certs/tls.key",
                "POD_NAMESPACE" => "db",
                _ => return None,
            };
            Some(v.to_string())
        };
        // Flags are parsed without the process environment leaking in: only defaults.
        let s = settings(args(&[]), &env).unwrap();
        assert_eq!(s.conn.server_address, "klio-server.db.svc");
        assert_eq!(s.conn.base_port, 51515);
        assert_eq!(s.conn.server_name.as_deref(), Some("klio"));
        assert_eq!(s.conn.server_ca, [PathBuf::from("/certs/tls.crt")]);
        assert_eq!(s.conn.client_cert, PathBuf::from("/client-certs/tls.crt"));
        assert_eq!(s.tls_key, PathBuf::from("/klio-api/certs/tls.key"));
        assert_eq!(s.listen.port(), 443);
        assert_eq!(s.namespace, "db");
        assert_eq!(s.group, DEFAULT_GROUP);

        // Our flags win over the seed's variables.
        let s = settings(
            args(&[
                "--server-address",
                "other",
                "--base-port",
                "1",
                "--namespace",
                "ns2",
            ]),
            &env,
        )
        .unwrap();
        assert_eq!(
            (s.conn.server_address.as_str(), s.conn.base_port),
            ("other", 1)
        );
        assert_eq!(s.namespace, "ns2");
    }

    #[test]
    fn missing_and_bad_settings_are_named() {
        let none = |_: &str| None;
        let e = settings(args(&[]), &none).unwrap_err().to_string();
        assert!(e.contains("--server-address is required"), "{e}");
        let e = settings(args(&["--server-address", "h"]), &none)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--server-ca is required (or CLIENT_BASE_SERVER_CERT_PATH)"),
            "{e}"
        );
        let full = [
            "--server-address",
            "h",
            "--server-ca",
            "ca",
            "--client-cert",
            "c",
            "--client-key",
            "k",
            "--tls-cert",
            "t",
            "--tls-key",
            "tk",
        ];
        let mut bad_ns = full.to_vec();
        bad_ns.extend(["--namespace", "Bad_NS"]);
        let e = settings(args(&bad_ns), &none).unwrap_err().to_string();
        assert!(e.contains("not a Kubernetes namespace name"), "{e}");
        let mut bad_group = full.to_vec();
        bad_group.extend(["--group", "nodots", "--namespace", "ok"]);
        let e = settings(args(&bad_group), &none).unwrap_err().to_string();
        assert!(e.contains("is not an API group name"), "{e}");
        let url = |u: &str| {
            settings(args(&[]), &|k: &str| {
                (k == "CLIENT_BASE_URL").then(|| u.to_string())
            })
        };
        let e = url("https://h:notaport").unwrap_err().to_string();
        assert!(e.contains("bad port"), "{e}");
        assert_eq!(
            parse_base_url("https://[::1]:5").unwrap(),
            ("::1".to_string(), Some(5))
        );
        assert_eq!(parse_base_url("klio").unwrap(), ("klio".to_string(), None));
        assert!(parse_base_url("https://h:1/path").is_err());
    }
}
