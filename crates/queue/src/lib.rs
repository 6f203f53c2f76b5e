//! Klio's work queue: one trait, two backends.
//!
//! The server hands Tier 2 WAL relay, Tier 2 backup relay, retention and GC to workers through a
//! [`WorkQueue`] (held as `Arc<dyn WorkQueue>`):
//!
//! - [`EmbeddedQueue`] (the default): a redb file `<dir>/queue.redb`. Every enqueue, fetch, ack
//!   and nak is one committed, fsynced transaction.
//! - [`NatsQueue`] (`--queue-nats-url`): NATS JetStream, stream `KLIO_TASKS` with work-queue
//!   retention, one durable pull consumer, and the dead-letter list in the stream
//!   `KLIO_FAILED`. Written for nats-server 2.9 and later.
//!
//! Guarantees, the same for both backends:
//!
//! - **At-least-once delivery.** [`WorkQueue::fetch`] leases a task; a task that is neither
//!   acked nor nakked before its lease ends is delivered again, also after a crash of the worker
//!   or of the queue's process. Handlers must therefore be idempotent.
//! - **Dedup of pending ids.** [`Task::id`] is a dedup key: enqueueing an id that is pending
//!   (ready, leased, or waiting for a retry) is a no-op that returns `false`. Once the task is
//!   acked or dead-lettered, the id can be enqueued again.
//! - **Retries and a dead-letter list.** Every delivery is an attempt ([`Delivery::attempt`]).
//!   [`WorkQueue::nak`] schedules a retry after a delay; a nak of the last allowed attempt
//!   ([`RetryPolicy::max_attempts`], given to the backend when it is opened), or a lease that
//!   expires on it, moves the task to the dead-letter list ([`WorkQueue::list_failed`],
//!   [`WorkQueue::retry_failed`]; `klio admin queue list-failed` / `retry`).
//!
//! [`run_workers`] drives a [`Handler`] with bounded concurrency: at most `concurrency` tasks in
//! flight, at most one per (kind, cluster), backoff from a [`RetryPolicy`], and leases kept
//! alive while a handler runs.
//!
//! Principal items: [`Task`], [`Delivery`], [`FailedTask`], [`WorkQueue`], [`EmbeddedQueue`],
//! [`NatsQueue`], [`RetryPolicy`], [`Handler`], [`run_workers`], [`Error`].

pub mod embedded;
mod error;
pub mod nats;
mod retry;
mod task;
mod workers;

use std::time::Duration;

pub use embedded::EmbeddedQueue;
pub use error::{Error, Result};
pub use nats::{NatsOptions, NatsQueue, redact_url};
pub use retry::RetryPolicy;
pub use task::{Delivery, FailedTask, Task, kinds};
pub use workers::{DEFAULT_LEASE, Handler, WorkerOptions, run_workers, run_workers_with};

/// A boxed, sendable future: what the dyn-compatible traits of this crate return.
pub type BoxFuture<'a, T> = futures::future::BoxFuture<'a, T>;

/// How long [`WorkQueue::fetch`] waits for work before it returns an empty list.
pub const FETCH_WAIT: Duration = Duration::from_secs(1);

/// A durable work queue with leases, retries and a dead-letter list.
///
/// Dyn-compatible: the server holds an `Arc<dyn WorkQueue>` and does not know which backend it
/// talks to.
pub trait WorkQueue: Send + Sync {
    /// Adds `task` unless a task with the same [`Task::id`] is pending.
    ///
    /// Returns `true` when the task was added, `false` when an equal id was already pending
    /// (the pending task is left as it is). Durable when it returns.
    fn enqueue(&self, task: Task) -> BoxFuture<'_, Result<bool>>;

    /// Leases up to `max` ready tasks for `lease`, oldest first.
    ///
    /// Waits up to [`FETCH_WAIT`] for work and returns an empty list when none arrives. A
    /// leased task that is not acked, nakked or kept alive within `lease` is delivered again.
    fn fetch(&self, max: usize, lease: Duration) -> BoxFuture<'_, Result<Vec<Delivery>>>;

    /// Marks the task of `delivery` done: it leaves the queue for good.
    fn ack(&self, delivery: Delivery) -> BoxFuture<'_, Result<()>>;

    /// Reports that the attempt of `delivery` failed with `error`.
    ///
    /// The task is delivered again after `retry_after`, unless this was its last allowed
    /// attempt: then it moves to the dead-letter list with `error` as its last error.
    fn nak<'a>(
        &'a self,
        delivery: Delivery,
        retry_after: Duration,
        error: &'a str,
    ) -> BoxFuture<'a, Result<()>>;

    /// Moves the task of `delivery` to the dead-letter list now, whatever attempts it has
    /// left, with `error` as its last error: a task that can never succeed (it failed
    /// validation) is not retried.
    fn reject<'a>(&'a self, delivery: Delivery, error: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Restarts the lease of `delivery` (the worker is still busy with it).
    ///
    /// Returns `false` when the lease was already lost: the task may be delivered again (or
    /// already was), and the result of this attempt should still be acked or nakked. (The NATS
    /// backend cannot tell and always returns `true`.)
    fn keep_alive<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<bool>>;

    /// The dead-letter list, oldest failure first.
    fn list_failed(&self) -> BoxFuture<'_, Result<Vec<FailedTask>>>;

    /// Makes the failed task `id` pending again with a fresh attempt count.
    ///
    /// Returns `false` when no failed task has that id. When a task with the same id has been
    /// enqueued since, the failed entry is only removed (the pending task stands for it).
    fn retry_failed<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// The number of pending tasks: ready, leased, or waiting for a retry.
    fn pending_count(&self) -> BoxFuture<'_, Result<usize>>;
}
