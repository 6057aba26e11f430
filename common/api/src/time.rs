//! Time helpers without a date-time dependency: Unix seconds to and from
//! `SystemTime` (JWT NumericDates), and RFC 3339 in UTC: rendered for
//! error messages and listings, read back for command lines.

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

/// Reads what [`format_unix_seconds`] writes (`2025-01-31T12:00:00Z`), or
/// a date alone (`2025-01-31`: its first second, UTC), as Unix seconds;
/// `None` for anything else, including dates that do not exist and times
/// before 1970.
pub fn parse_rfc3339_utc(text: &str) -> Option<u64> {
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_owned()
    };
    let bytes = full.as_bytes();
    let separators = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'Z'),
    ];
    if bytes.len() != 20 || separators.iter().any(|&(at, byte)| bytes[at] != byte) {
        return None;
    }
    let number = |from: usize, to: usize| -> Option<u64> {
        let digits = &full[from..to];
        digits
            .bytes()
            .all(|byte| byte.is_ascii_digit())
            .then(|| digits.parse().ok())
            .flatten()
    };
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    if year < 1970 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    // Rendering it back rejects 25:00, 02-30 and their like.
    (format_unix_seconds(seconds) == full).then_some(seconds)
}

/// Days from 1970-01-01 to a proleptic Gregorian date of 1970 or later:
/// [`civil_from_days`] backwards.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let march_month = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * march_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
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
    fn parses_what_it_formats_and_nothing_else() {
        for seconds in [
            0,
            951_782_400,
            1_735_689_599,
            4_102_444_800,
            MAX_UNIX_SECONDS,
        ] {
            assert_eq!(
                parse_rfc3339_utc(&format_unix_seconds(seconds)),
                Some(seconds)
            );
        }
        assert_eq!(parse_rfc3339_utc("2000-02-29"), Some(951_782_400));
        for bad in [
            "2023-02-29",
            "2024-12-31T24:00:00Z",
            "2024-13-01",
            "1969-12-31T23:59:59Z",
            "2024-12-31T23:59:59",
            "2024-12-31 23:59:59Z",
            "+024-12-31",
            "yesterday",
            "",
        ] {
            assert_eq!(parse_rfc3339_utc(bad), None, "{bad}");
        }
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
