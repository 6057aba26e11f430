//! Human-readable durations such as `3 months`, `30d`, `12h` or `1y 6mo`,
//! used for token validity and cache retention periods.
//!
//! Calendar units are fixed lengths, because a token's lifetime or a
//! retention period must not depend on the date it starts from: a month is
//! 30 days and a year is 365 days. A duration is a sequence of
//! `<whole number><unit>` parts, with optional whitespace anywhere between
//! tokens, and the parts add up (`1h 30min`). Units are case-insensitive:
//!
//! | unit    | spellings                            |
//! |---------|--------------------------------------|
//! | seconds | `s`, `sec`, `secs`, `second`, `seconds` |
//! | minutes | `min`, `mins`, `minute`, `minutes`   |
//! | hours   | `h`, `hr`, `hrs`, `hour`, `hours`    |
//! | days    | `d`, `day`, `days`                   |
//! | weeks   | `w`, `wk`, `wks`, `week`, `weeks`    |
//! | months  | `mo`, `month`, `months`              |
//! | years   | `y`, `yr`, `yrs`, `year`, `years`    |
//!
//! A bare `m` is refused rather than guessed: in a token validity "3m"
//! could mean minutes or months, and either guess would surprise someone.
//!
//! This grammar is our own rather than `humantime`'s by choice: that crate
//! reads `m` as minutes (and `M` as months) and makes a month 30.44 days
//! and a year 365.25, where a retention period here counts whole days.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const SECONDS_PER_MINUTE: u64 = 60;
pub const SECONDS_PER_HOUR: u64 = 60 * SECONDS_PER_MINUTE;
pub const SECONDS_PER_DAY: u64 = 24 * SECONDS_PER_HOUR;
pub const SECONDS_PER_WEEK: u64 = 7 * SECONDS_PER_DAY;
/// A month is 30 days, whatever the calendar says.
pub const SECONDS_PER_MONTH: u64 = 30 * SECONDS_PER_DAY;
/// A year is 365 days, whatever the calendar says.
pub const SECONDS_PER_YEAR: u64 = 365 * SECONDS_PER_DAY;

/// Units from the largest down, with the singular and plural names used
/// when a duration is displayed.
const DISPLAY_UNITS: [(u64, &str, &str); 7] = [
    (SECONDS_PER_YEAR, "year", "years"),
    (SECONDS_PER_MONTH, "month", "months"),
    (SECONDS_PER_WEEK, "week", "weeks"),
    (SECONDS_PER_DAY, "day", "days"),
    (SECONDS_PER_HOUR, "hour", "hours"),
    (SECONDS_PER_MINUTE, "minute", "minutes"),
    (1, "second", "seconds"),
];

/// Why a string is not a duration. Each message quotes the input, so that
/// the error makes sense on its own in a config or CLI error report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("duration is empty: write e.g. \"30 days\" or \"12h\"")]
    Empty,
    #[error("invalid duration {input:?}: expected a whole number at {found:?}")]
    ExpectedNumber { input: String, found: String },
    #[error("invalid duration {input:?}: only whole numbers are accepted (write \"90min\" rather than \"1.5h\")")]
    NotWholeNumber { input: String },
    #[error("invalid duration {input:?}: {number} has no unit (write e.g. \"{number}d\" or \"{number} days\")")]
    MissingUnit { input: String, number: u64 },
    #[error("invalid duration {input:?}: unknown unit {unit:?} (use s, min, h, d, w, mo or y)")]
    UnknownUnit { input: String, unit: String },
    #[error("invalid duration {input:?}: unit {unit:?} is ambiguous (write \"min\" for minutes or \"mo\" for months)")]
    AmbiguousUnit { input: String, unit: String },
    #[error("invalid duration {input:?}: too long")]
    TooLong { input: String },
}

/// Parses a human-readable duration; see the module documentation for the
/// accepted forms. Zero (`0d`) is a valid duration: callers for which it
/// makes no sense (a token validity) refuse it themselves.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let mut rest = input.trim_start();
    if rest.trim_end().is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits_len == 0 {
            return Err(DurationError::ExpectedNumber {
                input: input.to_owned(),
                found: rest.chars().take(16).collect(),
            });
        }
        let (digits, after_number) = rest.split_at(digits_len);
        let too_long = || DurationError::TooLong {
            input: input.to_owned(),
        };
        // Only ASCII digits are in `digits`, so parsing fails only on overflow.
        let number: u64 = digits.parse().map_err(|_| too_long())?;
        if after_number.starts_with(['.', ',']) {
            return Err(DurationError::NotWholeNumber {
                input: input.to_owned(),
            });
        }

        let after_number = after_number.trim_start();
        let unit_len = after_number
            .bytes()
            .take_while(u8::is_ascii_alphabetic)
            .count();
        if unit_len == 0 {
            return Err(DurationError::MissingUnit {
                input: input.to_owned(),
                number,
            });
        }
        let (unit, after_unit) = after_number.split_at(unit_len);
        let unit_seconds = unit_seconds(unit).map_err(|ambiguous| {
            if ambiguous {
                DurationError::AmbiguousUnit {
                    input: input.to_owned(),
                    unit: unit.to_owned(),
                }
            } else {
                DurationError::UnknownUnit {
                    input: input.to_owned(),
                    unit: unit.to_owned(),
                }
            }
        })?;
        total = number
            .checked_mul(unit_seconds)
            .and_then(|seconds| total.checked_add(seconds))
            .ok_or_else(too_long)?;
        rest = after_unit.trim_start();
    }
    Ok(Duration::from_secs(total))
}

/// The length of a unit in seconds; `Err(true)` when the unit is ambiguous,
/// `Err(false)` when it is unknown.
fn unit_seconds(unit: &str) -> Result<u64, bool> {
    Ok(match unit.to_ascii_lowercase().as_str() {
        "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "min" | "mins" | "minute" | "minutes" => SECONDS_PER_MINUTE,
        "h" | "hr" | "hrs" | "hour" | "hours" => SECONDS_PER_HOUR,
        "d" | "day" | "days" => SECONDS_PER_DAY,
        "w" | "wk" | "wks" | "week" | "weeks" => SECONDS_PER_WEEK,
        "mo" | "month" | "months" => SECONDS_PER_MONTH,
        "y" | "yr" | "yrs" | "year" | "years" => SECONDS_PER_YEAR,
        "m" => return Err(true),
        _ => return Err(false),
    })
}

/// A whole number of seconds that reads and writes as a human-readable
/// duration, for configuration files and CLI flags: it parses with
/// [`parse_duration`], displays in the largest unit that divides it exactly
/// (`90 days` shows as `3 months`), and serialises as that string, so that a
/// display parses back to the same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HumanDuration(Duration);

impl HumanDuration {
    pub const fn from_secs(seconds: u64) -> Self {
        Self(Duration::from_secs(seconds))
    }

    pub const fn as_duration(self) -> Duration {
        self.0
    }

    pub const fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl From<HumanDuration> for Duration {
    fn from(duration: HumanDuration) -> Self {
        duration.0
    }
}

impl FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        parse_duration(input).map(Self)
    }
}

impl TryFrom<String> for HumanDuration {
    type Error = DurationError;

    fn try_from(input: String) -> Result<Self, Self::Error> {
        input.parse()
    }
}

impl From<HumanDuration> for String {
    fn from(duration: HumanDuration) -> Self {
        duration.to_string()
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.0.as_secs();
        if seconds == 0 {
            return f.write_str("0 seconds");
        }
        // The last unit is one second, which divides everything, so the
        // search always finds a unit. (`is_multiple_of` needs Rust 1.87,
        // above the workspace's rust-version.)
        #[allow(clippy::manual_is_multiple_of)]
        let (unit_seconds, singular, plural) = DISPLAY_UNITS
            .iter()
            .copied()
            .find(|(unit_seconds, _, _)| seconds % unit_seconds == 0)
            .unwrap_or(DISPLAY_UNITS[DISPLAY_UNITS.len() - 1]);
        let count = seconds / unit_seconds;
        write!(f, "{count} {}", if count == 1 { singular } else { plural })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(input: &str) -> u64 {
        parse_duration(input)
            .unwrap_or_else(|e| panic!("{input:?} should parse: {e}"))
            .as_secs()
    }

    #[test]
    fn parses_the_forms_people_write() {
        assert_eq!(secs("3 months"), 3 * 30 * SECONDS_PER_DAY);
        assert_eq!(secs("30d"), 30 * SECONDS_PER_DAY);
        assert_eq!(secs("1y"), 365 * SECONDS_PER_DAY);
        assert_eq!(secs("12h"), 12 * SECONDS_PER_HOUR);
        assert_eq!(secs("90 days"), 90 * SECONDS_PER_DAY);
        assert_eq!(secs("2 weeks"), 14 * SECONDS_PER_DAY);
        assert_eq!(secs("1 day"), SECONDS_PER_DAY);
        assert_eq!(secs("45s"), 45);
        assert_eq!(secs("10min"), 600);
        assert_eq!(secs("1 year"), SECONDS_PER_YEAR);
        assert_eq!(secs("6mo"), 6 * SECONDS_PER_MONTH);
    }

    #[test]
    fn parts_add_up_and_whitespace_and_case_do_not_matter() {
        assert_eq!(secs("1h30min"), 90 * 60);
        assert_eq!(secs(" 1h  30 min "), 90 * 60);
        assert_eq!(secs("1y 6mo"), SECONDS_PER_YEAR + 6 * SECONDS_PER_MONTH);
        assert_eq!(secs("2 Weeks"), 14 * SECONDS_PER_DAY);
        assert_eq!(secs("1Y"), SECONDS_PER_YEAR);
        assert_eq!(secs("0d"), 0);
    }

    #[test]
    fn rejects_bad_input_with_a_precise_error() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert_eq!(parse_duration("   "), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("30"),
            Err(DurationError::MissingUnit { number: 30, .. })
        ));
        assert!(matches!(
            parse_duration("1d 30"),
            Err(DurationError::MissingUnit { number: 30, .. })
        ));
        assert!(matches!(
            parse_duration("days"),
            Err(DurationError::ExpectedNumber { .. })
        ));
        assert!(matches!(
            parse_duration("-3d"),
            Err(DurationError::ExpectedNumber { .. })
        ));
        assert!(matches!(
            parse_duration("1.5h"),
            Err(DurationError::NotWholeNumber { .. })
        ));
        assert!(matches!(
            parse_duration("3 fortnights"),
            Err(DurationError::UnknownUnit { unit, .. }) if unit == "fortnights"
        ));
        assert!(matches!(
            parse_duration("3m"),
            Err(DurationError::AmbiguousUnit { .. })
        ));
        assert!(matches!(
            parse_duration("3M"),
            Err(DurationError::AmbiguousUnit { .. })
        ));
        assert!(matches!(
            parse_duration("1d!"),
            Err(DurationError::ExpectedNumber { .. })
        ));
        assert!(matches!(
            parse_duration("99999999999999999999s"),
            Err(DurationError::TooLong { .. })
        ));
        assert!(matches!(
            parse_duration("999999999999999y"),
            Err(DurationError::TooLong { .. })
        ));
    }

    #[test]
    fn error_messages_quote_the_input() {
        let message = parse_duration("3 fortnights").unwrap_err().to_string();
        assert_eq!(
            message,
            "invalid duration \"3 fortnights\": unknown unit \"fortnights\" (use s, min, h, d, w, mo or y)"
        );
    }

    #[test]
    fn human_duration_displays_in_the_largest_exact_unit() {
        let display = |input: &str| {
            input
                .parse::<HumanDuration>()
                .expect("valid test duration")
                .to_string()
        };
        assert_eq!(display("90 days"), "3 months");
        assert_eq!(display("14d"), "2 weeks");
        assert_eq!(display("365d"), "1 year");
        assert_eq!(display("1h30min"), "90 minutes");
        assert_eq!(display("61s"), "61 seconds");
        assert_eq!(display("0s"), "0 seconds");
        assert_eq!(display("1 day"), "1 day");
    }

    #[test]
    fn human_duration_round_trips_through_serde() {
        let duration: HumanDuration =
            serde_json::from_str("\"30 days\"").expect("valid duration string");
        assert_eq!(duration.as_secs(), 30 * SECONDS_PER_DAY);
        assert_eq!(
            serde_json::to_string(&duration).expect("serialises"),
            "\"1 month\""
        );
        assert!(serde_json::from_str::<HumanDuration>("\"soon\"").is_err());
        assert!(serde_json::from_str::<HumanDuration>("30").is_err());
    }
}
