//! What the plugin reads from a CloudNativePG `Cluster` JSON, leniently: the document may lack
//! `apiVersion`/`kind`, its group may be `postgresql.cnpg.io` or EDB's
//! `postgresql.k8s.enterprisedb.io`, and unknown fields are ignored.

use serde_json::Value;

use crate::{PARAMETER_CONFIGURATION_REF, PLUGIN_NAME};

/// A Cluster JSON document, as far as the plugin looks at it.
#[derive(Debug, Clone)]
pub struct Cluster<'a>(pub &'a Value);

impl<'a> Cluster<'a> {
    /// Parses `bytes`; an empty or non-object document is refused with a message.
    pub fn parse(bytes: &[u8]) -> Result<Value, String> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| format!("the Cluster definition is not JSON: {e}"))?;
        if !v.is_object() {
            return Err("the Cluster definition is not a JSON object".to_string());
        }
        Ok(v)
    }

    pub fn name(&self) -> &'a str {
        self.0["metadata"]["name"].as_str().unwrap_or_default()
    }

    pub fn namespace(&self) -> &'a str {
        self.0["metadata"]["namespace"].as_str().unwrap_or_default()
    }

    /// The `spec.plugins[]` entry of this plugin, if present and enabled (`enabled` defaults
    /// to true).
    pub fn instance_plugin(&self) -> Option<&'a Value> {
        self.0["spec"]["plugins"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == PLUGIN_NAME && p["enabled"].as_bool() != Some(false))
    }

    /// The `externalClusters[].plugin` of the recovery source (`bootstrap.recovery.source`),
    /// if it is this plugin.
    pub fn recovery_plugin(&self) -> Option<&'a Value> {
        self.recovery_source().map(|(_, p)| p)
    }

    /// The recovery source's name and plugin entry, if that source is this plugin.
    pub fn recovery_source(&self) -> Option<(&'a str, &'a Value)> {
        let source = self.0["spec"]["bootstrap"]["recovery"]["source"].as_str()?;
        Some((source, self.external_plugin(source)?))
    }

    /// The replica source's name and plugin entry (`replica.source` of an enabled replica
    /// cluster), if that source is this plugin.
    pub fn replica_source(&self) -> Option<(&'a str, &'a Value)> {
        let replica = &self.0["spec"]["replica"];
        if replica["enabled"].as_bool() != Some(true) {
            return None;
        }
        let source = replica["source"].as_str()?;
        Some((source, self.external_plugin(source)?))
    }

    /// `externalClusters[name].plugin`, if it is this plugin and enabled.
    fn external_plugin(&self, name: &str) -> Option<&'a Value> {
        let external = self.0["spec"]["externalClusters"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == name)?;
        let plugin = &external["plugin"];
        (plugin["name"] == PLUGIN_NAME && plugin["enabled"].as_bool() != Some(false))
            .then_some(plugin)
    }
}

/// The `pluginConfigurationRef` parameter of a plugin entry.
pub fn configuration_ref(entry: &Value) -> Result<&str, String> {
    entry["parameters"][PARAMETER_CONFIGURATION_REF]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            format!(
                "the {PLUGIN_NAME} plugin entry has no parameters.{PARAMETER_CONFIGURATION_REF}: set it to the name of a PluginConfiguration in the Cluster's namespace"
            )
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn cluster_plugins_found_without_gvk_and_disabled_ignored() {
        let c = json!({
            "metadata": {"name": "pg", "namespace": "ns"},
            "spec": {
                "plugins": [
                    {"name": "other", "parameters": {}},
                    {"name": PLUGIN_NAME, "parameters": {"pluginConfigurationRef": "pc"}}
                ],
                "bootstrap": {"recovery": {"source": "origin"}},
                "externalClusters": [
                    {"name": "origin", "plugin": {"name": PLUGIN_NAME, "parameters": {"pluginConfigurationRef": "dr"}}}
                ],
                "unknownField": {"x": 1}
            }
        });
        let cluster = Cluster(&c);
        assert_eq!(
            configuration_ref(cluster.instance_plugin().unwrap()),
            Ok("pc")
        );
        assert_eq!(
            configuration_ref(cluster.recovery_plugin().unwrap()),
            Ok("dr")
        );
        let mut off = c.clone();
        off["spec"]["plugins"][1]["enabled"] = json!(false);
        assert!(Cluster(&off).instance_plugin().is_none());
        let no_ref = json!({"name": PLUGIN_NAME});
        assert!(
            configuration_ref(&no_ref)
                .unwrap_err()
                .contains("pluginConfigurationRef")
        );
        assert!(Cluster::parse(b"[]").is_err());
        assert!(Cluster::parse(b"").is_err());
    }
}
