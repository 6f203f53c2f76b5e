//! Durable appends of streamed WAL, and background sealing of completed segments.
//!
//! A segment being received lives in `<segment>.open`: a sealed-object header followed by
//! one authenticated, encrypted frame per write. [`WalWriter::sync`] makes every write so
//! far durable (fdatasync; new files also fsync their directory), and only then may the
//! caller acknowledge. When a segment is complete its `.open` file is synced and handed to
//! the cluster's [`SealQueue`], which rewrites it as one compact sealed segment (temp file, fsync,
//! rename, fsync directory) and then removes the `.open` file. A crash at any point leaves
//! either the `.open` file, the sealed segment, or both; [`WalWriter::open`] finishes the
//! job on the next start.
//!
//! Every cluster has its own seal queue and thread: a slow seal of one cluster never holds
//! up another cluster's writes or stream start, and a failed seal is reported to the
//! cluster whose segment failed, and to no other.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use klio_crypto::{FrameCipher, ObjectHeader, ObjectKind};
use klio_durable::AppendFile;
use klio_pg::{Lsn, SegmentNo, SegmentSize, TimeLineId, WalFileName};

use crate::layout;
use crate::{ClusterWal, Error, io_err};

/// Frames written while streaming are not compressed (they are short-lived and on the
/// acknowledgement path); sealing compresses the whole segment.
const STREAM_LEVEL: Option<i32> = None;
/// Largest plaintext per streamed frame.
const MAX_STREAM_FRAME: usize = 4 << 20;

struct OpenSegment {
    segno: SegmentNo,
    file: AppendFile,
    cipher: FrameCipher,
    /// Plaintext bytes held so far (from the segment start).
    len: u64,
}

/// The single writer of one cluster's WAL on one timeline.
pub struct WalWriter {
    cluster: ClusterWal,
    timeline: TimeLineId,
    size: SegmentSize,
    end: Lsn,
    durable: Lsn,
    open: Option<OpenSegment>,
    sealer: SealQueue,
}

impl WalWriter {
    pub(crate) fn open(
        cluster: ClusterWal,
        timeline: TimeLineId,
        start: Lsn,
        size: SegmentSize,
        sealer: SealQueue,
    ) -> Result<WalWriter, Error> {
        // An earlier seal failure of this cluster was logged and reported to the writer of
        // that time; the `.open` file it left is sealed again just below.
        let _ = sealer.flush();
        let scan = layout::scan_timeline(cluster.dir(), timeline, size)?;
        let current = finish_interrupted_seals(&cluster, timeline, size)?;
        let end = cluster.timeline_end(timeline, size)?;
        if !scan.partials.is_empty() {
            return Err(Error::TimelineEnded {
                cluster: cluster.name().to_string(),
                timeline,
            });
        }
        let end = match end {
            None => {
                if start.segment_offset(size) != 0 {
                    return Err(Error::NotSegmentStart {
                        cluster: cluster.name().to_string(),
                        timeline,
                        start,
                    });
                }
                start
            }
            Some(e) if start > e => {
                return Err(Error::Gap {
                    cluster: cluster.name().to_string(),
                    timeline,
                    end: e,
                    start,
                });
            }
            Some(e) => e,
        };
        let mut open = None;
        if let Some((segno, len)) = current {
            if segno.start_lsn(size).plus(len) != end {
                return Err(Error::Io {
                    action: "resume in-progress segment",
                    path: layout::open_path(cluster.dir(), timeline, segno, size),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "in-progress segment is not the last",
                    ),
                });
            }
            open = Some(reopen_segment(&cluster, timeline, segno, size, len)?);
        }
        Ok(WalWriter {
            cluster,
            timeline,
            size,
            end,
            durable: end,
            open,
            sealer,
        })
    }

    pub fn timeline(&self) -> TimeLineId {
        self.timeline
    }

    /// Everything before this LSN has been written (not necessarily synced).
    pub fn end(&self) -> Lsn {
        self.end
    }

    /// Everything before this LSN is durable.
    pub fn durable(&self) -> Lsn {
        self.durable
    }

    /// Appends WAL that starts at `lsn`. Bytes the archive already holds are skipped; a
    /// start beyond the archive's end is a gap and refused.
    pub fn write(&mut self, lsn: Lsn, data: &[u8]) -> Result<(), Error> {
        self.sealer.check()?;
        let stream_end = lsn.plus(data.len() as u64);
        if stream_end <= self.end {
            return Ok(());
        }
        if lsn > self.end {
            return Err(Error::Gap {
                cluster: self.cluster.name().to_string(),
                timeline: self.timeline,
                end: self.end,
                start: lsn,
            });
        }
        let mut data = &data[(self.end.0 - lsn.0) as usize..];
        while !data.is_empty() {
            let segno = self.end.segment_no(self.size);
            let offset = self.end.segment_offset(self.size);
            if self.open.as_ref().is_none_or(|o| o.segno != segno) {
                debug_assert_eq!(offset, 0, "a new segment starts at its beginning");
                self.open = Some(create_segment(
                    &self.cluster,
                    self.timeline,
                    segno,
                    self.size,
                )?);
            }
            let seg = self.open.as_mut().expect("segment opened above");
            let n = data
                .len()
                .min((self.size.bytes() - offset) as usize)
                .min(MAX_STREAM_FRAME);
            let mut frame = Vec::with_capacity(n / 2 + 64);
            seg.cipher
                .seal_frame(offset, &data[..n], STREAM_LEVEL, &mut frame);
            let path = layout::open_path(self.cluster.dir(), self.timeline, segno, self.size);
            seg.file
                .append(&frame)
                .map_err(io_err("append to in-progress segment", &path))?;
            seg.len += n as u64;
            self.end = self.end.plus(n as u64);
            data = &data[n..];
            if seg.len == self.size.bytes() {
                seg.file
                    .sync()
                    .map_err(io_err("sync in-progress segment", &path))?;
                self.open = None;
                self.sealer.submit(SealJob {
                    cluster: self.cluster.clone(),
                    timeline: self.timeline,
                    segno,
                    size: self.size,
                });
            }
        }
        Ok(())
    }

    /// Makes every write durable and returns the durable end.
    pub fn sync(&mut self) -> Result<Lsn, Error> {
        if let Some(seg) = self.open.as_mut() {
            let path = layout::open_path(self.cluster.dir(), self.timeline, seg.segno, self.size);
            seg.file
                .sync()
                .map_err(io_err("sync in-progress segment", &path))?;
        }
        self.durable = self.end;
        Ok(self.durable)
    }

    /// Records that the timeline ended at `at` (PostgreSQL switched timelines): the last,
    /// incomplete segment becomes `<segment>.partial`.
    pub fn end_timeline(mut self, at: Lsn) -> Result<(), Error> {
        if at != self.end {
            return Err(Error::BadTimelineEnd {
                cluster: self.cluster.name().to_string(),
                timeline: self.timeline,
                at,
                end: self.end,
            });
        }
        self.sync()?;
        if let Some(seg) = self.open.take() {
            drop(seg.file);
            seal_segment(
                &self.cluster,
                self.timeline,
                seg.segno,
                self.size,
                ObjectKind::WalPartial,
            )?;
        }
        self.sealer.flush()
    }
}

/// Completes what a crash interrupted on `timeline`: seals complete `.open` files and
/// removes `.open` files whose sealed segment exists. Returns the in-progress segment and
/// the plaintext length it holds, if any.
pub(crate) fn finish_interrupted_seals(
    cluster: &ClusterWal,
    timeline: TimeLineId,
    size: SegmentSize,
) -> Result<Option<(SegmentNo, u64)>, Error> {
    let scan = layout::scan_timeline(cluster.dir(), timeline, size)?;
    let mut current = None;
    for segno in scan.open {
        if layout::segment_path(cluster.dir(), timeline, segno, size).exists() {
            let p = layout::open_path(cluster.dir(), timeline, segno, size);
            klio_durable::remove_durable(&p)
                .map_err(io_err("remove sealed in-progress file", &p))?;
            continue;
        }
        let path = layout::open_path(cluster.dir(), timeline, segno, size);
        let (frames, valid) = cluster
            .scan_open_file(timeline, segno, size)
            .map_err(|e| e.damaged_open_file(cluster.name(), &path))?;
        refuse_complete_bad_tail(cluster, &path, valid)?;
        let len: u64 = frames.iter().map(|f| u64::from(f.plain_len)).sum();
        if len == size.bytes() {
            seal_segment(cluster, timeline, segno, size, ObjectKind::WalSegment)?;
        } else {
            current = Some((segno, len));
        }
    }
    Ok(current)
}

fn create_segment(
    cluster: &ClusterWal,
    tli: TimeLineId,
    segno: SegmentNo,
    size: SegmentSize,
) -> Result<OpenSegment, Error> {
    let dir = layout::timeline_dir(cluster.dir(), tli);
    klio_durable::create_dir_all_durable(&dir)
        .map_err(io_err("create timeline directory", &dir))?;
    let path = layout::open_path(cluster.dir(), tli, segno, size);
    // A leftover empty or header-less file from a crash is simply replaced.
    let _ = std::fs::remove_file(&path);
    let header = ObjectHeader::new(
        ObjectKind::WalOpen,
        &cluster.object_name(&layout::open_file_name(tli, segno, size)),
    );
    let cipher = FrameCipher::new(cluster.master(), &header);
    let mut file =
        AppendFile::open(&path, 0o600).map_err(io_err("create in-progress segment", &path))?;
    file.append(cipher.header_bytes())
        .map_err(io_err("write in-progress segment", &path))?;
    Ok(OpenSegment {
        segno,
        file,
        cipher,
        len: 0,
    })
}

fn reopen_segment(
    cluster: &ClusterWal,
    tli: TimeLineId,
    segno: SegmentNo,
    size: SegmentSize,
    len: u64,
) -> Result<OpenSegment, Error> {
    if len == 0 {
        return create_segment(cluster, tli, segno, size);
    }
    let path = layout::open_path(cluster.dir(), tli, segno, size);
    let (_, valid, cipher) = cluster
        .scan_open_with_cipher(tli, segno, size)
        .map_err(|e| e.damaged_open_file(cluster.name(), &path))?;
    let Some(cipher) = cipher else {
        return create_segment(cluster, tli, segno, size);
    };
    let mut file =
        AppendFile::open(&path, 0o600).map_err(io_err("open in-progress segment", &path))?;
    if file.len() != valid {
        refuse_complete_bad_tail(cluster, &path, valid)?;
        tracing::warn!(path = %path.display(), valid, found = file.len(), "dropping a torn, unacknowledged tail");
        file.truncate(valid)
            .map_err(io_err("truncate in-progress segment", &path))?;
    }
    Ok(OpenSegment {
        segno,
        file,
        cipher,
        len,
    })
}

/// A write cut short (a crash, a full disk) leaves a last frame shorter than its length
/// prefix says: that tail was never acknowledged and is dropped. A last frame that is
/// complete but does not authenticate was written in full, and may have been acknowledged:
/// it is damage, and refused rather than dropped.
fn refuse_complete_bad_tail(cluster: &ClusterWal, path: &Path, valid: u64) -> Result<(), Error> {
    /// ct_len, flags, offset, plain_len, nonce.
    const FRAME_HEADER: u64 = 4 + 1 + 8 + 4 + 12;
    let len = std::fs::metadata(path)
        .map_err(io_err("read in-progress segment", path))?
        .len();
    if len <= valid {
        return Ok(());
    }
    let bytes = std::fs::read(path).map_err(io_err("read in-progress segment", path))?;
    let tail = bytes.get(valid as usize..).unwrap_or_default();
    let Some(ct_len) = tail
        .get(..4)
        .map(|b| u64::from(u32::from_be_bytes(b.try_into().expect("4 bytes"))))
    else {
        return Ok(());
    };
    if tail.len() as u64 >= FRAME_HEADER + ct_len {
        return Err(Error::Damaged {
            cluster: cluster.name().to_string(),
            path: path.to_path_buf(),
            reason: format!(
                "its last frame (at byte {valid}, {} bytes) is complete but does not authenticate",
                tail.len()
            ),
        });
    }
    Ok(())
}

/// Rewrites `<segment>.open` as a sealed segment (or `.partial`) and removes the `.open`.
fn seal_segment(
    cluster: &ClusterWal,
    tli: TimeLineId,
    segno: SegmentNo,
    size: SegmentSize,
    kind: ObjectKind,
) -> Result<(), Error> {
    let open = layout::open_path(cluster.dir(), tli, segno, size);
    let (frames, _) = cluster
        .scan_open_file(tli, segno, size)
        .map_err(|e| e.damaged_open_file(cluster.name(), &open))?;
    let open_name = cluster.object_name(&layout::open_file_name(tli, segno, size));
    let mut plain = Vec::with_capacity(size.bytes() as usize);
    for f in &frames {
        plain.extend_from_slice(
            &f.plaintext(&open_name)
                .map_err(|e| Error::from(e).damaged_open_file(cluster.name(), &open))?,
        );
    }
    let (file_name, path) = match kind {
        ObjectKind::WalPartial => (
            WalFileName::Partial {
                timeline: tli,
                segno,
                size,
            }
            .to_string(),
            layout::partial_path(cluster.dir(), tli, segno, size),
        ),
        _ => (
            WalFileName::segment(tli, segno, size).to_string(),
            layout::segment_path(cluster.dir(), tli, segno, size),
        ),
    };
    let sealed = klio_crypto::seal_object(
        cluster.master(),
        kind,
        &cluster.object_name(&file_name),
        &plain,
        Some(cluster.level()),
    );
    klio_durable::write_atomic(&path, &sealed, 0o600)
        .map_err(io_err("write sealed segment", &path))?;
    klio_durable::remove_durable(&open).map_err(io_err("remove in-progress segment", &open))
}

pub(crate) struct SealJob {
    cluster: ClusterWal,
    timeline: TimeLineId,
    segno: SegmentNo,
    size: SegmentSize,
}

enum Job {
    Seal(SealJob),
    Flush(mpsc::Sender<()>),
}

/// The background thread of one cluster that seals its completed segments, so that
/// acknowledgements never wait for recompression. Bounded: a writer that outpaces it waits
/// (only for its own cluster's seals).
#[derive(Clone)]
pub struct SealQueue {
    tx: SyncSender<Job>,
    failure: Arc<Mutex<Option<Error>>>,
}

impl SealQueue {
    pub(crate) fn start(cluster: &str) -> SealQueue {
        let (tx, rx) = mpsc::sync_channel::<Job>(4);
        let failure = Arc::new(Mutex::new(None));
        let f = failure.clone();
        std::thread::Builder::new()
            .name(format!("klio-seal-{cluster}"))
            .spawn(move || run_sealer(rx, f))
            .expect("spawn a WAL sealer thread");
        SealQueue { tx, failure }
    }

    fn submit(&self, job: SealJob) {
        // The thread lives as long as any sender; a send can only fail if it panicked, and
        // then the `.open` file stays and is sealed on the next writer start.
        let _ = self.tx.send(Job::Seal(job));
    }

    /// Reports (once) a seal of this cluster that failed since the last check.
    fn check(&self) -> Result<(), Error> {
        match self.failure.lock().map(|mut f| f.take()) {
            Ok(Some(e)) => Err(Error::SealFailed(Box::new(e))),
            _ => Ok(()),
        }
    }

    /// Waits until every queued seal is done; reports an earlier failure.
    pub fn flush(&self) -> Result<(), Error> {
        self.drain();
        self.check()
    }

    /// Waits until every queued seal is done.
    pub(crate) fn drain(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Job::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

fn run_sealer(rx: Receiver<Job>, failure: Arc<Mutex<Option<Error>>>) {
    for job in rx {
        match job {
            Job::Flush(done) => {
                let _ = done.send(());
            }
            Job::Seal(j) => {
                if let Err(e) = seal_segment(
                    &j.cluster,
                    j.timeline,
                    j.segno,
                    j.size,
                    ObjectKind::WalSegment,
                ) {
                    tracing::error!(cluster = j.cluster.name(), error = %e, "sealing a completed segment failed; it stays as an in-progress file and is sealed when the next stream of the cluster starts");
                    j.cluster.note_damage(&e);
                    if let Ok(mut f) = failure.lock() {
                        *f = Some(e);
                    }
                }
            }
        }
    }
}
