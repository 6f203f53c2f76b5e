#![allow(clippy::unwrap_used)]
//! `Policy` defaults and merging, `PolicyOverrides` from the CRD's JSON, and the JSON and
//! display forms of a plan.

use klio_retention::{Candidate, Policy, PolicyOverrides, Reason, Rule, plan};
use time::macros::datetime;

#[test]
fn policy_default_is_klio_documented_values() {
    assert_eq!(
        Policy::default(),
        Policy {
            keep_latest: 10,
            keep_hourly: 48,
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 24,
            keep_annual: 1,
        }
    );
    assert!(!Policy::default().is_all_zero());
    assert!(Policy::ZERO.is_all_zero());
}

#[test]
fn policy_merged_overrides_replace_only_set_fields() {
    let defaults = Policy::default();
    let cases = [
        (PolicyOverrides::default(), defaults),
        (
            PolicyOverrides {
                keep_latest: Some(5),
                keep_daily: Some(0),
                ..PolicyOverrides::default()
            },
            Policy {
                keep_latest: 5,
                keep_daily: 0,
                ..defaults
            },
        ),
        (
            PolicyOverrides {
                keep_latest: Some(1),
                keep_hourly: Some(2),
                keep_daily: Some(3),
                keep_weekly: Some(4),
                keep_monthly: Some(5),
                keep_annual: Some(6),
            },
            Policy {
                keep_latest: 1,
                keep_hourly: 2,
                keep_daily: 3,
                keep_weekly: 4,
                keep_monthly: 5,
                keep_annual: 6,
            },
        ),
    ];
    for (overrides, want) in cases {
        assert_eq!(Policy::merged(&overrides), want, "{overrides:?}");
    }
}

#[test]
fn policy_overrides_from_crd_json_parse_or_reject() {
    let defaults = Policy::default();
    let cases = [
        (
            r#"{"keepLatest":2,"keepDaily":0}"#,
            Policy {
                keep_latest: 2,
                keep_daily: 0,
                ..defaults
            },
        ),
        ("{}", defaults),
        (r#"{"keepAnnual":null}"#, defaults),
        // The Tier 1 example of the plugin documentation.
        (
            r#"{"keepLatest":5,"keepHourly":12,"keepDaily":7,"keepWeekly":4,"keepMonthly":6,"keepAnnual":2}"#,
            Policy {
                keep_latest: 5,
                keep_hourly: 12,
                keep_daily: 7,
                keep_weekly: 4,
                keep_monthly: 6,
                keep_annual: 2,
            },
        ),
    ];
    for (json, want) in cases {
        let overrides: PolicyOverrides = serde_json::from_str(json).unwrap();
        assert_eq!(Policy::merged(&overrides), want, "{json}");
    }
    let parsed: PolicyOverrides =
        serde_json::from_str(r#"{"keepLatest":2,"keepDaily":0}"#).unwrap();
    assert_eq!(
        parsed,
        PolicyOverrides {
            keep_latest: Some(2),
            keep_daily: Some(0),
            ..PolicyOverrides::default()
        }
    );

    for bad in [
        r#"{"keepDayly":3}"#,
        r#"{"keep_daily":3}"#,
        r#"{"keepDaily":-1}"#,
        r#"{"keepDaily":"7"}"#,
        r#"{"keepDaily":4294967296}"#,
    ] {
        assert!(
            serde_json::from_str::<PolicyOverrides>(bad).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn policy_overrides_serialize_only_set_fields() {
    let overrides = PolicyOverrides {
        keep_latest: Some(2),
        keep_daily: Some(0),
        ..PolicyOverrides::default()
    };
    assert_eq!(
        serde_json::to_string(&overrides).unwrap(),
        r#"{"keepLatest":2,"keepDaily":0}"#
    );
}

#[test]
fn decision_json_has_rfc3339_time_and_reasons() {
    let backups = [
        Candidate {
            id: "b2".to_owned(),
            time: datetime!(2026-11-21 10:00 UTC),
        },
        Candidate {
            id: "b1".to_owned(),
            time: datetime!(2026-11-21 09:30 +01:00),
        },
    ];
    let policy = Policy {
        keep_latest: 1,
        keep_daily: 1,
        ..Policy::ZERO
    };
    let json = serde_json::to_string(&plan(&policy, &backups)).unwrap();
    assert_eq!(
        json,
        concat!(
            r#"[{"id":"b2","time":"2026-11-21T10:00:00Z","keep":true,"reasons":["#,
            r##"{"rule":"latest","rank":1,"bucket":"#1"},"##,
            r#"{"rule":"daily","rank":1,"bucket":"2026-11-21"}]},"#,
            r#"{"id":"b1","time":"2026-11-21T09:30:00+01:00","keep":false,"reasons":[]}]"#
        )
    );
}

#[test]
fn reason_and_rule_display_kopia_style() {
    let cases = [
        (Rule::Latest, 3, "#3", "latest-3"),
        (Rule::Hourly, 1, "2026-11-21T10", "hourly-1 (2026-11-21T10)"),
        (Rule::Daily, 2, "2026-11-21", "daily-2 (2026-11-21)"),
        (Rule::Weekly, 4, "2026-W47", "weekly-4 (2026-W47)"),
        (Rule::Monthly, 24, "2024-12", "monthly-24 (2024-12)"),
        (Rule::Annual, 1, "2026", "annual-1 (2026)"),
    ];
    for (rule, rank, bucket, want) in cases {
        let reason = Reason {
            rule,
            rank,
            bucket: bucket.to_owned(),
        };
        assert_eq!(reason.to_string(), want);
    }
    let names: Vec<String> = Rule::ALL.iter().map(ToString::to_string).collect();
    assert_eq!(
        names,
        ["latest", "hourly", "daily", "weekly", "monthly", "annual"]
    );
}
