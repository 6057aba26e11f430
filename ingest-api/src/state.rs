//! What every request handler shares: the database, storage, the job
//! queue, the token verifier and the public endpoint.

use std::sync::Arc;

use bytes::Bytes;

use common::auth::TokenVerifier;
use common::cache_name::CacheName;
use common::config::IngestConfig;
use common::db::{Cache, CacheId, Database};
use common::nix::signing::SecretKey;
use common::nix::StorePathHash;
use common::queue::Queue;
use common::storage::Storage;

use crate::access_log::AccessLog;
use crate::spool::Door;
use crate::ttl_cache::TtlCache;

/// Cheap to clone: everything sits behind one `Arc`.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Shared>);

#[derive(Debug)]
pub struct Shared {
    pub database: Database,
    pub storage: Arc<dyn Storage>,
    /// Where spooled uploads' chunk jobs go.
    pub queue: Arc<dyn Queue>,
    pub ingest: IngestConfig,
    /// The upload verifier's limits and bounded CPU pool.
    pub door: Door,
    pub verifier: TokenVerifier,
    /// The configured public base URL (with a trailing `/`), if any;
    /// otherwise URLs are derived from each request's `Host`.
    pub api_endpoint: Option<String>,
    /// Caches by name with their parsed signing keys, for the read path.
    pub served_caches: TtlCache<CacheName, Arc<ServedCache>>,
    /// Rendered, signed narinfos by cache and store-path hash.
    pub narinfos: TtlCache<(CacheId, StorePathHash), Bytes>,
    /// Narinfo and NAR fetches, flushed to `objects.last_accessed_at` in
    /// batches.
    pub access_log: Arc<AccessLog>,
}

/// A cache as the read path needs it: its row and its parsed secret key,
/// so a narinfo request neither queries the cache nor re-parses the key.
#[derive(Debug)]
pub struct ServedCache {
    pub cache: Cache,
    pub key: SecretKey,
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }

    /// Forgets what the read path cached, after a cache was created,
    /// reconfigured or destroyed through this server.
    pub fn forget_cached_reads(&self) {
        self.served_caches.clear();
        self.narinfos.clear();
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
