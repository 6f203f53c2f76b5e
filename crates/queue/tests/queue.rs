#![allow(clippy::unwrap_used)]
//! Component tests of both work queue backends against real storage: a redb file, and a real
//! nats-server (Debian's `nats-server`; the NATS tests fail when it is missing).

mod suite;
mod support;

/// Runs every behaviour of the suite against both backends: `embedded::<name>` and
/// `nats::<name>`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fixture = crate::support::embedded();
                    crate::suite::$name(fixture.queue.clone()).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fixture = crate::support::nats().await;
                    crate::suite::$name(fixture.queue.clone()).await;
                }
            )*
        }
    };
}

both_backends!(
    enqueued_task_is_fetched_once_and_gone_after_ack,
    fetch_returns_tasks_in_enqueue_order_up_to_max,
    enqueue_of_a_pending_id_is_a_noop_until_acked,
    expired_lease_redelivers_with_attempt_two,
    nakked_task_is_not_redelivered_before_its_delay,
    task_failing_every_attempt_is_dead_lettered_and_retry_resets_it,
    lease_expiring_on_the_last_attempt_dead_letters_the_task,
    keep_alive_prevents_redelivery_past_the_lease,
    unusual_ids_and_clusters_round_trip,
    invalid_task_is_refused,
    workers_bound_concurrency_and_run_one_task_per_cluster_at_a_time,
    workers_retry_a_failing_handler_and_dead_letter_a_hopeless_one,
    workers_keep_a_long_task_leased,
    workers_finish_running_tasks_on_shutdown,
);

mod embedded_only {
    use std::path::Path;
    use std::process::Command;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use klio_queue::{EmbeddedQueue, WorkQueue};
    use klio_test_support::ChildGuard;

    use crate::support::{fetch_one, policy, task};

    const HOUR: Duration = Duration::from_secs(3600);
    const CRASH_DIR_ENV: &str = "KLIO_QUEUE_CRASH_DIR";

    fn open(dir: &Path) -> Arc<dyn WorkQueue> {
        Arc::new(EmbeddedQueue::open(dir, &policy()).unwrap())
    }

    #[tokio::test]
    async fn queue_dropped_with_a_leased_task_redelivers_it_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        q.enqueue(task("segment", "alpha")).await.unwrap();
        q.enqueue(task("later", "alpha")).await.unwrap();
        let d = fetch_one(q.as_ref(), HOUR, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(d.task.id, "segment");
        // A crash: the lease is never given back.
        drop(d);
        drop(q);

        let q = open(dir.path());
        assert_eq!(q.pending_count().await.unwrap(), 2);
        // The old lease runs for an hour: a delivery within these 5 s means it was dropped.
        let d = fetch_one(q.as_ref(), HOUR, Duration::from_secs(5))
            .await
            .expect("the leased task was not delivered again (waited for the old lease?)");
        assert_eq!(d.task.id, "segment", "the recovered task keeps its place");
        assert_eq!(d.attempt, 2);
        q.ack(d).await.unwrap();
        let d = fetch_one(q.as_ref(), HOUR, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((d.task.id.as_str(), d.attempt), ("later", 1));
        q.ack(d).await.unwrap();
        assert_eq!(q.pending_count().await.unwrap(), 0);
    }

    /// The child's part of the crash test (the same test run again in a child process with
    /// `KLIO_QUEUE_CRASH_DIR` set): enqueues and leases a task, reports it, and waits to be
    /// killed.
    async fn lease_and_wait_to_be_killed(dir: &Path) {
        let q = open(dir);
        q.enqueue(task("segment", "alpha")).await.unwrap();
        let d = fetch_one(q.as_ref(), HOUR, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(d.attempt, 1);
        std::fs::write(dir.join("leased"), b"").unwrap();
        tokio::time::sleep(HOUR).await;
    }

    #[tokio::test]
    async fn killed_process_with_a_leased_task_redelivers_it_on_reopen() {
        if let Some(dir) = std::env::var_os(CRASH_DIR_ENV) {
            lease_and_wait_to_be_killed(Path::new(&dir)).await;
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("helper.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = ChildGuard::spawn(
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "embedded_only::killed_process_with_a_leased_task_redelivers_it_on_reopen",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CRASH_DIR_ENV, dir.path())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        )
        .unwrap();
        let helper_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.path().join("leased").exists() {
            assert!(
                child.is_running(),
                "the crash helper exited early:\n{}",
                helper_log()
            );
            assert!(
                Instant::now() < deadline,
                "the crash helper never leased its task:\n{}",
                helper_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap(); // SIGKILL: no destructor, no clean close

        let q = open(dir.path());
        let d = fetch_one(q.as_ref(), HOUR, Duration::from_secs(5))
            .await
            .expect("the task leased by the killed process was not delivered again");
        assert_eq!(d.task.id, "segment");
        assert_eq!(d.attempt, 2);
        q.ack(d).await.unwrap();
        assert_eq!(q.pending_count().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn pending_delayed_and_failed_tasks_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        q.enqueue(task("failed", "gamma")).await.unwrap();
        for _ in 0..crate::support::MAX_ATTEMPTS {
            let d = fetch_one(q.as_ref(), HOUR, Duration::from_secs(5))
                .await
                .unwrap();
            q.nak(d, Duration::ZERO, "gone").await.unwrap();
        }
        q.enqueue(task("ready", "alpha")).await.unwrap();
        q.enqueue(task("delayed", "beta")).await.unwrap();
        let mut got = q.fetch(2, HOUR).await.unwrap();
        assert_eq!(got.len(), 2);
        let delayed = got.pop().unwrap();
        let ready = got.pop().unwrap();
        assert_eq!(
            (ready.task.id.as_str(), delayed.task.id.as_str()),
            ("ready", "delayed")
        );
        q.nak(ready, Duration::ZERO, "again").await.unwrap();
        q.nak(delayed, Duration::from_secs(2), "later")
            .await
            .unwrap();
        drop(q);

        let q = open(dir.path());
        assert_eq!(q.pending_count().await.unwrap(), 2);
        let failed = q.list_failed().await.unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].task.id, "failed");
        assert_eq!(failed[0].last_error, "gone");
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let d = fetch_one(q.as_ref(), HOUR, Duration::from_secs(10))
                .await
                .unwrap();
            seen.push((d.task.id.clone(), d.attempt));
            q.ack(d).await.unwrap();
        }
        assert_eq!(seen, [("ready".to_string(), 2), ("delayed".to_string(), 2)]);
    }

    #[tokio::test]
    async fn second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _q = EmbeddedQueue::open(dir.path(), &policy()).unwrap();
        let err = match EmbeddedQueue::open(dir.path(), &policy()) {
            Ok(_) => panic!("opened one queue file twice"),
            Err(e) => e,
        };
        assert!(err.to_string().contains("queue.redb"), "{err}");
    }
}

mod nats_only {
    use std::sync::Arc;
    use std::time::Duration;

    use klio_queue::{NatsQueue, WorkQueue};

    use crate::support::{MAX_ATTEMPTS, NatsServer, fetch_one, policy, task};

    const LEASE: Duration = Duration::from_secs(60);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_and_failed_tasks_survive_a_server_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = NatsServer::start(&dir.path().join("jetstream"));
        {
            let q: Arc<dyn WorkQueue> =
                Arc::new(NatsQueue::connect(&server.url(), &policy()).await.unwrap());
            q.enqueue(task("doomed", "beta")).await.unwrap();
            for _ in 0..MAX_ATTEMPTS {
                let d = fetch_one(q.as_ref(), LEASE, Duration::from_secs(5))
                    .await
                    .unwrap();
                q.nak(d, Duration::ZERO, "no route to Tier 2")
                    .await
                    .unwrap();
            }
            assert!(q.enqueue(task("survivor", "alpha")).await.unwrap());
        }

        server.restart();

        let q: Arc<dyn WorkQueue> =
            Arc::new(NatsQueue::connect(&server.url(), &policy()).await.unwrap());
        assert_eq!(q.pending_count().await.unwrap(), 1);
        assert!(
            !q.enqueue(task("survivor", "alpha")).await.unwrap(),
            "dedup after restart"
        );
        let d = fetch_one(q.as_ref(), LEASE, Duration::from_secs(10))
            .await
            .expect("the task did not survive the restart");
        assert_eq!(d.task, task("survivor", "alpha"));
        assert_eq!(d.attempt, 1);
        q.ack(d).await.unwrap();

        let failed = q.list_failed().await.unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].task.id, "doomed");
        assert_eq!(failed[0].last_error, "no route to Tier 2");
        assert!(q.retry_failed("doomed").await.unwrap());
        let d = fetch_one(q.as_ref(), LEASE, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((d.task.id.as_str(), d.attempt), ("doomed", 1));
        q.ack(d).await.unwrap();
        assert_eq!(q.pending_count().await.unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_queues_on_one_server_share_the_work() {
        let dir = tempfile::tempdir().unwrap();
        let server = NatsServer::start(&dir.path().join("jetstream"));
        let a = NatsQueue::connect(&server.url(), &policy()).await.unwrap();
        let b = NatsQueue::connect(&server.url(), &policy()).await.unwrap();
        a.enqueue(task("one", "alpha")).await.unwrap();
        assert!(!b.enqueue(task("one", "alpha")).await.unwrap());
        b.enqueue(task("two", "beta")).await.unwrap();
        let da = fetch_one(&a, LEASE, Duration::from_secs(5)).await.unwrap();
        let db = fetch_one(&b, LEASE, Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            (da.task.id.as_str(), db.task.id.as_str()),
            ("one", "two"),
            "each task goes to one worker"
        );
        a.ack(da).await.unwrap();
        b.ack(db).await.unwrap();
        assert_eq!(a.pending_count().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn connect_to_a_closed_port_fails_with_a_transient_error() {
        let port = klio_test_support::free_port();
        let err = match NatsQueue::connect(&format!("nats://127.0.0.1:{port}"), &policy()).await {
            Ok(_) => panic!("connected to a closed port"),
            Err(e) => e,
        };
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("could not connect"), "{err}");
    }
}
