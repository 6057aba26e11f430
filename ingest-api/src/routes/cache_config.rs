//! `/_api/v1/cache-config/{cache}`: create, read, change and destroy
//! caches, wire-compatible with Attic's API.
//!
//! Each change is checked against the permission bit it needs: visibility,
//! priority, store directory, upstream keys, the key pair, key rotations
//! and the quota policy need `configure_cache`; the retention period needs
//! `configure_cache_retention`; the storage quota needs
//! `configure_cache_quota` (an operator's permission: a quota its tenant
//! could lift is no quota); creating and destroying need their own.
//!
//! The quota, its policy and the cache's usage are shown only to callers
//! whose token grants something on the cache, not to anonymous readers of
//! a public cache.
//!
//! A signing key is replaced either at once (`keypair`: clients trusting
//! the old public key stop trusting the cache) or in a rotation
//! (`key_rotation`: `Start` adds a next key that signs beside the current
//! one, `Finish` makes it the current key), so that clients can be given
//! the next public key before the old one stops signing.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use larder_api::cache_name::CacheName;
use larder_api::v1::{
    CacheConfig, CacheQuota, CreateCacheRequest, KeyRotation, KeypairConfig, RetentionPeriodConfig,
    StorageUsage,
};
use larder_db::{AuditAction, Cache, CacheKeypair, CacheUpdate, DbError, NewCache};
use larder_nix::signing::SecretKey;
use larder_nix::StoreDir;
use larder_token::Permission;

use super::parse_cache_name;
use crate::access::Caller;
use crate::audit;
use crate::endpoint::public_endpoint;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath};
use crate::quota::record_error;
use crate::state::{AppState, SigningKeys};

/// `GET`: for anyone who may see the cache (public, or any permission on it).
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
) -> Result<Json<CacheConfig>, ApiError> {
    let name = parse_cache_name(&cache)?;
    let cache = state.visible_cache(&caller, &name).await?;
    let tenant = caller
        .claims()
        .is_some_and(|claims| claims.grants_anything_on(&name));
    Ok(Json(describe(&state, &headers, &cache, tenant).await?))
}

/// `POST`: creates the cache.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
    ApiJson(request): ApiJson<CreateCacheRequest>,
) -> Result<Json<CacheConfig>, ApiError> {
    let name = parse_cache_name(&cache)?;
    state.check_may_create(&caller, &name)?;
    if request.storage_quota.is_some() && !caller.can(&name, Permission::ConfigureCacheQuota) {
        return Err(ApiError::Forbidden(format!(
            "your token does not allow {} on cache {name}",
            Permission::ConfigureCacheQuota.name()
        )));
    }
    let keypair = keypair_from(&request.keypair, &name, None)?;
    let mut new = NewCache::new(name, keypair);
    new.is_public = request.is_public;
    if let Some(store_dir) = &request.store_dir {
        new.store_dir = parse_store_dir(store_dir)?;
    }
    if let Some(priority) = request.priority {
        new.priority = validate_priority(priority)?;
    }
    if let Some(names) = request.upstream_cache_key_names {
        new.upstream_cache_key_names = validate_key_names(names)?;
    }
    if let Some(quota) = request.storage_quota {
        new.quota = validate_quota(quota)?;
    }
    if let Some(policy) = request.quota_policy {
        new.quota_policy = policy;
    }
    let cache = match state
        .database
        .create_cache(&new, std::time::SystemTime::now().into())
        .await
    {
        Ok(cache) => cache,
        Err(DbError::Conflict { .. }) => return Err(ApiError::CacheAlreadyExists),
        Err(error) => return Err(ApiError::internal(error)),
    };
    state.forget_cached_reads();
    tracing::info!(cache = %cache.name, by = caller.subject(), "cache created");
    let detail = serde_json::json!({
        "is_public": cache.is_public,
        "key": cache.keypair.key_name(),
    });
    audit::record(
        &state,
        &caller,
        Some(&cache),
        AuditAction::CacheCreate,
        [detail],
    )
    .await;
    Ok(Json(describe(&state, &headers, &cache, true).await?))
}

/// `PATCH`: changes the fields present, each under its own permission.
pub async fn configure(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
    ApiJson(patch): ApiJson<CacheConfig>,
) -> Result<Json<CacheConfig>, ApiError> {
    let name = parse_cache_name(&cache)?;
    let changes = audited_changes(&patch);
    let changes_configuration = patch.is_public.is_some()
        || patch.store_dir.is_some()
        || patch.priority.is_some()
        || patch.upstream_cache_key_names.is_some()
        || patch.keypair.is_some()
        || patch.key_rotation.is_some()
        || patch.quota_policy.is_some();
    let changes_retention = patch.retention_period.is_some();
    let changes_quota = patch.storage_quota.is_some();
    // A patch that changes nothing still needs `configure_cache`, so that
    // it cannot be used to probe for caches.
    let mut needed = Vec::new();
    if changes_configuration || !(changes_retention || changes_quota) {
        needed.push(Permission::ConfigureCache);
    }
    if changes_retention {
        needed.push(Permission::ConfigureCacheRetention);
    }
    if changes_quota {
        needed.push(Permission::ConfigureCacheQuota);
    }
    let mut cache = None;
    for permission in needed {
        cache = Some(
            state
                .cache_with_permission(&caller, &name, permission)
                .await?,
        );
    }
    // `needed` is never empty, so the loop ran at least once.
    let cache =
        cache.ok_or_else(|| ApiError::internal(anyhow::anyhow!("no permission checked")))?;

    let store_dir = patch
        .store_dir
        .as_deref()
        .map(parse_store_dir)
        .transpose()?;
    if let Some(store_dir) = &store_dir {
        check_store_dir_change(&state, &cache, store_dir).await?;
    }
    let new_keys = rekey(&cache, patch.keypair.as_ref(), patch.key_rotation)?;
    let (keypair, next_keypair) = match new_keys.clone() {
        Some((current, next)) => (Some(current), Some(next)),
        None => (None, None),
    };
    let update = CacheUpdate {
        is_public: patch.is_public,
        store_dir,
        priority: patch.priority.map(validate_priority).transpose()?,
        upstream_cache_key_names: patch
            .upstream_cache_key_names
            .map(validate_key_names)
            .transpose()?,
        retention_period: patch.retention_period.map(|retention| match retention {
            RetentionPeriodConfig::Global => None,
            RetentionPeriodConfig::Period(seconds) => Some(Duration::from_secs(seconds)),
        }),
        keypair,
        next_keypair,
        // The new keys were decided from the keys read above.
        if_keys_are: new_keys
            .is_some()
            .then(|| (cache.keypair.clone(), cache.next_keypair.clone())),
        quota: patch.storage_quota.map(validate_quota).transpose()?,
        quota_policy: patch.quota_policy,
    };
    let cache = state
        .database
        .update_cache(&name, &update)
        .await
        .map_err(|error| match error {
            // Destroyed between the check and the update.
            DbError::NotFound { .. } => ApiError::NoSuchCache,
            DbError::Changed { .. } => ApiError::Conflict(format!(
                "the signing keys of cache {name} changed while this request was handled; \
                 read the cache's configuration again and retry"
            )),
            other => ApiError::internal(other),
        })?;
    state.forget_cached_reads();
    tracing::info!(cache = %cache.name, by = caller.subject(), "cache reconfigured");
    if new_keys.is_some() {
        tracing::info!(
            cache = %cache.name,
            by = caller.subject(),
            key = cache.keypair.key_name(),
            next_key = cache.next_keypair.as_ref().map(CacheKeypair::key_name),
            "signing keys changed"
        );
    }
    let mut detail = serde_json::json!({ "changes": changes });
    if new_keys.is_some() {
        detail["key"] = cache.keypair.key_name().into();
        detail["next_key"] = cache
            .next_keypair
            .as_ref()
            .map(CacheKeypair::key_name)
            .into();
    }
    audit::record(
        &state,
        &caller,
        Some(&cache),
        AuditAction::CacheConfigure,
        [detail],
    )
    .await;
    Ok(Json(describe(&state, &headers, &cache, true).await?))
}

/// `DELETE`: destroys the cache and its objects; the global NARs and
/// chunks are left for GC.
pub async fn destroy(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(cache): ApiPath<String>,
) -> Result<Response, ApiError> {
    let name = parse_cache_name(&cache)?;
    let destroyed = state
        .cache_with_permission(&caller, &name, Permission::DestroyCache)
        .await?;
    if !state
        .database
        .delete_cache(&name)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::NoSuchCache);
    }
    state.forget_cached_reads();
    tracing::info!(cache = %name, by = caller.subject(), "cache destroyed");
    let detail = serde_json::json!({});
    audit::record(
        &state,
        &caller,
        Some(&destroyed),
        AuditAction::CacheDestroy,
        [detail],
    )
    .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The cache as the API shows it; with its quota, policy and usage for a
/// `tenant` (a caller whose token grants something on it).
async fn describe(
    state: &AppState,
    headers: &HeaderMap,
    cache: &Cache,
    tenant: bool,
) -> Result<CacheConfig, ApiError> {
    let usage = if tenant {
        // Read now, not from the cache row: usage changes with every push.
        let usage = state
            .database
            .cache_usage(cache.id)
            .await
            .map_err(|error| record_error(&cache.name, error))?
            .ok_or(ApiError::NoSuchCache)?;
        Some(StorageUsage {
            quota_bytes: state.database.quota_defaults().resolve(cache.quota),
            used_bytes: usage.used(),
            paths_bytes: usage.path_bytes,
            pending_bytes: usage.pending_bytes,
        })
    } else {
        None
    };
    let endpoint = public_endpoint(state, headers);
    let keys = SigningKeys::of(cache)?;
    Ok(CacheConfig {
        substituter_endpoint: Some(format!("{endpoint}{}", cache.name)),
        api_endpoint: Some(endpoint),
        public_key: Some(keys.current.to_public().to_string()),
        next_public_key: keys.next.map(|key| key.to_public().to_string()),
        is_public: Some(cache.is_public),
        store_dir: Some(cache.store_dir.to_string()),
        priority: Some(cache.priority),
        upstream_cache_key_names: Some(cache.upstream_cache_key_names.clone()),
        retention_period: Some(match cache.retention_period {
            None => RetentionPeriodConfig::Global,
            Some(period) => RetentionPeriodConfig::Period(period.as_secs()),
        }),
        storage_quota: tenant.then_some(cache.quota),
        quota_policy: tenant.then_some(cache.quota_policy),
        storage_usage: usage,
        keypair: None,
        key_rotation: None,
    })
}

/// What a patch asks to change, for the audit log: the patch as sent,
/// with an imported secret key replaced by `"Imported"`.
fn audited_changes(patch: &CacheConfig) -> serde_json::Value {
    let mut changes = serde_json::to_value(patch).unwrap_or_default();
    if let Some(KeypairConfig::Keypair(_)) = patch.keypair {
        changes["keypair"] = "Imported".into();
    }
    changes
}

/// A quota the store can hold: at most `i64::MAX` bytes.
fn validate_quota(quota: CacheQuota) -> Result<CacheQuota, ApiError> {
    if let CacheQuota::Bytes(bytes) = quota {
        if i64::try_from(bytes).is_err() {
            return Err(ApiError::bad_request(format!(
                "invalid storage quota of {bytes} bytes: at most {} (8 EiB)",
                i64::MAX
            )));
        }
    }
    Ok(quota)
}

fn parse_store_dir(store_dir: &str) -> Result<StoreDir, ApiError> {
    StoreDir::new(store_dir).map_err(ApiError::bad_request)
}

/// A cache's paths and the fingerprints its narinfos are signed over live
/// in its store directory: moving a cache that holds paths would leave
/// every one of them unservable, so only an empty cache may move.
/// (Uploads still in flight are the push pipeline's to check when they
/// finish.)
async fn check_store_dir_change(
    state: &AppState,
    cache: &Cache,
    store_dir: &StoreDir,
) -> Result<(), ApiError> {
    if *store_dir == cache.store_dir {
        return Ok(());
    }
    let stats = state
        .database
        .per_cache_stats(cache.id)
        .await
        .map_err(ApiError::internal)?;
    if stats.object_count > 0 {
        return Err(ApiError::Conflict(format!(
            "cache {} holds {} paths in {}; its store directory cannot change to {}",
            cache.name,
            stats.object_count,
            cache.store_dir.as_str(),
            store_dir.as_str()
        )));
    }
    Ok(())
}

/// `nix-cache-info` advertises the priority as a non-negative number
/// (lower wins), so a negative one could not be served as set.
fn validate_priority(priority: i32) -> Result<i32, ApiError> {
    if priority < 0 {
        return Err(ApiError::bad_request(format!(
            "invalid priority {priority}: it must be 0 or more (lower is preferred)"
        )));
    }
    Ok(priority)
}

/// Key names as Nix writes them in `trusted-public-keys`: no spaces or
/// colons, which would break that list.
fn validate_key_names(names: Vec<String>) -> Result<Vec<String>, ApiError> {
    for name in &names {
        if name.is_empty()
            || name.len() > 256
            || name.contains(|c: char| c.is_whitespace() || c == ':' || c.is_control())
        {
            return Err(ApiError::bad_request(format!(
                "invalid upstream cache key name {name:?}"
            )));
        }
    }
    Ok(names)
}

/// The cache's keys after a patch's key change, `(current, next)`, or
/// `None` when the patch changes neither. A replaced key (`keypair`) takes
/// effect at once; a rotation's `Start` keeps the current key and adds a
/// generated next one, its `Finish` makes the next key the current one and
/// drops the old. Replacing the key or starting a rotation while one is in
/// progress, and finishing none, are conflicts with the cache's state (409);
/// a patch asking for both a replacement and a rotation step is malformed
/// (400).
fn rekey(
    cache: &Cache,
    keypair: Option<&KeypairConfig>,
    rotation: Option<KeyRotation>,
) -> Result<Option<(CacheKeypair, Option<CacheKeypair>)>, ApiError> {
    let name = &cache.name;
    match (keypair, rotation, &cache.next_keypair) {
        (None, None, _) => Ok(None),
        (Some(_), Some(_), _) => Err(ApiError::bad_request(
            "`keypair` and `key_rotation` cannot be changed in one request: \
             replace the key, or rotate it",
        )),
        (Some(_), None, Some(next)) => Err(ApiError::Conflict(format!(
            "cache {name} is rotating its signing key to {}: finish the rotation \
             (`key_rotation: Finish`) before replacing the key",
            next.key_name()
        ))),
        (Some(config), None, None) => Ok(Some((keypair_from(config, name, Some(cache))?, None))),
        (None, Some(KeyRotation::Start), Some(next)) => Err(ApiError::Conflict(format!(
            "cache {name} is already rotating its signing key to {}: finish that rotation first",
            next.key_name()
        ))),
        (None, Some(KeyRotation::Start), None) => Ok(Some((
            cache.keypair.clone(),
            Some(keypair_from(&KeypairConfig::Generate, name, Some(cache))?),
        ))),
        (None, Some(KeyRotation::Finish), None) => Err(ApiError::Conflict(format!(
            "cache {name} has no key rotation in progress to finish: start one first \
             (`key_rotation: Start`)"
        ))),
        (None, Some(KeyRotation::Finish), Some(next)) => Ok(Some((next.clone(), None))),
    }
}

/// A generated or imported key pair. Generated keys are named
/// `<cache>-<n>`, with `n` one more than the key being replaced, so that
/// clients holding the old public key see a different key name rather than
/// a signature that suddenly fails.
fn keypair_from(
    config: &KeypairConfig,
    cache: &CacheName,
    current: Option<&Cache>,
) -> Result<CacheKeypair, ApiError> {
    let key = match config {
        KeypairConfig::Keypair(secret) => SecretKey::parse(secret).map_err(|error| {
            ApiError::bad_request(format!(
                "invalid imported signing key: {error} (expected a Nix secret key, \
                 `name:base64`, as `nix-store --generate-binary-cache-key` writes it)"
            ))
        })?,
        KeypairConfig::Generate => {
            let generation = current
                .and_then(|current| {
                    current
                        .keypair
                        .key_name()
                        .strip_prefix(&format!("{cache}-"))
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .map_or(1, |n| n + 1);
            SecretKey::generate(&format!("{cache}-{generation}")).map_err(ApiError::internal)?
        }
    };
    Ok(CacheKeypair::new(key.to_nix_secret_string()))
}

#[cfg(test)]
mod tests {
    use larder_api::v1::{CacheQuota, QuotaPolicy};
    use larder_db::{CacheId, Timestamp};

    use super::*;

    fn key(name: &str) -> CacheKeypair {
        CacheKeypair::new(
            SecretKey::generate(name)
                .expect("a key")
                .to_nix_secret_string(),
        )
    }

    fn cache(current: CacheKeypair, next: Option<CacheKeypair>) -> Cache {
        Cache {
            id: CacheId(1),
            name: "team".parse().expect("a cache name"),
            is_public: false,
            store_dir: StoreDir::default(),
            priority: 41,
            upstream_cache_key_names: Vec::new(),
            retention_period: None,
            quota: CacheQuota::Global,
            quota_policy: QuotaPolicy::Refuse,
            keypair: current,
            next_keypair: next,
            created_at: Timestamp::from_unix_millis(0),
        }
    }

    fn status(result: Result<Option<(CacheKeypair, Option<CacheKeypair>)>, ApiError>) -> u16 {
        result
            .expect_err("refused")
            .into_response()
            .status()
            .as_u16()
    }

    #[test]
    fn a_rotation_adds_the_next_generation_then_makes_it_current() {
        let idle = cache(key("team-3"), None);
        assert!(rekey(&idle, None, None).expect("no change").is_none());

        let (current, next) = rekey(&idle, None, Some(KeyRotation::Start))
            .expect("started")
            .expect("a change");
        assert_eq!(current, idle.keypair, "the current key keeps signing");
        let next = next.expect("a next key");
        assert_eq!(next.key_name(), "team-4");

        let rotating = cache(current.clone(), Some(next.clone()));
        let (finished, none) = rekey(&rotating, None, Some(KeyRotation::Finish))
            .expect("finished")
            .expect("a change");
        assert_eq!(finished, next);
        assert_eq!(none, None);
        // Reading the keys changes nothing.
        assert!(rekey(&rotating, None, None).expect("no change").is_none());
    }

    #[test]
    fn a_replaced_key_takes_effect_at_once_outside_a_rotation() {
        let idle = cache(key("team-1"), None);
        let (current, next) = rekey(&idle, Some(&KeypairConfig::Generate), None)
            .expect("replaced")
            .expect("a change");
        assert_eq!(current.key_name(), "team-2");
        assert_eq!(next, None);
        // An imported key with another naming scheme: the next generated
        // key starts the cache's own scheme.
        let imported = cache(key("cachix-team-1"), None);
        let (_, next) = rekey(&imported, None, Some(KeyRotation::Start))
            .expect("started")
            .expect("a change");
        assert_eq!(next.expect("a next key").key_name(), "team-1");
    }

    #[test]
    fn what_the_rotation_state_forbids_is_a_conflict_and_both_at_once_malformed() {
        let idle = cache(key("team-1"), None);
        let rotating = cache(key("team-1"), Some(key("team-2")));
        assert_eq!(status(rekey(&idle, None, Some(KeyRotation::Finish))), 409);
        assert_eq!(
            status(rekey(&rotating, None, Some(KeyRotation::Start))),
            409
        );
        assert_eq!(
            status(rekey(&rotating, Some(&KeypairConfig::Generate), None)),
            409
        );
        for cache in [&idle, &rotating] {
            for rotation in [KeyRotation::Start, KeyRotation::Finish] {
                assert_eq!(
                    status(rekey(cache, Some(&KeypairConfig::Generate), Some(rotation))),
                    400
                );
            }
        }
        let imported = rekey(
            &idle,
            Some(&KeypairConfig::Keypair("not-a-key".into())),
            None,
        );
        assert_eq!(status(imported), 400);
        let public_only = KeypairConfig::Keypair(
            SecretKey::generate("x-1")
                .expect("a key")
                .to_public()
                .to_string(),
        );
        let refused = rekey(&idle, Some(&public_only), None).expect_err("a public key");
        assert!(
            matches!(&refused, ApiError::BadRequest(message)
                if message.contains("expected 64") && message.contains("nix-store")),
            "{refused:?}"
        );
    }
}
