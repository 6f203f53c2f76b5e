//! The client side: a tonic [`ClientTlsConfig`] presenting a client certificate, and
//! [`connect`], which opens a [`Channel`] tuned for bulk transfers.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::error_chain;
use crate::pem::{parse_certs, parse_key, read_file};
use crate::{Error, crypto_provider};

/// How long establishing TCP may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the TLS handshake may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of HTTP/2 PINGs, so a dead server or path is noticed on idle connections.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long to wait for a PING acknowledgement before the connection is declared dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// TCP keepalive, for paths where HTTP/2 PINGs cannot help (half-open sockets).
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// HTTP/2 initial stream window: large, so one WAL or backup stream can fill a fast link.
pub const INITIAL_STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 initial connection window, shared by all streams of the connection.
pub const INITIAL_CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// Builds the TLS configuration of a Klio client: trust `server_ca` for the server's
/// certificate, which must name `domain`, and present `client_cert` with
/// `client_key`.
///
/// Every file is read and checked here, so mistakes surface with the file's path rather
/// than as a failed handshake later.
pub fn client_tls(
    server_ca: &Path,
    client_cert: &Path,
    client_key: &Path,
    domain: &str,
) -> Result<ClientTlsConfig, Error> {
    let ca_pem = read_file(server_ca, CA)?;
    client_tls_from(ca_pem, server_ca, client_cert, client_key, domain)
}

const CA: &str = "server CA certificate";

/// [`client_tls`] trusting every certificate in those of `server_cas` that exist (at least
/// one must): a Secret's `ca.crt` and `tls.crt` together, so a self-signed server
/// certificate and a CA-issued one both verify.
pub fn client_tls_any(
    server_cas: &[std::path::PathBuf],
    client_cert: &Path,
    client_key: &Path,
    domain: &str,
) -> Result<ClientTlsConfig, Error> {
    let present: Vec<&std::path::PathBuf> = server_cas.iter().filter(|p| p.is_file()).collect();
    let Some(first) = present.first() else {
        let names: Vec<String> = server_cas.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::load(
            CA,
            server_cas.first().map(|p| p.as_path()),
            format!("none of {} exists", names.join(", ")),
        ));
    };
    let mut ca_pem = Vec::new();
    for p in &present {
        ca_pem.extend(read_file(p, CA)?);
        ca_pem.push(b'\n');
    }
    client_tls_from(ca_pem, first, client_cert, client_key, domain)
}

fn client_tls_from(
    ca_pem: Vec<u8>,
    server_ca: &Path,
    client_cert: &Path,
    client_key: &Path,
    domain: &str,
) -> Result<ClientTlsConfig, Error> {
    const CERT: &str = "client certificate";
    const KEY: &str = "client private key";
    let provider = crypto_provider();

    let cert_pem = read_file(client_cert, CERT)?;
    let key_pem = read_file(client_key, KEY)?;

    let mut roots = rustls::RootCertStore::empty();
    for ca in parse_certs(&ca_pem, CA, Some(server_ca))? {
        roots.add(ca).map_err(|e| {
            Error::load(
                CA,
                Some(server_ca),
                format!("not usable as a trust anchor: {e}"),
            )
        })?;
    }
    let chain = parse_certs(&cert_pem, CERT, Some(client_cert))?;
    let key = parse_key(&key_pem, KEY, Some(client_key))?;
    ServerName::try_from(domain).map_err(|e| Error::InvalidServerName {
        name: domain.to_string(),
        reason: e.to_string(),
    })?;

    // tonic builds its own rustls configuration from the PEM; building one here too
    // catches a key that does not belong to the certificate, naming both files.
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| Error::TlsConfig {
            side: "client",
            source,
        })?
        .with_root_certificates(Arc::new(roots))
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            Error::load(
                CERT,
                Some(client_cert),
                format!(
                    "{e}\nHINT: check that \"{}\" is the private key of \"{}\"",
                    client_key.display(),
                    client_cert.display()
                ),
            )
        })?;

    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem))
        .domain_name(domain)
        .timeout(TLS_HANDSHAKE_TIMEOUT))
}

/// Connects to the Klio server at `host:port` over TLS (`https`), with a connect
/// timeout, HTTP/2 and TCP keepalives, and large flow-control windows.
///
/// `host` may be a name, an IPv4 address or an IPv6 address (with or without brackets).
pub async fn connect(host: &str, port: u16, tls: ClientTlsConfig) -> Result<Channel, Error> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let authority = if bare.contains(':') {
        format!("[{bare}]:{port}")
    } else {
        format!("{bare}:{port}")
    };
    let invalid = |reason: String| Error::InvalidAddress {
        addr: authority.clone(),
        reason,
    };
    let endpoint = Endpoint::from_shared(format!("https://{authority}"))
        .map_err(|e| invalid(error_chain(&e)))?
        .tls_config(tls)
        .map_err(|e| invalid(error_chain(&e)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(TCP_KEEPALIVE))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(INITIAL_STREAM_WINDOW)
        .initial_connection_window_size(INITIAL_CONNECTION_WINDOW);
    endpoint.connect().await.map_err(|e| Error::Connect {
        addr: authority.clone(),
        reason: error_chain(&e),
    })
}
