//! Real PostgreSQL clusters for tests: primaries, hot standbys and clusters started on restored
//! data directories.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::major::PgMajor;
use crate::process::{chown_to_postgres, chown_tree_to_postgres, postgres_command, run};
use crate::scratch::ScratchDir;
use crate::wait::wait_until;

/// How clients authenticate, for every line of the generated `pg_hba.conf` (local socket and
/// 127.0.0.1/32, normal and `replication` connections). The password belongs to the
/// `postgres` superuser.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// `trust`: no password.
    Trust,
    /// `scram-sha-256`, with the password stored as a SCRAM secret.
    Scram { password: String },
    /// `md5`, with the password stored as an MD5 hash (so the server really asks for MD5).
    Md5 { password: String },
    /// `password`: the password is sent in clear text.
    Password { password: String },
}

impl Auth {
    /// `Auth::Scram` with `password`.
    pub fn scram(password: &str) -> Auth {
        Auth::Scram {
            password: password.to_string(),
        }
    }

    pub fn password(&self) -> Option<&str> {
        match self {
            Auth::Trust => None,
            Auth::Scram { password } | Auth::Md5 { password } | Auth::Password { password } => {
                Some(password)
            }
        }
    }

    /// The `pg_hba.conf` method name.
    pub fn hba_method(&self) -> &'static str {
        match self {
            Auth::Trust => "trust",
            Auth::Scram { .. } => "scram-sha-256",
            Auth::Md5 { .. } => "md5",
            Auth::Password { .. } => "password",
        }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Trust => f.write_str("Trust"),
            other => write!(f, "{}(password redacted)", other.hba_method()),
        }
    }
}

/// Options for starting a [`PgCluster`].
#[derive(Clone, Debug)]
pub struct PgOptions {
    pub auth: Auth,
    /// Extra `postgresql.conf` lines, applied after (so overriding) the test defaults.
    pub extra_conf: Vec<String>,
    /// Extra `initdb` arguments, such as `--wal-segsize=1`.
    pub initdb_args: Vec<String>,
    /// How long `pg_ctl start -w` may wait (archive recovery of a restored cluster can be slow).
    pub start_timeout: Duration,
    /// The PostgreSQL major to run. `None`: 15 for [`PgCluster::start`], the primary's for
    /// [`PgCluster::standby_of`], the one `PG_VERSION` names for [`PgCluster::from_data_dir`]
    /// (where `Some` must agree with `PG_VERSION`).
    pub major: Option<PgMajor>,
    /// The network namespace the server runs in ([`PgOptions::in_netns`]); `None`: the
    /// host's.
    pub netns: Option<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            auth: Auth::Trust,
            extra_conf: Vec::new(),
            initdb_args: Vec::new(),
            start_timeout: Duration::from_secs(120),
            major: None,
            netns: None,
        }
    }
}

impl PgOptions {
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    pub fn with_conf(mut self, line: impl Into<String>) -> Self {
        self.extra_conf.push(line.into());
        self
    }

    /// Runs the server inside `ns` (its `restore_command` too): reach it through its unix
    /// socket ([`PgCluster::socket_dsn`], [`PgCluster::psql`]); its TCP port is the
    /// namespace's.
    pub fn in_netns(mut self, ns: &crate::NetNs) -> Self {
        self.netns = Some(ns.name().to_string());
        self
    }

    /// Runs PostgreSQL `major` (see [`PgOptions::major`]).
    pub fn with_major(mut self, major: PgMajor) -> Self {
        self.major = Some(major);
        self
    }
}

/// A free TCP port on 127.0.0.1: a random one below the kernel's ephemeral range (ports in
/// that range are handed to outgoing connections, which could take one before the server
/// binds it) that can be bound now. Another process may still take it before the server binds
/// it; [`PgCluster`] retries with another port when that happens.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    const LOW: u16 = 20000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&p| p > LOW + 1000)
        .unwrap_or(32768);
    for _ in 0..1000 {
        // RandomState is seeded randomly per instance.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = LOW + (h.finish() % u64::from(ephemeral_low - LOW)) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    match TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()) {
        Ok(addr) => addr.port(),
        Err(e) => panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"),
    }
}

/// The file (in the data directory) holding the settings this crate manages, included from the
/// end of `postgresql.conf`.
const TEST_CONF: &str = "klio_test.conf";
const INCLUDE_LINE: &str = "include 'klio_test.conf'";
const START_ATTEMPTS: u32 = 5;

/// Quotes a libpq key=value connection string value.
fn quote_dsn_value(value: &str) -> String {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| !c.is_whitespace() && c != '\'' && c != '\\')
    {
        return value.to_string();
    }
    let mut out = String::from("'");
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Quotes an SQL string literal.
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Writes `contents` to `path` and gives it to the `postgres` user.
fn write_for_postgres(path: &Path, contents: &str) -> anyhow::Result<()> {
    fs::write(path, contents).with_context(|| format!("write \"{}\"", path.display()))?;
    chown_to_postgres(path)
}

fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
    let existed = path.exists();
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open \"{}\"", path.display()))?;
    writeln!(file, "{line}").with_context(|| format!("append to \"{}\"", path.display()))?;
    if !existed {
        chown_to_postgres(path)?;
    }
    Ok(())
}

/// Gives the directories the `pg_tblspc/<oid>` links of `data_dir` point to, with everything
/// in them, to the `postgres` user when running as root (the recursive chown of the data
/// directory does not follow links). In-place tablespaces (plain directories) are already
/// part of the data directory.
fn chown_tablespaces_to_postgres(data_dir: &Path) -> anyhow::Result<()> {
    let dir = data_dir.join("pg_tblspc");
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("list \"{}\"", dir.display())),
    };
    for entry in entries {
        let link = entry
            .with_context(|| format!("list \"{}\"", dir.display()))?
            .path();
        let meta =
            fs::symlink_metadata(&link).with_context(|| format!("stat \"{}\"", link.display()))?;
        if !meta.file_type().is_symlink() {
            continue;
        }
        let target =
            fs::read_link(&link).with_context(|| format!("read link \"{}\"", link.display()))?;
        chown_tree_to_postgres(&dir.join(target))?;
    }
    Ok(())
}

/// Whether process `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
        {
            Some(state) => state != "Z" && state != "X",
            None => false,
        },
        Err(_) => false,
    }
}

/// The pids of the direct children of `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    children
}

/// A running (or stopped) PostgreSQL cluster in its own scratch directory, on its own port and
/// socket directory. Dropping it stops the server (`pg_ctl stop -m immediate`) and removes the
/// directories it owns. When a test panics, the tail of the server log is printed.
#[derive(Debug)]
pub struct PgCluster {
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    auth: Auth,
    /// Whose `initdb`, `pg_ctl` and `postgres` run it.
    major: PgMajor,
    extra_conf: Vec<String>,
    start_timeout: Duration,
    netns: Option<String>,
    running: bool,
    /// Socket directory, log file and (for [`PgCluster::start`] and
    /// [`PgCluster::standby_of`]) the data directory.
    scratch: ScratchDir,
    /// A data directory handed over with [`PgCluster::from_data_dir`].
    _data_owner: Option<ScratchDir>,
}

impl PgCluster {
    fn new_in(
        scratch: ScratchDir,
        data_dir: PathBuf,
        data_owner: Option<ScratchDir>,
        auth: Auth,
        major: PgMajor,
        opts: &PgOptions,
    ) -> anyhow::Result<PgCluster> {
        // Fails, naming the installer, when this major's server is not installed.
        major.server_bin("postgres")?;
        major.server_bin("pg_ctl")?;
        let socket_dir = scratch.subdir("sock")?;
        let log_file = scratch.path().join("postgres.log");
        Ok(PgCluster {
            data_dir,
            socket_dir,
            log_file,
            port: 0,
            auth,
            major,
            extra_conf: opts.extra_conf.clone(),
            start_timeout: opts.start_timeout,
            netns: opts.netns.clone(),
            running: false,
            scratch,
            _data_owner: data_owner,
        })
    }

    /// Creates a new cluster (`initdb -k -U postgres`, C locale, UTF8) with the test settings
    /// and `pg_hba.conf` for `opts.auth`, and starts it; PostgreSQL 15 unless `opts.major`
    /// says otherwise.
    pub fn start(opts: PgOptions) -> anyhow::Result<PgCluster> {
        let major = opts.major.unwrap_or(PgMajor::V15);
        let scratch = ScratchDir::new()?;
        let data_dir = scratch.path().join("data");
        let mut cluster =
            PgCluster::new_in(scratch, data_dir, None, opts.auth.clone(), major, &opts)?;

        let mut cmd = postgres_command(major.server_bin("initdb")?);
        cmd.arg("-D").arg(&cluster.data_dir);
        cmd.args([
            "-U",
            "postgres",
            "-k",
            "-E",
            "UTF8",
            "--locale=C",
            "-A",
            "trust",
        ]);
        cmd.args(["--no-sync", "--no-instructions"]);
        let pwfile = cluster.scratch.path().join("pwfile");
        if let Some(password) = opts.auth.password() {
            write_for_postgres(&pwfile, &format!("{password}\n"))?;
            cmd.arg(format!("--pwfile={}", pwfile.display()));
        }
        cmd.args(&opts.initdb_args);
        let result = run(cmd, "initdb", None);
        let _ = fs::remove_file(&pwfile);
        result?;

        cluster.write_hba()?;
        cluster.launch()?;
        if let Auth::Md5 { password } = &opts.auth {
            cluster.psql(&format!(
                "SET password_encryption = 'md5'; ALTER ROLE postgres PASSWORD {};",
                quote_literal(password)
            ))?;
        }
        Ok(cluster)
    }

    /// Creates a hot standby of `primary` (`pg_basebackup -R -X stream -c fast`) and starts it.
    /// It streams from the primary without a slot and keeps the primary's authentication; `opts`
    /// contributes its `extra_conf` and `start_timeout`. It runs the primary's major, which
    /// needs a `pg_basebackup` of that major (the npm builds of 16 and later have none).
    pub fn standby_of(primary: &PgCluster, opts: PgOptions) -> anyhow::Result<PgCluster> {
        let major = primary.major;
        if let Some(asked) = opts.major.filter(|&m| m != major) {
            bail!("a standby of a {major} primary cannot run {asked}");
        }
        let mut cmd = primary.pg_basebackup_command()?;
        let scratch = ScratchDir::new()?;
        let data_dir = scratch.path().join("data");
        let mut cluster =
            PgCluster::new_in(scratch, data_dir, None, primary.auth.clone(), major, &opts)?;
        cmd.arg("-D").arg(&cluster.data_dir);
        cmd.args([
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "-N",
            "-d",
            &primary.dsn(),
        ]);
        run(cmd, "pg_basebackup for a standby", None)?;
        cluster.launch()?;
        Ok(cluster)
    }

    /// Starts a cluster on an existing data directory made by something else (a restored base
    /// backup, with `recovery.signal` and `restore_command` in `opts.extra_conf` as needed), on
    /// a fresh port and socket directory. The cluster owns `data` and removes it on drop.
    ///
    /// When running as root, everything in the directory, and in the tablespace directories
    /// its `pg_tblspc` links point to, is given to `postgres` first (a restore run as root
    /// writes files owned by root). A leftover `postmaster.pid` is removed, and `pg_hba.conf`
    /// is written for `opts.auth` if the directory has none. `opts.auth` must match the roles
    /// in the data directory.
    pub fn from_data_dir(data: ScratchDir, opts: PgOptions) -> anyhow::Result<PgCluster> {
        let data_dir = data.path().to_path_buf();
        PgCluster::adopt(data_dir, Some(data), opts)
    }

    /// [`PgCluster::from_data_dir`] for a directory the caller keeps alive (and removes).
    pub fn from_data_path(data_dir: &Path, opts: PgOptions) -> anyhow::Result<PgCluster> {
        PgCluster::adopt(data_dir.to_path_buf(), None, opts)
    }

    fn adopt(
        data_dir: PathBuf,
        owner: Option<ScratchDir>,
        opts: PgOptions,
    ) -> anyhow::Result<PgCluster> {
        let major = PgMajor::of_data_dir(&data_dir)?;
        if let Some(asked) = opts.major.filter(|&m| m != major) {
            bail!(
                "\"{}\" holds a {major} data directory, not {asked}",
                data_dir.display()
            );
        }
        let scratch = ScratchDir::new()?;
        let mut cluster =
            PgCluster::new_in(scratch, data_dir, owner, opts.auth.clone(), major, &opts)?;
        let data_dir = &cluster.data_dir;
        chown_tree_to_postgres(data_dir)?;
        chown_tablespaces_to_postgres(data_dir)?;
        fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod \"{}\"", data_dir.display()))?;
        let pid_file = data_dir.join("postmaster.pid");
        if pid_file.exists() {
            fs::remove_file(&pid_file)
                .with_context(|| format!("remove \"{}\"", pid_file.display()))?;
        }
        if !data_dir.join("pg_hba.conf").exists() {
            cluster.write_hba()?;
        }
        cluster.launch()?;
        Ok(cluster)
    }

    fn write_hba(&self) -> anyhow::Result<()> {
        let method = self.auth.hba_method();
        let mut hba = String::from("# written by klio-test-support\n");
        for (kind, db, addr) in [
            ("local", "all", ""),
            ("host", "all", "127.0.0.1/32"),
            ("local", "replication", ""),
            ("host", "replication", "127.0.0.1/32"),
        ] {
            let _ = writeln!(hba, "{kind:<7} {db:<12} all {addr:<14} {method}");
        }
        write_for_postgres(&self.data_dir.join("pg_hba.conf"), &hba)
    }

    /// Writes `klio_test.conf` for the current port and makes sure `postgresql.conf` includes it.
    fn write_test_conf(&self) -> anyhow::Result<()> {
        let conf = self.data_dir.join("postgresql.conf");
        let current = match fs::read_to_string(&conf) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("read \"{}\"", conf.display())),
        };
        if !current.lines().any(|l| l.trim() == INCLUDE_LINE) {
            append_line(
                &conf,
                &format!("\n# added by klio-test-support\n{INCLUDE_LINE}"),
            )?;
        }
        let mut text = String::from("# managed by klio-test-support; rewritten on every start\n");
        for line in [
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("port = {}", self.port),
            format!(
                "unix_socket_directories = {}",
                quote_literal(&self.socket_dir.to_string_lossy())
            ),
            "wal_level = replica".into(),
            "max_wal_senders = 10".into(),
            "max_replication_slots = 10".into(),
            "fsync = on".into(),
            "wal_keep_size = '2GB'".into(),
            "shared_buffers = '128MB'".into(),
            "logging_collector = off".into(),
            "log_line_prefix = '%m [%p] %q%a '".into(),
            "password_encryption = 'scram-sha-256'".into(),
        ] {
            let _ = writeln!(text, "{line}");
        }
        for line in &self.extra_conf {
            let _ = writeln!(text, "{line}");
        }
        write_for_postgres(&self.data_dir.join(TEST_CONF), &text)
    }

    /// First start: picks a port, retrying with another one when PostgreSQL could not bind it.
    fn launch(&mut self) -> anyhow::Result<()> {
        let mut attempt = 1;
        loop {
            self.port = free_port();
            self.write_test_conf()?;
            let log_offset = self.log_len();
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(e)
                    if attempt < START_ATTEMPTS
                        && self.log_since(log_offset).contains("already in use") =>
                {
                    eprintln!(
                        "port {} was taken, retrying with another port: {e:#}",
                        self.port
                    );
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn log_len(&self) -> u64 {
        fs::metadata(&self.log_file).map(|m| m.len()).unwrap_or(0)
    }

    fn log_since(&self, offset: u64) -> String {
        let log = fs::read(&self.log_file).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(0).min(log.len());
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    /// `pg_ctl` of the cluster's major (checked to exist when the cluster was made); it runs
    /// the `postgres` beside it.
    fn pg_ctl(&self, action: &str) -> Command {
        let program = self.major.bin_dir().join("pg_ctl");
        // The postmaster inherits the namespace of the pg_ctl that starts it.
        let mut cmd = match &self.netns {
            Some(ns) if matches!(action, "start" | "restart") => {
                crate::netns::postgres_command_in(ns, program)
            }
            _ => postgres_command(program),
        };
        cmd.arg(action).arg("-D").arg(&self.data_dir);
        cmd
    }

    fn pg_ctl_start(&mut self) -> anyhow::Result<()> {
        let log_offset = self.log_len();
        let mut cmd = self.pg_ctl("start");
        cmd.args(["-w", "-t", &self.start_timeout.as_secs().max(1).to_string()]);
        cmd.arg("-l").arg(&self.log_file);
        match run(cmd, "pg_ctl start", None) {
            Ok(_) => {
                self.running = true;
                Ok(())
            }
            Err(e) => {
                // A server that did not become ready in time is still running: stop it.
                let mut stop = self.pg_ctl("stop");
                stop.args(["-m", "immediate", "-w"]);
                let _ = run(stop, "pg_ctl stop", None);
                Err(e.context(format!(
                    "start PostgreSQL in \"{}\" on port {}; server log:\n{}",
                    self.data_dir.display(),
                    self.port,
                    self.log_since(log_offset)
                )))
            }
        }
    }

    /// Starts the server again after [`PgCluster::stop`] or [`PgCluster::kill9`], on the same
    /// port (crash recovery runs after `kill9`).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.running {
            bail!("the cluster on port {} is already running", self.port);
        }
        self.pg_ctl_start()
    }

    /// Stops the server with `pg_ctl stop -m fast`.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.pg_ctl("stop");
        cmd.args(["-m", "fast", "-w", "-t", "120"]);
        run(cmd, "pg_ctl stop", None)?;
        self.running = false;
        Ok(())
    }

    /// [`PgCluster::stop`] then [`PgCluster::start_again`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// The postmaster's pid, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let path = self.data_dir.join("postmaster.pid");
        let text =
            fs::read_to_string(&path).with_context(|| format!("read \"{}\"", path.display()))?;
        let first = text.lines().next().unwrap_or("").trim();
        first
            .parse()
            .with_context(|| format!("parse pid \"{first}\" in \"{}\"", path.display()))
    }

    /// Simulates a crash of the whole instance: SIGKILL to the postmaster and all its children
    /// (as when a container is OOM-killed), waits for them to be gone, and removes the stale
    /// lock files so that [`PgCluster::start_again`] works (and runs crash recovery).
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        let pid = self.postmaster_pid()?;
        let children = children_of(pid);
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .context("run kill")?;
        if !status.success() {
            bail!("kill -KILL {pid} failed ({status})");
        }
        for child in &children {
            let _ = Command::new("kill")
                .args(["-KILL", &child.to_string()])
                .status();
        }
        let mut pids = children;
        pids.push(pid);
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(20),
            "killed postgres processes to exit",
            || Ok(!pids.iter().any(|&p| process_alive(p))),
        )?;
        self.running = false;
        let _ = fs::remove_file(self.data_dir.join("postmaster.pid"));
        let _ = fs::remove_file(self.socket_dir.join(format!(".s.PGSQL.{}.lock", self.port)));
        let _ = fs::remove_file(self.socket_dir.join(format!(".s.PGSQL.{}", self.port)));
        Ok(())
    }

    /// Promotes a standby (`pg_ctl promote -w`).
    pub fn promote(&self) -> anyhow::Result<()> {
        let mut cmd = self.pg_ctl("promote");
        cmd.args(["-w", "-t", "120"]);
        run(cmd, "pg_ctl promote", None)?;
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    pub fn is_in_recovery(&self) -> anyhow::Result<bool> {
        Ok(self.psql("SELECT pg_is_in_recovery()")? == "t")
    }

    /// Polls until `pg_is_in_recovery()` is false (recovery ended, for example after reaching a
    /// recovery target with `recovery_target_action = promote`, or after [`PgCluster::promote`]).
    pub fn wait_for_recovery_end(&self, timeout: Duration) -> anyhow::Result<()> {
        let what = format!("recovery to end on port {}", self.port);
        wait_until(timeout, Duration::from_millis(100), &what, || {
            Ok(!self.is_in_recovery()?)
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PostgreSQL major the cluster runs.
    pub fn major(&self) -> PgMajor {
        self.major
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `pg_wal` of the data directory.
    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir.join("pg_wal")
    }

    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The server log so far (written by `pg_ctl -l`).
    pub fn log_contents(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_file).unwrap_or_default()).into_owned()
    }

    fn dsn_with_host(&self, host: &str, dbname: &str) -> String {
        let mut dsn = format!(
            "host={} port={} user=postgres dbname={}",
            quote_dsn_value(host),
            self.port,
            quote_dsn_value(dbname)
        );
        if let Some(password) = self.auth.password() {
            let _ = write!(dsn, " password={}", quote_dsn_value(password));
        }
        dsn
    }

    /// `host=127.0.0.1 port=N user=postgres dbname=postgres` (plus `password=...`).
    pub fn dsn(&self) -> String {
        self.dsn_with_host("127.0.0.1", "postgres")
    }

    /// [`PgCluster::dsn`] for database `dbname`.
    pub fn dsn_for_db(&self, dbname: &str) -> String {
        self.dsn_with_host("127.0.0.1", dbname)
    }

    /// Like [`PgCluster::dsn`] but through the Unix socket (`host=<socket dir>`).
    pub fn socket_dsn(&self) -> String {
        self.dsn_with_host(&self.socket_dir.to_string_lossy(), "postgres")
    }

    /// A command for a client binary (`psql`, `pgbench`, ...) run as `postgres`, with
    /// `PGPASSWORD` set when the cluster uses a password. The binary is the cluster's major's
    /// when its directory has one, else PostgreSQL 15's (see [`PgMajor::has_own`]).
    pub fn client_command(&self, program: &str) -> Command {
        let mut cmd = if self.major.has_own(program) {
            postgres_command(self.major.bin_dir().join(program))
        } else {
            postgres_command(program)
        };
        if let Some(password) = self.auth.password() {
            cmd.env("PGPASSWORD", password);
        }
        cmd
    }

    /// Runs `sql` (any number of statements) with `psql -X -At -q -v ON_ERROR_STOP=1` in
    /// database `postgres` and returns the trimmed output.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        self.psql_db("postgres", sql)
    }

    /// [`PgCluster::psql`] in database `dbname`.
    pub fn psql_db(&self, dbname: &str, sql: &str) -> anyhow::Result<String> {
        let mut cmd = self.client_command("psql");
        cmd.args(["-X", "-At", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-", "-d"]);
        cmd.arg(self.dsn_with_host(&self.socket_dir.to_string_lossy(), dbname));
        let what = format!("psql on port {} running {sql:?}", self.port);
        let output = run(cmd, &what, Some(sql))?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// A `tokio_postgres` client over TCP; the connection task is spawned on the current runtime.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.dsn(), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connect to PostgreSQL on port {}", self.port))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("tokio_postgres connection error: {e}");
            }
        });
        Ok(client)
    }

    /// Re-reads the configuration (`pg_ctl reload`).
    pub fn reload(&self) -> anyhow::Result<()> {
        run(self.pg_ctl("reload"), "pg_ctl reload", None)?;
        Ok(())
    }

    /// Appends `line` to `postgresql.conf` (after the test defaults, so it overrides them);
    /// takes effect on [`PgCluster::reload`] or restart.
    pub fn append_conf(&self, line: &str) -> anyhow::Result<()> {
        append_line(&self.data_dir.join("postgresql.conf"), line)
    }

    /// `pgbench -i -s scale -q`.
    pub fn pgbench_init(&self, scale: u32) -> anyhow::Result<String> {
        self.pgbench(&["-i", "-q", "-s", &scale.to_string()])
    }

    /// Runs `pgbench` with `args` against database `postgres` and returns its standard output.
    pub fn pgbench(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.client_command("pgbench");
        cmd.arg("-h").arg(&self.socket_dir);
        cmd.args(["-p", &self.port.to_string(), "-U", "postgres"]);
        cmd.args(args).arg("postgres");
        let output = run(
            cmd,
            &format!("pgbench {args:?} on port {}", self.port),
            None,
        )?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A plain-format base backup into `dest` (which must be empty or absent, and writable by
    /// `postgres`, like a [`ScratchDir`]): `pg_basebackup -Fp -c fast -N` plus `extra_args`
    /// (for example `["-X", "none"]`; pg_basebackup's default is `-X stream`).
    pub fn basebackup(&self, dest: impl AsRef<Path>, extra_args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = self.pg_basebackup_command()?;
        cmd.arg("-D").arg(dest.as_ref());
        cmd.args(["-Fp", "-c", "fast", "-N", "-d", &self.dsn()]);
        cmd.args(extra_args);
        run(cmd, &format!("pg_basebackup from port {}", self.port), None)?;
        Ok(())
    }

    /// `pg_basebackup` for this cluster: PostgreSQL 15's streams from 15 only ("incompatible
    /// server version" from newer servers), so a newer major needs its own.
    fn pg_basebackup_command(&self) -> anyhow::Result<Command> {
        if self.major != PgMajor::V15 && !self.major.has_own("pg_basebackup") {
            bail!(
                "pg_basebackup of {} is needed to copy this cluster and \"{}\" has none \
                 (PostgreSQL 15's refuses newer servers)\n\
                 hint: take the copy with klio backup and restore, or set KLIO_PG_{}_BIN to a full installation",
                self.major,
                self.major.bin_dir().display(),
                self.major.number()
            );
        }
        Ok(self.client_command("pg_basebackup"))
    }

    /// For every user table in `dbname` (schemas other than `pg_catalog` and
    /// `information_schema`), the md5 of its rows as text in sorted order, keyed by
    /// `schema.table`. Two clusters with the same data give equal maps.
    pub fn table_checksums(&self, dbname: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let list = self.psql_db(
            dbname,
            "SELECT format('%I.%I', schemaname, tablename) || chr(31) || schemaname || '.' || tablename \
             FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
        )?;
        let tables: Vec<(&str, &str)> = list
            .lines()
            .filter_map(|l| l.split_once('\u{1f}'))
            .collect();
        let mut sums = BTreeMap::new();
        if tables.is_empty() {
            return Ok(sums);
        }
        let mut sql = String::new();
        for (quoted, _) in &tables {
            let _ = writeln!(
                sql,
                "SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM {quoted} t;"
            );
        }
        let out = self.psql_db(dbname, &sql)?;
        let lines: Vec<&str> = out.lines().collect();
        if lines.len() != tables.len() {
            bail!(
                "expected {} checksums from psql, got {}:\n{out}",
                tables.len(),
                lines.len()
            );
        }
        for ((_, key), sum) in tables.iter().zip(lines) {
            sums.insert(key.to_string(), sum.to_string());
        }
        Ok(sums)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_contents();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- last lines of the PostgreSQL log on port {} ---",
                self.port
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        if self.running || self.data_dir.join("postmaster.pid").exists() {
            let mut cmd = self.pg_ctl("stop");
            cmd.args(["-m", "immediate", "-w", "-t", "60"]);
            let _ = run(cmd, "pg_ctl stop", None);
        }
    }
}
