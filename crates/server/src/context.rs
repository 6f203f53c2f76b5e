//! What the services share: the server's mode, Tier 1's WAL store, Tier 2, the cluster
//! settings and the work queue.

use std::sync::Arc;

use klio_proto::backup::v1 as pb;
use klio_queue::{Task, WorkQueue, kinds};
use klio_wal_store::WalStore;
use tonic::Status;

use crate::relay::Progress;
use crate::settings::Settings;
use crate::tier2::{Tier2, Tier2Handle};

/// Shared state of the services. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    /// `--mode read-only`: Tier 2 only; every write is refused.
    pub read_only: bool,
    /// Tier 1's WAL archive (absent on a read-only server).
    pub wal: Option<WalStore>,
    pub tier2: Option<Arc<Tier2Handle>>,
    pub settings: Option<Settings>,
    pub queue: Option<Arc<dyn WorkQueue>>,
    /// "embedded" or the NATS URL, for status output.
    pub queue_backend: String,
    pub progress: Option<Progress>,
    /// Tier 1's data directory (absent on a read-only server).
    pub data_dir: Option<std::path::PathBuf>,
    pub metrics: crate::metrics::Metrics,
}

impl Context {
    /// Refuses `what` on a read-only server.
    pub fn writable(&self, what: &str) -> Result<(), Status> {
        if self.read_only {
            return Err(read_only_status(what));
        }
        Ok(())
    }

    /// Tier 2, or why it cannot be used.
    pub async fn tier2(&self) -> Result<Arc<Tier2>, Status> {
        let Some(handle) = &self.tier2 else {
            return Err(Status::failed_precondition(
                "this Klio server has no Tier 2\nHINT: start it with --tier2-s3-bucket (and --tier2-s3-endpoint for an S3-compatible server)",
            ));
        };
        handle
            .get()
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))
    }

    /// Tier 2 if it is open already (never waits for the bucket).
    pub fn tier2_if_open(&self) -> Option<Arc<Tier2>> {
        self.tier2.as_ref().and_then(|h| h.if_open())
    }

    /// Records that `cluster` does (or, when `authoritative`, does not) copy its WAL and
    /// backups to Tier 2. Asking for Tier 2 from a server without one is an error.
    pub fn declare_tier2_backup(
        &self,
        cluster: &str,
        on: bool,
        authoritative: bool,
    ) -> Result<(), Status> {
        if on && self.tier2.is_none() {
            return Err(Status::failed_precondition(format!(
                "cluster \"{cluster}\" asks for Tier 2 (--tier2-backup), but this Klio server has no Tier 2\nHINT: start the server with --tier2-s3-bucket, or drop --tier2-backup"
            )));
        }
        let Some(settings) = &self.settings else {
            return Ok(());
        };
        if !on && !authoritative {
            return Ok(());
        }
        settings
            .update(cluster, |s| s.tier2_backup = on)
            .map_err(|e| Status::internal(format!("{e:#}")))
    }

    /// Whether `cluster` copies its WAL and backups to Tier 2.
    pub fn uses_tier2(&self, cluster: &str) -> bool {
        self.tier2.is_some()
            && self
                .settings
                .as_ref()
                .is_some_and(|s| s.get(cluster).tier2_backup)
    }

    /// The work queue, or why there is none.
    pub fn queue(&self) -> Result<Arc<dyn WorkQueue>, Status> {
        self.writable("queue administration")?;
        self.queue
            .clone()
            .ok_or_else(|| Status::failed_precondition("this server has no work queue"))
    }

    /// Enqueues `task`; a failure is logged (the periodic scheduler enqueues relays again).
    pub async fn enqueue(&self, task: Task) {
        let Some(queue) = &self.queue else { return };
        let id = task.id.clone();
        match queue.enqueue(task).await {
            Ok(true) => tracing::debug!(task = %id, "task enqueued"),
            Ok(false) => tracing::debug!(task = %id, "task already pending"),
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "could not enqueue a task; the scheduler will try again")
            }
        }
    }

    /// Enqueues the Tier 2 relay of a committed backup and of the cluster's WAL.
    pub async fn enqueue_backup_relay(&self, cluster: &str, backup_id: &str) {
        self.enqueue(backup_relay_task(cluster, backup_id)).await;
        self.enqueue(wal_relay_task(cluster)).await;
    }

    /// The queue's state and each cluster's relay progress.
    pub async fn queue_status(&self) -> Result<pb::QueueStatusResponse, Status> {
        let queue = self.queue()?;
        let unavailable = |e: klio_queue::Error| Status::unavailable(e.to_string());
        let pending = queue.pending_count().await.map_err(unavailable)? as u64;
        let failed = queue.list_failed().await.map_err(unavailable)?.len() as u64;
        let relay = match &self.progress {
            Some(p) => p.all().map_err(|e| Status::internal(format!("{e:#}")))?,
            None => Vec::new(),
        };
        Ok(pb::QueueStatusResponse {
            backend: self.queue_backend.clone(),
            pending,
            failed,
            relay,
        })
    }
}

/// The error every write gets from a read-only server.
pub fn read_only_status(what: &str) -> Status {
    Status::failed_precondition(format!(
        "the server is read-only (--mode read-only) and accepts no {what}\nHINT: a read-only server serves the catalog, restores and wal-get from Tier 2; send writes to the standard Klio server"
    ))
}

/// The task that copies the cluster's WAL Tier 2 lacks.
pub fn wal_relay_task(cluster: &str) -> Task {
    Task::new(
        format!("wal-relay/{cluster}"),
        kinds::WAL_RELAY,
        cluster,
        serde_json::Value::Null,
    )
}

/// The task that copies one backup to Tier 2.
pub fn backup_relay_task(cluster: &str, backup_id: &str) -> Task {
    Task::new(
        format!("backup-relay/{cluster}/{backup_id}"),
        kinds::BACKUP_RELAY,
        cluster,
        serde_json::json!({ "backup_id": backup_id }),
    )
}

/// The task that applies the cluster's stored retention policy to `tier`.
pub fn retention_task(cluster: &str, tier: u32) -> Task {
    Task::new(
        format!("retention/{cluster}/tier{tier}"),
        kinds::RETENTION,
        cluster,
        serde_json::json!({ "tier": tier }),
    )
}

/// The task that collects the garbage of `tier`'s repository.
pub fn gc_task(tier: u32) -> Task {
    Task::new(
        format!("gc/tier{tier}"),
        kinds::GC,
        "all",
        serde_json::json!({ "tier": tier }),
    )
}
