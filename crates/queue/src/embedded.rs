//! The embedded backend: a redb database file, `<dir>/queue.redb`.
//!
//! Tables (format version 1, stored under `format` in `meta`):
//!
//! | table    | key                       | value                                   |
//! |----------|---------------------------|-----------------------------------------|
//! | `tasks`   | task id                  | JSON `TaskRecord`: the task, its enqueue sequence number, deliveries so far, last error, and state (ready, delayed until a time, or leased until a time) |
//! | `ready`   | sequence                 | task id: tasks that can be delivered now, delivered in enqueue order |
//! | `delayed` | (ready at ms, sequence)  | task id: nakked tasks waiting for their retry time |
//! | `leased`  | (lease end ms, sequence) | task id: delivered tasks, by lease end |
//! | `failed`  | task id                  | JSON [`FailedTask`]: the dead-letter list |
//! | `meta`    | `format`, `next_seq`     | u64 |
//!
//! Times are milliseconds since the Unix epoch. Every operation that changes the queue is one
//! write transaction committed with redb's default durability (fsynced before `commit`
//! returns); a fetch that finds nothing to do aborts its transaction instead, so polling does
//! not write. A fetch first moves delayed tasks whose time has come and tasks whose lease
//! expired back to `ready`, keeping their enqueue position, so due tasks are always delivered
//! in enqueue order. Opening the file makes every leased task ready again, because the process
//! that held the lease is gone: at-least-once across crashes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::task::{Delivery, FailedTask, Task, Token};
use crate::{BoxFuture, FETCH_WAIT, RetryPolicy, WorkQueue};

/// The file name inside the queue directory.
pub const FILE_NAME: &str = "queue.redb";
const FORMAT_VERSION: u64 = 1;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const READY: TableDefinition<u64, &str> = TableDefinition::new("ready");
const DELAYED: TableDefinition<(u64, u64), &str> = TableDefinition::new("delayed");
const LEASED: TableDefinition<(u64, u64), &str> = TableDefinition::new("leased");
const FAILED: TableDefinition<&str, &[u8]> = TableDefinition::new("failed");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A pending task as stored in `tasks`.
#[derive(Debug, Serialize, Deserialize)]
struct TaskRecord {
    task: Task,
    /// Enqueue sequence number: orders tasks, and tells a new task from an older one with the
    /// same id.
    seq: u64,
    /// Deliveries so far.
    attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum State {
    Ready,
    Delayed { until_ms: u64 },
    Leased { until_ms: u64, lease_ms: u64 },
}

/// The embedded backend's handle on one delivery.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lease {
    seq: u64,
    attempt: u32,
}

/// The embedded, durable work queue (the default backend). See the [module docs](self) for
/// the file format.
///
/// One process at a time may open a queue file (redb locks it). Operations run on Tokio's
/// blocking threads.
#[derive(Clone)]
pub struct EmbeddedQueue {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    max_attempts: u32,
    /// Wakes waiting fetches when a task becomes ready.
    notify: Notify,
}

/// An error inside a transaction, before the path is attached.
enum TxError {
    Db(redb::Error),
    Corrupt {
        id: String,
        source: serde_json::Error,
    },
    Format {
        found: u64,
    },
}

macro_rules! tx_error_from_redb {
    ($($t:ty),*) => {
        $(impl From<$t> for TxError {
            fn from(e: $t) -> TxError {
                TxError::Db(e.into())
            }
        })*
    };
}
tx_error_from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

type TxResult<T> = std::result::Result<T, TxError>;

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    millis(since_epoch)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn decode<T: for<'de> Deserialize<'de>>(id: &str, bytes: &[u8]) -> TxResult<T> {
    serde_json::from_slice(bytes).map_err(|source| TxError::Corrupt {
        id: id.to_string(),
        source,
    })
}

fn encode<T: Serialize>(id: &str, value: &T) -> TxResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| TxError::Corrupt {
        id: id.to_string(),
        source,
    })
}

type Bytes = &'static [u8];

/// The tables of one write transaction.
struct Tables<'t> {
    tasks: redb::Table<'t, &'static str, Bytes>,
    ready: redb::Table<'t, u64, &'static str>,
    delayed: redb::Table<'t, (u64, u64), &'static str>,
    leased: redb::Table<'t, (u64, u64), &'static str>,
    failed: redb::Table<'t, &'static str, Bytes>,
    meta: redb::Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> TxResult<Tables<'t>> {
        Ok(Tables {
            tasks: txn.open_table(TASKS)?,
            ready: txn.open_table(READY)?,
            delayed: txn.open_table(DELAYED)?,
            leased: txn.open_table(LEASED)?,
            failed: txn.open_table(FAILED)?,
            meta: txn.open_table(META)?,
        })
    }

    fn load(&self, id: &str) -> TxResult<Option<TaskRecord>> {
        match self.tasks.get(id)? {
            Some(bytes) => decode(id, bytes.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Stores `record` and puts it in the index of its state.
    fn store(&mut self, record: &TaskRecord) -> TxResult<()> {
        let id = record.task.id.as_str();
        let bytes = encode(id, record)?;
        self.tasks.insert(id, bytes.as_slice())?;
        match record.state {
            State::Ready => {
                self.ready.insert(record.seq, id)?;
            }
            State::Delayed { until_ms } => {
                self.delayed.insert((until_ms, record.seq), id)?;
            }
            State::Leased { until_ms, .. } => {
                self.leased.insert((until_ms, record.seq), id)?;
            }
        }
        Ok(())
    }

    /// Removes `record` from the index of its state (not from `tasks`).
    fn unindex(&mut self, record: &TaskRecord) -> TxResult<()> {
        match record.state {
            State::Ready => {
                self.ready.remove(record.seq)?;
            }
            State::Delayed { until_ms } => {
                self.delayed.remove((until_ms, record.seq))?;
            }
            State::Leased { until_ms, .. } => {
                self.leased.remove((until_ms, record.seq))?;
            }
        }
        Ok(())
    }

    /// Moves `record` (already out of its index) to the dead-letter list.
    fn dead_letter(&mut self, record: TaskRecord, error: String) -> TxResult<()> {
        let id = record.task.id.clone();
        self.tasks.remove(id.as_str())?;
        tracing::warn!(
            task = %id,
            kind = %record.task.kind,
            cluster = %record.task.cluster,
            attempts = record.attempts,
            error = %error,
            "work queue task failed for good, moved to the dead-letter list"
        );
        let entry = FailedTask {
            task: record.task,
            attempts: record.attempts,
            last_error: error,
            failed_at: time::OffsetDateTime::now_utc(),
        };
        let bytes = encode(&id, &entry)?;
        self.failed.insert(id.as_str(), bytes.as_slice())?;
        Ok(())
    }

    fn next_seq(&mut self) -> TxResult<u64> {
        let seq = self.meta.get("next_seq")?.map(|v| v.value()).unwrap_or(1);
        self.meta.insert("next_seq", seq + 1)?;
        Ok(seq)
    }

    /// Adds a new pending task (attempt count 0) at the end of the queue.
    fn add(&mut self, task: Task) -> TxResult<()> {
        let seq = self.next_seq()?;
        self.store(&TaskRecord {
            task,
            seq,
            attempts: 0,
            last_error: None,
            state: State::Ready,
        })
    }

    /// Makes task `id` (already out of its time index) ready again, or dead-letters it when its
    /// lease expired on its last attempt.
    fn make_ready(&mut self, id: &str, max_attempts: u32) -> TxResult<()> {
        let Some(mut record) = self.load(id)? else {
            return Ok(());
        };
        if matches!(record.state, State::Leased { .. }) && record.attempts >= max_attempts {
            let error = lease_expired_error(&record);
            return self.dead_letter(record, error);
        }
        record.state = State::Ready;
        self.store(&record)
    }
}

/// The entries of a time index (`delayed` or `leased`), all of them or those with a time up to
/// `up_to_ms`.
fn time_index_entries(
    table: &impl ReadableTable<(u64, u64), &'static str>,
    up_to_ms: Option<u64>,
) -> TxResult<Vec<((u64, u64), String)>> {
    let range = match up_to_ms {
        Some(ms) => table.range(..=(ms, u64::MAX))?,
        None => table.range::<(u64, u64)>(..)?,
    };
    let mut out = Vec::new();
    for entry in range {
        let (key, id) = entry?;
        out.push((key.value(), id.value().to_string()));
    }
    Ok(out)
}

fn first_time(table: &impl ReadableTable<(u64, u64), &'static str>) -> TxResult<Option<u64>> {
    Ok(table.first()?.map(|(k, _)| k.value().0))
}

fn lease_expired_error(record: &TaskRecord) -> String {
    let mut error = format!(
        "attempt {} was neither acked nor nakked before its lease expired (the worker crashed, stalled or was stopped)",
        record.attempts
    );
    if let Some(last) = &record.last_error {
        error.push_str("; previous error: ");
        error.push_str(last);
    }
    error
}

/// What one fetch transaction found.
struct Taken {
    deliveries: Vec<Delivery>,
    /// When something next becomes due (a ready time or a lease end), in ms since the epoch.
    next_due_ms: Option<u64>,
}

impl EmbeddedQueue {
    /// Opens (creating when needed) the queue in `dir`, file [`FILE_NAME`]. Tasks get
    /// `policy.max_attempts` deliveries before they move to the dead-letter list.
    ///
    /// Every task that was leased when the file was last closed is ready again. Blocking: call
    /// it at startup or from a blocking thread.
    pub fn open(dir: &Path, policy: &RetryPolicy) -> Result<EmbeddedQueue> {
        let path = dir.join(FILE_NAME);
        let open_error = |e: redb::Error| Error::Open {
            path: path.clone(),
            source: Box::new(e),
        };
        std::fs::create_dir_all(dir).map_err(|e| open_error(e.into()))?;
        let db = Database::create(&path).map_err(|e| open_error(e.into()))?;
        // Tasks name clusters and backups: readable by this server's user only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| open_error(e.into()))?;
        }
        let inner = Inner {
            db,
            path: path.clone(),
            max_attempts: policy.attempt_limit(),
            notify: Notify::new(),
        };
        let recovered = inner.recover().map_err(|e| match e {
            TxError::Db(e) => open_error(e),
            other => inner.error(other),
        })?;
        if recovered > 0 {
            tracing::info!(
                path = %path.display(),
                tasks = recovered,
                "work queue: tasks leased before the last shutdown are ready again"
            );
        }
        Ok(EmbeddedQueue {
            inner: Arc::new(inner),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> TxResult<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let joined =
            tokio::task::spawn_blocking(move || f(&inner).map_err(|e| inner.error(e))).await;
        joined.map_err(|e| Error::Background(e.to_string()))?
    }

    fn lease_of<'d>(&self, delivery: &'d Delivery) -> Result<&'d Lease> {
        match &delivery.token {
            Token::Embedded(lease) => Ok(lease),
            Token::Nats(_) => Err(Error::ForeignDelivery {
                id: delivery.task.id.clone(),
            }),
        }
    }

    async fn fetch_impl(&self, max: usize, lease: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + FETCH_WAIT;
        let lease_ms = millis(lease).max(1);
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = self
                .blocking(move |inner| inner.take(max, lease_ms))
                .await?;
            let now = Instant::now();
            if !taken.deliveries.is_empty() || now >= deadline {
                return Ok(taken.deliveries);
            }
            let mut wait = deadline - now;
            if let Some(due) = taken.next_due_ms {
                // Wake up shortly after the next ready time or lease end.
                let until_due = Duration::from_millis(due.saturating_sub(now_ms()) + 1);
                wait = wait.min(until_due);
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

impl Inner {
    fn error(&self, e: TxError) -> Error {
        match e {
            TxError::Db(source) => Error::Database {
                path: self.path.clone(),
                source: Box::new(source),
            },
            TxError::Corrupt { id, source } => Error::Corrupt { id, source },
            TxError::Format { found } => Error::Format {
                path: self.path.clone(),
                found,
                expected: FORMAT_VERSION,
            },
        }
    }

    /// Checks the format and makes every leased task ready again. Returns how many.
    fn recover(&self) -> TxResult<usize> {
        let txn = self.db.begin_write()?;
        let recovered;
        {
            let mut t = Tables::open(&txn)?;
            let found = t.meta.get("format")?.map(|v| v.value());
            match found {
                Some(FORMAT_VERSION) => {}
                None => {
                    t.meta.insert("format", FORMAT_VERSION)?;
                }
                Some(found) => return Err(TxError::Format { found }),
            }
            let entries = time_index_entries(&t.leased, None)?;
            recovered = entries.len();
            for (key, id) in entries {
                t.leased.remove(key)?;
                // The attempt limit is checked when the task is next fetched.
                if let Some(mut record) = t.load(&id)? {
                    record.state = State::Ready;
                    t.store(&record)?;
                }
            }
        }
        txn.commit()?;
        Ok(recovered)
    }

    fn enqueue(&self, task: Task) -> TxResult<bool> {
        let txn = self.db.begin_write()?;
        {
            let mut t = Tables::open(&txn)?;
            if t.tasks.get(task.id.as_str())?.is_some() {
                drop(t);
                txn.abort()?;
                return Ok(false);
            }
            t.add(task)?;
        }
        txn.commit()?;
        self.notify.notify_waiters();
        Ok(true)
    }

    /// One fetch transaction: makes due delayed tasks and expired leases ready, then leases up
    /// to `max` ready tasks in enqueue order.
    fn take(&self, max: usize, lease_ms: u64) -> TxResult<Taken> {
        let now = now_ms();
        let txn = self.db.begin_write()?;
        let mut changed = false;
        let mut deliveries = Vec::new();
        let next_due_ms;
        {
            let mut t = Tables::open(&txn)?;
            for (key, id) in time_index_entries(&t.delayed, Some(now))? {
                t.delayed.remove(key)?;
                t.make_ready(&id, self.max_attempts)?;
                changed = true;
            }
            for (key, id) in time_index_entries(&t.leased, Some(now))? {
                t.leased.remove(key)?;
                t.make_ready(&id, self.max_attempts)?;
                changed = true;
            }

            while deliveries.len() < max {
                let first = t
                    .ready
                    .first()?
                    .map(|(k, v)| (k.value(), v.value().to_string()));
                let Some((seq, id)) = first else { break };
                t.ready.remove(seq)?;
                changed = true;
                let Some(mut record) = t.load(&id)? else {
                    continue;
                };
                if record.attempts >= self.max_attempts {
                    // Leased on its last attempt when the previous process stopped.
                    let error = lease_expired_error(&record);
                    t.dead_letter(record, error)?;
                    continue;
                }
                record.attempts += 1;
                let until_ms = now.saturating_add(lease_ms);
                record.state = State::Leased { until_ms, lease_ms };
                t.store(&record)?;
                deliveries.push(Delivery {
                    attempt: record.attempts,
                    token: Token::Embedded(Lease {
                        seq: record.seq,
                        attempt: record.attempts,
                    }),
                    task: record.task,
                });
            }

            next_due_ms = match (first_time(&t.delayed)?, first_time(&t.leased)?) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        if changed {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(Taken {
            deliveries,
            next_due_ms,
        })
    }

    fn ack(&self, id: &str, lease: Lease) -> TxResult<()> {
        let txn = self.db.begin_write()?;
        let mut changed = false;
        {
            let mut t = Tables::open(&txn)?;
            if let Some(record) = t.load(id)?
                && record.seq == lease.seq
            {
                // Also when the lease expired meanwhile: the work is done.
                t.unindex(&record)?;
                t.tasks.remove(id)?;
                changed = true;
            }
        }
        if changed {
            txn.commit()?;
        } else {
            tracing::debug!(task = %id, "work queue: ack of a task that is no longer pending");
            txn.abort()?;
        }
        Ok(())
    }

    /// Ends the attempt of `lease` with `error`: retried after `retry_after`, or dead-lettered
    /// when it was the last attempt or `reject` says it can never succeed.
    fn nak(
        &self,
        id: &str,
        lease: Lease,
        retry_after: Duration,
        error: String,
        reject: bool,
    ) -> TxResult<()> {
        let txn = self.db.begin_write()?;
        let mut changed = false;
        {
            let mut t = Tables::open(&txn)?;
            if let Some(mut record) = t.load(id)?
                && record.seq == lease.seq
                && record.attempts == lease.attempt
                && matches!(record.state, State::Leased { .. })
            {
                t.unindex(&record)?;
                if reject || record.attempts >= self.max_attempts {
                    t.dead_letter(record, error)?;
                } else {
                    record.state = if retry_after.is_zero() {
                        State::Ready
                    } else {
                        State::Delayed {
                            until_ms: now_ms().saturating_add(millis(retry_after)),
                        }
                    };
                    record.last_error = Some(error);
                    t.store(&record)?;
                }
                changed = true;
            }
        }
        if changed {
            txn.commit()?;
            self.notify.notify_waiters();
        } else {
            tracing::debug!(task = %id, "work queue: nak of a lease that was lost; ignored");
            txn.abort()?;
        }
        Ok(())
    }

    fn keep_alive(&self, id: &str, lease: Lease) -> TxResult<bool> {
        let txn = self.db.begin_write()?;
        let mut kept = false;
        {
            let mut t = Tables::open(&txn)?;
            if let Some(mut record) = t.load(id)?
                && record.seq == lease.seq
                && record.attempts == lease.attempt
                && let State::Leased { lease_ms, .. } = record.state
            {
                t.unindex(&record)?;
                record.state = State::Leased {
                    until_ms: now_ms().saturating_add(lease_ms),
                    lease_ms,
                };
                t.store(&record)?;
                kept = true;
            }
        }
        if kept {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(kept)
    }

    fn list_failed(&self) -> TxResult<Vec<FailedTask>> {
        let txn = self.db.begin_read()?;
        let failed = txn.open_table(FAILED)?;
        let mut out = Vec::new();
        for entry in failed.iter()? {
            let (id, bytes) = entry?;
            out.push(decode::<FailedTask>(id.value(), bytes.value())?);
        }
        out.sort_by(|a, b| {
            a.failed_at
                .cmp(&b.failed_at)
                .then_with(|| a.task.id.cmp(&b.task.id))
        });
        Ok(out)
    }

    fn retry_failed(&self, id: &str) -> TxResult<bool> {
        let txn = self.db.begin_write()?;
        {
            let mut t = Tables::open(&txn)?;
            let removed = t.failed.remove(id)?.map(|bytes| bytes.value().to_vec());
            let Some(bytes) = removed else {
                drop(t);
                txn.abort()?;
                return Ok(false);
            };
            let entry: FailedTask = decode(id, &bytes)?;
            if t.tasks.get(id)?.is_none() {
                t.add(entry.task)?;
            }
        }
        txn.commit()?;
        self.notify.notify_waiters();
        Ok(true)
    }

    fn pending_count(&self) -> TxResult<usize> {
        let txn = self.db.begin_read()?;
        let tasks = txn.open_table(TASKS)?;
        Ok(usize::try_from(tasks.len()?).unwrap_or(usize::MAX))
    }
}

impl WorkQueue for EmbeddedQueue {
    fn enqueue(&self, task: Task) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            task.validate()?;
            self.blocking(move |inner| inner.enqueue(task)).await
        })
    }

    fn fetch(&self, max: usize, lease: Duration) -> BoxFuture<'_, Result<Vec<Delivery>>> {
        Box::pin(self.fetch_impl(max, lease))
    }

    fn ack(&self, delivery: Delivery) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let lease = *self.lease_of(&delivery)?;
            let id = delivery.task.id;
            self.blocking(move |inner| inner.ack(&id, lease)).await
        })
    }

    fn nak<'a>(
        &'a self,
        delivery: Delivery,
        retry_after: Duration,
        error: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lease = *self.lease_of(&delivery)?;
            let id = delivery.task.id;
            let error = error.to_string();
            self.blocking(move |inner| inner.nak(&id, lease, retry_after, error, false))
                .await
        })
    }

    fn reject<'a>(&'a self, delivery: Delivery, error: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lease = *self.lease_of(&delivery)?;
            let id = delivery.task.id;
            let error = error.to_string();
            self.blocking(move |inner| inner.nak(&id, lease, Duration::ZERO, error, true))
                .await
        })
    }

    fn keep_alive<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let lease = *self.lease_of(delivery)?;
            let id = delivery.task.id.clone();
            self.blocking(move |inner| inner.keep_alive(&id, lease))
                .await
        })
    }

    fn list_failed(&self) -> BoxFuture<'_, Result<Vec<FailedTask>>> {
        Box::pin(self.blocking(|inner| inner.list_failed()))
    }

    fn retry_failed<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool>> {
        let id = id.to_string();
        Box::pin(self.blocking(move |inner| inner.retry_failed(&id)))
    }

    fn pending_count(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(self.blocking(|inner| inner.pending_count()))
    }
}
