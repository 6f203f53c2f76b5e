//! The operating mode shared by `Server` and `PluginConfiguration`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `spec.mode` of a `Server` or a `PluginConfiguration`: `standard` (the default) or
/// `read-only`.
///
/// A read-only server serves backups and WAL from Tier 2 only and accepts no writes; a
/// read-only plugin configuration only restores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Backups, WAL streaming and restores.
    #[default]
    Standard,
    /// Restores only, from Tier 2.
    ReadOnly,
}

impl Mode {
    /// The value as written in a manifest: `standard` or `read-only`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Standard => "standard",
            Mode::ReadOnly => "read-only",
        }
    }
}
