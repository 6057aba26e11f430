//! Who is asking, and which caches they may see and change.
//!
//! The rule that keeps tenants apart without an existence oracle: a caller
//! who may not see a cache gets the same answer whether it exists or not.
//! Anonymous callers get a 401 (so clients know a token could help, and
//! Nix treats it as "not here"); callers with a token get `NoSuchCache`.
//!
//! The same answer is not enough: it must also take the same path, or its
//! latency tells. So what the token grants on a name is decided first,
//! from the token alone, and it picks the [`CacheScope`] of the lookup: a
//! caller whose token grants nothing on the name may only find a public
//! cache. For such a caller a private cache and a missing one run the same
//! query, find no row, and neither read nor fill any in-memory copy (the
//! read path's memory keeps each scope apart, see [`ServedCaches`]).
//!
//! [`ServedCaches`]: crate::state::ServedCaches

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use larder_api::cache_name::CacheName;
use larder_db::{Actor, Cache, CacheScope};
use larder_token::{Claims, Permission};

use crate::error::ApiError;
use crate::state::{AppState, ServedCache, SigningKeys};

/// The authenticated caller, or an anonymous one. Credentials that are
/// present but invalid, expired or revoked reject the request with a 401:
/// they never fall back to anonymous access.
#[derive(Debug, Clone)]
pub struct Caller {
    claims: Option<Claims>,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .map(|value| value.as_bytes());
        let claims = state
            .verifier
            .authenticate(header)
            .map_err(|error| ApiError::Unauthorized(error.to_string()))?;
        Ok(Self { claims })
    }
}

impl Caller {
    /// The token's subject, recorded as who pushed or changed something.
    pub fn subject(&self) -> Option<&str> {
        self.claims.as_ref().map(|claims| claims.sub.as_str())
    }

    /// Who the audit log and the rows a request writes name: the token's
    /// subject and id.
    pub fn actor(&self) -> Actor {
        Actor {
            subject: self.claims.as_ref().map(|claims| claims.sub.clone()),
            jti: self.claims.as_ref().map(|claims| claims.jti.clone()),
        }
    }

    pub fn claims(&self) -> Option<&Claims> {
        self.claims.as_ref()
    }

    pub fn can(&self, cache: &CacheName, permission: Permission) -> bool {
        self.claims
            .as_ref()
            .is_some_and(|claims| claims.can(cache, permission))
    }

    /// Whether the token says anything about this cache, so that telling
    /// the caller the cache exists reveals nothing new.
    fn knows_of(&self, cache: &CacheName) -> bool {
        self.claims
            .as_ref()
            .is_some_and(|claims| claims.grants_anything_on(cache))
    }

    /// The scope a lookup of `cache` may search, from the token alone: any
    /// cache when the token `grants` something there, public ones only
    /// otherwise.
    fn scope(grants: bool) -> CacheScope {
        if grants {
            CacheScope::Any
        } else {
            CacheScope::Public
        }
    }

    /// The answer for an upload this caller may not follow (it needs push
    /// permission on the upload's cache), existing or not.
    pub fn hidden_upload(&self) -> ApiError {
        match self.claims {
            None => ApiError::Unauthorized(
                "following an upload needs a token with push permission on its cache".to_owned(),
            ),
            Some(_) => ApiError::NoSuchUpload,
        }
    }

    /// The answer for a cache this caller may not see, existing or not.
    fn hidden_cache(&self) -> ApiError {
        match self.claims {
            None => ApiError::Unauthorized(
                "this cache does not exist or needs a token: send one as a Bearer token \
                 or as the password of Basic auth (netrc)"
                    .to_owned(),
            ),
            Some(_) => ApiError::NoSuchCache,
        }
    }
}

impl AppState {
    /// The cache, if the caller may read it (public, or pull permission).
    /// Served from a short-lived in-memory copy: this is on every narinfo
    /// and NAR request.
    pub async fn readable_cache(
        &self,
        caller: &Caller,
        name: &CacheName,
    ) -> Result<Arc<ServedCache>, ApiError> {
        let scope = Caller::scope(caller.can(name, Permission::Pull));
        self.served_cache(name, scope)
            .await?
            .ok_or_else(|| caller.hidden_cache())
    }

    /// The cache of that name in `scope`, from memory or the database.
    async fn served_cache(
        &self,
        name: &CacheName,
        scope: CacheScope,
    ) -> Result<Option<Arc<ServedCache>>, ApiError> {
        let memory = self.served_caches.scope(scope);
        if let Some(served) = memory.get(name) {
            return Ok(Some(served));
        }
        let Some(cache) = self
            .database
            .cache_by_name_in(name, scope)
            .await
            .map_err(ApiError::internal)?
        else {
            // Misses are not cached: a cache created on another replica
            // must be reachable at once, and names that do not exist must
            // take no room.
            return Ok(None);
        };
        let keys = SigningKeys::of(&cache)?;
        let served = Arc::new(ServedCache { cache, keys });
        memory.insert(name.clone(), served.clone());
        Ok(Some(served))
    }

    /// The cache, if the caller may see it at all: public, or any
    /// permission on it (a push-only token needs the cache's public key and
    /// upstream key names, too).
    pub async fn visible_cache(
        &self,
        caller: &Caller,
        name: &CacheName,
    ) -> Result<Cache, ApiError> {
        let scope = Caller::scope(caller.knows_of(name));
        self.database
            .cache_by_name_in(name, scope)
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| caller.hidden_cache())
    }

    /// The cache, if the caller holds any permission on it: what only its
    /// tenants may learn (its statistics), not every reader of a public
    /// cache.
    pub async fn tenant_cache(&self, caller: &Caller, name: &CacheName) -> Result<Cache, ApiError> {
        let cache = self.visible_cache(caller, name).await?;
        if caller.knows_of(name) {
            return Ok(cache);
        }
        // Found although the token grants nothing on it: a public cache,
        // whose existence is no secret.
        Err(match caller.claims {
            None => ApiError::Unauthorized(format!(
                "cache {name} is public, but this needs a token with a permission on it"
            )),
            Some(_) => ApiError::Forbidden(format!("your token grants nothing on cache {name}")),
        })
    }

    /// The cache, if the caller holds `permission` on it. A caller who may
    /// see the cache but lacks the permission gets a 403 that says so; one
    /// who may not see it gets the same answer as for a missing cache.
    pub async fn cache_with_permission(
        &self,
        caller: &Caller,
        name: &CacheName,
        permission: Permission,
    ) -> Result<Cache, ApiError> {
        // A permission on the name is something the token grants there, so
        // a permitted caller always searches every cache.
        let scope = Caller::scope(caller.knows_of(name));
        let cache = self
            .database
            .cache_by_name_in(name, scope)
            .await
            .map_err(ApiError::internal)?;
        let permitted = caller.can(name, permission);
        match cache {
            Some(cache) if permitted => Ok(cache),
            // Public, or one the token names: its existence is no secret.
            Some(_) => Err(ApiError::Forbidden(format!(
                "your token does not allow {} on cache {name}",
                permission.name()
            ))),
            None if permitted => Err(ApiError::NoSuchCache),
            None => Err(caller.hidden_cache()),
        }
    }

    /// Checks that the caller may create a cache with this name.
    pub fn check_may_create(&self, caller: &Caller, name: &CacheName) -> Result<(), ApiError> {
        if caller.can(name, Permission::CreateCache) {
            Ok(())
        } else if caller.claims.is_none() {
            Err(ApiError::Unauthorized(
                "creating a cache needs a token".to_owned(),
            ))
        } else {
            Err(ApiError::Forbidden(format!(
                "your token does not allow creating a cache named {name}"
            )))
        }
    }
}
