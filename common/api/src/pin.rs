//! Pins (issue #18): names under which a cache keeps the closure of a root
//! path from retention GC and quota eviction, whatever their last access.
//!
//! Pinning a name again adds a revision (a new root); a [`KeepPolicy`]
//! says which revisions stay, and the newest always does, so a pin never
//! stops protecting what was pinned last. This module holds the validated
//! name and the policy's pure rules; the rows are `larder_db`'s (module
//! `pins`) and the closure GC keeps is computed there, inside GC's own
//! delete statements.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest pin name accepted: room for `release-2026.11-hotfix-3`.
pub const MAX_PIN_NAME_LEN: usize = 64;

/// Why a string is not a valid pin name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinNameError {
    #[error("pin name is empty")]
    Empty,
    #[error("pin name {0:?} is longer than {MAX_PIN_NAME_LEN} characters")]
    TooLong(String),
    #[error("pin name {0:?} must start with a letter or a digit")]
    BadFirstCharacter(String),
    #[error("pin name {name:?} contains {character:?}: only letters, digits, '-', '_' and '.' are allowed")]
    BadCharacter { name: String, character: char },
}

/// The name of a pin within its cache. The rules are a cache name's: it is
/// a URL segment (`DELETE /_api/v1/pins/{cache}/{name}`) and a shell word,
/// so no escaping is ever needed and `.`/`..` cannot be one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PinName(String);

impl PinName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PinName {
    type Err = PinNameError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let Some(first) = name.chars().next() else {
            return Err(PinNameError::Empty);
        };
        if name.len() > MAX_PIN_NAME_LEN {
            return Err(PinNameError::TooLong(name.to_owned()));
        }
        if !first.is_ascii_alphanumeric() {
            return Err(PinNameError::BadFirstCharacter(name.to_owned()));
        }
        if let Some(character) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(PinNameError::BadCharacter {
                name: name.to_owned(),
                character,
            });
        }
        Ok(Self(name.to_owned()))
    }
}

impl TryFrom<String> for PinName {
    type Error = PinNameError;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        name.parse()
    }
}

impl From<PinName> for String {
    fn from(name: PinName) -> Self {
        name.0
    }
}

impl fmt::Display for PinName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which revisions of a pin are kept; the newest always is. On the wire:
/// `"forever"`, `{"revisions": N}` or `{"days": N}` (N at least 1).
///
/// The default is [`KeepPolicy::DEFAULT`], the newest revision only: a
/// name pinned once (a release) is kept as long as the pin exists, and a
/// name pinned on every CI run (`larder push --pin main`) keeps the latest
/// closure rather than growing without bound. Keeping every revision is
/// asked for explicitly with `Forever`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepPolicy {
    /// Every revision, until the pin is deleted.
    Forever,
    /// The newest N revisions.
    Revisions(NonZeroU32),
    /// The revisions made within the last N days, and the newest.
    Days(NonZeroU32),
}

/// Which of a pin's revisions a [`KeepPolicy`] drops: those numbered below
/// `revisions_below` that were also made more than `made_before` ago
/// (`None`: whatever their age).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prune {
    pub revisions_below: u64,
    pub made_before: Option<Duration>,
}

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

impl KeepPolicy {
    /// The newest revision alone; see the type's documentation.
    pub const DEFAULT: Self = Self::Revisions(NonZeroU32::MIN);

    /// What to drop from a pin whose newest revision is `newest`, or
    /// `None` when nothing ever is. Revisions are numbered in the order
    /// they were made, so both rules drop only the oldest, and never
    /// `newest` itself.
    pub fn prune(self, newest: u64) -> Option<Prune> {
        match self {
            Self::Forever => None,
            Self::Revisions(keep) => Some(Prune {
                revisions_below: (newest + 1).saturating_sub(u64::from(keep.get())),
                made_before: None,
            }),
            Self::Days(days) => Some(Prune {
                revisions_below: newest,
                made_before: Some(DAY * days.get()),
            }),
        }
    }
}

impl Default for KeepPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for KeepPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Forever => f.write_str("every revision"),
            Self::Revisions(n) if n.get() == 1 => f.write_str("the newest revision"),
            Self::Revisions(n) => write!(f, "the newest {n} revisions"),
            Self::Days(n) => write!(f, "revisions of the last {n} days and the newest"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(value: u32) -> NonZeroU32 {
        NonZeroU32::new(value).expect("a test's count is not zero")
    }

    #[test]
    fn keeping_revisions_drops_all_but_the_newest_n() {
        let prune = KeepPolicy::Revisions(n(2)).prune(3).expect("prunes");
        assert_eq!(
            prune,
            Prune {
                revisions_below: 2,
                made_before: None
            }
        );
        // The default keeps the newest alone.
        assert_eq!(KeepPolicy::DEFAULT.prune(7).unwrap().revisions_below, 7);
        // Fewer revisions than kept: nothing goes.
        assert_eq!(
            KeepPolicy::Revisions(n(5))
                .prune(3)
                .unwrap()
                .revisions_below,
            0
        );
        assert_eq!(
            KeepPolicy::Revisions(n(u32::MAX))
                .prune(1)
                .unwrap()
                .revisions_below,
            0
        );
    }

    #[test]
    fn keeping_days_drops_old_revisions_but_never_the_newest() {
        let prune = KeepPolicy::Days(n(7)).prune(4).expect("prunes");
        assert_eq!(prune.revisions_below, 4);
        assert_eq!(prune.made_before, Some(Duration::from_secs(7 * 86_400)));
    }

    #[test]
    fn forever_drops_nothing() {
        assert_eq!(KeepPolicy::Forever.prune(1_000), None);
    }

    #[test]
    fn policies_on_the_wire() {
        for (policy, json) in [
            (KeepPolicy::Forever, r#""forever""#),
            (KeepPolicy::Revisions(n(2)), r#"{"revisions":2}"#),
            (KeepPolicy::Days(n(30)), r#"{"days":30}"#),
        ] {
            assert_eq!(serde_json::to_string(&policy).unwrap(), json);
            assert_eq!(serde_json::from_str::<KeepPolicy>(json).unwrap(), policy);
        }
        assert!(serde_json::from_str::<KeepPolicy>(r#"{"revisions":0}"#).is_err());
        assert!(serde_json::from_str::<KeepPolicy>(r#"{"days":-1}"#).is_err());
    }

    #[test]
    fn pin_names_are_checked() {
        for good in [
            "main",
            "release-1.2",
            "v1_2",
            "0",
            &"a".repeat(MAX_PIN_NAME_LEN),
        ] {
            assert_eq!(good.parse::<PinName>().unwrap().as_str(), good);
        }
        assert_eq!("".parse::<PinName>(), Err(PinNameError::Empty));
        assert!(matches!(
            "a".repeat(MAX_PIN_NAME_LEN + 1).parse::<PinName>(),
            Err(PinNameError::TooLong(_))
        ));
        for bad_start in [".hidden", "..", "-x", "_x"] {
            assert!(matches!(
                bad_start.parse::<PinName>(),
                Err(PinNameError::BadFirstCharacter(_))
            ));
        }
        assert_eq!(
            "a/b".parse::<PinName>(),
            Err(PinNameError::BadCharacter {
                name: "a/b".to_owned(),
                character: '/'
            })
        );
        assert!("release 1".parse::<PinName>().is_err());
        assert!("é".parse::<PinName>().is_err());
    }
}
