//! Running a [`Handler`] over a [`WorkQueue`] with bounded concurrency.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::task::{Delivery, Task};
use crate::{BoxFuture, Result, RetryPolicy, WorkQueue};

/// The lease [`run_workers`] fetches with. Leases are kept alive while a task runs, so this only
/// bounds how long a crashed worker's tasks wait before they are delivered again.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// How long the worker loop waits after a failed fetch before it tries again.
const FETCH_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Does the work of a task. Dyn-compatible, like [`WorkQueue`].
///
/// Tasks are delivered at least once, so a handler must be idempotent: running it again for a
/// task it already completed must do no harm.
pub trait Handler: Send + Sync {
    /// Handles `task`. `Err` carries the message recorded as the attempt's error.
    fn handle<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<(), String>>;

    /// Checks a task before it runs (its kind, cluster and payload come from the queue, which
    /// anyone who can reach it may write to). `Err` moves it to the dead-letter list at once,
    /// with that message, without running it.
    fn check(&self, _task: &Task) -> Result<(), String> {
        Ok(())
    }
}

/// How [`run_workers_with`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerOptions {
    /// Tasks running at once, at most (at least 1).
    pub concurrency: usize,
    /// Fetched tasks held at once, running or waiting for their (kind, cluster) to be free
    /// (at least `concurrency`). Waiting tasks let other clusters proceed while one cluster has
    /// a backlog; their leases are kept alive.
    pub held: usize,
    /// Backoff between attempts of a failing task.
    pub policy: RetryPolicy,
    /// The lease to fetch with; kept alive every third of it while a task is held.
    pub lease: Duration,
}

impl WorkerOptions {
    /// `concurrency` running tasks, four times as many held, [`DEFAULT_LEASE`].
    pub fn new(concurrency: usize, policy: RetryPolicy) -> WorkerOptions {
        let concurrency = concurrency.max(1);
        WorkerOptions {
            concurrency,
            held: concurrency.saturating_mul(4),
            policy,
            lease: DEFAULT_LEASE,
        }
    }
}

/// The (kind, cluster) pair at most one task of which runs at a time.
type Key = (String, String);

fn key_of(task: &Task) -> Key {
    (task.kind.clone(), task.cluster.clone())
}

/// Runs `handler` on tasks from `queue` until `shutdown` fires, then waits for the running tasks
/// to finish and returns. Equivalent to [`run_workers_with`] with [`WorkerOptions::new`].
pub async fn run_workers(
    queue: Arc<dyn WorkQueue>,
    handler: Arc<dyn Handler>,
    concurrency: usize,
    policy: RetryPolicy,
    shutdown: CancellationToken,
) {
    run_workers_with(
        queue,
        handler,
        WorkerOptions::new(concurrency, policy),
        shutdown,
    )
    .await;
}

/// Runs `handler` on tasks from `queue` until `shutdown` fires.
///
/// - At most `options.concurrency` handlers run at once, and at most one per (kind, cluster):
///   several clusters progress in parallel, while one cluster's tasks of a kind run one after
///   another in the order they are fetched. A failed task is retried after its backoff delay,
///   so later tasks of its (kind, cluster) may run before the retry.
/// - Up to `options.held` tasks are fetched ahead, so that a cluster with a backlog does not
///   keep the others waiting; a backlog longer than that still delays them.
/// - A task [`Handler::check`] refuses is dead-lettered at once, never run.
/// - Success acks the task. An error (or a panic) naks it with `options.policy.delay(attempt)`;
///   the queue moves it to the dead-letter list after its last attempt.
/// - Leases of held tasks are kept alive, so a handler may run longer than the lease.
/// - On shutdown, tasks fetched but not started are given back (a nak without delay, which
///   counts as an attempt), running handlers finish and are acked or nakked, then this returns.
///
/// Queue errors are logged and retried; they never end the loop.
pub async fn run_workers_with(
    queue: Arc<dyn WorkQueue>,
    handler: Arc<dyn Handler>,
    options: WorkerOptions,
    shutdown: CancellationToken,
) {
    let concurrency = options.concurrency.max(1);
    let held_limit = options.held.max(concurrency);
    let lease = options.lease.max(Duration::from_millis(30));

    let mut running: JoinSet<()> = JoinSet::new();
    let mut running_keys: HashMap<tokio::task::Id, Key> = HashMap::new();
    let mut busy: HashSet<Key> = HashSet::new();
    let mut waiting: VecDeque<Delivery> = VecDeque::new();
    let mut fetching: Option<BoxFuture<'static, Result<Vec<Delivery>>>> = None;
    let mut fetch_paused_until: Option<Instant> = None;
    let mut keep_alive = tokio::time::interval_at(Instant::now() + lease / 3, lease / 3);
    keep_alive.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        if shutdown.is_cancelled() {
            break;
        }

        // Start waiting tasks whose (kind, cluster) is free, oldest first.
        let mut index = 0;
        while index < waiting.len() && running.len() < concurrency {
            let free = waiting
                .get(index)
                .is_some_and(|d| !busy.contains(&key_of(&d.task)));
            if !free {
                index += 1;
                continue;
            }
            let Some(delivery) = waiting.remove(index) else {
                break;
            };
            let key = key_of(&delivery.task);
            busy.insert(key.clone());
            let handle = running.spawn(work(
                Arc::clone(&queue),
                Arc::clone(&handler),
                delivery,
                options.policy,
                lease,
            ));
            running_keys.insert(handle.id(), key);
        }

        let held = running.len() + waiting.len();
        let paused = fetch_paused_until.is_some_and(|until| Instant::now() < until);
        if fetching.is_none() && held < held_limit && !paused {
            let queue = Arc::clone(&queue);
            let max = held_limit - held;
            fetching = Some(Box::pin(async move { queue.fetch(max, lease).await }));
        }

        tokio::select! {
            () = shutdown.cancelled() => {}
            Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                let id = match joined {
                    Ok((id, ())) => id,
                    Err(e) => {
                        tracing::error!(error = %e, "work queue worker task failed");
                        e.id()
                    }
                };
                if let Some(key) = running_keys.remove(&id) {
                    busy.remove(&key);
                }
            }
            fetched = poll_fetch(&mut fetching) => {
                fetching = None;
                match fetched {
                    Ok(deliveries) => {
                        for delivery in deliveries {
                            match handler.check(&delivery.task) {
                                Ok(()) => waiting.push_back(delivery),
                                Err(error) => reject(queue.as_ref(), delivery, &error).await,
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "work queue: could not fetch tasks; trying again");
                        fetch_paused_until = Some(Instant::now() + FETCH_ERROR_PAUSE);
                    }
                }
            }
            () = pause_end(fetch_paused_until), if fetching.is_none() && fetch_paused_until.is_some() => {
                fetch_paused_until = None;
            }
            _ = keep_alive.tick(), if !waiting.is_empty() => {
                for delivery in &waiting {
                    keep_lease(queue.as_ref(), delivery).await;
                }
            }
        }
    }

    // Shutdown: let a fetch in progress finish (it may already hold leases), give back what
    // never started, and wait for the running handlers.
    if let Some(fetch) = fetching.take() {
        match fetch.await {
            Ok(deliveries) => waiting.extend(deliveries),
            Err(e) => tracing::warn!(error = %e, "work queue: fetch during shutdown failed"),
        }
    }
    for delivery in waiting.drain(..) {
        let id = delivery.task.id.clone();
        if let Err(e) = queue
            .nak(
                delivery,
                Duration::ZERO,
                "the worker shut down before it started this attempt",
            )
            .await
        {
            tracing::warn!(task = %id, error = %e, "work queue: could not give a task back");
        }
    }
    while let Some(joined) = running.join_next().await {
        if let Err(e) = joined {
            tracing::error!(error = %e, "work queue worker task failed");
        }
    }
}

/// Dead-letters a task that failed [`Handler::check`].
async fn reject(queue: &dyn WorkQueue, delivery: Delivery, error: &str) {
    let task = &delivery.task;
    tracing::warn!(
        task = %task.id.escape_debug(),
        kind = %task.kind.escape_debug(),
        cluster = %task.cluster.escape_debug(),
        error,
        "work queue: invalid task, moved to the dead-letter list without running it"
    );
    let id = task.id.clone();
    if let Err(e) = queue.reject(delivery, error).await {
        tracing::warn!(task = %id.escape_debug(), error = %e, "work queue: could not reject a task");
    }
}

async fn poll_fetch(
    fetching: &mut Option<BoxFuture<'static, Result<Vec<Delivery>>>>,
) -> Result<Vec<Delivery>> {
    match fetching.as_mut() {
        Some(fetch) => fetch.await,
        None => std::future::pending().await,
    }
}

async fn pause_end(until: Option<Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

async fn keep_lease(queue: &dyn WorkQueue, delivery: &Delivery) {
    match queue.keep_alive(delivery).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            task = %delivery.task.id,
            attempt = delivery.attempt,
            "work queue: lease lost; the task may run twice"
        ),
        Err(e) => tracing::warn!(
            task = %delivery.task.id,
            error = %e,
            "work queue: could not keep a lease alive"
        ),
    }
}

/// Runs one attempt: the handler, with the lease kept alive, then ack or nak.
async fn work(
    queue: Arc<dyn WorkQueue>,
    handler: Arc<dyn Handler>,
    delivery: Delivery,
    policy: RetryPolicy,
    lease: Duration,
) {
    let outcome = {
        let run = AssertUnwindSafe(handler.handle(&delivery.task)).catch_unwind();
        tokio::pin!(run);
        let mut tick = tokio::time::interval_at(Instant::now() + lease / 3, lease / 3);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                outcome = &mut run => break outcome,
                _ = tick.tick() => keep_lease(queue.as_ref(), &delivery).await,
            }
        }
    };
    let task = &delivery.task;
    let (id, kind, cluster, attempt) = (
        task.id.clone(),
        task.kind.clone(),
        task.cluster.clone(),
        delivery.attempt,
    );
    let result = match outcome {
        Ok(Ok(())) => {
            tracing::debug!(task = %id, %kind, %cluster, attempt, "work queue task done");
            queue.ack(delivery).await
        }
        Ok(Err(error)) => {
            let delay = policy.delay(attempt);
            tracing::info!(
                task = %id, %kind, %cluster, attempt, error = %error, retry_in = ?delay,
                "work queue task failed"
            );
            queue.nak(delivery, delay, &error).await
        }
        Err(panic) => {
            let message = panic_message(panic.as_ref());
            let error = format!("the handler panicked: {message}");
            let delay = policy.delay(attempt);
            tracing::error!(task = %id, %kind, %cluster, attempt, error = %error, "work queue task failed");
            queue.nak(delivery, delay, &error).await
        }
    };
    if let Err(e) = result {
        // The lease runs out and the task is delivered again.
        tracing::warn!(task = %id, error = %e, "work queue: could not report a task's outcome");
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}
