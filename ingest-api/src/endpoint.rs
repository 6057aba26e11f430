//! The server's public base URL, for answers that tell clients where to go.
//!
//! Behind a reverse proxy, `api-endpoint` is the one way to say what that
//! URL is. `X-Forwarded-Proto` and `X-Forwarded-Host` are deliberately not
//! honoured: the URLs built here end up in users' nix.conf and netrc (through
//! `larder use`) and in the first start's login line, so they must be the
//! canonical public name, not whichever name or scheme one request happened
//! to use; honouring them safely would take a list of trusted proxy
//! addresses, which cloud load balancers do not keep fixed; and a configured
//! URL works the same behind any number of proxies, CDNs or none. Without
//! `api-endpoint`, URLs come from the request's `Host` with `http://`, right
//! for a server reached directly. A request that shows a proxy in front
//! (an `X-Forwarded-Proto` or `X-Forwarded-Host` header) while
//! `api-endpoint` is unset gets a warning in the log, once per process.

use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::{header, HeaderMap, HeaderName};

use crate::state::AppState;

/// Headers a reverse proxy adds, whose presence means one is in front.
const FORWARDED_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
];

/// Whether the missing-`api-endpoint` warning was logged already.
static WARNED_BEHIND_PROXY: AtomicBool = AtomicBool::new(false);

/// The configured `api-endpoint`, or `http://<Host header>/`; always with a
/// trailing `/`.
pub fn public_endpoint(state: &AppState, headers: &HeaderMap) -> String {
    if state.api_endpoint.is_none()
        && FORWARDED_HEADERS
            .iter()
            .any(|name| headers.contains_key(name))
        && !WARNED_BEHIND_PROXY.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(
            "a request came through a reverse proxy (it carries X-Forwarded-* headers), but \
             api-endpoint is not set: the URLs this server hands out (cache substituter and API \
             endpoints) are built from the Host header with http://; set api-endpoint to the \
             public URL, e.g. https://cache.example.com/"
        );
    }
    endpoint_for(state.api_endpoint.as_deref(), headers)
}

/// [`public_endpoint`] without the warning: `api_endpoint`, or the URL
/// derived from `Host`.
fn endpoint_for(api_endpoint: Option<&str>, headers: &HeaderMap) -> String {
    if let Some(endpoint) = api_endpoint {
        return endpoint.to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        // A Host header is client input: keep it only if it looks like one.
        .filter(|host| {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        })
        .unwrap_or("localhost");
    format!("http://{host}/")
}

/// Normalises a configured endpoint to end with exactly one `/`.
pub fn with_trailing_slash(endpoint: &str) -> String {
    format!("{}/", endpoint.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                HeaderValue::from_str(value).expect("a header value"),
            );
        }
        headers
    }

    #[test]
    fn the_configured_endpoint_wins_over_every_header() {
        let proxied = headers(&[
            ("host", "internal:8080"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example.com"),
        ]);
        assert_eq!(
            endpoint_for(Some("https://cache.example.com/"), &proxied),
            "https://cache.example.com/"
        );
    }

    #[test]
    fn without_one_the_host_header_is_used_and_forwarded_headers_are_not() {
        let proxied = headers(&[
            ("host", "cache.example.com:8443"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example.com"),
        ]);
        assert_eq!(
            endpoint_for(None, &proxied),
            "http://cache.example.com:8443/"
        );
        let hostile = headers(&[("host", "a/b@evil")]);
        assert_eq!(endpoint_for(None, &hostile), "http://localhost/");
        assert_eq!(endpoint_for(None, &HeaderMap::new()), "http://localhost/");
    }
}
