//! A walsender's output as the replication client frames and decodes it: backend message
//! framing and the streaming messages inside CopyData.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = klio_replication::fuzzing::walsender_output(data);
});
