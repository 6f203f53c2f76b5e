//! The repository's object plaintexts (after unsealing): index objects, blocklists and
//! manifests. The first byte picks the decoder.
#![no_main]

use klio_repository::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => drop(fuzzing::index(rest)),
        1 => drop(fuzzing::blocklist(rest)),
        _ => drop(fuzzing::manifest(rest)),
    }
});
