//! End-to-end tests of the token life: mint, present, verify, authorise,
//! and every way a token must be refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::keys::tests::{HS_SECRET, RSA_PKCS1_OTHER, RSA_PKCS8, RSA_PKCS8_PUBLIC};
use super::*;
use larder_api::cache_name::CacheName;

const DAY: Duration = Duration::from_secs(86_400);
/// 2025-01-01T00:00:00Z, the "now" of these tests.
const NOW: u64 = 1_735_689_600;

fn at(unix_seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_seconds)
}

fn name(s: &str) -> CacheName {
    s.parse().expect("valid test cache name")
}

fn hs_key() -> TokenSigningKey {
    TokenSigningKey::hs256_from_base64(HS_SECRET).expect("valid test secret")
}

fn rs_key() -> TokenSigningKey {
    TokenSigningKey::rs256_from_pem(RSA_PKCS8).expect("valid test key")
}

fn verifier(key: &TokenSigningKey) -> TokenVerifier {
    TokenVerifier::new(
        key.verifying_key().clone(),
        Arc::new(RevocationList::with_revoked([])),
    )
}

fn builder() -> TokenBuilder {
    TokenBuilder::new("alice", 30 * DAY)
        .grant(
            "alice-*".parse().expect("valid pattern"),
            [Permission::Pull, Permission::Push],
        )
        .grant("shared".parse().expect("valid pattern"), Permission::Pull)
}

fn mint(key: &TokenSigningKey) -> MintedToken {
    builder().mint_at(key, at(NOW)).expect("mints")
}

/// The three base64url parts of a compact JWT.
fn parts(token: &str) -> [String; 3] {
    let parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts.try_into().expect("a compact JWT has three parts")
}

fn b64(json: &str) -> String {
    URL_SAFE_NO_PAD.encode(json)
}

#[test]
fn hs256_round_trip() {
    let key = hs_key();
    let minted = mint(&key);
    let claims = verifier(&key)
        .verify_at(&minted.token, at(NOW + 1))
        .expect("fresh token verifies");
    assert_eq!(claims, minted.claims);
    assert!(claims.can(&name("alice-ci"), Permission::Push));
    assert!(claims.can(&name("shared"), Permission::Pull));
    assert!(!claims.can(&name("shared"), Permission::Push));
    assert!(!claims.grants_anything_on(&name("bob")));

    let header = URL_SAFE_NO_PAD
        .decode(&parts(&minted.token)[0])
        .expect("header is base64url");
    assert_eq!(header, br#"{"typ":"JWT","alg":"HS256"}"#);
}

#[test]
fn rs256_round_trip_with_the_derived_public_key() {
    let key = rs_key();
    let minted = mint(&key);
    assert_eq!(
        verifier(&key).verify_at(&minted.token, at(NOW)),
        Ok(minted.claims.clone())
    );
    // A verify-only process configured with the public key alone agrees.
    let public_only = TokenVerifier::new(
        TokenVerifyingKey::rs256_from_public_pem(RSA_PKCS8_PUBLIC).expect("valid public key"),
        Arc::new(RevocationList::with_revoked([])),
    );
    assert_eq!(
        public_only.verify_at(&minted.token, at(NOW)),
        Ok(minted.claims)
    );
}

#[test]
fn alg_none_is_refused() {
    let key = hs_key();
    let minted = mint(&key);
    let [_, payload, _] = parts(&minted.token);
    for header in [r#"{"alg":"none","typ":"JWT"}"#, r#"{"alg":"None"}"#] {
        let forged = format!("{}.{payload}.", b64(header));
        let error = verifier(&key).verify_at(&forged, at(NOW)).unwrap_err();
        assert!(
            matches!(
                &error,
                AuthError::UnexpectedAlgorithm {
                    expected: TokenAlgorithm::Hs256,
                    ..
                }
            ),
            "{error:?}"
        );
    }
    let forged = format!("{}.{payload}.", b64(r#"{"alg":"none"}"#));
    assert_eq!(
        verifier(&key)
            .verify_at(&forged, at(NOW))
            .unwrap_err()
            .to_string(),
        "token is signed with \"none\", but this server accepts only HS256 tokens"
    );
}

#[test]
fn hs256_token_is_refused_by_an_rs256_server() {
    let rs = rs_key();
    let claims = builder().claims_at(at(NOW)).expect("valid builder");
    // The classic key-confusion forgery: HMAC keyed with the public key.
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(RSA_PKCS8_PUBLIC.as_bytes()),
    )
    .expect("signs");
    assert_eq!(
        verifier(&rs).verify_at(&forged, at(NOW)),
        Err(AuthError::UnexpectedAlgorithm {
            found: "\"HS256\"".to_owned(),
            expected: TokenAlgorithm::Rs256,
        })
    );
    // And the other way round.
    let rs_token = mint(&rs).token;
    assert!(matches!(
        verifier(&hs_key()).verify_at(&rs_token, at(NOW)),
        Err(AuthError::UnexpectedAlgorithm {
            expected: TokenAlgorithm::Hs256,
            ..
        })
    ));
}

#[test]
fn tampered_payload_is_refused() {
    for key in [hs_key(), rs_key()] {
        let minted = mint(&key);
        let [header, _, signature] = parts(&minted.token);
        let mut claims = minted.claims.clone();
        claims
            .caches
            .insert("*".parse().expect("valid pattern"), Permissions::ALL);
        let payload = b64(&serde_json::to_string(&claims).expect("serialises"));
        let tampered = format!("{header}.{payload}.{signature}");
        assert_eq!(
            verifier(&key).verify_at(&tampered, at(NOW)),
            Err(AuthError::InvalidSignature)
        );
    }
}

#[test]
fn tampered_signature_is_refused() {
    for key in [hs_key(), rs_key()] {
        let minted = mint(&key);
        let [header, payload, signature] = parts(&minted.token);
        let mut signature = URL_SAFE_NO_PAD.decode(signature).expect("base64url");
        signature[0] ^= 1;
        let tampered = format!("{header}.{payload}.{}", URL_SAFE_NO_PAD.encode(&signature));
        assert_eq!(
            verifier(&key).verify_at(&tampered, at(NOW)),
            Err(AuthError::InvalidSignature)
        );
        let truncated = format!("{header}.{payload}.");
        assert_eq!(
            verifier(&key).verify_at(&truncated, at(NOW)),
            Err(AuthError::InvalidSignature)
        );
    }
}

#[test]
fn wrong_key_is_refused() {
    let other_hs = TokenSigningKey::hs256(&[1; 32]).expect("valid secret");
    let token = mint(&other_hs).token;
    let error = verifier(&hs_key()).verify_at(&token, at(NOW)).unwrap_err();
    assert_eq!(error, AuthError::InvalidSignature);
    assert_eq!(error.to_string(), "token signature is invalid");

    let other_rs = TokenSigningKey::rs256_from_pem(RSA_PKCS1_OTHER).expect("valid key");
    let token = mint(&other_rs).token;
    assert_eq!(
        verifier(&rs_key()).verify_at(&token, at(NOW)),
        Err(AuthError::InvalidSignature)
    );
}

#[test]
fn expiry_is_enforced_with_leeway() {
    let key = hs_key();
    let minted = mint(&key);
    let exp = minted.claims.exp;
    let verifier = verifier(&key);
    let leeway = DEFAULT_LEEWAY.as_secs();
    assert!(verifier.verify_at(&minted.token, at(exp - 1)).is_ok());
    assert!(verifier
        .verify_at(&minted.token, at(exp + leeway - 1))
        .is_ok());
    let error = verifier
        .verify_at(&minted.token, at(exp + leeway))
        .unwrap_err();
    assert_eq!(error, AuthError::Expired { expired_at: exp });
    assert_eq!(error.to_string(), "token expired at 2025-01-31T00:00:00Z");

    let strict = self::verifier(&key).with_leeway(Duration::ZERO);
    assert!(strict.verify_at(&minted.token, at(exp)).is_err());
}

#[test]
fn a_token_minted_in_the_past_is_expired_now() {
    let key = hs_key();
    let old = builder()
        .mint_at(&key, at(NOW - 365 * 86_400))
        .expect("mints");
    assert!(matches!(
        verifier(&key).verify(&old.token),
        Err(AuthError::Expired { .. })
    ));
}

#[test]
fn not_yet_valid_is_enforced_with_leeway() {
    let key = hs_key();
    let start = NOW + 3_600;
    let minted = builder()
        .not_before(at(start))
        .mint_at(&key, at(NOW))
        .expect("mints");
    let verifier = verifier(&key);
    let leeway = DEFAULT_LEEWAY.as_secs();
    let error = verifier.verify_at(&minted.token, at(NOW)).unwrap_err();
    assert_eq!(error, AuthError::NotYetValid { not_before: start });
    assert_eq!(
        error.to_string(),
        "token is not valid before 2025-01-01T01:00:00Z"
    );
    assert!(verifier
        .verify_at(&minted.token, at(start - leeway - 1))
        .is_err());
    assert!(verifier
        .verify_at(&minted.token, at(start - leeway))
        .is_ok());
    assert!(verifier.verify_at(&minted.token, at(start)).is_ok());
}

#[test]
fn revoked_token_is_refused_until_unrevoked() {
    let key = hs_key();
    let minted = mint(&key);
    let verifier = verifier(&key);
    assert!(verifier.verify_at(&minted.token, at(NOW)).is_ok());

    verifier.revocations().replace([minted.claims.jti.clone()]);
    let error = verifier.verify_at(&minted.token, at(NOW)).unwrap_err();
    assert_eq!(
        error,
        AuthError::Revoked {
            jti: minted.claims.jti.clone()
        }
    );
    assert!(error.to_string().starts_with("token has been revoked"));
    // Even through the header path.
    let header = format!("Bearer {}", minted.token);
    assert!(verifier.authenticate(Some(header.as_bytes())).is_err());

    verifier.revocations().replace([]);
    assert!(verifier.verify_at(&minted.token, at(NOW)).is_ok());
}

#[test]
fn nothing_verifies_before_the_revocation_list_is_loaded() {
    let key = hs_key();
    let minted = mint(&key);
    let list = Arc::new(RevocationList::new());
    let verifier = TokenVerifier::new(key.verifying_key().clone(), Arc::clone(&list));
    assert_eq!(
        verifier.verify_at(&minted.token, at(NOW)),
        Err(AuthError::RevocationListNotLoaded)
    );
    list.replace([]);
    assert!(verifier.verify_at(&minted.token, at(NOW)).is_ok());
}

#[test]
fn authenticate_reads_both_header_forms_and_refuses_garbage() {
    let key = hs_key();
    let minted = mint(&key);
    let verifier = verifier(&key).with_leeway(Duration::from_secs(3_650 * 86_400));

    assert_eq!(verifier.authenticate(None), Ok(None));
    let bearer = format!("Bearer {}", minted.token);
    assert_eq!(
        verifier.authenticate(Some(bearer.as_bytes())),
        Ok(Some(minted.claims.clone()))
    );
    let basic = format!("Basic {}", STANDARD.encode(format!(":{}", minted.token)));
    assert_eq!(
        verifier.authenticate(Some(basic.as_bytes())),
        Ok(Some(minted.claims.clone()))
    );

    assert_eq!(
        verifier.authenticate(Some(b"Basic Og==")),
        Err(AuthError::Credentials(CredentialsError::EmptyToken))
    );
    assert!(matches!(
        verifier.authenticate(Some(b"Bearer not-a-jwt")),
        Err(AuthError::Malformed(_))
    ));
    assert_eq!(
        verifier
            .authenticate(Some(b"Basic dXNlcg=="))
            .unwrap_err()
            .to_string(),
        "basic credentials have no ':' between user and password"
    );
}

#[test]
fn malformed_tokens_are_refused_with_a_reason() {
    let key = hs_key();
    let verifier = verifier(&key);
    let minted = mint(&key);
    let [header, payload, signature] = parts(&minted.token);
    let malformed = [
        "".to_owned(),
        "abc".to_owned(),
        format!("{header}.{payload}"),
        format!("{header}.{payload}.{signature}.extra"),
        format!("!!!.{payload}.{signature}"),
        format!("{}.{payload}.{signature}", b64("not json")),
        format!("{}.{payload}.{signature}", b64(r#"{"typ":"JWT"}"#)),
        format!("{}.{payload}.{signature}", b64(r#"{"alg":256}"#)),
        format!(
            "{header}.{payload}.{signature}{}",
            "A".repeat(MAX_TOKEN_LEN)
        ),
    ];
    for token in malformed {
        assert!(
            matches!(
                verifier.verify_at(&token, at(NOW)),
                Err(AuthError::Malformed(_))
            ),
            "{token:?} must be malformed"
        );
    }
    let weird_alg = format!("{}.{payload}.{signature}", b64(r#"{"alg":"<script>"}"#));
    assert_eq!(
        verifier.verify_at(&weird_alg, at(NOW)),
        Err(AuthError::UnexpectedAlgorithm {
            found: "an unknown algorithm".to_owned(),
            expected: TokenAlgorithm::Hs256
        })
    );
}

#[test]
fn signed_payloads_of_the_wrong_shape_are_refused() {
    let key = hs_key();
    let verifier = verifier(&key);
    let secret = STANDARD.decode(HS_SECRET).expect("valid base64");
    let sign = |payload: serde_json::Value| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &payload,
            &EncodingKey::from_secret(&secret),
        )
        .expect("signs")
    };

    let no_jti = sign(serde_json::json!({
        "sub": "a", "iat": NOW, "exp": NOW + 60, "caches": {}
    }));
    let error = verifier.verify_at(&no_jti, at(NOW)).unwrap_err();
    assert!(
        matches!(&error, AuthError::InvalidClaims(message) if message.contains("jti")),
        "{error:?}"
    );

    let with_audience = sign(serde_json::json!({
        "sub": "a", "iat": NOW, "exp": NOW + 60, "jti": "x", "caches": {}, "aud": "other"
    }));
    assert!(matches!(
        verifier.verify_at(&with_audience, at(NOW)),
        Err(AuthError::InvalidClaims(_))
    ));
}

#[test]
fn errors_never_contain_the_secret_or_the_token() {
    let key = hs_key();
    let minted = mint(&key);
    let other = TokenSigningKey::hs256(&[1; 32]).expect("valid secret");
    let verifier = verifier(&other);
    let error = verifier.verify_at(&minted.token, at(NOW)).unwrap_err();
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(HS_SECRET));
    assert!(!shown.contains(&minted.token));
    assert!(!format!("{verifier:?}").contains(HS_SECRET));
}
