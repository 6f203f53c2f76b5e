//! Harness of the end-to-end tests: a real `klio server` process with development
//! certificates (WAL service and base-backup service, each on its own free port), and
//! helpers to run the `klio` client subcommands against it.
//!
//! The tests live in this package (not a separate crate) so that cargo builds the `klio`
//! binary they run and hands its path over in `CARGO_BIN_EXE_klio`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use klio_pg::Lsn;
use klio_test_support::{ChildGuard, PgCluster, ScratchDir, free_port, scratch_dir, wait_until};

mod load;
mod restored;
mod tier2;

// Each test file uses some of these helpers only.
#[allow(unused_imports)]
pub use load::*;
#[allow(unused_imports)]
pub use restored::*;
#[allow(unused_imports)]
pub use tier2::*;

pub const KLIO: &str = env!("CARGO_BIN_EXE_klio");

/// Seconds of pgbench load in the long tests (`KLIO_TEST_LOAD_SECS`, default 40).
pub fn load_secs() -> u64 {
    std::env::var("KLIO_TEST_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

pub fn klio() -> Command {
    let mut c = Command::new(KLIO);
    c.env("KLIO_LOG", "info,klio=debug");
    c
}

/// A Klio server with its own certificates, key and data directory.
pub struct Klio {
    pub dir: ScratchDir,
    pub pki: PathBuf,
    pub data: PathBuf,
    pub key_file: PathBuf,
    /// Port of the WAL service (`--wal-listen`).
    pub port: u16,
    /// Port of the base-backup service (`--base-listen`).
    pub base_port: u16,
    server: Option<ChildGuard>,
    starts: u32,
    /// Flags added to every start of the server (Tier 2, queue, mode).
    pub server_extra: Vec<String>,
    /// `--mode read-only`: no data directory.
    pub read_only: bool,
    /// Environment variables of every start of the server.
    pub server_env: Vec<(String, String)>,
}

impl Klio {
    /// Issues certificates for `clusters` and starts the server.
    pub fn start(clusters: &[&str]) -> anyhow::Result<Klio> {
        Klio::start_with(clusters, Vec::new())
    }

    /// [`Klio::start`] with extra server flags.
    pub fn start_with(clusters: &[&str], server_extra: Vec<String>) -> anyhow::Result<Klio> {
        let dir = scratch_dir();
        let pki = dir.path().join("pki");
        let mut cmd = klio();
        cmd.args(["pki", "init"]).arg(&pki);
        for c in clusters {
            cmd.args(["--cluster", c]);
        }
        run_ok(&mut cmd)?;
        // PostgreSQL runs `klio wal-get` as its own OS user: let it read the client keys.
        if klio_test_support::running_as_root() {
            run_ok(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&pki),
            )?;
        }
        let key_file = dir.path().join("encryption.key");
        std::fs::write(&key_file, "test-encryption-key-0123456789\n")?;
        let data = dir.path().join("data");
        let mut k = Klio {
            dir,
            pki,
            data,
            key_file,
            port: free_port(),
            base_port: free_port(),
            server: None,
            starts: 0,
            server_extra,
            read_only: false,
            server_env: Vec::new(),
        };
        k.start_on_free_ports()?;
        Ok(k)
    }

    /// A second server with `other`'s certificates and key file (so clients of `other` reach
    /// it as well), its own ports and directory, started with `server_extra`.
    pub fn start_beside(
        other: &Klio,
        read_only: bool,
        server_extra: Vec<String>,
    ) -> anyhow::Result<Klio> {
        let dir = scratch_dir();
        let data = dir.path().join("data");
        let mut k = Klio {
            dir,
            pki: other.pki.clone(),
            data,
            key_file: other.key_file.clone(),
            port: free_port(),
            base_port: free_port(),
            server: None,
            starts: 0,
            server_extra,
            read_only,
            server_env: Vec::new(),
        };
        k.start_on_free_ports()?;
        Ok(k)
    }

    pub fn server_command(&self) -> Command {
        let mut cmd = klio();
        cmd.arg("server");
        if self.read_only {
            cmd.args(["--mode", "read-only"]);
        } else {
            cmd.arg("--data-dir").arg(&self.data);
        }
        cmd.arg("--encryption-key-file")
            .arg(&self.key_file)
            .arg("--tls-cert")
            .arg(self.pki.join("server.crt"))
            .arg("--tls-key")
            .arg(self.pki.join("server.key"))
            .arg("--client-ca")
            .arg(self.pki.join("ca.crt"))
            .arg("--wal-listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--base-listen")
            .arg(format!("127.0.0.1:{}", self.base_port))
            .args(&self.server_extra)
            // moto's credentials, through the standard AWS variables.
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .envs(self.server_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// A gRPC channel to the server's `port`, presenting certificate `<stem>.crt` of the
    /// PKI directory.
    pub async fn grpc_channel(&self, port: u16, stem: &str) -> tonic::transport::Channel {
        klio_tls::install_crypto_provider();
        let tls = klio_tls::client_tls(
            &self.pki.join("ca.crt"),
            &self.pki.join(format!("{stem}.crt")),
            &self.pki.join(format!("{stem}.key")),
            "localhost",
        )
        .unwrap();
        klio_tls::connect("127.0.0.1", port, tls).await.unwrap()
    }

    /// Whether the server process is still running.
    /// The server process's id, while it runs.
    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(ChildGuard::id)
    }

    pub fn server_running(&mut self) -> bool {
        self.server.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// The first start: when another process took a port [`free_port`] handed out before
    /// the server bound it, the server starts again on other ports (nothing uses its ports
    /// yet).
    fn start_on_free_ports(&mut self) -> anyhow::Result<()> {
        for _ in 0..3 {
            match self.start_server() {
                Err(_) if self.last_start_log().contains("Address already in use") => {
                    self.port = free_port();
                    self.base_port = free_port();
                }
                other => return other,
            }
        }
        self.start_server()
    }

    pub fn start_server(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log = std::fs::File::create(self.start_log_path(self.starts))?;
        let mut cmd = self.server_command();
        cmd.stdout(Stdio::null()).stderr(log);
        let mut child = ChildGuard::spawn(&mut cmd)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for port in [self.port, self.base_port] {
            // Our own server's socket: another test's server may hold a port it was handed.
            while !(child.listens_on(port)
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
            {
                if !child.is_running() {
                    bail!("klio server exited:\n{}", self.server_log());
                }
                if std::time::Instant::now() > deadline {
                    bail!(
                        "klio server does not listen on port {port}:\n{}",
                        self.server_log()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.server = Some(child);
        Ok(())
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill_server(&mut self) -> anyhow::Result<()> {
        if let Some(mut s) = self.server.take() {
            s.kill()?;
        }
        Ok(())
    }

    /// Where the server's `n`th start logs.
    fn start_log_path(&self, n: u32) -> std::path::PathBuf {
        self.dir.path().join(format!("server-{n}.log"))
    }

    /// The log of the latest start of the server.
    fn last_start_log(&self) -> String {
        std::fs::read_to_string(self.start_log_path(self.starts)).unwrap_or_default()
    }

    pub fn server_log(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.starts {
            let p = self.start_log_path(i);
            out.push_str(&format!("--- server start {i} ---\n"));
            out.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        out
    }

    /// Client flags for `cluster` using its own certificate.
    pub fn client_args(&self, cluster: &str) -> Vec<String> {
        self.client_args_with_cert(cluster, &format!("client-{cluster}"))
    }

    /// Client flags naming `cluster` but presenting certificate `<stem>.crt` from the PKI dir.
    pub fn client_args_with_cert(&self, cluster: &str, stem: &str) -> Vec<String> {
        let p = |f: &str| self.pki.join(f).display().to_string();
        vec![
            "--server-address".into(),
            "127.0.0.1".into(),
            "--wal-port".into(),
            self.port.to_string(),
            "--base-port".into(),
            self.base_port.to_string(),
            "--cluster".into(),
            cluster.into(),
            "--client-cert".into(),
            p(&format!("{stem}.crt")),
            "--client-key".into(),
            p(&format!("{stem}.key")),
            "--server-ca".into(),
            p("ca.crt"),
        ]
    }

    /// Starts `klio wal-stream` for `cluster` against `pg`; its log goes to `<name>.log`.
    pub fn spawn_streamer(
        &self,
        cluster: &str,
        pg: &PgCluster,
        name: &str,
        extra: &[&str],
    ) -> anyhow::Result<ChildGuard> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))?;
        let mut cmd = klio();
        cmd.arg("wal-stream")
            .args(self.client_args(cluster))
            .args(["--pg-dsn", &pg.dsn()])
            .args(extra);
        cmd.stdout(Stdio::null()).stderr(log);
        ChildGuard::spawn(&mut cmd)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Runs `klio wal-get` for `cluster`.
    pub fn wal_get(
        &self,
        cluster: &str,
        name: &str,
        dest: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Output> {
        let mut cmd = klio();
        cmd.arg("wal-get")
            .args(self.client_args(cluster))
            .args(extra)
            .arg(name)
            .arg(dest);
        cmd.output().context("run klio wal-get")
    }

    /// `klio wal-list --json` for `cluster`.
    pub fn wal_list(&self, cluster: &str) -> anyhow::Result<serde_json::Value> {
        let mut cmd = klio();
        cmd.arg("wal-list")
            .args(self.client_args(cluster))
            .arg("--json");
        let out = run_ok(&mut cmd)?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The names of the files archived for `cluster`.
    pub fn archived_files(&self, cluster: &str) -> anyhow::Result<Vec<String>> {
        let v = self.wal_list(cluster)?;
        let files = v["files"]
            .as_array()
            .context("wal-list has no files array")?;
        Ok(files
            .iter()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect())
    }

    /// The archive's end on its latest timeline, if it has WAL.
    pub fn archived_end(&self, cluster: &str) -> anyhow::Result<Option<(u32, Lsn)>> {
        let v = self.wal_list(cluster)?;
        match (v["timeline"].as_u64(), v["end_lsn"].as_str()) {
            (Some(t), Some(l)) => Ok(Some((t as u32, l.parse()?))),
            _ => Ok(None),
        }
    }

    /// Waits until the archive of `cluster` reaches `lsn` on timeline `tli` or later.
    pub fn wait_archived(
        &self,
        cluster: &str,
        tli: u32,
        lsn: Lsn,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let what = format!("the archive of \"{cluster}\" to reach {lsn} on timeline {tli}");
        wait_until(timeout, Duration::from_millis(200), &what, || {
            Ok(
                matches!(self.archived_end(cluster)?, Some((t, l)) if t > tli || (t == tli && l >= lsn)),
            )
        })
    }

    /// `klio <subcommand...>` with the client flags of `cluster` (its own certificate).
    pub fn client_command(&self, subcommand: &[&str], cluster: &str) -> Command {
        self.client_command_with_cert(subcommand, cluster, &format!("client-{cluster}"))
    }

    /// [`Klio::client_command`] presenting certificate `<stem>.crt` instead.
    pub fn client_command_with_cert(
        &self,
        subcommand: &[&str],
        cluster: &str,
        stem: &str,
    ) -> Command {
        let mut cmd = klio();
        cmd.args(subcommand)
            .args(self.client_args_with_cert(cluster, stem));
        cmd
    }

    /// `klio backup --json` of `pg` (reading its data directory) for `cluster`, plus `extra`;
    /// not run yet, so that a test can run it as a child and kill it.
    pub fn backup_command(&self, cluster: &str, pg: &PgCluster, extra: &[&str]) -> Command {
        let mut cmd = self.client_command(&["backup"], cluster);
        cmd.args(["--pg-dsn", &pg.dsn()])
            .arg("--pgdata")
            .arg(pg.data_dir())
            .arg("--json")
            .args(extra);
        cmd
    }

    /// Takes a base backup of `pg` for `cluster` and returns the object `--json` printed.
    pub fn backup(
        &self,
        cluster: &str,
        pg: &PgCluster,
        extra: &[&str],
    ) -> anyhow::Result<serde_json::Value> {
        let out = run_ok(&mut self.backup_command(cluster, pg, extra))?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "parse the JSON of klio backup:\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `klio backups list --json`: the complete backups of `cluster`, oldest first.
    pub fn backups_list(&self, cluster: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut cmd = self.client_command(&["backups", "list"], cluster);
        cmd.arg("--json");
        let out = run_ok(&mut cmd)?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "parse the JSON of klio backups list:\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        match v {
            serde_json::Value::Array(a) => Ok(a),
            other => bail!("klio backups list --json printed no array: {other}"),
        }
    }

    /// `klio backups show --json` of backup `id` of `cluster`.
    pub fn backups_show(&self, cluster: &str, id: &str) -> anyhow::Result<serde_json::Value> {
        let mut cmd = self.client_command(&["backups", "show"], cluster);
        cmd.arg(id).arg("--json");
        let out = run_ok(&mut cmd)?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "parse the JSON of klio backups show:\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs `klio verify` for `cluster` plus `extra`; the caller judges the exit status.
    pub fn verify(&self, cluster: &str, extra: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = self.client_command(&["verify"], cluster);
        cmd.args(extra);
        cmd.output().context("run klio verify")
    }

    /// Runs `klio restore --pgdata <pgdata>` for `cluster` plus `extra` (backup id, recovery
    /// target, tablespace map, `--delta`); the caller judges the exit status.
    pub fn restore(&self, cluster: &str, pgdata: &Path, extra: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = self.client_command(&["restore"], cluster);
        cmd.arg("--pgdata").arg(pgdata).args(extra);
        cmd.output().context("run klio restore")
    }

    /// The `restore_command` PostgreSQL should use for `cluster`.
    pub fn restore_command(&self, cluster: &str, extra: &str) -> String {
        let args: Vec<String> = self
            .client_args(cluster)
            .iter()
            .map(|a| format!("'{a}'"))
            .collect();
        format!("{KLIO} wal-get {} {extra} %f %p", args.join(" ")).replace('\'', "\"")
    }
}

/// `e` with the tails of the streamer's and the server's logs, to see why a backup failed.
pub fn with_logs(e: anyhow::Error, k: &Klio, streamer: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{e:#}\n--- streamer log ---\n{}\n--- server log ---\n{}",
        tail(&k.log(streamer), 40),
        tail(&k.server_log(), 80)
    )
}

/// The last `n` lines of `text`, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn run_ok(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Standard output then standard error of a finished command, for assertions on what it
/// said.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The current WAL insert position and timeline of `pg`.
pub fn current_lsn(pg: &PgCluster) -> anyhow::Result<(u32, Lsn)> {
    let out = pg.psql("SELECT pg_walfile_name(l), l FROM (SELECT pg_current_wal_lsn() AS l) s")?;
    let (f, l) = out.split_once('|').context("parse position")?;
    Ok((u32::from_str_radix(&f[..8], 16)?, l.parse()?))
}

/// The name of the WAL segment `pg` is writing.
pub fn walfile_now(pg: &PgCluster) -> anyhow::Result<String> {
    pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
}

/// Switches to a new segment and returns the position after the switch.
pub fn switch_wal(pg: &PgCluster) -> anyhow::Result<Lsn> {
    pg.psql("SELECT pg_switch_wal()")?;
    Ok(pg.psql("SELECT pg_current_wal_lsn()")?.parse()?)
}

/// Waits until `cluster`'s archive has WAL (the archive starts where streaming starts),
/// then takes a plain base backup of `pg` without WAL into a new scratch directory.
/// Returns the scratch directory (keep it alive) and the backup's data directory.
pub fn base_backup_once_archiving(
    k: &Klio,
    cluster: &str,
    pg: &PgCluster,
) -> anyhow::Result<(ScratchDir, PathBuf)> {
    k.wait_archived(cluster, 1, Lsn(1), Duration::from_secs(60))?;
    let base = scratch_dir();
    let dir = base.subdir("pgdata")?;
    std::fs::remove_dir(&dir)?;
    pg.basebackup(&dir, &["-X", "none"])?;
    Ok((base, dir))
}

/// Prepares a restored data directory for archive recovery with `klio wal-get`.
pub fn configure_recovery(
    data_dir: &Path,
    restore_command: &str,
    extra: &[&str],
) -> anyhow::Result<()> {
    let mut conf = format!("\nrestore_command = '{restore_command}'\n");
    for l in extra {
        conf.push_str(l);
        conf.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(data_dir.join("postgresql.auto.conf"))?;
    std::io::Write::write_all(&mut f, conf.as_bytes())?;
    std::fs::write(data_dir.join("recovery.signal"), "")?;
    let _ = std::fs::remove_file(data_dir.join("standby.signal"));
    Ok(())
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what`.
pub fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if std::time::Instant::now() > deadline {
            bail!("{what}: not within {timeout:?} (last error: {last})");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
