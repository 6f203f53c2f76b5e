//! Backup retention: which backups of a cluster a retention policy keeps, and by which rule.
//!
//! Principal items:
//! - [`Policy`]: the counts `keepLatest`, `keepHourly`, `keepDaily`, `keepWeekly`,
//!   `keepMonthly` and `keepAnnual`, with Klio's defaults; [`PolicyOverrides`] is the optional
//!   form read from a `PluginConfiguration`, merged over the defaults by [`Policy::merged`];
//! - [`plan`] and [`plan_in`]: from the [`Candidate`] backups to one [`Decision`] per backup,
//!   kept or expired, with the [`Reason`]s (a [`Rule`] and a bucket) that keep it.
//!
//! Retention is planned, then executed: this crate only plans. It reads no repository and
//! deletes nothing; the caller shows the plan (`klio retention plan [--json]`, the JSON being
//! the serialized [`Decision`]s), logs it, and deletes the expired backups.
//!
//! # Scope
//!
//! A plan covers the backups of **one cluster in one tier**: Tier 1 and Tier 2 each have their
//! own policy (`spec.tier1.retention`, `spec.tier2.retention`) and the caller plans each
//! cluster and tier apart. The candidates are completed backups only; a backup still running or
//! failed is not a candidate, so it neither expires nor moves the reference time. Decisions are
//! per backup and atomic: a backup is kept or deleted whole. The WAL that kept backups need is
//! the server's business, not this crate's.
//!
//! # Policy and defaults
//!
//! Each rule has a count; `0` disables the rule. A field left unspecified takes the default
//! that Klio's plugin documentation gives as "the default Kopia value":
//!
//! | field         | default | keeps                                         |
//! |---------------|--------:|-----------------------------------------------|
//! | `keepLatest`  | 10      | the N newest backups                          |
//! | `keepHourly`  | 48      | the newest backup of each of N hours          |
//! | `keepDaily`   | 7       | the newest backup of each of N days           |
//! | `keepWeekly`  | 4       | the newest backup of each of N ISO weeks      |
//! | `keepMonthly` | 24      | the newest backup of each of N months         |
//! | `keepAnnual`  | 1       | the newest backup of each of N years          |
//!
//! Kopia's own code defaults `keepAnnual` to 3, and upstream Klio, which passes unset fields
//! to Kopia as `inherit`, ends up with 3 too; Klio documents 1, and 1 is what this crate uses.
//!
//! # Algorithm
//!
//! This is Kopia's retention algorithm (`snapshot/policy/retention_policy.go`), which Klio's
//! plugin documentation describes, with the changes listed at the end.
//!
//! 1. Sort the candidates newest first by time (the backup's start time); two backups with the
//!    same time are ordered by id, the greater id first (it counts as the newer).
//! 2. The **reference time** is the time of the newest backup, not the wall clock: if backups
//!    stop, nothing more expires.
//! 3. `keepLatest` N keeps the first N backups, with the reasons `latest-1` to `latest-N`
//!    (bucket `#1` to `#N`).
//! 4. Each time-bucket rule with count N has a **window** that ends at the reference time and
//!    starts N hours, N × 24 hours, N × 7 days, N calendar months or N calendar years before it
//!    (hourly, daily, weekly, monthly, annual). The start is inclusive. For months and years, a
//!    day that the earlier month lacks is clamped to its last day: March 31 minus one month is
//!    February 28 (29 in a leap year), and February 29 minus one year is February 28.
//! 5. Walking the backups newest first, each backup inside the window falls into a bucket: its
//!    hour (`2026-11-21T10`), day (`2026-11-21`), ISO week (`2026-W47`: the ISO year and week
//!    number, so `2026-W01` starts on Monday December 29, 2025, and January 1 to 3, 2027 are
//!    in `2026-W53`), month (`2026-11`) or year (`2026`). The first backup seen in a bucket,
//!    that is the **newest backup of the bucket, wins it**; the rule keeps it with the reason
//!    `<rule>-<k>` when the rule has claimed fewer than N buckets so far. Older backups of the
//!    same bucket get nothing from this rule.
//! 6. So a rule keeps at most N backups, one per bucket, all inside its window. A window of N
//!    units touches N + 1 calendar periods (the newest one and, in part, the one N units back),
//!    but the count still caps it at N buckets. Empty periods are not filled from older data:
//!    with `keepMonthly` 3, the newest backup on April 2 and no backup in February, the window
//!    starts on January 2 and a backup of January 1 is not kept, although only two monthly
//!    buckets are claimed.
//! 7. Each rule counts independently, so one backup can be kept by several rules and lists every
//!    reason, in the order latest, hourly, daily, weekly, monthly, annual (for example
//!    `latest-1, hourly-1, daily-1, weekly-1, monthly-1, annual-1` for the newest backup).
//! 8. A backup with no reason expires.
//!
//! # Safety rules
//!
//! - **The newest backup is always kept.** When any count is above 0, the newest backup lies
//!   inside every window and is the first backup of its bucket, so it wins bucket 1 of every
//!   enabled rule.
//! - **A policy whose every count is 0 keeps every backup** (each with a `latest-k` reason), as
//!   Kopia does since its fix for issue #1733: "keep nothing" is never a reading of a
//!   configuration, and deleting all backups needs an explicit command, not a policy.
//! - Windows count from the newest backup, so a stopped backup schedule, a clock jump on the
//!   machine that plans, or planning later never expires more.
//!
//! # Time zone
//!
//! [`plan`] takes hours, days, ISO weeks, months and years, and the window arithmetic, in
//! **UTC**. The Klio server, the Kubernetes clusters it serves and the machine running the CLI
//! may sit in different regions; with UTC they all compute the same plan from the same
//! backups, and the plan does not change when a process's `TZ` does. UTC is also what Kopia
//! uses for hourly, daily, monthly and annual buckets. The cost is that a DBA's midnight is not
//! UTC midnight: a backup taken at 00:30 in Paris in winter is at 23:30 UTC and counts for the
//! previous day.
//!
//! [`plan_in`] takes all buckets and windows at a fixed [`time::UtcOffset`] instead (for
//! example `+01:00`). Only fixed offsets are offered: a zone with daylight saving time has days
//! of 23 and 25 hours and an hour that occurs twice, which would make buckets depend on a time
//! zone database and its version.
//!
//! # Differences from Kopia
//!
//! - Buckets are per rule. Kopia keeps one set of period ids for all rules, so the monthly id
//!   `2024-01` and the weekly id `2024-01` (ISO week 1) collide, and a backup can miss a weekly
//!   reason because another backup won that month. Here rules never interact.
//! - One offset for every rule. Kopia takes the weekly bucket, and the calendar arithmetic of
//!   every window, in the process's local time zone, and the other buckets in UTC.
//! - Month-end clamping. Kopia's windows use Go's `AddDate`, which normalizes March 31 minus one
//!   month to March 3; clamping to February 28 or 29 gives a window that starts no later, so a
//!   window is never shorter than Kopia's.
//! - No incomplete backups: Kopia also keeps recent checkpoint snapshots; Klio plans completed
//!   backups only.
//! - Bucket labels: Kopia's weekly id is `2026-47` and its hourly id `2026-11-21 10`; here they
//!   are `2026-W47` and `2026-11-21T10`. Reasons carry the rank (`daily-2`) as Kopia does.

mod calendar;
mod plan;
mod policy;

pub use plan::{Candidate, Decision, Reason, Rule, plan, plan_in};
pub use policy::{Policy, PolicyOverrides};
