#![allow(clippy::unwrap_used)]
//! `plan` and `plan_in` against hand-checked tables: calendar boundaries, newest-per-bucket,
//! windows, the safety rules, time zones, and Kopia's own retention test cases.

use std::collections::{BTreeMap, HashMap};

use klio_retention::{Candidate, Decision, Policy, Rule, plan, plan_in};
use time::format_description::well_known::Rfc3339;
use time::macros::{datetime, format_description, offset};
use time::{Duration, OffsetDateTime, UtcOffset};

fn at(text: &str) -> OffsetDateTime {
    OffsetDateTime::parse(text, &Rfc3339).unwrap()
}

/// Candidates whose ids are their RFC 3339 times.
fn candidates(times: &[&str]) -> Vec<Candidate> {
    times
        .iter()
        .map(|text| Candidate {
            id: (*text).to_owned(),
            time: at(text),
        })
        .collect()
}

/// Each backup id with its displayed reasons.
fn reasons(decisions: &[Decision]) -> BTreeMap<String, Vec<String>> {
    decisions
        .iter()
        .map(|d| {
            assert_eq!(d.keep, !d.reasons.is_empty(), "keep of {}", d.id);
            (
                d.id.clone(),
                d.reasons.iter().map(ToString::to_string).collect(),
            )
        })
        .collect()
}

/// Backup ids with the displayed reasons each must get.
type Rows = &'static [(&'static str, &'static [&'static str])];

fn expected(rows: Rows) -> BTreeMap<String, Vec<String>> {
    rows.iter()
        .map(|(id, reasons)| {
            let reasons = reasons.iter().map(|r| (*r).to_owned()).collect();
            ((*id).to_owned(), reasons)
        })
        .collect()
}

struct Case {
    name: &'static str,
    policy: Policy,
    /// Every backup with the reasons it must get; the backups are these ids, as times.
    want: Rows,
}

fn check(cases: &[Case], offset: UtcOffset) {
    for case in cases {
        let times: Vec<&str> = case.want.iter().map(|(id, _)| *id).collect();
        let got = reasons(&plan_in(&case.policy, &candidates(&times), offset));
        assert_eq!(got, expected(case.want), "case {}", case.name);
    }
}

const fn only_latest(n: u32) -> Policy {
    Policy {
        keep_latest: n,
        ..Policy::ZERO
    }
}
const fn only_hourly(n: u32) -> Policy {
    Policy {
        keep_hourly: n,
        ..Policy::ZERO
    }
}
const fn only_daily(n: u32) -> Policy {
    Policy {
        keep_daily: n,
        ..Policy::ZERO
    }
}
const fn only_weekly(n: u32) -> Policy {
    Policy {
        keep_weekly: n,
        ..Policy::ZERO
    }
}
const fn only_monthly(n: u32) -> Policy {
    Policy {
        keep_monthly: n,
        ..Policy::ZERO
    }
}
const fn only_annual(n: u32) -> Policy {
    Policy {
        keep_annual: n,
        ..Policy::ZERO
    }
}

#[test]
fn plan_calendar_boundaries_split_buckets() {
    check(
        &[
            Case {
                name: "hour: 23:59:59 and 00:00:00 are different hours",
                policy: only_hourly(2),
                want: &[
                    ("2026-11-21T00:00:00Z", &["hourly-1 (2026-11-21T00)"]),
                    ("2026-11-20T23:59:59Z", &["hourly-2 (2026-11-20T23)"]),
                    ("2026-11-20T23:10:00Z", &[]),
                ],
            },
            Case {
                name: "day: 23:59:59 and 00:00:00 are different days",
                policy: only_daily(2),
                want: &[
                    ("2026-11-21T00:00:00Z", &["daily-1 (2026-11-21)"]),
                    ("2026-11-20T23:59:59Z", &["daily-2 (2026-11-20)"]),
                    ("2026-11-20T00:00:00Z", &[]),
                ],
            },
            Case {
                name: "day: keepDaily 1 keeps only the newest day",
                policy: only_daily(1),
                want: &[
                    ("2026-11-21T00:00:00Z", &["daily-1 (2026-11-21)"]),
                    ("2026-11-20T23:59:59Z", &[]),
                ],
            },
            Case {
                name: "week: Sunday and the next Monday are different ISO weeks",
                policy: only_weekly(2),
                want: &[
                    ("2026-11-23T00:00:00Z", &["weekly-1 (2026-W48)"]),
                    ("2026-11-22T23:59:59Z", &["weekly-2 (2026-W47)"]),
                    ("2026-11-16T00:00:00Z", &[]),
                ],
            },
            Case {
                name: "week: 2026 has 53 ISO weeks, and January 1, 2027 is in 2026-W53",
                policy: only_weekly(3),
                want: &[
                    ("2027-01-04T00:00:00Z", &["weekly-1 (2027-W01)"]),
                    ("2027-01-03T23:59:59Z", &["weekly-2 (2026-W53)"]),
                    ("2027-01-01T12:00:00Z", &[]),
                    ("2026-12-31T12:00:00Z", &[]),
                    ("2026-12-28T00:00:00Z", &[]),
                    ("2026-12-27T23:59:59Z", &["weekly-3 (2026-W52)"]),
                ],
            },
            Case {
                name: "week: 2026-W01 starts on Monday December 29, 2025",
                policy: only_weekly(2),
                want: &[
                    ("2026-01-02T12:00:00Z", &["weekly-1 (2026-W01)"]),
                    ("2025-12-29T00:00:00Z", &[]),
                    ("2025-12-28T23:59:59Z", &["weekly-2 (2025-W52)"]),
                ],
            },
            Case {
                name: "December 31 to January 1: same ISO week, different years",
                policy: Policy {
                    keep_weekly: 1,
                    keep_annual: 2,
                    ..Policy::ZERO
                },
                want: &[
                    (
                        "2027-01-01T00:00:00Z",
                        &["weekly-1 (2026-W53)", "annual-1 (2027)"],
                    ),
                    ("2026-12-31T23:59:59Z", &["annual-2 (2026)"]),
                    ("2026-12-31T00:00:00Z", &[]),
                ],
            },
            Case {
                name: "month: January 31 and February 1 are different months",
                policy: only_monthly(2),
                want: &[
                    ("2027-02-01T00:00:00Z", &["monthly-1 (2027-02)"]),
                    ("2027-01-31T23:59:59Z", &["monthly-2 (2027-01)"]),
                    ("2027-01-01T00:00:00Z", &[]),
                ],
            },
            Case {
                name: "leap day: February 28, 29 and March 1, 2028 are three days",
                policy: only_daily(3),
                want: &[
                    ("2028-03-01T12:00:00Z", &["daily-1 (2028-03-01)"]),
                    ("2028-02-29T12:00:00Z", &["daily-2 (2028-02-29)"]),
                    ("2028-02-28T12:00:00Z", &["daily-3 (2028-02-28)"]),
                ],
            },
            Case {
                name: "leap day: February 29, 2028 is in February",
                policy: only_monthly(2),
                want: &[
                    ("2028-03-01T00:00:00Z", &["monthly-1 (2028-03)"]),
                    ("2028-02-29T23:59:59Z", &["monthly-2 (2028-02)"]),
                    ("2028-02-28T12:00:00Z", &[]),
                ],
            },
        ],
        UtcOffset::UTC,
    );
}

#[test]
fn plan_windows_count_from_newest_backup() {
    check(
        &[
            Case {
                name: "daily window start is inclusive, an empty day is not filled",
                policy: only_daily(3),
                want: &[
                    ("2026-11-21T10:00:00Z", &["daily-1 (2026-11-21)"]),
                    ("2026-11-18T10:00:00Z", &["daily-2 (2026-11-18)"]),
                ],
            },
            Case {
                name: "daily window: one second before its start is out",
                policy: only_daily(3),
                want: &[
                    ("2026-11-21T10:00:00Z", &["daily-1 (2026-11-21)"]),
                    ("2026-11-18T09:59:59Z", &[]),
                ],
            },
            Case {
                name: "hourly window: N hours back, not N buckets with backups",
                policy: only_hourly(48),
                want: &[
                    ("2026-11-21T10:00:00Z", &["hourly-1 (2026-11-21T10)"]),
                    ("2026-11-19T10:00:00Z", &["hourly-2 (2026-11-19T10)"]),
                    ("2026-11-19T09:59:59Z", &[]),
                ],
            },
            Case {
                name: "weekly window: 7 N days back",
                policy: only_weekly(2),
                want: &[
                    ("2026-11-21T10:00:00Z", &["weekly-1 (2026-W47)"]),
                    ("2026-11-07T10:00:00Z", &["weekly-2 (2026-W45)"]),
                    ("2026-11-07T09:59:59Z", &[]),
                ],
            },
            Case {
                name: "monthly window from May 31 starts on February 29 (clamped)",
                policy: only_monthly(3),
                want: &[
                    ("2028-05-31T10:30:00Z", &["monthly-1 (2028-05)"]),
                    ("2028-04-15T00:00:00Z", &["monthly-2 (2028-04)"]),
                    ("2028-02-29T10:30:00Z", &["monthly-3 (2028-02)"]),
                ],
            },
            Case {
                name: "monthly window from May 31: before February 29 10:30 is out",
                policy: only_monthly(3),
                want: &[
                    ("2028-05-31T10:30:00Z", &["monthly-1 (2028-05)"]),
                    ("2028-04-15T00:00:00Z", &["monthly-2 (2028-04)"]),
                    ("2028-02-29T10:29:59Z", &[]),
                ],
            },
            Case {
                name: "annual window from February 29 starts on February 28",
                policy: only_annual(2),
                want: &[
                    ("2028-02-29T12:00:00Z", &["annual-1 (2028)"]),
                    ("2026-02-28T12:00:00Z", &["annual-2 (2026)"]),
                ],
            },
            Case {
                name: "annual window from February 29: before February 28 12:00 is out",
                policy: only_annual(2),
                want: &[
                    ("2028-02-29T12:00:00Z", &["annual-1 (2028)"]),
                    ("2026-02-28T11:59:59Z", &[]),
                ],
            },
        ],
        UtcOffset::UTC,
    );
}

#[test]
fn plan_rules_newest_per_bucket_and_several_reasons() {
    check(
        &[
            Case {
                name: "the newest backup of each day wins it",
                policy: only_daily(7),
                want: &[
                    ("2026-11-21T18:00:00Z", &["daily-1 (2026-11-21)"]),
                    ("2026-11-21T12:00:00Z", &[]),
                    ("2026-11-21T06:00:00Z", &[]),
                    ("2026-11-20T18:00:00Z", &["daily-2 (2026-11-20)"]),
                    ("2026-11-20T06:00:00Z", &[]),
                ],
            },
            Case {
                name: "one backup kept by several rules lists every reason",
                policy: Policy {
                    keep_latest: 2,
                    keep_hourly: 3,
                    keep_daily: 2,
                    keep_weekly: 1,
                    keep_monthly: 1,
                    keep_annual: 1,
                },
                want: &[
                    (
                        "2026-11-21T18:00:00Z",
                        &[
                            "latest-1",
                            "hourly-1 (2026-11-21T18)",
                            "daily-1 (2026-11-21)",
                            "weekly-1 (2026-W47)",
                            "monthly-1 (2026-11)",
                            "annual-1 (2026)",
                        ],
                    ),
                    (
                        "2026-11-21T17:30:00Z",
                        &["latest-2", "hourly-2 (2026-11-21T17)"],
                    ),
                    ("2026-11-21T17:10:00Z", &[]),
                    ("2026-11-21T16:00:00Z", &["hourly-3 (2026-11-21T16)"]),
                    ("2026-11-20T18:00:00Z", &["daily-2 (2026-11-20)"]),
                    ("2026-11-19T18:00:00Z", &[]),
                ],
            },
            Case {
                name: "keepLatest only",
                policy: only_latest(2),
                want: &[
                    ("2026-11-21T18:00:00Z", &["latest-1"]),
                    ("2026-11-20T18:00:00Z", &["latest-2"]),
                    ("2026-11-19T18:00:00Z", &[]),
                    ("2025-01-01T00:00:00Z", &[]),
                ],
            },
            Case {
                name: "0 disables a rule: keepDaily 0 next to keepLatest 1",
                policy: only_latest(1),
                want: &[
                    ("2026-11-21T18:00:00Z", &["latest-1"]),
                    ("2026-11-20T18:00:00Z", &[]),
                    ("2026-11-19T18:00:00Z", &[]),
                ],
            },
            Case {
                name: "every rule 0 keeps every backup",
                policy: Policy::ZERO,
                want: &[
                    ("2026-11-21T18:00:00Z", &["latest-1"]),
                    ("2026-11-20T18:00:00Z", &["latest-2"]),
                    ("2020-01-01T00:00:00Z", &["latest-3"]),
                ],
            },
            Case {
                name: "the newest backup is kept by a rule with count 1",
                policy: only_annual(1),
                want: &[
                    ("2026-11-21T18:00:00Z", &["annual-1 (2026)"]),
                    ("2026-01-01T00:00:00Z", &[]),
                ],
            },
            Case {
                // Kopia shares one id set between rules, so there the monthly id 2024-01
                // blocks the weekly id 2024-01 (ISO week 1) and January 3 gets no reason.
                name: "rules do not share buckets (Kopia's 2024-01 collision)",
                policy: Policy {
                    keep_weekly: 4,
                    keep_monthly: 24,
                    ..Policy::ZERO
                },
                want: &[
                    (
                        "2024-01-24T12:00:00Z",
                        &["weekly-1 (2024-W04)", "monthly-1 (2024-01)"],
                    ),
                    ("2024-01-17T12:00:00Z", &["weekly-2 (2024-W03)"]),
                    ("2024-01-10T12:00:00Z", &["weekly-3 (2024-W02)"]),
                    ("2024-01-03T12:00:00Z", &["weekly-4 (2024-W01)"]),
                ],
            },
        ],
        UtcOffset::UTC,
    );
}

/// The cases of Kopia's `TestRetentionPolicyTest` (complete snapshots only), with our bucket
/// labels added: the same backups keep the same `<rule>-<k>` reasons.
#[test]
fn plan_kopia_cases_same_reasons() {
    check(
        &[
            Case {
                name: "kopia: keepLatest 3",
                policy: only_latest(3),
                want: &[
                    ("2020-01-01T12:00:00Z", &[]),
                    ("2020-01-01T12:01:00Z", &["latest-3"]),
                    ("2020-01-01T12:02:00Z", &["latest-2"]),
                    ("2020-01-01T12:03:00Z", &["latest-1"]),
                ],
            },
            Case {
                name: "kopia: keepDaily 3",
                policy: only_daily(3),
                want: &[
                    ("2020-01-01T12:00:00Z", &[]),
                    ("2020-01-01T15:00:00Z", &[]),
                    ("2020-01-02T12:00:00Z", &[]),
                    ("2020-01-02T15:00:00Z", &["daily-3 (2020-01-02)"]),
                    ("2020-01-03T12:00:00Z", &[]),
                    ("2020-01-03T15:00:00Z", &["daily-2 (2020-01-03)"]),
                    ("2020-01-04T12:00:00Z", &[]),
                    ("2020-01-04T15:00:00Z", &["daily-1 (2020-01-04)"]),
                ],
            },
            Case {
                name: "kopia: keepMonthly 3",
                policy: only_monthly(3),
                want: &[
                    ("2020-01-01T12:00:00Z", &[]),
                    ("2020-01-01T15:00:00Z", &[]),
                    ("2020-02-01T12:00:00Z", &[]),
                    ("2020-02-02T15:00:00Z", &["monthly-3 (2020-02)"]),
                    ("2020-03-01T12:00:00Z", &[]),
                    ("2020-03-02T15:00:00Z", &["monthly-2 (2020-03)"]),
                    ("2020-04-01T12:00:00Z", &[]),
                    ("2020-04-02T15:00:00Z", &["monthly-1 (2020-04)"]),
                ],
            },
            Case {
                name: "kopia: keepMonthly 3 without February does not reach back to January",
                policy: only_monthly(3),
                want: &[
                    ("2020-01-01T12:00:00Z", &[]),
                    ("2020-01-01T15:00:00Z", &[]),
                    ("2020-03-02T15:00:00Z", &["monthly-2 (2020-03)"]),
                    ("2020-04-01T12:00:00Z", &[]),
                    ("2020-04-02T15:00:00Z", &["monthly-1 (2020-04)"]),
                ],
            },
            Case {
                name: "kopia: latest 3, hourly 7, daily 5, monthly 2",
                policy: Policy {
                    keep_latest: 3,
                    keep_hourly: 7,
                    keep_daily: 5,
                    keep_monthly: 2,
                    ..Policy::ZERO
                },
                want: &[
                    ("2020-01-01T12:00:00Z", &[]),
                    ("2020-01-01T13:00:00Z", &[]),
                    ("2020-01-01T14:00:00Z", &[]),
                    ("2020-01-01T15:00:00Z", &[]),
                    ("2020-01-02T12:00:00Z", &[]),
                    ("2020-01-02T13:00:00Z", &[]),
                    ("2020-01-02T15:00:00Z", &[]),
                    ("2020-02-01T12:00:00Z", &[]),
                    ("2020-02-01T13:00:00Z", &[]),
                    ("2020-02-01T14:00:00Z", &[]),
                    ("2020-02-01T15:00:00Z", &[]),
                    ("2020-02-02T12:00:00Z", &[]),
                    ("2020-02-02T13:00:00Z", &[]),
                    ("2020-02-02T15:00:00Z", &[]),
                    ("2020-03-01T12:00:00Z", &[]),
                    ("2020-03-01T13:00:00Z", &[]),
                    ("2020-03-01T14:00:00Z", &[]),
                    ("2020-03-01T15:00:00Z", &[]),
                    ("2020-03-02T12:00:00Z", &[]),
                    ("2020-03-02T13:00:00Z", &[]),
                    ("2020-03-02T15:00:00Z", &["monthly-2 (2020-03)"]),
                    ("2020-04-01T12:00:00Z", &[]),
                    ("2020-04-01T13:00:00Z", &[]),
                    ("2020-04-01T14:00:00Z", &[]),
                    ("2020-04-01T15:00:00Z", &["daily-2 (2020-04-01)"]),
                    (
                        "2020-04-02T12:00:00Z",
                        &["latest-3", "hourly-3 (2020-04-02T12)"],
                    ),
                    (
                        "2020-04-02T13:00:00Z",
                        &["latest-2", "hourly-2 (2020-04-02T13)"],
                    ),
                    (
                        "2020-04-02T15:00:00Z",
                        &[
                            "latest-1",
                            "hourly-1 (2020-04-02T15)",
                            "daily-1 (2020-04-02)",
                            "monthly-1 (2020-04)",
                        ],
                    ),
                ],
            },
            Case {
                name: "kopia: keepWeekly 3",
                policy: only_weekly(3),
                want: &[
                    ("2020-01-01T12:00:00Z", &[]),
                    ("2020-01-01T15:00:00Z", &["weekly-3 (2020-W01)"]),
                    ("2020-01-08T12:00:00Z", &[]),
                    ("2020-01-09T12:00:00Z", &["weekly-2 (2020-W02)"]),
                    ("2020-01-15T12:00:00Z", &["weekly-1 (2020-W03)"]),
                ],
            },
        ],
        UtcOffset::UTC,
    );
}

#[test]
fn plan_in_fixed_offset_moves_backups_between_days() {
    let backups = ["2026-11-21T21:00:00Z", "2026-11-21T23:30:00Z"];
    let policy = only_daily(2);
    let cases: [(UtcOffset, Rows); 3] = [
        (
            UtcOffset::UTC,
            &[
                ("2026-11-21T23:30:00Z", &["daily-1 (2026-11-21)"]),
                ("2026-11-21T21:00:00Z", &[]),
            ],
        ),
        // 01:30 on the 22nd and 23:00 on the 21st.
        (
            offset!(+2),
            &[
                ("2026-11-21T23:30:00Z", &["daily-1 (2026-11-22)"]),
                ("2026-11-21T21:00:00Z", &["daily-2 (2026-11-21)"]),
            ],
        ),
        // 19:30 and 17:00 on the 21st.
        (
            offset!(-4),
            &[
                ("2026-11-21T23:30:00Z", &["daily-1 (2026-11-21)"]),
                ("2026-11-21T21:00:00Z", &[]),
            ],
        ),
    ];
    for (offset, want) in cases {
        let got = reasons(&plan_in(&policy, &candidates(&backups), offset));
        assert_eq!(got, expected(want), "offset {offset}");
    }
}

#[test]
fn plan_in_fixed_offset_moves_weeks_months_and_windows() {
    // Sunday 2026-11-22 23:30 UTC is Monday 01:30 at +02:00; 2026-12-31 23:30 UTC is
    // January 1, 2027 at +02:00.
    check(
        &[
            Case {
                name: "+02:00: Sunday night UTC is Monday, week 48",
                policy: only_weekly(2),
                want: &[
                    ("2026-11-22T23:30:00Z", &["weekly-1 (2026-W48)"]),
                    ("2026-11-22T12:00:00Z", &["weekly-2 (2026-W47)"]),
                ],
            },
            Case {
                name: "+02:00: New Year's Eve 23:30 UTC is in 2027",
                policy: Policy {
                    keep_monthly: 2,
                    keep_annual: 2,
                    ..Policy::ZERO
                },
                want: &[
                    (
                        "2026-12-31T23:30:00Z",
                        &["monthly-1 (2027-01)", "annual-1 (2027)"],
                    ),
                    (
                        "2026-12-31T12:00:00Z",
                        &["monthly-2 (2026-12)", "annual-2 (2026)"],
                    ),
                ],
            },
        ],
        offset!(+2),
    );
}

#[test]
fn plan_candidate_offset_does_not_change_the_plan() {
    let policy = Policy::default();
    let utc = candidates(&[
        "2026-11-21T23:30:00Z",
        "2026-11-21T21:00:00Z",
        "2026-11-20T23:59:59Z",
    ]);
    let shifted: Vec<Candidate> = utc
        .iter()
        .map(|c| Candidate {
            id: c.id.clone(),
            time: c.time.to_offset(offset!(+05:30)),
        })
        .collect();
    assert_eq!(
        reasons(&plan(&policy, &utc)),
        reasons(&plan(&policy, &shifted))
    );
}

#[test]
fn plan_same_time_orders_by_id_descending() {
    let time = datetime!(2026-11-21 10:00 UTC);
    let backups: Vec<Candidate> = ["a", "c", "b"]
        .iter()
        .map(|id| Candidate {
            id: (*id).to_owned(),
            time,
        })
        .collect();
    let cases: [(Policy, Rows); 2] = [
        (
            only_latest(1),
            &[("c", &["latest-1"]), ("b", &[]), ("a", &[])],
        ),
        (
            only_daily(1),
            &[("c", &["daily-1 (2026-11-21)"]), ("b", &[]), ("a", &[])],
        ),
    ];
    for (policy, want) in cases {
        let decisions = plan(&policy, &backups);
        let order: Vec<&str> = decisions.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(order, ["c", "b", "a"]);
        assert_eq!(reasons(&decisions), expected(want), "{policy:?}");
    }
}

#[test]
fn plan_unsorted_input_one_decision_each_newest_first() {
    let backups = candidates(&[
        "2026-11-19T00:00:00Z",
        "2026-11-21T00:00:00Z",
        "2026-11-20T00:00:00Z",
    ]);
    let decisions = plan(&only_latest(1), &backups);
    let order: Vec<&str> = decisions.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        order,
        [
            "2026-11-21T00:00:00Z",
            "2026-11-20T00:00:00Z",
            "2026-11-19T00:00:00Z"
        ]
    );
    assert_eq!(
        decisions.iter().map(|d| d.keep).collect::<Vec<_>>(),
        [true, false, false]
    );
    assert!(plan(&Policy::default(), &[]).is_empty());
}

/// Daily backups at midnight UTC from 2024-01-01 to Saturday 2026-11-21, under the defaults
/// (latest 10, hourly 48, daily 7, weekly 4, monthly 24, annual 1).
#[test]
fn plan_defaults_daily_backups_keep_expected_set() {
    let first = datetime!(2024-01-01 00:00 UTC);
    let last = datetime!(2026-11-21 00:00 UTC);
    let mut backups = Vec::new();
    let mut time = first;
    while time <= last {
        backups.push(Candidate {
            id: time.format(&Rfc3339).unwrap(),
            time,
        });
        time += Duration::days(1);
    }
    let decisions = plan(&Policy::default(), &backups);
    assert_eq!(decisions.len(), backups.len());
    let got = reasons(&decisions);

    let mut per_rule: HashMap<Rule, usize> = HashMap::new();
    for decision in &decisions {
        for reason in &decision.reasons {
            *per_rule.entry(reason.rule).or_default() += 1;
        }
    }
    let want_per_rule = [
        (Rule::Latest, 10),
        // Hourly: the window is 48 hours, which holds 3 midnight backups.
        (Rule::Hourly, 3),
        (Rule::Daily, 7),
        (Rule::Weekly, 4),
        (Rule::Monthly, 24),
        (Rule::Annual, 1),
    ];
    for (rule, count) in want_per_rule {
        assert_eq!(per_rule.get(&rule).copied().unwrap_or(0), count, "{rule}");
    }
    // Latest keeps November 12 to 21; weekly adds November 1 and 8; monthly adds the last
    // day of each month from December 2024 to October 2026.
    let kept = decisions.iter().filter(|d| d.keep).count();
    assert_eq!(kept, 10 + 2 + 23);

    let rows: [(&str, &[&str]); 8] = [
        (
            "2026-11-21T00:00:00Z",
            &[
                "latest-1",
                "hourly-1 (2026-11-21T00)",
                "daily-1 (2026-11-21)",
                "weekly-1 (2026-W47)",
                "monthly-1 (2026-11)",
                "annual-1 (2026)",
            ],
        ),
        (
            "2026-11-19T00:00:00Z",
            &[
                "latest-3",
                "hourly-3 (2026-11-19T00)",
                "daily-3 (2026-11-19)",
            ],
        ),
        (
            "2026-11-15T00:00:00Z",
            &["latest-7", "daily-7 (2026-11-15)", "weekly-2 (2026-W46)"],
        ),
        ("2026-11-14T00:00:00Z", &["latest-8"]),
        ("2026-11-01T00:00:00Z", &["weekly-4 (2026-W44)"]),
        ("2026-10-31T00:00:00Z", &["monthly-2 (2026-10)"]),
        ("2024-12-31T00:00:00Z", &["monthly-24 (2024-12)"]),
        ("2024-11-30T00:00:00Z", &[]),
    ];
    for (id, want) in rows {
        assert_eq!(got[id], want.to_vec(), "{id}");
    }
}

/// A bucket label computed independently of the crate, with `time`'s format descriptions.
fn label(rule: Rule, time: OffsetDateTime, offset: UtcOffset) -> Option<String> {
    let local = time.to_offset(offset);
    let format = match rule {
        Rule::Latest => return None,
        Rule::Hourly => format_description!("[year]-[month]-[day]T[hour]"),
        Rule::Daily => format_description!("[year]-[month]-[day]"),
        Rule::Weekly => format_description!("[year base:iso_week]-W[week_number repr:iso]"),
        Rule::Monthly => format_description!("[year]-[month]"),
        Rule::Annual => format_description!("[year]"),
    };
    Some(local.format(&format).unwrap())
}

fn label_is(rule: Rule, time: OffsetDateTime, offset: UtcOffset, want: &str) -> bool {
    label(rule, time, offset).as_deref() == Some(want)
}

/// Invariants over pseudo-random backups and policies.
#[test]
fn plan_random_inputs_hold_invariants() {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    let base = datetime!(2026-11-21 10:00 UTC);
    for round in 0..300 {
        let count = next(60);
        let spread = [3_600, 86_400, 604_800, 40 * 86_400][usize::try_from(next(4)).unwrap()];
        let backups: Vec<Candidate> = (0..count)
            .map(|i| Candidate {
                id: format!("b{i}"),
                time: base - Duration::seconds(i64::try_from(next(spread * 30)).unwrap()),
            })
            .collect();
        let mut counts = [0_u32; 6];
        for c in &mut counts {
            *c = if next(3) == 0 {
                0
            } else {
                u32::try_from(next(30)).unwrap()
            };
        }
        let policy = Policy {
            keep_latest: counts[0],
            keep_hourly: counts[1],
            keep_daily: counts[2],
            keep_weekly: counts[3],
            keep_monthly: counts[4],
            keep_annual: counts[5],
        };
        let offset =
            [UtcOffset::UTC, offset!(+2), offset!(-9:30)][usize::try_from(next(3)).unwrap()];
        let decisions = plan_in(&policy, &backups, offset);
        let context = format!("round {round}, {policy:?}, {offset}");

        assert_eq!(decisions.len(), backups.len(), "{context}");
        for pair in decisions.windows(2) {
            assert!(
                (pair[0].time, &pair[0].id) > (pair[1].time, &pair[1].id),
                "{context}: not newest first"
            );
        }
        if let Some(newest) = decisions.first() {
            assert!(newest.keep, "{context}: newest expired");
        }
        if policy.is_all_zero() {
            assert!(
                decisions.iter().all(|d| d.keep),
                "{context}: all-zero expired"
            );
            continue;
        }
        for rule in Rule::ALL {
            let mut ranks = Vec::new();
            let mut buckets = Vec::new();
            for (index, decision) in decisions.iter().enumerate() {
                for reason in decision.reasons.iter().filter(|r| r.rule == rule) {
                    ranks.push(reason.rank);
                    buckets.push(reason.bucket.clone());
                    match label(rule, decision.time, offset) {
                        None => assert_eq!(reason.bucket, format!("#{}", index + 1), "{context}"),
                        Some(label) => {
                            assert_eq!(reason.bucket, label, "{context}: {rule} label");
                            // The winner of a bucket is its newest backup.
                            let newer_in_bucket = decisions[..index]
                                .iter()
                                .any(|d| label_is(rule, d.time, offset, &label));
                            assert!(!newer_in_bucket, "{context}: {rule} {label} not newest");
                        }
                    }
                }
            }
            let want_ranks: Vec<usize> = (1..=ranks.len()).collect();
            assert_eq!(ranks, want_ranks, "{context}: {rule} ranks");
            assert!(
                ranks.len() <= usize::try_from(policy.count(rule)).unwrap(),
                "{context}: {rule} keeps too many"
            );
            let mut unique = buckets.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(
                unique.len(),
                buckets.len(),
                "{context}: {rule} bucket twice"
            );
        }
    }
}
