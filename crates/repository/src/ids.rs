//! Names of stored things: ids shown as hex digits (32 bytes, or 16 for a block id), backup
//! ids, cluster names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        hex_id!($(#[$doc])* $name, $what, 32, "64");

        impl $name {
            fn parse_hex(s: &str) -> Option<$name> {
                let mut id = [0u8; 32];
                decode_lower_hex(s, &mut id).then_some($name(id))
            }
        }
    };
    ($(#[$doc:meta])* $name:ident, $what:literal, $len:literal, $digits:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(pub [u8; $len]);

        impl $name {
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Lowercase hex, as in object keys.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($what, "({})"), self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                $name::parse_hex(s).ok_or_else(|| {
                    format!(
                        concat!("invalid ", $what, " \"{}\": expected ", $digits, " lowercase hex digits"),
                        s
                    )
                })
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;

            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.to_hex()
            }
        }
    };
}

/// `s` as bytes if it is exactly `2 * out.len()` lowercase hex digits.
fn decode_lower_hex(s: &str, out: &mut [u8]) -> bool {
    s.len() == 2 * out.len()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && hex::decode_to_slice(s, out).is_ok()
}

hex_id!(
    /// A block's name: the first 16 bytes of the keyed BLAKE3 hash of its plaintext (see
    /// [`Repository::block_id`](crate::Repository::block_id)). Repositories written before
    /// December 2026 store the whole 32-byte hash; readers keep its first 16 bytes.
    BlockId,
    "block id",
    16,
    "32 (or 64)"
);
hex_id!(
    /// The keyed BLAKE3 hash of a blocklist's encoded plaintext.
    BlocklistId,
    "blocklist id"
);
hex_id!(
    /// 32 random bytes naming a pack object.
    PackId,
    "pack id"
);

impl BlockId {
    /// Bytes of a block id.
    pub const LEN: usize = 16;
    /// Bytes of a block id in the backup protocol's messages (a client sends the whole
    /// keyed hash; the server sends the id followed by zeros).
    pub const WIRE_LEN: usize = 32;

    /// The id of a block whose keyed hash is `hash` (its first 16 bytes), also the id an
    /// older repository stored as the whole hash.
    pub fn from_hash(hash: &[u8; 32]) -> BlockId {
        BlockId::from_prefix(hash)
    }

    /// The id made of the first 16 bytes of `bytes`, which has at least 16.
    pub(crate) fn from_prefix(bytes: &[u8]) -> BlockId {
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[..16]);
        BlockId(id)
    }

    /// The id in the backup protocol's form: its 16 bytes, then 16 zeros.
    pub fn to_wire(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..16].copy_from_slice(&self.0);
        out
    }

    /// 32 hex digits, or the 64 of a whole 32-byte hash (a manifest written before
    /// December 2026), whose first 16 bytes are the id.
    fn parse_hex(s: &str) -> Option<BlockId> {
        let mut id = [0u8; 16];
        if decode_lower_hex(s, &mut id) {
            return Some(BlockId(id));
        }
        let mut hash = [0u8; 32];
        decode_lower_hex(s, &mut hash).then(|| BlockId::from_hash(&hash))
    }
}

impl PackId {
    pub(crate) fn random() -> PackId {
        PackId(klio_crypto::random_bytes())
    }

    /// The first two hex digits: the fan-out directory of the object.
    pub(crate) fn fanout(&self) -> String {
        hex::encode(&self.0[..1])
    }
}

impl BlocklistId {
    /// The first two hex digits: the fan-out directory of the object.
    pub(crate) fn fanout(&self) -> String {
        hex::encode(&self.0[..1])
    }
}

impl BlockId {
    /// The ids in `bytes` in the protocol's form ([`WIRE_LEN`](Self::WIRE_LEN) bytes each,
    /// as in the gRPC messages and in version 1 blocklists): the first 16 bytes of each. A
    /// trailing partial id is ignored, so callers check the length.
    pub fn list_from_bytes(bytes: &[u8]) -> Vec<BlockId> {
        BlockId::list_with_stride(bytes, Self::WIRE_LEN)
    }

    /// The ids packed one after the other in `bytes`, `stride` bytes each (at least
    /// [`LEN`](Self::LEN)): the first 16 bytes of each.
    pub(crate) fn list_with_stride(bytes: &[u8], stride: usize) -> Vec<BlockId> {
        bytes
            .chunks_exact(stride)
            .map(BlockId::from_prefix)
            .collect()
    }
}

/// A backup's id: `backup-YYYYMMDDhhmmss`, the backup's start time (UTC) to the second.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

impl BackupId {
    /// Validates `s`: the prefix `backup-`, then 14 digits forming a plausible date and time
    /// (month 01–12, day 01–31, hour 00–23, minute and second 00–59).
    pub fn new(s: &str) -> Result<BackupId, Error> {
        let bad = || Error::InvalidBackupId(s.to_string());
        let digits = s.strip_prefix("backup-").ok_or_else(bad)?;
        if digits.len() != 14 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let field = |r: std::ops::Range<usize>| digits[r].parse::<u32>().unwrap_or(u32::MAX);
        let (month, day) = (field(4..6), field(6..8));
        let (hour, minute, second) = (field(8..10), field(10..12), field(12..14));
        let plausible = (1..=12).contains(&month)
            && (1..=31).contains(&day)
            && hour < 24
            && minute < 60
            && second < 60;
        if !plausible {
            return Err(bad());
        }
        Ok(BackupId(s.to_string()))
    }

    /// The id of a backup started at `year`-`month`-`day` `hour`:`minute`:`second` UTC.
    pub fn from_parts(
        year: u32,
        month: u32,
        day: u32,
        hour: u32,
        minute: u32,
        second: u32,
    ) -> Result<BackupId, Error> {
        BackupId::new(&format!(
            "backup-{year:04}{month:02}{day:02}{hour:02}{minute:02}{second:02}"
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackupId({})", self.0)
    }
}

impl FromStr for BackupId {
    type Err = Error;

    fn from_str(s: &str) -> Result<BackupId, Error> {
        BackupId::new(s)
    }
}

impl TryFrom<String> for BackupId {
    type Error = Error;

    fn try_from(s: String) -> Result<BackupId, Error> {
        BackupId::new(&s)
    }
}

impl From<BackupId> for String {
    fn from(id: BackupId) -> String {
        id.0
    }
}

/// Checks a cluster name: lowercase letters, digits, `-` and `.`, 1 to 63 characters,
/// starting and ending with a letter or digit (the WAL store's rule, so names are safe path
/// components and object key components).
pub fn validate_cluster_name(name: &str) -> Result<(), Error> {
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.';
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = name.as_bytes();
    let ok = (1..=63).contains(&bytes.len())
        && bytes.iter().all(|&b| allowed(b))
        && bytes.first().is_some_and(|&b| alnum(b))
        && bytes.last().is_some_and(|&b| alnum(b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidClusterName(name.to_string()))
    }
}

/// A dedup domain: blocks are deduplicated, found and read by id only inside one domain.
///
/// Each cluster has its own domain by default (`cluster/<name>`), so no cluster can learn
/// whether another stores a block, nor read or reference another's blocks. Clusters that
/// trust each other may share a named domain (`shared/<name>`). The legacy domain (shown
/// as the empty string) holds the blocks of repositories written before domains existed:
/// one domain for every cluster, under the repository-wide id key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Domain(String);

impl Domain {
    /// The blocks written before dedup domains existed.
    pub fn legacy() -> Domain {
        Domain(String::new())
    }

    /// The private domain of one cluster.
    pub fn cluster(name: &str) -> Result<Domain, Error> {
        validate_cluster_name(name)?;
        Ok(Domain(format!("cluster/{name}")))
    }

    /// A domain shared by clusters that trust each other.
    pub fn shared(name: &str) -> Result<Domain, Error> {
        validate_cluster_name(name).map_err(|_| Error::InvalidDomain(name.to_string()))?;
        Ok(Domain(format!("shared/{name}")))
    }

    /// Parses the form [`as_str`](Self::as_str) shows.
    pub fn parse(s: &str) -> Result<Domain, Error> {
        match s.split_once('/') {
            None if s.is_empty() => Ok(Domain::legacy()),
            Some(("cluster", name)) => Domain::cluster(name),
            Some(("shared", name)) => Domain::shared(name),
            _ => Err(Error::InvalidDomain(s.to_string())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_legacy(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("legacy")
        } else {
            f.write_str(&self.0)
        }
    }
}

impl fmt::Debug for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Domain({self})")
    }
}
