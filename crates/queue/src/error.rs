//! The crate's error type.

use std::path::PathBuf;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the work queue backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The embedded queue's database file could not be opened or created.
    #[error("could not open work queue \"{path}\": {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    /// A read or write of the embedded queue's database failed.
    #[error("work queue \"{path}\": {source}")]
    Database {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    /// The embedded queue's file was written by an incompatible version.
    #[error(
        "work queue \"{path}\" has format version {found}, but this build reads version {expected}\nHINT: drain the queue with the Klio version that wrote it, or move the file away"
    )]
    Format {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    /// A stored record does not decode.
    #[error("corrupt work queue record for task \"{id}\": {source}")]
    Corrupt {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    /// A NATS or JetStream operation failed (connection, timeout, server error).
    #[error("NATS work queue at \"{url}\": could not {action}: {message}")]
    Nats {
        url: String,
        action: String,
        message: String,
    },
    /// A task that cannot be enqueued.
    #[error("invalid task \"{id}\": {reason}")]
    InvalidTask { id: String, reason: &'static str },
    /// A delivery was given back to a queue of another backend.
    #[error("delivery of task \"{id}\" was given back to a work queue of another backend")]
    ForeignDelivery { id: String },
    /// A blocking database operation panicked or was cancelled.
    #[error("work queue operation did not complete: {0}")]
    Background(String),
}

impl Error {
    /// Whether trying the same operation again later can succeed (the NATS server may come
    /// back); the other errors need a person or a code change.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Nats { .. } | Error::Background(_))
    }
}
