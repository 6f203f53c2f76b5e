//! WAL file names (every segment size), LSNs and timeline history files: any text gives a
//! value or an error, and what is accepted prints as text that parses to the same value.
#![no_main]

use klio_pg::{Lsn, SegmentSize, TimelineHistory, WalFileName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for shift in [20u32, 24, 30] {
        let size = SegmentSize::new(1 << shift).expect("a valid segment size");
        if let Ok(name) = WalFileName::parse(&text, size) {
            let again = WalFileName::parse(&name.to_string(), size).ok();
            assert_eq!(again, Some(name), "{text:?} does not survive printing");
        }
    }
    if let Ok(lsn) = text.parse::<Lsn>() {
        assert_eq!(lsn.to_string().parse::<Lsn>().ok(), Some(lsn));
    }
    let _ = TimelineHistory::parse(&text);
});
