//! Small value types shared by the store layer's tables: row ids, times,
//! row states (of NARs and chunks, and of uploads, with the SQL list of the
//! upload phases still in the pipeline) and the cache's secret key.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
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

/// The phases in which an upload is still in the pipeline, as an SQL list.
pub(crate) const IN_FLIGHT_PHASES_SQL: &str = "('spooled', 'chunking', 'compressing')";

/// An upload's random id: 32 lowercase hex digits (128 bits), unguessable,
/// so that knowing one's own upload id reveals nothing about others.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UploadId(String);

/// Why a string is not an upload id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upload id {0:?} is not 32 lowercase hex digits")]
pub struct UploadIdError(String);

impl UploadId {
    pub fn random() -> Self {
        let bytes: [u8; 16] = rand::thread_rng().gen();
        Self(hex::encode(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for UploadId {
    type Err = UploadIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let valid = text.len() == 32
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            // Bounded, so a huge bogus id cannot bloat a log line.
            Err(UploadIdError(text.chars().take(64).collect()))
        }
    }
}

impl TryFrom<String> for UploadId {
    type Error = UploadIdError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<UploadId> for String {
    fn from(id: UploadId) -> Self {
        id.0
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UploadId({})", self.0)
    }
}

/// Where an upload is in the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadPhase {
    /// Durably spooled and its hash verified: acknowledged to the client.
    Spooled,
    Chunking,
    Compressing,
    /// The object is visible.
    Done,
    /// Given up; `error` says why.
    Failed,
}

impl UploadPhase {
    pub const ALL: [Self; 5] = [
        Self::Spooled,
        Self::Chunking,
        Self::Compressing,
        Self::Done,
        Self::Failed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Spooled => "spooled",
            Self::Chunking => "chunking",
            Self::Compressing => "compressing",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    /// Whether the upload has left the pipeline.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Failed)
    }

    /// The phases an upload may move to `self` from.
    pub(super) fn predecessors(self) -> &'static str {
        match self {
            Self::Spooled => "()",
            Self::Chunking => "('spooled')",
            Self::Compressing => "('spooled', 'chunking')",
            Self::Done | Self::Failed => IN_FLIGHT_PHASES_SQL,
        }
    }
}

impl fmt::Display for UploadPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UploadPhase {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|phase| phase.as_str() == text)
            .ok_or_else(|| format!("unknown upload phase {text:?}"))
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

    #[test]
    fn upload_ids_are_random_hex_and_parse_back() {
        let a = UploadId::random();
        let b = UploadId::random();
        assert_ne!(a, b);
        assert_eq!(a.as_str().parse::<UploadId>().as_ref(), Ok(&a));
        for bad in ["", "xyz", &"A".repeat(32), &"a".repeat(33)] {
            assert!(bad.parse::<UploadId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn phases_parse_what_they_print() {
        for phase in UploadPhase::ALL {
            assert_eq!(phase.as_str().parse::<UploadPhase>(), Ok(phase));
        }
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
