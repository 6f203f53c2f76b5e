//! Mutual TLS for Klio's gRPC server and its clients, and who a caller is.
//!
//! Principal types and functions:
//! - [`Principal`]: the identity a verified client certificate names through its subject
//!   common name `<user>@<cluster>`: `klio@<cluster>` for a cluster's sidecar,
//!   `snapshot_reader@klio` for read-only catalog access. [`principal_of`] reads it from
//!   a tonic request; [`authorize_cluster`] and [`authorize_catalog_read`] apply the
//!   access rules.
//! - [`server_config`] / [`load_server_config`]: a rustls [`rustls::ServerConfig`] that
//!   speaks TLS 1.3 only, offers ALPN `h2` and requires a client certificate from the
//!   client CA.
//! - [`tls_incoming`] / [`TlsIncoming`]: a stream of handshaken connections for
//!   `tonic::transport::Server::serve_with_incoming_shutdown` (tonic's own TLS acceptor
//!   cannot be restricted to TLS 1.3). Handshakes run concurrently with a timeout;
//!   failures are logged and skipped.
//! - [`client_tls`] / [`connect`]: the client's [`tonic::transport::ClientTlsConfig`] and
//!   a [`tonic::transport::Channel`] with timeouts, keepalives and large windows.
//! - [`init_dev_pki`] / [`PkiLayout`] / [`issue_client_cert`]: a development CA with
//!   server, cluster and snapshot-reader certificates in one directory.
//! - [`Error`]: the crate's error type.
//!
//! # The client certificate inside a handler
//!
//! The connections [`tls_incoming`] yields are `tokio_rustls::server::TlsStream<TcpStream>`
//! ([`ServerTlsStream`]), for which tonic 0.14 (feature `tls-connect-info`, enabled by
//! `tls-aws-lc`) implements `Connected`. Requests therefore carry tonic's
//! `TlsConnectInfo<TcpConnectInfo>`, exactly as with tonic's built-in TLS:
//!
//! ```no_run
//! fn handler(request: tonic::Request<()>) -> Result<(), tonic::Status> {
//!     let principal = klio_tls::principal_of(&request)?; // UNAUTHENTICATED if missing
//!     klio_tls::authorize_cluster(&principal, "main")?;  // PERMISSION_DENIED if not "klio@main"
//!     let _chain = request.peer_certs(); // Option<Arc<Vec<CertificateDer<'static>>>>, leaf first
//!     let _addr = request.remote_addr(); // Option<SocketAddr>
//!     Ok(())
//! }
//! ```
//!
//! Every configuration builder here calls [`install_crypto_provider`] first, so the
//! process uses aws-lc-rs whichever of these functions runs first.

mod client;
mod error;
mod pem;
mod pinned;
mod pki;
mod principal;
mod reload;
mod server;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub use client::{
    CONNECT_TIMEOUT, INITIAL_CONNECTION_WINDOW, INITIAL_STREAM_WINDOW, KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT, TCP_KEEPALIVE, TLS_HANDSHAKE_TIMEOUT, client_tls, client_tls_any, connect,
};
pub use error::Error;
pub use pki::{
    CERT_FILE_MODE, CRL_FILE, CertKeyPaths, KEY_FILE_MODE, PkiLayout, init_dev_pki,
    issue_client_cert, revoke_dev_certs,
};
pub use principal::{
    ADMIN_CN, CLUSTER_USER, MAX_CLUSTER_NAME_LEN, Principal, SNAPSHOT_READER_CLUSTER,
    SNAPSHOT_READER_CN, SNAPSHOT_READER_USER, authorize_admin, authorize_catalog_read,
    authorize_cluster, principal_from_der, principal_of, validate_cluster_name,
};
pub use reload::FileReloader;
pub use server::{
    ALPN_H2, ConfigProvider, FIRST_BYTE_TIMEOUT, HANDSHAKE_TIMEOUT, ServerTlsStream, TlsIncoming,
    https_server_config, load_server_config, load_server_config_with_crl, server_config,
    server_config_without_ca_hints, tls_incoming, tls_incoming_reloading,
};

/// Installs aws-lc-rs as the process-wide rustls crypto provider. Idempotent: when a
/// provider is already installed (by an earlier call or by someone else), that one
/// stays.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The process-wide provider, installing aws-lc-rs first if none is.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    install_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}
