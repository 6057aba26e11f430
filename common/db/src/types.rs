//! Small value types shared by the store layer's tables: row ids, times,
//! row states and the cache's secret key.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time as the database stores it: milliseconds since the Unix
/// epoch. Both backends hold it in a 64-bit integer, which compares and
/// indexes the same way in SQLite and PostgreSQL, unlike their date types.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        SystemTime::now().into()
    }

    pub const fn from_unix_millis(millis: i64) -> Self {
        Self(millis)
    }

    pub const fn unix_millis(self) -> i64 {
        self.0
    }

    /// `self - duration`, clamped at the smallest representable time; for
    /// cutoffs such as "updated more than an hour ago".
    pub fn saturating_sub(self, duration: Duration) -> Self {
        Self(self.0.saturating_sub(duration_millis(duration)))
    }

    /// `self + duration`, clamped at the largest representable time.
    pub fn saturating_add(self, duration: Duration) -> Self {
        Self(self.0.saturating_add(duration_millis(duration)))
    }
}

fn duration_millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl From<SystemTime> for Timestamp {
    fn from(time: SystemTime) -> Self {
        match time.duration_since(UNIX_EPOCH) {
            Ok(after) => Self(duration_millis(after)),
            Err(before) => Self(-duration_millis(before.duration())),
        }
    }
}

impl From<Timestamp> for SystemTime {
    fn from(time: Timestamp) -> Self {
        let magnitude = Duration::from_millis(time.0.unsigned_abs());
        if time.0 >= 0 {
            UNIX_EPOCH + magnitude
        } else {
            UNIX_EPOCH - magnitude
        }
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({}ms)", self.0)
    }
}

/// Declares a row id: a distinct type per table, so a chunk id cannot be
/// passed where a NAR id is meant.
macro_rules! row_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

row_id!(
    /// The id of a row of `caches`.
    CacheId
);
row_id!(
    /// The id of a row of `nars`.
    NarId
);
row_id!(
    /// The id of a row of `chunks`.
    ChunkId
);
row_id!(
    /// The id of a row of `objects`.
    ObjectId
);

/// The lifecycle of a global NAR or chunk row.
///
/// `Pending` while the pipeline stores it; `Valid` once its bytes are all in
/// storage; `Deleting` once garbage collection has claimed it, after which
/// nothing may start to depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreState {
    Pending,
    Valid,
    Deleting,
}

impl StoreState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Valid => "valid",
            Self::Deleting => "deleting",
        }
    }
}

impl fmt::Display for StoreState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StoreState {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "pending" => Ok(Self::Pending),
            "valid" => Ok(Self::Valid),
            "deleting" => Ok(Self::Deleting),
            other => Err(format!("unknown state {other:?}")),
        }
    }
}

/// A cache's Nix-format ed25519 secret key, `name:base64`, as stored.
///
/// It is a secret: `Debug` prints a placeholder, there is no `Display`, and
/// the text is reached only through [`CacheKeypair::expose_secret`].
#[derive(Clone, PartialEq, Eq)]
pub struct CacheKeypair(String);

impl CacheKeypair {
    /// Wraps the `name:base64` text; the signing code validates it.
    pub fn new(secret_key: String) -> Self {
        Self(secret_key)
    }

    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// The key's name (the text before `:`), which is public: it names the
    /// key in `trusted-public-keys` and in signatures.
    pub fn key_name(&self) -> &str {
        self.0.split_once(':').map_or("?", |(name, _)| name)
    }
}

impl fmt::Debug for CacheKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key name is public and helps debugging.
        write!(f, "CacheKeypair({}:<redacted>)", self.key_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_through_system_time() {
        for millis in [0, 1, 1_700_000_000_123, -5_000] {
            let time = Timestamp::from_unix_millis(millis);
            assert_eq!(Timestamp::from(SystemTime::from(time)), time);
        }
        let t = Timestamp::from_unix_millis(10_000);
        assert_eq!(
            t.saturating_sub(Duration::from_secs(3)).unix_millis(),
            7_000
        );
        assert_eq!(
            t.saturating_add(Duration::from_millis(5)).unix_millis(),
            10_005
        );
        assert_eq!(
            Timestamp::from_unix_millis(i64::MIN).saturating_sub(Duration::from_secs(1)),
            Timestamp::from_unix_millis(i64::MIN)
        );
    }

    #[test]
    fn keypair_debug_hides_the_secret() {
        let key = CacheKeypair::new("hello-1:c2VjcmV0IGJ5dGVz".to_owned());
        let debug = format!("{key:?}");
        assert!(debug.contains("hello-1"));
        assert!(!debug.contains("c2VjcmV0"), "{debug}");
    }

    #[test]
    fn store_states_parse_what_they_print() {
        for state in [StoreState::Pending, StoreState::Valid, StoreState::Deleting] {
            assert_eq!(state.as_str().parse::<StoreState>(), Ok(state));
        }
        assert!("gone".parse::<StoreState>().is_err());
    }
}

/// Who did something: the subject and id (`jti`) of the token used. Both
/// are `None` for an anonymous or internal change, and the id for rows
/// written before it was kept (migration 0013).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Actor {
    pub subject: Option<String>,
    pub jti: Option<String>,
}
