//! Human-readable byte sizes such as `50 GiB`, `500MB` or `1.5 TiB`, for
//! storage quotas and free-space reserves in the config, the API and the
//! CLI.
//!
//! Units say which base they use, as the standards write them, and are
//! case-insensitive: `KiB`, `MiB`, `GiB`, `TiB`, `PiB` are binary (1024,
//! 1024², …); `KB`, `MB`, `GB`, `TB`, `PB` are decimal (1000, 1000², …);
//! `B` (or `byte`, `bytes`, or no unit) is one byte. A bare `K`, `M`, `G`,
//! `T` or `P` is refused rather than guessed: tools disagree on whether
//! `50G` means 50·10⁹ or 50·2³⁰ bytes, and a quota 7% off is a surprise
//! nobody wants. A number may have a decimal fraction (`1.5 GiB`); the size
//! is rounded down to a whole byte. Sizes are capped at `i64::MAX` bytes
//! (8 EiB), so that every size fits a database integer.
//!
//! A size displays in the largest unit that divides it exactly, binary
//! units first (`53687091200` shows as `50 GiB`, `500000000` as `500 MB`),
//! so that what is written parses back to the same value;
//! [`ByteSize::approximate`] gives a short rounded form for people
//! (`1.2 GiB`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Units by which exact display tries, largest first within each base.
const EXACT_UNITS: [(u64, &str); 10] = [
    (1 << 50, "PiB"),
    (1 << 40, "TiB"),
    (1 << 30, "GiB"),
    (1 << 20, "MiB"),
    (1 << 10, "KiB"),
    (1_000_000_000_000_000, "PB"),
    (1_000_000_000_000, "TB"),
    (1_000_000_000, "GB"),
    (1_000_000, "MB"),
    (1_000, "KB"),
];

/// The largest size: what a signed 64-bit database column holds.
const MAX_BYTES: u64 = i64::MAX as u64;

/// Why a string is not a byte size. Each message quotes the input, so
/// that it makes sense on its own in a config or CLI error report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    #[error("byte size is empty: write e.g. \"50 GiB\" or \"500 MB\"")]
    Empty,
    #[error("invalid byte size {input:?}: expected a number, then a unit such as GiB or GB")]
    ExpectedNumber { input: String },
    #[error("invalid byte size {input:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, PiB or KB, MB, GB, TB, PB)")]
    UnknownUnit { input: String, unit: String },
    #[error("invalid byte size {input:?}: unit {unit:?} is ambiguous (write \"{unit}iB\" for powers of 1024 or \"{unit}B\" for powers of 1000)")]
    AmbiguousUnit { input: String, unit: String },
    #[error("invalid byte size {input:?}: larger than 8 EiB")]
    TooLarge { input: String },
}

/// A number of bytes that reads and writes with units; see the module
/// documentation. Serialises as its exact display string and deserialises
/// from such a string or from a plain number of bytes (what a `LARDER_…`
/// environment variable of digits becomes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ByteSize(u64);

impl ByteSize {
    /// `bytes`, capped at the largest size (8 EiB).
    pub const fn new(bytes: u64) -> Self {
        if bytes > MAX_BYTES {
            Self(MAX_BYTES)
        } else {
            Self(bytes)
        }
    }

    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// A short, rounded form for people: the largest binary unit the size
    /// reaches, with one decimal (`1.2 GiB`, `512 B`).
    pub fn approximate(self) -> String {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return format!("{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit < UNITS.len() - 1 {
            value /= 1024.0;
            unit += 1;
        }
        // Rounding may reach 1024.0 (1023.96 MiB): show the next unit.
        if format!("{value:.1}") == "1024.0" && unit < UNITS.len() - 1 {
            value /= 1024.0;
            unit += 1;
        }
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl From<ByteSize> for u64 {
    fn from(size: ByteSize) -> Self {
        size.0
    }
}

/// The multiplier of a unit; `Err(true)` when the unit is ambiguous,
/// `Err(false)` when it is unknown.
fn unit_bytes(unit: &str) -> Result<u64, bool> {
    Ok(match unit.to_ascii_lowercase().as_str() {
        "" | "b" | "byte" | "bytes" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        "k" | "m" | "g" | "t" | "p" => return Err(true),
        _ => return Err(false),
    })
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim();
        if text.is_empty() {
            return Err(ByteSizeError::Empty);
        }
        let expected_number = || ByteSizeError::ExpectedNumber {
            input: input.to_owned(),
        };
        let too_large = || ByteSizeError::TooLarge {
            input: input.to_owned(),
        };
        let whole_len = text.bytes().take_while(u8::is_ascii_digit).count();
        let (whole, rest) = text.split_at(whole_len);
        let (fraction, rest) = match rest.strip_prefix('.') {
            Some(after_point) => {
                let fraction_len = after_point.bytes().take_while(u8::is_ascii_digit).count();
                after_point.split_at(fraction_len)
            }
            None => ("", rest),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err(expected_number());
        }
        let unit = rest.trim_start();
        if !unit.bytes().all(|byte| byte.is_ascii_alphabetic()) {
            return Err(expected_number());
        }
        let multiplier = unit_bytes(unit).map_err(|ambiguous| {
            if ambiguous {
                ByteSizeError::AmbiguousUnit {
                    input: input.to_owned(),
                    unit: unit.to_owned(),
                }
            } else {
                ByteSizeError::UnknownUnit {
                    input: input.to_owned(),
                    unit: unit.to_owned(),
                }
            }
        })?;
        // Exact arithmetic in u128: whole·unit + fraction·unit / 10^digits,
        // rounded down. More than 18 fraction digits say nothing a byte
        // count can hold.
        let fraction = &fraction[..fraction.len().min(18)];
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_large())?
        };
        let scale = 10u128.pow(fraction.len() as u32);
        let fraction: u128 = if fraction.is_empty() {
            0
        } else {
            // Only ASCII digits, at most 18 of them: always a u128.
            fraction.parse().map_err(|_| expected_number())?
        };
        let multiplier = u128::from(multiplier);
        let bytes = whole
            .checked_mul(multiplier)
            .and_then(|bytes| bytes.checked_add(fraction * multiplier / scale))
            .ok_or_else(too_large)?;
        if bytes > u128::from(MAX_BYTES) {
            return Err(too_large());
        }
        // Checked against MAX_BYTES just above.
        Ok(Self(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = EXACT_UNITS
            .iter()
            .find(|(unit_bytes, _)| self.0 != 0 && self.0.is_multiple_of(*unit_bytes));
        match unit {
            Some((unit_bytes, name)) => write!(f, "{} {name}", self.0 / unit_bytes),
            None => write!(f, "{} B", self.0),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Bytes(u64),
            Text(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Bytes(bytes) if bytes <= MAX_BYTES => Ok(Self(bytes)),
            Written::Bytes(bytes) => Err(serde::de::Error::custom(ByteSizeError::TooLarge {
                input: bytes.to_string(),
            })),
            Written::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(input: &str) -> u64 {
        input
            .parse::<ByteSize>()
            .unwrap_or_else(|error| panic!("{input:?} should parse: {error}"))
            .bytes()
    }

    #[test]
    fn binary_and_decimal_units_mean_what_they_say() {
        assert_eq!(bytes("50 GiB"), 50 << 30);
        assert_eq!(bytes("500MB"), 500_000_000);
        assert_eq!(bytes("1 KiB"), 1024);
        assert_eq!(bytes("1 KB"), 1000);
        assert_eq!(bytes("2 TiB"), 2 << 40);
        assert_eq!(bytes("2 TB"), 2_000_000_000_000);
        assert_eq!(bytes("1 PiB"), 1 << 50);
        assert_eq!(bytes("3 MiB"), 3 << 20);
        assert_eq!(bytes("7 GB"), 7_000_000_000);
    }

    #[test]
    fn bytes_case_whitespace_and_fractions() {
        assert_eq!(bytes("1234"), 1234);
        assert_eq!(bytes("1234 B"), 1234);
        assert_eq!(bytes("1 byte"), 1);
        assert_eq!(bytes("10 bytes"), 10);
        assert_eq!(bytes(" 50 gib "), 50 << 30);
        assert_eq!(bytes("50gIb"), 50 << 30);
        assert_eq!(bytes("1.5 GiB"), 3 << 29);
        assert_eq!(bytes("0.5KiB"), 512);
        assert_eq!(bytes(".5 KB"), 500);
        assert_eq!(bytes("2. MB"), 2_000_000);
        // Rounded down to a whole byte.
        assert_eq!(bytes("0.3 B"), 0);
        assert_eq!(bytes("1.0001 KiB"), 1024);
        assert_eq!(bytes("0"), 0);
        assert_eq!(bytes("8 PiB"), 8 << 50);
    }

    #[test]
    fn bad_sizes_are_refused_with_a_precise_error() {
        let parse = |input: &str| input.parse::<ByteSize>();
        assert_eq!(parse(""), Err(ByteSizeError::Empty));
        assert_eq!(parse("   "), Err(ByteSizeError::Empty));
        for input in [
            "GiB",
            "-1 GiB",
            "1,5 GiB",
            "1 GiB 2 MiB",
            "1e9",
            ".",
            "1 G iB",
        ] {
            assert!(
                matches!(parse(input), Err(ByteSizeError::ExpectedNumber { .. })),
                "{input:?}: {:?}",
                parse(input)
            );
        }
        for input in ["50G", "50 g", "1M", "2 K", "1 T", "1p"] {
            assert!(
                matches!(parse(input), Err(ByteSizeError::AmbiguousUnit { .. })),
                "{input:?}: {:?}",
                parse(input)
            );
        }
        assert!(matches!(
            parse("5 GibiBytes"),
            Err(ByteSizeError::UnknownUnit { unit, .. }) if unit == "GibiBytes"
        ));
        assert!(matches!(parse("5 Gb"), Ok(size) if size.bytes() == 5_000_000_000));
        for input in [
            "9223372036854775808",
            "99999999999999999999999999999999999999999 B",
            "8192 PiB",
        ] {
            assert!(
                matches!(parse(input), Err(ByteSizeError::TooLarge { .. })),
                "{input:?}: {:?}",
                parse(input)
            );
        }
        assert!(matches!(
            parse("8 EiB"),
            Err(ByteSizeError::UnknownUnit { .. })
        ));
        assert_eq!(bytes("9223372036854775807"), i64::MAX as u64);
    }

    #[test]
    fn error_messages_quote_the_input_and_suggest_units() {
        let message = "50G".parse::<ByteSize>().unwrap_err().to_string();
        assert_eq!(
            message,
            "invalid byte size \"50G\": unit \"G\" is ambiguous (write \"GiB\" for powers of 1024 or \"GB\" for powers of 1000)"
        );
    }

    #[test]
    fn display_is_exact_and_parses_back() {
        let display = |bytes: u64| ByteSize::new(bytes).to_string();
        assert_eq!(display(50 << 30), "50 GiB");
        assert_eq!(display(500_000_000), "500 MB");
        assert_eq!(display(1536), "1536 B");
        assert_eq!(display(1000), "1 KB");
        assert_eq!(display(1024), "1 KiB");
        assert_eq!(display(1234), "1234 B");
        assert_eq!(display(0), "0 B");
        assert_eq!(display(3 << 29), "1536 MiB");
        for bytes in [
            0,
            1,
            1000,
            1024,
            1536,
            50 << 30,
            500_000_000,
            123_456_789,
            i64::MAX as u64,
        ] {
            let size = ByteSize::new(bytes);
            assert_eq!(size.to_string().parse::<ByteSize>(), Ok(size), "{size}");
        }
        assert_eq!(ByteSize::new(u64::MAX).bytes(), i64::MAX as u64);
    }

    #[test]
    fn approximate_display_rounds_to_one_decimal() {
        let approximate = |bytes: u64| ByteSize::new(bytes).approximate();
        assert_eq!(approximate(512), "512 B");
        assert_eq!(approximate(1024), "1.0 KiB");
        assert_eq!(approximate(1_288_490_189), "1.2 GiB");
        assert_eq!(approximate(50 << 30), "50.0 GiB");
        assert_eq!(approximate((1 << 20) - 1), "1.0 MiB");
    }

    #[test]
    fn serde_takes_strings_and_numbers_and_writes_strings() {
        let size: ByteSize = serde_json::from_str("\"50 GiB\"").expect("a string");
        assert_eq!(size.bytes(), 50 << 30);
        let size: ByteSize = serde_json::from_str("1048576").expect("a number");
        assert_eq!(size.bytes(), 1 << 20);
        assert_eq!(serde_json::to_string(&size).expect("json"), "\"1 MiB\"");
        assert!(serde_json::from_str::<ByteSize>("\"50G\"").is_err());
        assert!(serde_json::from_str::<ByteSize>("-1").is_err());
        assert!(serde_json::from_str::<ByteSize>("18446744073709551615").is_err());
    }
}
