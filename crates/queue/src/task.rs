//! What the queue carries: tasks, deliveries of tasks, and failed tasks.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::{embedded, nats};

/// The task kinds Klio enqueues (the queue itself accepts any non-empty kind).
pub mod kinds {
    /// Relay a cluster's WAL to Tier 2 storage.
    pub const WAL_RELAY: &str = "wal-relay";
    /// Relay a base backup to Tier 2 storage.
    pub const BACKUP_RELAY: &str = "backup-relay";
    /// Apply a cluster's retention policy.
    pub const RETENTION: &str = "retention";
    /// Garbage-collect unreferenced repository objects.
    pub const GC: &str = "gc";
}

/// A unit of work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The dedup key: enqueueing an id that is already pending is a no-op.
    pub id: String,
    /// What to do: one of [`kinds`].
    pub kind: String,
    /// The PostgreSQL cluster the task is for. Workers run at most one task per (kind, cluster)
    /// at a time.
    pub cluster: String,
    /// Kind-specific parameters.
    pub payload: serde_json::Value,
}

impl Task {
    /// A task with the given fields.
    pub fn new(
        id: impl Into<String>,
        kind: impl Into<String>,
        cluster: impl Into<String>,
        payload: serde_json::Value,
    ) -> Task {
        Task {
            id: id.into(),
            kind: kind.into(),
            cluster: cluster.into(),
            payload,
        }
    }

    /// Checks the fields every backend relies on.
    pub(crate) fn validate(&self) -> Result<()> {
        let reason = if self.id.is_empty() {
            "the id is empty"
        } else if self.kind.is_empty() {
            "the kind is empty"
        } else if self.cluster.is_empty() {
            "the cluster is empty"
        } else {
            return Ok(());
        };
        Err(Error::InvalidTask {
            id: self.id.clone(),
            reason,
        })
    }
}

/// A task handed to a worker by [`WorkQueue::fetch`](crate::WorkQueue::fetch).
///
/// Give it back with exactly one of `ack` or `nak`; a delivery that is dropped instead is
/// delivered again when its lease ends.
pub struct Delivery {
    /// The task.
    pub task: Task,
    /// Which delivery of the task this is: 1 on the first delivery.
    pub attempt: u32,
    pub(crate) token: Token,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("task", &self.task)
            .field("attempt", &self.attempt)
            .field("token", &self.token)
            .finish()
    }
}

/// The backend's handle on one delivery.
pub(crate) enum Token {
    Embedded(embedded::Lease),
    Nats(Box<nats::Lease>),
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Embedded(lease) => f.debug_tuple("Embedded").field(lease).finish(),
            Token::Nats(lease) => f.debug_tuple("Nats").field(lease).finish(),
        }
    }
}

/// A task on the dead-letter list (serialized as JSON in both backends' dead-letter stores).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailedTask {
    /// The task as it was enqueued.
    pub task: Task,
    /// How many deliveries it had.
    pub attempts: u32,
    /// The error of the last attempt.
    pub last_error: String,
    /// When it was moved to the dead-letter list.
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: time::OffsetDateTime,
}
