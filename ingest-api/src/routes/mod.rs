//! The HTTP surface: one module per protocol, assembled into one router.

mod binary_cache;
mod cache_config;
mod landing;

use axum::routing::get;
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
        .route("/{cache}/nix-cache-info", get(binary_cache::cache_info))
        .route("/{cache}/nar/{file}", get(binary_cache::nar))
        .route("/{cache}/{file}", get(binary_cache::root_file))
        .fallback(|| async { ApiError::NoSuchEndpoint })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}
