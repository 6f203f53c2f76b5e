//! Which PostgreSQL major version a test runs, and where that version's binaries are.
//!
//! PostgreSQL 15 is the system one (`/usr/lib/postgresql/15/bin`, or `$KLIO_PG_BIN`) and
//! the default of every test. 16, 17 and 18 are the server builds `scripts/install-pg-majors.sh`
//! puts in `$KLIO_PG_MAJORS_DIR/<major>/bin` (default `/var/tmp/klio-pg`); `KLIO_PG_<major>_BIN`
//! names another directory for one major. Those builds hold `initdb`, `pg_ctl` and `postgres`
//! only; client tools come from PostgreSQL 15 unless the major's directory has its own (see
//! [`PgMajor::has_own`] and `PgCluster::client_command`).

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::process::pg_bin;

/// Where `scripts/install-pg-majors.sh` installs PostgreSQL 16 and later unless
/// `KLIO_PG_MAJORS_DIR` says otherwise.
pub const DEFAULT_PG_MAJORS_DIR: &str = "/var/tmp/klio-pg";

/// A PostgreSQL major version the tests can run (each that CloudNativePG ships).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PgMajor {
    V15,
    V16,
    V17,
    V18,
}

impl PgMajor {
    /// Every major, oldest first.
    pub const ALL: [PgMajor; 4] = [PgMajor::V15, PgMajor::V16, PgMajor::V17, PgMajor::V18];

    /// The major as PostgreSQL numbers it (`PG_VERSION`, `server_version_num / 10000`).
    pub fn number(self) -> u32 {
        match self {
            PgMajor::V15 => 15,
            PgMajor::V16 => 16,
            PgMajor::V17 => 17,
            PgMajor::V18 => 18,
        }
    }

    /// The major numbered `n`, if the tests know it.
    pub fn from_number(n: u32) -> Option<PgMajor> {
        PgMajor::ALL.into_iter().find(|m| m.number() == n)
    }

    /// The major of the data directory `data_dir`, from its `PG_VERSION` file.
    pub fn of_data_dir(data_dir: &Path) -> anyhow::Result<PgMajor> {
        let path = data_dir.join("PG_VERSION");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "\"{}\" is not a PostgreSQL data directory (no PG_VERSION)",
                data_dir.display()
            ),
            Err(e) => bail!("read \"{}\": {e}", path.display()),
        };
        let version = text.trim();
        match version.parse().ok().and_then(PgMajor::from_number) {
            Some(major) => Ok(major),
            None => bail!(
                "\"{}\" holds PostgreSQL \"{version}\", which the tests cannot run (they know {})",
                path.display(),
                PgMajor::ALL.map(|m| m.number().to_string()).join(", ")
            ),
        }
    }

    /// The directory of this major's server binaries (`initdb`, `pg_ctl`, `postgres`), without
    /// checking that it holds them: `$KLIO_PG_BIN` or `/usr/lib/postgresql/15/bin` for 15;
    /// `$KLIO_PG_<major>_BIN`, else `$KLIO_PG_MAJORS_DIR/<major>/bin` (default
    /// [`DEFAULT_PG_MAJORS_DIR`]) for later majors.
    pub fn bin_dir(self) -> PathBuf {
        let own = format!("KLIO_PG_{}_BIN", self.number());
        if let Some(dir) = std::env::var_os(&own) {
            return dir.into();
        }
        if self == PgMajor::V15 {
            return pg_bin("postgres")
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
        }
        let root =
            std::env::var_os("KLIO_PG_MAJORS_DIR").unwrap_or_else(|| DEFAULT_PG_MAJORS_DIR.into());
        Path::new(&root).join(self.number().to_string()).join("bin")
    }

    /// The path of server binary `name` (`initdb`, `pg_ctl`, `postgres`) of this major, failing
    /// with what to run when it is not installed: a test of a missing major fails, it is never
    /// skipped.
    pub fn server_bin(self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.bin_dir();
        let path = dir.join(name);
        if !path.is_file() {
            let hint = if self == PgMajor::V15 {
                "hint: install the Debian package postgresql-15 (scripts/test.sh does), or set KLIO_PG_BIN".to_string()
            } else {
                format!(
                    "hint: run scripts/install-pg-majors.sh (scripts/test.sh does), or set KLIO_PG_{}_BIN \
                     or KLIO_PG_MAJORS_DIR",
                    self.number()
                )
            };
            bail!("{self} is not installed: no \"{}\"\n{hint}", path.display());
        }
        Ok(path)
    }

    /// Whether this major's binary directory has a `name` of its own (the npm server builds
    /// have no client tools; a full installation named by `KLIO_PG_<major>_BIN` does).
    ///
    /// PostgreSQL 15's libpq tools (`psql`, `pgbench`, `pg_amcheck`) work against newer
    /// servers; its `pg_basebackup` and `pg_receivewal` refuse to stream from them and its
    /// `pg_checksums` refuses their data directories from 17 on (new `pg_control` layout).
    pub fn has_own(self, name: &str) -> bool {
        self.bin_dir().join(name).is_file()
    }
}

impl fmt::Display for PgMajor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgreSQL {}", self.number())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_number_round_trips_every_major_and_refuses_others() {
        for m in PgMajor::ALL {
            assert_eq!(PgMajor::from_number(m.number()), Some(m));
        }
        assert_eq!(PgMajor::from_number(14), None);
        assert_eq!(PgMajor::from_number(19), None);
    }

    #[test]
    fn of_data_dir_reads_pg_version() {
        let dir = tempfile::tempdir().unwrap();
        assert!(PgMajor::of_data_dir(dir.path()).is_err());
        std::fs::write(dir.path().join("PG_VERSION"), "17\n").unwrap();
        assert_eq!(PgMajor::of_data_dir(dir.path()).unwrap(), PgMajor::V17);
        std::fs::write(dir.path().join("PG_VERSION"), "9.6\n").unwrap();
        let e = PgMajor::of_data_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("\"9.6\""), "{e}");
    }
}
