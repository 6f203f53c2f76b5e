//! What the name of a relation data file says: relfilenode, fork and segment number.

use crate::checksum::RELSEG_PAGES;

/// The most digits a relfilenode can have in a file name (an OID is at most 4294967295).
const MAX_OID_DIGITS: usize = 10;

/// A fork of a relation: the files that share one relfilenode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fork {
    /// The relation's data: `<relfilenode>`.
    Main,
    /// The free space map: `<relfilenode>_fsm`.
    Fsm,
    /// The visibility map: `<relfilenode>_vm`.
    Vm,
    /// The initialisation fork of an unlogged relation: `<relfilenode>_init`.
    Init,
}

impl Fork {
    /// The forks that have a name suffix, with that suffix (without the `_`).
    const SUFFIXED: [(&'static str, Fork); 3] =
        [("fsm", Fork::Fsm), ("vm", Fork::Vm), ("init", Fork::Init)];

    /// The suffix this fork adds to the relfilenode in file names: `""`, `"_fsm"`, `"_vm"` or
    /// `"_init"`.
    pub fn suffix(self) -> &'static str {
        match self {
            Fork::Main => "",
            Fork::Fsm => "_fsm",
            Fork::Vm => "_vm",
            Fork::Init => "_init",
        }
    }

    /// The fork named `name` after the `_` (`"fsm"`, `"vm"`, `"init"`). The main fork has no
    /// name in file names, so `"main"` gives `None`.
    pub(crate) fn from_suffix_name(name: &str) -> Option<Fork> {
        Fork::SUFFIXED
            .iter()
            .find(|(suffix, _)| *suffix == name)
            .map(|(_, fork)| *fork)
    }
}

/// A relation data file: one segment of one fork of one relation, named
/// `<relfilenode>[_<fork>][.<segment>]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelationFile {
    /// The relation's file node number (not necessarily its OID).
    pub relfilenode: u32,
    /// Which fork the file belongs to.
    pub fork: Fork,
    /// The segment number: 0 for the first 1 GiB (no `.N` suffix), then 1, 2, ...
    pub segment: u32,
}

impl RelationFile {
    /// Parses a file name (not a path) such as `16384`, `16384_fsm`, `16384.2` or
    /// `16384_vm.1`. Returns `None` for anything else, including temporary relations
    /// (`t3_16384`) and numbers that do not fit in 32 bits.
    pub fn parse(name: &str) -> Option<RelationFile> {
        let (stem, segment) = match name.split_once('.') {
            Some((stem, segment)) => (stem, Some(segment)),
            None => (name, None),
        };
        let (node, fork) = match stem.split_once('_') {
            Some((node, fork)) => (node, Fork::from_suffix_name(fork)?),
            None => (stem, Fork::Main),
        };
        if node.len() > MAX_OID_DIGITS {
            return None;
        }
        let relfilenode = parse_digits(node)?;
        let segment = match segment {
            Some(digits) => parse_digits(digits)?,
            None => 0,
        };
        Some(RelationFile {
            relfilenode,
            fork,
            segment,
        })
    }

    /// The file name: the inverse of [`RelationFile::parse`].
    pub fn file_name(&self) -> String {
        match self.segment {
            0 => format!("{}{}", self.relfilenode, self.fork.suffix()),
            n => format!("{}{}.{n}", self.relfilenode, self.fork.suffix()),
        }
    }

    /// The block number (within the fork) of the first page of this segment:
    /// `segment * RELSEG_PAGES`, with 32-bit wrap-around as PostgreSQL computes it.
    pub fn first_blkno(&self) -> u32 {
        self.segment.wrapping_mul(RELSEG_PAGES)
    }
}

/// A non-empty string of ASCII digits as a `u32`; `None` for anything else (signs, spaces,
/// overflow).
pub(crate) fn parse_digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rel(relfilenode: u32, fork: Fork, segment: u32) -> Option<RelationFile> {
        Some(RelationFile {
            relfilenode,
            fork,
            segment,
        })
    }

    #[test]
    fn parse_relation_names_gives_node_fork_and_segment() {
        assert_eq!(RelationFile::parse("16384"), rel(16384, Fork::Main, 0));
        assert_eq!(RelationFile::parse("16384.1"), rel(16384, Fork::Main, 1));
        assert_eq!(RelationFile::parse("16384_fsm"), rel(16384, Fork::Fsm, 0));
        assert_eq!(RelationFile::parse("16384_vm"), rel(16384, Fork::Vm, 0));
        assert_eq!(RelationFile::parse("16384_init"), rel(16384, Fork::Init, 0));
        assert_eq!(RelationFile::parse("16384_vm.3"), rel(16384, Fork::Vm, 3));
        assert_eq!(RelationFile::parse("1"), rel(1, Fork::Main, 0));
        assert_eq!(
            RelationFile::parse("4294967295.32767"),
            rel(u32::MAX, Fork::Main, 32767)
        );
    }

    #[test]
    fn parse_other_names_gives_none() {
        for name in [
            "",
            "pg_control",
            "pg_filenode.map",
            "pg_internal.init",
            "PG_VERSION",
            "t3_16384",
            "t3_16384_fsm",
            "16384_main",
            "16384_fsmx",
            "16384_",
            "16384.",
            "16384..1",
            "16384.1.2",
            "16384.1_fsm",
            "16384.-1",
            "+16384",
            "16384 ",
            "4294967296",
            "00000000001",
            "16384.1.klio-tmp",
            "_fsm",
        ] {
            assert_eq!(RelationFile::parse(name), None, "{name:?}");
        }
    }

    #[test]
    fn file_name_round_trips() {
        for name in ["16384", "16384.7", "16384_fsm", "16384_vm.1", "16384_init"] {
            assert_eq!(RelationFile::parse(name).unwrap().file_name(), name);
        }
    }

    #[test]
    fn first_blkno_counts_whole_segments() {
        assert_eq!(RelationFile::parse("5").unwrap().first_blkno(), 0);
        assert_eq!(RelationFile::parse("5.1").unwrap().first_blkno(), 131072);
        assert_eq!(
            RelationFile::parse("5.3").unwrap().first_blkno(),
            3 * 131072
        );
    }
}
