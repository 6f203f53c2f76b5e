//! Blocklist plaintext: `"KLIOBLK1" | count u32 (big-endian) | count × block id [32]`.

use crate::{BlockId, Error};

const MAGIC: &[u8; 8] = b"KLIOBLK1";

pub(crate) fn encode(ids: &[BlockId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + ids.len() * 32);
    out.extend_from_slice(MAGIC);
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
    if magic != MAGIC {
        return Err(Error::corrupt(object, "not a blocklist (bad magic)"));
    }
    let (count, ids) = rest
        .split_at_checked(4)
        .ok_or_else(|| Error::corrupt(object, "blocklist is truncated"))?;
    let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]) as usize;
    if ids.len() != count.saturating_mul(32) {
        return Err(Error::corrupt(
            object,
            format!(
                "blocklist claims {count} ids but holds {} bytes of ids",
                ids.len()
            ),
        ));
    }
    Ok(BlockId::list_from_bytes(ids))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn blocklist_encoding_roundtrips_and_rejects_damage() {
        let ids = vec![BlockId([1; 32]), BlockId([2; 32]), BlockId([1; 32])];
        let bytes = encode(&ids);
        assert_eq!(bytes.len(), 12 + 96);
        assert_eq!(decode(&bytes, "b").unwrap(), ids);
        assert_eq!(decode(&encode(&[]), "b").unwrap(), vec![]);
        assert!(decode(&bytes[..bytes.len() - 1], "b").is_err());
        assert!(decode(&bytes[..10], "b").is_err());
        let mut bad = bytes.clone();
        bad[11] = 4;
        assert!(decode(&bad, "b").is_err());
    }
}
