//! What a client sends to commit a backup: the protobuf request, its file list checked by
//! the manifest rules the server applies at commit (and the client again at restore), and
//! the tablespace metadata with each location checked.
#![no_main]

use klio_proto::backup::v1::CommitRequest;
use klio_proto::manifest_rules::{check_manifest, check_tablespace_location, tablespaces};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = CommitRequest::decode(data) else {
        return;
    };
    let _ = check_manifest(&request.files);
    if let Ok(metadata) = serde_json::from_slice::<serde_json::Value>(&request.metadata_json)
        && let Ok(list) = tablespaces(&metadata)
    {
        for t in list {
            let _ = check_tablespace_location(t.oid, &t.location);
        }
    }
});
