//! The one error type of the HTTP layer, and its JSON shape.
//!
//! Every failure a client can see is a variant here with a stable machine
//! name (`error`), an HTTP status and a readable message:
//! `{"code": 404, "error": "NoSuchCache", "message": "…"}`. Internal
//! failures are logged in full and reach the client only as a generic
//! `InternalServerError`, so nothing about the server's innards leaks.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The `Retry-After` of a 429, in seconds: about how long a small upload
/// takes. Clients back off further on repeated refusals.
pub const RETRY_AFTER_SECONDS: u64 = 2;

/// A request that could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No credentials where some are needed, or credentials that are
    /// invalid, expired or revoked: never treated as anonymous.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller may see the cache but not do this to it.
    #[error("{0}")]
    Forbidden(String),
    /// The cache does not exist, or the caller may not know that it does:
    /// the two answers are the same on purpose.
    #[error("no such cache, or you are not allowed to see it")]
    NoSuchCache,
    /// The path is not in the cache (or its upload is not complete yet).
    #[error("no such path in this cache")]
    NoSuchPath,
    /// No such build log or debug-info entry in the cache.
    #[error("no such file in this cache")]
    NoSuchFile,
    /// No such upload, or not one the caller may follow: the same answer.
    #[error("no such upload, or you are not allowed to see it")]
    NoSuchUpload,
    /// No pin of that name in the cache.
    #[error("no such pin in this cache")]
    NoSuchPin,
    /// No such token, or not one the caller manages: the same answer.
    #[error("no such token, or you are not allowed to manage it")]
    NoSuchToken,
    /// The pipeline gave up on an upload; the reason is the pipeline's.
    /// A 4xx, not a 5xx: Nix 2.8 re-sends a PUT that got a 5xx without its
    /// body, and the client can do nothing better than push again.
    #[error("the upload failed: {0}")]
    UploadFailed(String),
    #[error("a cache with this name already exists")]
    CacheAlreadyExists,
    /// The change is well-formed but the cache's current state forbids it.
    #[error("{0}")]
    Conflict(String),
    /// Malformed input of any kind: a bad hash, name, URL or body.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A `Content-Encoding` the server does not decode.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Past a limit on concurrent uploads (the message names it); answered
    /// with `Retry-After` before any of the body is read.
    #[error("{0}")]
    TooManyUploads(String),
    /// The push would take its cache over its storage quota; nothing
    /// stored was touched. The message names the quota, the usage and the
    /// push's size.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The server as a whole has no room for the push (its storage is
    /// full, or would be within its reserve). A 5xx: the tenant did
    /// nothing wrong, and Nix and `larder push` retry it later.
    #[error("{0}")]
    InsufficientStorage(String),
    /// A `Range` that selects no byte of a NAR of `size` bytes (answered
    /// with `Content-Range: bytes */size`).
    #[error("the requested range selects no byte of the {size} bytes of this NAR")]
    RangeNotSatisfiable { size: u64 },
    #[error("no such endpoint")]
    NoSuchEndpoint,
    #[error("method not allowed here")]
    MethodNotAllowed,
    /// A bug or an infrastructure failure; the details are logged, not sent.
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

impl ApiError {
    pub fn bad_request(message: impl std::fmt::Display) -> Self {
        Self::BadRequest(message.to_string())
    }

    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::Internal(error.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NoSuchCache
            | Self::NoSuchPath
            | Self::NoSuchFile
            | Self::NoSuchUpload
            | Self::NoSuchPin
            | Self::NoSuchToken
            | Self::NoSuchEndpoint => StatusCode::NOT_FOUND,
            Self::UploadFailed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::CacheAlreadyExists | Self::Conflict(_) => StatusCode::CONFLICT,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::TooManyUploads(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::PayloadTooLarge(_) | Self::QuotaExceeded(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            Self::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable name clients may match on.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "Unauthorized",
            Self::Forbidden(_) => "Forbidden",
            Self::NoSuchCache => "NoSuchCache",
            Self::NoSuchPath => "NoSuchPath",
            Self::NoSuchFile => "NoSuchFile",
            Self::NoSuchUpload => "NoSuchUpload",
            Self::NoSuchPin => "NoSuchPin",
            Self::NoSuchToken => "NoSuchToken",
            Self::UploadFailed(_) => "UploadFailed",
            Self::CacheAlreadyExists => "CacheAlreadyExists",
            Self::Conflict(_) => "Conflict",
            Self::BadRequest(_) => "BadRequest",
            Self::PayloadTooLarge(_) => "PayloadTooLarge",
            Self::UnsupportedMediaType(_) => "UnsupportedMediaType",
            Self::TooManyUploads(_) => "TooManyUploads",
            Self::QuotaExceeded(_) => "QuotaExceeded",
            Self::InsufficientStorage(_) => "InsufficientStorage",
            Self::RangeNotSatisfiable { .. } => "RangeNotSatisfiable",
            Self::NoSuchEndpoint => "NoSuchEndpoint",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::Internal(_) => "InternalServerError",
        }
    }
}

/// The JSON body of every error answer.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    code: u16,
    error: &'a str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            Self::Internal(error) => {
                tracing::error!(
                    error = format!("{error:#}"),
                    "internal error while serving a request"
                );
                "internal server error; the details are in the server's log".to_owned()
            }
            other => other.to_string(),
        };
        let body = ErrorBody {
            code: status.as_u16(),
            error: self.name(),
            message,
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Self::RangeNotSatisfiable { size } = self {
            // Digits and ASCII: always a valid header value.
            if let Ok(value) = HeaderValue::try_from(format!("bytes */{size}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        if status == StatusCode::UNAUTHORIZED {
            // Lets curl and browsers know Basic auth (what Nix sends from
            // netrc) is an option; Bearer works too.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"larder\""),
            );
        }
        response
    }
}
