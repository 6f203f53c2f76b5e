//! The catalog as the API service serves it: the `KlioBackup` objects of the last read of
//! the Klio server, resource versions, and the events watchers receive.
//!
//! Reads are coalesced (requests arriving while a read runs share it). A list or get reads
//! the server first, so its answer is current or a `503` saying why the server cannot be
//! read; watches are fed by a background poll every `--poll-interval`. Resource versions
//! are microseconds since the Unix epoch of the change (each one at least one more than the
//! last), so a version from another replica or an earlier process compares sensibly: a
//! watch from a version older than what this process remembers is answered `410 Gone`, and
//! the client lists again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::objects::{CatalogEntry, backup_object};

/// Reads the whole catalog from the Klio server; the error is the reason, for a `503`.
pub type Source =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Vec<CatalogEntry>, String>> + Send + Sync>;

/// Events kept for watches that resume from a resource version.
const EVENT_HISTORY: usize = 1024;

/// Events a slow watcher may fall behind by before its watch is ended (it resumes).
const WATCH_BUFFER: usize = 256;

/// The longest a read of the Klio server may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change of the catalog.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub kind: EventType,
    /// The object (its last state for a deletion), resourceVersion set.
    pub object: Value,
}

#[derive(Default)]
struct State {
    /// The version of the last change (0: never read).
    rv: u64,
    /// By name; each with its resourceVersion set.
    objects: BTreeMap<String, Value>,
    events: VecDeque<Arc<Event>>,
    /// The newest version dropped from `events`: a watch must start at or after it.
    forgotten: u64,
    /// When the last successful read started.
    read_started: Option<Instant>,
    loaded: bool,
}

/// The catalog of one Klio server in one namespace.
pub struct Catalog {
    group: String,
    namespace: String,
    source: Source,
    state: Mutex<State>,
    read_lock: tokio::sync::Mutex<()>,
    events: broadcast::Sender<Arc<Event>>,
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The content of an object without its resourceVersion, to compare two reads.
fn without_rv(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(m) = o["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    o
}

impl Catalog {
    pub fn new(group: &str, namespace: &str, source: Source) -> Arc<Catalog> {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        Arc::new(Catalog {
            group: group.to_string(),
            namespace: namespace.to_string(),
            source,
            state: Mutex::default(),
            read_lock: tokio::sync::Mutex::new(()),
            events,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the Klio server unless a read that started after `asked` already succeeded
    /// (requests that arrive during a read share the next one).
    pub async fn refresh(&self, asked: Instant) -> Result<(), String> {
        let _one_at_a_time = self.read_lock.lock().await;
        if self.state().read_started.is_some_and(|t| t >= asked) {
            return Ok(());
        }
        let started = Instant::now();
        let entries = match tokio::time::timeout(READ_TIMEOUT, (self.source)()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(format!(
                    "the Klio server did not answer within {} s",
                    READ_TIMEOUT.as_secs()
                ));
            }
        };
        self.apply(entries, started);
        Ok(())
    }

    /// Makes `entries` the catalog, recording what changed.
    fn apply(&self, entries: Vec<CatalogEntry>, started: Instant) {
        let mut fresh: BTreeMap<String, Value> = BTreeMap::new();
        for e in &entries {
            fresh.insert(e.name(), backup_object(&self.group, &self.namespace, e));
        }
        let mut st = self.state();
        let mut changes = Vec::new();
        for (name, object) in &fresh {
            match st.objects.get(name) {
                None => changes.push((EventType::Added, name.clone(), object.clone())),
                Some(old) if without_rv(old) != *object => {
                    changes.push((EventType::Modified, name.clone(), object.clone()));
                }
                Some(_) => {}
            }
        }
        let gone: Vec<String> = st
            .objects
            .keys()
            .filter(|n| !fresh.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(old) = st.objects.get(&name) {
                changes.push((EventType::Deleted, name, old.clone()));
            }
        }
        for (kind, name, mut object) in changes {
            st.rv = (st.rv + 1).max(now_micros());
            let rv = st.rv;
            object["metadata"]["resourceVersion"] = rv.to_string().into();
            if kind == EventType::Deleted {
                st.objects.remove(&name);
            } else {
                st.objects.insert(name, object.clone());
            }
            let event = Arc::new(Event { rv, kind, object });
            if st.events.len() == EVENT_HISTORY
                && let Some(old) = st.events.pop_front()
            {
                st.forgotten = old.rv;
            }
            st.events.push_back(event.clone());
            // No receiver is not an error: nobody watches.
            let _ = self.events.send(event);
        }
        if !st.loaded {
            st.loaded = true;
            // Changes before the first read are unknown: a watch cannot start earlier.
            st.forgotten = st.rv;
            st.events.clear();
            if st.rv == 0 {
                st.rv = now_micros();
                st.forgotten = st.rv;
            }
        }
        st.read_started = Some(started);
    }

    /// Whether the catalog was read at least once.
    pub fn loaded(&self) -> bool {
        self.state().loaded
    }

    /// The objects (sorted by name) and the list's resource version.
    pub fn snapshot(&self) -> (Vec<Value>, String) {
        let st = self.state();
        (st.objects.values().cloned().collect(), st.rv.to_string())
    }

    /// One object by name.
    pub fn get(&self, name: &str) -> Option<Value> {
        self.state().objects.get(name).cloned()
    }

    /// Starts a watch: the events to send first, then the live receiver. `from` is the
    /// client's resourceVersion: `None` (or 0) sends the current objects as `ADDED`; a
    /// version older than this process remembers is an error (`410 Gone`).
    pub fn watch(&self, from: Option<u64>) -> Result<(Vec<Arc<Event>>, Receiver), u64> {
        let st = self.state();
        let rx = self.events.subscribe();
        let first: Vec<Arc<Event>> = match from.filter(|v| *v != 0) {
            None => st
                .objects
                .values()
                .map(|o| {
                    Arc::new(Event {
                        rv: o["metadata"]["resourceVersion"]
                            .as_str()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(st.rv),
                        kind: EventType::Added,
                        object: o.clone(),
                    })
                })
                .collect(),
            Some(v) if v < st.forgotten => return Err(st.forgotten),
            Some(v) => st.events.iter().filter(|e| e.rv > v).cloned().collect(),
        };
        let after = first
            .iter()
            .map(|e| e.rv)
            .max()
            .unwrap_or(st.rv)
            .max(from.unwrap_or(0));
        Ok((first, Receiver { rx, after }))
    }

    /// Reads the server every `interval`, so watches see new and removed backups.
    pub async fn poll(
        self: Arc<Self>,
        interval: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut failing = String::new();
        loop {
            match self.refresh(Instant::now()).await {
                // Said once per distinct failure, not at every poll.
                Err(e) if e != failing => {
                    tracing::warn!(error = %e, "cannot read the Klio server's catalog; watches see no change until it answers");
                    failing = e;
                }
                Err(_) => {}
                Ok(()) if !failing.is_empty() => {
                    tracing::info!("the Klio server's catalog can be read again");
                    failing.clear();
                }
                Ok(()) => {}
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

/// The live events of one watch, each once, in order.
#[derive(Debug)]
pub struct Receiver {
    rx: broadcast::Receiver<Arc<Event>>,
    after: u64,
}

impl Receiver {
    /// The next event; `None` when the watcher fell too far behind (it must resume).
    pub async fn next(&mut self) -> Option<Arc<Event>> {
        loop {
            match self.rx.recv().await {
                Ok(e) if e.rv <= self.after => continue,
                Ok(e) => {
                    self.after = e.rv;
                    return Some(e);
                }
                Err(_) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    type Shared = Arc<Mutex<Result<Vec<CatalogEntry>, String>>>;

    fn fake() -> (Arc<Catalog>, Shared, Arc<std::sync::atomic::AtomicU32>) {
        let data: Shared = Arc::new(Mutex::new(Ok(Vec::new())));
        let reads = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (d, r) = (data.clone(), reads.clone());
        let source: Source = Arc::new(move || {
            let d = d.clone();
            let r = r.clone();
            Box::pin(async move {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                d.lock().unwrap().clone()
            })
        });
        (Catalog::new("g.example.com", "ns", source), data, reads)
    }

    fn backup(cluster: &str, id: &str, tier2: bool) -> CatalogEntry {
        CatalogEntry {
            cluster: cluster.into(),
            backup_id: id.into(),
            metadata: json!({"start_lsn": "0/1", "end_lsn": "0/2", "stopped_at": "2026-01-01T00:00:00Z"}),
            in_tier1: true,
            in_tier2: tier2,
        }
    }

    #[tokio::test]
    async fn reads_are_shared_and_changes_become_events() {
        let (cat, data, reads) = fake();
        *data.lock().unwrap() = Ok(vec![backup("a", "backup-1", false)]);
        let t = Instant::now();
        let (r1, r2) = tokio::join!(cat.refresh(t), cat.refresh(t));
        r1.unwrap();
        r2.unwrap();
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        let (objects, rv0) = cat.snapshot();
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0]["metadata"]["resourceVersion"], rv0.as_str());

        // A watch from the list's version sees what changes next, each once.
        let rv0: u64 = rv0.parse().unwrap();
        let (first, mut live) = cat.watch(Some(rv0)).unwrap();
        assert!(first.is_empty());
        *data.lock().unwrap() = Ok(vec![
            backup("a", "backup-1", true),
            backup("b", "backup-2", false),
        ]);
        cat.refresh(Instant::now()).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let e = live.next().await.unwrap();
            assert!(e.rv > rv0);
            seen.push((
                e.kind,
                e.object["metadata"]["name"].as_str().unwrap().to_string(),
            ));
        }
        seen.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(
            seen,
            [
                (EventType::Modified, "a.backup-1".to_string()),
                (EventType::Added, "b.backup-2".to_string())
            ]
        );
        // Resuming from the first version replays both; from now, nothing.
        let (replay, _) = cat.watch(Some(rv0)).unwrap();
        assert_eq!(replay.len(), 2);
        let (_, rv1) = cat.snapshot();
        assert!(cat.watch(Some(rv1.parse().unwrap())).unwrap().0.is_empty());
        // Without a version: every object as ADDED.
        let (all, _) = cat.watch(None).unwrap();
        assert!(all.iter().all(|e| e.kind == EventType::Added));
        assert_eq!(all.len(), 2);

        *data.lock().unwrap() = Ok(vec![backup("b", "backup-2", false)]);
        cat.refresh(Instant::now()).await.unwrap();
        let e = live.next().await.unwrap();
        assert_eq!(e.kind, EventType::Deleted);
        assert_eq!(e.object["metadata"]["name"], "a.backup-1");
        assert!(cat.get("a.backup-1").is_none());
        assert!(cat.get("b.backup-2").is_some());
    }

    #[tokio::test]
    async fn failures_keep_the_catalog_and_old_versions_are_gone() {
        let (cat, data, _) = fake();
        *data.lock().unwrap() = Err("connection refused".into());
        assert_eq!(
            cat.refresh(Instant::now()).await.unwrap_err(),
            "connection refused"
        );
        assert!(!cat.loaded());
        *data.lock().unwrap() = Ok(vec![backup("a", "backup-1", false)]);
        cat.refresh(Instant::now()).await.unwrap();
        assert!(cat.loaded());
        // A version from before this process's first read cannot be resumed.
        let forgotten = cat.watch(Some(1)).unwrap_err();
        assert!(forgotten > 1);
        *data.lock().unwrap() = Err("gone".into());
        assert!(cat.refresh(Instant::now()).await.is_err());
        assert_eq!(cat.snapshot().0.len(), 1);
    }
}
