//! The one place where store errors become gRPC statuses.

use klio_wal_store::Error;
use tonic::Status;

/// Maps a WAL store error to the status a client sees; the message is the error's own. A
/// failed background seal is classified by what made it fail: a full disk is
/// `RESOURCE_EXHAUSTED`, a damaged file `DATA_LOSS`.
pub fn store_status(e: Error) -> Status {
    let msg = e.to_string();
    match e.root() {
        Error::InvalidClusterName(_) | Error::InvalidFileName(_) => Status::invalid_argument(msg),
        Error::SystemIdMismatch { .. }
        | Error::SegmentSizeMismatch { .. }
        | Error::UnknownCluster(_)
        | Error::Gap { .. }
        | Error::NotSegmentStart { .. }
        | Error::BadTimelineEnd { .. }
        | Error::TimelineEnded { .. } => Status::failed_precondition(msg),
        Error::Conflict { .. } => Status::already_exists(msg),
        Error::Crypto(klio_crypto::Error::Corrupt { .. }) | Error::Damaged { .. } => {
            Status::data_loss(msg)
        }
        Error::Io { source, .. } if is_disk_full(source) => Status::resource_exhausted(format!(
            "{msg}\nHINT: the Klio server's data volume is full; free space (or grow the volume) and archiving resumes by itself"
        )),
        Error::Crypto(_) | Error::Io { .. } | Error::SealFailed(_) => Status::internal(msg),
    }
}

/// ENOSPC, or EDQUOT (a quota is a full disk for this purpose).
fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}
