//! `{cache}/realisations/<id>.doi`: the realisations of content-addressed
//! derivations (`ca-derivations`) as Nix up to 2.34 reads and writes them
//! in a binary cache (see `common::nix::realisation`). A `PUT` needs push
//! permission and is checked whole before anything is stored; a `GET` (or
//! `HEAD`) needs what a narinfo does and answers only while the cache holds
//! the output path, with the cache's signature beside the pusher's.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use common::auth::Permission;
use common::db::Timestamp;
use common::nix::realisation::{DrvOutputId, Realisation, MAX_REALISATION_BYTES};

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
    let name = parse_cache_name(&cache)?;
    let id = DrvOutputId::from_file_name(&file).map_err(ApiError::bad_request)?;
    let served = state.readable_cache(&caller, &name).await?;
    let realisation = state
        .database
        .realisation(served.cache.id, &id)
        .await
        .map_err(ApiError::internal)?
        .ok_or(ApiError::NoSuchPath)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        realisation.render(Some(&served.key)),
    )
        .into_response())
}

/// `PUT /{cache}/realisations/{id}.doi`.
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, file)): ApiPath<(String, String)>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let name = parse_cache_name(&cache)?;
    let id = DrvOutputId::from_file_name(&file).map_err(ApiError::bad_request)?;
    let cache = state
        .cache_with_permission(&caller, &name, Permission::Push)
        .await?;
    let bytes = read_small_body(body, MAX_REALISATION_BYTES as u64, "realisation").await?;
    let realisation = Realisation::parse(&id, &bytes).map_err(ApiError::bad_request)?;
    state
        .database
        .put_realisation(cache.id, &realisation, Timestamp::now())
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(cache = %name, id = %id, out_path = %realisation.out_path, "realisation recorded");
    Ok(StatusCode::NO_CONTENT)
}
