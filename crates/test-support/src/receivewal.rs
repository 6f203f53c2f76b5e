//! `pg_receivewal` as a reference WAL receiver.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::cluster::PgCluster;
use crate::process::{ChildGuard, run};
use crate::scratch::ScratchDir;
use crate::wait::wait_until;

/// `pg_receivewal` streaming from a [`PgCluster`] into a scratch directory, killed on drop.
#[derive(Debug)]
pub struct PgReceiveWal {
    child: ChildGuard,
    wal_dir: PathBuf,
    log_file: PathBuf,
    _scratch: ScratchDir,
}

impl PgReceiveWal {
    /// Starts `pg_receivewal -D <dir> -d <dsn>`. With `slot`, the physical slot is created
    /// first if missing (`--create-slot --if-not-exists`) and used, so streaming resumes at the
    /// slot's `restart_lsn`; without it no slot is used and streaming starts at the server's
    /// current segment. Returns once the walsender is visible in `pg_stat_replication`
    /// (`application_name = 'pg_receivewal'`).
    pub fn start(cluster: &PgCluster, slot: Option<&str>) -> anyhow::Result<PgReceiveWal> {
        let scratch = ScratchDir::new()?;
        let wal_dir = scratch.subdir("wal")?;
        let log_file = scratch.path().join("pg_receivewal.log");
        let dsn = format!("{} application_name=pg_receivewal", cluster.dsn());

        if let Some(slot) = slot {
            let mut create = cluster.client_command("pg_receivewal");
            create.args([
                "--create-slot",
                "--if-not-exists",
                "--slot",
                slot,
                "-d",
                &dsn,
            ]);
            run(create, &format!("pg_receivewal --create-slot {slot}"), None)?;
        }

        let log = fs::File::create(&log_file)
            .with_context(|| format!("create \"{}\"", log_file.display()))?;
        let log_err = log.try_clone().context("clone log file handle")?;
        let mut cmd = cluster.client_command("pg_receivewal");
        cmd.arg("-D")
            .arg(&wal_dir)
            .args(["-d", &dsn, "-s", "1", "-v"]);
        if let Some(slot) = slot {
            cmd.args(["--slot", slot]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let mut receiver = PgReceiveWal {
            child: ChildGuard::spawn(&mut cmd)?,
            wal_dir,
            log_file,
            _scratch: scratch,
        };

        let connected = wait_until(
            Duration::from_secs(30),
            Duration::from_millis(50),
            "pg_receivewal to connect",
            || {
                if !receiver.child.is_running() {
                    bail!("pg_receivewal exited");
                }
                let n = cluster.psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pg_receivewal'")?;
                Ok(n != "0")
            },
        );
        if let Err(e) = connected {
            return Err(e.context(format!(
                "start pg_receivewal; its log:\n{}",
                receiver.log_contents()
            )));
        }
        Ok(receiver)
    }

    /// The directory receiving the segments (complete ones and the current `.partial`).
    pub fn dir(&self) -> &Path {
        &self.wal_dir
    }

    pub fn log_contents(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_file).unwrap_or_default()).into_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the complete segment `name` (not its `.partial`) is in [`PgReceiveWal::dir`].
    pub fn wait_for_segment(&mut self, name: &str, timeout: Duration) -> anyhow::Result<PathBuf> {
        let path = self.wal_dir.join(name);
        let what = format!("pg_receivewal to complete segment \"{name}\"");
        let result = wait_until(timeout, Duration::from_millis(50), &what, || {
            if !self.child.is_running() {
                bail!("pg_receivewal exited");
            }
            Ok(path.exists())
        });
        match result {
            Ok(()) => Ok(path),
            Err(e) => Err(e.context(format!("pg_receivewal log:\n{}", self.log_contents()))),
        }
    }

    /// Stops `pg_receivewal` (SIGKILL); the directory stays readable until drop.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()
    }
}
