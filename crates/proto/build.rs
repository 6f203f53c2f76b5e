//! Compiles the gRPC definitions with protox (a pure-Rust protobuf compiler), so no
//! `protoc` is needed on any machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/klio/wal/v1/wal.proto",
        "proto/klio/backup/v1/backup.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // `bytes` fields as `bytes::Bytes`: WAL payloads are passed on without copies.
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
