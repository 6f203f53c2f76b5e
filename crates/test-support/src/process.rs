//! Running PostgreSQL binaries: where they are, which OS user runs them, and supervising
//! long-running children.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// The directory of the PostgreSQL binaries unless `KLIO_PG_BIN` says otherwise.
pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The path of the PostgreSQL binary `name` (`initdb`, `pg_ctl`, ...), in `$KLIO_PG_BIN` or
/// [`DEFAULT_PG_BIN`].
pub fn pg_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("KLIO_PG_BIN").unwrap_or_else(|| DEFAULT_PG_BIN.into());
    Path::new(&dir).join(name)
}

/// The OS account PostgreSQL binaries run as when the tests run as root.
#[derive(Clone, Debug)]
pub(crate) struct OsUser {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) home: PathBuf,
}

/// Whether this process runs with effective uid 0 (read from the owner of `/proc/self`, which
/// is the effective uid, so no `unsafe` call to `geteuid` is needed).
pub fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
    })
}

fn lookup_user(name: &str) -> anyhow::Result<OsUser> {
    let passwd = fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 6 && fields[0] == name {
            let uid = fields[2]
                .parse()
                .with_context(|| format!("parse uid of \"{name}\""))?;
            let gid = fields[3]
                .parse()
                .with_context(|| format!("parse gid of \"{name}\""))?;
            return Ok(OsUser {
                uid,
                gid,
                home: PathBuf::from(fields[5]),
            });
        }
    }
    bail!("user \"{name}\" not found in /etc/passwd")
}

/// The `postgres` OS user when running as root, `None` otherwise (binaries then run as the
/// current user).
///
/// Panics when running as root and there is no `postgres` user: PostgreSQL refuses to run as
/// root, so no test could work.
pub(crate) fn postgres_user() -> Option<&'static OsUser> {
    static USER: OnceLock<Option<OsUser>> = OnceLock::new();
    USER.get_or_init(|| {
        if !running_as_root() {
            return None;
        }
        match lookup_user("postgres") {
            Ok(user) => Some(user),
            Err(e) => {
                panic!("running as root, but cannot run PostgreSQL as the \"postgres\" user: {e:#}")
            }
        }
    })
    .as_ref()
}

/// Makes `path` owned by the `postgres` user when running as root (no-op otherwise).
pub(crate) fn chown_to_postgres(path: &Path) -> anyhow::Result<()> {
    if let Some(user) = postgres_user() {
        std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
            .with_context(|| format!("chown \"{}\" to postgres", path.display()))?;
    }
    Ok(())
}

/// Recursively makes everything under `path` owned by the `postgres` user when running as root.
pub(crate) fn chown_tree_to_postgres(path: &Path) -> anyhow::Result<()> {
    if postgres_user().is_none() {
        return Ok(());
    }
    chown_to_postgres(path)?;
    let meta =
        fs::symlink_metadata(path).with_context(|| format!("stat \"{}\"", path.display()))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).with_context(|| format!("list \"{}\"", path.display()))? {
            let entry = entry.with_context(|| format!("list \"{}\"", path.display()))?;
            chown_tree_to_postgres(&entry.path())?;
        }
    }
    Ok(())
}

/// A [`Command`] for `program` that runs as the `postgres` OS user when this process is root.
///
/// A bare name (`"initdb"`) is looked up with [`pg_bin`] when that file exists, otherwise in
/// `PATH`. Every `PG*` environment variable is removed so the caller's environment cannot
/// redirect the binary to another server, `HOME`/`USER` are set for the `postgres` user, and the
/// working directory is `/` (the caller's may not be accessible to `postgres`).
pub fn postgres_command(program: impl AsRef<OsStr>) -> Command {
    let program = program.as_ref();
    let path = Path::new(program);
    let resolved = match program.to_str() {
        Some(name) if path.components().count() == 1 && pg_bin(name).exists() => pg_bin(name),
        _ => path.to_path_buf(),
    };
    let mut cmd = Command::new(resolved);
    cmd.current_dir("/");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    if let Some(user) = postgres_user() {
        cmd.uid(user.uid).gid(user.gid);
        cmd.env("HOME", &user.home)
            .env("USER", "postgres")
            .env("LOGNAME", "postgres");
    }
    cmd
}

/// Runs `cmd` to completion with `stdin` as its input, failing with its stderr and stdout when
/// it exits unsuccessfully. `what` names the action for error messages.
pub(crate) fn run(mut cmd: Command, what: &str, stdin: Option<&str>) -> anyhow::Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .with_context(|| format!("{what}: spawn {:?}", cmd.get_program()))?;
    // Feed stdin from another thread so a chatty child cannot deadlock on a full stdout pipe.
    let writer = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            let text = text.to_string();
            Some(std::thread::spawn(move || pipe.write_all(text.as_bytes())))
        }
        _ => None,
    };
    let output = child
        .wait_with_output()
        .with_context(|| format!("{what}: wait"))?;
    if let Some(writer) = writer {
        // A child that exits early closes the pipe; its exit status tells the real story.
        let _ = writer.join();
    }
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    Ok(output)
}

/// A child process that is killed (SIGKILL) and reaped when the guard is dropped, so a failing
/// test never leaks `klio` or `pg_receivewal` processes.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard(child)
    }

    /// Spawns `cmd` and guards the child.
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<ChildGuard> {
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {:?}", cmd.get_program()))?;
        Ok(ChildGuard(child))
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Kills the child now (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if self.0.try_wait().context("poll child")?.is_none() {
            self.0.kill().context("kill child")?;
        }
        self.0.wait().context("reap child")?;
        Ok(())
    }

    /// Whether the child is still running (reaping it if it has exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// Whether this child itself listens on 127.0.0.1:`port` (TCP). A connection that
    /// succeeds proves only that some process listens there: another test's server may hold a
    /// port [`crate::free_port`] handed out a moment before.
    pub fn listens_on(&self, port: u16) -> bool {
        let Some(inode) = loopback_listener_inode(port) else {
            return false;
        };
        let wanted = format!("socket:[{inode}]");
        let Ok(fds) = fs::read_dir(format!("/proc/{}/fd", self.id())) else {
            return false;
        };
        fds.flatten().any(|fd| {
            fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str())
        })
    }
}

/// The socket inode of the TCP listener bound to 127.0.0.1:`port` (or to any address) in this
/// network namespace, from `/proc/net/tcp`.
fn loopback_listener_inode(port: u16) -> Option<u64> {
    const LISTEN: &str = "0A";
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let wanted = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
        (state == &LISTEN && wanted.iter().any(|w| w == local))
            .then(|| inode.parse().ok())
            .flatten()
    })
}

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
