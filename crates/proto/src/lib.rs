//! Generated gRPC code for Klio's own services (tonic + prost).
//!
//! - [`wal::v1`]: the WAL service (`klio.wal.v1.Wal`): hello, durable streaming, get, list.
//!
//! The `.proto` sources are under `proto/` in this crate and are compiled at build time by
//! protox, so the generated code always matches them.

pub mod wal {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("klio.wal.v1");
    }
}
