//! The retention policy: how many backups each rule keeps, and the overrides read from a
//! `PluginConfiguration`.

use serde::{Deserialize, Serialize};

use crate::Rule;

/// How many backups, or buckets, each rule keeps. `0` disables a rule.
///
/// [`Policy::default`] holds the values Klio documents for unspecified fields; see the crate
/// documentation for what each count means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Keep this many newest backups.
    pub keep_latest: u32,
    /// Keep the newest backup of each of this many hours.
    pub keep_hourly: u32,
    /// Keep the newest backup of each of this many days.
    pub keep_daily: u32,
    /// Keep the newest backup of each of this many ISO weeks.
    pub keep_weekly: u32,
    /// Keep the newest backup of each of this many months.
    pub keep_monthly: u32,
    /// Keep the newest backup of each of this many years.
    pub keep_annual: u32,
}

impl Policy {
    /// `keepLatest` when unspecified.
    pub const DEFAULT_KEEP_LATEST: u32 = 10;
    /// `keepHourly` when unspecified.
    pub const DEFAULT_KEEP_HOURLY: u32 = 48;
    /// `keepDaily` when unspecified.
    pub const DEFAULT_KEEP_DAILY: u32 = 7;
    /// `keepWeekly` when unspecified.
    pub const DEFAULT_KEEP_WEEKLY: u32 = 4;
    /// `keepMonthly` when unspecified.
    pub const DEFAULT_KEEP_MONTHLY: u32 = 24;
    /// `keepAnnual` when unspecified (Klio's documented value; Kopia's own default is 3).
    pub const DEFAULT_KEEP_ANNUAL: u32 = 1;

    /// A policy whose every count is 0. [`plan`](crate::plan) keeps every backup under it.
    pub const ZERO: Policy = Policy {
        keep_latest: 0,
        keep_hourly: 0,
        keep_daily: 0,
        keep_weekly: 0,
        keep_monthly: 0,
        keep_annual: 0,
    };

    /// The defaults with each field that `overrides` sets replaced by its value.
    pub fn merged(overrides: &PolicyOverrides) -> Policy {
        let defaults = Policy::default();
        Policy {
            keep_latest: overrides.keep_latest.unwrap_or(defaults.keep_latest),
            keep_hourly: overrides.keep_hourly.unwrap_or(defaults.keep_hourly),
            keep_daily: overrides.keep_daily.unwrap_or(defaults.keep_daily),
            keep_weekly: overrides.keep_weekly.unwrap_or(defaults.keep_weekly),
            keep_monthly: overrides.keep_monthly.unwrap_or(defaults.keep_monthly),
            keep_annual: overrides.keep_annual.unwrap_or(defaults.keep_annual),
        }
    }

    /// The count of `rule`.
    pub fn count(&self, rule: Rule) -> u32 {
        match rule {
            Rule::Latest => self.keep_latest,
            Rule::Hourly => self.keep_hourly,
            Rule::Daily => self.keep_daily,
            Rule::Weekly => self.keep_weekly,
            Rule::Monthly => self.keep_monthly,
            Rule::Annual => self.keep_annual,
        }
    }

    /// Whether every count is 0, which means "keep every backup" rather than "keep none".
    pub fn is_all_zero(&self) -> bool {
        Rule::ALL.iter().all(|&rule| self.count(rule) == 0)
    }
}

impl Default for Policy {
    /// `keepLatest` 10, `keepHourly` 48, `keepDaily` 7, `keepWeekly` 4, `keepMonthly` 24,
    /// `keepAnnual` 1.
    fn default() -> Self {
        Policy {
            keep_latest: Self::DEFAULT_KEEP_LATEST,
            keep_hourly: Self::DEFAULT_KEEP_HOURLY,
            keep_daily: Self::DEFAULT_KEEP_DAILY,
            keep_weekly: Self::DEFAULT_KEEP_WEEKLY,
            keep_monthly: Self::DEFAULT_KEEP_MONTHLY,
            keep_annual: Self::DEFAULT_KEEP_ANNUAL,
        }
    }
}

/// The `retention` object of a tier in a `PluginConfiguration` (`spec.tier1.retention`,
/// `spec.tier2.retention`): each field is optional and falls back to [`Policy::default`] through
/// [`Policy::merged`].
///
/// It deserializes from the CRD's JSON (`{"keepLatest": 5, "keepDaily": 0}`); a missing field or
/// `null` means "unspecified". Unknown fields are rejected, so that a misspelt rule
/// (`keepDayly`) is an error instead of a silent default; negative counts are rejected too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyOverrides {
    /// `keepLatest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_latest: Option<u32>,
    /// `keepHourly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// `keepDaily`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// `keepWeekly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// `keepMonthly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    /// `keepAnnual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_annual: Option<u32>,
}
