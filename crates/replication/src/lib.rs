//! A client of PostgreSQL's physical streaming replication protocol.
//!
//! Built on `postgres_protocol`'s message encoders and decoders, over TCP or a Unix socket,
//! without TLS. A physical walsender accepts only replication commands, which is all this
//! crate sends.
//!
//! Principal types:
//! - [`ReplicationConfig`] (with [`Host`]): where to connect, from a libpq connection string
//!   ([`ReplicationConfig::from_dsn`]); the password is redacted in `Debug`.
//! - [`ReplicationConnection`]: [`connect`](ReplicationConnection::connect) (trust, cleartext,
//!   MD5, SCRAM-SHA-256), then the replication commands
//!   [`identify_system`](ReplicationConnection::identify_system) ([`SystemIdentity`]),
//!   [`show`](ReplicationConnection::show),
//!   [`wal_segment_size`](ReplicationConnection::wal_segment_size),
//!   [`read_replication_slot`](ReplicationConnection::read_replication_slot) ([`SlotInfo`]),
//!   [`create_physical_slot`](ReplicationConnection::create_physical_slot),
//!   [`timeline_history`](ReplicationConnection::timeline_history) and
//!   [`start_physical`](ReplicationConnection::start_physical).
//! - [`ReplicationStream`]: [`next_message`](ReplicationStream::next_message) (cancel-safe, for
//!   `tokio::select!`) yields [`StreamMessage`]s; [`try_next_buffered`](ReplicationStream::try_next_buffered)
//!   batches what already arrived; [`send_status`](ReplicationStream::send_status) reports
//!   write/flush/apply positions.
//! - [`Error`]: server errors with SQLSTATE, detail and hint, authentication failures, I/O,
//!   protocol violations; [`Error::is_retryable`] and [`Error::is_wal_removed`] classify them.
//!
//! # The end of a timeline
//!
//! When the server finishes a timeline (the client asked for a historic timeline, or the
//! server was promoted while streaming), it sends `CopyDone`:
//! [`next_message`](ReplicationStream::next_message) returns [`StreamMessage::EndOfStream`].
//! [`finish_timeline`](ReplicationStream::finish_timeline) then answers with `CopyDone`, reads
//! the optional `(next_tli, next_tli_startpos)` result set, `CommandComplete` and
//! `ReadyForQuery`, and hands back the [`ReplicationConnection`] so the caller can
//! `start_physical` on the next timeline:
//!
//! ```no_run
//! # async fn run(cfg: klio_replication::ReplicationConfig) -> Result<(), klio_replication::Error> {
//! use klio_replication::{ReplicationConnection, StreamMessage};
//! let mut conn = ReplicationConnection::connect(&cfg).await?;
//! let id = conn.identify_system().await?;
//! let size = conn.wal_segment_size().await?;
//! let mut stream = conn.start_physical(None, id.xlogpos.segment_start(size), id.timeline).await?;
//! loop {
//!     match stream.next_message().await? {
//!         StreamMessage::XLogData { start, data, .. } => { /* write data at start */ }
//!         StreamMessage::Keepalive { wal_end, reply_requested: true } => {
//!             stream.send_status(wal_end, wal_end, wal_end, false).await?;
//!         }
//!         StreamMessage::Keepalive { .. } => {}
//!         StreamMessage::EndOfStream => break,
//!     }
//! }
//! let (next, conn) = stream.finish_timeline().await?;
//! # let _ = (next, conn);
//! # Ok(())
//! # }
//! ```
//!
//! Notices and parameter status messages are skipped wherever they arrive (notices are logged
//! at debug level).

mod config;
mod connection;
mod error;
mod stream;
mod wire;

#[cfg(test)]
mod properties;

/// Entry points for the fuzz targets of `fuzz/` (built only by `cargo fuzz`, which sets
/// `--cfg fuzzing`).
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes `bytes` as a walsender's output; `Err` for a refused message.
    pub fn walsender_output(bytes: &[u8]) -> Result<usize, crate::Error> {
        crate::wire::decode_stream(bytes::BytesMut::from(bytes)).map(|m| m.len())
    }
}

pub use config::{DEFAULT_CONNECT_TIMEOUT, Host, ReplicationConfig};
pub use connection::{ReplicationConnection, SlotInfo, SystemIdentity, parse_size_setting};
pub use error::Error;
pub use stream::{ReplicationStream, StreamMessage};
