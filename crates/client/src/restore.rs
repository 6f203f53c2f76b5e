//! `klio restore` (the `klio-restore` role): writes a base backup into a data directory and
//! sets PostgreSQL up to recover to a point in time with `klio wal-get`.
//!
//! Choosing the backup: the newest complete backup that can reach the target (for a time,
//! one that stopped at or before it; for an LSN, one that ended at or before it; for a
//! transaction id, a restore point name, `immediate` or the end of the archive, the newest).
//! Blocks are fetched in parallel, decompressed and checked against their ids before a byte
//! is written; `--delta` reads the existing files and fetches only blocks that differ.
//!
//! The restore does not trust the server: before anything is written, the whole manifest is
//! checked against [`klio_proto::manifest_rules`] (relative normalized paths, symbolic links
//! only as tablespace links, nothing under a file or another link, sizes within the limits)
//! and every tablespace gets a location that is absolute, normalized, and overlaps neither
//! the data directory nor another tablespace. While writing, no symbolic link inside the
//! data directory or a tablespace location is ever followed: parents are checked to be real
//! directories, files are opened with `O_NOFOLLOW`, tablespace contents are written into
//! their location directly (never through `pg_tblspc/<oid>`), and modes lose their setuid,
//! setgid and sticky bits. `--delta` deletes only inside the data directory and the
//! tablespace locations, never a location itself, and never follows a link while sweeping.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, bail};
use clap::{ArgGroup, Args};
use klio_proto::backup::v1::{self as pb, backup_client::BackupClient};
use klio_proto::limits::MAX_BLOCK_SIZE;
use klio_proto::manifest_rules::{self, Kind, TablespaceLocation, Violation};
use serde_json::Value;
use time::OffsetDateTime;
use tonic::transport::Channel;

use crate::backup::backup_client;
use crate::client::{ClientArgs, status_error};

/// Plaintext bytes asked for in one `GetBlocks` call.
const FETCH_BYTES: usize = 8 << 20;
/// Bytes of an existing file a delta restore reads with one system call.
const DELTA_READ_BYTES: usize = 1 << 20;

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("target").multiple(false).args(["target_time", "target_lsn", "target_xid", "target_name", "target_immediate"])))]
pub struct RestoreArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Data directory to write (absent, empty, or with --delta an existing cluster's)
    #[arg(long)]
    pub pgdata: PathBuf,
    /// Restore this backup (default: the newest that can reach the target)
    #[arg(long)]
    pub backup_id: Option<String>,
    /// Recover up to this time, e.g. "2026-11-21 10:15:00+01" (UTC when no offset is given)
    #[arg(long)]
    pub target_time: Option<String>,
    /// Recover up to this LSN, e.g. 0/3000060
    #[arg(long)]
    pub target_lsn: Option<String>,
    /// Recover up to this transaction id
    #[arg(long)]
    pub target_xid: Option<String>,
    /// Recover up to this restore point (pg_create_restore_point)
    #[arg(long)]
    pub target_name: Option<String>,
    /// Stop as soon as the backup is consistent
    #[arg(long)]
    pub target_immediate: bool,
    /// Timeline to recover along (a number, "latest" or "current"; default latest)
    #[arg(long)]
    pub target_timeline: Option<String>,
    /// Restore tablespace NAME (or OID) to PATH instead of its original location; repeatable
    #[arg(long = "tablespace-map", value_name = "NAME=PATH")]
    pub tablespace_map: Vec<String>,
    /// Reuse the existing files in --pgdata: only blocks whose content differs are fetched
    #[arg(long)]
    pub delta: bool,
    /// Files written in parallel
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// Write relation files through the page cache. By default they are written with
    /// direct I/O (O_DIRECT, where the file system supports it), which spares copying
    /// every byte into the page cache and writing it back at the fsync
    #[arg(long)]
    pub buffered_io: bool,
}

impl RestoreArgs {
    /// A restore of `client`'s cluster into `pgdata`: the newest backup, to the end of the
    /// archive, 4 files at a time, no delta; callers set what differs.
    pub fn new(client: ClientArgs, pgdata: PathBuf) -> RestoreArgs {
        RestoreArgs {
            client,
            pgdata,
            backup_id: None,
            target_time: None,
            target_lsn: None,
            target_xid: None,
            target_name: None,
            target_immediate: false,
            target_timeline: None,
            tablespace_map: Vec::new(),
            delta: false,
            jobs: 4,
            buffered_io: false,
        }
    }
}

/// A complete backup as listed by the server.
#[derive(Clone, Debug)]
pub struct BackupInfo {
    pub id: String,
    pub metadata: Value,
    pub in_tier1: bool,
    pub in_tier2: bool,
}

impl BackupInfo {
    fn stopped_at(&self) -> Option<OffsetDateTime> {
        self.metadata["stopped_at"].as_str().and_then(|s| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        })
    }

    fn lsn(&self, field: &str) -> Option<u64> {
        self.metadata[field]
            .as_str()
            .and_then(|s| s.parse::<klio_pg::Lsn>().ok())
            .map(|l| l.0)
    }
}

/// The cluster's complete backups, oldest first (unreadable manifests are left out with a
/// warning).
pub async fn list_backups(
    client: &mut BackupClient<Channel>,
    cluster: &str,
    tier2_recovery: bool,
) -> anyhow::Result<Vec<BackupInfo>> {
    let r = client
        .list(pb::ListRequest {
            cluster: cluster.to_string(),
            tier2_recovery,
        })
        .await
        .map_err(|s| status_error("list backups", s))?
        .into_inner();
    let mut out = Vec::new();
    for b in r.backups {
        let metadata: Value = serde_json::from_slice(&b.metadata_json)
            .with_context(|| format!("the metadata of backup {}", b.backup_id))?;
        out.push(BackupInfo {
            id: b.backup_id,
            metadata,
            in_tier1: b.in_tier1,
            in_tier2: b.in_tier2,
        });
    }
    Ok(out)
}

/// Parses a recovery target time; without an offset it is UTC.
pub fn parse_target_time(s: &str) -> anyhow::Result<OffsetDateTime> {
    let bad = || {
        anyhow::anyhow!(
            "invalid --target-time \"{s}\"\nHINT: use \"YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM]]\""
        )
    };
    let t = s.trim().replacen('T', " ", 1);
    let (date, rest) = t.split_once(' ').ok_or_else(bad)?;
    let (time_part, offset) = if let Some(p) = rest.strip_suffix(['Z', 'z']) {
        (p, (0i8, 0i8))
    } else if let Some(i) = rest.find(['+', '-']) {
        let (tp, off) = rest.split_at(i);
        let sign: i8 = if off.starts_with('-') { -1 } else { 1 };
        let digits: String = off[1..].chars().filter(|c| *c != ':').collect();
        let (h, m) = match digits.len() {
            2 => (digits.parse::<i8>().map_err(|_| bad())?, 0),
            4 => (
                digits[..2].parse::<i8>().map_err(|_| bad())?,
                digits[2..].parse::<i8>().map_err(|_| bad())?,
            ),
            _ => return Err(bad()),
        };
        (tp, (sign * h, sign * m))
    } else {
        (rest, (0, 0))
    };
    let num = |v: &str| v.parse::<u32>().map_err(|_| bad());
    let d: Vec<&str> = date.split('-').collect();
    if d.len() != 3 {
        return Err(bad());
    }
    let month = time::Month::try_from(num(d[1])? as u8).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(num(d[0])? as i32, month, num(d[2])? as u8)
        .map_err(|_| bad())?;
    let (hms, frac) = time_part
        .trim()
        .split_once('.')
        .unwrap_or((time_part.trim(), ""));
    let tp: Vec<&str> = hms.split(':').collect();
    if tp.len() < 2 || tp.len() > 3 {
        return Err(bad());
    }
    let sec = if tp.len() == 3 { num(tp[2])? } else { 0 };
    let nanos = if frac.is_empty() {
        0
    } else {
        let f: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        num(&f)?
    };
    let time = time::Time::from_hms_nano(num(tp[0])? as u8, num(tp[1])? as u8, sec as u8, nanos)
        .map_err(|_| bad())?;
    let offset = time::UtcOffset::from_hms(offset.0, offset.1, 0).map_err(|_| bad())?;
    Ok(time::PrimitiveDateTime::new(date, time).assume_offset(offset))
}

/// Chooses the backup to restore and says why.
fn choose(
    args: &RestoreArgs,
    backups: &[BackupInfo],
    target_time: Option<OffsetDateTime>,
    target_lsn: Option<u64>,
) -> anyhow::Result<(BackupInfo, String)> {
    let cluster = &args.client.cluster;
    let usable: Vec<&BackupInfo> = backups
        .iter()
        .filter(|b| b.metadata.get("error").is_none())
        .filter(
            |b| match args.target_timeline.as_deref().map(str::parse::<u32>) {
                Some(Ok(tli)) => b.metadata["timeline"]
                    .as_u64()
                    .is_some_and(|t| t <= u64::from(tli)),
                _ => true,
            },
        )
        .collect();
    if let Some(id) = &args.backup_id {
        let b = backups.iter().find(|b| &b.id == id).with_context(|| {
            format!("cluster \"{cluster}\" has no complete backup \"{id}\"\nHINT: `klio backups list` shows them")
        })?;
        if let Some(err) = b.metadata.get("error") {
            bail!("backup \"{id}\" cannot be read: {err}");
        }
        if let (Some(t), Some(stop)) = (target_time, b.stopped_at())
            && stop > t
        {
            bail!("backup \"{id}\" ended at {stop}, after the target time {t}: it cannot reach it");
        }
        if let (Some(l), Some(end)) = (target_lsn, b.lsn("end_lsn"))
            && end > l
        {
            bail!(
                "backup \"{id}\" ends at LSN {}, after the target LSN {}: it cannot reach it",
                klio_pg::Lsn(end),
                klio_pg::Lsn(l)
            );
        }
        return Ok((b.clone(), "chosen with --backup-id".to_string()));
    }
    if usable.is_empty() {
        bail!(
            "cluster \"{cluster}\" has no complete backup to restore\nHINT: take one with `klio backup`"
        );
    }
    if let Some(t) = target_time {
        let b = usable
            .iter()
            .rev()
            .find(|b| b.stopped_at().is_some_and(|s| s <= t))
            .with_context(|| format!("no backup of cluster \"{cluster}\" ended before the target time {t}: the oldest ended at {}", usable[0].metadata["stopped_at"]))?;
        return Ok((
            (*b).clone(),
            format!(
                "the newest backup that ended before the target time ({})",
                b.metadata["stopped_at"].as_str().unwrap_or("?")
            ),
        ));
    }
    if let Some(l) = target_lsn {
        let b = usable
            .iter()
            .rev()
            .find(|b| b.lsn("end_lsn").is_some_and(|e| e <= l))
            .with_context(|| {
                format!(
                    "no backup of cluster \"{cluster}\" ended before the target LSN {}",
                    klio_pg::Lsn(l)
                )
            })?;
        return Ok((
            (*b).clone(),
            format!(
                "the newest backup that ended before the target LSN (it ended at {})",
                b.metadata["end_lsn"].as_str().unwrap_or("?")
            ),
        ));
    }
    let b = usable[usable.len() - 1];
    let why = if args.target_xid.is_some() || args.target_name.is_some() {
        "the newest backup (a transaction id or restore point does not tell which backups precede it; use --backup-id to choose an older one)"
    } else {
        "the newest backup"
    };
    Ok((b.clone(), why.to_string()))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Refuses to write into a running cluster's directory or a non-empty one without --delta.
fn check_target_dir(dir: &Path, delta: bool) -> anyhow::Result<()> {
    if let Ok(pidfile) = std::fs::read_to_string(dir.join("postmaster.pid"))
        && let Some(pid) = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
        && pid_alive(pid)
    {
        bail!(
            "PostgreSQL (pid {pid}) is running in \"{}\": refusing to overwrite a running cluster\nHINT: stop it first",
            dir.display()
        );
    }
    let non_empty = match std::fs::read_dir(dir) {
        Ok(mut d) => d.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("read \"{}\"", dir.display())),
    };
    if non_empty && !delta {
        bail!(
            "\"{}\" is not empty\nHINT: restore into an empty or new directory, or pass --delta to reuse the files of an existing cluster there",
            dir.display()
        );
    }
    if non_empty && !dir.join("PG_VERSION").exists() {
        bail!(
            "\"{}\" is not empty and is not a PostgreSQL data directory (no PG_VERSION): refusing a delta restore into it",
            dir.display()
        );
    }
    Ok(())
}

/// An error for a manifest that breaks one of the [`manifest_rules`].
fn refused(backup_id: &str, v: &Violation) -> anyhow::Error {
    anyhow::anyhow!("the manifest of backup {backup_id} {v}: refusing to restore it")
}

/// Checks the whole manifest against the [`manifest_rules`] before anything is written.
fn check_manifest(backup_id: &str, files: &[pb::FileEntry]) -> anyhow::Result<()> {
    manifest_rules::check_manifest(files).map_err(|v| refused(backup_id, &v))
}

/// `path` made absolute and lexically normalized (`.` dropped, `..` taken back), without
/// resolving symbolic links: for comparing where directories are.
fn normalized(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Where each tablespace goes (oid -> location), and which of them the user mapped.
///
/// The user's `--tablespace-map` wins; else the location the backup's metadata records, used
/// only if it is absolute and normalized; an in-place tablespace (`pg_tblspc/<oid>`) stays
/// in the data directory. Every tablespace link of the manifest gets a location (a link
/// the metadata does not know can be mapped by OID), and no location is the data
/// directory, contains it, lies in its `pg_tblspc`, or overlaps another location.
fn tablespace_locations(
    args: &RestoreArgs,
    pgdata: &Path,
    backup_id: &str,
    meta: &Value,
    files: &[pb::FileEntry],
) -> anyhow::Result<(BTreeMap<String, PathBuf>, BTreeSet<String>)> {
    let spcs = manifest_rules::tablespaces(meta).map_err(|v| refused(backup_id, &v))?;
    let linked: BTreeSet<&str> = files
        .iter()
        .filter(|f| Kind::of(f) == Some(Kind::Symlink))
        .filter_map(|f| manifest_rules::tablespace_link_oid(&f.path))
        .collect();
    let mut maps: Vec<(&str, PathBuf)> = Vec::new();
    for m in &args.tablespace_map {
        let (name, path) = m
            .split_once('=')
            .filter(|(_, p)| !p.is_empty())
            .with_context(|| format!("invalid --tablespace-map \"{m}\": use NAME=PATH"))?;
        let known = linked.contains(name)
            || spcs
                .iter()
                .any(|t| t.name == name || t.oid.to_string() == name);
        if !known {
            bail!(
                "--tablespace-map \"{m}\": the backup has no tablespace named \"{name}\" (it has: {})",
                spcs.iter()
                    .map(|t| format!("{} (oid {})", t.name, t.oid))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        maps.push((name, normalized(Path::new(path))));
    }
    let mapped_to = |oid: &str, name: &str| {
        maps.iter()
            .find(|(k, _)| *k == oid || *k == name)
            .map(|(_, p)| p.clone())
    };
    let mut out = BTreeMap::new();
    let mut mapped = BTreeSet::new();
    for t in &spcs {
        let oid = t.oid.to_string();
        let recorded = manifest_rules::check_tablespace_location(t.oid, &t.location);
        let loc = match (mapped_to(&oid, &t.name), recorded) {
            (Some(_), Ok(TablespaceLocation::InPlace)) if !linked.contains(oid.as_str()) => {
                bail!(
                    "tablespace \"{}\" (oid {oid}) is an in-place tablespace, a directory of the data directory: it cannot be mapped with --tablespace-map",
                    t.name
                );
            }
            (Some(p), _) => {
                mapped.insert(oid.clone());
                p
            }
            (None, Ok(TablespaceLocation::Absolute(l))) => PathBuf::from(l),
            (None, Ok(TablespaceLocation::InPlace)) => continue,
            (None, Err(v)) => bail!(
                "{}\nHINT: restore the tablespace elsewhere with --tablespace-map {}=PATH",
                refused(backup_id, &v),
                t.name
            ),
        };
        out.insert(oid, loc);
    }
    for oid in linked {
        if out.contains_key(oid) {
            continue;
        }
        match mapped_to(oid, oid) {
            Some(p) => {
                mapped.insert(oid.to_string());
                out.insert(oid.to_string(), p);
            }
            None => bail!(
                "the manifest of backup {backup_id} lists the tablespace link \"pg_tblspc/{oid}\" but its metadata gives no location for tablespace {oid}: refusing to restore it\nHINT: restore the tablespace with --tablespace-map {oid}=PATH"
            ),
        }
    }
    let data = normalized(pgdata);
    let links = data.join(manifest_rules::TABLESPACE_LINK_DIR);
    for (oid, loc) in &out {
        if data.starts_with(loc) {
            bail!(
                "tablespace {oid} would be restored to \"{}\", which is or contains the data directory \"{}\": refusing to restore it\nHINT: map it elsewhere with --tablespace-map NAME=PATH",
                loc.display(),
                data.display()
            );
        }
        if loc.starts_with(&links) {
            bail!(
                "tablespace {oid} would be restored to \"{}\", inside the data directory's {}: refusing to restore it\nHINT: map it elsewhere with --tablespace-map NAME=PATH",
                loc.display(),
                manifest_rules::TABLESPACE_LINK_DIR
            );
        }
        for (other, other_loc) in &out {
            if other != oid && (loc.starts_with(other_loc) || other_loc.starts_with(loc)) {
                bail!(
                    "two tablespaces would be restored to \"{}\" and \"{}\" (tablespaces {oid} and {other}), one inside the other\nHINT: map them apart with --tablespace-map NAME=PATH",
                    loc.display(),
                    other_loc.display()
                );
            }
        }
    }
    Ok((out, mapped))
}

/// Checks the tablespace locations before anything is written: each is empty, except in a
/// delta restore when the user mapped it there or the data directory's `pg_tblspc/<oid>`
/// already leads there (then it is this cluster's, and the sweep may clean it). A location
/// inside the data directory is reached through no symbolic link.
fn check_tablespace_dirs(
    pgdata: &Path,
    spcs: &BTreeMap<String, PathBuf>,
    mapped: &BTreeSet<String>,
    delta: bool,
) -> anyhow::Result<()> {
    let data = normalized(pgdata);
    for (oid, loc) in spcs {
        if let Ok(inside) = loc.strip_prefix(&data) {
            let mut dir = data.clone();
            for c in inside.components() {
                dir.push(c);
                if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
                    bail!(
                        "the location of tablespace {oid}, \"{}\", is reached through the symbolic link \"{}\" in the data directory: refusing to restore it\nHINT: map it elsewhere with --tablespace-map NAME=PATH",
                        loc.display(),
                        dir.display()
                    );
                }
            }
        }
        if !std::fs::read_dir(loc).is_ok_and(|mut d| d.next().is_some()) {
            continue;
        }
        if !delta {
            bail!(
                "the location of tablespace {oid}, \"{}\", is not empty\nHINT: map it elsewhere with --tablespace-map NAME=PATH, or pass --delta",
                loc.display()
            );
        }
        let links = pgdata.join(manifest_rules::TABLESPACE_LINK_DIR);
        let link = links.join(oid);
        let ours = std::fs::read_link(&link).is_ok_and(|t| normalized(&links.join(t)) == *loc);
        if !mapped.contains(oid) && !ours {
            bail!(
                "the location of tablespace {oid}, \"{}\", is not empty and \"{}\" does not lead there: refusing a delta restore into it\nHINT: map it to this cluster's tablespace directory with --tablespace-map NAME=PATH",
                loc.display(),
                link.display()
            );
        }
    }
    Ok(())
}

/// Checks that no file or link of the manifest is written where a tablespace location inside
/// the data directory is, or above one: writing it would remove the location.
fn check_destinations(
    backup_id: &str,
    pgdata: &Path,
    spcs: &BTreeMap<String, PathBuf>,
    files: &[pb::FileEntry],
) -> anyhow::Result<()> {
    let nested: Vec<(&String, &PathBuf)> =
        spcs.iter().filter(|(_, l)| l.starts_with(pgdata)).collect();
    if nested.is_empty() {
        return Ok(());
    }
    for f in files
        .iter()
        .filter(|f| Kind::of(f) != Some(Kind::Directory))
    {
        let dest = destination(pgdata, spcs, &f.path).path;
        if let Some((oid, loc)) = nested.iter().find(|(_, l)| l.starts_with(&dest)) {
            bail!(
                "the manifest of backup {backup_id} lists \"{}\" where tablespace {oid} is restored (\"{}\"): refusing to restore it",
                f.path,
                loc.display()
            );
        }
    }
    Ok(())
}

/// Where a manifest entry is written: `path`, below `root` (the data directory or a
/// tablespace location).
#[derive(Debug)]
struct Dest<'a> {
    root: &'a Path,
    path: PathBuf,
}

/// Maps a manifest path (checked by the rules) to where it is written: the contents of a
/// mapped tablespace go into its location directly, never through its link.
fn destination<'a>(pgdata: &'a Path, spcs: &'a BTreeMap<String, PathBuf>, path: &str) -> Dest<'a> {
    if let Some(rest) = path.strip_prefix("pg_tblspc/")
        && let Some((oid, inner)) = rest.split_once('/')
        && let Some(loc) = spcs.get(oid)
    {
        return Dest {
            root: loc,
            path: loc.join(inner),
        };
    }
    Dest {
        root: pgdata,
        path: pgdata.join(path),
    }
}

/// Makes every directory between `dest.root` and `dest.path` a real directory, creating
/// missing ones (mode 0700). A symbolic link there is refused: the restore creates links
/// only as `pg_tblspc/<oid>` and never writes through them, so a link on the way is not its
/// own and nothing may be written through it.
fn prepare_parents(dest: &Dest) -> anyhow::Result<()> {
    let Some(parent) = dest
        .path
        .strip_prefix(dest.root)
        .ok()
        .and_then(Path::parent)
    else {
        return Ok(());
    };
    let mut dir = dest.root.to_path_buf();
    for c in parent.components() {
        dir.push(c);
        let mut raced = false;
        loop {
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => break,
                Ok(m) if m.file_type().is_symlink() => bail!(
                    "\"{}\" is a symbolic link: refusing to write \"{}\" through it",
                    dir.display(),
                    dest.path.display()
                ),
                Ok(_) => bail!(
                    "\"{}\" is not a directory: cannot write \"{}\"",
                    dir.display(),
                    dest.path.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !raced => {
                    // Another writer may create it first: then it is checked again.
                    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => raced = true,
                        Err(e) => {
                            return Err(e).with_context(|| format!("create \"{}\"", dir.display()));
                        }
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("stat \"{}\"", dir.display())),
            }
        }
    }
    Ok(())
}

/// Opens a directory without following a symbolic link.
fn open_dir_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(path)
}

/// Quotes a word for /bin/sh.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:@=,+-%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Quotes a value for postgresql.conf.
fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

struct Fetcher {
    client: BackupClient<Channel>,
    cluster: String,
    /// The tier the manifest came from: blocks are read from the same one.
    tier: u32,
    /// The dedup domain of the backup's blocks.
    domain: String,
    key: [u8; 32],
    rt: tokio::runtime::Handle,
    fetched_blocks: AtomicU64,
    fetched_bytes: AtomicU64,
    reused_blocks: AtomicU64,
    /// Relation files are written with O_DIRECT (see [`RestoreArgs::buffered_io`]).
    direct_io: bool,
}

impl Fetcher {
    /// Asks the server for blocks `ids`; [`fetch`](Self::fetch) takes the answer, so the
    /// next answer travels while the current one is written.
    fn request(&self, ids: &[[u8; 32]]) -> PendingBlocks {
        let mut client = self.client.clone();
        let request = pb::GetBlocksRequest {
            cluster: self.cluster.clone(),
            ids: ids.iter().flatten().copied().collect::<Vec<u8>>().into(),
            tier: self.tier,
            domain: self.domain.clone(),
            runs: true,
        };
        self.rt
            .spawn(async move { client.get_blocks(request).await })
    }

    /// Takes the answer of a [`request`](Self::request) for blocks `ids`, checks each block
    /// against its id and its expected length (`lens`, known from the manifest before the
    /// server says anything) and puts their plaintexts one after the other into `buf`.
    fn fetch(
        &self,
        pending: PendingBlocks,
        ids: &[[u8; 32]],
        lens: &[usize],
        path: &str,
        buf: &mut AlignedBuf,
    ) -> anyhow::Result<()> {
        let r = self
            .rt
            .block_on(pending)
            .context("a fetch task failed")?
            .map_err(|s| status_error(&format!("fetch the blocks of \"{path}\""), s))?
            .into_inner();
        if r.blocks.len() != ids.len() {
            bail!(
                "the server returned {} blocks of \"{path}\", not {}",
                r.blocks.len(),
                ids.len()
            );
        }
        // The sizes come from the manifest (bounded by the block size), never from the
        // server's answer.
        let total: usize = lens.iter().sum();
        let buf = buf.slice(total);
        let corrupt = |id: &[u8; 32], why: &str| {
            anyhow::anyhow!(
                "block {} of \"{path}\" is corrupt: {why}\nHINT: run `klio verify` to find the damaged objects",
                hex::encode(id)
            )
        };
        let mut dctx = zstd::bulk::Decompressor::new().context("zstd decompressor")?;
        // Blocks inside frames, by the block that carries their frame: each frame is
        // decompressed once, for all its blocks, wherever they are in the answer.
        let mut in_frame: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        let mut pos = 0;
        let mut starts = Vec::with_capacity(ids.len());
        for (i, ((b, id), &len)) in r.blocks.iter().zip(ids).zip(lens).enumerate() {
            starts.push(pos);
            if b.plain_len as usize != len {
                return Err(corrupt(
                    id,
                    &format!("it has {} bytes where the file has {len}", b.plain_len),
                ));
            }
            let out = &mut buf[pos..pos + len];
            pos += len;
            if b.frame_len == 0 {
                if b.frame_block != 0 {
                    return Err(corrupt(id, "the server sent no frame for it"));
                }
                decode_payload(&mut dctx, b.compressed, &b.data, out)
                    .map_err(|why| corrupt(id, &format!("it {why}")))?;
                if !matches_id(&self.key, out, id) {
                    return Err(corrupt(id, "its content does not match its id"));
                }
                continue;
            }
            let carrier = match b.frame_block as usize {
                0 => i,
                k if k <= i && r.blocks[k - 1].frame_block == 0 => k - 1,
                _ => return Err(corrupt(id, "the server sent no frame for it")),
            };
            in_frame.entry(carrier).or_default().push(i);
        }
        let mut frame: Vec<u8> = Vec::new();
        for (carrier, members) in in_frame {
            let c = &r.blocks[carrier];
            let frame_len = c.frame_len as usize;
            let first = &ids[carrier];
            if frame_len == 0 || frame_len > MAX_BLOCK_SIZE {
                return Err(corrupt(first, "its frame has an impossible length"));
            }
            frame.resize(frame_len, 0);
            decode_payload(&mut dctx, c.compressed, &c.data, &mut frame)
                .map_err(|why| corrupt(first, &format!("its frame {why}")))?;
            for i in members {
                let (b, id, len) = (&r.blocks[i], &ids[i], lens[i]);
                let start = b.frame_offset as usize;
                if b.frame_len as usize != frame_len || start + len > frame_len {
                    return Err(corrupt(id, "it lies beyond the frame that holds it"));
                }
                let out = &mut buf[starts[i]..starts[i] + len];
                out.copy_from_slice(&frame[start..start + len]);
                if !matches_id(&self.key, out, id) {
                    return Err(corrupt(id, "its content does not match its id"));
                }
            }
        }
        self.fetched_bytes
            .fetch_add(total as u64, Ordering::Relaxed);
        self.fetched_blocks
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The block ids of a blocklist of the backup.
    fn blocklist(&self, id: &[u8], path: &str) -> anyhow::Result<Vec<[u8; 32]>> {
        let mut client = self.client.clone();
        let r = self
            .rt
            .block_on(client.get_blocklist(pb::GetBlocklistRequest {
                cluster: self.cluster.clone(),
                id: id.to_vec().into(),
                tier: self.tier,
                domain: self.domain.clone(),
            }))
            .map_err(|s| status_error(&format!("read a blocklist of \"{path}\""), s))?
            .into_inner();
        if !r.ids.len().is_multiple_of(32) {
            bail!("the server sent a blocklist of \"{path}\" that is not a list of block ids");
        }
        Ok(ids_of(&r.ids))
    }

    /// Writes one file: fetches the blocks that `existing` (the current file, in a delta
    /// restore) does not already hold. A file cut into blocks is written one blocklist at a
    /// time, so memory does not grow with the size of the file. The file is opened without
    /// following a symbolic link, below parents that are real directories.
    fn write_file(&self, f: &pb::FileEntry, dest: &Dest, delta: bool) -> anyhow::Result<()> {
        // Checked with the whole manifest already; repeated here because it bounds what is
        // allocated below.
        if f.block_size as usize > MAX_BLOCK_SIZE
            || (f.block_size == 0 && f.size > MAX_BLOCK_SIZE as u64)
        {
            bail!(
                "the manifest lists \"{}\" with blocks larger than {MAX_BLOCK_SIZE} bytes",
                f.path
            );
        }
        let block_size = if f.block_size == 0 {
            f.size.max(1)
        } else {
            u64::from(f.block_size)
        };
        let expected = manifest_rules::expected_blocks(f.size, f.block_size);
        let path = &dest.path;
        prepare_parents(dest)?;
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && !meta.is_file()
        {
            remove_any(path)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW);
        if delta {
            options.create(true);
        } else {
            options.create_new(true);
        }
        // A new file of whole aligned blocks is written with direct I/O: every write is a
        // run of blocks at a block offset, from an aligned buffer. Where the file system
        // refuses O_DIRECT (EINVAL: tmpfs, some network file systems), through the page
        // cache; the file is new and empty then.
        let direct = self.direct_io
            && !delta
            && f.block_size as usize >= DIRECT_ALIGN
            && (f.block_size as usize).is_multiple_of(DIRECT_ALIGN)
            && f.size.is_multiple_of(DIRECT_ALIGN as u64);
        let opened = if direct {
            let mut o = options.clone();
            o.custom_flags(libc::O_NOFOLLOW | libc::O_DIRECT);
            match o.open(path) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    options.create_new(false).create(true);
                    options.open(path)
                }
                other => other,
            }
        } else {
            options.open(path)
        };
        let file = opened.with_context(|| format!("create \"{}\"", path.display()))?;
        // Only a delta restore reads what the file holds.
        let mut buf = if delta {
            vec![0u8; DELTA_READ_BYTES.max(block_size as usize)]
        } else {
            Vec::new()
        };
        let mut first = 0u64;
        let lists: Vec<Option<&[u8]>> = if f.blocklists.is_empty() {
            vec![None]
        } else {
            f.blocklists.iter().map(|l| Some(l.as_ref())).collect()
        };
        for list in lists {
            let ids = match list {
                None => ids_of(&f.block_ids),
                Some(l) => self.blocklist(l, &f.path)?,
            };
            let after = first + ids.len() as u64;
            if after > expected {
                bail!(
                    "the manifest lists more blocks for \"{}\" of {} bytes than the {expected} its size calls for\nHINT: run `klio verify` on the backup",
                    f.path,
                    f.size
                );
            }
            self.write_blocks(f, path, &file, &ids, first, block_size, delta, &mut buf)?;
            first = after;
        }
        if first != expected {
            bail!(
                "the manifest lists {first} blocks for \"{}\" of {} bytes, not {expected}\nHINT: run `klio verify` on the backup",
                f.path,
                f.size
            );
        }
        // What already matches is not set again: a delta restore of an unchanged file then
        // dirties nothing, and its sync costs no journal commit.
        let current = file
            .metadata()
            .with_context(|| format!("read the metadata of \"{}\"", path.display()))?;
        if current.len() != f.size {
            file.set_len(f.size)
                .with_context(|| format!("write \"{}\"", path.display()))?;
        }
        let mode = manifest_rules::permission_bits(f.mode);
        if current.permissions().mode() & 0o7777 != mode {
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("set the mode of \"{}\"", path.display()))?;
        }
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(f.mtime.max(0) as u64);
        if current.modified().ok() != Some(mtime) {
            let _ = file.set_modified(mtime);
        }
        file.sync_all()
            .with_context(|| format!("sync \"{}\"", path.display()))?;
        Ok(())
    }

    /// Writes blocks `first..first + ids.len()` of a file.
    #[allow(clippy::too_many_arguments)]
    fn write_blocks(
        &self,
        f: &pb::FileEntry,
        dest: &Path,
        file: &std::fs::File,
        ids: &[[u8; 32]],
        first: u64,
        block_size: u64,
        delta: bool,
        buf: &mut [u8],
    ) -> anyhow::Result<()> {
        let mut needed: Vec<(u64, [u8; 32])> = Vec::new();
        // Every block is `block_size` bytes but the last, which has the rest.
        let len_at = |off: u64| block_size.min(f.size - off.min(f.size)) as usize;
        if delta {
            // What the file holds, read in chunks of whole blocks (a system call per block
            // cost more than hashing it); blocks it holds already are not fetched.
            let per_read = (buf.len() as u64 / block_size).max(1) as usize;
            for (c, chunk) in ids.chunks(per_read).enumerate() {
                let start = (first + (c * per_read) as u64) * block_size;
                let end = (start + chunk.len() as u64 * block_size).min(f.size);
                let n = read_at_full(file, &mut buf[..end.saturating_sub(start) as usize], start)
                    .with_context(|| format!("read \"{}\"", dest.display()))?;
                for (k, id) in chunk.iter().enumerate() {
                    let off = start + k as u64 * block_size;
                    let (at, len) = ((off - start) as usize, len_at(off));
                    if at + len <= n && matches_id(&self.key, &buf[at..at + len], id) {
                        self.reused_blocks.fetch_add(1, Ordering::Relaxed);
                    } else {
                        needed.push((off, *id));
                    }
                }
            }
        } else {
            needed = ids
                .iter()
                .enumerate()
                .map(|(i, id)| ((first + i as u64) * block_size, *id))
                .collect();
        }
        let per_call = (FETCH_BYTES as u64 / block_size).max(1) as usize;
        let mut aligned = AlignedBuf::default();
        let chunks: Vec<&[(u64, [u8; 32])]> = needed.chunks(per_call).collect();
        let chunk_ids =
            |c: &[(u64, [u8; 32])]| -> Vec<[u8; 32]> { c.iter().map(|(_, id)| *id).collect() };
        // One answer ahead: the next blocks travel while these are checked and written.
        let mut next = chunks.first().map(|c| self.request(&chunk_ids(c)));
        for (k, chunk) in chunks.iter().enumerate() {
            let ids = chunk_ids(chunk);
            let lens: Vec<usize> = chunk.iter().map(|(off, _)| len_at(*off)).collect();
            let pending = match next.take() {
                Some(p) => p,
                None => self.request(&ids),
            };
            next = chunks.get(k + 1).map(|c| self.request(&chunk_ids(c)));
            self.fetch(pending, &ids, &lens, &f.path, &mut aligned)?;
            let data = aligned.filled();
            // Blocks that follow each other in the file are written with one call.
            let mut run: Option<(u64, usize, usize)> = None; // (file offset, start in data, len)
            let mut pos = 0;
            for ((off, _), len) in chunk.iter().zip(lens) {
                run = match run {
                    Some((o, s, l)) if o + l as u64 == *off => Some((o, s, l + len)),
                    Some((o, s, l)) => {
                        file.write_all_at(&data[s..s + l], o)
                            .with_context(|| format!("write \"{}\"", dest.display()))?;
                        Some((*off, pos, len))
                    }
                    None => Some((*off, pos, len)),
                };
                pos += len;
            }
            if let Some((o, s, l)) = run {
                file.write_all_at(&data[s..s + l], o)
                    .with_context(|| format!("write \"{}\"", dest.display()))?;
            }
        }
        Ok(())
    }
}

/// Puts a block's or frame's payload as sent (`data`, zstd-compressed when `compressed`)
/// into `out`, which it must fill exactly; the error says what is wrong with it.
fn decode_payload(
    dctx: &mut zstd::bulk::Decompressor<'static>,
    compressed: bool,
    data: &[u8],
    out: &mut [u8],
) -> Result<(), &'static str> {
    if compressed {
        let n = dctx
            .decompress_to_buffer(data, out)
            .map_err(|_| "does not decompress")?;
        if n != out.len() {
            return Err("has the wrong length");
        }
    } else if data.len() == out.len() {
        out.copy_from_slice(data);
    } else {
        return Err("has the wrong length");
    }
    Ok(())
}

/// An answer of `GetBlocks` on its way.
type PendingBlocks =
    tokio::task::JoinHandle<Result<tonic::Response<pb::GetBlocksResponse>, tonic::Status>>;

/// Alignment of the buffers and offsets of direct writes (O_DIRECT): a page, a multiple of
/// every logical block size a file system uses.
const DIRECT_ALIGN: usize = 4096;

/// A buffer whose contents start at a [`DIRECT_ALIGN`]-aligned address, so that a file
/// opened with O_DIRECT can be written from it.
#[derive(Default)]
struct AlignedBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zeroed bytes at an aligned address.
    fn slice(&mut self, len: usize) -> &mut [u8] {
        if self.vec.len() < len + DIRECT_ALIGN {
            self.vec = vec![0u8; len + DIRECT_ALIGN];
        }
        self.start = self.vec.as_ptr().align_offset(DIRECT_ALIGN);
        self.len = len;
        // Every byte is written by the caller before it is read.
        &mut self.vec[self.start..self.start + len]
    }

    /// What the last [`slice`](Self::slice) holds.
    fn filled(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }
}

/// Concatenated 32-byte block ids (a multiple of 32 bytes; a trailing remainder is ignored).
fn ids_of(bytes: &[u8]) -> Vec<[u8; 32]> {
    bytes
        .chunks_exact(32)
        .map(|c| {
            let mut a = [0u8; 32];
            a.copy_from_slice(c);
            a
        })
        .collect()
}

fn read_at_full(file: &std::fs::File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn remove_any(p: &Path) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(p).with_context(|| format!("stat \"{}\"", p.display()))?;
    if meta.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
    .with_context(|| format!("remove \"{}\"", p.display()))
}

/// What a delta restore removes (planned before anything is removed): what the backup does
/// not have under the data directory, and inside the directories the backup lists directly in
/// each tablespace location (anything else there, such as another major version's
/// directory, is left alone). Symbolic links are never followed (a link is removed itself),
/// and neither the data directory nor a tablespace location is ever removed.
fn plan_sweep(
    pgdata: &Path,
    spcs: &BTreeMap<String, PathBuf>,
    expected: &HashSet<PathBuf>,
) -> anyhow::Result<Vec<PathBuf>> {
    let keep: HashSet<&Path> = spcs
        .values()
        .map(PathBuf::as_path)
        .chain([pgdata])
        .collect();
    let mut plan = Vec::new();
    sweep_dir(pgdata, expected, &keep, &mut plan)?;
    for loc in spcs.values() {
        let entries = match std::fs::read_dir(loc) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("read \"{}\"", loc.display())),
        };
        for e in entries {
            let e = e.with_context(|| format!("read \"{}\"", loc.display()))?;
            let p = e.path();
            if expected.contains(&p) && !keep.contains(p.as_path()) && e.file_type()?.is_dir() {
                sweep_dir(&p, expected, &keep, &mut plan)?;
            }
        }
    }
    Ok(plan)
}

/// Plans the removal of what is under `dir` and not expected; descends only into real
/// directories (`DirEntry::file_type` does not follow links) and skips `keep`.
fn sweep_dir(
    dir: &Path,
    expected: &HashSet<PathBuf>,
    keep: &HashSet<&Path>,
    plan: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("read \"{}\"", dir.display())),
    };
    for e in entries {
        let e = e.with_context(|| format!("read \"{}\"", dir.display()))?;
        let p = e.path();
        if keep.contains(p.as_path()) {
            continue;
        }
        // A directory holding a tablespace location is descended into, never removed.
        let holds_kept = keep.iter().any(|k| k.starts_with(&p));
        if !expected.contains(&p) && !holds_kept {
            plan.push(p);
        } else if e.file_type()?.is_dir() {
            sweep_dir(&p, expected, keep, plan)?;
        }
    }
    Ok(())
}

/// What [`restore_data`] restored.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The backup written.
    pub backup_id: String,
    /// Its metadata (as `klio backups show` prints it).
    pub metadata: Value,
    /// Why it was chosen.
    pub why: String,
}

/// `klio restore`: [`restore_data`], then the recovery settings (`restore_command` through
/// `klio wal-get`, the target, `recovery.signal`).
pub async fn run(args: RestoreArgs) -> anyhow::Result<()> {
    let restored = restore_data(&args).await?;
    let pgdata = std::path::absolute(&args.pgdata).unwrap_or(args.pgdata.clone());
    write_recovery_settings(&args, &pgdata)?;
    println!("{}", restored.backup_id);
    Ok(())
}

/// Chooses the backup for the target, writes its files into `--pgdata` (and the tablespace
/// locations) with its `backup_label` and `tablespace_map`, durably; recovery settings are
/// left to the caller (`klio restore` writes its own, CloudNativePG writes its own).
#[tracing::instrument(name = "klio.restore", skip_all, fields(cluster = %args.client.cluster, backup_id))]
pub async fn restore_data(args: &RestoreArgs) -> anyhow::Result<Restored> {
    let cluster = args.client.cluster.clone();
    // Normalized, so that it compares with the tablespace locations.
    let pgdata = normalized(&args.pgdata);
    check_target_dir(&pgdata, args.delta)?;
    let target_time = args
        .target_time
        .as_deref()
        .map(parse_target_time)
        .transpose()?;
    let target_lsn = args
        .target_lsn
        .as_deref()
        .map(|s| {
            s.parse::<klio_pg::Lsn>()
                .map(|l| l.0)
                .context("--target-lsn")
        })
        .transpose()?;
    let mut client = backup_client(&args.client).await?;
    let backups = list_backups(&mut client, &cluster, args.client.tier2_recovery).await?;
    let (chosen, why) = choose(args, &backups, target_time, target_lsn)?;
    tracing::Span::current().record("backup_id", chosen.id.as_str());
    eprintln!(
        "restoring backup {} of cluster \"{cluster}\"{}: {why}",
        chosen.id,
        if chosen.in_tier1 { "" } else { " from Tier 2" }
    );
    let (m, files) = read_manifest(
        &mut client,
        &cluster,
        &chosen.id,
        args.client.tier2_recovery,
    )
    .await
    .map_err(|s| status_error(&format!("read the manifest of backup {}", chosen.id), s))?;
    let meta: Value = serde_json::from_slice(&m.metadata_json)
        .with_context(|| format!("the metadata of backup {}", chosen.id))?;
    let key: [u8; 32] = m
        .block_id_key
        .as_ref()
        .try_into()
        .context("the server sent a block id key that is not 32 bytes")?;
    // Backups taken before Klio left out symbolic links other than the tablespace links may
    // list some (a log directory linked elsewhere): they are not restored (a restore never
    // creates a link it was not asked for by a tablespace), the rest of the backup is.
    // A link with entries under it is kept, for the rules to refuse the whole manifest.
    let parents: HashSet<&str> = files
        .iter()
        .filter_map(|f| f.path.rsplit_once('/').map(|(p, _)| p))
        .flat_map(|p| {
            p.match_indices('/')
                .map(move |(i, _)| &p[..i])
                .chain(std::iter::once(p))
        })
        .collect();
    let droppable: HashSet<String> = files
        .iter()
        .filter(|f| {
            Kind::of(f) == Some(Kind::Symlink)
                && manifest_rules::tablespace_link_oid(&f.path).is_none()
                && !parents.contains(f.path.as_str())
        })
        .map(|f| f.path.clone())
        .collect();
    let (dropped, files): (Vec<pb::FileEntry>, Vec<pb::FileEntry>) =
        files.into_iter().partition(|f| droppable.contains(&f.path));
    for f in &dropped {
        eprintln!(
            "warning: backup {} lists the symbolic link \"{}\" -> \"{}\" outside {}: it is not restored; recreate it if PostgreSQL needs it",
            chosen.id,
            f.path.escape_debug(),
            f.target.escape_debug(),
            manifest_rules::TABLESPACE_LINK_DIR
        );
    }
    // Everything is checked before the first byte is written.
    check_manifest(&chosen.id, &files)?;
    let (spcs, mapped) = tablespace_locations(args, &pgdata, &chosen.id, &meta, &files)?;
    check_tablespace_dirs(&pgdata, &spcs, &mapped, args.delta)?;
    check_destinations(&chosen.id, &pgdata, &spcs, &files)?;

    let t0 = std::time::Instant::now();
    let stats = {
        let pgdata = pgdata.clone();
        let spcs = spcs.clone();
        let delta = args.delta;
        let fetcher = Arc::new(Fetcher {
            client: client.clone(),
            cluster: cluster.clone(),
            tier: m.tier,
            domain: m.domain.clone(),
            key,
            rt: tokio::runtime::Handle::current(),
            fetched_blocks: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            reused_blocks: AtomicU64::new(0),
            direct_io: !args.buffered_io,
        });
        let jobs = args.jobs;
        let f2 = fetcher.clone();
        tokio::task::spawn_blocking(move || write_all(&pgdata, &spcs, files, delta, jobs, &f2))
            .await??;
        (
            fetcher.fetched_blocks.load(Ordering::Relaxed),
            fetcher.fetched_bytes.load(Ordering::Relaxed),
            fetcher.reused_blocks.load(Ordering::Relaxed),
        )
    };
    write_label_files(&pgdata, &spcs, &meta)?;
    eprintln!(
        "restored backup {} into \"{}\" in {:.1} s: {} blocks ({} bytes) fetched, {} blocks reused",
        chosen.id,
        pgdata.display(),
        t0.elapsed().as_secs_f64(),
        stats.0,
        stats.1,
        stats.2
    );
    Ok(Restored {
        backup_id: chosen.id,
        metadata: meta,
        why,
    })
}

/// Whether `data` is the block named `id` (as the server sends it: 32 bytes, of which the
/// block is named by the first 16, the keyed hash's first 16; the rest is zeros from a
/// current server, the rest of the hash from an older one).
fn matches_id(key: &[u8; 32], data: &[u8], id: &[u8; 32]) -> bool {
    blake3::keyed_hash(key, data).as_bytes()[..16] == id[..16]
}

/// Reads a manifest: its first message (metadata, key, tier, domain) and every file.
async fn read_manifest(
    client: &mut BackupClient<Channel>,
    cluster: &str,
    backup_id: &str,
    tier2_recovery: bool,
) -> Result<(pb::GetManifestResponse, Vec<pb::FileEntry>), tonic::Status> {
    let mut stream = client
        .get_manifest(pb::GetManifestRequest {
            cluster: cluster.to_string(),
            backup_id: backup_id.to_string(),
            tier2_recovery,
            short_ids: true,
        })
        .await?
        .into_inner();
    let mut first = stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::data_loss("the server sent an empty manifest"))?;
    let mut files = std::mem::take(&mut first.files);
    while let Some(mut more) = stream.message().await? {
        files.append(&mut more.files);
    }
    Ok((first, files))
}

/// Creates directories and links, sweeps what a delta restore must drop, then writes the
/// files with `jobs` threads. The manifest has been checked against the rules, and every
/// tablespace link has a location in `spcs`.
fn write_all(
    pgdata: &Path,
    spcs: &BTreeMap<String, PathBuf>,
    files: Vec<pb::FileEntry>,
    delta: bool,
    jobs: u16,
    fetcher: &Arc<Fetcher>,
) -> anyhow::Result<()> {
    klio_durable::create_dir_all_durable(pgdata)
        .with_context(|| format!("create \"{}\"", pgdata.display()))?;
    std::fs::set_permissions(pgdata, std::fs::Permissions::from_mode(0o700))?;
    for loc in spcs.values() {
        klio_durable::create_dir_all_durable(loc)
            .with_context(|| format!("create tablespace directory \"{}\"", loc.display()))?;
    }
    let entries: Vec<(pb::FileEntry, Dest)> = files
        .into_iter()
        .map(|f| {
            let dest = destination(pgdata, spcs, &f.path);
            (f, dest)
        })
        .collect();
    if delta {
        let expected: HashSet<PathBuf> = entries.iter().map(|(_, d)| d.path.clone()).collect();
        let plan = plan_sweep(pgdata, spcs, &expected)?;
        for p in &plan {
            remove_any(p)?;
        }
        tracing::info!(
            removed = plan.len(),
            "delta restore: removed files the backup does not have"
        );
    }
    let mut dirs = Vec::new();
    let mut regular = Vec::new();
    for (f, dest) in entries {
        match Kind::of(&f) {
            Some(Kind::Directory) => {
                prepare_parents(&dest)?;
                match std::fs::symlink_metadata(&dest.path) {
                    Ok(m) if m.is_dir() => {}
                    // A link or a file where the backup has a directory (a delta restore):
                    // the link itself goes, whatever it leads to stays untouched.
                    Ok(_) => {
                        remove_any(&dest.path)?;
                        create_dir(&dest.path)?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_dir(&dest.path)?,
                    Err(e) => {
                        return Err(e).with_context(|| format!("stat \"{}\"", dest.path.display()));
                    }
                }
                let mode = manifest_rules::permission_bits(f.mode);
                open_dir_nofollow(&dest.path)
                    .and_then(|d| d.set_permissions(std::fs::Permissions::from_mode(mode)))
                    .with_context(|| format!("set the mode of \"{}\"", dest.path.display()))?;
                dirs.push(dest.path);
            }
            Some(Kind::Symlink) => {
                // Only tablespace links pass the rules; each leads to its location, whatever
                // target the manifest names.
                let loc = manifest_rules::tablespace_link_oid(&f.path)
                    .and_then(|oid| spcs.get(oid))
                    .with_context(|| {
                        format!("the tablespace link \"{}\" has no location", f.path)
                    })?;
                prepare_parents(&dest)?;
                if std::fs::read_link(&dest.path).is_ok_and(|cur| cur == *loc) {
                    continue;
                }
                if std::fs::symlink_metadata(&dest.path).is_ok() {
                    remove_any(&dest.path)?;
                }
                std::os::unix::fs::symlink(loc, &dest.path).with_context(|| {
                    format!(
                        "create link \"{}\" -> \"{}\"",
                        dest.path.display(),
                        loc.display()
                    )
                })?;
            }
            Some(Kind::File) => regular.push((f, dest)),
            None => bail!("the manifest has an entry of unknown kind: \"{}\"", f.path),
        }
    }
    // Workers pop from the end: largest first, so the threads finish together.
    regular.sort_by_key(|r| r.0.size);
    let queue = Mutex::new(regular);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::default();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            let (queue, failure) = (&queue, &failure);
            let fetcher = fetcher.clone();
            s.spawn(move || {
                loop {
                    let next = queue.lock().unwrap_or_else(PoisonError::into_inner).pop();
                    let Some((f, dest)) = next else { break };
                    if let Err(e) = fetcher.write_file(&f, &dest, delta) {
                        queue.lock().unwrap_or_else(PoisonError::into_inner).clear();
                        failure
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(PoisonError::into_inner) {
        return Err(e.context(format!(
            "the restore into \"{}\" failed and is incomplete: do not start PostgreSQL on it",
            pgdata.display()
        )));
    }
    for d in dirs.iter().map(PathBuf::as_path).chain([pgdata]) {
        klio_durable::sync_dir(d).with_context(|| format!("sync \"{}\"", d.display()))?;
    }
    Ok(())
}

/// Creates a directory (its mode is set afterwards).
fn create_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .with_context(|| format!("create \"{}\"", path.display()))
}

/// The path `restore_command` runs: how this process was started when that was a path
/// (it survives the binary being replaced on disk), else the running executable.
fn klio_executable() -> anyhow::Result<PathBuf> {
    if let Some(arg0) = std::env::args_os().next().map(PathBuf::from)
        && arg0.components().count() > 1
        && arg0.is_file()
    {
        return Ok(std::path::absolute(&arg0).unwrap_or(arg0));
    }
    let exe = std::env::current_exe().context("find the klio executable")?;
    let shown = exe.display().to_string();
    Ok(match shown.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

/// backup_label and tablespace_map.
fn write_label_files(
    pgdata: &Path,
    spcs: &BTreeMap<String, PathBuf>,
    meta: &Value,
) -> anyhow::Result<()> {
    let label = meta["backup_label"]
        .as_str()
        .context("the backup has no backup_label")?;
    klio_durable::write_atomic(&pgdata.join("backup_label"), label.as_bytes(), 0o600)?;
    let map_path = pgdata.join("tablespace_map");
    if spcs.is_empty() {
        if map_path.exists() {
            std::fs::remove_file(&map_path)?;
        }
    } else {
        let map: String = spcs
            .iter()
            .map(|(oid, loc)| {
                format!(
                    "{oid} {}\n",
                    tablespace_map_escape(&loc.display().to_string())
                )
            })
            .collect();
        klio_durable::write_atomic(&map_path, map.as_bytes(), 0o600)?;
    }
    Ok(())
}

/// A path as a line of tablespace_map holds it: line breaks and backslashes escaped with a
/// backslash, as PostgreSQL writes and reads them.
fn tablespace_map_escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(c, '\n' | '\r' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `restore_command` through `klio wal-get`, the recovery target and `recovery.signal`.
fn write_recovery_settings(args: &RestoreArgs, pgdata: &Path) -> anyhow::Result<()> {
    let exe = klio_executable()?;
    let mut words = vec![sh_quote(&exe.display().to_string()), "wal-get".to_string()];
    words.extend(args.client.to_args().iter().map(|a| sh_quote(a)));
    words.push("%f".to_string());
    words.push("%p".to_string());
    let mut conf = String::from("\n# Added by klio restore\n");
    conf += &format!("restore_command = {}\n", conf_quote(&words.join(" ")));
    let target = if let Some(t) = &args.target_time {
        let t = parse_target_time(t)?;
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]+00"
        );
        let utc = t.to_offset(time::UtcOffset::UTC);
        Some(format!(
            "recovery_target_time = {}",
            conf_quote(&utc.format(&fmt)?)
        ))
    } else if let Some(l) = &args.target_lsn {
        Some(format!("recovery_target_lsn = {}", conf_quote(l)))
    } else if let Some(x) = &args.target_xid {
        Some(format!("recovery_target_xid = {}", conf_quote(x)))
    } else if let Some(n) = &args.target_name {
        Some(format!("recovery_target_name = {}", conf_quote(n)))
    } else if args.target_immediate {
        Some("recovery_target = 'immediate'".to_string())
    } else {
        None
    };
    if let Some(t) = target {
        conf += &t;
        conf += "\nrecovery_target_action = 'promote'\n";
    }
    conf += &format!(
        "recovery_target_timeline = {}\n",
        conf_quote(args.target_timeline.as_deref().unwrap_or("latest"))
    );
    let auto = pgdata.join("postgresql.auto.conf");
    let mut content = String::new();
    if let Ok(mut f) = std::fs::File::open(&auto) {
        f.read_to_string(&mut content)?;
    }
    content += &conf;
    klio_durable::write_atomic(&auto, content.as_bytes(), 0o600)?;
    let _ = std::fs::remove_file(pgdata.join("standby.signal"));
    klio_durable::write_atomic(&pgdata.join("recovery.signal"), b"", 0o600)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn target_times_parse_with_and_without_offsets() {
        let utc = parse_target_time("2026-11-21 10:15:00").unwrap();
        assert_eq!(utc.unix_timestamp(), 1_795_256_100);
        let plus = parse_target_time("2026-11-21 11:15:00+01").unwrap();
        assert_eq!(plus.unix_timestamp(), utc.unix_timestamp());
        let frac = parse_target_time("2026-11-21T10:15:00.5Z").unwrap();
        assert_eq!(frac.unix_timestamp(), utc.unix_timestamp());
        assert_eq!(frac.nanosecond(), 500_000_000);
        let minus = parse_target_time("2026-11-21 05:45:00.123456-04:30").unwrap();
        assert_eq!(minus.unix_timestamp(), utc.unix_timestamp());
        assert!(parse_target_time("yesterday").is_err());
        assert!(parse_target_time("2026-13-01 00:00:00").is_err());
    }

    #[test]
    fn normalized_paths_are_absolute_without_dot_components() {
        assert_eq!(normalized(Path::new("/a/./b/../c")), Path::new("/a/c"));
        assert_eq!(normalized(Path::new("/a//b/")), Path::new("/a/b"));
        assert_eq!(normalized(Path::new("/..")), Path::new("/"));
        assert!(normalized(Path::new("rel")).is_absolute());
    }

    #[test]
    fn tablespace_map_lines_escape_line_breaks_and_backslashes() {
        assert_eq!(tablespace_map_escape("/mnt/ts1"), "/mnt/ts1");
        assert_eq!(tablespace_map_escape("/a\nb\\c"), "/a\\\nb\\\\c");
    }

    #[test]
    fn shell_and_conf_quoting() {
        assert_eq!(sh_quote("/usr/bin/klio"), "/usr/bin/klio");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(conf_quote("it's"), "'it''s'");
    }
}
