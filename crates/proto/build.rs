//! Compiles the gRPC definitions with protox (a pure-Rust protobuf compiler), so no
//! `protoc` is needed on any machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/klio/wal/v1/wal.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
