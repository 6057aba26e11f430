//! Minting: from who a token is for, how long it lasts and what it may do
//! on which caches, to a signed token and its claims.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use super::claims::Claims;
use super::delegation::DelegationDenied;
use super::keys::TokenSigningKey;
use super::permissions::Permissions;
use larder_api::cache_name::CacheNamePattern;
use larder_api::time::{format_unix_seconds, unix_seconds, MAX_UNIX_SECONDS};

/// Why a token cannot be minted as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("token subject is empty: say who the token is for")]
    EmptySubject,
    #[error("token validity is zero")]
    ZeroValidity,
    #[error("token would grant no permission on any cache")]
    NoPermissions,
    #[error(
        "token validity is too long: it would expire after {}",
        format_unix_seconds(MAX_UNIX_SECONDS)
    )]
    ValidityTooLong,
    /// Minted by another token ([`TokenBuilder::mint_by`]): more than it may
    /// grant.
    #[error(transparent)]
    Delegation(#[from] DelegationDenied),
    #[error("cannot sign token: {0}")]
    Signing(String),
}

/// Describes a token to mint.
///
/// ```
/// # use std::time::Duration;
/// # use larder_token::{Permission, TokenBuilder, TokenSigningKey};
/// # let key = TokenSigningKey::hs256(&[7; 32]).unwrap();
/// let minted = TokenBuilder::new("ci@alice", Duration::from_secs(90 * 86_400))
///     .grant("alice-*".parse().unwrap(), [Permission::Pull, Permission::Push])
///     .mint(&key)
///     .unwrap();
/// println!("{}", minted.claims.to_json_pretty());
/// ```
#[derive(Debug, Clone)]
pub struct TokenBuilder {
    subject: String,
    validity: Duration,
    not_before: Option<SystemTime>,
    caches: BTreeMap<CacheNamePattern, Permissions>,
}

impl TokenBuilder {
    /// A token for `subject`, valid for `validity` from the moment it is
    /// minted. See [`parse_duration`](larder_api::duration::parse_duration) for
    /// reading `validity` from text such as `3 months`.
    pub fn new(subject: impl Into<String>, validity: Duration) -> Self {
        Self {
            subject: subject.into(),
            validity,
            not_before: None,
            caches: BTreeMap::new(),
        }
    }

    /// Grants `permissions` on caches matching `pattern`; granting on the
    /// same pattern again adds to what it has. An exact name granted an
    /// empty set denies that cache everything the patterns would give.
    #[must_use]
    pub fn grant(mut self, pattern: CacheNamePattern, permissions: impl Into<Permissions>) -> Self {
        *self.caches.entry(pattern).or_default() |= permissions.into();
        self
    }

    /// Makes the token unusable before `time` (the `nbf` claim).
    #[must_use]
    pub fn not_before(mut self, time: SystemTime) -> Self {
        self.not_before = Some(time);
        self
    }

    /// The claims a token minted at `now` would carry, with a fresh `jti`.
    pub fn claims_at(&self, now: SystemTime) -> Result<Claims, MintError> {
        if self.subject.trim().is_empty() {
            return Err(MintError::EmptySubject);
        }
        if self.validity.as_secs() == 0 {
            return Err(MintError::ZeroValidity);
        }
        if self
            .caches
            .values()
            .all(|permissions| permissions.is_empty())
        {
            return Err(MintError::NoPermissions);
        }
        let iat = unix_seconds(now);
        let nbf = self.not_before.map(unix_seconds);
        // The validity counts from the start of the token's life, so `exp`
        // is always after `nbf`.
        let exp = iat
            .max(nbf.unwrap_or(0))
            .checked_add(self.validity.as_secs())
            .filter(|&exp| exp <= MAX_UNIX_SECONDS)
            .ok_or(MintError::ValidityTooLong)?;
        Ok(Claims {
            sub: self.subject.clone(),
            iat,
            nbf,
            exp,
            jti: new_jti(),
            caches: self.caches.clone(),
        })
    }

    /// Mints the token now.
    pub fn mint(&self, key: &TokenSigningKey) -> Result<MintedToken, MintError> {
        self.mint_at(key, SystemTime::now())
    }

    /// Mints the token now on behalf of the token `minter`, which must
    /// cover it ([`Claims::check_delegation`]).
    pub fn mint_by(
        &self,
        key: &TokenSigningKey,
        minter: &Claims,
    ) -> Result<MintedToken, MintError> {
        let claims = self.claims_at(SystemTime::now())?;
        minter.check_delegation(&claims)?;
        sign(key, claims)
    }

    /// Mints the token as if it were `now`: tests use it to make tokens
    /// that have already expired.
    pub fn mint_at(
        &self,
        key: &TokenSigningKey,
        now: SystemTime,
    ) -> Result<MintedToken, MintError> {
        sign(key, self.claims_at(now)?)
    }
}

fn sign(key: &TokenSigningKey, claims: Claims) -> Result<MintedToken, MintError> {
    let token = key
        .sign(&claims)
        .map_err(|error| MintError::Signing(error.to_string()))?;
    Ok(MintedToken { token, claims })
}

/// 128 random bits in hex: unique without coordination, and unguessable,
/// so that knowing one token's id says nothing about another's.
fn new_jti() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// A freshly minted token: the string to hand to the user, and its claims,
/// for the database's token listing and for `dump_claims` output.
#[derive(Clone, PartialEq, Eq)]
pub struct MintedToken {
    pub token: String,
    pub claims: Claims,
}

/// The token is a credential, so `Debug` shows only its claims.
impl fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintedToken")
            .field("token", &"<redacted>")
            .field("claims", &self.claims)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::keys::tests::HS_SECRET;
    use crate::Permission;

    fn pattern(s: &str) -> CacheNamePattern {
        s.parse().expect("valid test pattern")
    }

    fn at(unix_seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix_seconds)
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn claims_follow_the_builder() {
        let claims = TokenBuilder::new("alice", 30 * DAY)
            .grant(pattern("alice-*"), Permission::Push)
            .grant(pattern("alice-*"), Permission::Pull)
            .grant(pattern("shared"), Permissions::from(Permission::Pull))
            .claims_at(at(1_000_000))
            .expect("valid builder");
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.iat, 1_000_000);
        assert_eq!(claims.exp, 1_000_000 + 30 * 86_400);
        assert_eq!(claims.nbf, None);
        assert_eq!(
            claims.caches[&pattern("alice-*")],
            Permissions::from([Permission::Pull, Permission::Push])
        );
        assert_eq!(claims.jti.len(), 32);
        assert!(claims.jti.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn every_token_gets_its_own_jti() {
        let builder = TokenBuilder::new("a", DAY).grant(pattern("*"), Permission::Pull);
        let first = builder.claims_at(at(0)).expect("valid builder");
        let second = builder.claims_at(at(0)).expect("valid builder");
        assert_ne!(first.jti, second.jti);
    }

    #[test]
    fn validity_counts_from_not_before() {
        let claims = TokenBuilder::new("a", DAY)
            .grant(pattern("*"), Permission::Pull)
            .not_before(at(5_000_000))
            .claims_at(at(1_000_000))
            .expect("valid builder");
        assert_eq!(claims.nbf, Some(5_000_000));
        assert_eq!(claims.exp, 5_000_000 + 86_400);
    }

    #[test]
    fn refuses_useless_tokens() {
        let grant = |builder: TokenBuilder| builder.grant(pattern("*"), Permission::Pull);
        assert_eq!(
            grant(TokenBuilder::new(" ", DAY)).claims_at(at(0)),
            Err(MintError::EmptySubject)
        );
        assert_eq!(
            grant(TokenBuilder::new("a", Duration::ZERO)).claims_at(at(0)),
            Err(MintError::ZeroValidity)
        );
        assert_eq!(
            TokenBuilder::new("a", DAY).claims_at(at(0)),
            Err(MintError::NoPermissions)
        );
        assert_eq!(
            TokenBuilder::new("a", DAY)
                .grant(pattern("x"), Permissions::NONE)
                .claims_at(at(0)),
            Err(MintError::NoPermissions)
        );
        assert_eq!(
            grant(TokenBuilder::new("a", Duration::from_secs(u64::MAX))).claims_at(at(1)),
            Err(MintError::ValidityTooLong)
        );
        assert_eq!(
            grant(TokenBuilder::new(
                "a",
                Duration::from_secs(10_000 * 365 * 86_400)
            ))
            .claims_at(at(0)),
            Err(MintError::ValidityTooLong)
        );
    }

    #[test]
    fn debug_hides_the_token() {
        let key = TokenSigningKey::hs256_from_base64(HS_SECRET).expect("valid secret");
        let minted = TokenBuilder::new("a", DAY)
            .grant(pattern("*"), Permission::Pull)
            .mint(&key)
            .expect("mints");
        let debug = format!("{minted:?}");
        assert!(!debug.contains(&minted.token));
        assert!(debug.contains("<redacted>"));
    }
}
