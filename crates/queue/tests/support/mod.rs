//! Fixtures: a real nats-server per test, queues of both backends, and small helpers.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use klio_queue::{Delivery, EmbeddedQueue, NatsQueue, RetryPolicy, Task, WorkQueue};
use klio_test_support::{ChildGuard, free_port};

/// The attempt limit the behaviour suite runs with.
pub const MAX_ATTEMPTS: u32 = 3;

pub fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: MAX_ATTEMPTS,
        base: Duration::from_millis(50),
        max: Duration::from_millis(200),
    }
}

pub fn task(id: &str, cluster: &str) -> Task {
    Task::new(
        id,
        klio_queue::kinds::WAL_RELAY,
        cluster,
        serde_json::json!({ "segment": id }),
    )
}

/// A queue of one backend plus whatever must live as long as it.
pub struct Fixture {
    pub queue: Arc<dyn WorkQueue>,
    _dir: tempfile::TempDir,
    _server: Option<NatsServer>,
}

pub fn embedded() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let queue = EmbeddedQueue::open(dir.path(), &policy()).unwrap();
    Fixture {
        queue: Arc::new(queue),
        _dir: dir,
        _server: None,
    }
}

pub async fn nats() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(&dir.path().join("jetstream"));
    let queue = NatsQueue::connect(&server.url(), &policy()).await.unwrap();
    Fixture {
        queue: Arc::new(queue),
        _dir: dir,
        _server: Some(server),
    }
}

/// Fetches until a delivery arrives or `timeout` passes.
pub async fn fetch_one(
    queue: &dyn WorkQueue,
    lease: Duration,
    timeout: Duration,
) -> Option<Delivery> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut got = queue.fetch(1, lease).await.unwrap();
        if let Some(delivery) = got.pop() {
            assert!(got.is_empty());
            return Some(delivery);
        }
        if Instant::now() >= deadline {
            return None;
        }
    }
}

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
}

impl NatsServer {
    /// Starts a server storing JetStream data in `store`, on a free port.
    pub fn start(store: &Path) -> NatsServer {
        std::fs::create_dir_all(store).unwrap();
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = NatsServer {
                child: None,
                port: free_port(),
                store: store.to_path_buf(),
                log: store.with_extension("log"),
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
