//! Which archive a WAL restore reads, from the Cluster JSON of the call: a bootstrap recovery
//! reads its recovery source's, a replica cluster's designated primary its replica source's,
//! everything else the cluster's own.

use serde_json::Value;

use crate::PLUGIN_NAME;

/// The archive names a sidecar knows (from the environment the lifecycle hook injects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveNames {
    /// The cluster's own archive (`KLIO_CLUSTER`).
    pub own: String,
    /// The archive of `bootstrap.recovery.source`, when that source is this plugin.
    pub recovery_source: Option<String>,
    /// The archive of `replica.source`, when that source is this plugin.
    pub replica_source: Option<String>,
}

/// Whether `externalClusters[name]` restores through this plugin.
fn source_is_ours(cluster: &Value, name: &str) -> bool {
    cluster["spec"]["externalClusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .is_some_and(|e| {
            e["plugin"]["name"] == PLUGIN_NAME && e["plugin"]["enabled"].as_bool() != Some(false)
        })
}

/// The archive a WAL restore reads for `cluster`, or why none fits.
pub fn archive_for(cluster: &Value, names: &ArchiveNames) -> Result<String, String> {
    let spec = &cluster["spec"];
    let bootstrapping = cluster["status"]["currentPrimary"]
        .as_str()
        .is_none_or(str::is_empty);
    if bootstrapping
        && let Some(source) = spec["bootstrap"]["recovery"]["source"].as_str()
        && source_is_ours(cluster, source)
    {
        return names.recovery_source.clone().ok_or_else(|| {
            format!(
                "the Cluster recovers from external cluster \"{source}\" through {PLUGIN_NAME}, but this sidecar was not given its archive name (KLIO_RECOVERY_SOURCE_CLUSTER)\nHINT: the pod predates the plugin version that injects it; recreate the pod"
            )
        });
    }
    if spec["replica"]["enabled"].as_bool() == Some(true)
        && let Some(source) = spec["replica"]["source"].as_str()
        && source_is_ours(cluster, source)
    {
        return names.replica_source.clone().ok_or_else(|| {
            format!(
                "the Cluster is a replica of external cluster \"{source}\" through {PLUGIN_NAME}, but this sidecar was not given its archive name (KLIO_REPLICA_SOURCE_CLUSTER)\nHINT: recreate the pod so the plugin injects it"
            )
        });
    }
    Ok(names.own.clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn names() -> ArchiveNames {
        ArchiveNames {
            own: "pg".into(),
            recovery_source: Some("origin-archive".into()),
            replica_source: Some("upstream-archive".into()),
        }
    }

    fn external(name: &str, plugin: &str) -> Value {
        json!({"name": name, "plugin": {"name": plugin, "parameters": {"pluginConfigurationRef": "pc"}}})
    }

    #[test]
    fn bootstrap_recovery_reads_the_source_then_the_own_archive() {
        let mut c = json!({
            "metadata": {"name": "pg"},
            "spec": {
                "bootstrap": {"recovery": {"source": "origin"}},
                "externalClusters": [external("origin", PLUGIN_NAME)]
            }
        });
        assert_eq!(archive_for(&c, &names()).unwrap(), "origin-archive");
        c["status"] = json!({"currentPrimary": ""});
        assert_eq!(archive_for(&c, &names()).unwrap(), "origin-archive");
        // Once a primary exists the recovery is over: the cluster's own archive.
        c["status"] = json!({"currentPrimary": "pg-1"});
        assert_eq!(archive_for(&c, &names()).unwrap(), "pg");
        // A recovery through another plugin is not ours to serve from the source.
        let mut other = c.clone();
        other["status"] = json!({});
        other["spec"]["externalClusters"] =
            json!([external("origin", "barman-cloud.cloudnative-pg.io")]);
        assert_eq!(archive_for(&other, &names()).unwrap(), "pg");
        // Without the name, a precise refusal instead of reading the wrong archive.
        let mut unnamed = names();
        unnamed.recovery_source = None;
        c["status"] = json!({});
        let e = archive_for(&c, &unnamed).unwrap_err();
        assert!(e.contains("KLIO_RECOVERY_SOURCE_CLUSTER"), "{e}");
    }

    #[test]
    fn replica_clusters_read_their_source_while_replicating() {
        let mut c = json!({
            "metadata": {"name": "pg"},
            "spec": {
                "replica": {"enabled": true, "source": "upstream"},
                "externalClusters": [external("upstream", PLUGIN_NAME)]
            },
            "status": {"currentPrimary": "pg-1"}
        });
        assert_eq!(archive_for(&c, &names()).unwrap(), "upstream-archive");
        c["spec"]["replica"]["enabled"] = json!(false);
        assert_eq!(archive_for(&c, &names()).unwrap(), "pg");
        assert_eq!(
            archive_for(&json!({"unknown": [1, 2]}), &names()).unwrap(),
            "pg"
        );
    }
}
