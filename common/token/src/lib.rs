//! Scoped, revocable API tokens: JWTs signed with HS256 or RS256 that grant
//! permissions on caches by name pattern.
//!
//! The life of a token, and where each step lives:
//!
//! 1. **Minting** ([`TokenBuilder`]): subject, validity (often parsed with
//!    [`larder_api::duration::parse_duration`]) and per-pattern
//!    [`Permissions`] become a [`MintedToken`]: the signed string for the
//!    user and its [`Claims`] for the token table. The key is a
//!    [`TokenSigningKey`] built from the operator's one configured secret.
//! 2. **Presenting**: the client sends it as `Authorization: Bearer …` or
//!    as the Basic-auth password (Nix's netrc); [`parse_authorization`]
//!    finds it.
//! 3. **Verifying** ([`TokenVerifier`]): algorithm, signature, claims,
//!    validity period and the [`RevocationList`], every time, in one call.
//!    Each failure is an [`AuthError`] with a message fit for the user.
//! 4. **Authorising**: [`Claims::permissions_for`] resolves what the token
//!    may do on one cache: an exact cache name in the token wins over all
//!    patterns, otherwise the matching patterns add up.
//! 5. **Delegating** (`delegation`): a token with `manage_tokens` lists,
//!    mints and revokes the tokens its patterns cover;
//!    [`Claims::check_delegation`] keeps what it mints within its own
//!    permissions and lifetime.
//!
//! The claim JSON is a wire contract; [`Claims`] documents it.
//!
//! **This crate does no IO**: it knows neither the database (the server
//! feeds revoked ids into the [`RevocationList`]) nor any HTTP framework
//! (headers come in as bytes, errors go out as values the server maps to
//! statuses).
//!
//! # Modules
//!
//! `claims` (what a token carries), `permissions`, `mint`, `keys`,
//! `credentials` (finding a token in a header), `verify`, `revocation`,
//! `delegation` and `error` ([`AuthError`]); their public items are
//! re-exported here.

mod claims;
mod credentials;
mod delegation;
mod error;
mod keys;
mod mint;
mod permissions;
mod revocation;
mod verify;

pub use claims::{Claims, PermissionDenied};
pub use credentials::{parse_authorization, CredentialsError};
pub use delegation::DelegationDenied;
pub use error::AuthError;
pub use keys::{
    KeyError, TokenAlgorithm, TokenSigningKey, TokenVerifyingKey, MIN_HS256_SECRET_BYTES,
    MIN_RSA_BITS,
};
pub use mint::{MintError, MintedToken, TokenBuilder};
pub use permissions::{Permission, Permissions, UnknownPermission};
pub use revocation::RevocationList;
pub use verify::{TokenVerifier, DEFAULT_LEEWAY, MAX_TOKEN_LEN};

#[cfg(test)]
mod tests;
