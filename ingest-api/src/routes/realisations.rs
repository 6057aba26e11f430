//! `{cache}/realisations/<id>.doi` (Nix up to 2.34) and
//! `{cache}/build-trace-v2/<drv>/<output>.doi` (Nix 2.35 on): the
//! realisations of content-addressed derivations (`ca-derivations`), as
//! Nix reads and writes them in a binary cache (see
//! `larder_nix::realisation`). A `PUT` needs push
//! permission and is checked whole before anything is stored; a `GET` (or
//! `HEAD`) needs what a narinfo does and answers only while the cache holds
//! the output path, with the cache's signature beside the pusher's.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use larder_db::Timestamp;
use larder_nix::realisation::{DrvOutputId, Realisation, RealisationKey, MAX_REALISATION_BYTES};
use larder_token::Permission;

use super::parse_cache_name;
use crate::access::Caller;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::spool::read_small_body;
use crate::state::AppState;

/// `GET /{cache}/realisations/{id}.doi`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, file)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let key = DrvOutputId::from_file_name(&file).map_err(ApiError::bad_request)?;
    serve(&state, &caller, &cache, RealisationKey::DrvHash(key)).await
}

/// `PUT /{cache}/realisations/{id}.doi`.
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, file)): ApiPath<(String, String)>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let key = DrvOutputId::from_file_name(&file).map_err(ApiError::bad_request)?;
    record(&state, &caller, &cache, RealisationKey::DrvHash(key), body).await
}

/// `GET /{cache}/build-trace-v2/{drv}/{output}.doi`.
pub async fn get_build_trace(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, drv, file)): ApiPath<(String, String, String)>,
) -> Result<Response, ApiError> {
    let key = RealisationKey::from_build_trace(&drv, &file).map_err(ApiError::bad_request)?;
    serve(&state, &caller, &cache, key).await
}

/// `PUT /{cache}/build-trace-v2/{drv}/{output}.doi`.
pub async fn put_build_trace(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, drv, file)): ApiPath<(String, String, String)>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let key = RealisationKey::from_build_trace(&drv, &file).map_err(ApiError::bad_request)?;
    record(&state, &caller, &cache, key, body).await
}

/// A cache's realisation of `key`, signed, for a caller who may read it.
async fn serve(
    state: &AppState,
    caller: &Caller,
    cache: &str,
    key: RealisationKey,
) -> Result<Response, ApiError> {
    let name = parse_cache_name(cache)?;
    let served = state.readable_cache(caller, &name).await?;
    let realisation = state
        .database
        .realisation(served.cache.id, &key)
        .await
        .map_err(ApiError::internal)?
        .ok_or(ApiError::NoSuchPath)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        realisation.render(served.keys.iter()),
    )
        .into_response())
}

/// Records the realisation in `body` under `key`, for a pusher.
async fn record(
    state: &AppState,
    caller: &Caller,
    cache: &str,
    key: RealisationKey,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let name = parse_cache_name(cache)?;
    let cache = state
        .cache_with_permission(caller, &name, Permission::Push)
        .await?;
    let bytes = read_small_body(body, MAX_REALISATION_BYTES as u64, "realisation").await?;
    let realisation = Realisation::parse(&key, &bytes).map_err(ApiError::bad_request)?;
    state
        .database
        .put_realisation(cache.id, &realisation, Timestamp::now())
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(cache = %name, key = %key, out_path = %realisation.out_path, "realisation recorded");
    Ok(StatusCode::NO_CONTENT)
}
