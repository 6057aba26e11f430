//! Fuzzes the token parser: an `Authorization` header's bytes through
//! Bearer and Basic decoding and JWT parsing to verified claims
//! (`larder_token::TokenVerifier::authenticate`), as every request's
//! header goes.
//!
//! The first byte chooses what the rest is:
//!
//! - even: the whole header value, as a client sent it. Nothing forged
//!   this way verifies, but it reaches every check before the signature.
//! - odd: a token *payload* (the claims JSON, or anything else), which the
//!   target signs with the server's own HS256 key and presents as a Bearer
//!   token or, when bit 1 is set, as Basic auth's password (what Nix
//!   sends), so that the claims parser and the checks after the signature
//!   see arbitrary input too.
//!
//! Any input must end in claims or a clean error, never a panic; claims
//! that come out must survive a round trip through their JSON, answer
//! permission questions, and an error's message must never repeat the
//! token.
#![no_main]

use std::sync::{Arc, LazyLock};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use larder_token::{Claims, Permission, RevocationList, TokenSigningKey, TokenVerifier};
use larder_api::cache_name::CacheName;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;

/// The server's secret; a fixed one, so that crashes reproduce.
const SECRET: &[u8] = b"larder-fuzz-token-secret-32-bytes!!";

/// The header of every token the target signs.
const HEADER_JSON: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

static VERIFIER: LazyLock<TokenVerifier> = LazyLock::new(|| {
    let key = TokenSigningKey::hs256(SECRET).expect("a 35-byte HS256 secret is long enough");
    // One revoked id, so that the revocation check has something to find.
    let revocations = Arc::new(RevocationList::with_revoked(["revoked".to_owned()]));
    TokenVerifier::new(key.verifying_key().clone(), revocations)
});

static ENCODING_KEY: LazyLock<EncodingKey> = LazyLock::new(|| EncodingKey::from_secret(SECRET));

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (header, token) = if mode & 1 == 0 {
        (rest.to_vec(), None)
    } else {
        let token = signed_token(rest);
        let header = if mode & 2 == 0 {
            format!("Bearer {token}")
        } else {
            format!("Basic {}", STANDARD.encode(format!(":{token}")))
        };
        (header.into_bytes(), Some(token))
    };
    match VERIFIER.authenticate(Some(&header)) {
        Ok(claims) => {
            let claims = claims.expect("a header present is never anonymous");
            check_claims(&claims);
        }
        Err(error) => {
            if let Some(token) = token {
                let message = error.to_string();
                assert!(
                    !message.contains(&token),
                    "an error message repeats the token: {message}"
                );
            }
        }
    }
});

/// `payload` as the middle part of an HS256 JWT signed with [`SECRET`].
fn signed_token(payload: &[u8]) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER_JSON),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &ENCODING_KEY, Algorithm::HS256)
        .expect("HMAC signing cannot fail");
    format!("{message}.{signature}")
}

/// What verified claims must satisfy whatever the payload was.
fn check_claims(claims: &Claims) {
    let json = serde_json::to_string(claims).expect("claims serialise");
    let again: Claims = serde_json::from_str(&json).expect("serialised claims parse");
    assert_eq!(&again, claims);
    assert!(claims.jti != "revoked", "a revoked token was accepted");
    // Every name a pattern stands for, and one no pattern is likely to.
    let mut names: Vec<CacheName> = claims
        .caches
        .keys()
        .filter_map(|pattern| pattern.to_string().replace('*', "x").parse().ok())
        .collect();
    names.extend("unnamed".parse::<CacheName>().ok());
    for name in &names {
        let granted = claims.permissions_for(name);
        assert_eq!(claims.grants_anything_on(name), !granted.is_empty());
        for permission in Permission::ALL {
            assert_eq!(claims.can(name, permission), granted.contains(permission));
        }
    }
}
