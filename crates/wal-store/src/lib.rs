//! The Tier 1 WAL store: per cluster, per timeline, every segment compressed and encrypted.
//!
//! Principal types:
//! - [`WalStore`]: the store under `<data-dir>/wal`, holding the [`MasterKey`];
//! - [`ClusterWal`]: one cluster's archive (its identity, status, files);
//! - [`WalWriter`]: appends streamed WAL durably as sealed frames (`.open` files), seals
//!   each completed segment in the background (one [`SealQueue`] per cluster), and turns
//!   the last segment of a finished timeline into a `.partial`;
//! - [`ClusterWal::check_usable`]: a cluster with a damaged in-progress segment is
//!   refused ([`Error::Damaged`]) until the file is moved aside; other clusters go on;
//! - [`WalFileData`]: a stored file's verified, decrypted frames, ready to send.
//!
//! The layout and the crash-safety argument are in `docs/formats/wal-store.md`.

mod layout;
mod writer;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use klio_crypto::{FrameCipher, MasterKey, ObjectHeader, ObjectKind, OpenedFrame, open_object};
use klio_pg::{Lsn, SegmentNo, SegmentSize, TimeLineId, WalFileName};
use serde::{Deserialize, Serialize};

pub use layout::validate_cluster_name;
pub use writer::{SealQueue, WalWriter};

/// Errors of the WAL store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid cluster name \"{0}\"\nHINT: cluster names use lowercase letters, digits, '-' and '.', at most 63 characters"
    )]
    InvalidClusterName(String),
    #[error(
        "cluster \"{cluster}\" belongs to database system {stored}, but the client streams from database system {offered}\nHINT: another PostgreSQL database is using the same cluster name; give it its own cluster name"
    )]
    SystemIdMismatch {
        cluster: String,
        stored: u64,
        offered: u64,
    },
    #[error(
        "cluster \"{cluster}\" uses WAL segments of {stored} bytes, but the client reports {offered}"
    )]
    SegmentSizeMismatch {
        cluster: String,
        stored: u64,
        offered: u64,
    },
    #[error(
        "unknown cluster \"{0}\"\nHINT: the cluster has never streamed WAL to this server; check the cluster name"
    )]
    UnknownCluster(String),
    #[error(
        "WAL for cluster \"{cluster}\" would leave a gap: the archive of timeline {timeline} ends at {end}, but the stream starts at {start}"
    )]
    Gap {
        cluster: String,
        timeline: TimeLineId,
        end: Lsn,
        start: Lsn,
    },
    #[error(
        "stream for cluster \"{cluster}\" on timeline {timeline} must start at a segment boundary, not at {start}"
    )]
    NotSegmentStart {
        cluster: String,
        timeline: TimeLineId,
        start: Lsn,
    },
    #[error("file \"{name}\" of cluster \"{cluster}\" already exists with different content")]
    Conflict { cluster: String, name: String },
    #[error(
        "timeline {timeline} of cluster \"{cluster}\" cannot end at {at}: its archive ends at {end}"
    )]
    BadTimelineEnd {
        cluster: String,
        timeline: TimeLineId,
        at: Lsn,
        end: Lsn,
    },
    #[error("{0}")]
    Crypto(#[from] klio_crypto::Error),
    #[error("could not {action} \"{path}\": {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "invalid WAL file name \"{0}\"\nHINT: names look like 000000010000000000000001, 00000002.history or 000000010000000000000001.partial"
    )]
    InvalidFileName(String),
    #[error(
        "timeline {timeline} of cluster \"{cluster}\" has ended (its last segment is archived as .partial) and takes no more WAL"
    )]
    TimelineEnded {
        cluster: String,
        timeline: TimeLineId,
    },
    #[error("sealing a completed segment failed earlier: {0}")]
    SealFailed(Box<Error>),
    #[error(
        "in-progress segment \"{path}\" of cluster \"{cluster}\" is damaged: {reason}\nHINT: the WAL of cluster \"{cluster}\" is refused until the damaged file is moved out of the way: keep it for inspection (mv \"{path}\" \"{path}.damaged\"); the archive then continues where its remaining files end, with WAL PostgreSQL still has; if WAL only this file held is gone from PostgreSQL too, the archive has a gap there and a new base backup is needed"
    )]
    Damaged {
        cluster: String,
        path: PathBuf,
        reason: String,
    },
}

impl Error {
    /// The error as it was, or as [`Error::Damaged`] when it says that the in-progress file
    /// at `path` does not authenticate or decode.
    pub(crate) fn damaged_open_file(self, cluster: &str, path: &Path) -> Error {
        match self {
            Error::Crypto(e) => Error::Damaged {
                cluster: cluster.to_string(),
                path: path.to_path_buf(),
                reason: e.to_string(),
            },
            other => other,
        }
    }

    /// The error behind a [`Error::SealFailed`] wrapper.
    pub fn root(&self) -> &Error {
        match self {
            Error::SealFailed(inner) => inner.root(),
            other => other,
        }
    }
}

pub(crate) fn io_err(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = path.to_path_buf();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

/// The identity of a cluster, recorded on first contact.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterMeta {
    pub system_id: u64,
    pub segment_size: u64,
    /// Unix seconds of the first contact.
    pub created_at: u64,
}

/// How far the archive of one cluster goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalStatus {
    /// The highest timeline with WAL in the archive, and where its WAL ends.
    pub latest: Option<(TimeLineId, Lsn)>,
    /// The latest timeline has ended (a `.partial` closes it).
    pub latest_closed: bool,
}

/// A stored file, decrypted and authenticated, with payloads still compressed.
#[derive(Debug)]
pub struct WalFileData {
    pub frames: Vec<OpenedFrame>,
    pub total_len: u64,
    pub blake3: [u8; 32],
    /// True when a segment was asked for and only an incomplete one exists.
    pub partial: bool,
}

/// The name a stored WAL file is sealed under (bound into its authenticated header):
/// `wal/<cluster>/<file>`, the same in Tier 1 and Tier 2.
pub fn sealed_name(cluster: &str, file: &str) -> String {
    format!("wal/{cluster}/{file}")
}

/// The sealed-object kind of an archived file.
pub fn object_kind(name: &WalFileName) -> ObjectKind {
    match name {
        WalFileName::Segment { .. } => ObjectKind::WalSegment,
        WalFileName::Partial { .. } => ObjectKind::WalPartial,
        WalFileName::History { .. } => ObjectKind::History,
        WalFileName::Backup { .. } => ObjectKind::WalOther,
    }
}

/// Decodes the header of a sealed object, checks that it is bound to `name`, and returns
/// the object's cipher and the header length.
fn cipher_for(master: &MasterKey, bytes: &[u8], name: &str) -> Result<(FrameCipher, usize), Error> {
    let (header, hlen) = ObjectHeader::decode(bytes, name)?;
    if header.name != name {
        return Err(klio_crypto::Error::Corrupt {
            name: name.to_string(),
            reason: format!("it holds object \"{}\"", header.name),
        }
        .into());
    }
    Ok((FrameCipher::new(master, &header), hlen))
}

/// Opens a complete sealed WAL object named `shown` (see [`sealed_name`]): every frame and
/// the final summary are authenticated; payloads stay compressed.
pub fn open_sealed(master: &MasterKey, shown: &str, bytes: &[u8]) -> Result<WalFileData, Error> {
    let (cipher, hlen) = cipher_for(master, bytes, shown)?;
    let (frames, summary) = cipher.open_all(&bytes[hlen..])?;
    Ok(WalFileData {
        frames,
        total_len: summary.total_len,
        blake3: summary.blake3,
        partial: false,
    })
}

/// Seals `data` again as object `shown` of `kind` under `master`, with a new salt and new
/// nonces: the frames and their compressed payloads are kept as they are. This is how a
/// file is copied to Tier 2, whose key may differ from Tier 1's.
pub fn reseal(master: &MasterKey, kind: ObjectKind, shown: &str, data: &WalFileData) -> Vec<u8> {
    let cipher = FrameCipher::new(master, &ObjectHeader::new(kind, shown));
    let payload: usize = data.frames.iter().map(|f| f.payload.len() + 64).sum();
    let mut out = Vec::with_capacity(cipher.header_bytes().len() + payload + 128);
    out.extend_from_slice(cipher.header_bytes());
    for f in &data.frames {
        cipher.seal_payload(
            f.offset,
            f.plain_len,
            f.payload.clone(),
            f.compressed,
            &mut out,
        );
    }
    cipher.seal_final(
        &klio_crypto::SealedSummary {
            total_len: data.total_len,
            blake3: data.blake3,
        },
        &mut out,
    );
    out
}

/// The WAL store of a server.
#[derive(Clone)]
pub struct WalStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    root: PathBuf,
    master: MasterKey,
    level: i32,
    /// One seal queue (and thread) per cluster: a slow or failing seal of one cluster
    /// never delays or fails another's stream.
    sealers: Mutex<HashMap<String, SealQueue>>,
    /// Clusters with a damaged in-progress file: the file and why it does not open.
    broken: Mutex<HashMap<String, (PathBuf, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl WalStore {
    /// Opens (creating) the store under `root` with the given zstd level for sealed segments.
    pub fn open(root: &Path, master: MasterKey, level: i32) -> Result<WalStore, Error> {
        klio_durable::create_dir_all_durable(root)
            .map_err(io_err("create WAL store directory", root))?;
        Ok(WalStore {
            inner: Arc::new(StoreInner {
                root: root.to_path_buf(),
                master,
                level,
                sealers: Mutex::default(),
                broken: Mutex::default(),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// One cluster's archive (which may not exist yet).
    pub fn cluster(&self, name: &str) -> Result<ClusterWal, Error> {
        validate_cluster_name(name)?;
        Ok(ClusterWal {
            store: self.clone(),
            name: name.to_string(),
            dir: self.inner.root.join(name),
        })
    }

    /// Names of the clusters that have an archive.
    pub fn clusters(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        let rd =
            fs::read_dir(&self.inner.root).map_err(io_err("list WAL store", &self.inner.root))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if validate_cluster_name(&name).is_ok() && e.path().join(layout::META_FILE).exists() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Waits until every queued segment seal of every cluster has finished (used by tests
    /// and shutdown); reports the first failure.
    pub fn flush_seals(&self) -> Result<(), Error> {
        let queues: Vec<SealQueue> = lock(&self.inner.sealers).values().cloned().collect();
        let mut first = Ok(());
        for q in queues {
            if let Err(e) = q.flush()
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    /// Runs [`ClusterWal::recover`] for every cluster. A cluster that fails does not stop
    /// the others: its error is returned with its name (and a damaged in-progress file
    /// marks the cluster broken, see [`ClusterWal::check_usable`]).
    pub fn recover_all(&self) -> Result<Vec<(String, Error)>, Error> {
        let mut failed = Vec::new();
        for name in self.clusters()? {
            if let Err(e) = self.cluster(&name)?.recover() {
                failed.push((name, e));
            }
        }
        Ok(failed)
    }

    /// The clusters marked broken, with the damaged file of each.
    pub fn broken_clusters(&self) -> Vec<(String, PathBuf)> {
        let mut v: Vec<_> = lock(&self.inner.broken)
            .iter()
            .map(|(c, (p, _))| (c.clone(), p.clone()))
            .collect();
        v.sort();
        v
    }
}

/// One cluster's WAL archive.
#[derive(Clone)]
pub struct ClusterWal {
    store: WalStore,
    name: String,
    dir: PathBuf,
}

impl ClusterWal {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn master(&self) -> &MasterKey {
        &self.store.inner.master
    }

    pub(crate) fn object_name(&self, file: &str) -> String {
        sealed_name(&self.name, file)
    }

    /// This cluster's seal queue, started on first use.
    pub(crate) fn sealer(&self) -> SealQueue {
        lock(&self.store.inner.sealers)
            .entry(self.name.clone())
            .or_insert_with(|| SealQueue::start(&self.name))
            .clone()
    }

    /// Marks the cluster broken when `e` is an [`Error::Damaged`] of its own.
    pub(crate) fn note_damage(&self, e: &Error) {
        if let Error::Damaged { path, reason, .. } = e.root() {
            let mut broken = lock(&self.store.inner.broken);
            if broken.get(&self.name).is_none_or(|(p, _)| p != path) {
                tracing::error!(
                    cluster = %self.name,
                    path = %path.display(),
                    %reason,
                    "the cluster's WAL archive has a damaged in-progress segment; its WAL calls are refused with DATA_LOSS until the file is moved aside (mv \"{}\" \"{}.damaged\")",
                    path.display(),
                    path.display(),
                );
            }
            broken.insert(self.name.clone(), (path.clone(), reason.clone()));
        }
    }

    fn noted<T>(&self, r: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &r {
            self.note_damage(e);
        }
        r
    }

    /// Refuses the cluster while it is broken: while its damaged in-progress file is still
    /// in place, with [`Error::Damaged`]. Once the operator has moved the file aside, the
    /// archive is recovered again and, if that succeeds, the cluster is usable again.
    pub fn check_usable(&self) -> Result<(), Error> {
        let Some((path, reason)) = lock(&self.store.inner.broken).get(&self.name).cloned() else {
            return Ok(());
        };
        if path.exists() {
            return Err(Error::Damaged {
                cluster: self.name.clone(),
                path,
                reason,
            });
        }
        self.recover()?;
        let mut broken = lock(&self.store.inner.broken);
        if broken.get(&self.name).is_some_and(|(p, _)| *p == path) {
            broken.remove(&self.name);
            tracing::info!(cluster = %self.name, moved = %path.display(), "the damaged in-progress segment was moved aside; the cluster's WAL archive is usable again");
        }
        Ok(())
    }

    /// The recorded identity, or None if the cluster never made contact.
    pub fn meta(&self) -> Result<Option<ClusterMeta>, Error> {
        let path = self.dir.join(layout::META_FILE);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| Error::Io {
                action: "parse cluster metadata",
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io {
                action: "read cluster metadata",
                path,
                source: e,
            }),
        }
    }

    /// The recorded identity, or [`Error::UnknownCluster`].
    pub fn require_meta(&self) -> Result<ClusterMeta, Error> {
        self.meta()?
            .ok_or_else(|| Error::UnknownCluster(self.name.clone()))
    }

    /// Records the identity on first contact; afterwards checks that it matches.
    pub fn register(
        &self,
        system_id: u64,
        segment_size: SegmentSize,
    ) -> Result<ClusterMeta, Error> {
        if let Some(m) = self.meta()? {
            if m.system_id != system_id {
                return Err(Error::SystemIdMismatch {
                    cluster: self.name.clone(),
                    stored: m.system_id,
                    offered: system_id,
                });
            }
            if m.segment_size != segment_size.bytes() {
                return Err(Error::SegmentSizeMismatch {
                    cluster: self.name.clone(),
                    stored: m.segment_size,
                    offered: segment_size.bytes(),
                });
            }
            return Ok(m);
        }
        klio_durable::create_dir_all_durable(&self.dir)
            .map_err(io_err("create cluster directory", &self.dir))?;
        let created_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let meta = ClusterMeta {
            system_id,
            segment_size: segment_size.bytes(),
            created_at,
        };
        let path = self.dir.join(layout::META_FILE);
        let json = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
        klio_durable::write_atomic(&path, &json, 0o600)
            .map_err(io_err("write cluster metadata", &path))?;
        Ok(meta)
    }

    fn segment_size(&self) -> Result<SegmentSize, Error> {
        let m = self.require_meta()?;
        SegmentSize::new(m.segment_size).map_err(|e| Error::Io {
            action: "interpret cluster metadata",
            path: self.dir.join(layout::META_FILE),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })
    }

    /// Where the archive ends: the highest timeline holding WAL and the end of its WAL.
    pub fn status(&self) -> Result<WalStatus, Error> {
        let size = self.segment_size()?;
        for tli in layout::timelines(&self.dir)?.into_iter().rev() {
            if let Some(end) = self.timeline_end(tli, size)? {
                let closed = !layout::scan_timeline(&self.dir, tli, size)?
                    .partials
                    .is_empty();
                return Ok(WalStatus {
                    latest: Some((tli, end)),
                    latest_closed: closed,
                });
            }
        }
        Ok(WalStatus::default())
    }

    /// The end of the archive on `timeline`, or None when it holds no WAL there.
    pub fn timeline_end(
        &self,
        timeline: TimeLineId,
        size: SegmentSize,
    ) -> Result<Option<Lsn>, Error> {
        // The background sealer may remove an in-progress file between the directory scan
        // and its reading; scanning again then sees the sealed segment.
        let mut attempts = 0;
        loop {
            match self.timeline_end_once(timeline, size) {
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && attempts < 3 =>
                {
                    attempts += 1;
                }
                other => return other,
            }
        }
    }

    fn timeline_end_once(
        &self,
        timeline: TimeLineId,
        size: SegmentSize,
    ) -> Result<Option<Lsn>, Error> {
        let scan = layout::scan_timeline(&self.dir, timeline, size)?;
        let mut end: Option<Lsn> = scan.complete.last().map(|s| s.next().start_lsn(size));
        if let Some(p) = scan.partials.last() {
            let data = self.read_sealed(
                &layout::partial_path(&self.dir, timeline, *p, size),
                &WalFileName::Partial {
                    timeline,
                    segno: *p,
                    size,
                },
            )?;
            let e = p.start_lsn(size).plus(data.total_len);
            end = Some(end.map_or(e, |x| x.max(e)));
        }
        for segno in scan.open {
            let (frames, _) = self.scan_open_file(timeline, segno, size)?;
            let len: u64 = frames.iter().map(|f| u64::from(f.plain_len)).sum();
            if len > 0 {
                let e = segno.start_lsn(size).plus(len);
                end = Some(end.map_or(e, |x| x.max(e)));
            }
        }
        Ok(end)
    }

    pub(crate) fn scan_open_file(
        &self,
        timeline: TimeLineId,
        segno: SegmentNo,
        size: SegmentSize,
    ) -> Result<(Vec<OpenedFrame>, u64), Error> {
        self.scan_open_with_cipher(timeline, segno, size)
            .map(|(frames, valid, _)| (frames, valid))
    }

    /// Reads an in-progress file once: its frames, the length of its valid prefix, and the
    /// cipher to append more frames with (None for an empty file).
    pub(crate) fn scan_open_with_cipher(
        &self,
        timeline: TimeLineId,
        segno: SegmentNo,
        size: SegmentSize,
    ) -> Result<(Vec<OpenedFrame>, u64, Option<FrameCipher>), Error> {
        let path = layout::open_path(&self.dir, timeline, segno, size);
        let bytes = fs::read(&path).map_err(io_err("read in-progress segment", &path))?;
        if bytes.is_empty() {
            return Ok((Vec::new(), 0, None));
        }
        let name = self.object_name(&layout::open_file_name(timeline, segno, size));
        let (cipher, hlen) = self.cipher_for(&bytes, &name)?;
        let (frames, valid) = cipher.scan_open(&bytes[hlen..])?;
        Ok((frames, (hlen + valid) as u64, Some(cipher)))
    }

    fn cipher_for(&self, bytes: &[u8], name: &str) -> Result<(FrameCipher, usize), Error> {
        cipher_for(self.master(), bytes, name)
    }

    fn read_sealed(&self, path: &Path, name: &WalFileName) -> Result<WalFileData, Error> {
        let bytes = fs::read(path).map_err(io_err("read archived WAL file", path))?;
        open_sealed(self.master(), &self.object_name(&name.to_string()), &bytes)
    }

    fn data_from_open(
        &self,
        timeline: TimeLineId,
        segno: SegmentNo,
        size: SegmentSize,
    ) -> Result<WalFileData, Error> {
        let (frames, _) = self.scan_open_file(timeline, segno, size)?;
        let mut hasher = blake3::Hasher::new();
        let shown = self.object_name(&layout::open_file_name(timeline, segno, size));
        let mut total = 0u64;
        for f in &frames {
            hasher.update(&f.plaintext(&shown)?);
            total += u64::from(f.plain_len);
        }
        Ok(WalFileData {
            frames,
            total_len: total,
            blake3: *hasher.finalize().as_bytes(),
            partial: total < size.bytes(),
        })
    }

    /// Reads an archived file by its PostgreSQL name. A segment that is not complete in the
    /// archive is served from its `.partial` or in-progress data when `allow_partial` is
    /// set (marked `partial`). None when the archive does not have it.
    pub fn read(&self, name: &str, allow_partial: bool) -> Result<Option<WalFileData>, Error> {
        let size = self.segment_size()?;
        let parsed =
            WalFileName::parse(name, size).map_err(|_| Error::InvalidFileName(name.to_string()))?;
        match parsed {
            WalFileName::Segment {
                timeline, segno, ..
            } => {
                let p = layout::segment_path(&self.dir, timeline, segno, size);
                if p.exists() {
                    return self.read_sealed(&p, &parsed).map(Some);
                }
                let open = layout::open_path(&self.dir, timeline, segno, size);
                if open.exists() {
                    let d = match self.data_from_open(timeline, segno, size) {
                        // Sealed between the two checks: serve the sealed segment.
                        Err(Error::Io { source, .. })
                            if source.kind() == std::io::ErrorKind::NotFound && p.exists() =>
                        {
                            return self.read_sealed(&p, &parsed).map(Some);
                        }
                        other => other?,
                    };
                    if !d.partial || allow_partial {
                        return Ok(Some(d));
                    }
                    return Ok(None);
                }
                let part = layout::partial_path(&self.dir, timeline, segno, size);
                if allow_partial && part.exists() {
                    let name = WalFileName::Partial {
                        timeline,
                        segno,
                        size,
                    };
                    let mut d = self.read_sealed(&part, &name)?;
                    d.partial = true;
                    return Ok(Some(d));
                }
                Ok(None)
            }
            WalFileName::Partial {
                timeline, segno, ..
            } => {
                let p = layout::partial_path(&self.dir, timeline, segno, size);
                if p.exists() {
                    self.read_sealed(&p, &parsed).map(Some)
                } else {
                    Ok(None)
                }
            }
            WalFileName::History { .. } | WalFileName::Backup { .. } => {
                let p = layout::other_path(&self.dir, &parsed);
                if p.exists() {
                    self.read_sealed(&p, &parsed).map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Stores a history or `.backup` file; idempotent for identical content.
    pub fn put_file(&self, name: &str, content: &[u8]) -> Result<bool, Error> {
        let size = self.segment_size()?;
        let parsed =
            WalFileName::parse(name, size).map_err(|_| Error::InvalidFileName(name.to_string()))?;
        let kind = match parsed {
            WalFileName::History { .. } => ObjectKind::History,
            WalFileName::Backup { .. } => ObjectKind::WalOther,
            // Segments and partials only arrive through the stream.
            _ => return Err(Error::InvalidFileName(name.to_string())),
        };
        let path = layout::other_path(&self.dir, &parsed);
        let shown = self.object_name(name);
        if path.exists() {
            let bytes = fs::read(&path).map_err(io_err("read archived file", &path))?;
            let (_, existing) = open_object(self.master(), &shown, &bytes)?;
            if existing == content {
                return Ok(false);
            }
            return Err(Error::Conflict {
                cluster: self.name.clone(),
                name: name.to_string(),
            });
        }
        let dir = path.parent().unwrap_or(&self.dir).to_path_buf();
        klio_durable::create_dir_all_durable(&dir).map_err(io_err("create directory", &dir))?;
        let sealed = klio_crypto::seal_object(
            self.master(),
            kind,
            &shown,
            content,
            Some(self.store.inner.level),
        );
        klio_durable::write_atomic(&path, &sealed, 0o600)
            .map_err(io_err("write archived file", &path))?;
        Ok(true)
    }

    /// How many history and `.backup` files (what [`ClusterWal::put_file`] stores) the
    /// archive holds, and whether `name` is one of them.
    pub fn put_files(&self, name: &str) -> Result<(usize, bool), Error> {
        let size = self.segment_size()?;
        let mut count = 0;
        let mut found = false;
        for sub in ["history", "other"] {
            let d = self.dir.join(sub);
            let rd = match fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("list archived files", &d)(e)),
            };
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if WalFileName::parse(&n, size).is_ok() {
                    count += 1;
                    found |= n == name;
                }
            }
        }
        Ok((count, found))
    }

    /// Seals complete segments that a crash left as in-progress files, on every timeline
    /// (the server calls this at start; writers do it for their own timeline).
    pub fn recover(&self) -> Result<(), Error> {
        if self.meta()?.is_none() {
            return Ok(());
        }
        let size = self.segment_size()?;
        for tli in layout::timelines(&self.dir)? {
            self.noted(writer::finish_interrupted_seals(self, tli, size))?;
        }
        Ok(())
    }

    /// Names of the archived files (complete segments, partials, history and backup files;
    /// not the segment still being received), sorted.
    pub fn list_files(&self) -> Result<Vec<String>, Error> {
        let size = self.segment_size()?;
        let mut out = Vec::new();
        for tli in layout::timelines(&self.dir)? {
            let scan = layout::scan_timeline(&self.dir, tli, size)?;
            out.extend(
                scan.complete
                    .iter()
                    .map(|s| WalFileName::segment(tli, *s, size).to_string()),
            );
            // Complete segments still waiting for the background seal are archived too.
            for segno in &scan.open {
                if scan.complete.contains(segno) {
                    continue;
                }
                let complete = match self.scan_open_file(tli, *segno, size) {
                    Ok((frames, _)) => {
                        frames.iter().map(|f| u64::from(f.plain_len)).sum::<u64>() == size.bytes()
                    }
                    // Sealed (and removed) in the meantime.
                    Err(Error::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        layout::segment_path(&self.dir, tli, *segno, size).exists()
                    }
                    Err(e) => return Err(e),
                };
                if complete {
                    out.push(WalFileName::segment(tli, *segno, size).to_string());
                }
            }
            out.extend(scan.partials.iter().map(|s| {
                WalFileName::Partial {
                    timeline: tli,
                    segno: *s,
                    size,
                }
                .to_string()
            }));
        }
        for sub in ["history", "other"] {
            let d = self.dir.join(sub);
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if WalFileName::parse(&n, size).is_ok() {
                        out.push(n);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// WAL retention: removes, on every timeline, the complete segments, partial segments
    /// and `.backup` files whose segment number is below `keep_from` (the first segment the
    /// oldest retained backup needs) and that `may_remove` allows (a Tier 2 relay that has
    /// not copied a file yet says no). History files are always kept; so is any segment
    /// still being received. Returns the names removed.
    pub fn remove_before(
        &self,
        keep_from: SegmentNo,
        may_remove: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, Error> {
        let size = self.segment_size()?;
        let mut removed = Vec::new();
        let mut remove = |name: String, path: std::path::PathBuf| -> Result<(), Error> {
            if may_remove(&name) {
                klio_durable::remove_durable(&path)
                    .map_err(io_err("remove archived WAL file", &path))?;
                removed.push(name);
            }
            Ok(())
        };
        for tli in layout::timelines(&self.dir)? {
            let scan = layout::scan_timeline(&self.dir, tli, size)?;
            for segno in scan.complete.iter().filter(|s| **s < keep_from) {
                let name = WalFileName::segment(tli, *segno, size).to_string();
                remove(name, layout::segment_path(&self.dir, tli, *segno, size))?;
            }
            for segno in scan.partials.iter().filter(|s| **s < keep_from) {
                let file = WalFileName::Partial {
                    timeline: tli,
                    segno: *segno,
                    size,
                };
                remove(
                    file.to_string(),
                    layout::partial_path(&self.dir, tli, *segno, size),
                )?;
            }
        }
        let other = self.dir.join("other");
        if let Ok(rd) = fs::read_dir(&other) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Ok(f @ WalFileName::Backup { segno, .. }) = WalFileName::parse(&n, size)
                    && segno < keep_from
                {
                    remove(f.to_string(), e.path())?;
                }
            }
        }
        removed.sort();
        Ok(removed)
    }

    /// Opens the single writer of this cluster, continuing `timeline` at `start`.
    /// The caller guarantees that only one writer per cluster exists at a time.
    pub fn writer(&self, timeline: TimeLineId, start: Lsn) -> Result<WalWriter, Error> {
        let size = self.segment_size()?;
        self.noted(WalWriter::open(
            self.clone(),
            timeline,
            start,
            size,
            self.sealer(),
        ))
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn level(&self) -> i32 {
        self.store.inner.level
    }
}

#[cfg(test)]
mod tests;
