//! `GET /`: what this server is and how to use it, for a person who opens
//! the URL in a browser.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Html;

use crate::endpoint::public_endpoint;
use crate::state::AppState;

pub async fn page(State(state): State<AppState>, headers: HeaderMap) -> Html<String> {
    let endpoint = public_endpoint(&state, &headers);
    Html(format!(
        r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Larder</title></head>
<body>
<h1>Larder</h1>
<p>This is a <a href="https://nixos.org/">Nix</a> binary cache server. Each cache is served at <code>{endpoint}&lt;cache&gt;</code>.</p>
<h2>Use it</h2>
<pre>
larder login myserver {endpoint} &lt;token&gt;
larder cache create hello
larder push hello ./result
larder use hello
</pre>
<p>Plain Nix works too: <code>nix copy --to '{endpoint}hello' ./result</code> pushes (with a push token in netrc), and any Nix can substitute from <code>{endpoint}hello</code>.</p>
<p>Tokens are minted by the operator with <code>ingest-api make-token</code>.</p>
</body>
</html>
"#
    ))
}
