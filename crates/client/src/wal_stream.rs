//! `klio wal-stream`: the `klio-wal` sidecar role.
//!
//! Streams WAL from the local PostgreSQL over the physical replication protocol to the Klio
//! server, and reports a position to PostgreSQL as *flushed* only once the server has
//! acknowledged it as durably stored. So the replication slot never advances past what is
//! safe, and with `synchronous_standby_names` naming our application_name a commit returns
//! only once its WAL is on the Klio server (RPO zero).
//!
//! One session: wait until PostgreSQL is not in recovery; IDENTIFY_SYSTEM; hello to the
//! server (which records or checks the system identifier and says where the archive
//! ends); upload history files; make sure the slot exists; then stream each timeline from
//! where the archive ends, following timeline switches. Any failure ends the session and a
//! new one starts after a backoff: the server's answer to hello always decides where to
//! resume, so there are neither gaps nor duplicates.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use klio_pg::{Lsn, TimeLineId, TimelineHistory};
use klio_proto::wal::v1 as pb;
use klio_replication::{ReplicationConfig, ReplicationConnection, StreamMessage};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::client::{ClientArgs, status_error};

#[derive(Args, Debug, Clone)]
pub struct WalStreamArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Connection string of the local PostgreSQL (libpq key=value or URL)
    #[arg(long, env = "KLIO_PG_DSN")]
    pub pg_dsn: String,
    /// Physical replication slot (created if missing)
    #[arg(long, env = "KLIO_SLOT", default_value = "klio")]
    pub slot: String,
    /// application_name shown in pg_stat_replication; name it in synchronous_standby_names
    /// for synchronous (RPO zero) archiving
    #[arg(long, env = "KLIO_APPLICATION_NAME", default_value = "klio")]
    pub application_name: String,
    /// Seconds between standby status updates when nothing else happens
    #[arg(long, env = "KLIO_STATUS_INTERVAL", default_value_t = 10)]
    pub status_interval: u64,
    /// Largest batch of WAL sent to the server in one message, in KiB
    #[arg(long, env = "KLIO_MAX_BATCH_KB", default_value_t = 4096)]
    pub max_batch_kb: usize,
}

/// A failure that retrying cannot fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Fatal(String);

fn fatal(msg: impl Into<String>) -> anyhow::Error {
    Fatal(msg.into()).into()
}

pub async fn run(args: WalStreamArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut streamed = false;
        let result = tokio::select! {
            r = session(&args, &cancel, &mut streamed) => r,
            _ = cancel.cancelled() => return Ok(()),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.downcast_ref::<Fatal>().is_some() => return Err(e),
            Err(e) => {
                // A session that got as far as streaming retries quickly again.
                if streamed {
                    backoff = Duration::from_millis(200);
                }
                tracing::warn!(error = format!("{e:#}"), retry_in = ?backoff, "WAL streaming interrupted");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
        }
    }
}

/// Waits until PostgreSQL accepts connections and is not in recovery.
async fn wait_for_primary(args: &WalStreamArgs, cancel: &CancellationToken) -> anyhow::Result<()> {
    let mut logged = false;
    loop {
        let (client, conn) = tokio_postgres::connect(&args.pg_dsn, tokio_postgres::NoTls)
            .await
            .context("connect to PostgreSQL")?;
        let task = tokio::spawn(conn);
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .get(0);
        drop(client);
        let _ = task.await;
        if !in_recovery {
            return Ok(());
        }
        if !logged {
            tracing::info!("PostgreSQL is in recovery; waiting for it to be promoted");
            logged = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = cancel.cancelled() => bail!("cancelled"),
        }
    }
}

async fn session(
    args: &WalStreamArgs,
    cancel: &CancellationToken,
    streamed: &mut bool,
) -> anyhow::Result<()> {
    wait_for_primary(args, cancel).await?;
    let cfg = ReplicationConfig::from_dsn(&args.pg_dsn, &args.application_name)
        .map_err(|e| fatal(format!("{e}")))?;
    let mut repl = ReplicationConnection::connect(&cfg)
        .await
        .map_err(classify_pg)?;
    let ident = repl.identify_system().await.map_err(classify_pg)?;
    let size = repl.wal_segment_size().await.map_err(classify_pg)?;
    let cluster = args.client.cluster.clone();

    let mut wal = args.client.wal_client().await?;
    let hello = wal
        .hello(pb::HelloRequest {
            cluster: cluster.clone(),
            system_id: ident.system_id,
            segment_size: size.bytes(),
            tier2_backup: args.client.tier2_backup,
        })
        .await
        .map_err(|s| classify_status("register with the Klio server", s))?
        .into_inner();

    // Timeline history files: the archive needs them for recovery across promotions.
    let mut history = TimelineHistory::default();
    for tli in 2..=ident.timeline.0 {
        let (name, content) = repl
            .timeline_history(TimeLineId(tli))
            .await
            .map_err(classify_pg)?;
        wal.put_file(pb::PutFileRequest {
            cluster: cluster.clone(),
            name: name.clone(),
            content: content.clone().into(),
        })
        .await
        .map_err(|s| classify_status(&format!("archive history file \"{name}\""), s))?;
        if tli == ident.timeline.0 {
            history = TimelineHistory::parse(&String::from_utf8_lossy(&content))
                .map_err(|e| fatal(e.to_string()))?;
        }
    }

    let slot = repl
        .read_replication_slot(&args.slot)
        .await
        .map_err(classify_pg)?;
    let slot = match slot {
        Some(s) => s,
        None => {
            if hello.has_wal {
                tracing::warn!(slot = %args.slot, "replication slot is missing; creating it again (WAL that PostgreSQL already removed cannot be archived)");
            }
            match repl.create_physical_slot(&args.slot).await {
                Ok(()) | Err(klio_replication::Error::SlotExists { .. }) => {}
                Err(e) => return Err(classify_pg(e)),
            }
            repl.read_replication_slot(&args.slot)
                .await
                .map_err(classify_pg)?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "replication slot \"{}\" vanished right after creation",
                        args.slot
                    )
                })?
        }
    };

    // Where to start: the server's end of the archive decides.
    let (mut timeline, mut start) = if hello.has_wal {
        let archived = TimeLineId(hello.timeline);
        if archived > ident.timeline {
            return Err(fatal(format!(
                "the archive of cluster \"{cluster}\" is on timeline {archived}, ahead of this PostgreSQL server's timeline {}\nHINT: this server may be an old primary that was not rebuilt after a failover",
                ident.timeline
            )));
        }
        if hello.timeline_closed {
            // The archived timeline ended; continue on the one that followed it.
            let next = history
                .entries
                .iter()
                .position(|e| e.parent == archived)
                .map(|i| history.entries.get(i + 1).map(|e| e.parent).unwrap_or(ident.timeline))
                .ok_or_else(|| fatal(format!("timeline {archived} is closed in the archive but not in this server's history")))?;
            let switch = history
                .switchpoint_of(archived)
                .unwrap_or(Lsn(hello.end_lsn));
            (next, switch.segment_start(size))
        } else {
            (archived, Lsn(hello.end_lsn))
        }
    } else {
        let mut s = slot
            .restart_lsn
            .unwrap_or(ident.xlogpos)
            .segment_start(size);
        // On a promoted server, segments before the last fork exist only on the parent timeline.
        if let Some(last) = history.entries.last() {
            s = s.max(last.switchpoint.segment_start(size));
        }
        (ident.timeline, s)
    };

    let sync = watch_sync_mode(
        args.pg_dsn.clone(),
        args.application_name.clone(),
        cancel.child_token(),
    );
    loop {
        tracing::info!(cluster = %cluster, %timeline, %start, "streaming WAL");
        let stream = repl
            .start_physical(Some(&args.slot), start, timeline)
            .await
            .map_err(classify_pg)?;
        *streamed = true;
        let (next, conn) = stream_timeline(
            args,
            &mut wal,
            ident.system_id,
            timeline,
            start,
            &sync,
            stream,
            cancel,
        )
        .await?;
        match next {
            Some((next_tli, next_start)) => {
                timeline = next_tli;
                start = next_start.segment_start(size);
                repl = conn;
            }
            None => bail!("PostgreSQL ended the replication stream"),
        }
    }
}

/// Streams one timeline; returns the next timeline and where it starts when PostgreSQL
/// switched timelines.
#[allow(clippy::too_many_arguments)]
async fn stream_timeline(
    args: &WalStreamArgs,
    wal: &mut klio_proto::wal::v1::wal_client::WalClient<tonic::transport::Channel>,
    system_id: u64,
    timeline: TimeLineId,
    start: Lsn,
    sync: &watch::Receiver<bool>,
    mut repl: klio_replication::ReplicationStream,
    cancel: &CancellationToken,
) -> anyhow::Result<(Option<(TimeLineId, Lsn)>, ReplicationConnection)> {
    let cluster = args.client.cluster.clone();
    let (req_tx, req_rx) = mpsc::channel::<pb::StreamRequest>(16);
    let open = pb::StreamOpen {
        cluster: cluster.clone(),
        system_id,
        timeline: timeline.0,
        start_lsn: start.0,
        tier2_backup: args.client.tier2_backup,
    };
    req_tx
        .send(pb::StreamRequest {
            msg: Some(pb::stream_request::Msg::Open(open)),
        })
        .await?;
    let mut acks = wal
        .stream(ReceiverStream::new(req_rx))
        .await
        .map_err(|s| classify_status("open a WAL stream", s))?
        .into_inner();
    let first = acks
        .message()
        .await
        .map_err(|s| classify_status("open a WAL stream", s))?
        .ok_or_else(|| anyhow::anyhow!("the server closed the WAL stream at once"))?;
    let mut flushed = Lsn(first.flush_lsn);
    let mut written = start;
    let mut primary = start;
    streamer_metrics().connected(&cluster, flushed);
    let _disconnected = Disconnected;
    if flushed != start {
        bail!("the server's archive ends at {flushed}, not at {start} as it said a moment ago");
    }
    let max_batch = args.max_batch_kb * 1024;
    let mut tick = tokio::time::interval(Duration::from_secs(args.status_interval.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ended = false;
    // Asynchronously, WAL received within ASYNC_HOLD goes to the server as one message:
    // thousands of small messages a second cost both processes a wake-up each, while the
    // server fsyncs only every half second anyway.
    let mut held: Option<Batch> = None;
    let mut held_until = tokio::time::Instant::now();

    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(held_until), if held.is_some() => {
                if let Some(h) = held.take() {
                    written = send_batch(&req_tx, h, sync_now(sync), primary).await?;
                }
            }
            msg = repl.next_message(), if !ended => {
                let msg = msg.map_err(classify_pg)?;
                match msg {
                    StreamMessage::XLogData { start: s, data, wal_end } => {
                        primary = primary.max(wal_end);
                        let mut batch = Batch::new(s, data);
                        // Take whatever else is already received, up to the batch limit.
                        while batch.len < max_batch as u64 {
                            match repl.try_next_buffered().map_err(classify_pg)? {
                                Some(StreamMessage::XLogData { start: s2, data: d2, wal_end }) => {
                                    primary = primary.max(wal_end);
                                    if s2 != batch.end() {
                                        let full = std::mem::replace(&mut batch, Batch::new(s2, d2));
                                        let flush_now = sync_now(sync);
                                        if let Some(h) = held.take() {
                                            send_batch(&req_tx, h, flush_now, primary).await?;
                                        }
                                        send_batch(&req_tx, full, flush_now, primary).await?;
                                    } else {
                                        batch.push(d2);
                                    }
                                }
                                Some(StreamMessage::Keepalive { reply_requested: true, .. }) => {
                                    repl.send_status(written.max(batch.end()), flushed, flushed, false).await.map_err(classify_pg)?;
                                }
                                Some(StreamMessage::Keepalive { .. }) => {}
                                Some(StreamMessage::EndOfStream) => { ended = true; break; }
                                None => break,
                            }
                        }
                        if batch.len > 0 {
                            let flush_now = sync_now(sync);
                            let batch = match held.take() {
                                Some(mut h) if h.end() == batch.start => {
                                    h.append(batch);
                                    h
                                }
                                Some(h) => {
                                    written = send_batch(&req_tx, h, flush_now, primary).await?;
                                    held_until = tokio::time::Instant::now() + ASYNC_HOLD;
                                    batch
                                }
                                None => {
                                    held_until = tokio::time::Instant::now() + ASYNC_HOLD;
                                    batch
                                }
                            };
                            primary = primary.max(batch.end());
                            streamer_metrics().sent(primary, flush_now);
                            if flush_now || ended || batch.len >= ASYNC_HOLD_BYTES.min(max_batch) as u64 {
                                written = send_batch(&req_tx, batch, flush_now, primary).await?;
                            } else {
                                held = Some(batch);
                            }
                        }
                        if ended {
                            return finish(repl, &req_tx, &mut acks, timeline, written, flushed).await;
                        }
                    }
                    StreamMessage::Keepalive { reply_requested, wal_end } => {
                        primary = primary.max(wal_end);
                        streamer_metrics().sent(primary, sync_now(sync));
                        if reply_requested {
                            repl.send_status(written, flushed, flushed, false).await.map_err(classify_pg)?;
                        }
                    }
                    StreamMessage::EndOfStream => {
                        if let Some(h) = held.take() {
                            written = send_batch(&req_tx, h, true, primary).await?;
                        }
                        return finish(repl, &req_tx, &mut acks, timeline, written, flushed).await;
                    }
                }
            }
            ack = acks.message() => {
                let ack = ack.map_err(|s| classify_status("stream WAL", s))?
                    .ok_or_else(|| anyhow::anyhow!("the server closed the WAL stream"))?;
                let lsn = Lsn(ack.flush_lsn);
                streamer_metrics().acked(lsn);
                if lsn > flushed {
                    flushed = lsn;
                    // The only place the flush position moves: after the server's durable ack.
                    repl.send_status(written, flushed, flushed, false).await.map_err(classify_pg)?;
                }
            }
            _ = tick.tick() => {
                repl.send_status(written, flushed, flushed, false).await.map_err(classify_pg)?;
            }
            _ = cancel.cancelled() => bail!("cancelled"),
        }
    }
}

/// The longest received WAL waits for more before it goes to the server, when no
/// synchronous standby waits for it (a synchronous commit is sent at once).
const ASYNC_HOLD: Duration = Duration::from_millis(10);
/// Held WAL goes out once it reaches this size: a streamer catching up on a backlog sends
/// messages of this size, not of the largest one, so that the messages queued towards the
/// server (and the receive buffers they pin) stay small.
const ASYNC_HOLD_BYTES: usize = 256 << 10;

/// Contiguous WAL received from PostgreSQL, kept as the received buffers (no copy unless
/// several are joined).
struct Batch {
    start: Lsn,
    len: u64,
    parts: Vec<Bytes>,
}

impl Batch {
    fn new(start: Lsn, data: Bytes) -> Batch {
        Batch {
            start,
            len: data.len() as u64,
            parts: vec![data],
        }
    }

    fn push(&mut self, data: Bytes) {
        self.len += data.len() as u64;
        self.parts.push(data);
    }

    /// Appends `next`, which starts where this batch ends.
    fn append(&mut self, next: Batch) {
        self.len += next.len;
        self.parts.extend(next.parts);
    }

    fn end(&self) -> Lsn {
        self.start.plus(self.len)
    }

    fn into_bytes(mut self) -> Bytes {
        if self.parts.len() == 1 {
            return self.parts.pop().unwrap_or_default();
        }
        let mut out = bytes::BytesMut::with_capacity(self.len as usize);
        for p in &self.parts {
            out.extend_from_slice(p);
        }
        out.freeze()
    }
}

/// Sends `batch` to the server (`flush_now`: a synchronous standby waits for it) and
/// returns where it ends.
async fn send_batch(
    tx: &mpsc::Sender<pb::StreamRequest>,
    batch: Batch,
    flush_now: bool,
    primary: Lsn,
) -> anyhow::Result<Lsn> {
    let end = batch.end();
    let msg = pb::StreamRequest {
        msg: Some(pb::stream_request::Msg::Data(pb::WalData {
            start_lsn: batch.start.0,
            data: batch.into_bytes(),
            flush_now,
            primary_end_lsn: primary.0,
        })),
    };
    tx.send(msg)
        .await
        .map_err(|_| anyhow::anyhow!("the WAL stream to the server closed"))?;
    Ok(end)
}

/// PostgreSQL ended the timeline: close it on the server (its last segment becomes a
/// `.partial`), wait for the acknowledgement, and learn the next timeline.
async fn finish(
    repl: klio_replication::ReplicationStream,
    req_tx: &mpsc::Sender<pb::StreamRequest>,
    acks: &mut tonic::Streaming<pb::StreamResponse>,
    timeline: TimeLineId,
    written: Lsn,
    mut flushed: Lsn,
) -> anyhow::Result<(Option<(TimeLineId, Lsn)>, ReplicationConnection)> {
    let (next, conn) = repl.finish_timeline().await.map_err(classify_pg)?;
    let Some((next_tli, switch)) = next else {
        bail!(
            "PostgreSQL ended the replication stream on timeline {timeline} without naming a next timeline"
        );
    };
    if switch != written {
        bail!(
            "timeline {timeline} switched to {next_tli} at {switch}, but WAL was received up to {written}"
        );
    }
    let end = pb::StreamRequest {
        msg: Some(pb::stream_request::Msg::EndTimeline(pb::TimelineEnd {
            end_lsn: written.0,
        })),
    };
    req_tx
        .send(end)
        .await
        .map_err(|_| anyhow::anyhow!("the WAL stream to the server closed"))?;
    loop {
        let ack = acks
            .message()
            .await
            .map_err(|s| classify_status("close the timeline", s))?
            .ok_or_else(|| {
                anyhow::anyhow!("the server closed the WAL stream before closing the timeline")
            })?;
        flushed = flushed.max(Lsn(ack.flush_lsn));
        if ack.timeline_closed {
            break;
        }
    }
    tracing::info!(%timeline, next = %next_tli, at = %switch, archived_to = %flushed, "timeline switch");
    Ok((Some((next_tli, switch)), conn))
}

/// The current value of the watch, without holding its lock across an await (a held
/// borrow would block the watcher's next update).
fn sync_now(sync: &watch::Receiver<bool>) -> bool {
    *sync.borrow()
}

/// Whether PostgreSQL currently names `application_name` in `synchronous_standby_names`,
/// checked every second on an ordinary connection (the setting can change with a reload).
/// While it does, every batch asks the server to fsync and acknowledge at once; otherwise
/// the server batches fsyncs. When the setting cannot be read, synchronous is assumed.
fn watch_sync_mode(
    dsn: String,
    application_name: String,
    cancel: CancellationToken,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(true);
    tokio::spawn(async move {
        let _stop = cancel.clone().drop_guard();
        loop {
            let value = async {
                let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
                let task = tokio::spawn(conn);
                loop {
                    let row = client
                        .query_one("SHOW synchronous_standby_names", &[])
                        .await?;
                    let sync = names_standby(row.get(0), &application_name);
                    if tx.send(sync).is_err() {
                        task.abort();
                        return Ok::<(), tokio_postgres::Error>(());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = cancel.cancelled() => { task.abort(); return Ok(()); }
                    }
                }
            }
            .await;
            if value.is_ok() || tx.is_closed() || cancel.is_cancelled() {
                return;
            }
            let _ = tx.send(true);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = cancel.cancelled() => return,
            }
        }
    });
    rx
}

/// Whether a `synchronous_standby_names` value names `name` (or `*`). Handles the
/// `FIRST n (...)` and `ANY n (...)` forms and double-quoted names.
fn names_standby(setting: &str, name: &str) -> bool {
    let inner = match (setting.find('('), setting.rfind(')')) {
        (Some(a), Some(b)) if a < b => &setting[a + 1..b],
        _ => setting,
    };
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .any(|item| {
            if item == "*" {
                return true;
            }
            match item.strip_prefix('"').and_then(|i| i.strip_suffix('"')) {
                Some(quoted) => quoted == name,
                None => item.eq_ignore_ascii_case(name),
            }
        })
}

/// PostgreSQL errors: a removed WAL segment or failed authentication cannot be retried away.
fn classify_pg(e: klio_replication::Error) -> anyhow::Error {
    if e.is_wal_removed() {
        return fatal(format!(
            "{e}\nHINT: PostgreSQL no longer has WAL the archive needs (was the replication slot dropped?); the archive has a gap here: take a new base backup"
        ));
    }
    if matches!(e, klio_replication::Error::Auth { .. }) {
        return fatal(format!(
            "{e}\nHINT: check the user and password in --pg-dsn and pg_hba.conf's replication entries"
        ));
    }
    anyhow::Error::new(e)
}

/// Server refusals that retrying cannot fix end the streamer with a clear message.
fn classify_status(what: &str, s: tonic::Status) -> anyhow::Error {
    let permanent = matches!(
        s.code(),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated | tonic::Code::InvalidArgument
    ) || (s.code() == tonic::Code::FailedPrecondition
        && s.message().contains("database system"));
    let e = status_error(what, s);
    if permanent {
        fatal(format!("{e:#}"))
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::names_standby;

    #[test]
    fn names_standby_reads_every_form() {
        assert!(names_standby("klio", "klio"));
        assert!(names_standby("KLIO", "klio"));
        assert!(names_standby("*", "klio"));
        assert!(names_standby("FIRST 1 (s1, klio)", "klio"));
        assert!(names_standby("ANY 2 (s1, \"klio\", s2)", "klio"));
        assert!(names_standby("2 (s1, klio)", "klio"));
        assert!(!names_standby("", "klio"));
        assert!(!names_standby("s1, s2", "klio"));
        assert!(!names_standby("\"KLIO\"", "klio"));
        assert!(!names_standby("klio2", "klio"));
    }
}

/// The klio-wal sidecar's metrics (one streamer per process): whether it streams, the
/// primary's end of WAL, what the server acknowledged as durable, and the lag between them.
/// Exported by `klio-telemetry` (Prometheus endpoint, OTLP).
struct StreamerMetrics {
    state: std::sync::Mutex<StreamerState>,
}

#[derive(Default)]
struct StreamerState {
    cluster: String,
    connected: bool,
    synchronous: bool,
    primary: Lsn,
    acked: Lsn,
    /// When the server last acknowledged everything the primary had written.
    complete_at: Option<std::time::SystemTime>,
    last_ack: Option<std::time::SystemTime>,
}

impl StreamerState {
    /// WAL bytes PostgreSQL has written that the server has not acknowledged.
    fn lag_bytes(&self) -> u64 {
        self.primary.0.saturating_sub(self.acked.0)
    }
}

impl StreamerMetrics {
    fn with<R>(&self, f: impl FnOnce(&mut StreamerState) -> R) -> R {
        f(&mut self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn connected(&self, cluster: &str, acked: Lsn) {
        self.with(|s| {
            s.cluster = cluster.to_string();
            s.connected = true;
            s.acked = s.acked.max(acked);
            s.primary = s.primary.max(acked);
        });
    }

    fn sent(&self, primary: Lsn, synchronous: bool) {
        self.with(|s| {
            s.primary = s.primary.max(primary);
            s.synchronous = synchronous;
            if s.acked >= s.primary {
                s.complete_at = Some(std::time::SystemTime::now());
            }
        });
    }

    fn acked(&self, lsn: Lsn) {
        let now = std::time::SystemTime::now();
        self.with(|s| {
            s.acked = s.acked.max(lsn);
            s.last_ack = Some(now);
            if s.acked >= s.primary {
                s.complete_at = Some(now);
            }
        });
    }
}

/// Marks the streamer disconnected when a timeline's stream ends, however it ends.
struct Disconnected;

impl Drop for Disconnected {
    fn drop(&mut self) {
        streamer_metrics().with(|s| {
            s.connected = false;
            s.synchronous = false;
        });
    }
}

fn streamer_metrics() -> &'static StreamerMetrics {
    static METRICS: std::sync::OnceLock<StreamerMetrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(|| {
        let m = StreamerMetrics {
            state: std::sync::Mutex::default(),
        };
        register_streamer_gauges();
        m
    })
}

fn register_streamer_gauges() {
    use opentelemetry::KeyValue;
    let meter = opentelemetry::global::meter("klio-wal");
    let gauge = |name, help, unit, f: fn(&StreamerState, std::time::SystemTime) -> f64| {
        klio_telemetry::gauge(&meter, name, help, unit, move |obs| {
            let now = std::time::SystemTime::now();
            streamer_metrics().with(|s| {
                if !s.cluster.is_empty() {
                    obs.observe(f(s, now), &[KeyValue::new("cluster", s.cluster.clone())]);
                }
            });
        });
    };
    gauge(
        "klio_streamer_connected",
        "1 while this streamer streams WAL from PostgreSQL to the Klio server",
        "",
        |s, _| f64::from(u8::from(s.connected)),
    );
    gauge(
        "klio_streamer_synchronous",
        "1 while PostgreSQL waits for this streamer (named in synchronous_standby_names)",
        "",
        |s, _| f64::from(u8::from(s.synchronous)),
    );
    gauge(
        "klio_streamer_primary_position_bytes",
        "PostgreSQL's end of WAL (LSN) as its walsender last reported it",
        "By",
        |s, _| s.primary.0 as f64,
    );
    gauge(
        "klio_streamer_archived_position_bytes",
        "Position (LSN) the Klio server acknowledged as durably archived",
        "By",
        |s, _| s.acked.0 as f64,
    );
    gauge(
        "klio_streamer_archive_lag_bytes",
        "WAL bytes PostgreSQL has written that the server has not acknowledged yet",
        "By",
        |s, _| s.lag_bytes() as f64,
    );
    gauge(
        "klio_streamer_archive_lag_seconds",
        "Seconds since the server last held all of PostgreSQL's WAL (0 while it does)",
        "s",
        |s, now| {
            klio_telemetry::archive_lag_seconds(s.connected, s.lag_bytes(), s.complete_at, now)
        },
    );
    gauge(
        "klio_streamer_last_ack_timestamp_seconds",
        "When the server last acknowledged WAL (Unix time)",
        "s",
        |s, _| {
            s.last_ack
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0.0, |d| d.as_secs_f64())
        },
    );
}
