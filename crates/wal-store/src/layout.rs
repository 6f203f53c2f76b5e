//! Where each file of a cluster's archive lives.
//!
//! ```text
//! <root>/<cluster>/cluster.json                 identity (system id, segment size)
//! <root>/<cluster>/<TTTTTTTT>/<segment>          sealed complete segment
//! <root>/<cluster>/<TTTTTTTT>/<segment>.partial  sealed last segment of a finished timeline
//! <root>/<cluster>/<TTTTTTTT>/<segment>.open     segment being received (appended frames)
//! <root>/<cluster>/history/<TTTTTTTT>.history    sealed timeline history file
//! <root>/<cluster>/other/<name>.backup           sealed backup history file
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use klio_pg::{SegmentNo, SegmentSize, TimeLineId, WalFileName};

use crate::{Error, io_err};

pub const META_FILE: &str = "cluster.json";
const OPEN_SUFFIX: &str = ".open";

/// Cluster names: lowercase letters, digits, '-' and '.', starting and ending with a letter
/// or digit, at most 63 characters (Kubernetes object names are a subset).
pub fn validate_cluster_name(name: &str) -> Result<(), Error> {
    let b = name.as_bytes();
    let ok_char = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.';
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let valid = !b.is_empty()
        && b.len() <= 63
        && b.iter().all(ok_char)
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum);
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidClusterName(name.to_string()))
    }
}

pub fn timeline_dir(dir: &Path, tli: TimeLineId) -> PathBuf {
    dir.join(format!("{:08X}", tli.0))
}

pub fn segment_path(dir: &Path, tli: TimeLineId, segno: SegmentNo, size: SegmentSize) -> PathBuf {
    timeline_dir(dir, tli).join(WalFileName::segment(tli, segno, size).to_string())
}

pub fn partial_path(dir: &Path, tli: TimeLineId, segno: SegmentNo, size: SegmentSize) -> PathBuf {
    timeline_dir(dir, tli).join(
        WalFileName::Partial {
            timeline: tli,
            segno,
            size,
        }
        .to_string(),
    )
}

pub fn open_file_name(tli: TimeLineId, segno: SegmentNo, size: SegmentSize) -> String {
    format!("{}{OPEN_SUFFIX}", WalFileName::segment(tli, segno, size))
}

pub fn open_path(dir: &Path, tli: TimeLineId, segno: SegmentNo, size: SegmentSize) -> PathBuf {
    timeline_dir(dir, tli).join(open_file_name(tli, segno, size))
}

/// History and `.backup` files.
pub fn other_path(dir: &Path, name: &WalFileName) -> PathBuf {
    match name {
        WalFileName::History { .. } => dir.join("history").join(name.to_string()),
        _ => dir.join("other").join(name.to_string()),
    }
}

/// Timelines that have a directory, ascending.
pub fn timelines(dir: &Path) -> Result<Vec<TimeLineId>, Error> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("list cluster directory", dir)(e)),
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.len() == 8
            && name
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
            && let Ok(v) = u32::from_str_radix(&name, 16)
        {
            out.push(TimeLineId(v));
        }
    }
    out.sort();
    Ok(out)
}

/// The files of one timeline directory, each list ascending.
#[derive(Debug, Default)]
pub struct TimelineScan {
    pub complete: Vec<SegmentNo>,
    pub partials: Vec<SegmentNo>,
    pub open: Vec<SegmentNo>,
}

pub fn scan_timeline(
    dir: &Path,
    tli: TimeLineId,
    size: SegmentSize,
) -> Result<TimelineScan, Error> {
    let tdir = timeline_dir(dir, tli);
    let mut scan = TimelineScan::default();
    let rd = match fs::read_dir(&tdir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(io_err("list timeline directory", &tdir)(e)),
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(klio_durable::TMP_SUFFIX) || name.starts_with('.') {
            continue;
        }
        if let Some(base) = name.strip_suffix(OPEN_SUFFIX) {
            if let Ok(WalFileName::Segment {
                timeline, segno, ..
            }) = WalFileName::parse(base, size)
                && timeline == tli
            {
                scan.open.push(segno);
            }
            continue;
        }
        match WalFileName::parse(&name, size) {
            Ok(WalFileName::Segment {
                timeline, segno, ..
            }) if timeline == tli => scan.complete.push(segno),
            Ok(WalFileName::Partial {
                timeline, segno, ..
            }) if timeline == tli => scan.partials.push(segno),
            _ => {}
        }
    }
    scan.complete.sort();
    scan.partials.sort();
    scan.open.sort();
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names() {
        for ok in ["a", "cluster-example", "pg.prod-1", "x1"] {
            assert!(validate_cluster_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "-a", "a-", "..", "a/b", "a_b", &"x".repeat(64)] {
            assert!(validate_cluster_name(bad).is_err(), "{bad}");
        }
    }
}
