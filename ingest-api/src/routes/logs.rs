//! The files Nix keeps beside a cache's paths: build logs
//! (`{cache}/log/<drv>`, written by `nix store copy-log --to` and read by
//! `nix log --store`) and the debug-info index (`{cache}/debuginfo/<build
//! id>.debug`, written by `nix copy --to '…?index-debug-info=true'`), both PUT
//! with push permission and read with pull permission (anyone on a public
//! cache).
//!
//! Both are kept per cache in the database (`larder_db::build_logs`), a
//! log as one zstd frame, and replaced by a PUT again. A log may be sent
//! with a `Content-Encoding` (Nix ≥ 2.33's `log-compression`) and is
//! decoded under `[ingest] max-log-size` and the decompression ratio
//! (`spool::read_encoded_body`); it is served decoded, as `text/plain`.
//! Names are checked before any lookup, and a missing file answers like a
//! missing path: a caller who may not read the cache learns nothing about
//! it (its lookup is the read path's, `readable_cache`).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use larder_db::{EncodedLog, Timestamp};
use larder_nix::StorePath;
use larder_token::Permission;

use super::parse_cache_name;
use crate::access::Caller;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::spool::{self, SmallBodyLimit};
use crate::state::AppState;

/// The largest debug-info entry: Nix writes about 200 bytes of JSON (two
/// relative paths).
pub const MAX_DEBUG_INFO_SIZE: u64 = 64 << 10;

/// A log's name: the base name of the derivation it built
/// (`<hash>-<name>.drv`), as Nix asks for it.
fn parse_drv_name(drv: &str) -> Result<String, ApiError> {
    StorePath::from_base_name(drv)
        .map(|path| path.to_base_name())
        .map_err(ApiError::bad_request)
}

/// A debug-info entry's name: an ELF build id, 40 lowercase hex digits,
/// followed by `.debug` as Nix (2.8 to 2.34) writes it (the name of
/// `lib/debug/.build-id/<2>/<38>.debug` without its slash), or not.
fn parse_build_id(name: &str) -> Result<&str, ApiError> {
    let build_id = name.strip_suffix(".debug").unwrap_or(name);
    if build_id.len() == 40
        && build_id
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    {
        Ok(name)
    } else {
        Err(ApiError::bad_request(format!(
            "invalid debug-info name {:?}: expected an ELF build id (40 lowercase hex digits), \
             optionally followed by .debug",
            name.chars().take(80).collect::<String>()
        )))
    }
}

/// `PUT /{cache}/log/{drv}`: stores (or replaces) a build log.
pub async fn put_log(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath((cache, drv)): ApiPath<(String, String)>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let name = parse_cache_name(&cache)?;
    let drv_name = parse_drv_name(&drv)?;
    let encoding = spool::content_encoding(&headers)?;
    let cache = state
        .cache_with_permission(&caller, &name, Permission::Push)
        .await?;
    let limit = SmallBodyLimit {
        bytes: state.ingest.max_log_size,
        setting: "[ingest] max-log-size",
    };
    let log = spool::read_encoded_body(&state.door, encoding, body, limit, "build log").await?;
    let encoded = spool::run_on_door(&state.door, move || EncodedLog::encode(&log))
        .await?
        .map_err(ApiError::internal)?;
    state
        .database
        .put_build_log(cache.id, &drv_name, &encoded, Timestamp::now())
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(cache = %name, drv = %drv_name, size = encoded.size(), "build log stored");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /{cache}/log/{drv}`: the build log, decoded, as `text/plain`.
pub async fn get_log(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, drv)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let name = parse_cache_name(&cache)?;
    let drv_name = parse_drv_name(&drv)?;
    let served = state.readable_cache(&caller, &name).await?;
    let encoded = state
        .database
        .build_log(served.cache.id, &drv_name)
        .await
        .map_err(ApiError::internal)?
        .ok_or(ApiError::NoSuchFile)?;
    // Decompressing is CPU work in proportion to the log.
    let log = tokio::task::spawn_blocking(move || encoded.decode())
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        log,
    )
        .into_response())
}

/// `PUT /{cache}/debuginfo/{build id}`: stores (or replaces) a debug-info
/// entry, a JSON object whose `archive` and `member` are strings (what Nix
/// writes: the NAR file, relative to `debuginfo/`, and the debug file in
/// it). Kept as sent.
pub async fn put_debug_info(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath((cache, build_id)): ApiPath<(String, String)>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let name = parse_cache_name(&cache)?;
    let build_id = parse_build_id(&build_id)?;
    let encoding = spool::content_encoding(&headers)?;
    let cache = state
        .cache_with_permission(&caller, &name, Permission::Push)
        .await?;
    let limit = SmallBodyLimit {
        bytes: MAX_DEBUG_INFO_SIZE,
        setting: "a fixed limit for debug-info entries",
    };
    let body =
        spool::read_encoded_body(&state.door, encoding, body, limit, "debug-info entry").await?;
    let info = check_debug_info(&body)?;
    state
        .database
        .put_debug_info(cache.id, build_id, info, Timestamp::now())
        .await
        .map_err(ApiError::internal)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The entry's text, if it is what Nix writes.
fn check_debug_info(body: &[u8]) -> Result<&str, ApiError> {
    let invalid = |why: &str| {
        ApiError::bad_request(format!(
            "the debug-info entry is not a JSON object with string fields \"archive\" and \
             \"member\": {why}"
        ))
    };
    let text = std::str::from_utf8(body).map_err(|_| invalid("not UTF-8"))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|error| invalid(&error.to_string()))?;
    let field = |key: &str| value.get(key).and_then(serde_json::Value::as_str);
    match (field("archive"), field("member")) {
        (Some(_), Some(_)) => Ok(text),
        _ => Err(invalid("a field is missing or not a string")),
    }
}

/// `GET /{cache}/debuginfo/{build id}`: the entry, as uploaded.
pub async fn get_debug_info(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, build_id)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let name = parse_cache_name(&cache)?;
    let build_id = parse_build_id(&build_id)?;
    let served = state.readable_cache(&caller, &name).await?;
    let info = state
        .database
        .debug_info(served.cache.id, build_id)
        .await
        .map_err(ApiError::internal)?
        .ok_or(ApiError::NoSuchFile)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        info,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_are_forty_lowercase_hex_digits() {
        assert!(parse_build_id("0123456789abcdef0123456789abcdef01234567").is_ok());
        assert!(parse_build_id("0123456789abcdef0123456789abcdef01234567.debug").is_ok());
        for bad in [
            "0123456789abcdef0123456789abcdef0123456",
            "0123456789abcdef0123456789abcdef012345678",
            "0123456789ABCDEF0123456789abcdef01234567",
            "0123456789abcdef0123456789abcdef0123456g",
            "../../../../etc/passwd/../../0123456789ab",
            "0123456789abcdef0123456789abcdef01234567.dbg",
            ".debug",
        ] {
            assert!(parse_build_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_info_must_name_an_archive_and_a_member() {
        let good =
            br#"{"archive":"../nar/1b2m.nar.xz","member":"lib/debug/.build-id/ab/cd.debug"}"#;
        assert!(check_debug_info(good).is_ok());
        for bad in [
            &b"not json"[..],
            br#"{"archive":"../nar/x.nar.xz"}"#,
            br#"{"archive":1,"member":"m"}"#,
            br#"["archive","member"]"#,
            b"\xff\xfe",
        ] {
            assert!(check_debug_info(bad).is_err());
        }
    }
}
