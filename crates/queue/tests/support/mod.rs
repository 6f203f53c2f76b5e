//! Fixtures: a real nats-server per test, queues of both backends, and small helpers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use klio_queue::{Delivery, EmbeddedQueue, NatsQueue, RetryPolicy, Task, WorkQueue};
pub use klio_test_support::NatsServer;

/// The attempt limit the behaviour suite runs with.
pub const MAX_ATTEMPTS: u32 = 3;

pub fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: MAX_ATTEMPTS,
        base: Duration::from_millis(50),
        max: Duration::from_millis(200),
    }
}

pub fn task(id: &str, cluster: &str) -> Task {
    Task::new(
        id,
        klio_queue::kinds::WAL_RELAY,
        cluster,
        serde_json::json!({ "segment": id }),
    )
}

/// A queue of one backend plus whatever must live as long as it.
pub struct Fixture {
    pub queue: Arc<dyn WorkQueue>,
    _dir: tempfile::TempDir,
    _server: Option<NatsServer>,
}

pub fn embedded() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let queue = EmbeddedQueue::open(dir.path(), &policy()).unwrap();
    Fixture {
        queue: Arc::new(queue),
        _dir: dir,
        _server: None,
    }
}

pub async fn nats() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(&dir.path().join("jetstream"));
    let queue = NatsQueue::connect(&server.url(), &policy()).await.unwrap();
    Fixture {
        queue: Arc::new(queue),
        _dir: dir,
        _server: Some(server),
    }
}

/// Fetches until a delivery arrives or `timeout` passes.
pub async fn fetch_one(
    queue: &dyn WorkQueue,
    lease: Duration,
    timeout: Duration,
) -> Option<Delivery> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut got = queue.fetch(1, lease).await.unwrap();
        if let Some(delivery) = got.pop() {
            assert!(got.is_empty());
            return Some(delivery);
        }
        if Instant::now() >= deadline {
            return None;
        }
    }
}
