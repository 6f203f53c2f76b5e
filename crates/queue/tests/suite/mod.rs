//! The behaviour suite every backend must pass: generic over `Arc<dyn WorkQueue>`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use klio_queue::{
    BoxFuture, Handler, Task, WorkQueue, WorkerOptions, run_workers, run_workers_with,
};
use tokio_util::sync::CancellationToken;

use crate::support::{MAX_ATTEMPTS, fetch_one, policy, task};

const LONG_LEASE: Duration = Duration::from_secs(60);

async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn enqueued_task_is_fetched_once_and_gone_after_ack(q: Arc<dyn WorkQueue>) {
    let t = task("000000010000000000000001", "alpha");
    assert!(q.enqueue(t.clone()).await.unwrap());
    assert_eq!(q.pending_count().await.unwrap(), 1);

    let mut got = q.fetch(10, LONG_LEASE).await.unwrap();
    assert_eq!(got.len(), 1);
    let d = got.pop().unwrap();
    assert_eq!(d.task, t);
    assert_eq!(d.attempt, 1);
    // Leased tasks are still pending, but not delivered twice.
    assert_eq!(q.pending_count().await.unwrap(), 1);
    assert!(q.fetch(10, LONG_LEASE).await.unwrap().is_empty());

    q.ack(d).await.unwrap();
    assert_eq!(q.pending_count().await.unwrap(), 0);
    assert!(q.fetch(10, LONG_LEASE).await.unwrap().is_empty());
    assert!(q.list_failed().await.unwrap().is_empty());
}

pub async fn fetch_returns_tasks_in_enqueue_order_up_to_max(q: Arc<dyn WorkQueue>) {
    for i in 0..5 {
        assert!(q.enqueue(task(&format!("t{i}"), "alpha")).await.unwrap());
    }
    let mut ids = Vec::new();
    while ids.len() < 5 {
        let got = q.fetch(3, LONG_LEASE).await.unwrap();
        assert!(!got.is_empty() && got.len() <= 3, "fetched {}", got.len());
        for d in got {
            ids.push(d.task.id.clone());
            q.ack(d).await.unwrap();
        }
    }
    assert_eq!(ids, ["t0", "t1", "t2", "t3", "t4"]);
}

pub async fn enqueue_of_a_pending_id_is_a_noop_until_acked(q: Arc<dyn WorkQueue>) {
    let first = task("dup", "alpha");
    let mut second = first.clone();
    second.payload = serde_json::json!({ "other": true });

    assert!(q.enqueue(first.clone()).await.unwrap());
    assert!(!q.enqueue(second.clone()).await.unwrap(), "ready id");
    assert_eq!(q.pending_count().await.unwrap(), 1);

    let d = fetch_one(q.as_ref(), LONG_LEASE, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(d.task, first, "the first enqueue wins");
    assert!(!q.enqueue(second.clone()).await.unwrap(), "leased id");
    q.ack(d).await.unwrap();

    // Done tasks do not block their id.
    assert!(q.enqueue(second.clone()).await.unwrap());
    let d = fetch_one(q.as_ref(), LONG_LEASE, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(d.task, second);
    assert_eq!(d.attempt, 1);
    q.ack(d).await.unwrap();
    assert_eq!(q.pending_count().await.unwrap(), 0);
}

pub async fn expired_lease_redelivers_with_attempt_two(q: Arc<dyn WorkQueue>) {
    let t = task("lease", "alpha");
    q.enqueue(t.clone()).await.unwrap();
    let lease = Duration::from_secs(2);
    let first = fetch_one(q.as_ref(), lease, Duration::from_secs(5))
        .await
        .unwrap();
    let leased_at = Instant::now();
    assert_eq!(first.attempt, 1);
    // The worker "dies": neither ack nor nak.
    drop(first);

    assert!(
        q.fetch(1, lease).await.unwrap().is_empty(),
        "redelivered before the lease ended"
    );
    let again = fetch_one(q.as_ref(), lease, Duration::from_secs(10))
        .await
        .expect("the task was not delivered again after its lease expired");
    assert!(
        leased_at.elapsed() >= Duration::from_millis(1900),
        "redelivered after {:?}",
        leased_at.elapsed()
    );
    assert_eq!(again.task, t);
    assert_eq!(again.attempt, 2);
    q.ack(again).await.unwrap();
    assert_eq!(q.pending_count().await.unwrap(), 0);
}

pub async fn nakked_task_is_not_redelivered_before_its_delay(q: Arc<dyn WorkQueue>) {
    q.enqueue(task("nak", "alpha")).await.unwrap();
    let d = fetch_one(q.as_ref(), LONG_LEASE, Duration::from_secs(5))
        .await
        .unwrap();
    let delay = Duration::from_secs(2);
    q.nak(d, delay, "temporary failure").await.unwrap();
    let nakked_at = Instant::now();
    assert_eq!(q.pending_count().await.unwrap(), 1);

    assert!(
        q.fetch(1, LONG_LEASE).await.unwrap().is_empty(),
        "redelivered before the delay"
    );
    let again = fetch_one(q.as_ref(), LONG_LEASE, Duration::from_secs(10))
        .await
        .expect("the nakked task was not delivered again");
    assert!(
        nakked_at.elapsed() >= Duration::from_millis(1900),
        "redelivered after {:?}",
        nakked_at.elapsed()
    );
    assert_eq!(again.attempt, 2);
    q.ack(again).await.unwrap();
}

pub async fn task_failing_every_attempt_is_dead_lettered_and_retry_resets_it(
    q: Arc<dyn WorkQueue>,
) {
    let t = task("poison", "alpha");
    q.enqueue(t.clone()).await.unwrap();
    for attempt in 1..=MAX_ATTEMPTS {
        let d = fetch_one(q.as_ref(), LONG_LEASE, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("attempt {attempt} was not delivered"));
        assert_eq!(d.attempt, attempt);
        q.nak(d, Duration::ZERO, &format!("error {attempt}"))
            .await
            .unwrap();
    }
    assert_eq!(q.pending_count().await.unwrap(), 0);
    assert!(q.fetch(1, LONG_LEASE).await.unwrap().is_empty());

    let failed = q.list_failed().await.unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].task, t);
    assert_eq!(failed[0].attempts, MAX_ATTEMPTS);
    assert_eq!(failed[0].last_error, format!("error {MAX_ATTEMPTS}"));
    let age = time::OffsetDateTime::now_utc() - failed[0].failed_at;
    assert!(
        age >= time::Duration::ZERO && age < time::Duration::minutes(1),
        "{age}"
    );

    assert!(!q.retry_failed("no-such-task").await.unwrap());
    assert!(q.retry_failed("poison").await.unwrap());
    assert!(q.list_failed().await.unwrap().is_empty());
    assert!(!q.retry_failed("poison").await.unwrap(), "retried twice");
    assert_eq!(q.pending_count().await.unwrap(), 1);
    let d = fetch_one(q.as_ref(), LONG_LEASE, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(d.task, t);
    assert_eq!(d.attempt, 1, "retry resets the attempt count");
    q.ack(d).await.unwrap();
    assert_eq!(q.pending_count().await.unwrap(), 0);
}

pub async fn lease_expiring_on_the_last_attempt_dead_letters_the_task(q: Arc<dyn WorkQueue>) {
    q.enqueue(task("stalls", "alpha")).await.unwrap();
    for attempt in 1..MAX_ATTEMPTS {
        let d = fetch_one(q.as_ref(), LONG_LEASE, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(d.attempt, attempt);
        q.nak(d, Duration::ZERO, "flaky").await.unwrap();
    }
    let last = fetch_one(q.as_ref(), Duration::from_secs(1), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(last.attempt, MAX_ATTEMPTS);
    drop(last);

    let deadline = Instant::now() + Duration::from_secs(10);
    let failed = loop {
        assert!(
            q.fetch(1, Duration::from_secs(1)).await.unwrap().is_empty(),
            "delivered beyond the attempt limit"
        );
        let failed = q.list_failed().await.unwrap();
        if !failed.is_empty() {
            break failed;
        }
        assert!(Instant::now() < deadline, "never dead-lettered");
    };
    assert_eq!(failed[0].task.id, "stalls");
    assert_eq!(failed[0].attempts, MAX_ATTEMPTS);
    assert!(
        failed[0].last_error.contains("lease expired"),
        "{}",
        failed[0].last_error
    );
    assert_eq!(q.pending_count().await.unwrap(), 0);
}

pub async fn keep_alive_prevents_redelivery_past_the_lease(q: Arc<dyn WorkQueue>) {
    q.enqueue(task("long", "alpha")).await.unwrap();
    let lease = Duration::from_secs(1);
    let d = fetch_one(q.as_ref(), lease, Duration::from_secs(5))
        .await
        .unwrap();
    let keeper = {
        let q = Arc::clone(&q);
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(250)).await;
                assert!(q.keep_alive(&d).await.unwrap(), "lease lost");
            }
            d
        })
    };
    let until = Instant::now() + Duration::from_millis(2800);
    while Instant::now() < until {
        assert!(
            q.fetch(1, lease).await.unwrap().is_empty(),
            "redelivered while kept alive"
        );
    }
    let d = keeper.await.unwrap();
    assert_eq!(d.attempt, 1);
    q.ack(d).await.unwrap();
    assert_eq!(q.pending_count().await.unwrap(), 0);
}

pub async fn unusual_ids_and_clusters_round_trip(q: Arc<dyn WorkQueue>) {
    let t = Task::new(
        "gc: db.prod/2026-11-03 *>= é",
        "gc",
        "db.prod",
        serde_json::json!({ "n": [1, 2, 3] }),
    );
    assert!(q.enqueue(t.clone()).await.unwrap());
    assert!(!q.enqueue(t.clone()).await.unwrap());
    // A different id that escapes to a similar subject must not collide.
    let other = Task::new(
        "gc: db.prod/2026-11-03 *>= e",
        "gc",
        "db.prod",
        serde_json::Value::Null,
    );
    assert!(q.enqueue(other.clone()).await.unwrap());

    let first = fetch_one(q.as_ref(), LONG_LEASE, Duration::from_secs(5))
        .await
        .unwrap();
    let second = fetch_one(q.as_ref(), LONG_LEASE, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!((&first.task, &second.task), (&t, &other));
    q.ack(second).await.unwrap();
    // Fail the unusual one for good, then retry it by its id.
    q.nak(first, Duration::ZERO, "x").await.unwrap();
    for _ in 1..MAX_ATTEMPTS {
        let d = fetch_one(q.as_ref(), LONG_LEASE, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(d.task, t);
        q.nak(d, Duration::ZERO, "x").await.unwrap();
    }
    let failed = q.list_failed().await.unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].task, t);
    assert!(q.retry_failed(&t.id).await.unwrap());
    let d = fetch_one(q.as_ref(), LONG_LEASE, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(d.task, t);
    q.ack(d).await.unwrap();
}

pub async fn invalid_task_is_refused(q: Arc<dyn WorkQueue>) {
    let mut t = task("x", "alpha");
    t.cluster.clear();
    let err = q.enqueue(t).await.unwrap_err();
    assert!(err.to_string().contains("cluster is empty"), "{err}");
    assert_eq!(q.pending_count().await.unwrap(), 0);
}

/// Records what the handler saw: concurrency, per-(kind, cluster) overlap, order.
#[derive(Default)]
struct Recorder {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    active: Mutex<HashSet<(String, String)>>,
    overlaps: AtomicUsize,
    order: Mutex<HashMap<String, Vec<String>>>,
    calls: Mutex<HashMap<String, usize>>,
    done: AtomicUsize,
}

struct RecordingHandler {
    rec: Arc<Recorder>,
    work: Duration,
    /// Task id → how many calls fail before one succeeds (`usize::MAX`: all fail).
    failures: HashMap<String, usize>,
    panic_first: HashSet<String>,
}

impl Handler for RecordingHandler {
    fn handle<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let rec = &self.rec;
            let key = (task.kind.clone(), task.cluster.clone());
            let now = rec.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            rec.max_in_flight.fetch_max(now, Ordering::SeqCst);
            if !rec.active.lock().unwrap().insert(key.clone()) {
                rec.overlaps.fetch_add(1, Ordering::SeqCst);
            }
            let call = {
                let mut calls = rec.calls.lock().unwrap();
                let n = calls.entry(task.id.clone()).or_default();
                *n += 1;
                *n
            };
            tokio::time::sleep(self.work).await;
            rec.active.lock().unwrap().remove(&key);
            rec.in_flight.fetch_sub(1, Ordering::SeqCst);
            if call == 1 && self.panic_first.contains(&task.id) {
                panic!("handler bug on {}", task.id);
            }
            let failing = self.failures.get(&task.id).copied().unwrap_or(0);
            if call <= failing {
                return Err(format!("relay failed on call {call}"));
            }
            rec.order
                .lock()
                .unwrap()
                .entry(task.cluster.clone())
                .or_default()
                .push(task.id.clone());
            rec.done.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

fn recording(work: Duration) -> (Arc<Recorder>, RecordingHandler) {
    let rec = Arc::new(Recorder::default());
    let handler = RecordingHandler {
        rec: Arc::clone(&rec),
        work,
        failures: HashMap::new(),
        panic_first: HashSet::new(),
    };
    (rec, handler)
}

pub async fn workers_bound_concurrency_and_run_one_task_per_cluster_at_a_time(
    q: Arc<dyn WorkQueue>,
) {
    let clusters = ["c0", "c1", "c2", "c3"];
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    // Cluster by cluster: the queue's order alone would run one cluster's tasks together.
    for c in clusters {
        for i in 0..5 {
            let id = format!("{c}-{i}");
            q.enqueue(task(&id, c)).await.unwrap();
            expected.entry(c.to_string()).or_default().push(id);
        }
    }
    let (rec, handler) = recording(Duration::from_millis(150));
    let shutdown = CancellationToken::new();
    let workers = tokio::spawn(run_workers(
        Arc::clone(&q),
        Arc::new(handler),
        3,
        policy(),
        shutdown.clone(),
    ));
    wait_for(Duration::from_secs(60), "20 tasks done", || async {
        rec.done.load(Ordering::SeqCst) == 20 && q.pending_count().await.unwrap() == 0
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), workers)
        .await
        .expect("run_workers did not return after shutdown")
        .unwrap();

    let max = rec.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 3, "{max} tasks ran at once");
    assert!(
        max >= 2,
        "tasks of different clusters never ran in parallel"
    );
    assert_eq!(
        rec.overlaps.load(Ordering::SeqCst),
        0,
        "two tasks of one cluster ran at once"
    );
    assert_eq!(*rec.order.lock().unwrap(), expected, "per-cluster order");
    assert!(rec.calls.lock().unwrap().values().all(|&n| n == 1));
    assert!(q.list_failed().await.unwrap().is_empty());
}

pub async fn workers_retry_a_failing_handler_and_dead_letter_a_hopeless_one(q: Arc<dyn WorkQueue>) {
    q.enqueue(task("flaky", "c0")).await.unwrap();
    q.enqueue(task("hopeless", "c1")).await.unwrap();
    q.enqueue(task("buggy", "c2")).await.unwrap();
    let (rec, mut handler) = recording(Duration::from_millis(10));
    handler.failures.insert("flaky".into(), 2);
    handler.failures.insert("hopeless".into(), usize::MAX);
    handler.panic_first.insert("buggy".into());
    let shutdown = CancellationToken::new();
    let workers = tokio::spawn(run_workers(
        Arc::clone(&q),
        Arc::new(handler),
        2,
        policy(),
        shutdown.clone(),
    ));
    wait_for(
        Duration::from_secs(60),
        "flaky and buggy done, hopeless failed",
        || async {
            rec.done.load(Ordering::SeqCst) == 2
                && q.pending_count().await.unwrap() == 0
                && q.list_failed().await.unwrap().len() == 1
        },
    )
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), workers)
        .await
        .expect("run_workers did not return after shutdown")
        .unwrap();

    let calls = rec.calls.lock().unwrap().clone();
    assert_eq!(calls["flaky"], 3, "two failures, then success");
    assert_eq!(calls["buggy"], 2, "a panic, then success");
    assert_eq!(calls["hopeless"], MAX_ATTEMPTS as usize);
    let failed = q.list_failed().await.unwrap();
    assert_eq!(failed[0].task.id, "hopeless");
    assert_eq!(failed[0].attempts, MAX_ATTEMPTS);
    assert_eq!(
        failed[0].last_error,
        format!("relay failed on call {MAX_ATTEMPTS}")
    );
}

pub async fn workers_keep_a_long_task_leased(q: Arc<dyn WorkQueue>) {
    q.enqueue(task("slow", "c0")).await.unwrap();
    let (rec, handler) = recording(Duration::from_millis(3500));
    let shutdown = CancellationToken::new();
    let options = WorkerOptions {
        lease: Duration::from_secs(1),
        ..WorkerOptions::new(2, policy())
    };
    let workers = tokio::spawn(run_workers_with(
        Arc::clone(&q),
        Arc::new(handler),
        options,
        shutdown.clone(),
    ));
    wait_for(Duration::from_secs(30), "the slow task done", || async {
        rec.done.load(Ordering::SeqCst) == 1 && q.pending_count().await.unwrap() == 0
    })
    .await;
    shutdown.cancel();
    workers.await.unwrap();
    assert_eq!(
        rec.calls.lock().unwrap()["slow"],
        1,
        "delivered again while running"
    );
}

pub async fn workers_finish_running_tasks_on_shutdown(q: Arc<dyn WorkQueue>) {
    q.enqueue(task("in-flight", "c0")).await.unwrap();
    let (rec, handler) = recording(Duration::from_millis(1500));
    let shutdown = CancellationToken::new();
    let workers = tokio::spawn(run_workers(
        Arc::clone(&q),
        Arc::new(handler),
        2,
        policy(),
        shutdown.clone(),
    ));
    wait_for(Duration::from_secs(10), "the handler to start", || async {
        rec.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), workers)
        .await
        .expect("run_workers did not return after shutdown")
        .unwrap();
    assert_eq!(
        rec.done.load(Ordering::SeqCst),
        1,
        "returned before the task finished"
    );
    assert_eq!(
        q.pending_count().await.unwrap(),
        0,
        "the finished task was not acked"
    );
}
