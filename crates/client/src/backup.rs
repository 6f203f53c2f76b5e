//! `klio backup`: an online physical base backup of a PostgreSQL cluster into the server's
//! repository (the `klio-plugin` sidecar role; also the CLI).
//!
//! Steps: check the WAL archive knows the cluster, begin a server session,
//! `pg_backup_start(fast)` on a connection held for the whole backup, scan PGDATA and the
//! tablespaces (pg_basebackup's exclusions), read files with `--jobs` threads — relation
//! files cut into 8 KiB pages (checksums verified), others whole or in 1 MiB blocks — ask the
//! server which blocks it lacks and upload only those (zstd-compressed), `pg_backup_stop`,
//! wait until the archive holds the WAL from the backup's start to its end, then commit the
//! manifest. Until the commit nothing is in the catalog.

use std::collections::{HashSet, VecDeque};
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use klio_pg::{Lsn, SegmentSize, TimeLineId, WalFileName};
use klio_pgdata::{EntryKind, PAGE_SIZE, PageCheck};
use klio_proto::backup::v1::{self as pb, backup_client::BackupClient};
use klio_proto::limits::{MAX_RUN_BLOCKS, RUN_BYTES};
use serde_json::json;
use tonic::transport::Channel;

use crate::client::{ClientArgs, status_error};

/// Relation files are cut into blocks of one page: PostgreSQL dirties pages at random, so
/// any larger block would almost always change (see docs/formats/repository.md).
pub const RELATION_BLOCK_SIZE: usize = PAGE_SIZE;
/// Other files up to this size are stored whole; larger ones in blocks of this size.
pub const WHOLE_FILE_MAX: usize = 1 << 20;
/// Plaintext bytes a reading thread gathers before asking the server what is missing.
const BATCH_BYTES: usize = 4 << 20;
/// Bytes read from a file with one system call.
const READ_CHUNK: usize = 1 << 20;
/// Uploads a reading thread may have in flight while it reads on.
const MAX_INFLIGHT: usize = 2;

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Connection string of the PostgreSQL server to back up (a superuser or a role with
    /// pg_backup_start/pg_backup_stop rights); may point at a standby
    #[arg(long, env = "KLIO_PG_DSN")]
    pub pg_dsn: String,
    /// Data directory of that server (default: its data_directory setting)
    #[arg(long, env = "KLIO_PGDATA")]
    pub pgdata: Option<PathBuf>,
    /// Files read, hashed and compressed in parallel
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// zstd level of uploaded blocks
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(-7..=19))]
    pub compression_level: i32,
    /// Seconds to wait, after pg_backup_stop, for the WAL the backup needs to be archived
    #[arg(long, default_value_t = 300)]
    pub wal_wait_timeout: u64,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
    /// Retention applied after the backup (expired backups, older WAL, garbage)
    #[command(flatten)]
    pub retention: crate::catalog::RetentionFlags,
    /// Tier 2's retention (with --tier2-backup), applied to Tier 2 after the backup
    #[command(flatten)]
    pub tier2_retention: crate::catalog::Tier2RetentionFlags,
    /// Do not apply the retention policy after the backup
    #[arg(long)]
    pub no_retention: bool,
}

struct Shared {
    client: BackupClient<Channel>,
    session: String,
    key: [u8; 32],
    level: i32,
    /// The server stores runs: consecutive new blocks are sent as one compressed run.
    runs: bool,
    compressors: Compressors,
    start_lsn: u64,
    verify_checksums: bool,
    rt: tokio::runtime::Handle,
    bytes_read: AtomicU64,
    blocks_total: AtomicU64,
    blocks_sent: AtomicU64,
    files: AtomicU64,
    logical_size: AtomicU64,
    checksum_failures: Mutex<Vec<(String, u32)>>,
}

/// Blocks gathered by one reading thread, waiting to be checked against the server.
struct Batch {
    ids: Vec<[u8; 32]>,
    /// The blocks' plaintexts, one after the other in the order read (consecutive new
    /// blocks are compressed straight from here, without another copy).
    plain: Vec<u8>,
    /// Each block's length in `plain`.
    lens: Vec<u32>,
    seen: HashSet<[u8; 32]>,
    /// Uploads (missing check, compression, upload) not yet acknowledged, each returning
    /// the blocks it sent: the thread reads on while they run.
    inflight: VecDeque<tokio::task::JoinHandle<anyhow::Result<u64>>>,
    /// File entries (or pieces of files) whose blocks are in this batch or were uploaded by
    /// it; sent with `AddFiles` once those uploads are acknowledged.
    files: Vec<pb::FileEntry>,
    /// Block ids in `files`.
    file_ids: usize,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            ids: Vec::new(),
            plain: Vec::new(),
            lens: Vec::new(),
            seen: HashSet::new(),
            inflight: VecDeque::new(),
            files: Vec::new(),
            file_ids: 0,
        }
    }
}

/// Compression contexts shared by the upload tasks (making one per batch costs its
/// allocations every 4 MiB).
type Compressors = Arc<Mutex<Vec<zstd::bulk::Compressor<'static>>>>;

/// The uploads of the blocks of a batch that the server lacks (`missing[i] != 0`), in the
/// order read (a file's pages one after the other), in runs of up to `max_run` bytes
/// compressed together: one zstd frame per run costs far less time and space than one per
/// 8 KiB page, and each block keeps its own id. `plain` holds the blocks' plaintexts one
/// after the other, `lens` their lengths.
fn runs_of_missing(
    ids: &[[u8; 32]],
    plain: &[u8],
    lens: &[u32],
    missing: &[u8],
    max_run: usize,
    pool: &Compressors,
    level: i32,
) -> anyhow::Result<Vec<pb::Block>> {
    let taken = pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
    let mut cctx = match taken {
        Some(c) => c,
        None => zstd::bulk::Compressor::new(level).context("zstd compressor")?,
    };
    let mut blocks = Vec::new();
    let mut run = Run::default();
    let mut scratch = Vec::new();
    let mut at = 0usize;
    for ((id, len), m) in ids.iter().zip(lens).zip(missing) {
        let span = (at, at + *len as usize);
        at = span.1;
        if *m == 0 {
            continue;
        }
        if span.0 == span.1 {
            // An empty block (an empty file) has no place in a run.
            let mut alone = Run::default();
            alone.push(id, span);
            blocks.push(alone.block(plain, &mut scratch, &mut cctx));
            continue;
        }
        if !run.lens.is_empty()
            && (run.len + (span.1 - span.0) > max_run || run.lens.len() >= MAX_RUN_BLOCKS)
        {
            blocks.push(run.block(plain, &mut scratch, &mut cctx));
        }
        run.push(id, span);
    }
    if !run.lens.is_empty() {
        blocks.push(run.block(plain, &mut scratch, &mut cctx));
    }
    pool.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(cctx);
    Ok(blocks)
}

/// Blocks gathered into one upload: a single block, or a run of several, as ranges of the
/// batch's plaintext (one range when the blocks follow each other there).
#[derive(Default)]
struct Run {
    ids: Vec<u8>,
    lens: Vec<u32>,
    spans: Vec<(usize, usize)>,
    len: usize,
}

impl Run {
    fn push(&mut self, id: &[u8; 32], span: (usize, usize)) {
        self.ids.extend_from_slice(id);
        self.lens.push((span.1 - span.0) as u32);
        self.len += span.1 - span.0;
        match self.spans.last_mut() {
            Some(last) if last.1 == span.0 => last.1 = span.1,
            _ => self.spans.push(span),
        }
    }

    /// The upload of what the run holds (compressed when that saves at least 64 bytes);
    /// leaves the run empty. `scratch` joins the ranges of a run with gaps.
    fn block(
        &mut self,
        plain: &[u8],
        scratch: &mut Vec<u8>,
        cctx: &mut zstd::bulk::Compressor<'static>,
    ) -> pb::Block {
        let bytes: &[u8] = match self.spans.as_slice() {
            [] => &[],
            [(a, b)] => &plain[*a..*b],
            spans => {
                scratch.clear();
                for (a, b) in spans {
                    scratch.extend_from_slice(&plain[*a..*b]);
                }
                scratch
            }
        };
        let plain_len = bytes.len() as u32;
        let (compressed, data) = match cctx.compress(bytes) {
            Ok(c) if c.len() + 64 < bytes.len() => (true, c),
            _ => (false, bytes.to_vec()),
        };
        let ids = std::mem::take(&mut self.ids);
        let lens = std::mem::take(&mut self.lens);
        self.spans.clear();
        self.len = 0;
        let mut block = pb::Block {
            plain_len,
            compressed,
            data: data.into(),
            ..Default::default()
        };
        if lens.len() == 1 {
            block.id = ids.into();
        } else {
            block.run_ids = ids.into();
            block.run_lens = lens;
        }
        block
    }
}

impl Shared {
    fn block_id(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.key, data).as_bytes()
    }

    /// Adds a block to the batch (once per batch) and returns its id; flushes a full batch.
    fn add(&self, batch: &mut Batch, data: &[u8]) -> anyhow::Result<[u8; 32]> {
        let id = self.block_id(data);
        self.blocks_total.fetch_add(1, Ordering::Relaxed);
        if batch.seen.insert(id) {
            batch.ids.push(id);
            batch.lens.push(data.len() as u32);
            if batch.plain.capacity() == 0 {
                batch.plain.reserve(BATCH_BYTES + WHOLE_FILE_MAX);
            }
            batch.plain.extend_from_slice(data);
            if batch.plain.len() >= BATCH_BYTES {
                self.flush(batch)?;
            }
        }
        Ok(id)
    }

    /// Hands the batch to an upload task, which asks the server which blocks it lacks,
    /// compresses those and uploads them, while this thread reads on; waits for the oldest
    /// task when [`MAX_INFLIGHT`] are in flight.
    fn flush(&self, batch: &mut Batch) -> anyhow::Result<()> {
        if batch.ids.is_empty() {
            return Ok(());
        }
        let ids = std::mem::take(&mut batch.ids);
        let plain = std::mem::take(&mut batch.plain);
        let lens = std::mem::take(&mut batch.lens);
        batch.seen.clear();
        let mut client = self.client.clone();
        let session = self.session.clone();
        let max_run = if self.runs { RUN_BYTES } else { 0 };
        let pool = self.compressors.clone();
        let level = self.level;
        batch.inflight.push_back(self.rt.spawn(async move {
            let wire: Vec<u8> = ids.iter().flatten().copied().collect();
            let missing = client
                .missing(pb::MissingRequest {
                    session_id: session.clone(),
                    ids: wire.into(),
                })
                .await
                .map_err(|s| status_error("ask the server which blocks it lacks", s))?
                .into_inner()
                .missing;
            if missing.len() != ids.len() {
                bail!(
                    "the server answered for {} blocks, not {}",
                    missing.len(),
                    ids.len()
                );
            }
            let blocks = tokio::task::spawn_blocking(move || {
                runs_of_missing(&ids, &plain, &lens, &missing, max_run, &pool, level)
            })
            .await
            .context("a compression task failed")??;
            let sent = blocks.iter().map(|b| b.run_lens.len().max(1) as u64).sum();
            if !blocks.is_empty() {
                client
                    .put_blocks(pb::PutBlocksRequest {
                        session_id: session,
                        blocks,
                    })
                    .await
                    .map_err(|s| status_error("upload blocks", s))?;
            }
            Ok(sent)
        }));
        while batch.inflight.len() > MAX_INFLIGHT {
            self.wait_upload(batch)?;
        }
        Ok(())
    }

    /// Waits for the oldest upload in flight.
    fn wait_upload(&self, batch: &mut Batch) -> anyhow::Result<()> {
        if let Some(h) = batch.inflight.pop_front() {
            let sent = self.rt.block_on(h).context("an upload task failed")??;
            self.blocks_sent.fetch_add(sent, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Sends what the batch holds, waits until every upload is acknowledged, then adds the
    /// batch's file entries to the session.
    fn finish(&self, batch: &mut Batch) -> anyhow::Result<()> {
        self.flush(batch)?;
        while !batch.inflight.is_empty() {
            self.wait_upload(batch)?;
        }
        if batch.files.is_empty() {
            return Ok(());
        }
        let files = std::mem::take(&mut batch.files);
        batch.file_ids = 0;
        let mut client = self.client.clone();
        self.rt
            .block_on(client.add_files(pb::AddFilesRequest {
                session_id: self.session.clone(),
                files,
            }))
            .map_err(|s| status_error("send the backup's file list", s))?;
        Ok(())
    }

    /// Queues a file entry (or a piece of one); sends the queue once it names enough
    /// blocks, so memory stays bounded whatever the size of the database.
    fn add_entry(&self, batch: &mut Batch, entry: pb::FileEntry) -> anyhow::Result<()> {
        batch.file_ids += entry.block_ids.len() / 32;
        batch.files.push(entry);
        if batch.file_ids >= klio_proto::limits::MAX_PIECE_IDS || batch.files.len() >= 16_384 {
            self.finish(batch)?;
        }
        Ok(())
    }

    /// Verifies a page's checksum. A mismatch is read again once before it is reported:
    /// PostgreSQL may have been writing the page while we read it (a torn read); a page
    /// it rewrites after the backup started is then newer than the start LSN and is not
    /// checked (WAL replay restores it).
    fn check_page(
        &self,
        entry: &klio_pgdata::Entry,
        file: &std::fs::File,
        page: &[u8],
        blkno: u32,
        offset: u64,
    ) {
        use std::os::unix::fs::FileExt;
        if !matches!(
            klio_pgdata::check_page(page, blkno, self.start_lsn),
            PageCheck::Invalid { .. }
        ) {
            return;
        }
        let mut again = vec![0u8; PAGE_SIZE];
        let reread = file.read_exact_at(&mut again, offset).is_ok();
        let verdict = if reread {
            klio_pgdata::check_page(&again, blkno, self.start_lsn)
        } else {
            klio_pgdata::check_page(page, blkno, self.start_lsn)
        };
        if let PageCheck::Invalid { expected, found } = verdict {
            tracing::warn!(file = %entry.path, block = blkno, expected, found, "page checksum mismatch");
            self.checksum_failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((entry.path.clone(), blkno));
        }
    }

    /// Reads one file into blocks and queues its entry, in pieces of at most
    /// [`klio_proto::limits::MAX_PIECE_IDS`] blocks; nothing if it vanished (dropped while we read:
    /// the WAL replay recreates whatever state is right).
    fn read_file(&self, entry: &klio_pgdata::Entry, batch: &mut Batch) -> anyhow::Result<()> {
        let mut pb_entry = pb::FileEntry {
            path: entry.path.clone(),
            size: 0,
            mode: entry.mode,
            mtime: entry.mtime,
            ..Default::default()
        };
        match &entry.kind {
            EntryKind::Directory => {
                pb_entry.kind = pb::file_entry::Kind::Directory as i32;
                self.files.fetch_add(1, Ordering::Relaxed);
                return self.add_entry(batch, pb_entry);
            }
            EntryKind::Symlink { target }
                if klio_proto::manifest_rules::tablespace_link_oid(&entry.path).is_none() =>
            {
                // The server refuses any other link (a restore never writes one): left out,
                // as what it leads to is outside the data directory anyway.
                tracing::warn!(path = %entry.path, %target, "symbolic link left out of the backup: only the tablespace links in pg_tblspc are backed up");
                return Ok(());
            }
            EntryKind::Symlink { target } => {
                pb_entry.kind = pb::file_entry::Kind::Symlink as i32;
                pb_entry.target = target.clone();
                self.files.fetch_add(1, Ordering::Relaxed);
                return self.add_entry(batch, pb_entry);
            }
            EntryKind::File => pb_entry.kind = pb::file_entry::Kind::File as i32,
        }
        let mut file = match std::fs::File::open(&entry.abs_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(e).with_context(|| format!("open \"{}\"", entry.abs_path.display()));
            }
        };
        let relation = entry.relation.as_ref();
        let block_size = if relation.is_some() {
            RELATION_BLOCK_SIZE
        } else {
            WHOLE_FILE_MAX
        };
        let mut ids: Vec<u8> = Vec::new();
        let mut size = 0u64;
        // Index of the first block in `ids` (earlier pieces were queued already).
        let mut first_block = 0u64;
        // Read in large chunks (one system call per MiB, not per page), cut into blocks.
        let mut buf = vec![0u8; READ_CHUNK.max(block_size)];
        loop {
            let n = read_full(&mut file, &mut buf)
                .with_context(|| format!("read \"{}\"", entry.abs_path.display()))?;
            if n == 0 && size == 0 && relation.is_none() {
                // An empty file stored whole is one empty block.
                let id = self.add(batch, &[])?;
                ids.extend_from_slice(&id);
                break;
            }
            for block in buf[..n].chunks(block_size) {
                if let Some(rel) = relation
                    && self.verify_checksums
                    && block.len() == PAGE_SIZE
                {
                    let blkno = rel.first_blkno() + (size / PAGE_SIZE as u64) as u32;
                    self.check_page(entry, &file, block, blkno, size);
                }
                let id = self.add(batch, block)?;
                ids.extend_from_slice(&id);
                size += block.len() as u64;
                if ids.len() / 32 >= klio_proto::limits::MAX_PIECE_IDS {
                    // A piece of a large file: its blocks so far, at the size read so far.
                    let piece = pb::FileEntry {
                        size,
                        block_size: block_size as u32,
                        block_ids: std::mem::take(&mut ids).into(),
                        first_block,
                        ..pb_entry.clone()
                    };
                    first_block += (piece.block_ids.len() / 32) as u64;
                    self.add_entry(batch, piece)?;
                }
            }
            self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
            if n < buf.len() {
                break;
            }
        }
        pb_entry.size = size;
        // Files that fit one block are stored whole; an empty file is one empty block.
        pb_entry.block_size = if relation.is_some() || size > WHOLE_FILE_MAX as u64 {
            block_size as u32
        } else {
            0
        };
        if pb_entry.block_size != 0 && size == 0 {
            ids.clear();
        }
        pb_entry.block_ids = ids.into();
        pb_entry.first_block = first_block;
        self.files.fetch_add(1, Ordering::Relaxed);
        self.logical_size.fetch_add(size, Ordering::Relaxed);
        self.add_entry(batch, pb_entry)
    }
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Reads the start timeline from a backup_label.
fn label_timeline(label: &str) -> Option<u32> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE: "))
        .and_then(|v| v.trim().parse().ok())
}

/// Connects to the base-backup service.
pub async fn backup_client(args: &ClientArgs) -> anyhow::Result<BackupClient<Channel>> {
    let channel = args.channel(args.conn.base_port).await?;
    Ok(BackupClient::new(channel)
        .max_decoding_message_size(klio_proto::limits::MAX_BACKUP_MESSAGE)
        .max_encoding_message_size(klio_proto::limits::MAX_BACKUP_MESSAGE))
}

/// Waits until the archive holds every WAL byte from `start` to `end` on `timeline`.
async fn wait_for_wal(
    args: &BackupArgs,
    timeline: TimeLineId,
    start: Lsn,
    end: Lsn,
    seg: SegmentSize,
) -> anyhow::Result<()> {
    let mut wal = args.client.wal_client().await?;
    let deadline = Instant::now() + Duration::from_secs(args.wal_wait_timeout);
    let start_name = WalFileName::segment(timeline, start.segment_no(seg), seg).to_string();
    loop {
        let r = wal
            .list(klio_proto::wal::v1::ListRequest {
                cluster: args.client.cluster.clone(),
                tier2_recovery: false,
                // The stream's next periodic fsync may be half a second away.
                flush: true,
            })
            .await
            .map_err(|s| status_error("list the WAL archive", s))?
            .into_inner();
        if r.has_wal {
            let first_on_tli = r
                .files
                .iter()
                .filter(|f| f.len() >= 24 && f[..8] == start_name[..8] && !f.ends_with(".history"))
                .min()
                .cloned();
            if let Some(first) = &first_on_tli
                && first[..24] > start_name[..]
            {
                bail!(
                    "the WAL archive of cluster \"{}\" starts at {first}, after this backup's start ({start_name}): the backup could never be restored\nHINT: keep `klio wal-stream` running for the cluster before taking backups",
                    args.client.cluster
                );
            }
            let reached =
                r.timeline > timeline.0 || (r.timeline == timeline.0 && r.end_lsn >= end.0);
            if reached && first_on_tli.is_some() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "the WAL this backup needs (from {start} to {end} on timeline {}) was not archived within {} s: the archive of cluster \"{}\" ends at {} on timeline {}\nHINT: is `klio wal-stream` running for this cluster? (--wal-wait-timeout sets the wait)",
                timeline.0,
                args.wal_wait_timeout,
                args.client.cluster,
                Lsn(r.end_lsn),
                r.timeline
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Takes the backup, applies the retention policy unless told not to, and returns the
/// committed backup's metadata (its JSON as the catalog holds it, with `backup_id`).
/// The sidecar's `Backup.Backup` and `klio backup` both call this.
#[tracing::instrument(name = "klio.backup", skip_all, fields(cluster = %args.client.cluster, backup_id))]
pub async fn take(args: &BackupArgs) -> anyhow::Result<serde_json::Value> {
    let cluster = args.client.cluster.clone();
    let (pg, conn) = tokio_postgres::connect(&args.pg_dsn, tokio_postgres::NoTls)
        .await
        .context("connect to PostgreSQL (--pg-dsn)")?;
    let conn_task = tokio::spawn(conn);
    let row = pg
        .query_one(
            "SELECT current_setting('data_directory'), current_setting('data_checksums'),
                    pg_is_in_recovery(), current_setting('server_version_num')::int,
                    (SELECT system_identifier::text FROM pg_control_system()),
                    (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')",
            &[],
        )
        .await
        .context("query the PostgreSQL server's settings")?;
    let data_directory: String = row.get(0);
    let data_checksums = row.get::<_, String>(1) == "on";
    let in_recovery: bool = row.get(2);
    let version: i32 = row.get(3);
    let system_id: String = row.get(4);
    let seg = SegmentSize::new(row.get::<_, i64>(5) as u64)?;
    if version < 150000 {
        bail!("PostgreSQL {version} is not supported: Klio needs PostgreSQL 15 or later");
    }
    let pgdata = args
        .pgdata
        .clone()
        .unwrap_or_else(|| PathBuf::from(&data_directory));
    let tablespaces: Vec<serde_json::Value> = pg
        .query(
            "SELECT oid::bigint, spcname::text, pg_tablespace_location(oid) FROM pg_tablespace
             WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY oid",
            &[],
        )
        .await
        .context("list tablespaces")?
        .iter()
        .map(|r| json!({"oid": r.get::<_, i64>(0), "name": r.get::<_, String>(1), "location": r.get::<_, String>(2)}))
        .collect();

    let mut client = backup_client(&args.client).await?;
    let begin = client
        .begin(pb::BeginRequest {
            cluster: cluster.clone(),
            tier2_backup: args.client.tier2_backup,
        })
        .await
        .map_err(|s| status_error("begin a backup", s))?
        .into_inner();
    let key: [u8; 32] = begin
        .block_id_key
        .as_ref()
        .try_into()
        .context("the server sent a block id key that is not 32 bytes")?;
    let result = take_backup(
        args,
        &pg,
        &mut client,
        &begin,
        key,
        pgdata,
        data_checksums,
        in_recovery,
        seg,
        system_id,
        tablespaces,
    )
    .await;
    if result.is_err() {
        let _ = client
            .abort(pb::AbortRequest {
                session_id: begin.session_id.clone(),
            })
            .await;
    }
    drop(pg);
    let _ = conn_task.await;
    let metadata = result?;
    if !args.no_retention {
        // The backup is complete whatever happens here; retention runs again next time.
        let mut runs = vec![(1, args.retention.clone())];
        if args.client.tier2_backup {
            runs.push((2, args.tier2_retention.as_flags()));
        }
        for (tier, policy) in runs {
            match crate::catalog::retention_call(&args.client, &policy, false, tier).await {
                Ok(r) => tracing::info!(
                    tier,
                    expired = r["deleted_backups"].as_array().map_or(0, Vec::len),
                    held_for_tier2 = r["held_for_tier2"].as_array().map_or(0, Vec::len),
                    wal_removed = r["deleted_wal"].as_array().map_or(0, Vec::len),
                    bytes_reclaimed = r["gc"]["bytes_reclaimed"].as_u64().unwrap_or(0),
                    "retention applied"
                ),
                Err(e) => tracing::warn!("Tier {tier} retention after the backup failed: {e:#}"),
            }
        }
    }
    Ok(metadata)
}

/// `klio backup`: [`take`], then the result on standard output.
pub async fn run(args: BackupArgs) -> anyhow::Result<()> {
    let metadata = take(&args).await?;
    let cluster = &args.client.cluster;
    let backup_id = metadata["backup_id"].as_str().unwrap_or_default();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&metadata)?);
    } else {
        let m = &metadata;
        println!("backup {backup_id} of cluster \"{cluster}\" completed");
        println!(
            "  WAL {} .. {} (timeline {}), {} files, {} bytes read, {} bytes newly stored ({} of {} blocks new)",
            m["start_lsn"].as_str().unwrap_or(""),
            m["end_lsn"].as_str().unwrap_or(""),
            m["timeline"],
            m["files"],
            m["logical_size"],
            m["bytes_new"],
            m["blocks_new"],
            m["blocks_total"]
        );
        if let Some(f) = m["checksum_failures"].as_array()
            && !f.is_empty()
        {
            println!("  WARNING: {} pages failed checksum verification", f.len());
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn take_backup(
    args: &BackupArgs,
    pg: &tokio_postgres::Client,
    client: &mut BackupClient<Channel>,
    begin: &pb::BeginResponse,
    key: [u8; 32],
    pgdata: PathBuf,
    data_checksums: bool,
    in_recovery: bool,
    seg: SegmentSize,
    system_id: String,
    tablespaces: Vec<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let started_at = time::OffsetDateTime::now_utc();
    let start_lsn: String = pg
        .query_one(
            "SELECT pg_backup_start($1, true)::text",
            &[&format!("klio {}", begin.backup_id)],
        )
        .await
        .context("pg_backup_start")?
        .get(0);
    let start_lsn: Lsn = start_lsn.parse()?;
    tracing::Span::current().record("backup_id", begin.backup_id.as_str());
    tracing::info!(backup = %begin.backup_id, start = %start_lsn, "backup started in PostgreSQL");

    let scan_root = pgdata.clone();
    let scan = tokio::task::spawn_blocking(move || klio_pgdata::scan(&scan_root))
        .await?
        .with_context(|| format!("read the data directory \"{}\"", pgdata.display()))?;
    let total: u64 = scan.entries.iter().map(|e| e.size).sum();
    let shared = Arc::new(Shared {
        client: client.clone(),
        session: begin.session_id.clone(),
        key,
        level: args.compression_level,
        runs: begin.accepts_runs,
        compressors: Compressors::default(),
        start_lsn: start_lsn.0,
        verify_checksums: data_checksums,
        rt: tokio::runtime::Handle::current(),
        bytes_read: AtomicU64::new(0),
        blocks_total: AtomicU64::new(0),
        blocks_sent: AtomicU64::new(0),
        files: AtomicU64::new(0),
        logical_size: AtomicU64::new(0),
        checksum_failures: Mutex::new(Vec::new()),
    });
    // Workers pop from the end: largest files first, so the threads finish together.
    let mut entries = scan.entries;
    entries.sort_by_key(|e| e.size);
    let queue = Arc::new(Mutex::new(entries));
    let progress = Progress::start(
        shared.clone(),
        total,
        !args.json && std::io::stderr().is_terminal(),
    );
    let mut workers = Vec::new();
    for _ in 0..args.jobs {
        let shared = shared.clone();
        let queue = queue.clone();
        workers.push(tokio::task::spawn_blocking(
            move || -> anyhow::Result<()> {
                let mut batch = Batch::new();
                loop {
                    let next = queue.lock().unwrap_or_else(PoisonError::into_inner).pop();
                    let Some(entry) = next else { break };
                    shared.read_file(&entry, &mut batch)?;
                }
                shared.finish(&mut batch)
            },
        ));
    }
    let mut failure = None;
    for w in workers {
        if let Err(e) = w.await? {
            failure.get_or_insert(e);
            queue.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }
    progress.stop();
    if let Some(e) = failure {
        return Err(e);
    }

    let row = pg
        .query_one(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)",
            &[],
        )
        .await
        .context("pg_backup_stop")?;
    let stopped_at = time::OffsetDateTime::now_utc();
    let end_lsn: Lsn = row.get::<_, String>(0).parse()?;
    let backup_label: String = row.get(1);
    let tablespace_map: Option<String> = row.get(2);
    let timeline = TimeLineId(
        label_timeline(&backup_label).context("the backup_label has no START TIMELINE line")?,
    );
    tracing::info!(end = %end_lsn, "backup stopped in PostgreSQL; waiting for its WAL to be archived");
    wait_for_wal(args, timeline, start_lsn, end_lsn, seg).await?;

    let failures: Vec<serde_json::Value> = shared
        .checksum_failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(p, b)| json!({"path": p, "block": b}))
        .collect();
    let logical_size = shared.logical_size.load(Ordering::Relaxed);
    let end_segment = Lsn(end_lsn.0.saturating_sub(1).max(start_lsn.0));
    let metadata = json!({
        "timeline": timeline.0,
        "start_lsn": start_lsn.to_string(),
        "end_lsn": end_lsn.to_string(),
        "start_wal": WalFileName::segment(timeline, start_lsn.segment_no(seg), seg).to_string(),
        "end_wal": WalFileName::segment(timeline, end_segment.segment_no(seg), seg).to_string(),
        "started_at": rfc3339(started_at),
        "stopped_at": rfc3339(stopped_at),
        "system_id": system_id,
        "from_standby": in_recovery,
        "data_checksums": data_checksums,
        "backup_label": backup_label,
        "tablespace_map": tablespace_map.unwrap_or_default(),
        "tablespaces": tablespaces,
        "logical_size": logical_size,
        "files": shared.files.load(Ordering::Relaxed),
        "blocks_total": shared.blocks_total.load(Ordering::Relaxed),
        "checksum_failures": failures,
    });
    let committed = client
        .commit(pb::CommitRequest {
            session_id: begin.session_id.clone(),
            metadata_json: serde_json::to_vec(&metadata)?.into(),
            files: Vec::new(),
        })
        .await
        .map_err(|s| status_error("commit the backup", s))?
        .into_inner();
    Ok(serde_json::from_slice(&committed.metadata_json)?)
}

/// A progress line on a terminal, redrawn twice a second.
struct Progress {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Progress {
    fn start(shared: Arc<Shared>, total: u64, enabled: bool) -> Progress {
        if !enabled {
            return Progress { stop: None };
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let t0 = Instant::now();
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                let done = shared.bytes_read.load(Ordering::Relaxed);
                let pct = if total == 0 {
                    100
                } else {
                    done * 100 / total.max(1)
                };
                let rate = done as f64 / t0.elapsed().as_secs_f64().max(0.001) / 1e6;
                eprint!(
                    "\r{pct:>3}% {} / {} MB read, {rate:.0} MB/s, {} blocks uploaded   ",
                    done / 1_000_000,
                    total / 1_000_000,
                    shared.blocks_sent.load(Ordering::Relaxed)
                );
            }
            eprintln!();
        });
        Progress { stop: Some(tx) }
    }

    fn stop(self) {
        if let Some(tx) = self.stop {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocks the uploads carry, in order: (id, plaintext).
    fn carried(blocks: &[pb::Block]) -> Vec<([u8; 32], Vec<u8>)> {
        let mut out = Vec::new();
        for b in blocks {
            let plain = if b.compressed {
                zstd::bulk::decompress(&b.data, b.plain_len as usize).unwrap()
            } else {
                b.data.to_vec()
            };
            assert_eq!(plain.len(), b.plain_len as usize);
            if b.run_lens.is_empty() {
                out.push((b.id.as_ref().try_into().unwrap(), plain));
                continue;
            }
            let mut at = 0;
            for (id, len) in b.run_ids.chunks(32).zip(&b.run_lens) {
                let end = at + *len as usize;
                out.push((id.try_into().unwrap(), plain[at..end].to_vec()));
                at = end;
            }
            assert_eq!(at, plain.len());
        }
        out
    }

    #[test]
    fn runs_carry_the_missing_blocks_with_or_without_gaps() {
        // Ten blocks; an empty one (an empty file) in the middle; two that the server holds.
        let blocks: Vec<Vec<u8>> = (0..10u8)
            .map(|i| {
                if i == 5 {
                    Vec::new()
                } else {
                    (0..8192u32).map(|j| (j % 251) as u8 ^ i).collect()
                }
            })
            .collect();
        let ids: Vec<[u8; 32]> = (0..10u8).map(|i| [i; 32]).collect();
        let plain: Vec<u8> = blocks.concat();
        let lens: Vec<u32> = blocks.iter().map(|b| b.len() as u32).collect();
        let missing = [1u8, 1, 0, 1, 1, 1, 1, 0, 1, 1];
        let pool = Compressors::default();
        let runs = runs_of_missing(&ids, &plain, &lens, &missing, 3 * 8192, &pool, 1).unwrap();
        let want: Vec<([u8; 32], Vec<u8>)> = (0..10)
            .filter(|i| missing[*i] != 0)
            .map(|i| (ids[i], blocks[i].clone()))
            .collect();
        let mut got = carried(&runs);
        got.sort();
        assert_eq!(got, want);
        // Runs of at most three pages, across the gaps; the empty block alone.
        let sizes: Vec<usize> = runs.iter().map(|b| b.run_lens.len().max(1)).collect();
        assert_eq!(sizes, vec![3, 1, 3, 1], "{sizes:?}");
        assert_eq!(runs[1].plain_len, 0);
        assert!(runs.iter().all(|b| b.compressed || b.plain_len == 0));
        // The compression context went back to the pool.
        assert_eq!(pool.lock().unwrap().len(), 1);
    }
}
