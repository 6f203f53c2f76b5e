//! The gRPC WAL service: hello, durable streaming with acknowledgements, get, list.
//!
//! One writer per cluster at a time. A new stream for a cluster preempts the previous one
//! (a streamer that reconnects after a crash must not wait for the server to notice that
//! the old connection is dead); the old stream's writer stops before the new one opens.
//! Writes run on a blocking thread that applies every request already queued, fsyncs once
//! (group commit) and only then sends the acknowledgement.
//!
//! Faults and limits are per cluster: a cluster whose archive is damaged gets `DATA_LOSS`
//! naming the file (see [`ClusterWal::check_usable`]), a cluster over one of its
//! [`WalLimits`] gets `RESOURCE_EXHAUSTED` naming the limit; other clusters go on.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream};
use klio_pg::{Lsn, SegmentSize, TimeLineId};
use klio_proto::wal::v1 as pb;
use klio_proto::wal::v1::wal_server::Wal;
use klio_wal_store::{ClusterWal, WalStore};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::Context;
use crate::status::store_status;

/// Largest WAL payload accepted per request (the client sends at most 4 MiB).
pub const MAX_MESSAGE: usize = klio_proto::limits::MAX_WAL_MESSAGE;

/// Per-cluster limits of the WAL service; each is a `klio server` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalLimits {
    /// `Get` streams of one cluster open at once (`--wal-max-get-streams`). Each pins the
    /// file it serves in memory until the client has read it.
    pub max_get_streams: usize,
    /// Largest history or `.backup` file one `PutFile` stores (`--wal-max-put-file-bytes`).
    pub max_put_file_bytes: usize,
    /// History and `.backup` files one cluster's archive holds (`--wal-max-put-files`); a
    /// `PutFile` of a file already stored does not count.
    pub max_put_files: usize,
}

impl Default for WalLimits {
    fn default() -> WalLimits {
        WalLimits {
            max_get_streams: 32,
            max_put_file_bytes: 1 << 20,
            max_put_files: 10_000,
        }
    }
}

struct ClusterSlot {
    lock: Arc<tokio::sync::Mutex<()>>,
    current: CancellationToken,
    flush: Arc<FlushRequests>,
}

/// Requests to make a cluster's received WAL durable now (`ListRequest.flush`), shared by
/// the cluster's successive streams.
#[derive(Default)]
struct FlushRequests {
    /// A request is waiting (a permit when no stream listens at that moment).
    wanted: tokio::sync::Notify,
    /// Told after every fsync and every request found nothing to do.
    done: tokio::sync::Notify,
    /// Streams of the cluster being served (0 or 1, briefly 2 during a takeover).
    streams: std::sync::atomic::AtomicUsize,
}

/// The longest a `List` with `flush` waits for the stream's fsync.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// The WAL service; cheap to clone.
#[derive(Clone)]
pub struct WalService {
    ctx: Context,
    slots: Arc<Mutex<HashMap<String, ClusterSlot>>>,
    shutdown: CancellationToken,
    limits: WalLimits,
    /// Per cluster: permits for open `Get` streams.
    gets: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl WalService {
    pub fn new(ctx: Context, shutdown: CancellationToken, limits: WalLimits) -> WalService {
        WalService {
            ctx,
            slots: Arc::default(),
            shutdown,
            limits,
            gets: Arc::default(),
        }
    }

    /// A permit for one more `Get` stream of `cluster`, or `RESOURCE_EXHAUSTED`.
    fn get_permit(&self, cluster: &str) -> Result<OwnedSemaphorePermit, Status> {
        let max = self.limits.max_get_streams;
        let sem = self
            .gets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cluster.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(max)))
            .clone();
        sem.try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "cluster \"{cluster}\" already has {max} WAL Get streams open, the limit --wal-max-get-streams\nHINT: let them finish (or lower wal-get --prefetch), or raise --wal-max-get-streams (KLIO_WAL_MAX_GET_STREAMS)"
            ))
        })
    }

    /// Refuses a `PutFile` of `len` bytes over `--wal-max-put-file-bytes`.
    fn check_put_file_size(&self, cluster: &str, name: &str, len: usize) -> Result<(), Status> {
        let max = self.limits.max_put_file_bytes;
        if len > max {
            return Err(Status::resource_exhausted(format!(
                "file \"{name}\" of cluster \"{cluster}\" has {len} bytes, more than the limit --wal-max-put-file-bytes ({max})\nHINT: history and .backup files are small; if this one is genuine, raise --wal-max-put-file-bytes (KLIO_WAL_MAX_PUT_FILE_BYTES)"
            )));
        }
        Ok(())
    }

    /// Tier 1's archive; a read-only server has none and refuses `what`.
    fn store(&self, what: &str) -> Result<&WalStore, Status> {
        self.ctx
            .wal
            .as_ref()
            .ok_or_else(|| crate::context::read_only_status(what))
    }

    fn authorize<T>(req: &Request<T>, cluster: &str) -> Result<(), Status> {
        let principal = klio_tls::principal_of(req)?;
        klio_tls::authorize_cluster(&principal, cluster)
    }

    /// Authorizes the caller for `cluster` and returns its Tier 1 archive for a write.
    fn cluster_for<T>(&self, req: &Request<T>, cluster: &str) -> Result<ClusterWal, Status> {
        self.ctx.writable("WAL")?;
        Self::authorize(req, cluster)?;
        self.store("WAL")?.cluster(cluster).map_err(store_status)
    }

    /// Whether reads may fall back to Tier 2.
    fn tier2_reads(&self, asked: bool) -> bool {
        self.ctx.tier2.is_some() && (asked || self.ctx.read_only)
    }

    /// Preempts the current writer of `cluster` and returns the lock, the token of the
    /// new writer and the cluster's flush requests.
    fn take_over(
        &self,
        cluster: &str,
    ) -> (
        Arc<tokio::sync::Mutex<()>>,
        CancellationToken,
        Arc<FlushRequests>,
    ) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let token = self.shutdown.child_token();
        let slot = slots
            .entry(cluster.to_string())
            .or_insert_with(|| ClusterSlot {
                lock: Arc::default(),
                current: CancellationToken::new(),
                flush: Arc::default(),
            });
        slot.current.cancel();
        slot.current = token.clone();
        (slot.lock.clone(), token, slot.flush.clone())
    }

    /// Asks the stream of `cluster`, if one is being served, to fsync what it received,
    /// and waits for that (at most [`FLUSH_WAIT`]).
    async fn flush_stream(&self, cluster: &str) {
        let flush = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.get(cluster) {
                Some(slot) => slot.flush.clone(),
                None => return,
            }
        };
        if flush.streams.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return;
        }
        let done = flush.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        flush.wanted.notify_one();
        let _ = tokio::time::timeout(FLUSH_WAIT, done).await;
    }
}

/// The most WAL one write batch takes before it is written out.
const MAX_BATCH: usize = 16 << 20;

fn request_len(r: &pb::StreamRequest) -> usize {
    match &r.msg {
        Some(pb::stream_request::Msg::Data(d)) => d.data.len(),
        _ => 0,
    }
}

/// How long received WAL may stay un-fsynced when no synchronous standby waits for it.
/// Batching fsyncs keeps the archive from competing with PostgreSQL's own WAL flushes;
/// nothing is acknowledged (so no slot advances) before the fsync.
pub const ASYNC_FLUSH_INTERVAL: Duration = Duration::from_millis(500);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Wal for WalService {
    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        let cluster = self.cluster_for(&req, &req.get_ref().cluster)?;
        let r = req.into_inner();
        let size = SegmentSize::new(r.segment_size)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.ctx
            .declare_tier2_backup(&r.cluster, r.tier2_backup, true)?;
        let status = tokio::task::spawn_blocking(move || {
            cluster.check_usable()?;
            cluster.register(r.system_id, size)?;
            cluster.status()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(store_status)?;
        Ok(Response::new(match status.latest {
            Some((tli, end)) => pb::HelloResponse {
                has_wal: true,
                timeline: tli.0,
                end_lsn: end.0,
                timeline_closed: status.latest_closed,
            },
            None => pb::HelloResponse::default(),
        }))
    }

    type StreamStream = BoxStream<pb::StreamResponse>;

    async fn stream(
        &self,
        req: Request<Streaming<pb::StreamRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        self.ctx.writable("WAL")?;
        let principal = klio_tls::principal_of(&req)?;
        let mut incoming = req.into_inner();
        let open = match incoming.message().await? {
            Some(pb::StreamRequest {
                msg: Some(pb::stream_request::Msg::Open(o)),
            }) => o,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a WAL stream must be StreamOpen",
                ));
            }
        };
        klio_tls::authorize_cluster(&principal, &open.cluster)?;
        let cluster = self
            .store("WAL")?
            .cluster(&open.cluster)
            .map_err(store_status)?;
        self.ctx
            .declare_tier2_backup(&open.cluster, open.tier2_backup, true)?;
        let meta = {
            let c = cluster.clone();
            tokio::task::spawn_blocking(move || {
                c.check_usable()?;
                c.require_meta()
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(store_status)?
        };
        if meta.system_id != open.system_id {
            return Err(store_status(klio_wal_store::Error::SystemIdMismatch {
                cluster: open.cluster.clone(),
                stored: meta.system_id,
                offered: open.system_id,
            }));
        }
        let timeline = TimeLineId(open.timeline);
        let start = Lsn(open.start_lsn);
        let (lock, token, flush) = self.take_over(&open.cluster);
        let metrics = self.ctx.metrics.clone();
        let (ack_tx, ack_rx) = mpsc::channel::<Result<pb::StreamResponse, Status>>(64);
        tracing::info!(cluster = %open.cluster, %timeline, %start, "WAL stream opened");
        tokio::spawn(async move {
            // Wait for the previous writer of this cluster (preempted above) to stop.
            let _guard = tokio::select! {
                g = lock.lock_owned() => g,
                _ = token.cancelled() => return,
            };
            let name = cluster.name().to_string();
            flush
                .streams
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let served = serve_stream(
                cluster, timeline, start, incoming, &token, &ack_tx, &metrics, &flush,
            )
            .await;
            flush
                .streams
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            metrics.stream_closed(&name);
            if let Err(status) = served {
                tracing::warn!(cluster = %name, error = %status.message(), "WAL stream failed");
                let _ = ack_tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_rx))))
    }

    async fn put_file(
        &self,
        req: Request<pb::PutFileRequest>,
    ) -> Result<Response<pb::PutFileResponse>, Status> {
        let cluster = self.cluster_for(&req, &req.get_ref().cluster)?;
        let r = req.into_inner();
        self.check_put_file_size(&r.cluster, &r.name, r.content.len())?;
        let max_files = self.limits.max_put_files;
        let created = tokio::task::spawn_blocking(move || -> Result<bool, Status> {
            cluster.check_usable().map_err(store_status)?;
            let (count, exists) = cluster.put_files(&r.name).map_err(store_status)?;
            if !exists && count >= max_files {
                return Err(Status::resource_exhausted(format!(
                    "the archive of cluster \"{}\" already holds {count} history and .backup files, the limit --wal-max-put-files; \"{}\" is refused\nHINT: retention removes old .backup files; or raise --wal-max-put-files (KLIO_WAL_MAX_PUT_FILES)",
                    r.cluster, r.name
                )));
            }
            cluster.put_file(&r.name, &r.content).map_err(store_status)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::PutFileResponse { created }))
    }

    type GetStream = BoxStream<pb::GetResponse>;

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        Self::authorize(&req, &req.get_ref().cluster)?;
        let r = req.into_inner();
        let name = r.name.clone();
        // Held until the response stream is dropped (sent completely, or the client left).
        let permit = self.get_permit(&r.cluster)?;
        let mut found = None;
        if let Some(store) = &self.ctx.wal {
            let cluster = store.cluster(&r.cluster).map_err(store_status)?;
            let (n, partial) = (r.name.clone(), r.allow_partial);
            let tier1 = tokio::task::spawn_blocking(move || {
                cluster.check_usable()?;
                let meta = cluster.require_meta()?;
                cluster
                    .read(&n, partial)
                    .map(|d| d.map(|d| (d, meta.segment_size)))
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
            match tier1 {
                Ok(d) => found = d,
                // Tier 2 may know a cluster Tier 1 has lost (its volume was replaced).
                Err(klio_wal_store::Error::UnknownCluster(_))
                    if self.tier2_reads(r.tier2_recovery) => {}
                Err(e) => return Err(store_status(e)),
            }
        }
        if found.is_none() && self.tier2_reads(r.tier2_recovery) {
            let t2 = self.ctx.tier2().await?;
            let (c, n, partial) = (r.cluster.clone(), r.name.clone(), r.allow_partial);
            found = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let Some(meta) = t2.meta(&c)? else {
                    return Ok(None);
                };
                Ok(t2.read(&c, &n, partial)?.map(|d| (d, meta.segment_size)))
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(tier2_status)?;
        }
        let (data, segment_size) = found.ok_or_else(|| {
            Status::not_found(format!("WAL file \"{name}\" is not in the archive"))
        })?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let header = pb::GetHeader {
                total_len: data.total_len,
                blake3: bytes::Bytes::copy_from_slice(&data.blake3),
                partial: data.partial,
                segment_size,
            };
            if tx
                .send(Ok(pb::GetResponse {
                    msg: Some(pb::get_response::Msg::Header(header)),
                }))
                .await
                .is_err()
            {
                return;
            }
            for f in data.frames {
                let chunk = pb::GetChunk {
                    offset: f.offset,
                    plain_len: f.plain_len,
                    zstd: f.compressed,
                    payload: f.payload.into(),
                };
                if tx
                    .send(Ok(pb::GetResponse {
                        msg: Some(pb::get_response::Msg::Chunk(chunk)),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(Permitted {
            inner: ReceiverStream::new(rx),
            _permit: permit,
        })))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        Self::authorize(&req, &req.get_ref().cluster)?;
        let r = req.into_inner();
        if r.flush && self.ctx.wal.is_some() {
            self.flush_stream(&r.cluster).await;
        }
        let mut resp = None;
        if let Some(store) = &self.ctx.wal {
            let cluster = store.cluster(&r.cluster).map_err(store_status)?;
            let tier1 = tokio::task::spawn_blocking(
                move || -> Result<pb::ListResponse, klio_wal_store::Error> {
                    cluster.check_usable()?;
                    let meta = cluster.require_meta()?;
                    let status = cluster.status()?;
                    let files = cluster.list_files()?;
                    let (tli, end) = status.latest.map(|(t, e)| (t.0, e.0)).unwrap_or((0, 0));
                    Ok(pb::ListResponse {
                        system_id: meta.system_id,
                        segment_size: meta.segment_size,
                        has_wal: status.latest.is_some(),
                        timeline: tli,
                        end_lsn: end,
                        files,
                    })
                },
            )
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
            match tier1 {
                Ok(l) => resp = Some(l),
                Err(klio_wal_store::Error::UnknownCluster(_))
                    if self.tier2_reads(r.tier2_recovery) => {}
                Err(e) => return Err(store_status(e)),
            }
        }
        if self.tier2_reads(r.tier2_recovery) {
            let t2 = self.ctx.tier2().await?;
            let c = r.cluster.clone();
            let tier2 = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                Ok(match t2.meta(&c)? {
                    Some(meta) => Some((meta, t2.files(&c)?)),
                    None => None,
                })
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(tier2_status)?;
            if let Some((meta, files)) = tier2 {
                let l = resp.get_or_insert_with(|| pb::ListResponse {
                    system_id: meta.system_id,
                    segment_size: meta.segment_size,
                    ..Default::default()
                });
                let mut all: std::collections::BTreeSet<String> = l.files.drain(..).collect();
                all.extend(files);
                l.files = all.into_iter().collect();
                if !l.has_wal {
                    // Where Tier 2's WAL ends: the end of its newest complete segment.
                    let size = SegmentSize::new(meta.segment_size)
                        .map_err(|e| Status::internal(e.to_string()))?;
                    let newest = l
                        .files
                        .iter()
                        .filter_map(|f| match klio_pg::WalFileName::parse(f, size) {
                            Ok(klio_pg::WalFileName::Segment {
                                timeline, segno, ..
                            }) => Some((timeline.0, segno)),
                            _ => None,
                        })
                        .max();
                    if let Some((tli, segno)) = newest {
                        l.has_wal = true;
                        l.timeline = tli;
                        l.end_lsn = segno.next().start_lsn(size).0;
                    }
                }
            }
        }
        let resp = resp.ok_or_else(|| {
            store_status(klio_wal_store::Error::UnknownCluster(r.cluster.clone()))
        })?;
        Ok(Response::new(resp))
    }
}

/// A response stream that holds a limit's permit for as long as it lives.
struct Permitted<S> {
    inner: S,
    _permit: OwnedSemaphorePermit,
}

impl<S: Stream + Unpin> Stream for Permitted<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// A Tier 2 failure as a status: an object that does not open (authentication, format) is
/// data loss,
/// anything else (S3 unreachable, refused) unavailability.
fn tier2_status(e: anyhow::Error) -> Status {
    let corrupt = e.chain().any(|c| {
        c.is::<klio_crypto::Error>()
            || matches!(
                c.downcast_ref::<klio_wal_store::Error>(),
                Some(klio_wal_store::Error::Crypto(_))
            )
    });
    let msg = format!("{e:#}");
    if corrupt {
        Status::data_loss(msg)
    } else {
        Status::unavailable(msg)
    }
}

/// Applies a stream's requests in batches: everything already received is written, then
/// (when someone waits, or the flush is due) fsynced, then acknowledged. The blocking file
/// work runs in `block_in_place`, on the task's own thread, so a synchronous commit costs
/// no extra thread hand-offs.
#[allow(clippy::too_many_arguments)]
async fn serve_stream(
    cluster: ClusterWal,
    timeline: TimeLineId,
    start: Lsn,
    mut incoming: Streaming<pb::StreamRequest>,
    token: &CancellationToken,
    ack_tx: &mpsc::Sender<Result<pb::StreamResponse, Status>>,
    metrics: &crate::metrics::Metrics,
    flush: &FlushRequests,
) -> Result<(), Status> {
    let ack = |flush: Lsn, closed: bool| pb::StreamResponse {
        flush_lsn: flush.0,
        timeline: timeline.0,
        timeline_closed: closed,
    };
    let mut writer =
        tokio::task::block_in_place(|| cluster.writer(timeline, start)).map_err(store_status)?;
    // The first acknowledgement tells the client where the archive really ends.
    if ack_tx.send(Ok(ack(writer.durable(), false))).await.is_err() {
        return Ok(());
    }
    let name = cluster.name().to_string();
    metrics.stream_opened(&name, writer.durable());
    let mut last_sync = Instant::now();
    loop {
        let pending = writer.end() > writer.durable();
        let due = tokio::time::Instant::from_std(last_sync + ASYNC_FLUSH_INTERVAL);
        let msg = tokio::select! {
            _ = token.cancelled() => {
                tracing::info!(cluster = cluster.name(), "WAL stream preempted by a newer stream");
                break;
            }
            // The periodic flush is due, or someone waits for the archive.
            _ = tokio::time::sleep_until(due), if pending => None,
            _ = flush.wanted.notified() => None,
            m = incoming.message() => Some(m),
        };
        let Some(msg) = msg else {
            if pending {
                let durable =
                    tokio::task::block_in_place(|| writer.sync()).map_err(store_status)?;
                metrics.wal_durable(&name, durable);
                last_sync = Instant::now();
                if ack_tx.send(Ok(ack(durable, false))).await.is_err() {
                    break;
                }
            }
            flush.done.notify_waiters();
            continue;
        };
        let first = match msg {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::info!(cluster = cluster.name(), error = %e, "WAL stream ended by the client");
                break;
            }
        };
        // What is already received joins this batch, up to MAX_BATCH bytes (taking more
        // would let a catching-up client stream into memory unchecked).
        let mut batch_bytes = request_len(&first);
        let mut batch = vec![first];
        while batch_bytes < MAX_BATCH
            && let Some(Ok(Some(m))) = incoming.message().now_or_never()
        {
            batch_bytes += request_len(&m);
            batch.push(m);
        }
        let mut flush_now = false;
        let mut end_at = None;
        let (mut received, mut primary) = (0u64, Lsn(0));
        for req in &batch {
            match &req.msg {
                Some(pb::stream_request::Msg::Data(d)) => {
                    received += d.data.len() as u64;
                    primary = primary.max(Lsn(d.primary_end_lsn));
                    if Lsn(d.start_lsn).checked_plus(d.data.len() as u64).is_none() {
                        return Err(Status::invalid_argument(format!(
                            "WAL data at {} with {} bytes ends past the last possible LSN",
                            Lsn(d.start_lsn),
                            d.data.len()
                        )));
                    }
                    flush_now |= d.flush_now
                }
                Some(pb::stream_request::Msg::EndTimeline(e)) => end_at = Some(Lsn(e.end_lsn)),
                _ => {
                    return Err(Status::invalid_argument(
                        "unexpected message in a WAL stream",
                    ));
                }
            }
        }
        metrics.wal_received(&name, received, primary, flush_now);
        let sync = flush_now || end_at.is_some() || last_sync.elapsed() >= ASYNC_FLUSH_INTERVAL;
        let durable =
            tokio::task::block_in_place(|| -> Result<Option<Lsn>, klio_wal_store::Error> {
                for req in batch {
                    if let Some(pb::stream_request::Msg::Data(d)) = req.msg {
                        writer.write(Lsn(d.start_lsn), &d.data)?;
                    }
                }
                if sync {
                    writer.sync().map(Some)
                } else {
                    Ok(None)
                }
            })
            .map_err(store_status)?;
        if let Some(at) = end_at {
            tokio::task::block_in_place(|| writer.end_timeline(at)).map_err(store_status)?;
            metrics.wal_durable(&name, at);
            tracing::info!(cluster = cluster.name(), %timeline, end = %at, "timeline closed");
            let _ = ack_tx.send(Ok(ack(at, true))).await;
            return Ok(());
        }
        if let Some(durable) = durable {
            metrics.wal_durable(&name, durable);
            last_sync = Instant::now();
            if ack_tx.send(Ok(ack(durable, false))).await.is_err() {
                break;
            }
            flush.done.notify_waiters();
        }
    }
    // The client went away or was preempted: make what was received durable (it was not
    // acknowledged, but there is no reason to lose it).
    if let Err(e) = tokio::task::block_in_place(|| writer.sync()) {
        tracing::warn!(cluster = cluster.name(), error = %e, "final sync failed");
    }
    Ok(())
}
