//! The gRPC WAL service: hello, durable streaming with acknowledgements, get, list.
//!
//! One writer per cluster at a time. A new stream for a cluster preempts the previous one
//! (a streamer that reconnects after a crash must not wait for the server to notice that
//! the old connection is dead); the old stream's writer stops before the new one opens.
//! Writes run on a blocking thread that applies every request already queued, fsyncs once
//! (group commit) and only then sends the acknowledgement.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use klio_pg::{Lsn, SegmentSize, TimeLineId};
use klio_proto::wal::v1 as pb;
use klio_proto::wal::v1::wal_server::Wal;
use klio_wal_store::{ClusterWal, WalStore};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::status::store_status;

/// Largest WAL payload accepted per request (the client sends at most 4 MiB).
pub const MAX_MESSAGE: usize = 32 << 20;

struct ClusterSlot {
    lock: Arc<Mutex<()>>,
    current: CancellationToken,
}

/// The WAL service; cheap to clone.
#[derive(Clone)]
pub struct WalService {
    store: WalStore,
    slots: Arc<Mutex<HashMap<String, ClusterSlot>>>,
    shutdown: CancellationToken,
}

impl WalService {
    pub fn new(store: WalStore, shutdown: CancellationToken) -> WalService {
        WalService {
            store,
            slots: Arc::default(),
            shutdown,
        }
    }

    /// Authorizes the caller for `cluster` and returns its archive.
    fn cluster_for<T>(&self, req: &Request<T>, cluster: &str) -> Result<ClusterWal, Status> {
        let principal = klio_tls::principal_of(req)?;
        klio_tls::authorize_cluster(&principal, cluster)?;
        self.store.cluster(cluster).map_err(store_status)
    }

    /// Preempts the current writer of `cluster` and returns the lock and the token of the
    /// new writer.
    fn take_over(&self, cluster: &str) -> (Arc<Mutex<()>>, CancellationToken) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let token = self.shutdown.child_token();
        let slot = slots
            .entry(cluster.to_string())
            .or_insert_with(|| ClusterSlot {
                lock: Arc::default(),
                current: CancellationToken::new(),
            });
        slot.current.cancel();
        slot.current = token.clone();
        (slot.lock.clone(), token)
    }
}

enum Cmd {
    Data {
        lsn: Lsn,
        data: bytes::Bytes,
        flush_now: bool,
    },
    EndTimeline(Lsn),
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
        let status = tokio::task::spawn_blocking(move || {
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
        let cluster = self.store.cluster(&open.cluster).map_err(store_status)?;
        let meta = {
            let c = cluster.clone();
            tokio::task::spawn_blocking(move || c.require_meta())
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
        let (lock, token) = self.take_over(&open.cluster);
        let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>(64);
        let (ack_tx, ack_rx) = mpsc::channel::<Result<pb::StreamResponse, Status>>(64);
        let name = open.cluster.clone();
        tracing::info!(cluster = %name, %timeline, %start, "WAL stream opened");

        let writer_token = token.clone();
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            run_writer(
                cluster,
                timeline,
                start,
                lock,
                writer_token,
                cmd_rx,
                ack_tx,
                rt,
            )
        });

        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = token.cancelled() => break,
                    m = incoming.message() => m,
                };
                let cmd = match msg {
                    Ok(Some(pb::StreamRequest {
                        msg: Some(pb::stream_request::Msg::Data(d)),
                    })) => Cmd::Data {
                        lsn: Lsn(d.start_lsn),
                        data: d.data,
                        flush_now: d.flush_now,
                    },
                    Ok(Some(pb::StreamRequest {
                        msg: Some(pb::stream_request::Msg::EndTimeline(e)),
                    })) => Cmd::EndTimeline(Lsn(e.end_lsn)),
                    Ok(Some(_)) => {
                        tracing::warn!(cluster = %name, "unexpected message in WAL stream");
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(cluster = %name, error = %e, "WAL stream ended by the client");
                        break;
                    }
                };
                if cmd_tx.send(cmd).await.is_err() {
                    break;
                }
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
        let created = tokio::task::spawn_blocking(move || cluster.put_file(&r.name, &r.content))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(store_status)?;
        Ok(Response::new(pb::PutFileResponse { created }))
    }

    type GetStream = BoxStream<pb::GetResponse>;

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        let cluster = self.cluster_for(&req, &req.get_ref().cluster)?;
        let r = req.into_inner();
        let name = r.name.clone();
        let found = tokio::task::spawn_blocking(move || {
            let meta = cluster.require_meta()?;
            cluster
                .read(&r.name, r.allow_partial)
                .map(|d| (d, meta.segment_size))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(store_status)?;
        let (data, segment_size) = match found {
            (Some(d), s) => (d, s),
            (None, _) => {
                return Err(Status::not_found(format!(
                    "WAL file \"{name}\" is not in the archive"
                )));
            }
        };
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
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let cluster = self.cluster_for(&req, &req.get_ref().cluster)?;
        let resp = tokio::task::spawn_blocking(
            move || -> Result<pb::ListResponse, klio_wal_store::Error> {
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
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(store_status)?;
        Ok(Response::new(resp))
    }
}

/// The blocking side of a stream: applies queued writes, fsyncs, acknowledges.
#[allow(clippy::too_many_arguments)]
fn run_writer(
    cluster: ClusterWal,
    timeline: TimeLineId,
    start: Lsn,
    lock: Arc<Mutex<()>>,
    token: CancellationToken,
    mut cmd_rx: mpsc::Receiver<Cmd>,
    ack_tx: mpsc::Sender<Result<pb::StreamResponse, Status>>,
    rt: tokio::runtime::Handle,
) {
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    if token.is_cancelled() {
        return;
    }
    let fail = |e: klio_wal_store::Error| {
        tracing::warn!(cluster = cluster.name(), error = %e, "WAL stream failed");
        let _ = ack_tx.blocking_send(Err(store_status(e)));
    };
    let mut writer = match cluster.writer(timeline, start) {
        Ok(w) => w,
        Err(e) => return fail(e),
    };
    let ack = |flush: Lsn, closed: bool| pb::StreamResponse {
        flush_lsn: flush.0,
        timeline: timeline.0,
        timeline_closed: closed,
    };
    // The first acknowledgement tells the client where the archive really ends.
    if ack_tx
        .blocking_send(Ok(ack(writer.durable(), false)))
        .is_err()
    {
        return;
    }
    // fsync, then acknowledge; false when the stream is over (client gone or error sent).
    let sync_and_ack =
        |writer: &mut klio_wal_store::WalWriter, last_sync: &mut Instant| match writer.sync() {
            Ok(durable) => {
                *last_sync = Instant::now();
                ack_tx.blocking_send(Ok(ack(durable, false))).is_ok()
            }
            Err(e) => {
                fail(e);
                false
            }
        };
    let mut last_sync = Instant::now();
    loop {
        // With unsynced WAL and nobody waiting, wait for more only until the flush is due.
        let pending = writer.end() > writer.durable();
        let first = if pending {
            let due = ASYNC_FLUSH_INTERVAL.saturating_sub(last_sync.elapsed());
            match rt.block_on(tokio::time::timeout(due, cmd_rx.recv())) {
                Ok(c) => c,
                Err(_elapsed) => {
                    if !sync_and_ack(&mut writer, &mut last_sync) {
                        return;
                    }
                    continue;
                }
            }
        } else {
            cmd_rx.blocking_recv()
        };
        let Some(first) = first else { break };
        let mut flush_now = false;
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            if token.is_cancelled() {
                tracing::info!(
                    cluster = cluster.name(),
                    "WAL stream preempted by a newer stream"
                );
                return;
            }
            match cmd {
                Cmd::Data {
                    lsn,
                    data,
                    flush_now: f,
                } => {
                    flush_now |= f;
                    if let Err(e) = writer.write(lsn, &data) {
                        return fail(e);
                    }
                }
                Cmd::EndTimeline(at) => {
                    match writer.end_timeline(at) {
                        Ok(()) => {
                            tracing::info!(cluster = cluster.name(), %timeline, end = %at, "timeline closed");
                            let _ = ack_tx.blocking_send(Ok(ack(at, true)));
                        }
                        Err(e) => fail(e),
                    }
                    return;
                }
            }
            next = cmd_rx.try_recv().ok();
        }
        if (flush_now || last_sync.elapsed() >= ASYNC_FLUSH_INTERVAL)
            && !sync_and_ack(&mut writer, &mut last_sync)
        {
            return;
        }
    }
    // The client went away: make what was received durable (it was not acknowledged, but
    // there is no reason to lose it).
    if let Err(e) = writer.sync() {
        tracing::warn!(cluster = cluster.name(), error = %e, "final sync failed");
    }
}
