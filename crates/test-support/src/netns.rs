//! Network namespaces for processes that insist on a fixed local port: CloudNativePG's
//! instance-manager commands (`manager wal-restore`) read the Cluster from
//! `http://localhost:8010/cache/cluster`, so each test serves its own Cluster there inside a
//! namespace of its own ([`NetNs`], [`InstanceManagerCache`]) and runs those commands, or the
//! PostgreSQL whose `restore_command` runs them ([`crate::PgOptions::in_netns`]), in it.
//! Only loopback exists inside; unix sockets (the CNPG-I sidecar's) are reached through the
//! file system as usual. Needs root (`ip netns`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{ChildGuard, ScratchDir, wait_until};

/// A network namespace with loopback up, deleted on drop.
pub struct NetNs {
    name: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl NetNs {
    /// Creates `klio-t-<pid>-<n>` and brings its loopback up.
    pub fn create() -> anyhow::Result<NetNs> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "klio-t-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]).context(
            "create a network namespace (the CloudNativePG command tests need root and `ip netns`)",
        )?;
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` run inside the namespace (as root; see [`NetNs::command_as_postgres`]).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// `program` run inside the namespace as the `postgres` user when running as root (the
    /// namespace is entered first, then the privileges dropped), with the environment of
    /// [`crate::postgres_command`].
    pub fn command_as_postgres(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        postgres_command_in(&self.name, program)
    }
}

/// [`NetNs::command_as_postgres`] for the namespace named `ns`.
pub(crate) fn postgres_command_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        cmd.current_dir("/");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        if let Some(user) = crate::process::postgres_user() {
            cmd.arg("setpriv")
                .arg(format!("--reuid={}", user.uid))
                .arg(format!("--regid={}", user.gid))
                .arg("--init-groups");
            cmd.env("HOME", &user.home)
                .env("USER", "postgres")
                .env("LOGNAME", "postgres");
        }
        cmd.arg(program);
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// CloudNativePG's instance-manager cache as `manager wal-restore` reads it: the Cluster JSON
/// at `http://localhost:8010/cache/cluster` inside a namespace (a Python HTTP server over a
/// directory; [`InstanceManagerCache::set_cluster`] replaces the document).
pub struct InstanceManagerCache {
    dir: ScratchDir,
    _server: ChildGuard,
}

/// The instance manager's fixed local port.
pub const INSTANCE_MANAGER_PORT: u16 = 8010;

impl InstanceManagerCache {
    pub fn start(ns: &NetNs, cluster: &serde_json::Value) -> anyhow::Result<InstanceManagerCache> {
        let dir = ScratchDir::new()?;
        let cache = InstanceManagerCache::write(dir.path(), cluster)?;
        let mut cmd = ns.command("python3");
        cmd.args(["-m", "http.server", &INSTANCE_MANAGER_PORT.to_string()])
            .args(["--bind", "127.0.0.1", "--directory"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let server = ChildGuard::spawn(&mut cmd)?;
        let _ = cache;
        // Ready once it answers inside the namespace.
        wait_until(
            Duration::from_secs(20),
            Duration::from_millis(100),
            "the instance-manager cache to listen",
            || {
                let out = ns
                .command("python3")
                .args([
                    "-c",
                    "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8010/cache/cluster', timeout=1).read()",
                ])
                .output()?;
                Ok(out.status.success())
            },
        )?;
        Ok(InstanceManagerCache {
            dir,
            _server: server,
        })
    }

    fn write(dir: &Path, cluster: &serde_json::Value) -> anyhow::Result<PathBuf> {
        let cache = dir.join("cache");
        std::fs::create_dir_all(&cache)?;
        let path = cache.join("cluster");
        let tmp = cache.join(".cluster.tmp");
        std::fs::write(&tmp, serde_json::to_vec(cluster)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Replaces the Cluster the commands read.
    pub fn set_cluster(&self, cluster: &serde_json::Value) -> anyhow::Result<()> {
        InstanceManagerCache::write(self.dir.path(), cluster).map(|_| ())
    }
}
