//! The operator's token commands (`make-token`, `list-tokens`,
//! `revoke-token`): they run beside the server, on its config and database.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use larder_api::cache_name::CacheNamePattern;
use larder_api::time::format_rfc3339;
use larder_config::ServerConfig;
use larder_db::{Database, TokenRecord};
use larder_token::{Claims, MintedToken, Permission, TokenBuilder};

use crate::{signing_key, ServerError};

/// What `make-token` was asked for.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub subject: String,
    pub validity: Duration,
    pub grants: Vec<(CacheNamePattern, Permission)>,
}

impl TokenRequest {
    fn builder(&self) -> TokenBuilder {
        self.grants.iter().fold(
            TokenBuilder::new(self.subject.clone(), self.validity),
            |builder, (pattern, permission)| builder.grant(pattern.clone(), *permission),
        )
    }
}

/// The claims the token would carry, unsigned (`--dump-claims`).
pub fn claims_preview(request: &TokenRequest) -> Result<Claims, ServerError> {
    Ok(request.builder().claims_at(SystemTime::now())?)
}

/// Mints a token and records it, so that it can be listed and revoked.
pub async fn mint_and_record(
    config: &ServerConfig,
    request: &TokenRequest,
) -> Result<MintedToken, ServerError> {
    let database = open_database(config).await?;
    let minted = request.builder().mint(&signing_key(config)?)?;
    record(&database, &minted).await?;
    Ok(minted)
}

/// Stores a minted token's claims in the token table.
pub(crate) async fn record(database: &Database, minted: &MintedToken) -> Result<(), ServerError> {
    let claims = &minted.claims;
    database
        .record_token(&TokenRecord {
            jti: claims.jti.clone(),
            sub: claims.sub.clone(),
            claims: serde_json::to_value(claims)
                .map_err(|error| ServerError::Internal(error.to_string()))?,
            issued_at: claims.issued_at().into(),
            expires_at: claims.expires_at().into(),
            revoked_at: None,
        })
        .await?;
    Ok(())
}

/// A table of the minted tokens, newest last.
pub async fn list(config: &ServerConfig) -> Result<String, ServerError> {
    let database = open_database(config).await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<32}  {:<20}  {:<20}  {:<20}  STATUS",
        "JTI", "SUBJECT", "ISSUED", "EXPIRES"
    );
    let now = SystemTime::now();
    for token in database.list_tokens(None).await? {
        let status = match token.revoked_at {
            Some(at) => format!("revoked {}", format_rfc3339(at.into())),
            None if SystemTime::from(token.expires_at) < now => "expired".to_owned(),
            None => "valid".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<32}  {:<20}  {:<20}  {:<20}  {status}",
            token.jti,
            token.sub,
            format_rfc3339(token.issued_at.into()),
            format_rfc3339(token.expires_at.into())
        );
    }
    Ok(out)
}

/// Revokes a token by `jti`.
pub async fn revoke(config: &ServerConfig, jti: &str) -> Result<(), ServerError> {
    let database = open_database(config).await?;
    database.revoke_token(jti, SystemTime::now().into()).await?;
    Ok(())
}

/// The admin commands may run before the server ever has: migrate first.
async fn open_database(config: &ServerConfig) -> Result<Database, ServerError> {
    let database = Database::connect(config.database.url.expose()).await?;
    database.migrate().await?;
    Ok(database)
}
