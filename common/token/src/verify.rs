//! Verification: from a presented token string to claims the server can
//! trust.
//!
//! [`TokenVerifier`] is the only way to get [`Claims`] out of a token, and
//! it always checks, in order: the algorithm in the header is the one
//! configured (so `none`, or an HS256 token made with an RS256 server's
//! public key as the secret, never reach signature checking), the
//! signature, the claims' shape, `exp` and `nbf` with a small leeway for
//! clock skew, and finally the revocation list.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::Validation;

use super::claims::Claims;
use super::credentials::parse_authorization;
use super::error::AuthError;
use super::keys::{TokenAlgorithm, TokenVerifyingKey};
use super::revocation::RevocationList;
use larder_api::time::unix_seconds;

/// How far clocks may disagree before `exp` and `nbf` bite.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);

/// Longest token accepted; real ones are a few hundred bytes, and the
/// limit bounds the work an attacker can ask for.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Verifies tokens with one key and one revocation list. Cheap to share
/// behind an `Arc`; the revocation list is refreshed in place.
#[derive(Debug)]
pub struct TokenVerifier {
    key: TokenVerifyingKey,
    revocations: Arc<RevocationList>,
    leeway: Duration,
    validation: Validation,
}

impl TokenVerifier {
    pub fn new(key: TokenVerifyingKey, revocations: Arc<RevocationList>) -> Self {
        let mut validation = Validation::new(key.algorithm().jwt());
        // Times are checked here instead, against a clock tests can set and
        // with errors that say when.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        // Audience validation stays on with no audience expected: a token
        // that names an audience was minted for something else.
        Self {
            key,
            revocations,
            leeway: DEFAULT_LEEWAY,
            validation,
        }
    }

    #[must_use]
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    pub fn algorithm(&self) -> TokenAlgorithm {
        self.key.algorithm()
    }

    /// The list to refresh from the database.
    pub fn revocations(&self) -> &Arc<RevocationList> {
        &self.revocations
    }

    /// Verifies `token` now.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_at(token, SystemTime::now())
    }

    /// Verifies `token` as if it were `now`.
    pub fn verify_at(&self, token: &str, now: SystemTime) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed("token is longer than 16 KiB"));
        }
        self.check_header(token)?;
        let claims =
            jsonwebtoken::decode::<Claims>(token, self.key.decoding_key(), &self.validation)
                .map_err(from_jwt_error)?
                .claims;

        let now = unix_seconds(now);
        let leeway = self.leeway.as_secs();
        // `exp` is the first second at which the token is no longer valid
        // (RFC 7519 §4.1.4).
        if now >= claims.exp.saturating_add(leeway) {
            return Err(AuthError::Expired {
                expired_at: claims.exp,
            });
        }
        if let Some(not_before) = claims.nbf {
            if now.saturating_add(leeway) < not_before {
                return Err(AuthError::NotYetValid { not_before });
            }
        }
        self.revocations.check(&claims.jti)?;
        Ok(claims)
    }

    /// Authenticates a request from its `Authorization` header value:
    /// `Ok(None)` when there is no header (anonymous), the claims when it
    /// carries a good token, and an error for anything else, so that a
    /// bad header is never mistaken for anonymous access.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Option<Claims>, AuthError> {
        match authorization {
            None => Ok(None),
            Some(value) => {
                let token = parse_authorization(value)?;
                self.verify(&token).map(Some)
            }
        }
    }

    /// Refuses any token whose header does not name the configured
    /// algorithm, before its signature is looked at.
    fn check_header(&self, token: &str) -> Result<(), AuthError> {
        if token.split('.').count() != 3 {
            return Err(AuthError::Malformed(
                "expected three base64url parts separated by '.'",
            ));
        }
        let (encoded_header, _) = token.split_once('.').unwrap_or((token, ""));
        let header = URL_SAFE_NO_PAD
            .decode(encoded_header)
            .map_err(|_| AuthError::Malformed("header is not base64url"))?;
        let header: serde_json::Value = serde_json::from_slice(&header)
            .map_err(|_| AuthError::Malformed("header is not JSON"))?;
        let algorithm = match header.get("alg") {
            Some(serde_json::Value::String(algorithm)) => algorithm,
            Some(_) => return Err(AuthError::Malformed("header's algorithm is not a string")),
            None => return Err(AuthError::Malformed("header names no algorithm")),
        };
        let expected = self.algorithm();
        if algorithm != expected.name() {
            return Err(AuthError::UnexpectedAlgorithm {
                found: describe_algorithm(algorithm),
                expected,
            });
        }
        // The rest of the header must also be what jsonwebtoken expects, so
        // that a later JSON error can only be about the claims.
        jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Malformed("header is not a valid JWT header"))?;
        Ok(())
    }
}

/// Maps what jsonwebtoken reports after the header checks passed.
fn from_jwt_error(error: jsonwebtoken::errors::Error) -> AuthError {
    match error.kind() {
        ErrorKind::InvalidSignature => AuthError::InvalidSignature,
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            AuthError::Malformed("a part is not valid base64url")
        }
        // The header was checked already and the signature comes before
        // the payload is parsed, so this is a signed payload of the wrong
        // shape.
        ErrorKind::Json(error) => AuthError::InvalidClaims(error.to_string()),
        ErrorKind::InvalidAudience => AuthError::InvalidClaims(
            "it names an audience (aud), so it is not a Larder token".to_owned(),
        ),
        _ => AuthError::Unverifiable(error.to_string()),
    }
}

/// The header's `alg` as it may appear in an error: quoted when it looks
/// like an algorithm name, withheld otherwise (it is attacker-chosen text).
fn describe_algorithm(algorithm: &str) -> String {
    if algorithm.len() <= 16 && algorithm.bytes().all(|b| b.is_ascii_alphanumeric()) {
        format!("{algorithm:?}")
    } else {
        "an unknown algorithm".to_owned()
    }
}
