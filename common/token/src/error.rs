//! Why a presented token is not accepted: [`AuthError`], what verification
//! returns and what the revocation list it consults refuses with, so it
//! sits below both.

use super::credentials::CredentialsError;
use super::keys::TokenAlgorithm;
use larder_api::time::format_unix_seconds;

/// Why a request's token is not accepted. Every variant is a 401 except
/// [`RevocationListNotLoaded`](Self::RevocationListNotLoaded), which is the
/// server's fault and a 503. Messages are meant for the user and never
/// contain key material or the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token is signed with {found}, but this server accepts only {expected} tokens")]
    UnexpectedAlgorithm {
        /// The header's `alg`, quoted, or withheld if it is not a plausible
        /// algorithm name.
        found: String,
        expected: TokenAlgorithm,
    },
    #[error("token signature is invalid")]
    InvalidSignature,
    #[error("token claims are invalid: {0}")]
    InvalidClaims(String),
    #[error("token expired at {}", format_unix_seconds(*expired_at))]
    Expired { expired_at: u64 },
    #[error("token is not valid before {}", format_unix_seconds(*not_before))]
    NotYetValid { not_before: u64 },
    #[error("token has been revoked (jti {jti})")]
    Revoked { jti: String },
    #[error("token could not be verified: {0}")]
    Unverifiable(String),
    #[error("token revocation list has not been loaded yet; try again shortly")]
    RevocationListNotLoaded,
}
