//! Klio's client side, one library for the `klio` CLI and the CloudNativePG sidecars, so the
//! sidecars adapt these calls instead of copying them. It speaks to the server only through
//! `klio-proto` (and its limits) and never depends on the server crate.
//!
//! - [`client`]: the connection flags ([`client::Connection`], [`client::ClientArgs`]) and the
//!   error mapping of calls;
//! - [`backup`]: an online base backup (`klio backup`);
//! - [`restore`]: a restore to a point in time (`klio restore`);
//! - [`wal_get`]: one archived WAL file (`restore_command`);
//! - [`wal_stream`]: WAL streaming from the local PostgreSQL (`klio-wal`);
//! - [`catalog`]: backups list/show, verify, retention, garbage collection;
//! - [`admin`]: the server's work queue (certificate `admin@klio`).

pub mod admin;
pub mod backup;
pub mod catalog;
pub mod client;
pub mod report;
pub mod restore;
pub mod status;
pub mod wal_get;
pub mod wal_stream;
