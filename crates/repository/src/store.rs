//! Object stores: whole immutable objects by `/`-separated key.
//!
//! [`LocalStore`] keeps objects as files under a directory, [`MemStore`] in memory (tests).
//! S3 will implement the same trait; the keys are the same everywhere.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::Error;

/// Longest object key accepted (S3 allows 1024 bytes including the prefix).
const MAX_KEY_LEN: usize = 512;

/// Storage of whole objects by key.
///
/// Keys are `/`-separated relative names whose components use only `A-Z a-z 0-9 . _ -`
/// and do not start with `.` (see [`validate_key`]). Objects are immutable: [`put`] creates
/// an object or, if the key exists, leaves the existing object as it is.
///
/// [`put`]: ObjectStore::put
pub trait ObjectStore: Send + Sync {
    /// Where the store is, for messages (a directory, `s3://bucket/prefix`, `memory`).
    fn location(&self) -> String;

    /// Stores `data` under `key` atomically and durably: after `Ok`, the object survives a
    /// crash; readers never see a partial object. If `key` exists, nothing is written and
    /// the result is `Ok` (the existing object is kept, whatever it holds).
    fn put(&self, key: &str, data: &[u8]) -> Result<(), Error>;

    /// The whole object, or `None` if it does not exist.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error>;

    /// `len` bytes of the object from `offset`; an error if it does not exist or is shorter.
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>, Error>;

    /// Every key that starts with `prefix`, sorted. `prefix` is a key prefix, not
    /// necessarily ending at a `/` (`"packs/a"` lists the keys under `packs/a0/` … `packs/af/`).
    fn list(&self, prefix: &str) -> Result<Vec<String>, Error>;

    /// Removes the object durably; a missing object is not an error.
    fn delete(&self, key: &str) -> Result<(), Error>;

    fn exists(&self, key: &str) -> Result<bool, Error>;
}

fn component_ok(c: &str) -> Result<(), &'static str> {
    if c.is_empty() {
        return Err("it has an empty component");
    }
    if c == "." || c == ".." {
        return Err("it has a \".\" or \"..\" component");
    }
    if c.starts_with('.') {
        return Err("a component starts with \".\"");
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-';
    if !c.bytes().all(allowed) {
        return Err("only letters, digits, '.', '_' and '-' are allowed in a component");
    }
    Ok(())
}

/// Checks an object key: relative, `/`-separated, no empty, `.` or `..` components, and
/// components made of `A-Z a-z 0-9 . _ -` that do not start with `.`.
pub fn validate_key(key: &str) -> Result<(), Error> {
    let bad = |reason| Error::InvalidKey {
        key: key.to_string(),
        reason,
    };
    if key.is_empty() {
        return Err(bad("it is empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(bad("it is too long"));
    }
    if key.starts_with('/') {
        return Err(bad("it is absolute"));
    }
    key.split('/').try_for_each(component_ok).map_err(bad)
}

/// Checks a listing prefix: empty, or a key prefix whose complete components are valid.
fn validate_prefix(prefix: &str) -> Result<(), Error> {
    if prefix.is_empty() {
        return Ok(());
    }
    let bad = |reason| Error::InvalidKey {
        key: prefix.to_string(),
        reason,
    };
    if prefix.starts_with('/') {
        return Err(bad("it is absolute"));
    }
    let mut parts: Vec<&str> = prefix.split('/').collect();
    // The last part is a partial component (empty if the prefix ends with '/').
    if let Some(last) = parts.pop()
        && !last.is_empty()
    {
        component_ok(last).map_err(bad)?;
    }
    parts.into_iter().try_for_each(component_ok).map_err(bad)
}

/// Objects as files under a directory. Writes are create-only and durable: temporary file,
/// fsync, hard link to the final name (which fails if it exists, so a racing writer never
/// replaces an object), fsync of the directory.
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store rooted at `root`, created (durably) if missing.
    pub fn open(root: &Path) -> Result<LocalStore, Error> {
        klio_durable::create_dir_all_durable(root).map_err(|source| Error::CreateDirectory {
            location: root.display().to_string(),
            source,
        })?;
        Ok(LocalStore {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, Error> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn io(&self, action: &'static str, key: &str, source: io::Error) -> Error {
        Error::Io {
            action,
            location: self.root.display().to_string(),
            key: key.to_string(),
            source,
        }
    }

    fn write_new(path: &Path, data: &[u8]) -> io::Result<()> {
        let dir = path
            .parent()
            .ok_or_else(|| io::Error::other("object path has no parent directory"))?;
        klio_durable::create_dir_all_durable(dir)?;
        let tmp = klio_durable::temp_path_for(path);
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            match fs::hard_link(&tmp, path) {
                Ok(()) => Ok(()),
                // Someone else created it first: theirs is kept.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(e),
            }
        })();
        let removed = fs::remove_file(&tmp);
        written?;
        removed?;
        klio_durable::sync_dir(dir)
    }

    fn walk(&self, dir: &Path, rel: &str, prefix: &str, out: &mut Vec<String>) -> io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if component_ok(&name).is_err() {
                // temporary files and anything that is not an object
                continue;
            }
            let key = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            // Only descend where keys with the prefix can be.
            let relevant = key.starts_with(prefix) || prefix.starts_with(&format!("{key}/"));
            if !relevant {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                self.walk(&entry.path(), &key, prefix, out)?;
            } else if kind.is_file() && key.starts_with(prefix) {
                out.push(key);
            }
        }
        Ok(())
    }
}

impl ObjectStore for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), Error> {
        let path = self.path(key)?;
        if path
            .try_exists()
            .map_err(|e| self.io("check object", key, e))?
        {
            return Ok(());
        }
        LocalStore::write_new(&path, data).map_err(|e| self.io("write object", key, e))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let path = self.path(key)?;
        match fs::read(&path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("read object", key, e)),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        let path = self.path(key)?;
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::ObjectNotFound {
                    location: self.location(),
                    key: key.to_string(),
                });
            }
            Err(e) => return Err(self.io("open object", key, e)),
        };
        let size = f
            .metadata()
            .map_err(|e| self.io("stat object", key, e))?
            .len();
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(Error::ShortObject {
                key: key.to_string(),
                offset,
                len,
                size,
            });
        }
        let mut buf = vec![0u8; len];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| self.io("read object", key, e))?;
        Ok(buf)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, Error> {
        validate_prefix(prefix)?;
        let mut out = Vec::new();
        self.walk(&self.root, "", prefix, &mut out)
            .map_err(|e| self.io("list objects under", prefix, e))?;
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), Error> {
        let path = self.path(key)?;
        klio_durable::remove_durable(&path).map_err(|e| self.io("delete object", key, e))
    }

    fn exists(&self, key: &str) -> Result<bool, Error> {
        let path = self.path(key)?;
        path.try_exists()
            .map_err(|e| self.io("check object", key, e))
    }
}

/// Objects in memory, for tests. Same key rules and semantics as [`LocalStore`].
#[derive(Default)]
pub struct MemStore {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn objects(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // A panic while holding the lock cannot leave the map half-updated.
        self.objects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Overwrites or creates an object, bypassing the create-only rule: for tests that
    /// simulate damage.
    pub fn replace(&self, key: &str, data: Vec<u8>) -> Result<(), Error> {
        validate_key(key)?;
        self.objects().insert(key.to_string(), data);
        Ok(())
    }
}

impl ObjectStore for MemStore {
    fn location(&self) -> String {
        "memory".to_string()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), Error> {
        validate_key(key)?;
        self.objects()
            .entry(key.to_string())
            .or_insert_with(|| data.to_vec());
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        validate_key(key)?;
        Ok(self.objects().get(key).cloned())
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        validate_key(key)?;
        let objects = self.objects();
        let data = objects.get(key).ok_or_else(|| Error::ObjectNotFound {
            location: self.location(),
            key: key.to_string(),
        })?;
        let size = data.len() as u64;
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(len)?))
            .filter(|r| r.end <= data.len());
        match range {
            Some(r) => Ok(data[r].to_vec()),
            None => Err(Error::ShortObject {
                key: key.to_string(),
                offset,
                len,
                size,
            }),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, Error> {
        validate_prefix(prefix)?;
        Ok(self
            .objects()
            .range(prefix.to_string()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), Error> {
        validate_key(key)?;
        self.objects().remove(key);
        Ok(())
    }

    fn exists(&self, key: &str) -> Result<bool, Error> {
        validate_key(key)?;
        Ok(self.objects().contains_key(key))
    }
}
