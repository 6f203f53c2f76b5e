//! Crash-safe file writes: the one place that knows how to make bytes durable.
//!
//! Every file Klio acknowledges goes through here: write to a temporary file in the
//! target directory, `fsync` it, `rename` it over the final name, then `fsync` the
//! directory so that the rename itself survives a crash. Principal functions:
//! [`write_atomic`], [`sync_dir`], [`create_dir_all_durable`], [`AppendFile`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The suffix of temporary files; a crash can leave such files behind, and
/// readers ignore (and cleaners remove) them.
pub const TMP_SUFFIX: &str = ".klio-tmp";

fn parent_of(path: &Path) -> io::Result<&Path> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => Ok(p),
        Some(_) => Ok(Path::new(".")),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no parent directory", path.display()),
        )),
    }
}

/// A temporary path next to `path`, unique within this process.
pub fn temp_path_for(path: &Path) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{n}{TMP_SUFFIX}", std::process::id()))
}

/// Removes the temporary files ([`TMP_SUFFIX`]) a crash left under `dir`, recursively,
/// without following symbolic links, and returns how many. Call it only when nothing else
/// writes there (a server, once it holds its data directory's lock).
pub fn sweep_temp_files(dir: &Path) -> io::Result<u64> {
    sweep(dir, None)
}

/// As [`sweep_temp_files`], but only the temporary files not modified for `age`: safe
/// while writers run, as long as no write takes that long (garbage collection uses it).
pub fn sweep_stale_temp_files(dir: &Path, age: std::time::Duration) -> io::Result<u64> {
    sweep(dir, Some(age))
}

fn sweep(dir: &Path, min_age: Option<std::time::Duration>) -> io::Result<u64> {
    let mut removed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
                continue;
            }
            if !kind.is_file() || !entry.file_name().to_string_lossy().ends_with(TMP_SUFFIX) {
                continue;
            }
            if let Some(age) = min_age {
                let modified = match entry.metadata() {
                    Ok(m) => m.modified()?,
                    // Renamed or removed by its writer meanwhile.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                if modified.elapsed().unwrap_or_default() < age {
                    continue;
                }
            }
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// `fsync` a directory so that creations, renames and deletions in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `data` to `path` atomically and durably with the given permission bits.
///
/// After this returns, `path` holds exactly `data` even if the machine crashes; before,
/// it holds its previous content or does not exist.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path_for(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(parent_of(path)?)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Like [`write_atomic`] but the content is produced by a writer callback, so large
/// files need not be held in memory.
pub fn write_atomic_with<F>(path: &Path, mode: u32, fill: F) -> io::Result<()>
where
    F: FnOnce(&mut File) -> io::Result<()>,
{
    let tmp = temp_path_for(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(parent_of(path)?)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` and its missing parents, fsyncing each parent that gained an entry.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_dir(parent_of(dir)?)
}

/// Removes a file and makes the removal durable. A missing file is not an error.
pub fn remove_durable(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent_of(path)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// An append-only file whose appends become durable on [`AppendFile::sync`].
pub struct AppendFile {
    file: File,
    len: u64,
}

impl AppendFile {
    /// Opens (creating if needed) `path` for appending; a new file's directory entry is
    /// made durable before this returns.
    pub fn open(path: &Path, mode: u32) -> io::Result<AppendFile> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(mode)
            .open(path)?;
        if !existed {
            file.sync_all()?;
            sync_dir(parent_of(path)?)?;
        }
        let len = file.metadata()?.len();
        Ok(AppendFile { file, len })
    }

    /// Cuts the file to `len` bytes (used to drop a torn, unacknowledged tail).
    pub fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()?;
        self.len = len;
        Ok(())
    }

    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.len += data.len() as u64;
        Ok(())
    }

    /// Makes every append so far durable (`fdatasync`).
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_only_temp_files_and_follows_no_link() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("a/b");
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join(".x.1.2.klio-tmp"), b"half").unwrap();
        fs::write(sub.join("x"), b"kept").unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join(".y.1.2.klio-tmp"), b"not ours").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
        assert_eq!(sweep_temp_files(d.path()).unwrap(), 1);
        assert!(sub.join("x").exists());
        assert!(outside.path().join(".y.1.2.klio-tmp").exists());
    }

    #[test]
    fn stale_sweep_spares_recent_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let (old, new) = (
            d.path().join(".o.1.2.klio-tmp"),
            d.path().join(".n.1.3.klio-tmp"),
        );
        fs::write(&old, b"crash").unwrap();
        fs::write(&new, b"being written").unwrap();
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(sweep_stale_temp_files(d.path(), hour).unwrap(), 1);
        assert!(!old.exists() && new.exists());
    }

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn append_file_tracks_length_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let mut f = AppendFile::open(&p, 0o600).unwrap();
        f.append(b"hello").unwrap();
        f.append(b" world").unwrap();
        f.sync().unwrap();
        assert_eq!(f.len(), 11);
        f.truncate(5).unwrap();
        drop(f);
        let f = AppendFile::open(&p, 0o600).unwrap();
        assert_eq!(f.len(), 5);
        assert_eq!(fs::read(&p).unwrap(), b"hello");
    }

    #[test]
    fn create_dir_all_durable_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("x/y/z");
        create_dir_all_durable(&d).unwrap();
        create_dir_all_durable(&d).unwrap();
        assert!(d.is_dir());
    }
}
