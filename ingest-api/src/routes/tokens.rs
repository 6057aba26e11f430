//! The token API: `GET /_api/v1/whoami`, and `GET`/`POST /_api/v1/tokens`
//! and `DELETE /_api/v1/tokens/{jti}` for tokens holding `manage_tokens`.
//!
//! What a caller may see and do follows `larder_token::delegation`: it
//! lists and revokes the tokens it manages (`manage_tokens` on every name
//! they mention) and its own, and mints only within its own permissions
//! and lifetime. A token it does not manage is answered like one that does
//! not exist, so the API tells nobody which tokens others hold.
//!
//! A revocation takes effect on this server at once and on every other
//! replica with its next reload of the revocation list
//! ([`REVOCATION_REFRESH_INTERVAL`](crate::REVOCATION_REFRESH_INTERVAL)).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::Json;
use serde::Deserialize;

use larder_api::cache_name::CacheNamePattern;
use larder_api::time::unix_seconds;
use larder_api::v1::{MintTokenRequest, MintTokenResponse, TokenInfo, TokenList};
use larder_db::{AuditAction, DbError, Timestamp, TokenRecord};
use larder_token::{Claims, MintError, Permissions, TokenBuilder};

use crate::access::Caller;
use crate::audit;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::state::AppState;

/// The longest subject a minted token may carry.
const MAX_SUBJECT_LEN: usize = 256;
/// The most cache patterns a minted token may name.
const MAX_PATTERNS: usize = 64;

/// `GET /_api/v1/whoami`: the caller's own token.
pub async fn whoami(caller: Caller) -> Result<Json<TokenInfo>, ApiError> {
    Ok(Json(token_info(signed_in(&caller)?, None)))
}

/// The filter of `GET /_api/v1/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    subject: Option<String>,
}

/// `GET /_api/v1/tokens[?subject=…]`: the tokens the caller manages, and
/// its own, oldest first, revoked and expired ones included.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<TokenList>, ApiError> {
    let caller = signed_in(&caller)?;
    let records = state
        .database
        .list_tokens(query.subject.as_deref())
        .await
        .map_err(ApiError::internal)?;
    let mut tokens = Vec::new();
    for record in records {
        let claims = recorded_claims(&record)?;
        if is_visible_to(caller, &claims) {
            tokens.push(token_info(&claims, record.revoked_at));
        }
    }
    Ok(Json(TokenList { tokens }))
}

/// `POST /_api/v1/tokens`: mints a token within the caller's own reach
/// and records it, so that it can be listed and revoked.
pub async fn mint(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(request): ApiJson<MintTokenRequest>,
) -> Result<Json<MintTokenResponse>, ApiError> {
    let minter = signed_in(&caller)?;
    let builder = builder_for(&request)?;
    let minted = builder
        .mint_by(&state.token_key, minter)
        .map_err(|error| match error {
            MintError::Delegation(denied) => ApiError::Forbidden(denied.to_string()),
            MintError::Signing(_) => ApiError::internal(error),
            other => ApiError::bad_request(other),
        })?;
    crate::tokens::record(&state.database, &minted)
        .await
        .map_err(ApiError::internal)?;
    let detail = serde_json::json!({
        "token": minted.claims.jti,
        "subject": minted.claims.sub,
        "expires_at": minted.claims.exp,
        "caches": minted.claims.caches,
    });
    audit::record(&state, &caller, None, AuditAction::TokenMint, [detail]).await;
    tracing::info!(
        jti = %minted.claims.jti,
        subject = %minted.claims.sub,
        by = %minter.sub,
        by_jti = %minter.jti,
        "token minted"
    );
    Ok(Json(MintTokenResponse {
        info: token_info(&minted.claims, None),
        token: minted.token,
    }))
}

/// `DELETE /_api/v1/tokens/{jti}`: revokes a token the caller manages, or
/// its own. Revoking again keeps the first revocation's time.
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(jti): ApiPath<String>,
) -> Result<Json<TokenInfo>, ApiError> {
    let revoker = signed_in(&caller)?;
    let record = state
        .database
        .token(&jti)
        .await
        .map_err(ApiError::internal)?
        .ok_or(ApiError::NoSuchToken)?;
    let claims = recorded_claims(&record)?;
    if !is_visible_to(revoker, &claims) {
        return Err(ApiError::NoSuchToken);
    }
    let revoked = match state
        .database
        .revoke_token(&jti, SystemTime::now().into())
        .await
    {
        Ok(revoked) => revoked,
        Err(DbError::NotFound { .. }) => return Err(ApiError::NoSuchToken),
        Err(error) => return Err(ApiError::internal(error)),
    };
    // Here at once; other replicas on their next reload.
    state.verifier.revocations().revoke(jti.clone());
    tracing::info!(%jti, subject = %claims.sub, by = %revoker.sub, by_jti = %revoker.jti, "token revoked");
    let detail = serde_json::json!({ "token": jti, "subject": claims.sub });
    audit::record(&state, &caller, None, AuditAction::TokenRevoke, [detail]).await;
    Ok(Json(token_info(&claims, revoked.revoked_at)))
}

/// The token API is for tokens: an anonymous caller has none to manage.
fn signed_in(caller: &Caller) -> Result<&Claims, ApiError> {
    caller
        .claims()
        .ok_or_else(|| ApiError::Unauthorized("the token API needs a token".to_owned()))
}

/// A caller sees the tokens it manages, and its own.
fn is_visible_to(caller: &Claims, token: &Claims) -> bool {
    token.jti == caller.jti || caller.manages(token)
}

/// The builder for a mint request, every name checked: an unknown
/// permission or a bad pattern is a 400, not skipped as a token's own
/// claims would be.
fn builder_for(request: &MintTokenRequest) -> Result<TokenBuilder, ApiError> {
    // A token travels in every request's headers: its claims stay small.
    if request.subject.len() > MAX_SUBJECT_LEN {
        return Err(ApiError::bad_request(format!(
            "the subject is {} bytes long: at most {MAX_SUBJECT_LEN}",
            request.subject.len()
        )));
    }
    if request.caches.len() > MAX_PATTERNS {
        return Err(ApiError::bad_request(format!(
            "the token names {} cache patterns: at most {MAX_PATTERNS}",
            request.caches.len()
        )));
    }
    let mut builder = TokenBuilder::new(
        request.subject.clone(),
        Duration::from_secs(request.valid_for_secs),
    );
    for (pattern, names) in &request.caches {
        let pattern: CacheNamePattern = pattern.parse().map_err(ApiError::bad_request)?;
        let permissions = names
            .iter()
            .map(|name| name.parse())
            .collect::<Result<Permissions, _>>()
            .map_err(ApiError::bad_request)?;
        builder = builder.grant(pattern, permissions);
    }
    Ok(builder)
}

fn recorded_claims(record: &TokenRecord) -> Result<Claims, ApiError> {
    serde_json::from_value(record.claims.clone()).map_err(|error| {
        ApiError::internal(anyhow::anyhow!(
            "token {} has unreadable recorded claims: {error}",
            record.jti
        ))
    })
}

fn token_info(claims: &Claims, revoked_at: Option<Timestamp>) -> TokenInfo {
    TokenInfo {
        jti: claims.jti.clone(),
        subject: claims.sub.clone(),
        issued_at: claims.iat,
        not_before: claims.nbf,
        expires_at: claims.exp,
        revoked_at: revoked_at.map(|at| unix_seconds(at.into())),
        caches: claims
            .caches
            .iter()
            .map(|(pattern, permissions)| {
                (
                    pattern.to_string(),
                    permissions.iter().map(|p| p.name().to_owned()).collect(),
                )
            })
            .collect::<BTreeMap<_, _>>(),
    }
}
