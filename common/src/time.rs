//! Time helpers without a date-time dependency: Unix seconds to and from
//! `SystemTime` (JWT NumericDates), and an RFC 3339 rendering for error
//! messages and listings.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Whole seconds since the Unix epoch; a time before the epoch counts as 0,
/// which only makes a token look older (so more likely to be refused).
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since_epoch| since_epoch.as_secs())
}

/// The last second of the year 9999: tokens are never minted to expire
/// later, and every platform's `SystemTime` can represent it.
pub const MAX_UNIX_SECONDS: u64 = 253_402_300_799;

/// The `SystemTime` of a NumericDate; values past [`MAX_UNIX_SECONDS`]
/// (which only a hand-made token can carry) saturate there.
pub fn system_time(unix_seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_seconds.min(MAX_UNIX_SECONDS))
}

/// Renders a time as RFC 3339 in UTC, to the second.
pub fn format_rfc3339(time: SystemTime) -> String {
    format_unix_seconds(unix_seconds(time))
}

/// Renders a NumericDate as RFC 3339 in UTC, e.g. `2025-01-31T12:00:00Z`.
pub fn format_unix_seconds(unix_seconds: u64) -> String {
    let days = unix_seconds / 86_400;
    let second_of_day = unix_seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01. Works in 400-year
/// eras (146 097 days each), counting years from March so that the leap
/// day falls at the end of a year.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the origin to 0000-03-01, the start of an era.
    let days = days + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months counted from March: 0 is March, 11 is February.
    let march_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_dates() {
        assert_eq!(format_unix_seconds(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix_seconds(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_unix_seconds(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(format_unix_seconds(4_102_444_800), "2100-01-01T00:00:00Z");
        assert_eq!(
            format_unix_seconds(MAX_UNIX_SECONDS),
            "9999-12-31T23:59:59Z"
        );
    }

    #[test]
    fn converts_both_ways() {
        let time = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(unix_seconds(time), 1_700_000_000);
        assert_eq!(system_time(1_700_000_000), time);
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(5)), 0);
        assert_eq!(unix_seconds(system_time(u64::MAX)), MAX_UNIX_SECONDS);
    }
}
