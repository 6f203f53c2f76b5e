//! `klio wal-get`: PostgreSQL's `restore_command`.
//!
//! Fetches one archived file, verifies it end to end (every frame was authenticated by the
//! server; here the client checks offsets, lengths and the BLAKE3 hash of the whole file)
//! and writes DESTPATH atomically. On a miss it also fetches the next `--prefetch`
//! segments of the same timeline in parallel into a spool directory, so that the following
//! calls are served locally without a round trip.
//!
//! Exit status: 0 the file was restored; 1 the archive does not have it (PostgreSQL then
//! ends archive recovery or tries streaming); 200 any other failure (corruption, no server,
//! refused certificate...). A status above 125 makes PostgreSQL stop recovery instead of
//! mistaking a failure for the end of the archive.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use klio_pg::{SegmentSize, WalFileName};
use klio_proto::wal::v1 as pb;
use klio_proto::wal::v1::wal_client::WalClient;
use tonic::transport::Channel;

use crate::client::{ClientArgs, status_error};

/// Exit status when the archive does not have the file.
pub const EXIT_NOT_FOUND: i32 = 1;
/// Exit status for every other failure (above 125: PostgreSQL stops recovery).
pub const EXIT_ERROR: i32 = 200;

#[derive(Args, Debug)]
pub struct WalGetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Segments to fetch ahead in parallel on a miss (0 disables prefetching)
    #[arg(long, env = "KLIO_WAL_PREFETCH", default_value_t = 8)]
    pub prefetch: u32,
    /// Directory for prefetched segments (default: `.klio-spool` next to DESTPATH)
    #[arg(long, env = "KLIO_WAL_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Name of the file PostgreSQL asks for (%f)
    pub wal_name: String,
    /// Where PostgreSQL wants it (%p)
    pub dest_path: PathBuf,
}

/// What became of a request.
pub enum Outcome {
    Restored,
    NotFound,
}

/// A verified, decompressed file.
struct Fetched {
    data: Vec<u8>,
    partial: bool,
    segment_size: u64,
}

async fn fetch(
    client: &mut WalClient<Channel>,
    cluster: &str,
    name: &str,
    allow_partial: bool,
    tier2_recovery: bool,
) -> anyhow::Result<Option<Fetched>> {
    let req = pb::GetRequest {
        cluster: cluster.to_string(),
        name: name.to_string(),
        allow_partial,
        tier2_recovery,
    };
    let mut stream = match client.get(req).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
        Err(s) => return Err(status_error(&format!("fetch WAL file \"{name}\""), s)),
    };
    let header = match stream
        .message()
        .await
        .map_err(|s| status_error(&format!("fetch WAL file \"{name}\""), s))?
    {
        Some(pb::GetResponse {
            msg: Some(pb::get_response::Msg::Header(h)),
        }) => h,
        _ => anyhow::bail!(
            "WAL file \"{name}\" is corrupt: the server's answer does not start with a header"
        ),
    };
    // The server's sizes are bounded before anything is allocated: a WAL file is at most
    // a segment of the largest size.
    if header.total_len > klio_proto::limits::MAX_WAL_FILE {
        anyhow::bail!(
            "WAL file \"{name}\" is corrupt: the server announces {} bytes (at most {})",
            header.total_len,
            klio_proto::limits::MAX_WAL_FILE
        );
    }
    let total = usize::try_from(header.total_len).context("file too large")?;
    let mut data = Vec::with_capacity(total);
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| status_error(&format!("fetch WAL file \"{name}\""), s))?
    {
        let Some(pb::get_response::Msg::Chunk(c)) = msg.msg else {
            anyhow::bail!("WAL file \"{name}\" is corrupt: unexpected message in the stream");
        };
        if c.offset != data.len() as u64 {
            anyhow::bail!(
                "WAL file \"{name}\" is corrupt: chunk at byte {} where byte {} was expected",
                c.offset,
                data.len()
            );
        }
        if u64::from(c.plain_len) > (total - data.len()) as u64 {
            anyhow::bail!(
                "WAL file \"{name}\" is corrupt: a chunk of {} bytes at byte {} runs past its {total} bytes",
                c.plain_len,
                data.len()
            );
        }
        let plain = klio_crypto::decompress_payload(&c.payload, c.zstd, c.plain_len, name)
            .map_err(|e| anyhow::anyhow!("WAL file \"{name}\" is corrupt: {e}"))?;
        data.extend_from_slice(&plain);
    }
    if data.len() != total {
        anyhow::bail!(
            "WAL file \"{name}\" is truncated: received {} of {total} bytes",
            data.len()
        );
    }
    if blake3::hash(&data).as_bytes()[..] != header.blake3[..] {
        anyhow::bail!("WAL file \"{name}\" is corrupt: its content does not match its hash");
    }
    Ok(Some(Fetched {
        data,
        partial: header.partial,
        segment_size: header.segment_size,
    }))
}

/// Writes `data` to `path` through a temporary file and a rename, so PostgreSQL never sees
/// a half-written file. (No fsync: these are recovery inputs, fetched again after a crash.)
fn write_file(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = klio_durable::temp_path_for(path);
    std::fs::write(&tmp, data).with_context(|| format!("write \"{}\"", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("rename \"{}\" to \"{}\"", tmp.display(), path.display()))
}

/// Where `klio wal-get` spools prefetched segments: `--spool-dir`, else `.klio-spool` next
/// to DESTPATH.
pub fn spool_dir(args: &WalGetArgs) -> PathBuf {
    args.spool_dir.clone().unwrap_or_else(|| {
        let parent = args
            .dest_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        parent.join(".klio-spool")
    })
}

/// One file PostgreSQL (or pg_rewind) asks for.
#[derive(Debug)]
pub struct WalRequest<'a> {
    /// The archive (cluster) to read.
    pub cluster: &'a str,
    /// Look in Tier 2 for what Tier 1 lacks.
    pub tier2_recovery: bool,
    /// The file's name (`%f`).
    pub wal_name: &'a str,
    /// Where to write it (`%p`).
    pub dest_path: &'a Path,
    /// Segments fetched ahead on a miss; 0 disables the spool entirely (neither read nor
    /// filled), as pg_rewind needs.
    pub prefetch: u32,
    /// The prefetch spool directory.
    pub spool: &'a Path,
}

/// Prefetching in the background, for a long-lived process (the CNPG-I sidecar): a call
/// that misses returns as soon as its own file is written, while the following segments are
/// fetched; a later call for a segment still on its way waits for it instead of fetching it
/// again. (`klio wal-get` is a process per file, so it prefetches before it exits.)
#[derive(Clone, Default)]
pub struct Prefetcher {
    /// Spool paths being fetched.
    inflight: Arc<Mutex<HashSet<PathBuf>>>,
    /// Woken each time one of them is settled (written or given up).
    settled: Arc<tokio::sync::Notify>,
}

impl Prefetcher {
    fn is_inflight(&self, p: &Path) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(p)
    }

    /// Waits (at most a minute) while `p` is being fetched.
    async fn wait_for(&self, p: &Path) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let settled = self.settled.notified();
            if !self.is_inflight(p) {
                return;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return;
            }
        }
    }

    fn settle(&self, p: &Path) {
        self.inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(p);
        self.settled.notify_waiters();
    }
}

/// Whether `name` can be an archived file's name: letters, digits and dots only (a WAL
/// segment, `.partial`, `.history` or `.backup` file), so it never leaves a directory.
pub fn is_plausible_wal_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
}

/// One fetch of each of `names` (complete segments only), each yielding its name and outcome.
fn prefetches(
    client: &WalClient<Channel>,
    cluster: &str,
    tier2: bool,
    names: Vec<String>,
) -> impl Iterator<Item = impl std::future::Future<Output = (String, FetchResult)> + use<>> {
    let (client, cluster) = (client.clone(), cluster.to_string());
    names.into_iter().map(move |n| {
        let mut c = client.clone();
        let cluster = cluster.clone();
        async move {
            let r = fetch(&mut c, &cluster, &n, false, tier2).await;
            (n, r)
        }
    })
}

/// What [`fetch`] gives.
type FetchResult = anyhow::Result<Option<Fetched>>;

/// Fetches `names` into `spool` in parallel, each written as soon as it arrives; every name
/// is marked in flight until then. A segment the archive lacks (or that fails) is skipped:
/// PostgreSQL's own call for it reports the outcome.
fn spawn_prefetch(
    b: Prefetcher,
    client: WalClient<Channel>,
    cluster: String,
    tier2: bool,
    spool: PathBuf,
    names: Vec<String>,
) {
    {
        let mut inflight = b.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        inflight.extend(names.iter().map(|n| spool.join(n)));
    }
    let parallel = names.len().max(1);
    tokio::spawn(async move {
        let fetches = prefetches(&client, &cluster, tier2, names);
        let mut done = futures::stream::iter(fetches).buffer_unordered(parallel);
        while let Some((name, res)) = done.next().await {
            let path = spool.join(&name);
            match res {
                Ok(Some(f)) if !f.partial => {
                    if let Err(e) = write_file(&path, &f.data) {
                        tracing::debug!(name, error = %format!("{e:#}"), "prefetch not spooled");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(name, error = %e, "prefetch failed"),
            }
            b.settle(&path);
        }
    });
}

/// Removes spooled segments older than `segno` (PostgreSQL will not ask for them again).
fn prune_spool(spool: &Path, current: &WalFileName, size: SegmentSize) {
    let Some(cur) = current.segno() else { return };
    let Ok(rd) = std::fs::read_dir(spool) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        match WalFileName::parse(&name, size) {
            Ok(n @ WalFileName::Segment { .. }) if n.segno().is_some_and(|s| s < cur) => {
                let _ = std::fs::remove_file(e.path());
            }
            Ok(_) => {}
            Err(_) => {
                if name.ends_with(klio_durable::TMP_SUFFIX) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

pub async fn run(args: &WalGetArgs) -> anyhow::Result<Outcome> {
    let spool = spool_dir(args);
    let request = WalRequest {
        cluster: &args.client.cluster,
        tier2_recovery: args.client.tier2_recovery,
        wal_name: &args.wal_name,
        dest_path: &args.dest_path,
        prefetch: args.prefetch,
        spool: &spool,
    };
    restore(&request, None, || args.client.wal_client()).await
}

/// Serves `r` from the spool when it holds the file, else fetches it with the client
/// `connect` gives (called only then, so spool hits cost no connection) and, on a segment,
/// prefetches the following ones into the spool: before returning, or in the `background`.
#[tracing::instrument(name = "klio.wal.get", skip_all, fields(cluster = %r.cluster, wal = %r.wal_name))]
pub async fn restore<F, Fut>(
    r: &WalRequest<'_>,
    background: Option<&Prefetcher>,
    connect: F,
) -> anyhow::Result<Outcome>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<WalClient<Channel>>>,
{
    if !is_plausible_wal_name(r.wal_name) {
        anyhow::bail!(
            "\"{}\" is not the name of a WAL, history or backup history file\nHINT: wal-get takes a WAL file name such as 000000010000000000000001",
            r.wal_name.escape_debug()
        );
    }
    let spool = r.spool;
    // Spooled segments are named like the archive's and are only ever complete segments.
    let spooled = spool.join(r.wal_name);
    if r.prefetch > 0
        && let Some(b) = background
    {
        b.wait_for(&spooled).await;
    }
    if r.prefetch > 0 && spooled.is_file() {
        std::fs::rename(&spooled, r.dest_path)
            .or_else(|_| std::fs::copy(&spooled, r.dest_path).map(|_| ()))
            .with_context(|| {
                format!(
                    "move prefetched \"{}\" to \"{}\"",
                    spooled.display(),
                    r.dest_path.display()
                )
            })?;
        tracing::debug!(name = %r.wal_name, "served from the prefetch spool");
        return Ok(Outcome::Restored);
    }

    let mut client = connect().await?;
    let cluster = r.cluster.to_string();
    let tier2 = r.tier2_recovery;
    let Some(first) = fetch(&mut client, &cluster, r.wal_name, true, tier2).await? else {
        return Ok(Outcome::NotFound);
    };
    let size = SegmentSize::new(first.segment_size)
        .context("the server reports an invalid segment size")?;
    let parsed = WalFileName::parse(r.wal_name, size).map_err(|e| {
        anyhow::anyhow!("{e}\nHINT: wal-get takes a WAL file name such as 000000010000000000000001")
    })?;
    let mut data = first.data;
    if data.len() as u64 > size.bytes() {
        anyhow::bail!(
            "WAL file \"{}\" is corrupt: {} bytes, more than a segment of {}",
            r.wal_name,
            data.len(),
            size.bytes()
        );
    }
    if first.partial {
        // An incomplete last segment is zero-padded, as PostgreSQL expects of a segment;
        // replay stops at its last complete record.
        tracing::info!(name = %r.wal_name, bytes = data.len(), "serving an incomplete segment, zero-padded");
        data.resize(size.bytes() as usize, 0);
    }

    let mut prefetched = Vec::new();
    if r.prefetch > 0
        && !first.partial
        && let WalFileName::Segment {
            timeline,
            segno,
            size,
        } = parsed
    {
        std::fs::create_dir_all(spool)
            .with_context(|| format!("create spool directory \"{}\"", spool.display()))?;
        prune_spool(spool, &parsed, size);
        let names: Vec<String> = (1..=u64::from(r.prefetch))
            .map(|i| {
                WalFileName::segment(timeline, klio_pg::SegmentNo(segno.0 + i), size).to_string()
            })
            .filter(|n| !spool.join(n).exists())
            .filter(|n| background.is_none_or(|b| !b.is_inflight(&spool.join(n))))
            .collect();
        if let Some(b) = background {
            write_file(r.dest_path, &data)?;
            spawn_prefetch(
                b.clone(),
                client,
                cluster,
                tier2,
                spool.to_path_buf(),
                names,
            );
            return Ok(Outcome::Restored);
        }
        let fetches = prefetches(&client, &cluster, tier2, names);
        prefetched = futures::stream::iter(fetches)
            .buffered(r.prefetch as usize)
            .collect::<Vec<_>>()
            .await;
    }
    write_file(r.dest_path, &data)?;
    for (name, res) in prefetched {
        match res {
            Ok(Some(f)) if !f.partial => write_file(&spool.join(&name), &f.data)?,
            Ok(_) => break,
            // Speculative: a failure here is reported when PostgreSQL asks for the file.
            Err(e) => {
                tracing::debug!(name, error = %e, "prefetch failed");
                break;
            }
        }
    }
    Ok(Outcome::Restored)
}
