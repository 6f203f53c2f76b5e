//! Tier 2: the backup repository and the WAL archive in S3-compatible object storage.
//!
//! Layout under the configured prefix (docs/formats/tier2.md):
//! - `repository/`: a repository in the format of Tier 1's, with `repository/keys.json` (the
//!   Tier 2 key envelope) and the same block id key as Tier 1, so blocks, blocklists and
//!   manifests keep their ids when they are copied;
//! - `wal/<cluster>/cluster.json`: the cluster's identity (system id, segment size), sealed;
//! - `wal/<cluster>/<file>`: each archived WAL file, sealed under the Tier 2 key with the
//!   same frames (and compressed payloads) as in Tier 1.
//!
//! Every method blocks (S3 calls run on the server's runtime from the calling thread): call
//! them from blocking threads.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use klio_crypto::{KeyEnvelope, MasterKey, ObjectKind, Passphrase};
use klio_pg::{SegmentNo, SegmentSize, WalFileName};
use klio_repository::{ObjectStore, Repository, RepositoryOptions};
use klio_s3::{S3Config, S3Store};
use klio_wal_store::{ClusterMeta, WalFileData};
use tokio::runtime::Handle;

/// The key envelope's object in the Tier 2 repository.
const KEYS_OBJECT: &str = "keys.json";
/// A cluster's identity object in the Tier 2 WAL archive.
const CLUSTER_OBJECT: &str = "cluster.json";

/// How to reach Tier 2.
#[derive(Clone, Debug)]
pub struct Tier2Config {
    pub s3: S3Config,
    /// The Tier 2 passphrase file (Tier 1's when none is given).
    pub key_file: std::path::PathBuf,
    /// The block index cache of the Tier 2 repository (a temporary file when `None`).
    pub index_cache: Option<std::path::PathBuf>,
}

/// An open Tier 2.
pub struct Tier2 {
    pub repo: Repository,
    wal: S3Store,
    master: MasterKey,
    location: String,
    /// Held shared by relays and block reads of Tier 2, exclusively by its garbage collection.
    pub gc_lock: Arc<tokio::sync::RwLock<()>>,
    /// The WAL files Tier 2 holds, per cluster, once listed (kept up to date by this process,
    /// the only writer).
    files: Mutex<HashMap<String, BTreeSet<String>>>,
    metas: Mutex<HashMap<String, ClusterMeta>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn sub(cfg: &S3Config, dir: &str) -> S3Config {
    let mut c = cfg.clone();
    let p = c.prefix.trim_matches('/');
    c.prefix = if p.is_empty() {
        dir.to_string()
    } else {
        format!("{p}/{dir}")
    };
    c
}

/// Whether an error from Tier 2 may go away by itself (unreachable endpoint, timeouts),
/// as opposed to a configuration error (missing bucket, denied access, wrong key).
pub fn is_retryable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<klio_repository::Error>()
            .is_some_and(|e| match klio_s3::s3_error(e) {
                Some(s3) => s3.is_retryable(),
                None => e.is_retryable(),
            })
    })
}

impl Tier2 {
    /// Opens Tier 2. `create`: a standard server creates the key envelope and the
    /// repository (with `id_key`, Tier 1's) when the prefix is empty; a read-only server
    /// only opens what exists.
    pub fn open(
        cfg: &Tier2Config,
        runtime: Handle,
        id_key: Option<[u8; 32]>,
        create: bool,
    ) -> anyhow::Result<Tier2> {
        Tier2::open_inner(cfg, runtime, id_key, create)?.ok_or_else(|| {
            anyhow::anyhow!(
                "no Klio repository at {}: \"{}/repository/{KEYS_OBJECT}\" does not exist\nHINT: point --tier2-s3-bucket/--tier2-s3-prefix at the bucket a standard server relays to",
                cfg.s3.location(),
                cfg.s3.location()
            )
        })
    }

    /// Opens Tier 2 when it holds a repository; `None` when the prefix has none yet.
    pub fn probe(cfg: &Tier2Config, runtime: Handle) -> anyhow::Result<Option<Tier2>> {
        Tier2::open_inner(cfg, runtime, None, false)
    }

    fn open_inner(
        cfg: &Tier2Config,
        runtime: Handle,
        id_key: Option<[u8; 32]>,
        create: bool,
    ) -> anyhow::Result<Option<Tier2>> {
        let passphrase = Passphrase::from_file(&cfg.key_file)?;
        let repo_cfg = sub(&cfg.s3, "repository");
        let store = Arc::new(S3Store::open(&repo_cfg, runtime.clone())?);
        let keys_shown = format!("{}/{KEYS_OBJECT}", repo_cfg.location());
        let envelope = match store.get(KEYS_OBJECT)? {
            Some(bytes) => bytes,
            None if create => {
                let master = MasterKey::generate();
                passphrase.check_strength()?;
                let env = KeyEnvelope::wrap(&master, &passphrase);
                let json = serde_json::to_vec_pretty(&env).context("encode the key envelope")?;
                // Create-only: if another server won the race, its envelope is read back.
                store.put(KEYS_OBJECT, &json)?;
                store.get(KEYS_OBJECT)?.ok_or_else(|| {
                    anyhow::anyhow!("\"{keys_shown}\" vanished right after it was written")
                })?
            }
            None => return Ok(None),
        };
        let env: KeyEnvelope = serde_json::from_slice(&envelope)
            .with_context(|| format!("\"{keys_shown}\" is not a Klio key envelope"))?;
        let master = env.unwrap(&passphrase, &keys_shown).with_context(|| {
            format!(
                "the Tier 2 key (\"{}\") does not open the Tier 2 repository",
                cfg.key_file.display()
            )
        })?;
        let options = RepositoryOptions {
            index_cache: cfg.index_cache.clone(),
            ..RepositoryOptions::default()
        };
        let repo = if create {
            Repository::open_or_init_with_id_key(store, master.clone(), options, id_key)?
        } else {
            Repository::open(store, master.clone(), options)?
        };
        if create {
            // Everything Tier 2 writes relies on create-only puts; a server that would
            // silently replace objects is refused here, before any relay writes to it.
            let check = S3Store::open(&sub(&cfg.s3, "write-check"), runtime.clone())?;
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            check.check_create_only(&format!("{}-{nanos}", std::process::id()))?;
        }
        let wal = S3Store::open(&sub(&cfg.s3, "wal"), runtime)?;
        Ok(Some(Tier2 {
            repo,
            wal,
            master,
            location: cfg.s3.location(),
            gc_lock: Arc::default(),
            files: Mutex::default(),
            metas: Mutex::default(),
        }))
    }

    /// `s3://bucket/prefix`.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn meta_shown(cluster: &str) -> String {
        klio_wal_store::sealed_name(cluster, CLUSTER_OBJECT)
    }

    /// The cluster's identity in Tier 2, if it has any WAL there.
    pub fn meta(&self, cluster: &str) -> anyhow::Result<Option<ClusterMeta>> {
        if let Some(m) = lock(&self.metas).get(cluster) {
            return Ok(Some(m.clone()));
        }
        let key = format!("{cluster}/{CLUSTER_OBJECT}");
        let Some(sealed) = self.wal.get(&key)? else {
            return Ok(None);
        };
        let (_, plain) =
            klio_crypto::open_object(&self.master, &Self::meta_shown(cluster), &sealed)
                .with_context(|| format!("read {}/wal/{key}", self.location))?;
        let meta: ClusterMeta = serde_json::from_slice(&plain)
            .with_context(|| format!("parse {}/wal/{key}", self.location))?;
        lock(&self.metas).insert(cluster.to_string(), meta.clone());
        Ok(Some(meta))
    }

    /// Records the cluster's identity, or checks it against the recorded one.
    pub fn ensure_meta(&self, cluster: &str, meta: &ClusterMeta) -> anyhow::Result<()> {
        if let Some(existing) = self.meta(cluster)? {
            if existing.system_id != meta.system_id || existing.segment_size != meta.segment_size {
                anyhow::bail!(
                    "Tier 2 ({}) holds WAL of cluster \"{cluster}\" from database system {} (segment size {}), but Tier 1's is from system {} (segment size {})\nHINT: the cluster name was reused for another database; give it its own name or Tier 2 prefix",
                    self.location,
                    existing.system_id,
                    existing.segment_size,
                    meta.system_id,
                    meta.segment_size
                );
            }
            return Ok(());
        }
        let plain = serde_json::to_vec(meta)?;
        let sealed = klio_crypto::seal_object(
            &self.master,
            ObjectKind::WalOther,
            &Self::meta_shown(cluster),
            &plain,
            None,
        );
        self.wal
            .put(&format!("{cluster}/{CLUSTER_OBJECT}"), &sealed)?;
        lock(&self.metas).insert(cluster.to_string(), meta.clone());
        Ok(())
    }

    fn segment_size(&self, cluster: &str) -> anyhow::Result<Option<SegmentSize>> {
        match self.meta(cluster)? {
            Some(m) => Ok(Some(SegmentSize::new(m.segment_size)?)),
            None => Ok(None),
        }
    }

    /// The WAL files Tier 2 holds for the cluster (listed once, then tracked).
    pub fn files(&self, cluster: &str) -> anyhow::Result<BTreeSet<String>> {
        if let Some(f) = lock(&self.files).get(cluster) {
            return Ok(f.clone());
        }
        let prefix = format!("{cluster}/");
        let listed: BTreeSet<String> = self
            .wal
            .list(&prefix)?
            .into_iter()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .filter(|n| n != CLUSTER_OBJECT)
            .collect();
        lock(&self.files).insert(cluster.to_string(), listed.clone());
        Ok(listed)
    }

    /// Stores one archived file (resealed under the Tier 2 key). Idempotent: an existing
    /// object is kept. Returns the bytes written.
    pub fn put_file(&self, cluster: &str, name: &str, data: &WalFileData) -> anyhow::Result<u64> {
        let size = self
            .segment_size(cluster)?
            .ok_or_else(|| anyhow::anyhow!("cluster \"{cluster}\" has no identity in Tier 2"))?;
        let parsed = WalFileName::parse(name, size)
            .map_err(|e| anyhow::anyhow!("invalid WAL file name \"{name}\": {e}"))?;
        let sealed = klio_wal_store::reseal(
            &self.master,
            klio_wal_store::object_kind(&parsed),
            &klio_wal_store::sealed_name(cluster, name),
            data,
        );
        self.wal.put(&format!("{cluster}/{name}"), &sealed)?;
        lock(&self.files)
            .entry(cluster.to_string())
            .or_default()
            .insert(name.to_string());
        Ok(sealed.len() as u64)
    }

    fn read_object(&self, cluster: &str, name: &str) -> anyhow::Result<Option<WalFileData>> {
        let key = format!("{cluster}/{name}");
        let Some(bytes) = self.wal.get(&key)? else {
            return Ok(None);
        };
        let data = klio_wal_store::open_sealed(
            &self.master,
            &klio_wal_store::sealed_name(cluster, name),
            &bytes,
        )
        .with_context(|| format!("WAL file {}/wal/{key} is corrupt", self.location))?;
        Ok(Some(data))
    }

    /// Reads an archived file as Tier 1's `read` does: a segment Tier 2 only has as
    /// `.partial` is served from it (marked partial) when `allow_partial`.
    pub fn read(
        &self,
        cluster: &str,
        name: &str,
        allow_partial: bool,
    ) -> anyhow::Result<Option<WalFileData>> {
        let Some(size) = self.segment_size(cluster)? else {
            return Ok(None);
        };
        let parsed = WalFileName::parse(name, size)
            .map_err(|e| anyhow::anyhow!("invalid WAL file name \"{name}\": {e}"))?;
        if let Some(d) = self.read_object(cluster, name)? {
            return Ok(Some(d));
        }
        if let WalFileName::Segment {
            timeline, segno, ..
        } = parsed
            && allow_partial
        {
            let partial = WalFileName::Partial {
                timeline,
                segno,
                size,
            }
            .to_string();
            if let Some(mut d) = self.read_object(cluster, &partial)? {
                d.partial = true;
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    /// WAL retention in Tier 2: removes segments, partials and `.backup` files below
    /// `keep_from` (history files are kept). Returns the names removed.
    pub fn remove_wal_before(
        &self,
        cluster: &str,
        keep_from: SegmentNo,
    ) -> anyhow::Result<Vec<String>> {
        let Some(size) = self.segment_size(cluster)? else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        for name in self.files(cluster)? {
            let old = match WalFileName::parse(&name, size) {
                Ok(WalFileName::History { .. }) | Err(_) => false,
                Ok(f) => f.segno().is_some_and(|s| s < keep_from),
            };
            if old {
                self.wal.delete(&format!("{cluster}/{name}"))?;
                if let Some(f) = lock(&self.files).get_mut(cluster) {
                    f.remove(&name);
                }
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Reads and authenticates every WAL object of the cluster: (files verified, problems
    /// as (object, detail)).
    pub fn verify_wal(&self, cluster: &str) -> anyhow::Result<(u64, Vec<(String, String)>)> {
        let mut ok = 0;
        let mut problems = Vec::new();
        if self.segment_size(cluster)?.is_none() {
            return Ok((0, problems));
        }
        // A fresh listing: verification must not trust this process's view.
        lock(&self.files).remove(cluster);
        for name in self.files(cluster)? {
            let object = format!("{}/wal/{cluster}/{name}", self.location);
            match self.read_object(cluster, &name) {
                Ok(Some(_)) => ok += 1,
                Ok(None) => problems.push((object, "the object is missing".to_string())),
                Err(e) => problems.push((object, format!("{e:#}"))),
            }
        }
        Ok((ok, problems))
    }
}

/// Tier 2 opened on first use: a standard server keeps archiving into Tier 1 while S3 is
/// unreachable, and opens Tier 2 once it answers.
pub struct Tier2Handle {
    cfg: Tier2Config,
    create: bool,
    id_key: Option<[u8; 32]>,
    cell: tokio::sync::OnceCell<Arc<Tier2>>,
}

impl Tier2Handle {
    pub fn new(cfg: Tier2Config, create: bool, id_key: Option<[u8; 32]>) -> Tier2Handle {
        Tier2Handle {
            cfg,
            create,
            id_key,
            cell: tokio::sync::OnceCell::new(),
        }
    }

    /// A handle already open.
    pub fn opened(cfg: Tier2Config, tier2: Tier2) -> Tier2Handle {
        Tier2Handle {
            cfg,
            create: false,
            id_key: None,
            cell: tokio::sync::OnceCell::new_with(Some(Arc::new(tier2))),
        }
    }

    /// Tier 2 if a use opened it already.
    pub fn if_open(&self) -> Option<Arc<Tier2>> {
        self.cell.get().cloned()
    }

    /// `s3://bucket/prefix`.
    pub fn location(&self) -> String {
        self.cfg.s3.location()
    }

    /// Tier 2, opening it if this is the first successful use.
    pub async fn get(&self) -> anyhow::Result<Arc<Tier2>> {
        self.cell
            .get_or_try_init(|| async {
                let cfg = self.cfg.clone();
                let (create, id_key) = (self.create, self.id_key);
                let runtime = Handle::current();
                let t = tokio::task::spawn_blocking(move || {
                    Tier2::open(&cfg, runtime, id_key, create)
                })
                .await??;
                tracing::info!(location = %t.location(), blocks = t.repo.block_count().unwrap_or_default(), "Tier 2 open");
                Ok::<_, anyhow::Error>(Arc::new(t))
            })
            .await
            .cloned()
            .with_context(|| format!("Tier 2 ({}) is not available", self.cfg.s3.location()))
    }
}
