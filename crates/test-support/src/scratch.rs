//! Temporary directories the `postgres` OS user can use.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::process::chown_to_postgres;

/// A temporary directory (mode 0700) owned by the `postgres` OS user when running as root,
/// removed with everything in it on drop.
///
/// It is created under `$KLIO_TEST_TMPDIR` if set, else the system temporary directory (which
/// must be traversable by `postgres`; `/tmp` is). Set `KLIO_KEEP_SCRATCH=1` to keep the
/// directories of a failing test for inspection (their paths are printed on drop).
///
/// Mode 0700 and `postgres` ownership also make the directory itself a valid PostgreSQL data
/// directory, so `pg_basebackup -D <scratch>` and [`crate::PgCluster::from_data_dir`] work.
#[derive(Debug)]
pub struct ScratchDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl ScratchDir {
    pub fn new() -> anyhow::Result<ScratchDir> {
        let base = std::env::var_os("KLIO_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("klio-test-")
            .tempdir_in(&base)
            .with_context(|| format!("create a scratch directory in \"{}\"", base.display()))?;
        let path = dir.path().to_path_buf();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod \"{}\"", path.display()))?;
        chown_to_postgres(&path)?;
        Ok(ScratchDir {
            dir: Some(dir),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the subdirectory `name` (owned by `postgres` when running as root).
    pub fn subdir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.path.join(name);
        fs::create_dir_all(&path).with_context(|| format!("create \"{}\"", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod \"{}\"", path.display()))?;
        chown_to_postgres(&path)?;
        Ok(path)
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take()
            && std::env::var_os("KLIO_KEEP_SCRATCH").is_some_and(|v| !v.is_empty() && v != "0")
        {
            eprintln!("keeping scratch directory \"{}\"", dir.keep().display());
        }
    }
}

/// A new [`ScratchDir`]; panics when the directory cannot be created (test helper).
pub fn scratch_dir() -> ScratchDir {
    match ScratchDir::new() {
        Ok(dir) => dir,
        Err(e) => panic!("cannot create a scratch directory: {e:#}"),
    }
}
