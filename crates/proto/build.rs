//! Compiles the gRPC definitions with protox (a pure-Rust protobuf compiler), so no
//! `protoc` is needed on any machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/klio/wal/v1/wal.proto",
        "proto/klio/backup/v1/backup.proto",
        // CNPG-I (cnpg-i v0.6.0 wire format). In one compilation, so that the files sharing a
        // package (restore_job in cnpgi.wal.v1, postgres in cnpgi.identity.v1) land in one module.
        "proto/cnpgi/identity.proto",
        "proto/cnpgi/operator_lifecycle.proto",
        "proto/cnpgi/reconciler.proto",
        "proto/cnpgi/wal.proto",
        "proto/cnpgi/restore_job.proto",
        "proto/cnpgi/backup.proto",
        "proto/cnpgi/postgres.proto",
        // The standard health service, for the sidecars' startup probe.
        "proto/grpc/health/v1/health.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // `bytes` fields as `bytes::Bytes`: WAL payloads are passed on without copies.
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
