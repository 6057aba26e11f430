//! `GET /_api/v1/audit/{cache}` (a cache's events, for holders of
//! `configure_cache` on it) and `GET /_api/v1/audit` (every event, token
//! changes included, for an operator), newest first, a page at a time;
//! and `POST /_api/v1/purge/{cache}`, which finds (and unless it is a dry
//! run, deletes) the paths one subject or one token pushed, for holders of
//! `delete` on the cache.

use std::collections::HashMap;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;

use larder_api::time::system_time;
use larder_api::v1::{self as api, AuditPage, PurgeRequest, PurgeResponse};
use larder_db::{AuditEvent, PushedBy, Timestamp};
use larder_token::Permission;

use super::delete_paths::delete_recorded;
use super::parse_cache_name;
use super::stats::require_operator;
use crate::access::Caller;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::state::AppState;

/// Events per page unless asked for fewer.
const DEFAULT_PAGE: u32 = 100;
/// The most events one page holds.
const MAX_PAGE: u32 = 1000;

/// Which page of `GET /_api/v1/audit…`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Only events older than this one (an event's `id`).
    before: Option<i64>,
    limit: Option<u32>,
}

impl PageQuery {
    fn limit(&self) -> Result<u32, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_PAGE),
            Some(limit @ 1..=MAX_PAGE) => Ok(limit),
            Some(other) => Err(ApiError::bad_request(format!(
                "limit {other} is out of range: 1 to {MAX_PAGE}"
            ))),
        }
    }
}

/// `GET /_api/v1/audit/{cache}`.
pub async fn cache_events(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let name = parse_cache_name(&cache)?;
    let limit = page.limit()?;
    let cache = state
        .cache_with_permission(&caller, &name, Permission::ConfigureCache)
        .await?;
    events_page(&state, Some(cache.id), page.before, limit).await
}

/// `GET /_api/v1/audit`.
pub async fn all_events(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    require_operator(&caller, "the whole audit log")?;
    let limit = page.limit()?;
    events_page(&state, None, page.before, limit).await
}

async fn events_page(
    state: &AppState,
    cache: Option<larder_db::CacheId>,
    before: Option<i64>,
    limit: u32,
) -> Result<Json<AuditPage>, ApiError> {
    let events = state
        .database
        .audit_events(cache, before, limit)
        .await
        .map_err(ApiError::internal)?;
    let next_before = (events.len() == limit as usize)
        .then(|| events.last().map(|event| event.id))
        .flatten();
    Ok(Json(AuditPage {
        events: events.into_iter().map(api_event).collect(),
        next_before,
    }))
}

fn api_event(event: AuditEvent) -> api::AuditEvent {
    api::AuditEvent {
        id: event.id,
        at: event.at.unix_millis(),
        cache: event.cache_name,
        subject: event.actor.subject,
        jti: event.actor.jti,
        action: event.action.to_string(),
        detail: event.detail,
    }
}

/// `POST /_api/v1/purge/{cache}`.
pub async fn purge(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
    ApiJson(request): ApiJson<PurgeRequest>,
) -> Result<Json<PurgeResponse>, ApiError> {
    let name = parse_cache_name(&cache)?;
    let pushed_by = match (request.pushed_by, request.token) {
        (Some(subject), None) => PushedBy::Subject(subject),
        (None, Some(jti)) => PushedBy::Token(jti),
        _ => {
            return Err(ApiError::bad_request(
                "name exactly one of pushed_by (a subject) and token (a token id)",
            ))
        }
    };
    let since = request.since.map(|seconds| {
        // Past the database's range of milliseconds, nothing is newer.
        let time = system_time(seconds.min(i64::MAX as u64 / 1000));
        Timestamp::from(time)
    });
    let cache = state
        .cache_with_permission(&caller, &name, Permission::Delete)
        .await?;
    let found = state
        .database
        .objects_pushed_by(cache.id, &pushed_by, since)
        .await
        .map_err(ApiError::internal)?;
    if request.dry_run {
        return Ok(Json(PurgeResponse {
            dry_run: true,
            paths: found.into_iter().map(|(_, path)| path).collect(),
        }));
    }
    let hashes = found.iter().map(|(hash, _)| *hash).collect::<Vec<_>>();
    let store_paths = found.iter().cloned().collect::<HashMap<_, _>>();
    let deleted = delete_recorded(
        &state,
        &caller,
        &cache,
        &hashes,
        |hash| serde_json::json!({ "store_path": store_paths.get(hash), "purge": true }),
    )
    .await?;
    let paths = found
        .into_iter()
        .filter(|(hash, _)| deleted.contains(hash))
        .map(|(_, path)| path)
        .collect::<Vec<_>>();
    tracing::info!(cache = %name, by = caller.subject(), deleted = paths.len(), "paths purged");
    Ok(Json(PurgeResponse {
        dry_run: false,
        paths,
    }))
}
