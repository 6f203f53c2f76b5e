//! Property tests of the decoders of the repository's object plaintexts: index objects
//! (versions 1 and 2), blocklists and manifests. Generated objects decode to what was
//! encoded; every truncation of one is refused; flipped bytes and random input give an
//! error or a value, never a panic (and a decoded value is well-formed). `KLIO_PROPERTY_SEED`
//! and `KLIO_PROPERTY_SCALE` as in the other property tests (bench/fuzz.sh).

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

#[path = "../../pg/tests/support/property.rs"]
mod property;

use property::{Rng, scale};
use serde_json::json;

use crate::index::{BlockLocation, PackSection};
use crate::manifest::{FileEntry, FileKind};
use crate::{BackupId, BlockId, BlocklistId, Domain, Manifest, PackId, blocklist, index};

fn id32(rng: &mut Rng) -> [u8; 32] {
    let mut a = [0u8; 32];
    for chunk in a.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    a
}

fn domain(rng: &mut Rng) -> Domain {
    match rng.below(3) {
        0 => Domain::legacy(),
        1 => Domain::cluster(rng.pick(&["c1", "pg-prod", "a.b-c"])).unwrap(),
        _ => Domain::shared(rng.pick(&["team", "x"])).unwrap(),
    }
}

fn sections(rng: &mut Rng) -> Vec<PackSection> {
    let legacy_only = rng.below(2) == 0;
    (0..rng.below(4))
        .map(|_| {
            let mut offset = 0u32;
            let blocks = (0..rng.below(6))
                .map(|_| {
                    offset += rng.below(100) as u32;
                    let len = 1 + rng.below(9000) as u32;
                    let loc = BlockLocation {
                        offset,
                        len,
                        plain_len: rng.below(9000) as u32,
                        // Some blocks inside runs (a version 3 index).
                        inner: if rng.below(3) == 0 {
                            rng.below(9000) as u32
                        } else {
                            0
                        },
                    };
                    offset += len;
                    (BlockId::from_hash(&id32(rng)), loc)
                })
                .collect();
            PackSection {
                pack: PackId(id32(rng)),
                salt: id32(rng),
                domain: if legacy_only {
                    Domain::legacy()
                } else {
                    domain(rng)
                },
                blocks,
            }
        })
        .collect()
}

/// Flips one to four bits, truncates, appends, or replaces everything with random bytes.
fn damage(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    match rng.below(4) {
        0 if !bytes.is_empty() => {
            for _ in 0..=rng.below(4) {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] ^= 1 << rng.below(8);
            }
        }
        1 if !bytes.is_empty() => bytes.truncate(rng.below(bytes.len() as u64) as usize),
        2 => bytes.extend((0..=rng.below(40)).map(|_| rng.next() as u8)),
        _ => bytes = (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
    }
    bytes
}

#[test]
fn index_objects_roundtrip_refuse_truncation_and_survive_damage() {
    let mut rng = Rng::seeded(0x1D3_0001);
    for _ in 0..scale(4_000) {
        let s = sections(&mut rng);
        let bytes = index::encode(&s);
        assert_eq!(index::decode(&bytes, "i").unwrap(), s);
        // What writers before December 2026 wrote reads the same.
        let pad = rng.below(256) as u8;
        assert_eq!(
            index::decode(&index::encode_legacy(&s, 3, pad), "i").unwrap(),
            s
        );
        let cut = rng.below(bytes.len() as u64) as usize;
        assert!(
            index::decode(&bytes[..cut], "i").is_err(),
            "prefix {cut} accepted"
        );
        let damaged = damage(&mut rng, bytes);
        if let Ok(decoded) = index::decode(&damaged, "i") {
            // Whatever decodes is well-formed: its entries sorted and apart, and it encodes
            // back to an index that decodes to the same sections.
            for s in &decoded {
                for pair in s.blocks.windows(2) {
                    let end = u64::from(pair[0].1.offset) + u64::from(pair[0].1.len);
                    assert!(u64::from(pair[1].1.offset) >= end);
                }
            }
            assert_eq!(
                index::decode(&index::encode(&decoded), "i").unwrap(),
                decoded
            );
        }
    }
}

#[test]
fn blocklists_roundtrip_refuse_truncation_and_survive_damage() {
    let mut rng = Rng::seeded(0xB10C_0002);
    for _ in 0..scale(20_000) {
        let ids: Vec<BlockId> = (0..rng.below(20))
            .map(|_| BlockId::from_hash(&id32(&mut rng)))
            .collect();
        let bytes = blocklist::encode(&ids);
        assert_eq!(blocklist::decode(&bytes, "b").unwrap(), ids);
        let cut = rng.below(bytes.len() as u64) as usize;
        assert!(blocklist::decode(&bytes[..cut], "b").is_err());
        let damaged = damage(&mut rng, bytes);
        if let Ok(decoded) = blocklist::decode(&damaged, "b") {
            let per_id = if damaged.starts_with(b"KLIOBLK1") {
                32
            } else {
                16
            };
            assert_eq!(damaged.len(), 12 + per_id * decoded.len());
        }
    }
}

fn manifest(rng: &mut Rng) -> Manifest {
    let mut files = vec![FileEntry {
        path: "base".into(),
        size: 0,
        mode: 0o700,
        mtime: 1,
        kind: FileKind::Directory,
    }];
    for i in 0..rng.below(6) {
        let size = rng.below(100_000);
        let kind = match rng.below(4) {
            0 => FileKind::Blocks {
                block_size: 8192,
                blocklists: vec![BlocklistId(id32(rng))],
            },
            1 => FileKind::Whole {
                block: BlockId::from_hash(&id32(rng)),
            },
            2 => FileKind::Listed {
                block_size: 8192,
                blocks: (0..size.div_ceil(8192))
                    .map(|_| BlockId::from_hash(&id32(rng)))
                    .collect(),
            },
            _ => FileKind::Symlink {
                target: "/srv/ts".into(),
            },
        };
        files.push(FileEntry {
            path: format!("base/{i}"),
            size: if matches!(kind, FileKind::Symlink { .. }) {
                0
            } else {
                size
            },
            mode: 0o600,
            mtime: rng.next() as i64 >> 1,
            kind,
        });
    }
    Manifest {
        cluster: "pg-prod".into(),
        backup_id: BackupId::new("backup-20260101000000").unwrap(),
        metadata: json!({"start_lsn": "0/3000028", "timeline": rng.below(9) + 1}),
        domain: domain(rng),
        files,
    }
}

#[test]
fn manifests_roundtrip_and_survive_damage() {
    let mut rng = Rng::seeded(0x3A1F_0003);
    for _ in 0..scale(4_000) {
        let m = manifest(&mut rng);
        m.validate().unwrap();
        let bytes = m.encode().unwrap();
        assert_eq!(Manifest::decode(&bytes, "m").unwrap(), m);
        let cut = rng.below(bytes.len() as u64) as usize;
        assert!(Manifest::decode(&bytes[..cut], "m").is_err());
        let damaged = damage(&mut rng, bytes);
        if let Ok(decoded) = Manifest::decode(&damaged, "m") {
            // Decoding is not validation: the commit and restore paths validate next.
            let _ = decoded.validate();
        }
    }
}
