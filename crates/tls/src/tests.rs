//! Loopback tests with real TLS: handshakes at the rustls layer through [`tls_incoming`],
//! and one tonic server and client end to end.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;

use crate::pem::{parse_certs, parse_key};
use crate::server::tls_incoming_with_timeout;
use crate::*;

/// Two unrelated development PKIs: `main` (the server's) and `other`.
struct Fixture {
    _tmp: TempDir,
    main: PkiLayout,
    other: PkiLayout,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clusters = vec!["a".to_string(), "b".to_string()];
    let main = init_dev_pki(&tmp.path().join("main"), &clusters, &[]).expect("main pki");
    let other = init_dev_pki(&tmp.path().join("other"), &clusters, &[]).expect("other pki");
    Fixture {
        _tmp: tmp,
        main,
        other,
    }
}

fn server_tls(layout: &PkiLayout) -> Arc<rustls::ServerConfig> {
    load_server_config(&layout.server.cert, &layout.server.key, &layout.ca.cert)
        .expect("server config")
}

/// A server that answers every accepted connection with the principal read through
/// tonic's `Connected` implementation, then closes it.
async fn start_principal_server(layout: &PkiLayout, handshake_timeout: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut incoming = tls_incoming_with_timeout(listener, server_tls(layout), handshake_timeout);
    tokio::spawn(async move {
        while let Some(conn) = incoming.next().await {
            let Ok(mut tls) = conn else { continue };
            tokio::spawn(async move {
                let info = tls.connect_info();
                let reply = match info.peer_certs().as_ref().and_then(|c| c.first().cloned()) {
                    Some(leaf) => match principal_from_der(&leaf) {
                        Ok(p) => format!("principal {p} from {:?}", info.get_ref().remote_addr()),
                        Err(e) => format!("error {e}"),
                    },
                    None => "no certificate".to_string(),
                };
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

fn client_config(
    ca: &Path,
    identity: Option<&CertKeyPaths>,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in parse_certs(&std::fs::read(ca).expect("ca"), "ca", None).expect("ca pem") {
        roots.add(ca).expect("root");
    }
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(paths) => {
            let chain = parse_certs(&std::fs::read(&paths.cert).expect("cert"), "cert", None)
                .expect("cert pem");
            let key =
                parse_key(&std::fs::read(&paths.key).expect("key"), "key", None).expect("key pem");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// Connects, handshakes and reads the server's whole answer; `Err` describes where it
/// failed.
async fn ask(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<String, String> {
    let exchange = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("tcp: {e}"))?;
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let mut answer = String::new();
        tls.read_to_string(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if answer.is_empty() {
            return Err("closed without an answer".to_string());
        }
        Ok(answer)
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

async fn ask_as(addr: SocketAddr, fx: &Fixture, who: &CertKeyPaths) -> Result<String, String> {
    ask(addr, client_config(&fx.main.ca.cert, Some(who), TLS13)).await
}

#[tokio::test]
async fn tls_incoming_valid_client_cert_yields_principal() {
    let fx = fixture();
    let addr = start_principal_server(&fx.main, HANDSHAKE_TIMEOUT).await;
    let answer = ask_as(addr, &fx, &fx.main.clients["a"])
        .await
        .expect("accepted");
    assert!(
        answer.starts_with("principal klio@a from Some(127.0.0.1:"),
        "{answer}"
    );
    let answer = ask_as(addr, &fx, &fx.main.snapshot_reader)
        .await
        .expect("accepted");
    assert!(
        answer.starts_with("principal snapshot_reader@klio "),
        "{answer}"
    );
}

#[tokio::test]
async fn tls_incoming_cert_from_other_ca_is_rejected() {
    let fx = fixture();
    let addr = start_principal_server(&fx.main, HANDSHAKE_TIMEOUT).await;
    let err = ask_as(addr, &fx, &fx.other.clients["a"])
        .await
        .expect_err("rejected");
    assert!(err.contains("UnknownCA"), "{err}");
}

#[tokio::test]
async fn tls_incoming_no_client_cert_is_rejected() {
    let fx = fixture();
    let addr = start_principal_server(&fx.main, HANDSHAKE_TIMEOUT).await;
    let err = ask(addr, client_config(&fx.main.ca.cert, None, TLS13))
        .await
        .expect_err("rejected");
    assert!(err.contains("CertificateRequired"), "{err}");
}

#[tokio::test]
async fn tls_incoming_tls12_client_is_rejected() {
    let fx = fixture();
    let addr = start_principal_server(&fx.main, HANDSHAKE_TIMEOUT).await;
    let err = ask(
        addr,
        client_config(&fx.main.ca.cert, Some(&fx.main.clients["a"]), TLS12),
    )
    .await
    .expect_err("rejected");
    assert!(err.starts_with("handshake: "), "{err}");
}

#[tokio::test]
async fn tls_incoming_plaintext_is_rejected_and_serving_continues() {
    let fx = fixture();
    let addr = start_principal_server(&fx.main, HANDSHAKE_TIMEOUT).await;
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(addr).await.expect("tcp");
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("write preface");
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf))
            .await
            .expect("server closes the connection");
        // Either a TLS alert record (content type 21) and EOF, or a reset.
        if read.is_ok() {
            assert!(buf.is_empty() || buf[0] == 21, "unexpected answer {buf:?}");
        }
    }
    let answer = ask_as(addr, &fx, &fx.main.clients["b"])
        .await
        .expect("still serving");
    assert!(answer.starts_with("principal klio@b "), "{answer}");
}

#[tokio::test]
async fn tls_incoming_silent_clients_block_nobody() {
    let fx = fixture();
    // A handshake timeout far longer than the liveness bound below: if silent clients held
    // up the accept loop, the good client would wait for them and the bound would trip.
    let addr = start_principal_server(&fx.main, Duration::from_secs(60)).await;
    let mut silent: Vec<TcpStream> = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(addr).await.expect("tcp"));
    }
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        ask_as(addr, &fx, &fx.main.clients["a"]),
    )
    .await
    .expect("a good client is served while silent ones still hold their connections")
    .expect("accepted");
    assert!(answer.starts_with("principal klio@a "), "{answer}");
    drop(silent);
}

/// 600 connections that never send a byte (more than the old limit of pending handshakes)
/// do not keep a real client waiting: it is served while they are still open.
#[tokio::test]
async fn six_hundred_silent_sockets_do_not_delay_a_real_client() {
    let fx = fixture();
    let addr = start_principal_server(&fx.main, Duration::from_secs(60)).await;
    let mut silent: Vec<TcpStream> = Vec::new();
    for _ in 0..600 {
        silent.push(TcpStream::connect(addr).await.expect("tcp"));
    }
    // Far below the handshake timeout the silent ones would otherwise hold their places for.
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        ask_as(addr, &fx, &fx.main.clients["a"]),
    )
    .await
    .expect("the real client is served at once")
    .expect("accepted");
    assert!(answer.starts_with("principal klio@a "), "{answer}");
    drop(silent);
}

#[tokio::test]
async fn tls_incoming_handshake_timeout_closes_silent_clients() {
    let fx = fixture();
    let addr = start_principal_server(&fx.main, Duration::from_millis(500)).await;
    let mut silent: Vec<TcpStream> = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(addr).await.expect("tcp"));
    }
    for mut tcp in silent {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf))
            .await
            .expect("the handshake timeout closes the connection");
        if let Ok(n) = read {
            assert_eq!(n, 0);
        }
    }
}

#[test]
fn server_config_from_bytes_offers_h2() {
    let fx = fixture();
    let read = |p: &Path| std::fs::read(p).expect("read");
    let config = server_config(
        &read(&fx.main.server.cert),
        &read(&fx.main.server.key),
        &read(&fx.main.ca.cert),
    )
    .expect("config");
    assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
}

#[test]
fn server_config_from_bytes_rejects_mismatched_key() {
    let fx = fixture();
    let cert = std::fs::read(&fx.main.server.cert).expect("cert");
    let key = std::fs::read(&fx.main.clients["a"].key).expect("key");
    let ca = std::fs::read(&fx.main.ca.cert).expect("ca");
    let err = server_config(&cert, &key, &ca).expect_err("mismatch");
    assert!(
        err.to_string()
            .starts_with("could not build the server TLS configuration: "),
        "{err}"
    );
}

#[test]
fn load_server_config_missing_file_names_path() {
    let fx = fixture();
    let missing = fx.main.dir.join("nope.crt");
    let err = load_server_config(&fx.main.server.cert, &fx.main.server.key, &missing)
        .expect_err("missing CA");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "could not read client CA certificate file \"{}\": ",
            missing.display()
        )),
        "{msg}"
    );
}

#[test]
fn load_server_config_garbage_key_names_path() {
    let fx = fixture();
    let err = load_server_config(&fx.main.server.cert, &fx.main.server.cert, &fx.main.ca.cert)
        .expect_err("certificate given as key");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "could not load server private key from file \"{}\": no private key PEM block found",
            fx.main.server.cert.display()
        )),
        "{msg}"
    );
}

#[test]
fn client_tls_mismatched_key_names_both_files() {
    let fx = fixture();
    let err = client_tls(
        &fx.main.ca.cert,
        &fx.main.clients["a"].cert,
        &fx.main.clients["b"].key,
        "localhost",
    )
    .expect_err("mismatch");
    let msg = err.to_string();
    assert!(
        msg.contains("client-a.crt") && msg.contains("client-b.key"),
        "{msg}"
    );
}

#[test]
fn client_tls_any_skips_missing_files_but_needs_one() {
    let fx = fixture();
    let a = &fx.main.clients["a"];
    let missing = fx.main.ca.cert.with_file_name("absent-ca.crt");
    client_tls_any(
        &[missing.clone(), fx.main.ca.cert.clone()],
        &a.cert,
        &a.key,
        "localhost",
    )
    .expect("the present CA is enough");
    let err = client_tls_any(std::slice::from_ref(&missing), &a.cert, &a.key, "localhost")
        .expect_err("no CA at all");
    assert!(err.to_string().contains("absent-ca.crt"), "{err}");
}

#[test]
fn install_crypto_provider_is_idempotent() {
    install_crypto_provider();
    install_crypto_provider();
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
}

// ---------------------------------------------------------------------------------------
// tonic end to end: a hand-written unary service (no codegen) served over tls_incoming.

mod whoami {
    use std::convert::Infallible;

    use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
    use tonic::{Request, Response, Status};

    use crate::{authorize_cluster, principal_of};

    pub const PATH: &str = "/klio.test.Whoami/Get";

    /// Answers a request naming a cluster with the caller's principal, if the caller may
    /// access that cluster.
    #[derive(Clone)]
    pub struct Whoami;

    impl tonic::server::NamedService for Whoami {
        const NAME: &'static str = "klio.test.Whoami";
    }

    struct Get;

    impl tonic::server::UnaryService<String> for Get {
        type Response = String;
        type Future = BoxFuture<Response<String>, Status>;

        fn call(&mut self, request: Request<String>) -> Self::Future {
            Box::pin(async move {
                let principal = principal_of(&request)?;
                authorize_cluster(&principal, request.get_ref())?;
                Ok(Response::new(principal.to_string()))
            })
        }
    }

    impl Service<http::Request<tonic::body::Body>> for Whoami {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            Box::pin(async move {
                let codec = tonic_prost::ProstCodec::<String, String>::default();
                Ok(tonic::server::Grpc::new(codec).unary(Get, req).await)
            })
        }
    }
}

async fn start_tonic_server(layout: &PkiLayout) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = tls_incoming(listener, server_tls(layout));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(whoami::Whoami)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = result {
            panic!("tonic server failed: {e}");
        }
    });
    (addr, stop)
}

async fn whoami(
    addr: SocketAddr,
    ca: &Path,
    who: &CertKeyPaths,
    cluster: &str,
) -> Result<String, tonic::Status> {
    let tls = client_tls(ca, &who.cert, &who.key, "localhost").expect("client tls");
    let channel = connect("127.0.0.1", addr.port(), tls)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let reply = grpc
        .unary(
            tonic::Request::new(cluster.to_string()),
            tonic::codegen::http::uri::PathAndQuery::from_static(whoami::PATH),
            tonic_prost::ProstCodec::<String, String>::default(),
        )
        .await?;
    Ok(reply.into_inner())
}

#[tokio::test]
async fn tonic_over_tls_incoming_reads_principal_and_authorizes() {
    let fx = fixture();
    let (addr, stop) = start_tonic_server(&fx.main).await;
    let ca = &fx.main.ca.cert;

    let me = whoami(addr, ca, &fx.main.clients["a"], "a")
        .await
        .expect("own cluster");
    assert_eq!(me, "klio@a");

    let denied = whoami(addr, ca, &fx.main.clients["a"], "b")
        .await
        .expect_err("other cluster");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        denied.message(),
        "certificate \"klio@a\" may not access cluster \"b\""
    );

    let reader = whoami(addr, ca, &fx.main.snapshot_reader, "a")
        .await
        .expect_err("reader may not write");
    assert_eq!(reader.code(), tonic::Code::PermissionDenied);

    // A certificate whose common name is not a principal gets through TLS (the CA signed
    // it) but not past principal_of.
    let (cert, key) = issue_client_cert(&fx.main.dir, "no-at-sign", "malformed").expect("issue");
    let malformed = CertKeyPaths { cert, key };
    let status = whoami(addr, ca, &malformed, "a")
        .await
        .expect_err("malformed CN");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().starts_with("invalid client certificate: "),
        "{status:?}"
    );

    // A certificate from another CA never reaches the service.
    let foreign = whoami(addr, ca, &fx.other.clients["a"], "a")
        .await
        .expect_err("foreign CA");
    assert!(format!("{foreign:?}").contains("UnknownCA"), "{foreign:?}");

    // And the server still serves afterwards.
    let me = whoami(addr, ca, &fx.main.clients["b"], "b")
        .await
        .expect("own cluster");
    assert_eq!(me, "klio@b");
    let _ = stop.send(());
}

#[tokio::test]
async fn connect_nothing_listening_names_address_and_hints() {
    let fx = fixture();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let who = &fx.main.clients["a"];
    let tls = client_tls(&fx.main.ca.cert, &who.cert, &who.key, "localhost").expect("tls");
    let err = connect("127.0.0.1", port, tls).await.expect_err("refused");
    assert!(err.is_retryable());
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "could not connect to the Klio server at 127.0.0.1:{port}: "
        )),
        "{msg}"
    );
    assert!(
        msg.ends_with(&format!(
            "\nHINT: is `klio server` running and listening on 127.0.0.1:{port}?"
        )),
        "{msg}"
    );
}

#[tokio::test]
async fn connect_invalid_host_is_rejected() {
    let fx = fixture();
    let who = &fx.main.clients["a"];
    let tls = client_tls(&fx.main.ca.cert, &who.cert, &who.key, "localhost").expect("tls");
    let err = connect("bad host", 1, tls).await.expect_err("invalid");
    assert!(
        err.to_string()
            .starts_with("invalid server address \"bad host:1\": "),
        "{err}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn connect_ipv6_host_is_bracketed() {
    let fx = fixture();
    let who = &fx.main.clients["a"];
    let tls = client_tls(&fx.main.ca.cert, &who.cert, &who.key, "localhost").expect("tls");
    // Port 1 on ::1 is closed; what matters is that the address is well-formed.
    let err = connect("::1", 1, tls).await.expect_err("refused");
    assert!(
        matches!(err, Error::Connect { ref addr, .. } if addr == "[::1]:1"),
        "{err}"
    );
}
