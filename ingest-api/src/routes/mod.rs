//! The HTTP surface: one module per protocol, assembled into one router.

mod audit;
mod binary_cache;
mod cache_config;
mod delete_paths;
mod hold_slot;
mod landing;
mod logs;
mod nar_body;
mod nar_transcode;
mod pins;
mod push_attic;
mod push_nix;
mod realisations;
mod stats;
mod tokens;
mod uploads;

use axum::handler::Handler;
use axum::middleware::from_fn_with_state;
use axum::routing::{delete, get, post, put};
use axum::Router;

use larder_api::cache_name::CacheName;

use crate::error::ApiError;
use crate::http_metrics::{self, MeteredRoutes, RouteMetrics, UNMATCHED_ROUTE};
use crate::state::AppState;
use hold_slot::{hold_slot, WhenBusy};

pub use stats::STATS_TIME_TO_LIVE;

/// A cache name from a path, or a 400.
fn parse_cache_name(name: &str) -> Result<CacheName, ApiError> {
    name.parse().map_err(ApiError::bad_request)
}

/// Every route of the server, each with its HTTP metrics. `GET` routes
/// also answer `HEAD`. The ops routes (`/metrics`, `/healthz`, `/readyz`,
/// not counted themselves) are merged in by [`Server::run_until`](crate::Server::run_until),
/// which decides which listener serves them.
pub fn router(state: AppState) -> Router {
    let unmatched_metrics = RouteMetrics::new(UNMATCHED_ROUTE);
    let unmatched = || from_fn_with_state(unmatched_metrics.clone(), http_metrics::record);
    // The routes that receive a NAR take upload slots first.
    let upload_slot =
        |when_busy: WhenBusy| from_fn_with_state((state.clone(), when_busy), hold_slot);
    Router::new()
        .metered_route("/", get(landing::page))
        .metered_route(
            "/_api/v1/cache-config/{cache}",
            get(cache_config::get)
                .post(cache_config::create)
                .patch(cache_config::configure)
                .delete(cache_config::destroy),
        )
        .metered_route("/_api/v1/cache-stats", get(stats::server))
        .metered_route("/_api/v1/cache-stats/{cache}", get(stats::cache))
        .metered_route("/_api/v1/audit", get(audit::all_events))
        .metered_route("/_api/v1/audit/{cache}", get(audit::cache_events))
        .metered_route("/_api/v1/purge/{cache}", post(audit::purge))
        .metered_route("/_api/v1/pins/{cache}", get(pins::list).post(pins::create))
        .metered_route("/_api/v1/pins/{cache}/{name}", delete(pins::delete))
        .metered_route("/_api/v1/whoami", get(tokens::whoami))
        .metered_route("/_api/v1/tokens", get(tokens::list).post(tokens::mint))
        .metered_route("/_api/v1/tokens/{jti}", delete(tokens::revoke))
        .metered_route(
            "/_api/v1/get-missing-paths",
            post(push_attic::get_missing_paths),
        )
        .metered_route(
            "/_api/v1/upload-path",
            put(push_attic::upload_path.layer(upload_slot(WhenBusy::Refuse))),
        )
        .metered_route("/_api/v1/delete-paths", post(delete_paths::delete_paths))
        .metered_route("/_api/v1/uploads/{id}", get(uploads::status))
        .metered_route(
            "/{cache}/nix-cache-info",
            get(binary_cache::cache_info).put(push_nix::put_cache_info),
        )
        .metered_route(
            "/{cache}/nar/{file}",
            get(binary_cache::nar)
                .head(push_nix::head_nar)
                .put(push_nix::put_nar.layer(upload_slot(WhenBusy::Wait))),
        )
        .metered_route("/{cache}/log/{drv}", get(logs::get_log).put(logs::put_log))
        .metered_route(
            "/{cache}/debuginfo/{build_id}",
            get(logs::get_debug_info).put(logs::put_debug_info),
        )
        .metered_route(
            "/{cache}/realisations/{file}",
            get(realisations::get).put(realisations::put),
        )
        .metered_route(
            "/{cache}/build-trace-v2/{drv}/{file}",
            get(realisations::get_build_trace).put(realisations::put_build_trace),
        )
        .metered_route(
            "/{cache}/{file}",
            get(binary_cache::root_file).put(push_nix::put_root_file),
        )
        .fallback((|| async { ApiError::NoSuchEndpoint }).layer(unmatched()))
        .method_not_allowed_fallback((|| async { ApiError::MethodNotAllowed }).layer(unmatched()))
        .with_state(state)
}
