//! Generated gRPC code for Klio's own services (tonic + prost).
//!
//! - [`wal::v1`]: the WAL service (`klio.wal.v1.Wal`): hello, durable streaming, get, list.
//! - [`backup::v1`]: the base-backup service (`klio.backup.v1.Backup`): sessions that
//!   upload only missing blocks, the catalog, restore reads and verification.
//!
//! - [`cnpgi`]: the CNPG-I services (wire format of cnpg-i v0.6.0) that Klio's CloudNativePG
//!   plugin serves: identity, operator lifecycle, reconciler hooks (operator side), WAL,
//!   backup, restore-job hooks and postgres (sidecar side). The package names are CNPG-I's,
//!   including its two files that reuse another package.
//!
//! - [`grpc_health::v1`]: the standard gRPC health service (`grpc.health.v1.Health`), the
//!   sidecars' startup probe.
//!
//! The `.proto` sources are under `proto/` in this crate and are compiled at build time by
//! protox, so the generated code always matches them.
//!
//! Beside the generated code, what both ends of Klio's own services agree on: [`limits`],
//! and [`manifest_rules`], the rules a backup manifest obeys (checked by the server before
//! a backup enters the catalog, and by a restore before it writes anything).

pub mod manifest_rules;

/// Message and piece limits both sides of Klio's own services agree on.
pub mod limits {
    /// Largest gRPC message of the WAL service (a client sends at most 4 MiB of WAL per
    /// request).
    pub const MAX_WAL_MESSAGE: usize = 32 << 20;
    /// Largest gRPC message of the base-backup service.
    pub const MAX_BACKUP_MESSAGE: usize = 64 << 20;
    /// Block ids a client puts in one `AddFiles` piece at most: 1 GiB of 8 KiB pages, one
    /// default relation segment file; the server writes blocklists of this length.
    pub const MAX_PIECE_IDS: usize = 131_072;
    /// Largest block of a backup (plaintext bytes): a file's `block_size`, and the size of a
    /// file stored whole, are at most this. The repository refuses larger blocks.
    pub const MAX_BLOCK_SIZE: usize = 1 << 20;
    /// Plaintext bytes a backup client puts in one run at most: consecutive new blocks
    /// sent (and stored) as one compressed frame. A run is at most [`MAX_BLOCK_SIZE`]
    /// bytes and [`MAX_RUN_BLOCKS`] blocks for the server.
    pub const RUN_BYTES: usize = 512 << 10;
    /// Blocks in one run at most.
    pub const MAX_RUN_BLOCKS: usize = 4096;
    /// Largest archived WAL file: a segment of the largest size PostgreSQL allows (1 GiB);
    /// history and backup history files are far smaller.
    pub const MAX_WAL_FILE: u64 = 1 << 30;
}

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

pub mod cnpgi {
    pub mod identity {
        pub mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("cnpgi.identity.v1");
        }
    }
    pub mod operator_lifecycle {
        pub mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("cnpgi.operator_lifecycle.v1");
        }
    }
    pub mod reconciler {
        pub mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("cnpgi.reconciler.v1");
        }
    }
    pub mod wal {
        pub mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("cnpgi.wal.v1");
        }
    }
    pub mod backup {
        pub mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("cnpgi.backup.v1");
        }
    }
}

pub mod grpc_health {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("grpc.health.v1");
    }
}
