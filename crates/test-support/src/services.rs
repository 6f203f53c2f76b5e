//! Real services for the tests: nats-server (Debian's package) and moto's S3 server
//! (`pip install 'moto[server]==5.2.1'`). A test that cannot start one fails with the reason
//! and the fix; processes are killed on drop.

#![allow(clippy::unwrap_used)] // test fixtures: a failure is a panic with the reason

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ChildGuard, free_port};

/// The nats-server binary: `/usr/sbin/nats-server` (Debian) or the first one on `PATH`.
pub fn nats_server_binary() -> PathBuf {
    let debian = Path::new("/usr/sbin/nats-server");
    if debian.is_file() {
        return debian.to_path_buf();
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "nats-server not found in /usr/sbin or on PATH; the NATS work queue tests need a real server\nHINT: install it with \"apt-get install -y nats-server\""
    );
}

/// A nats-server with JetStream on 127.0.0.1, killed when dropped.
pub struct NatsServer {
    child: Option<ChildGuard>,
    port: u16,
    store: PathBuf,
    log: PathBuf,
    /// More command-line options (authentication, TLS).
    extra: Vec<String>,
}

impl NatsServer {
    /// Starts a server storing JetStream data in `store`, on a free port.
    pub fn start(store: &Path) -> NatsServer {
        NatsServer::start_with(store, &[])
    }

    /// [`NatsServer::start`] with more nats-server options, such as `--auth TOKEN` or
    /// `--tls --tlscert F --tlskey F`.
    pub fn start_with(store: &Path, extra: &[&str]) -> NatsServer {
        std::fs::create_dir_all(store).unwrap();
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = NatsServer {
                child: None,
                port: free_port(),
                store: store.to_path_buf(),
                log: store.with_extension("log"),
                extra: extra.iter().map(|s| s.to_string()).collect(),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start nats-server: {last_error}");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGTERM, so it shuts down as an operator's restart would) and starts
    /// it again on the same port with the same store.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()
                .unwrap();
            assert!(status.success(), "kill -TERM nats-server failed");
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.is_running() {
                assert!(
                    Instant::now() < deadline,
                    "nats-server did not stop within 10 s of SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut last_error = String::new();
        // The port was just released; retry briefly in case it lingers.
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("could not restart nats-server: {last_error}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        // Readiness is read from this start's part of the log, so that another process
        // answering on the same port cannot pass for this server.
        let log_offset = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| e.to_string())?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(nats_server_binary());
        cmd.arg("-js")
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.store)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let mut child = ChildGuard::spawn(&mut cmd).map_err(|e| format!("{e:#}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if !child.is_running() {
                return Err(format!(
                    "nats-server exited at startup; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ));
            }
            if self.log_says_ready(log_offset) && self.accepts_clients() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nats-server did not accept connections within 10 s; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_says_ready(&self, offset: u64) -> bool {
        let log = std::fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(log.len());
        String::from_utf8_lossy(&log[start..]).contains("Server is ready")
    }

    /// Whether the server answers a connection with its `INFO` line.
    fn accepts_clients(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).is_ok() && &buf == b"INFO"
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(log) = std::fs::read_to_string(&self.log)
        {
            eprintln!("nats-server log:\n{log}");
        }
        // ChildGuard kills and reaps the server.
        self.child.take();
    }
}

/// moto's S3 server over plain HTTP on a free port (`$KLIO_PYTHON` or `python3` runs it).
/// It keeps everything in memory and accepts the credentials `testing`/`testing`.
pub struct Moto {
    child: Option<ChildGuard>,
    port: u16,
    log: PathBuf,
}

const MOTO_HINT: &str = "HINT: install moto's server: python3 -m pip install 'moto[server]==5.2.1' (add --break-system-packages on Debian's Python), or point KLIO_PYTHON at a Python that has it";

impl Moto {
    /// Starts moto; `log` receives its output.
    pub fn start(log: &Path) -> Moto {
        Moto::start_with(log, None)
    }

    /// Starts moto checking credentials after the first `unauthenticated` requests
    /// (`INITIAL_NO_AUTH_ACTION_COUNT`); then every key is unknown to it.
    pub fn start_with(log: &Path, unauthenticated: Option<u32>) -> Moto {
        let python = std::env::var("KLIO_PYTHON").unwrap_or_else(|_| "python3".to_string());
        for _ in 0..3 {
            let port = free_port();
            let out = std::fs::File::create(log).unwrap();
            let mut cmd = Command::new(&python);
            cmd.args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
            if let Some(n) = unauthenticated {
                cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
            }
            let mut child = ChildGuard::spawn(&mut cmd)
                .unwrap_or_else(|e| panic!("cannot start moto: {e:#}\n{MOTO_HINT}"));
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if child.listens_on(port) && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Moto {
                        child: Some(child),
                        port,
                        log: log.to_path_buf(),
                    };
                }
                if !child.is_running() {
                    let text = std::fs::read_to_string(log).unwrap_or_default();
                    if text.contains("already in use") {
                        break;
                    }
                    panic!("moto exited at startup:\n{text}\n{MOTO_HINT}");
                }
                assert!(
                    Instant::now() < deadline,
                    "moto did not answer on port {port} within 60 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("could not start moto on a free port");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a bucket (moto accepts unsigned requests for it).
    pub fn create_bucket(&self, bucket: &str) {
        use std::io::Write;
        // A connection moto closes without an answer (it happens right after its start) is
        // tried again; any answer is judged.
        let mut response = String::new();
        for _ in 0..50 {
            let mut tcp = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
            write!(
                tcp,
                "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.port
            )
            .unwrap();
            response.clear();
            let _ = tcp.read_to_string(&mut response);
            if !response.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "create bucket {bucket}: {response}"
        );
    }

    /// Stops moto as a crash would (its in-memory objects are gone).
    pub fn kill(&mut self) {
        self.child.take();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

const VERSITYGW_HINT: &str = "HINT: build it with \"bash scripts/k8s-testenv.sh build\" (go install of github.com/versity/versitygw, cached in /var/tmp/klio-k8s); scripts/test.sh does this before the tests";

/// versitygw, a production S3 gateway, on its posix backend over plain HTTP on a free port:
/// the Tier 2 tests' second S3-compatible server (moto is the first). Buckets are the
/// top-level directories of its root; it accepts the credentials `testing`/`testing` only.
/// Built by `scripts/k8s-testenv.sh build`; killed on drop.
pub struct VersityGw {
    child: Option<ChildGuard>,
    port: u16,
    root: PathBuf,
    log: PathBuf,
}

impl VersityGw {
    /// Starts versitygw with its objects under `dir/root`; `dir/versitygw.log` receives its
    /// output.
    pub fn start(dir: &Path) -> VersityGw {
        let binary = crate::k8s::testenv_bindir().join("versitygw");
        assert!(
            binary.is_file(),
            "versitygw not found at {}\n{VERSITYGW_HINT}",
            binary.display()
        );
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        let log = dir.join("versitygw.log");
        for _ in 0..3 {
            let port = free_port();
            let out = std::fs::File::create(&log).unwrap();
            let mut cmd = Command::new(&binary);
            cmd.args(["--access", "testing", "--secret", "testing", "--quiet"])
                .arg("--port")
                .arg(format!("127.0.0.1:{port}"))
                .arg("posix")
                .arg(&root)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out);
            let mut child = ChildGuard::spawn(&mut cmd)
                .unwrap_or_else(|e| panic!("cannot start versitygw: {e:#}\n{VERSITYGW_HINT}"));
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if child.listens_on(port) && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return VersityGw {
                        child: Some(child),
                        port,
                        root,
                        log,
                    };
                }
                if !child.is_running() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.contains("address already in use") {
                        break;
                    }
                    panic!("versitygw exited at startup:\n{text}");
                }
                assert!(
                    Instant::now() < deadline,
                    "versitygw did not answer on port {port} within 30 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("could not start versitygw on a free port");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a bucket: on the posix backend, a top-level directory of the root.
    pub fn create_bucket(&self, bucket: &str) {
        std::fs::create_dir(self.root.join(bucket)).unwrap();
    }

    /// Where the objects of `bucket` live on disk (object `a/b` is the file `a/b` there).
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.join(bucket)
    }

    /// Stops versitygw as a crash would (its objects stay on disk).
    pub fn kill(&mut self) {
        self.child.take();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

const PROMETHEUS_HINT: &str = "HINT: build it with \"bash scripts/k8s-testenv.sh build\" (go install of github.com/prometheus/prometheus, cached in /var/tmp/klio-k8s); scripts/test.sh does this before the tests";

/// The path of a Go-built test peer (`prometheus`, `promtool`, ...) in the cache, checked.
pub fn go_peer(name: &str) -> PathBuf {
    let binary = crate::k8s::testenv_bindir().join(name);
    assert!(
        binary.is_file(),
        "{name} not found at {}\n{PROMETHEUS_HINT}",
        binary.display()
    );
    binary
}

/// A GET over plain HTTP/1.0 (no chunked answers) to 127.0.0.1:`port`; returns the status
/// code and the body.
pub fn http_get(port: u16, path_and_query: &str) -> std::io::Result<(u16, Vec<u8>)> {
    use std::io::Write;
    let mut tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        tcp,
        "GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response)?;
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of the HTTP head"))?;
    let head = String::from_utf8_lossy(&response[..head_end]).into_owned();
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP status line: {head}")))?;
    Ok((code, response[head_end + 4..].to_vec()))
}

/// Percent-encodes a query parameter value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Prometheus server (built from its Go module) on a free loopback port, with
/// `config` as its configuration and its data under `dir`; killed on drop.
pub struct Prometheus {
    child: Option<ChildGuard>,
    port: u16,
    log: PathBuf,
}

impl Prometheus {
    pub fn start(dir: &Path, config: &str) -> Prometheus {
        let binary = go_peer("prometheus");
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let log = dir.join("prometheus.log");
        for _ in 0..3 {
            let port = free_port();
            let out = std::fs::File::create(&log).unwrap();
            let mut cmd = Command::new(&binary);
            cmd.arg(format!("--config.file={}", config_file.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("tsdb").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out);
            let mut child = ChildGuard::spawn(&mut cmd)
                .unwrap_or_else(|e| panic!("cannot start prometheus: {e:#}\n{PROMETHEUS_HINT}"));
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok((200, _)) = http_get(port, "/-/ready") {
                    return Prometheus {
                        child: Some(child),
                        port,
                        log,
                    };
                }
                if !child.is_running() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.contains("address already in use") {
                        break;
                    }
                    panic!("prometheus exited at startup:\n{text}");
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus was not ready on port {port} within 60 s:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("could not start prometheus on a free port");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `GET /api/v1/<what>`, the `data` member of the answer.
    pub fn api(&self, what: &str) -> Result<serde_json::Value, String> {
        let (code, body) =
            http_get(self.port, &format!("/api/v1/{what}")).map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| format!("{what}: HTTP {code}, not JSON ({e})"))?;
        if v["status"] != "success" {
            return Err(format!("{what}: HTTP {code}: {v}"));
        }
        Ok(v["data"].clone())
    }

    /// An instant PromQL query: each series' labels and value.
    pub fn query(&self, promql: &str) -> Result<Vec<(serde_json::Value, f64)>, String> {
        let data = self.api(&format!("query?query={}", url_encode(promql)))?;
        Ok(data["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let v = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (s["metric"].clone(), v)
            })
            .collect())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        self.child.take();
    }
}
