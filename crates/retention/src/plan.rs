//! The retention plan: which backups a [`Policy`] keeps, and by which rules.

use std::collections::HashSet;
use std::fmt;

use serde::{Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::Policy;
use crate::calendar::{self, Period};

/// A retention rule, one per [`Policy`] field.
///
/// Ordered, displayed and serialized as Kopia lists its retention tags: `latest`, `hourly`,
/// `daily`, `weekly`, `monthly`, `annual`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// `keepLatest`: the N newest backups.
    Latest,
    /// `keepHourly`: the newest backup of each hour.
    Hourly,
    /// `keepDaily`: the newest backup of each day.
    Daily,
    /// `keepWeekly`: the newest backup of each ISO week.
    Weekly,
    /// `keepMonthly`: the newest backup of each month.
    Monthly,
    /// `keepAnnual`: the newest backup of each year.
    Annual,
}

impl Rule {
    /// Every rule, in display order.
    pub const ALL: [Rule; 6] = [
        Rule::Latest,
        Rule::Hourly,
        Rule::Daily,
        Rule::Weekly,
        Rule::Monthly,
        Rule::Annual,
    ];

    /// The rule's name: `latest`, `hourly`, `daily`, `weekly`, `monthly` or `annual`.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Latest => "latest",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Annual => "annual",
        }
    }

    /// The period a time-bucket rule groups by; `None` for [`Rule::Latest`].
    fn period(self) -> Option<Period> {
        match self {
            Rule::Latest => None,
            Rule::Hourly => Some(Period::Hour),
            Rule::Daily => Some(Period::Day),
            Rule::Weekly => Some(Period::IsoWeek),
            Rule::Monthly => Some(Period::Month),
            Rule::Annual => Some(Period::Year),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A backup to decide on: a completed backup of one cluster in one tier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// The backup id.
    pub id: String,
    /// When the backup started. Its offset does not matter: buckets are taken at the offset
    /// given to [`plan_in`] (UTC for [`plan`]).
    pub time: OffsetDateTime,
}

/// Why a rule keeps a backup: the rule, the backup's rank among the buckets that rule keeps, and
/// the bucket.
///
/// Displayed in Kopia's style, `latest-3` or `daily-2 (2026-11-21)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Reason {
    /// The rule that keeps the backup.
    pub rule: Rule,
    /// 1 for the newest bucket the rule keeps, 2 for the next, up to the rule's count (Kopia's
    /// `daily-2`).
    pub rank: usize,
    /// The bucket the backup wins: `2026-11-21T10` (hourly), `2026-11-21` (daily), `2026-W47`
    /// (weekly, ISO year and week), `2026-11` (monthly), `2026` (annual), or `#1` to `#N`
    /// (latest).
    pub bucket: String,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            Rule::Latest => write!(f, "{}-{}", self.rule, self.rank),
            _ => write!(f, "{}-{} ({})", self.rule, self.rank, self.bucket),
        }
    }
}

/// The plan for one backup: kept, with every rule that keeps it, or expired.
///
/// Serialized as `{"id": …, "time": "2026-11-21T10:00:00Z", "keep": true, "reasons": [{"rule":
/// "daily", "rank": 1, "bucket": "2026-11-21"}]}`, the time in RFC 3339 at the candidate's own
/// offset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Decision {
    /// The backup id.
    pub id: String,
    /// The backup's time, as given in its [`Candidate`].
    #[serde(serialize_with = "serialize_rfc3339")]
    pub time: OffsetDateTime,
    /// Whether the backup is kept; `false` means it is to be deleted.
    pub keep: bool,
    /// Why it is kept, in [`Rule`] order; empty when it expires.
    pub reasons: Vec<Reason>,
}

/// Decides, for every backup of one cluster in one tier, whether `policy` keeps it, with buckets
/// taken in UTC. One [`Decision`] per candidate, newest first.
pub fn plan(policy: &Policy, backups: &[Candidate]) -> Vec<Decision> {
    plan_in(policy, backups, UtcOffset::UTC)
}

/// [`plan`] with hours, days, weeks, months and years taken at the fixed `offset` instead of UTC.
pub fn plan_in(policy: &Policy, backups: &[Candidate], offset: UtcOffset) -> Vec<Decision> {
    let mut order: Vec<&Candidate> = backups.iter().collect();
    order.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));

    let mut reasons: Vec<Vec<Reason>> = vec![Vec::new(); order.len()];
    if let Some(newest) = order.first() {
        let reference = calendar::at_offset(newest.time, offset);
        for rule in Rule::ALL {
            let limit = limit(policy, rule, order.len());
            if limit == 0 {
                continue;
            }
            let window_start = rule
                .period()
                .and_then(|period| period.window_start(policy.count(rule), reference));
            let mut claimed: HashSet<String> = HashSet::new();
            for (index, candidate) in order.iter().enumerate() {
                // Newest first: once a rule is full or past its window, nothing older qualifies.
                if claimed.len() == limit
                    || window_start.is_some_and(|start| candidate.time < start)
                {
                    break;
                }
                let bucket = match rule.period() {
                    None => format!("#{}", index + 1),
                    Some(period) => period.label(calendar::at_offset(candidate.time, offset)),
                };
                if claimed.insert(bucket.clone()) {
                    reasons[index].push(Reason {
                        rule,
                        rank: claimed.len(),
                        bucket,
                    });
                }
            }
        }
    }

    order
        .into_iter()
        .zip(reasons)
        .map(|(candidate, reasons)| Decision {
            id: candidate.id.clone(),
            time: candidate.time,
            keep: !reasons.is_empty(),
            reasons,
        })
        .collect()
}

/// How many buckets `rule` may keep: its count, except under an all-zero policy, where
/// `keepLatest` keeps every backup and the other rules nothing.
fn limit(policy: &Policy, rule: Rule, backups: usize) -> usize {
    if policy.is_all_zero() {
        return if rule == Rule::Latest { backups } else { 0 };
    }
    usize::try_from(policy.count(rule)).unwrap_or(usize::MAX)
}

fn serialize_rfc3339<S: Serializer>(
    time: &OffsetDateTime,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let text = time.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
    serializer.serialize_str(&text)
}
