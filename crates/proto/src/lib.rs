//! Generated gRPC code for Klio's own services (tonic + prost).
//!
//! - [`wal::v1`]: the WAL service (`klio.wal.v1.Wal`): hello, durable streaming, get, list.
//! - [`backup::v1`]: the base-backup service (`klio.backup.v1.Backup`): sessions that
//!   upload only missing blocks, the catalog, restore reads and verification.
//!
//! The `.proto` sources are under `proto/` in this crate and are compiled at build time by
//! protox, so the generated code always matches them.

pub mod wal {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("klio.wal.v1");
    }
}

pub mod backup {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("klio.backup.v1");
    }
}
