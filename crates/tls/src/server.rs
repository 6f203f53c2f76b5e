//! The server side: a TLS 1.3-only, client-certificate-required [`ServerConfig`], and
//! [`tls_incoming`], a stream of handshaken connections for tonic's
//! `serve_with_incoming_shutdown`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::pem::{parse_certs, parse_crls, parse_key, read_file};
use crate::{Error, crypto_provider};

/// The ALPN protocol of gRPC.
pub const ALPN_H2: &[u8] = b"h2";

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many handshakes may be in progress at once; beyond that, accepting waits. A pending
/// handshake is a small task and a socket, so the bound is generous: silent connections do
/// not crowd out real clients (see [`FIRST_BYTE_TIMEOUT`], [`MAX_PENDING_PER_ADDRESS`]).
const MAX_PENDING_HANDSHAKES: usize = 4096;

/// How many of them may come from one address; further connections from it are closed at
/// once until some complete.
const MAX_PENDING_PER_ADDRESS: usize = 1024;

/// How long a new connection may stay silent: a client starts the handshake at once, so a
/// connection that sends nothing in this time is closed and frees its place.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(3);

/// How many handshaken connections may wait for the server to pick them up.
const READY_QUEUE: usize = 64;

/// A server-side TLS connection as [`tls_incoming`] yields it.
///
/// tonic (with its `tls-connect-info` feature, which `tls-aws-lc` enables) implements
/// `Connected` for this type: requests served over it carry a
/// `tonic::transport::server::TlsConnectInfo<TcpConnectInfo>`, so
/// `request.peer_certs()` and `request.remote_addr()` work in handlers.
pub type ServerTlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Builds the server TLS configuration: TLS 1.3 only, ALPN `h2`, and a client
/// certificate that chains to `client_ca_pem` is required.
///
/// `cert_pem` may hold a chain (leaf first); `key_pem` holds the leaf's private key;
/// `client_ca_pem` may hold several CA certificates.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
) -> Result<Arc<ServerConfig>, Error> {
    build_server_config(
        parse_certs(cert_pem, "server certificate", None)?,
        parse_key(key_pem, "server private key", None)?,
        parse_certs(client_ca_pem, "client CA certificate", None)?,
        None,
        true,
        Vec::new(),
    )
}

/// Like [`server_config`] for a peer that is not a Klio client (CloudNativePG's operator):
/// `client_anchors_pem` are the certificates trusted as issuers of the client's (a
/// self-signed client certificate is its own), and the server advertises no acceptable-CA
/// names, because Go clients then send their certificate only if its issuer is listed.
pub fn server_config_without_ca_hints(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_anchors_pem: &[u8],
) -> Result<Arc<ServerConfig>, Error> {
    build_server_config(
        parse_certs(cert_pem, "server certificate", None)?,
        parse_key(key_pem, "server private key", None)?,
        parse_certs(client_anchors_pem, "client certificate anchor", None)?,
        None,
        false,
        Vec::new(),
    )
}

/// Like [`server_config`], reading PEM files; errors name the file at fault.
pub fn load_server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<ServerConfig>, Error> {
    load_server_config_with_crl(cert, key, client_ca, None)
}

/// [`load_server_config`], refusing client certificates that `crl` (PEM, one or more CRLs)
/// revokes. Only the client certificate itself is checked, and only against CRLs of its
/// issuer: a certificate whose issuer published none is accepted.
pub fn load_server_config_with_crl(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
    crl: Option<&Path>,
) -> Result<Arc<ServerConfig>, Error> {
    const CERT: &str = "server certificate";
    const KEY: &str = "server private key";
    const CA: &str = "client CA certificate";
    const CRL: &str = "client certificate revocation list";
    let crls = match crl {
        Some(p) => parse_crls(&read_file(p, CRL)?, CRL, Some(p))?,
        None => Vec::new(),
    };
    build_server_config(
        parse_certs(&read_file(cert, CERT)?, CERT, Some(cert))?,
        parse_key(&read_file(key, KEY)?, KEY, Some(key))?,
        parse_certs(&read_file(client_ca, CA)?, CA, Some(client_ca))?,
        Some(client_ca),
        true,
        crls,
    )
}

/// The TLS configuration of an HTTPS endpoint that Kubernetes' API aggregation layer calls
/// (the aggregated API service): TLS 1.2 or 1.3, ALPN `http/1.1`. A client certificate is
/// asked for and, when one is presented, it must chain to `client_ca_pem` (the front-proxy
/// CA) or the handshake fails; a connection without one is accepted, for the caller to
/// refuse its requests (health probes need none).
pub fn https_server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
) -> Result<Arc<ServerConfig>, Error> {
    const CA: &str = "front-proxy client CA certificate";
    let provider = crypto_provider();
    let mut roots = RootCertStore::empty();
    for ca in parse_certs(client_ca_pem, CA, None)? {
        roots
            .add(ca)
            .map_err(|e| Error::load(CA, None, format!("not usable as a trust anchor: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|source| Error::ClientVerifier { source })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| Error::TlsConfig {
            side: "server",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            parse_certs(cert_pem, "server certificate", None)?,
            parse_key(key_pem, "server private key", None)?,
        )
        .map_err(|source| Error::TlsConfig {
            side: "server",
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn build_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_cas: Vec<CertificateDer<'static>>,
    client_ca_path: Option<&Path>,
    root_hints: bool,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<ServerConfig>, Error> {
    let provider = crypto_provider();
    let mut roots = RootCertStore::empty();
    for ca in &client_cas {
        match roots.add(ca.clone()) {
            Ok(()) => {}
            // A pinned certificate need not be usable as an anchor.
            Err(_) if !root_hints => {}
            Err(e) => {
                return Err(Error::load(
                    "client CA certificate",
                    client_ca_path,
                    format!("not usable as a trust anchor: {e}"),
                ));
            }
        }
    }
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !root_hints {
        builder = builder.clear_root_hint_subjects();
    }
    if !crls.is_empty() {
        builder = builder
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let chained = builder
        .build()
        .map_err(|source| Error::ClientVerifier { source })?;
    let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> = if root_hints {
        chained
    } else {
        Arc::new(crate::pinned::PinnedOrChained {
            pinned: client_cas,
            chained,
        })
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| Error::TlsConfig {
            side: "server",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| Error::TlsConfig {
            side: "server",
            source,
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TCP connections on `listener` and performs TLS handshakes with `config`,
/// yielding the connections whose handshake succeeded.
///
/// Use with tonic:
///
/// ```no_run
/// # async fn f(router: tonic::transport::server::Router, config: std::sync::Arc<rustls::ServerConfig>) -> Result<(), Box<dyn std::error::Error>> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
/// let incoming = klio_tls::tls_incoming(listener, config);
/// router
///     .serve_with_incoming_shutdown(incoming, async { let _ = tokio::signal::ctrl_c().await; })
///     .await?;
/// # Ok(()) }
/// ```
///
/// Each handshake runs in its own task with a [`HANDSHAKE_TIMEOUT`], so a slow or
/// hostile client never holds up others. Failed handshakes (no or untrusted client
/// certificate, TLS 1.2, plain text, timeout) are logged and skipped; the stream never
/// ends on its own and never yields an error. Dropping it stops accepting, closes the
/// listener and abandons handshakes in progress. Must be called inside a Tokio runtime.
pub fn tls_incoming(listener: TcpListener, config: Arc<ServerConfig>) -> TlsIncoming {
    TlsIncoming::spawn(listener, ConfigSource::Fixed(config), HANDSHAKE_TIMEOUT)
}

/// Gives the configuration for the next handshake (e.g. re-read when certificate files
/// changed); `None` refuses the connection (the reason is the source's to log).
pub type ConfigProvider = Arc<dyn Fn() -> Option<Arc<ServerConfig>> + Send + Sync>;

/// Like [`tls_incoming`], asking `provider` for the configuration of every handshake, so
/// that rotated certificates are used without a restart.
pub fn tls_incoming_reloading(listener: TcpListener, provider: ConfigProvider) -> TlsIncoming {
    TlsIncoming::spawn(
        listener,
        ConfigSource::Provider(provider),
        HANDSHAKE_TIMEOUT,
    )
}

/// Where the accept loop gets its configuration.
enum ConfigSource {
    Fixed(Arc<ServerConfig>),
    Provider(ConfigProvider),
}

impl ConfigSource {
    fn acceptor(&self) -> Option<TlsAcceptor> {
        match self {
            ConfigSource::Fixed(c) => Some(TlsAcceptor::from(c.clone())),
            ConfigSource::Provider(p) => p().map(TlsAcceptor::from),
        }
    }
}

/// The stream [`tls_incoming`] returns.
#[derive(Debug)]
pub struct TlsIncoming {
    ready: mpsc::Receiver<ServerTlsStream>,
    local_addr: Option<SocketAddr>,
    accept_task: JoinHandle<()>,
}

impl TlsIncoming {
    fn spawn(listener: TcpListener, config: ConfigSource, timeout: Duration) -> TlsIncoming {
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        let local_addr = listener.local_addr().ok();
        let accept_task = tokio::spawn(accept_loop(listener, config, timeout, tx));
        TlsIncoming {
            ready,
            local_addr,
            accept_task,
        }
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

impl Stream for TlsIncoming {
    type Item = Result<ServerTlsStream, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.ready.poll_recv(cx).map(|conn| conn.map(Ok))
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: ConfigSource,
    timeout: Duration,
    ready: mpsc::Sender<ServerTlsStream>,
) {
    // Owning the handshake tasks here means aborting this task abandons them too.
    let mut handshakes = JoinSet::new();
    let per_address: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        while handshakes.try_join_next().is_some() {}
        if handshakes.len() >= MAX_PENDING_HANDSHAKES {
            tokio::select! {
                _ = handshakes.join_next() => continue,
                () = ready.closed() => return,
            }
        }
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Typically EMFILE/ENFILE or a connection reset before accept; back
                    // off briefly so a persistent condition does not spin.
                    tracing::warn!(error = %e, "could not accept TCP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = ready.closed() => return,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        let Some(acceptor) = config.acceptor() else {
            tracing::warn!(%peer, "no usable TLS configuration; connection refused");
            continue;
        };
        let Some(slot) = AddressSlot::take(&per_address, peer.ip()) else {
            tracing::debug!(%peer, "too many pending handshakes from this address; connection closed");
            continue;
        };
        let ready = ready.clone();
        handshakes.spawn(async move {
            let _slot = slot;
            let mut first = [0u8; 1];
            match tokio::time::timeout(FIRST_BYTE_TIMEOUT, tcp.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return,
                Err(_) => {
                    tracing::debug!(%peer, "connection silent for {FIRST_BYTE_TIMEOUT:?}; closed");
                    return;
                }
            }
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    tracing::debug!(%peer, "TLS handshake completed");
                    // Only fails when the server has stopped; the connection is dropped.
                    let _ = ready.send(tls).await;
                }
                Ok(Err(e)) => log_handshake_failure(peer, &e),
                Err(_) => {
                    tracing::debug!(%peer, timeout = ?timeout, "TLS handshake timed out")
                }
            }
        });
    }
}

/// A pending handshake counted against its address; released on drop.
struct AddressSlot {
    counts: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddressSlot {
    fn take(
        counts: &Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
        ip: IpAddr,
    ) -> Option<AddressSlot> {
        let mut map = counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_PENDING_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

fn log_handshake_failure(peer: SocketAddr, err: &io::Error) {
    let rustls_error = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        // A client that reached certificate verification and failed it deserves the
        // operator's attention: a misconfigured sidecar or someone knocking.
        Some(
            e @ (rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::PeerIncompatible(_)),
        ) => {
            tracing::warn!(%peer, error = %e, "rejected TLS client")
        }
        _ => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
    }
}

#[cfg(test)]
pub(crate) fn tls_incoming_with_timeout(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> TlsIncoming {
    TlsIncoming::spawn(listener, ConfigSource::Fixed(config), timeout)
}
