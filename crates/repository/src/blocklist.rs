//! Blocklist plaintext. Version 2, written: `"KLIOBLK2" | count u32 (big-endian) | count ×
//! block id [16]`. Version 1 (before December 2026) held the 32-byte keyed hashes:
//! `"KLIOBLK1" | count u32 | count × [32]`; readers keep the first 16 bytes of each.

use crate::{BlockId, Error};

const MAGIC_V1: &[u8; 8] = b"KLIOBLK1";
const MAGIC_V2: &[u8; 8] = b"KLIOBLK2";

pub(crate) fn encode(ids: &[BlockId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + ids.len() * BlockId::LEN);
    out.extend_from_slice(MAGIC_V2);
    out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
    for id in ids {
        out.extend_from_slice(id.as_bytes());
    }
    out
}

pub(crate) fn decode(buf: &[u8], object: &str) -> Result<Vec<BlockId>, Error> {
    let (magic, rest) = buf
        .split_at_checked(8)
        .ok_or_else(|| Error::corrupt(object, "blocklist is truncated"))?;
    let id_len = match magic {
        m if m == MAGIC_V2 => BlockId::LEN,
        m if m == MAGIC_V1 => BlockId::WIRE_LEN,
        _ => return Err(Error::corrupt(object, "not a blocklist (bad magic)")),
    };
    let (count, ids) = rest
        .split_at_checked(4)
        .ok_or_else(|| Error::corrupt(object, "blocklist is truncated"))?;
    let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]) as usize;
    if ids.len() != count.saturating_mul(id_len) {
        return Err(Error::corrupt(
            object,
            format!(
                "blocklist claims {count} ids but holds {} bytes of ids",
                ids.len()
            ),
        ));
    }
    Ok(BlockId::list_with_stride(ids, id_len))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn blocklist_encoding_roundtrips_and_rejects_damage() {
        let ids = vec![BlockId([1; 16]), BlockId([2; 16]), BlockId([1; 16])];
        let bytes = encode(&ids);
        assert_eq!(bytes.len(), 12 + 48);
        assert_eq!(decode(&bytes, "b").unwrap(), ids);
        assert_eq!(decode(&encode(&[]), "b").unwrap(), vec![]);
        assert!(decode(&bytes[..bytes.len() - 1], "b").is_err());
        assert!(decode(&bytes[..10], "b").is_err());
        let mut bad = bytes.clone();
        bad[11] = 4;
        assert!(decode(&bad, "b").is_err());
    }

    #[test]
    fn version_1_blocklists_name_blocks_by_the_first_16_bytes_of_each_hash() {
        let mut v1 = b"KLIOBLK1".to_vec();
        v1.extend_from_slice(&2u32.to_be_bytes());
        v1.extend_from_slice(&[7; 32]);
        v1.extend_from_slice(&[[8; 16], [9; 16]].concat());
        assert_eq!(
            decode(&v1, "b").unwrap(),
            vec![BlockId([7; 16]), BlockId([8; 16])]
        );
        assert!(decode(&v1[..v1.len() - 16], "b").is_err());
    }
}
