//! The HTTP client for Larder's API v1, speaking only `larder_api::v1` types.
//!
//! Every failure becomes an [`ApiError`] whose message is one line a user
//! can act on: the server's own JSON message for API errors, the innermost
//! cause (e.g. "Connection refused") when the server cannot be reached.

use std::time::Duration;

use larder_api::cache_name::CacheName;
use larder_api::pin::PinName;
use larder_api::v1::{
    AuditPage, CacheConfig, CacheStats, CreateCacheRequest, CreatePinRequest, ErrorResponse,
    MintTokenRequest, MintTokenResponse, PinInfo, PinList, PurgeRequest, PurgeResponse,
    ServerStats, TokenInfo, TokenList,
};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::Server;

/// How long to wait for a TCP connection before calling a server
/// unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No answer: DNS, connection, TLS or a dropped connection.
    #[error("cannot reach server {server:?} at {endpoint}: {reason}")]
    Unreachable {
        server: String,
        endpoint: String,
        reason: String,
    },
    /// The server answered with an API error.
    #[error("server {server:?}: {message}")]
    Server {
        server: String,
        status: StatusCode,
        /// The stable machine name, e.g. `NoSuchCache`.
        name: String,
        message: String,
        /// How long the server asked the client to wait (`Retry-After`
        /// in seconds, as on a 429), if it did.
        retry_after: Option<Duration>,
    },
    /// The server answered something that is not Larder's API (a proxy's
    /// error page, a different service).
    #[error(
        "server {server:?} answered {status} to {what}, which is not a Larder API answer{excerpt}"
    )]
    Unexpected {
        server: String,
        status: StatusCode,
        what: String,
        excerpt: String,
    },
}

impl ApiError {
    /// Worth retrying: the server could not be reached, or it said it is
    /// temporarily unable to answer.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Server { status, .. } | Self::Unexpected { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
        }
    }

    /// Whether the server refused for being busy (429): worth retrying
    /// after [`retry_after`](Self::retry_after), not a failure of the
    /// request itself.
    pub fn is_busy(&self) -> bool {
        self.status() == Some(StatusCode::TOO_MANY_REQUESTS)
    }

    /// The wait the server asked for, if it named one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Server { retry_after, .. } => *retry_after,
            Self::Unreachable { .. } | Self::Unexpected { .. } => None,
        }
    }

    /// The HTTP status of an answered request.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Unreachable { .. } => None,
            Self::Server { status, .. } | Self::Unexpected { status, .. } => Some(*status),
        }
    }
}

/// A client for one server.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    server: Server,
}

impl ApiClient {
    /// A client sending the server's token (if any) as a Bearer token.
    /// HTTPS certificates are checked against the system's store.
    pub fn new(server: Server) -> anyhow::Result<Self> {
        let mut headers = HeaderMap::new();
        if let Some(token) = &server.token {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| anyhow::anyhow!("the token for server {:?} contains characters that cannot go in an HTTP header", server.name))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("larder/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, server })
    }

    pub fn server(&self) -> &Server {
        &self.server
    }

    /// The URL of an API path (no leading `/`), under the server's endpoint.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.endpoint)
    }

    /// A request to an API path, for callers that need more than JSON.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, self.url(path))
    }

    /// Sends a request, turning transport failures and error answers into
    /// [`ApiError`]s; `what` names the request in messages.
    pub async fn send(&self, request: RequestBuilder, what: &str) -> Result<Response, ApiError> {
        let response = request
            .send()
            .await
            .map_err(|error| self.unreachable(&error))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(self.error_from(response, what).await)
    }

    async fn json<T: DeserializeOwned>(
        &self,
        request: RequestBuilder,
        what: &str,
    ) -> Result<T, ApiError> {
        let response = self.send(request, what).await?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|error| self.unreachable(&error))?;
        serde_json::from_slice(&body).map_err(|_| ApiError::Unexpected {
            server: self.server.name.clone(),
            status,
            what: what.to_owned(),
            excerpt: excerpt(&body),
        })
    }

    /// `POST` a JSON body, expecting a JSON answer.
    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        what: &str,
    ) -> Result<T, ApiError> {
        self.json(self.request(Method::POST, path).json(body), what)
            .await
    }

    /// `GET` a JSON answer.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
    ) -> Result<T, ApiError> {
        self.json(self.request(Method::GET, path), what).await
    }

    pub async fn cache_config(&self, cache: &CacheName) -> Result<CacheConfig, ApiError> {
        self.get_json(&cache_config_path(cache), &format!("reading cache {cache}"))
            .await
    }

    pub async fn create_cache(
        &self,
        cache: &CacheName,
        request: &CreateCacheRequest,
    ) -> Result<CacheConfig, ApiError> {
        self.post_json(
            &cache_config_path(cache),
            request,
            &format!("creating cache {cache}"),
        )
        .await
    }

    pub async fn configure_cache(
        &self,
        cache: &CacheName,
        patch: &CacheConfig,
    ) -> Result<CacheConfig, ApiError> {
        let request = self
            .request(Method::PATCH, &cache_config_path(cache))
            .json(patch);
        self.json(request, &format!("configuring cache {cache}"))
            .await
    }

    pub async fn destroy_cache(&self, cache: &CacheName) -> Result<(), ApiError> {
        let request = self.request(Method::DELETE, &cache_config_path(cache));
        self.send(request, &format!("destroying cache {cache}"))
            .await
            .map(drop)
    }

    pub async fn cache_stats(&self, cache: &CacheName) -> Result<CacheStats, ApiError> {
        self.get_json(
            &format!("_api/v1/cache-stats/{cache}"),
            &format!("reading the statistics of cache {cache}"),
        )
        .await
    }

    pub async fn server_stats(&self) -> Result<ServerStats, ApiError> {
        self.get_json("_api/v1/cache-stats", "reading the server's statistics")
            .await
    }

    /// A page of a cache's audit log.
    pub async fn audit(
        &self,
        cache: &CacheName,
        limit: u32,
        before: Option<i64>,
    ) -> Result<AuditPage, ApiError> {
        let mut request = self
            .request(Method::GET, &format!("_api/v1/audit/{cache}"))
            .query(&[("limit", limit)]);
        if let Some(before) = before {
            request = request.query(&[("before", before)]);
        }
        self.json(request, &format!("reading the audit log of cache {cache}"))
            .await
    }

    pub async fn purge(
        &self,
        cache: &CacheName,
        request: &PurgeRequest,
    ) -> Result<PurgeResponse, ApiError> {
        self.post_json(
            &format!("_api/v1/purge/{cache}"),
            request,
            &format!("purging cache {cache}"),
        )
        .await
    }

    pub async fn whoami(&self) -> Result<TokenInfo, ApiError> {
        self.get_json("_api/v1/whoami", "reading your token").await
    }

    /// The tokens this client's token manages (and itself), optionally
    /// only those of one subject.
    pub async fn list_tokens(&self, subject: Option<&str>) -> Result<TokenList, ApiError> {
        let mut request = self.request(Method::GET, "_api/v1/tokens");
        if let Some(subject) = subject {
            request = request.query(&[("subject", subject)]);
        }
        self.json(request, "listing tokens").await
    }

    pub async fn mint_token(
        &self,
        request: &MintTokenRequest,
    ) -> Result<MintTokenResponse, ApiError> {
        self.post_json("_api/v1/tokens", request, "minting a token")
            .await
    }

    /// Revokes a token by its id, which the caller has checked is hex (so
    /// that it stays one path segment).
    pub async fn revoke_token(&self, jti: &str) -> Result<TokenInfo, ApiError> {
        let request = self.request(Method::DELETE, &format!("_api/v1/tokens/{jti}"));
        self.json(request, &format!("revoking token {jti}")).await
    }

    /// Pins a path of the cache (or adds a revision to the pin); answers
    /// the pin as it now is.
    pub async fn create_pin(
        &self,
        cache: &CacheName,
        request: &CreatePinRequest,
    ) -> Result<PinInfo, ApiError> {
        self.post_json(
            &format!("_api/v1/pins/{cache}"),
            request,
            &format!("pinning {} in cache {cache}", request.name),
        )
        .await
    }

    pub async fn list_pins(&self, cache: &CacheName) -> Result<PinList, ApiError> {
        self.get_json(
            &format!("_api/v1/pins/{cache}"),
            &format!("listing the pins of cache {cache}"),
        )
        .await
    }

    /// Deletes a pin, all its revisions; the name is a validated
    /// [`PinName`], so it stays one path segment.
    pub async fn delete_pin(&self, cache: &CacheName, name: &PinName) -> Result<(), ApiError> {
        let request = self.request(Method::DELETE, &format!("_api/v1/pins/{cache}/{name}"));
        self.send(request, &format!("deleting pin {name} of cache {cache}"))
            .await
            .map(drop)
    }

    /// Removes paths from a cache, in requests of at most
    /// [`DELETE_PATHS_PER_REQUEST`] hashes; the answers are joined.
    pub async fn delete_paths(
        &self,
        cache: &CacheName,
        hashes: &[larder_nix::StorePathHash],
    ) -> Result<larder_api::v1::DeletePathsResponse, ApiError> {
        use larder_api::v1::{DeletePathsRequest, DeletePathsResponse};
        let mut answer = DeletePathsResponse {
            deleted: Vec::new(),
            not_found: Vec::new(),
        };
        for batch in hashes.chunks(DELETE_PATHS_PER_REQUEST) {
            let request = DeletePathsRequest {
                cache: cache.to_string(),
                store_path_hashes: batch.iter().map(ToString::to_string).collect(),
            };
            let part: DeletePathsResponse = self
                .post_json(
                    "_api/v1/delete-paths",
                    &request,
                    &format!("deleting paths from cache {cache}"),
                )
                .await?;
            answer.deleted.extend(part.deleted);
            answer.not_found.extend(part.not_found);
        }
        Ok(answer)
    }

    fn unreachable(&self, error: &reqwest::Error) -> ApiError {
        // reqwest's own message names the URL and a generic "error sending
        // request"; the innermost cause is what the user can act on.
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            reason = cause.to_string();
            source = cause.source();
        }
        if error.is_timeout() {
            reason = format!("timed out ({reason})");
        }
        ApiError::Unreachable {
            server: self.server.name.clone(),
            endpoint: self.server.endpoint.clone(),
            reason,
        }
    }

    async fn error_from(&self, response: Response, what: &str) -> ApiError {
        let status = response.status();
        // Only the delta-seconds form: Larder sends no HTTP dates.
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(error) => return self.unreachable(&error),
        };
        match serde_json::from_slice::<ErrorResponse>(&body) {
            Ok(error) => ApiError::Server {
                server: self.server.name.clone(),
                status,
                name: error.error,
                message: error.message,
                retry_after,
            },
            Err(_) => ApiError::Unexpected {
                server: self.server.name.clone(),
                status,
                what: what.to_owned(),
                excerpt: excerpt(&body),
            },
        }
    }
}

fn cache_config_path(cache: &CacheName) -> String {
    format!("_api/v1/cache-config/{cache}")
}

/// The start of a non-API body, on one line, for error messages.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        String::new()
    } else {
        format!(": {line}")
    }
}

/// Paths per `delete-paths` request: the server's limit.
pub const DELETE_PATHS_PER_REQUEST: usize = 10_000;
