//! PostgreSQL's data page checksums (`initdb --data-checksums`).
//!
//! The algorithm is an FNV-1a variant run as 32 interleaved lanes: the page is read as rows
//! of 32 native-endian 32-bit words, word `j` of every row is mixed into lane `j` (each lane
//! starting from its own fixed seed), two rounds of zeros are mixed in, and the lanes are
//! folded together with XOR. The block number is then XORed in, so that a page copied to the
//! wrong place fails, and the result is reduced to 1..=65535 (0 never occurs). The page's own
//! `pd_checksum` field counts as zero while computing.
//!
//! The lane seeds, the prime and the extra shift are part of the on-disk format and must match
//! PostgreSQL's `checksum_impl.h` exactly.

/// The size of a PostgreSQL page (`BLCKSZ`, the default of 8 KiB).
pub const PAGE_SIZE: usize = 8192;

/// Pages per relation segment file (`RELSEG_SIZE`: 1 GiB of 8 KiB pages). The page at index
/// `i` of segment file `n` has block number `n * RELSEG_PAGES + i`.
pub const RELSEG_PAGES: u32 = 131072;

/// Number of interleaved lanes.
const LANES: usize = 32;

/// The 32-bit FNV prime.
const FNV_PRIME: u32 = 16_777_619;

/// Starting value of each lane.
const LANE_SEEDS: [u32; LANES] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

/// Byte offset of `pd_checksum` in the page header (after the 8-byte `pd_lsn`).
const CHECKSUM_OFFSET: usize = 8;

/// Byte offset of `pd_upper` in the page header.
const UPPER_OFFSET: usize = 14;

/// Mixes one word into one lane.
fn mix(lane: u32, word: u32) -> u32 {
    let x = lane ^ word;
    x.wrapping_mul(FNV_PRIME) ^ (x >> 17)
}

fn word_at(page: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes([
        page[offset],
        page[offset + 1],
        page[offset + 2],
        page[offset + 3],
    ])
}

fn assert_page_size(page: &[u8]) {
    assert_eq!(
        page.len(),
        PAGE_SIZE,
        "a PostgreSQL page is {PAGE_SIZE} bytes, not {}",
        page.len()
    );
}

/// The checksum PostgreSQL computes for `page` at block number `blkno` of its relation fork
/// (`pg_checksum_page`), as if `pd_checksum` (bytes 8..10) were zero.
///
/// Words are read in this machine's byte order, as PostgreSQL running on this machine writes
/// them.
///
/// # Panics
///
/// When `page.len()` is not [`PAGE_SIZE`].
pub fn page_checksum(page: &[u8], blkno: u32) -> u16 {
    assert_page_size(page);
    let mut lanes = LANE_SEEDS;
    for (row_index, row) in page.chunks_exact(LANES * 4).enumerate() {
        for (lane, value) in lanes.iter_mut().enumerate() {
            let offset = lane * 4;
            let word = if row_index == 0 && offset == CHECKSUM_OFFSET {
                // pd_checksum (2 bytes) shares this word with pd_flags.
                u32::from_ne_bytes([0, 0, row[offset + 2], row[offset + 3]])
            } else {
                word_at(row, offset)
            };
            *value = mix(*value, word);
        }
    }
    for _ in 0..2 {
        for value in &mut lanes {
            *value = mix(*value, 0);
        }
    }
    let folded = lanes.iter().fold(0u32, |acc, v| acc ^ v) ^ blkno;
    (folded % 65535 + 1) as u16
}

/// The outcome of checking one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageCheck {
    /// The stored checksum matches.
    Valid,
    /// A page never initialised: all zeros, or `pd_upper` is zero (PostgreSQL's `PageIsNew`).
    /// Such pages carry no checksum and are not checked.
    New,
    /// The page's LSN is at or after the backup's start: it may be torn by a concurrent write,
    /// and WAL replay from the backup's start will rewrite it, so it is not checked.
    Newer,
    /// The stored checksum does not match: the page is corrupt.
    Invalid {
        /// The checksum computed from the page's contents.
        expected: u16,
        /// The checksum stored in the page (`pd_checksum`).
        found: u16,
    },
}

/// The page's LSN (`pd_lsn`: the high then the low 32 bits, each in this machine's order).
fn page_lsn(page: &[u8]) -> u64 {
    (u64::from(word_at(page, 0)) << 32) | u64::from(word_at(page, 4))
}

/// Checks `page`, block number `blkno` of its relation fork, copied during a backup that
/// started at WAL position `backup_start_lsn` (pass `u64::MAX` to check every initialised
/// page, for example in a stopped cluster).
///
/// # Panics
///
/// When `page.len()` is not [`PAGE_SIZE`].
pub fn check_page(page: &[u8], blkno: u32, backup_start_lsn: u64) -> PageCheck {
    assert_page_size(page);
    // An all-zero page has pd_upper == 0 too.
    let upper = u16::from_ne_bytes([page[UPPER_OFFSET], page[UPPER_OFFSET + 1]]);
    if upper == 0 {
        return PageCheck::New;
    }
    if page_lsn(page) >= backup_start_lsn {
        return PageCheck::Newer;
    }
    let expected = page_checksum(page, blkno);
    let found = u16::from_ne_bytes([page[CHECKSUM_OFFSET], page[CHECKSUM_OFFSET + 1]]);
    if expected == found {
        PageCheck::Valid
    } else {
        PageCheck::Invalid { expected, found }
    }
}

/// Checks a run of whole pages read from a relation file, the first being block number
/// `first_blkno` (for a read at byte `offset` of segment file `n`:
/// `n * RELSEG_PAGES + offset / PAGE_SIZE`), and returns the block numbers and outcomes of
/// the [`PageCheck::Invalid`] pages only.
///
/// A trailing partial page (a file read while it was being extended) is ignored: WAL replay
/// will complete it.
pub fn check_relation_chunk(
    data: &[u8],
    first_blkno: u32,
    backup_start_lsn: u64,
) -> Vec<(u32, PageCheck)> {
    let mut invalid = Vec::new();
    let mut blkno = first_blkno;
    for page in data.chunks_exact(PAGE_SIZE) {
        let check = check_page(page, blkno, backup_start_lsn);
        if matches!(check, PageCheck::Invalid { .. }) {
            invalid.push((blkno, check));
        }
        blkno = blkno.wrapping_add(1);
    }
    invalid
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page with a plausible header (`pd_lower` 24, `pd_upper` 8000, `pd_special` 8192,
    /// LSN 1/2) and patterned contents, with its checksum stored.
    fn sample_page(blkno: u32) -> Vec<u8> {
        let mut page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        page[0..4].copy_from_slice(&1u32.to_ne_bytes());
        page[4..8].copy_from_slice(&2u32.to_ne_bytes());
        page[12..14].copy_from_slice(&24u16.to_ne_bytes());
        page[14..16].copy_from_slice(&8000u16.to_ne_bytes());
        let checksum = page_checksum(&page, blkno);
        page[8..10].copy_from_slice(&checksum.to_ne_bytes());
        page
    }

    /// Values `pg_checksums --check` (PostgreSQL 15, x86_64) calculated for [`sample_page`]
    /// written at blocks 0, 3 and 17 of a relation.
    #[test]
    #[cfg(target_endian = "little")]
    fn page_checksum_matches_values_from_pg_checksums() {
        let page = sample_page(0);
        assert_eq!(page_checksum(&page, 0), 0xBFF8);
        assert_eq!(page_checksum(&page, 3), 0xBFFB);
        assert_eq!(page_checksum(&page, 17), 0xC009);
    }

    #[test]
    fn page_checksum_ignores_stored_checksum() {
        let mut page = sample_page(0);
        let before = page_checksum(&page, 0);
        page[8] ^= 0xFF;
        page[9] ^= 0x0F;
        assert_eq!(page_checksum(&page, 0), before);
    }

    #[test]
    fn page_checksum_depends_on_block_number_and_flags() {
        let page = sample_page(0);
        assert_ne!(page_checksum(&page, 0), page_checksum(&page, 1));
        let mut flagged = page.clone();
        flagged[10] ^= 1;
        assert_ne!(page_checksum(&page, 0), page_checksum(&flagged, 0));
    }

    #[test]
    fn page_checksum_is_never_zero() {
        let page = sample_page(0);
        for blkno in 0..70_000 {
            assert_ne!(page_checksum(&page, blkno), 0);
        }
    }

    #[test]
    fn check_page_with_stored_checksum_is_valid() {
        let page = sample_page(7);
        assert_eq!(check_page(&page, 7, u64::MAX), PageCheck::Valid);
    }

    #[test]
    fn check_page_at_other_block_is_invalid() {
        let page = sample_page(7);
        let found = u16::from_ne_bytes([page[8], page[9]]);
        assert_eq!(
            check_page(&page, 8, u64::MAX),
            PageCheck::Invalid {
                expected: page_checksum(&page, 8),
                found,
            }
        );
    }

    #[test]
    fn check_page_new_pages_are_new() {
        assert_eq!(check_page(&[0; PAGE_SIZE], 3, u64::MAX), PageCheck::New);
        let mut page = sample_page(3);
        page[14..16].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(check_page(&page, 3, u64::MAX), PageCheck::New);
    }

    #[test]
    fn check_page_at_or_after_backup_start_is_newer() {
        let mut page = sample_page(3);
        page[100] ^= 1; // corrupt, but not checked
        let lsn = (1u64 << 32) | 2;
        assert_eq!(check_page(&page, 3, lsn), PageCheck::Newer);
        assert_eq!(check_page(&page, 3, lsn - 1), PageCheck::Newer);
        assert!(matches!(
            check_page(&page, 3, lsn + 1),
            PageCheck::Invalid { .. }
        ));
    }

    #[test]
    fn check_relation_chunk_reports_invalid_pages_only() {
        let mut data = Vec::new();
        for blkno in 10..14 {
            data.extend(sample_page(blkno));
        }
        data.extend([0u8; PAGE_SIZE]);
        data[2 * PAGE_SIZE + 4000] ^= 0x40;
        data.extend([1u8; 100]); // partial trailing page
        let invalid = check_relation_chunk(&data, 10, u64::MAX);
        assert_eq!(invalid.len(), 1, "{invalid:?}");
        assert_eq!(invalid[0].0, 12);
        assert!(matches!(invalid[0].1, PageCheck::Invalid { .. }));
    }

    #[test]
    #[should_panic(expected = "a PostgreSQL page is 8192 bytes")]
    fn check_page_short_page_panics() {
        check_page(&[0; 100], 0, u64::MAX);
    }
}
