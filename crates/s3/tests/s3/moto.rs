//! A real S3-compatible server for the tests: moto's server, one per test, on its own port,
//! killed on drop. If it cannot be started the test fails, with the reason and the fix.
//!
//! moto (`pip install 'moto[server]==5.2.1'`) keeps everything in memory, accepts any
//! credentials unless `INITIAL_NO_AUTH_ACTION_COUNT` is set, and speaks TLS with `-c`/`-k`.
//! The interpreter is `$KLIO_PYTHON` or the one `python3` resolves to: started directly, not
//! through a pyenv shim, so the process killed on drop is the server itself.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use klio_s3::{S3Config, S3Credentials, S3Store};
use klio_test_support::{ChildGuard, free_port};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use tempfile::TempDir;

const START_TIMEOUT: Duration = Duration::from_secs(60);
const INSTALL_HINT: &str = "HINT: install moto's server: python3 -m pip install 'moto[server]==5.2.1' (add --break-system-packages on Debian's Python), or point KLIO_PYTHON at a Python that has it";

/// The Python interpreter that runs moto (resolved once).
fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        if let Ok(p) = std::env::var("KLIO_PYTHON") {
            return p;
        }
        let out = Command::new("python3")
            .args(["-c", "import sys, moto.server; print(sys.executable)"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 to start moto: {e}\n{INSTALL_HINT}"));
        if !out.status.success() {
            panic!(
                "python3 cannot import moto.server: {}\n{INSTALL_HINT}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
}

/// A CA and a server certificate for 127.0.0.1 and localhost, as PEM files.
pub struct TlsFiles {
    pub ca_pem: PathBuf,
    pub ca_der: Vec<u8>,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsFiles {
    pub fn generate(dir: &std::path::Path) -> TlsFiles {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "klio test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
        let cert = params.signed_by(&key, &issuer).unwrap();

        let files = TlsFiles {
            ca_pem: dir.join("ca.pem"),
            ca_der: ca_cert.der().to_vec(),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        std::fs::write(&files.ca_pem, ca_cert.pem()).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

/// A running moto server.
pub struct Moto {
    child: ChildGuard,
    port: u16,
    _dir: TempDir,
    pub tls: Option<TlsFiles>,
    log: PathBuf,
}

#[derive(Default)]
pub struct MotoOptions {
    pub tls: bool,
    /// Requests served before moto starts checking credentials (`INITIAL_NO_AUTH_ACTION_COUNT`).
    pub unauthenticated_requests: Option<u32>,
}

impl Moto {
    /// Plain HTTP, any credentials accepted.
    pub fn start() -> Moto {
        Moto::start_with(MotoOptions::default())
    }

    pub fn start_tls() -> Moto {
        Moto::start_with(MotoOptions {
            tls: true,
            ..MotoOptions::default()
        })
    }

    pub fn start_with(options: MotoOptions) -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let tls = options.tls.then(|| TlsFiles::generate(dir.path()));
        let log = dir.path().join("moto.log");
        for attempt in 1..=3 {
            let port = free_port();
            let log_file = std::fs::File::create(&log).unwrap();
            let mut cmd = Command::new(python());
            cmd.args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
            if let Some(t) = &tls {
                cmd.arg("-c").arg(&t.cert).arg("-k").arg(&t.key);
            }
            if let Some(n) = options.unauthenticated_requests {
                cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
            }
            let mut child = ChildGuard::spawn(&mut cmd)
                .unwrap_or_else(|e| panic!("cannot start moto: {e:#}\n{INSTALL_HINT}"));
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let started = Instant::now();
            loop {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Moto {
                        child,
                        port,
                        _dir: dir,
                        tls,
                        log,
                    };
                }
                if !child.is_running() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.contains("already in use") && attempt < 3 {
                        break; // the port was taken meanwhile: another one
                    }
                    panic!(
                        "moto exited before it answered on port {port}:\n{text}\n{INSTALL_HINT}"
                    );
                }
                if started.elapsed() > START_TIMEOUT {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    panic!("moto did not answer on port {port} within {START_TIMEOUT:?}:\n{text}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Stops the server now (as a crash would).
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
    }

    /// What moto printed, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends one unsigned request (moto accepts them for buckets and objects) and returns
    /// the status code.
    pub fn raw_request(&self, method: &str, path: &str, body: &[u8]) -> u16 {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        );
        let tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let response = match &self.tls {
            None => exchange(tcp, request.as_bytes(), body),
            Some(t) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(CertificateDer::from(t.ca_der.clone())).unwrap();
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                let name = ServerName::try_from("127.0.0.1").unwrap();
                let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
                exchange(
                    rustls::StreamOwned::new(conn, tcp),
                    request.as_bytes(),
                    body,
                )
            }
        };
        let status = response.split(' ').nth(1).unwrap_or_default();
        status
            .parse()
            .unwrap_or_else(|_| panic!("bad response from moto: {response}"))
    }

    /// Replaces an object behind the store's back (as damage would), with a signed request.
    pub fn overwrite_object(
        &self,
        rt: &tokio::runtime::Runtime,
        bucket: &str,
        name: &str,
        data: Vec<u8>,
    ) {
        use object_store::ObjectStoreExt as _;
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .build()
            .unwrap();
        rt.block_on(s3.put(&object_store::path::Path::from(name), data.into()))
            .unwrap();
    }

    pub fn create_bucket(&self, bucket: &str) {
        let status = self.raw_request("PUT", &format!("/{bucket}"), b"");
        assert_eq!(status, 200, "create bucket {bucket}: {}", self.log());
    }

    pub fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".to_string()),
            ca_bundle: self.tls.as_ref().map(|t| t.ca_pem.clone()),
        }
    }
}

fn exchange(mut stream: impl Read + Write, head: &[u8], body: &[u8]) -> String {
    stream.write_all(head).unwrap();
    stream.write_all(body).unwrap();
    stream.flush().unwrap();
    let mut response = Vec::new();
    // moto closes the connection after the response; TLS may end without close_notify.
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// The credentials moto accepts.
pub fn credentials() -> S3Credentials {
    S3Credentials {
        access_key_id: "testing".to_string(),
        secret_access_key: "testing".to_string(),
        session_token: None,
    }
}

/// A multi-thread runtime for the store; the test thread is outside it, like a blocking
/// thread.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// What the contract tests need of an S3-compatible server: moto, or versitygw
/// ([`crate::versitygw::Versity`]). Both accept the [`credentials`].
pub trait S3Peer {
    fn create_bucket(&self, bucket: &str);
    fn config(&self, bucket: &str, prefix: &str) -> S3Config;
    /// Replaces an object behind the store's back (as damage would).
    fn overwrite_object(
        &self,
        rt: &tokio::runtime::Runtime,
        bucket: &str,
        name: &str,
        data: Vec<u8>,
    );
    /// What the server printed, for failure messages.
    fn log(&self) -> String;
}

impl S3Peer for Moto {
    fn create_bucket(&self, bucket: &str) {
        Moto::create_bucket(self, bucket)
    }
    fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        Moto::config(self, bucket, prefix)
    }
    fn overwrite_object(
        &self,
        rt: &tokio::runtime::Runtime,
        bucket: &str,
        name: &str,
        data: Vec<u8>,
    ) {
        Moto::overwrite_object(self, rt, bucket, name, data)
    }
    fn log(&self) -> String {
        Moto::log(self)
    }
}

/// Opens a store on the existing `bucket` under `prefix`, panicking with the server's log on
/// failure.
pub fn open(
    peer: &(impl S3Peer + ?Sized),
    rt: &tokio::runtime::Runtime,
    bucket: &str,
    prefix: &str,
) -> S3Store {
    S3Store::open_with_credentials(
        &peer.config(bucket, prefix),
        rt.handle().clone(),
        &credentials(),
    )
    .unwrap_or_else(|e| panic!("open s3 store: {e}\nserver log:\n{}", peer.log()))
}
