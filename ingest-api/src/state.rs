//! What every request handler shares: the database, storage, the token
//! verifier and the public endpoint.

use std::sync::Arc;

use common::auth::TokenVerifier;
use common::db::Database;
use common::storage::Storage;

/// Cheap to clone: everything sits behind one `Arc`.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Shared>);

#[derive(Debug)]
pub struct Shared {
    pub database: Database,
    pub storage: Arc<dyn Storage>,
    pub verifier: TokenVerifier,
    /// The configured public base URL (with a trailing `/`), if any;
    /// otherwise URLs are derived from each request's `Host`.
    pub api_endpoint: Option<String>,
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
