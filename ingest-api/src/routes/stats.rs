//! `GET /_api/v1/cache-stats/{cache}` (a cache's own figures, for any
//! token with a permission on it) and `GET /_api/v1/cache-stats` (the
//! whole server and how its caches share storage, for an operator).
//!
//! What each figure means, and why a tenant's never depend on other
//! caches, is documented on `larder_api::v1::CacheStats`. Both read every
//! chunk-list row of the caches they cover, so a cache's figures are
//! computed at most once per [`STATS_TIME_TO_LIVE`] on each server.

use std::time::Duration;

use axum::extract::State;
use axum::Json;

use larder_api::cache_name::{CacheName, CacheNamePattern};
use larder_api::time::unix_seconds;
use larder_api::v1 as api;
use larder_db::{dedup_ratio, CacheStats};
use larder_token::Permission;

use super::parse_cache_name;
use crate::access::Caller;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::AppState;

/// How old a cache's figures may be when served again.
pub const STATS_TIME_TO_LIVE: Duration = Duration::from_secs(10);

/// The permission on every cache (`*`) that makes a token an operator's,
/// for the server-wide figures and audit log: the one meant for operators
/// alone.
const OPERATOR_PERMISSION: Permission = Permission::ConfigureCacheQuota;

/// `GET /_api/v1/cache-stats/{cache}`.
pub async fn cache(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
) -> Result<Json<api::CacheStats>, ApiError> {
    let name = parse_cache_name(&cache)?;
    let cache = state.tenant_cache(&caller, &name).await?;
    if let Some(stats) = state.cache_stats.get(&cache.id) {
        return Ok(Json(stats));
    }
    let stats = state
        .database
        .per_cache_stats(cache.id)
        .await
        .map_err(ApiError::internal)?;
    let stats = api_stats(&name, &stats);
    state.cache_stats.insert(cache.id, stats.clone());
    Ok(Json(stats))
}

/// `GET /_api/v1/cache-stats`.
pub async fn server(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<api::ServerStats>, ApiError> {
    require_operator(&caller, "the server's statistics")?;
    let stats = state
        .database
        .server_stats()
        .await
        .map_err(ApiError::internal)?;
    let caches = stats
        .caches
        .iter()
        .map(|cache| api::SharedCacheStats {
            stats: api_stats(&cache.name, &cache.stats),
            unique_bytes: cache.unique_bytes,
            shared_bytes: cache.stats.stored_bytes - cache.unique_bytes,
            // Rounded to whole bytes; non-negative and far below 2^53.
            attributed_bytes: cache.attributed_bytes.round() as u64,
        })
        .collect::<Vec<_>>();
    let paths = caches.iter().map(|cache| cache.stats.paths).sum();
    let nar_bytes = caches.iter().map(|cache| cache.stats.nar_bytes).sum();
    Ok(Json(api::ServerStats {
        paths,
        nar_bytes,
        stored_bytes: stats.stored_bytes,
        referenced_bytes: stats.referenced_bytes,
        dedup_ratio: dedup_ratio(nar_bytes, stats.stored_bytes),
        caches,
    }))
}

/// Checks that the caller is an operator: its token grants
/// [`OPERATOR_PERMISSION`] on every cache. `what` names what needs it.
pub(super) fn require_operator(caller: &Caller, what: &str) -> Result<(), ApiError> {
    let is_operator = caller.claims().is_some_and(|claims| {
        claims.grants_on_every(&CacheNamePattern::everything(), OPERATOR_PERMISSION.into())
    });
    if is_operator {
        return Ok(());
    }
    let message = format!(
        "only a token with {} on every cache (*) may read {what}",
        OPERATOR_PERMISSION.name()
    );
    Err(match caller.claims() {
        None => ApiError::Unauthorized(message),
        Some(_) => ApiError::Forbidden(message),
    })
}

fn api_stats(name: &CacheName, stats: &CacheStats) -> api::CacheStats {
    api::CacheStats {
        cache: name.to_string(),
        paths: stats.object_count,
        nar_bytes: stats.logical_bytes,
        stored_bytes: stats.stored_bytes,
        dedup_ratio: stats.dedup_ratio(),
        last_push: stats.last_push.map(|at| unix_seconds(at.into())),
        last_access: stats.last_access.map(|at| unix_seconds(at.into())),
    }
}
