//! PostgreSQL vocabulary shared by every Klio crate.
//!
//! Principal types:
//! - [`Lsn`]: a WAL position, shown as `X/XXXXXXXX` like PostgreSQL does;
//! - [`TimeLineId`]: a timeline, shown as eight hex digits in file names;
//! - [`SegmentSize`]: the cluster's `wal_segment_size` (a power of two, 1 MiB to 1 GiB);
//! - [`SegmentNo`] and [`WalFileName`]: the names of segments, `.partial` segments,
//!   `.history` files and `.backup` files, parsed and formatted exactly as PostgreSQL does;
//! - [`TimelineHistory`]: the parsed content of a `.history` file.
//!
//! This crate has no I/O and no dependencies beyond `thiserror` and `serde`.

use std::fmt;
use std::str::FromStr;

/// Errors of this crate: text that does not follow PostgreSQL's formats.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid LSN \"{0}\"")]
    InvalidLsn(String),
    #[error("invalid WAL file name \"{0}\"")]
    InvalidWalFileName(String),
    #[error("invalid WAL segment size {0}: it must be a power of two between 1 MiB and 1 GiB")]
    InvalidSegmentSize(u64),
    #[error("invalid timeline history line {line}: \"{text}\"")]
    InvalidHistory { line: usize, text: String },
}

/// A position in the write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);

    /// The LSN advanced by `bytes`.
    pub fn plus(self, bytes: u64) -> Lsn {
        Lsn(self.0 + bytes)
    }

    /// `self + bytes`, or `None` past the end of the WAL address space (input checks use
    /// this; [`Lsn::plus`] is for positions already known to be valid).
    pub fn checked_plus(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }

    /// The start of the segment that holds this LSN.
    pub fn segment_start(self, size: SegmentSize) -> Lsn {
        Lsn(self.0 - self.0 % size.bytes())
    }

    /// The offset of this LSN inside its segment.
    pub fn segment_offset(self, size: SegmentSize) -> u64 {
        self.0 % size.bytes()
    }

    /// The number of the segment that holds this LSN.
    pub fn segment_no(self, size: SegmentSize) -> SegmentNo {
        SegmentNo(self.0 / size.bytes())
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:08X}", self.0 >> 32, self.0 as u32)
    }
}

impl FromStr for Lsn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidLsn(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// A timeline id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeLineId(pub u32);

impl fmt::Display for TimeLineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The WAL segment size of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SegmentSize(u64);

impl SegmentSize {
    /// PostgreSQL's default, 16 MiB.
    pub const DEFAULT: SegmentSize = SegmentSize(16 * 1024 * 1024);

    pub fn new(bytes: u64) -> Result<SegmentSize, Error> {
        if bytes.is_power_of_two() && (1 << 20..=1 << 30).contains(&bytes) {
            Ok(SegmentSize(bytes))
        } else {
            Err(Error::InvalidSegmentSize(bytes))
        }
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Segments per "xlogid" (the middle eight hex digits of a segment name).
    fn segments_per_xlogid(self) -> u64 {
        0x1_0000_0000 / self.0
    }
}

/// A segment number (the LSN divided by the segment size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentNo(pub u64);

impl SegmentNo {
    pub fn start_lsn(self, size: SegmentSize) -> Lsn {
        Lsn(self.0 * size.bytes())
    }

    pub fn next(self) -> SegmentNo {
        SegmentNo(self.0 + 1)
    }
}

/// The name of a file in a WAL archive, as PostgreSQL names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WalFileName {
    /// `TTTTTTTTXXXXXXXXYYYYYYYY`
    Segment {
        timeline: TimeLineId,
        segno: SegmentNo,
        size: SegmentSize,
    },
    /// `TTTTTTTTXXXXXXXXYYYYYYYY.partial`: the last, incomplete segment of a timeline.
    Partial {
        timeline: TimeLineId,
        segno: SegmentNo,
        size: SegmentSize,
    },
    /// `TTTTTTTT.history`
    History { timeline: TimeLineId },
    /// `TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup`
    Backup {
        timeline: TimeLineId,
        segno: SegmentNo,
        offset: u32,
        size: SegmentSize,
    },
}

fn hex8(s: &str) -> Option<u32> {
    if s.len() == 8
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
    {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

impl WalFileName {
    pub fn segment(timeline: TimeLineId, segno: SegmentNo, size: SegmentSize) -> WalFileName {
        WalFileName::Segment {
            timeline,
            segno,
            size,
        }
    }

    /// Parses an archive file name; segment names need the segment size to be interpreted.
    pub fn parse(name: &str, size: SegmentSize) -> Result<WalFileName, Error> {
        let bad = || Error::InvalidWalFileName(name.escape_debug().to_string());
        // Byte offsets below assume one byte per character.
        if !name.is_ascii() {
            return Err(bad());
        }
        if let Some(tli) = name.strip_suffix(".history") {
            let timeline = TimeLineId(hex8(tli).ok_or_else(bad)?);
            return Ok(WalFileName::History { timeline });
        }
        let (base, suffix) = match name.split_once('.') {
            Some((b, s)) => (b, Some(s)),
            None => (name, None),
        };
        if base.len() != 24 {
            return Err(bad());
        }
        let timeline = TimeLineId(hex8(&base[0..8]).ok_or_else(bad)?);
        let log = u64::from(hex8(&base[8..16]).ok_or_else(bad)?);
        let seg = u64::from(hex8(&base[16..24]).ok_or_else(bad)?);
        if seg >= size.segments_per_xlogid() || timeline.0 == 0 {
            return Err(bad());
        }
        let segno = SegmentNo(log * size.segments_per_xlogid() + seg);
        match suffix {
            None => Ok(WalFileName::Segment {
                timeline,
                segno,
                size,
            }),
            Some("partial") => Ok(WalFileName::Partial {
                timeline,
                segno,
                size,
            }),
            Some(rest) => {
                let off = rest
                    .strip_suffix(".backup")
                    .and_then(hex8)
                    .ok_or_else(bad)?;
                Ok(WalFileName::Backup {
                    timeline,
                    segno,
                    offset: off,
                    size,
                })
            }
        }
    }

    pub fn timeline(&self) -> TimeLineId {
        match *self {
            WalFileName::Segment { timeline, .. }
            | WalFileName::Partial { timeline, .. }
            | WalFileName::History { timeline }
            | WalFileName::Backup { timeline, .. } => timeline,
        }
    }

    /// The segment number for segments, partials and backup files.
    pub fn segno(&self) -> Option<SegmentNo> {
        match *self {
            WalFileName::Segment { segno, .. }
            | WalFileName::Partial { segno, .. }
            | WalFileName::Backup { segno, .. } => Some(segno),
            WalFileName::History { .. } => None,
        }
    }
}

fn fmt_segment(
    f: &mut fmt::Formatter<'_>,
    tli: TimeLineId,
    segno: SegmentNo,
    size: SegmentSize,
) -> fmt::Result {
    let per = size.segments_per_xlogid();
    write!(f, "{:08X}{:08X}{:08X}", tli.0, segno.0 / per, segno.0 % per)
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WalFileName::Segment {
                timeline,
                segno,
                size,
            } => fmt_segment(f, timeline, segno, size),
            WalFileName::Partial {
                timeline,
                segno,
                size,
            } => {
                fmt_segment(f, timeline, segno, size)?;
                f.write_str(".partial")
            }
            WalFileName::History { timeline } => write!(f, "{:08X}.history", timeline.0),
            WalFileName::Backup {
                timeline,
                segno,
                offset,
                size,
            } => {
                fmt_segment(f, timeline, segno, size)?;
                write!(f, ".{offset:08X}.backup")
            }
        }
    }
}

/// One entry of a timeline history file: `parent` ended at `switchpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub parent: TimeLineId,
    pub switchpoint: Lsn,
    pub reason: String,
}

/// The parsed content of `TTTTTTTT.history`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TimelineHistory {
    pub entries: Vec<HistoryEntry>,
}

impl TimelineHistory {
    pub fn parse(text: &str) -> Result<TimelineHistory, Error> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let bad = || Error::InvalidHistory {
                line: i + 1,
                text: line.to_string(),
            };
            let mut parts = trimmed.splitn(3, char::is_whitespace);
            let tli: u32 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let lsn: Lsn = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
            let reason = parts.next().unwrap_or("").trim().to_string();
            entries.push(HistoryEntry {
                parent: TimeLineId(tli),
                switchpoint: lsn,
                reason,
            });
        }
        Ok(TimelineHistory { entries })
    }

    /// Where `timeline` ended according to this history (None if it is not an ancestor here).
    pub fn switchpoint_of(&self, timeline: TimeLineId) -> Option<Lsn> {
        self.entries
            .iter()
            .find(|e| e.parent == timeline)
            .map(|e| e.switchpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_roundtrip_formats_like_postgres() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!(Lsn(0x0100_0000).to_string(), "0/01000000");
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("G/0".parse::<Lsn>().is_err());
    }

    #[test]
    fn segment_name_roundtrip_default_size() {
        let size = SegmentSize::DEFAULT;
        let lsn: Lsn = "1/2A000028".parse().unwrap();
        let name = WalFileName::segment(TimeLineId(3), lsn.segment_no(size), size);
        assert_eq!(name.to_string(), "00000003000000010000002A");
        assert_eq!(
            WalFileName::parse("00000003000000010000002A", size).unwrap(),
            name
        );
        assert_eq!(
            name.segno().unwrap().start_lsn(size),
            "1/2A000000".parse().unwrap()
        );
    }

    #[test]
    fn segment_name_with_other_size() {
        let size = SegmentSize::new(64 << 20).unwrap();
        let name = WalFileName::parse("000000010000000200000003", size).unwrap();
        assert_eq!(name.segno().unwrap(), SegmentNo(2 * 64 + 3));
        assert!(WalFileName::parse("000000010000000200000040", size).is_err());
    }

    #[test]
    fn parse_partial_history_backup_names() {
        let size = SegmentSize::DEFAULT;
        assert!(matches!(
            WalFileName::parse("000000010000000000000005.partial", size).unwrap(),
            WalFileName::Partial { .. }
        ));
        let h = WalFileName::parse("0000000A.history", size).unwrap();
        assert_eq!(
            h,
            WalFileName::History {
                timeline: TimeLineId(10)
            }
        );
        assert_eq!(h.to_string(), "0000000A.history");
        let b = WalFileName::parse("000000010000000000000002.00000028.backup", size).unwrap();
        assert_eq!(b.to_string(), "000000010000000000000002.00000028.backup");
        for bad in [
            "",
            "0000000100000000000000",
            "00000001000000000000000g",
            "../etc/passwd",
            "0000000a.history",
        ] {
            assert!(WalFileName::parse(bad, size).is_err(), "{bad}");
        }
    }

    #[test]
    fn history_parse_finds_switchpoints() {
        let h = TimelineHistory::parse(
            "1\t0/3000158\tno recovery target specified\n\n2\t0/5000000\tbefore 2000-01-01\n",
        )
        .unwrap();
        assert_eq!(h.entries.len(), 2);
        assert_eq!(
            h.switchpoint_of(TimeLineId(1)),
            Some("0/3000158".parse().unwrap())
        );
        assert_eq!(h.switchpoint_of(TimeLineId(3)), None);
        assert!(TimelineHistory::parse("x 0/0 bad").is_err());
    }

    #[test]
    fn segment_size_rejects_non_powers() {
        assert!(SegmentSize::new(3 << 20).is_err());
        assert!(SegmentSize::new(512 << 10).is_err());
        assert!(SegmentSize::new(1 << 20).is_ok());
    }
}
