//! What clients told the server about their clusters, kept across restarts in
//! `<data-dir>/clusters/<cluster>.json`: whether the cluster uses Tier 2 (enableBackup) and
//! the retention policies of its last retention run, which the scheduled runs apply.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use klio_retention::PolicyOverrides;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSettings {
    /// WAL and backups are copied to Tier 2.
    #[serde(default)]
    pub tier2_backup: bool,
    /// The Tier 1 policy of the last retention run; scheduled runs apply it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier1_retention: Option<PolicyOverrides>,
    /// The Tier 2 policy of the last Tier 2 retention run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier2_retention: Option<PolicyOverrides>,
}

/// The settings of every cluster, cached in memory, written through durably.
#[derive(Clone)]
pub struct Settings {
    dir: PathBuf,
    cache: Arc<Mutex<HashMap<String, ClusterSettings>>>,
}

impl Settings {
    /// Loads `<dir>/*.json`, creating `dir` if needed.
    pub fn open(dir: PathBuf) -> anyhow::Result<Settings> {
        klio_durable::create_dir_all_durable(&dir)
            .with_context(|| format!("create \"{}\"", dir.display()))?;
        let mut cache = HashMap::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("list \"{}\"", dir.display()))? {
            let path = e?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let bytes =
                std::fs::read(&path).with_context(|| format!("read \"{}\"", path.display()))?;
            let s: ClusterSettings = serde_json::from_slice(&bytes)
                .with_context(|| format!("parse \"{}\"", path.display()))?;
            cache.insert(name.to_string(), s);
        }
        Ok(Settings {
            dir,
            cache: Arc::new(Mutex::new(cache)),
        })
    }

    pub fn get(&self, cluster: &str) -> ClusterSettings {
        self.lock().get(cluster).cloned().unwrap_or_default()
    }

    /// Every cluster with settings, by name.
    pub fn all(&self) -> Vec<(String, ClusterSettings)> {
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Applies `change` and writes the result durably when it changed anything. The
    /// cluster name must be valid (callers have checked it).
    pub fn update(
        &self,
        cluster: &str,
        change: impl FnOnce(&mut ClusterSettings),
    ) -> anyhow::Result<()> {
        let mut cache = self.lock();
        let mut s = cache.get(cluster).cloned().unwrap_or_default();
        change(&mut s);
        if cache.get(cluster) == Some(&s) {
            return Ok(());
        }
        let path = self.dir.join(format!("{cluster}.json"));
        let json = serde_json::to_vec_pretty(&s)?;
        klio_durable::write_atomic(&path, &json, 0o600)
            .with_context(|| format!("write \"{}\"", path.display()))?;
        cache.insert(cluster.to_string(), s);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ClusterSettings>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
