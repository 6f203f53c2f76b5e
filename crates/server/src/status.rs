//! The one place where store errors become gRPC statuses.

use klio_wal_store::Error;
use tonic::Status;

/// Maps a WAL store error to the status a client sees; the message is the error's own.
pub fn store_status(e: Error) -> Status {
    let msg = e.to_string();
    match &e {
        Error::InvalidClusterName(_) | Error::InvalidFileName(_) => Status::invalid_argument(msg),
        Error::SystemIdMismatch { .. }
        | Error::SegmentSizeMismatch { .. }
        | Error::UnknownCluster(_)
        | Error::Gap { .. }
        | Error::NotSegmentStart { .. }
        | Error::BadTimelineEnd { .. }
        | Error::TimelineEnded { .. } => Status::failed_precondition(msg),
        Error::Conflict { .. } => Status::already_exists(msg),
        Error::Crypto(klio_crypto::Error::Corrupt { .. }) => Status::data_loss(msg),
        Error::Io { source, .. } if source.raw_os_error() == Some(libc_enospc()) => {
            Status::resource_exhausted(msg)
        }
        Error::Crypto(_) | Error::Io { .. } | Error::SealFailed(_) => Status::internal(msg),
    }
}

/// ENOSPC on Linux.
const fn libc_enospc() -> i32 {
    28
}
