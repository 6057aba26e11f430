//! The server's public base URL, for answers that tell clients where to go.

use axum::http::{header, HeaderMap};

use crate::state::AppState;

/// The configured `api-endpoint`, or `http://<Host header>/`; always with a
/// trailing `/`.
pub fn public_endpoint(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(endpoint) = &state.api_endpoint {
        return endpoint.clone();
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
