//! Sealed objects: a plaintext from the input is sealed, then changed at positions and by
//! masks the input chooses. Opening must give back the plaintext when nothing changed and
//! fail otherwise; the raw input, opened as an object, must fail.
#![no_main]

use std::sync::OnceLock;

use klio_crypto::{MasterKey, ObjectKind, open_object, seal_object};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static MasterKey {
    static KEY: OnceLock<MasterKey> = OnceLock::new();
    KEY.get_or_init(MasterKey::generate)
}

fuzz_target!(|data: &[u8]| {
    let _ = open_object(key(), "fuzz/object", data);
    let (plain, edits) = data.split_at(data.len() / 2);
    let sealed = seal_object(key(), ObjectKind::Blob, "fuzz/object", plain, Some(1));
    let mut changed = sealed.clone();
    for edit in edits.chunks(3) {
        if let [a, b, mask] = *edit {
            if changed.is_empty() {
                break;
            }
            let at = usize::from(u16::from_le_bytes([a, b])) % changed.len();
            changed[at] ^= mask;
        }
    }
    // An edit count byte beyond the pairs: truncate by that much.
    if edits.len() % 3 == 1 {
        let cut = usize::from(edits[edits.len() - 1]).min(changed.len());
        changed.truncate(changed.len() - cut);
    }
    match open_object(key(), "fuzz/object", &changed) {
        Ok((kind, out)) => {
            assert!(changed == sealed, "a changed object opened");
            assert_eq!((kind, out.as_slice()), (ObjectKind::Blob, plain));
        }
        Err(_) => assert!(changed != sealed, "an intact object did not open"),
    }
});
