//! Calendar arithmetic for the time-bucket rules: bucket labels and the start of each rule's
//! window, at one fixed UTC offset.

use time::{Date, Duration, Month, OffsetDateTime, UtcOffset};

/// The period a time-bucket rule groups backups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Period {
    Hour,
    Day,
    IsoWeek,
    Month,
    Year,
}

impl Period {
    /// The label of the bucket holding `local` (a time already at the bucketing offset):
    /// `2026-11-21T10`, `2026-11-21`, `2026-W47`, `2026-11` or `2026`.
    pub(crate) fn label(self, local: OffsetDateTime) -> String {
        let (year, month, day) = (local.year(), u8::from(local.month()), local.day());
        match self {
            Period::Hour => format!("{year:04}-{month:02}-{day:02}T{:02}", local.hour()),
            Period::Day => format!("{year:04}-{month:02}-{day:02}"),
            Period::IsoWeek => {
                let (iso_year, week, _) = local.to_iso_week_date();
                format!("{iso_year:04}-W{week:02}")
            }
            Period::Month => format!("{year:04}-{month:02}"),
            Period::Year => format!("{year:04}"),
        }
    }

    /// The start of the window of `count` periods that ends at `reference` (a time at the
    /// bucketing offset): `count` hours, `count` × 24 hours, `count` × 7 days, `count` calendar
    /// months or `count` calendar years earlier. A day of the month that the earlier month lacks
    /// is clamped to that month's last day (March 31 minus one month is February 28 or 29).
    ///
    /// `None` when the start would fall outside the range `time` supports: the window then
    /// holds every backup.
    pub(crate) fn window_start(
        self,
        count: u32,
        reference: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        let count = i64::from(count);
        match self {
            Period::Hour => reference.checked_sub(Duration::hours(count)),
            Period::Day => reference.checked_sub(Duration::days(count)),
            Period::IsoWeek => reference.checked_sub(Duration::weeks(count)),
            Period::Month => months_before(reference, count),
            Period::Year => months_before(reference, count.checked_mul(12)?),
        }
    }
}

/// `time` as seen at `offset`; `time` itself in the impossible-in-practice case where the
/// conversion leaves the range `time` supports (years beyond ±9999).
pub(crate) fn at_offset(time: OffsetDateTime, offset: UtcOffset) -> OffsetDateTime {
    time.checked_to_offset(offset).unwrap_or(time)
}

/// The same wall-clock time `months` calendar months before `reference`, in its offset, with the
/// day clamped to the length of the earlier month.
fn months_before(reference: OffsetDateTime, months: i64) -> Option<OffsetDateTime> {
    let index = i64::from(reference.year()) * 12 + i64::from(u8::from(reference.month())) - 1;
    let index = index.checked_sub(months)?;
    let year = i32::try_from(index.div_euclid(12)).ok()?;
    let month = Month::try_from(u8::try_from(index.rem_euclid(12) + 1).ok()?).ok()?;
    let day = reference.day().min(month.length(year));
    let date = Date::from_calendar_date(year, month, day).ok()?;
    let start = reference.replace_date(date);
    // The local date is valid, but its UTC equivalent may not be: reject it like `checked_sub`.
    start.checked_to_offset(UtcOffset::UTC).map(|_| start)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use time::macros::{datetime, offset};

    use super::*;

    #[test]
    fn label_each_period_formats_the_bucket() {
        let cases = [
            (
                Period::Hour,
                datetime!(2026-11-21 10:59:59 UTC),
                "2026-11-21T10",
            ),
            (
                Period::Hour,
                datetime!(2026-11-21 00:00:00 UTC),
                "2026-11-21T00",
            ),
            (
                Period::Day,
                datetime!(2026-11-21 23:59:59 UTC),
                "2026-11-21",
            ),
            (Period::IsoWeek, datetime!(2026-11-21 12:00 UTC), "2026-W47"),
            // Monday December 29, 2025 starts ISO week 1 of 2026.
            (Period::IsoWeek, datetime!(2025-12-29 00:00 UTC), "2026-W01"),
            (
                Period::IsoWeek,
                datetime!(2025-12-28 23:59:59 UTC),
                "2025-W52",
            ),
            // 2026 starts on a Thursday, so it has 53 ISO weeks; January 1 to 3, 2027 belong
            // to its week 53.
            (Period::IsoWeek, datetime!(2026-12-28 00:00 UTC), "2026-W53"),
            (
                Period::IsoWeek,
                datetime!(2027-01-03 23:59:59 UTC),
                "2026-W53",
            ),
            (Period::IsoWeek, datetime!(2027-01-04 00:00 UTC), "2027-W01"),
            (Period::Month, datetime!(2028-02-29 12:00 UTC), "2028-02"),
            (Period::Year, datetime!(2027-01-01 00:00 UTC), "2027"),
            // The label is taken in the time's own offset; callers convert first.
            (
                Period::Day,
                datetime!(2026-11-22 01:30 +02:00),
                "2026-11-22",
            ),
        ];
        for (period, time, want) in cases {
            assert_eq!(period.label(time), want, "{period:?} of {time}");
        }
    }

    #[test]
    fn window_start_each_period_counts_back_from_reference() {
        let cases = [
            (
                Period::Hour,
                48,
                datetime!(2026-11-21 10:30 UTC),
                datetime!(2026-11-19 10:30 UTC),
            ),
            (
                Period::Day,
                7,
                datetime!(2026-03-01 10:30 UTC),
                datetime!(2026-02-22 10:30 UTC),
            ),
            (
                Period::IsoWeek,
                4,
                datetime!(2027-01-03 10:30 UTC),
                datetime!(2026-12-06 10:30 UTC),
            ),
            (
                Period::Month,
                3,
                datetime!(2026-03-15 10:30 UTC),
                datetime!(2025-12-15 10:30 UTC),
            ),
            // Clamped to the end of the shorter month (Go's AddDate would give March 2).
            (
                Period::Month,
                3,
                datetime!(2028-05-31 10:30 UTC),
                datetime!(2028-02-29 10:30 UTC),
            ),
            (
                Period::Month,
                1,
                datetime!(2027-03-31 10:30 UTC),
                datetime!(2027-02-28 10:30 UTC),
            ),
            (
                Period::Year,
                2,
                datetime!(2028-02-29 12:00 UTC),
                datetime!(2026-02-28 12:00 UTC),
            ),
            (
                Period::Year,
                1,
                datetime!(2026-06-01 00:00 +02:00),
                datetime!(2025-06-01 00:00 +02:00),
            ),
            (
                Period::Month,
                0,
                datetime!(2026-06-01 00:00 UTC),
                datetime!(2026-06-01 00:00 UTC),
            ),
        ];
        for (period, count, reference, want) in cases {
            assert_eq!(
                period.window_start(count, reference),
                Some(want),
                "{period:?} × {count} before {reference}"
            );
        }
    }

    #[test]
    fn window_start_beyond_supported_range_is_none() {
        let reference = datetime!(2026-01-01 00:00 UTC);
        for period in [
            Period::Hour,
            Period::Day,
            Period::IsoWeek,
            Period::Month,
            Period::Year,
        ] {
            assert_eq!(period.window_start(u32::MAX, reference), None, "{period:?}");
        }
    }

    #[test]
    fn at_offset_converts_and_keeps_out_of_range_times() {
        let time = datetime!(2026-11-21 23:30 UTC);
        assert_eq!(at_offset(time, offset!(+2)), datetime!(2026-11-22 01:30 +2));
        let edge = datetime!(9999-12-31 23:30 UTC);
        assert_eq!(at_offset(edge, offset!(+2)), edge);
    }
}
