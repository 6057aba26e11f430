//! What every request handler shares: the database, storage, the job
//! queue, the token verifier and key, and the public endpoint.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use larder_api::cache_name::CacheName;
use larder_api::v1::CacheStats;
use larder_config::{IngestConfig, QuotaConfig};
use larder_db::{Cache, CacheId, CacheKeypair, CacheScope, Database};
use larder_nix::signing::SecretKey;
use larder_nix::StorePathHash;
use larder_queue::Queue;
use larder_storage::Storage;
use larder_token::{TokenSigningKey, TokenVerifier};

use crate::access_log::AccessLog;
use crate::error::ApiError;
use crate::spool::Door;
use crate::ttl_cache::TtlCache;
use crate::upload_slots::UploadSlots;

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
    /// The room pushes must leave on local storage (quotas themselves are
    /// enforced by the database handle).
    pub quota: QuotaConfig,
    /// The upload verifier's limits and bounded CPU pool.
    pub door: Door,
    pub verifier: TokenVerifier,
    /// Mints the tokens the token API hands out.
    pub token_key: TokenSigningKey,
    /// The configured public base URL (with a trailing `/`), if any;
    /// otherwise URLs are derived from each request's `Host`.
    pub api_endpoint: Option<String>,
    /// Caches by name with their parsed signing keys, for the read path.
    pub served_caches: ServedCaches,
    /// Rendered, signed narinfos by cache and store-path hash.
    pub narinfos: TtlCache<(CacheId, StorePathHash), Bytes>,
    /// Each cache's statistics, for `routes::stats::STATS_TIME_TO_LIVE`.
    pub cache_stats: TtlCache<CacheId, CacheStats>,
    /// Narinfo and NAR fetches, flushed to `objects.last_accessed_at` in
    /// batches.
    pub access_log: Arc<AccessLog>,
    /// Uploads receiving now, per token and in all; see `upload_slots`.
    pub upload_slots: UploadSlots,
}

/// A cache as the read path needs it: its row and its parsed secret keys,
/// so a narinfo request neither queries the cache nor re-parses a key.
#[derive(Debug)]
pub struct ServedCache {
    pub cache: Cache,
    pub keys: SigningKeys,
}

/// A cache's parsed signing keys: the current one and, during a key
/// rotation, the next one, which signs beside it so that a client trusting
/// either public key accepts what the cache serves.
#[derive(Debug)]
pub struct SigningKeys {
    pub current: SecretKey,
    pub next: Option<SecretKey>,
}

impl SigningKeys {
    /// The cache's keys; a stored key that does not parse is the server's
    /// fault (keys are checked before they are stored), so a 500.
    pub fn of(cache: &Cache) -> Result<Self, ApiError> {
        let parse = |keypair: &CacheKeypair| {
            SecretKey::parse(keypair.expose_secret()).map_err(|error| {
                ApiError::internal(anyhow::anyhow!(
                    "cache {} has an invalid signing key: {error}",
                    cache.name
                ))
            })
        };
        Ok(Self {
            current: parse(&cache.keypair)?,
            next: cache.next_keypair.as_ref().map(parse).transpose()?,
        })
    }

    /// Every key that signs, the current one first.
    pub fn iter(&self) -> impl Iterator<Item = &SecretKey> {
        std::iter::once(&self.current).chain(&self.next)
    }
}

/// The read path's cache rows, kept apart by the [`CacheScope`] they were
/// looked up in. A caller who may only find public caches reads and fills
/// only `public`, which never holds a private cache: whether a private
/// cache exists therefore changes neither what that caller finds in memory
/// nor what it leaves there. Rows enter only when a lookup finds one, so
/// names nobody has (an attacker's random ones) take no room and evict
/// nothing.
#[derive(Debug)]
pub struct ServedCaches {
    any: TtlCache<CacheName, Arc<ServedCache>>,
    public: TtlCache<CacheName, Arc<ServedCache>>,
}

impl ServedCaches {
    /// Each scope keeps up to `capacity` rows for `time_to_live`.
    pub fn new(time_to_live: Duration, capacity: usize) -> Self {
        Self {
            any: TtlCache::new(time_to_live, capacity),
            public: TtlCache::new(time_to_live, capacity),
        }
    }

    pub fn scope(&self, scope: CacheScope) -> &TtlCache<CacheName, Arc<ServedCache>> {
        match scope {
            CacheScope::Any => &self.any,
            CacheScope::Public => &self.public,
        }
    }

    fn clear(&self) {
        self.any.clear();
        self.public.clear();
    }
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
