//! Property tests of the parsers of untrusted text: WAL file names (from clients and the
//! archive), LSNs (from clients and manifests) and timeline history files (from the server
//! PostgreSQL streams from). Many generated inputs, valid and hostile: a parser returns a
//! value or an error, never panics, and what it accepts prints back as the same text.
//! (A fixed seed per test, so a failure reproduces.)

use klio_pg::{Lsn, SegmentNo, SegmentSize, TimeLineId, TimelineHistory, WalFileName};

#[path = "support/property.rs"]
mod property;
use property::{Rng, scale};

/// Text generation for these parsers.
trait Text {
    fn text(&mut self, max_len: u64) -> String;
}

impl Text for Rng {
    /// A string mixing the characters parsers care about with hostile ones.
    fn text(&mut self, max_len: u64) -> String {
        const ALPHABET: &[&str] = &[
            "0", "1", "9", "A", "F", "a", "f", "G", ".", "/", "partial", "history", "backup", "é",
            "ß", "\u{0}", "\u{202e}", " ", "-", "+", "0000000", "FFFFFFFF", "\n", "\t",
        ];
        let len = self.below(max_len + 1);
        (0..len)
            .map(|_| ALPHABET[self.below(ALPHABET.len() as u64) as usize])
            .collect()
    }
}

const SIZES: [u64; 3] = [1 << 20, 16 << 20, 1 << 30];

#[test]
fn wal_file_names_never_panic_and_round_trip() {
    let mut rng = Rng::seeded(0x5EED_0001);
    for _ in 0..scale(200_000) {
        let size = SegmentSize::new(SIZES[rng.below(3) as usize]).expect("valid size");
        let s = rng.text(40);
        if let Ok(parsed) = WalFileName::parse(&s, size) {
            assert_eq!(
                parsed.to_string(),
                s,
                "accepted {s:?} but prints differently"
            );
        }
    }
    // Valid names of every kind round-trip.
    for _ in 0..scale(50_000) {
        let size = SegmentSize::new(SIZES[rng.below(3) as usize]).expect("valid size");
        let tli = TimeLineId(1 + rng.below(u64::from(u32::MAX) - 1) as u32);
        let per_xlogid = (1u64 << 32) / size.bytes();
        let segno = SegmentNo(rng.below(per_xlogid * 0xFFFF_FFFF));
        let name = WalFileName::segment(tli, segno, size);
        let text = name.to_string();
        assert_eq!(WalFileName::parse(&text, size).expect("valid"), name);
        let partial = format!("{text}.partial");
        assert_eq!(
            WalFileName::parse(&partial, size)
                .expect("valid")
                .to_string(),
            partial
        );
        // One character changed to a multibyte one of the same byte length is refused.
        let at = rng.below(22) as usize;
        let mut bytes: Vec<char> = text.chars().collect();
        bytes.truncate(23);
        bytes[at] = 'é';
        let hostile: String = bytes.into_iter().collect();
        assert_eq!(hostile.len(), 24);
        assert!(WalFileName::parse(&hostile, size).is_err(), "{hostile:?}");
    }
}

#[test]
fn lsns_never_panic_and_round_trip() {
    let mut rng = Rng::seeded(0x5EED_0002);
    for _ in 0..scale(200_000) {
        let s = rng.text(20);
        if let Ok(l) = s.parse::<Lsn>() {
            assert_eq!(l.to_string().parse::<Lsn>().expect("printed LSN parses"), l);
        }
        let v = rng.next();
        let l = Lsn(v);
        assert_eq!(l.to_string().parse::<Lsn>().expect("valid"), l);
        let n = rng.next();
        assert_eq!(l.checked_plus(n), v.checked_add(n).map(Lsn));
    }
}

#[test]
fn timeline_histories_never_panic() {
    let mut rng = Rng::seeded(0x5EED_0003);
    for _ in 0..scale(50_000) {
        let lines = rng.below(6);
        let text: String = (0..lines)
            .map(|_| {
                let tli = rng.below(5);
                let lsn = Lsn(rng.next()).to_string();
                match rng.below(4) {
                    0 => format!("{tli}\t{lsn}\treason\n"),
                    1 => format!("{}\n", rng.text(30)),
                    2 => format!("# {}\n", rng.text(10)),
                    _ => format!("{tli}\t{}\n", rng.text(12)),
                }
            })
            .collect();
        let _ = TimelineHistory::parse(&text);
    }
}
