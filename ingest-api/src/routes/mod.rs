//! The HTTP surface: one module per protocol, assembled into one router.

mod binary_cache;
mod cache_config;
mod delete_paths;
mod landing;
mod push_attic;
mod push_nix;
mod uploads;

use axum::routing::{get, post, put};
use axum::Router;

use crate::error::ApiError;
use crate::state::AppState;

/// Every route of the server. `GET` routes also answer `HEAD`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(landing::page))
        .route(
            "/_api/v1/cache-config/{cache}",
            get(cache_config::get)
                .post(cache_config::create)
                .patch(cache_config::configure)
                .delete(cache_config::destroy),
        )
        .route(
            "/_api/v1/get-missing-paths",
            post(push_attic::get_missing_paths),
        )
        .route("/_api/v1/upload-path", put(push_attic::upload_path))
        .route("/_api/v1/delete-paths", post(delete_paths::delete_paths))
        .route("/_api/v1/uploads/{id}", get(uploads::status))
        .route(
            "/{cache}/nix-cache-info",
            get(binary_cache::cache_info).put(push_nix::put_cache_info),
        )
        .route(
            "/{cache}/nar/{file}",
            get(binary_cache::nar)
                .head(push_nix::head_nar)
                .put(push_nix::put_nar),
        )
        .route("/{cache}/log/{drv}", put(push_nix::put_log))
        .route(
            "/{cache}/{file}",
            get(binary_cache::root_file).put(push_nix::put_root_file),
        )
        .fallback(|| async { ApiError::NoSuchEndpoint })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}
