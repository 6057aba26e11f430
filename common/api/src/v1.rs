//! Larder API v1 wire types, shared by the server and the `larder` client so
//! the two cannot drift. They are wire-compatible with Attic's API, so that
//! Attic's client and CI action work against Larder unchanged.

use serde::{Deserialize, Serialize};

pub use crate::pin::KeepPolicy;

/// The JSON body of every API error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The HTTP status, repeated for clients that only see the body.
    pub code: u16,
    /// A stable machine-readable name, e.g. `NoSuchCache`.
    pub error: String,
    /// What went wrong, for humans.
    pub message: String,
}

/// How long a cache keeps paths nobody has fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetentionPeriodConfig {
    /// The server's default applies.
    Global,
    /// Seconds since last access.
    Period(u64),
}

/// A cache's storage quota: a limit on the logical bytes it holds (the
/// NarSize of its paths, of its uploads in flight and of its staged NAR
/// files), however much of that is deduplicated with other caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheQuota {
    /// The server's `[quota] default-cache-quota` applies (none: unlimited).
    Global,
    /// No quota, whatever the server's default.
    Unlimited,
    /// At most this many bytes.
    Bytes(u64),
}

/// What a push that would exceed a cache's quota does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QuotaPolicy {
    /// It is refused (413 `QuotaExceeded`); nothing stored is touched.
    #[default]
    Refuse,
    /// The cache's least recently accessed paths are removed until the
    /// push fits; it is refused only when removing all of them (but the
    /// path being pushed) would not make room.
    EvictLru,
}

impl QuotaPolicy {
    pub const ALL: [Self; 2] = [Self::Refuse, Self::EvictLru];

    /// The name in the database and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Refuse => "refuse",
            Self::EvictLru => "evict-lru",
        }
    }
}

impl std::fmt::Display for QuotaPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A quota policy name that is neither `refuse` nor `evict-lru`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown quota policy {0:?}: expected refuse or evict-lru")]
pub struct UnknownQuotaPolicy(pub String);

impl std::str::FromStr for QuotaPolicy {
    type Err = UnknownQuotaPolicy;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|policy| policy.as_str() == name)
            .ok_or_else(|| UnknownQuotaPolicy(name.chars().take(40).collect()))
    }
}

/// How much of its quota a cache uses, in logical bytes (read-only, in
/// `GET /_api/v1/cache-config/{cache}` for holders of a token that grants
/// anything on the cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageUsage {
    /// The quota that applies (the cache's own, or the server's default);
    /// `null`: unlimited.
    pub quota_bytes: Option<u64>,
    /// Everything that counts against the quota: `paths_bytes` plus
    /// `pending_bytes`.
    pub used_bytes: u64,
    /// The NarSize of the cache's paths.
    pub paths_bytes: u64,
    /// The NarSize of its uploads still in the pipeline and of its NAR
    /// files received with `PUT nar/…` that no narinfo claimed yet.
    pub pending_bytes: u64,
}

/// Where a cache's signing key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeypairConfig {
    /// A new key pair made by the server.
    Generate,
    /// An imported Nix secret key, `name:base64`.
    Keypair(String),
}

/// A step of a signing-key rotation (a Larder addition). Rotating in two
/// steps lets clients trust the next public key while the current one
/// still signs, so that none of them sees an untrusted narinfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyRotation {
    /// Generate the next key; from now on it signs beside the current one.
    Start,
    /// The next key becomes the current one; the old key is dropped.
    Finish,
}

/// `GET /_api/v1/cache-config/{cache}`: a cache's configuration. In a
/// `PATCH`, every field is optional and only those present change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// The substituter URL to give Nix, e.g. `https://host/cache`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substituter_endpoint: Option<String>,
    /// The server's API base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_endpoint: Option<String>,
    /// The cache's public key, `name:base64`, for `trusted-public-keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// During a key rotation, the next key's public half: what the cache
    /// serves is signed by both keys until the rotation finishes, so
    /// clients should trust both. (A Larder addition.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_public: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Paths signed by these keys are assumed to be upstream; clients
    /// skip pushing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_cache_key_names: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_period: Option<RetentionPeriodConfig>,
    /// The cache's storage quota. Changing it needs the
    /// `configure_cache_quota` permission, which tenants do not normally
    /// hold. (A Larder addition, absent from Attic's API.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_quota: Option<CacheQuota>,
    /// What a push over the quota does. (A Larder addition.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_policy: Option<QuotaPolicy>,
    /// Only in answers, and only to holders of a token that grants
    /// anything on the cache: usage against the quota. Ignored in a
    /// `PATCH`. (A Larder addition.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_usage: Option<StorageUsage>,
    /// Only in a `PATCH`: regenerate or import the key pair, at once
    /// (refused during a rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keypair: Option<KeypairConfig>,
    /// Only in a `PATCH`: start or finish a key rotation; not together
    /// with `keypair`. (A Larder addition.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_rotation: Option<KeyRotation>,
}

/// `POST /_api/v1/cache-config/{cache}`: create a cache. Attic's client
/// sends every field; Larder fills in defaults for the ones left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateCacheRequest {
    #[serde(default = "default_keypair")]
    pub keypair: KeypairConfig,
    #[serde(default)]
    pub is_public: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_cache_key_names: Option<Vec<String>>,
    /// Needs the `configure_cache_quota` permission besides `create_cache`.
    /// (A Larder addition, absent from Attic's API.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_quota: Option<CacheQuota>,
    /// (A Larder addition.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_policy: Option<QuotaPolicy>,
}

fn default_keypair() -> KeypairConfig {
    KeypairConfig::Generate
}

/// `POST /_api/v1/get-missing-paths`: which of these paths a client should
/// push. Needs push permission on the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetMissingPathsRequest {
    pub cache: String,
    /// Store path hashes (the 32 characters before the first `-`).
    pub store_path_hashes: Vec<String>,
}

/// The answer to [`GetMissingPathsRequest`]: the hashes neither stored in
/// the cache nor in flight to it, in request order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetMissingPathsResponse {
    pub missing_paths: Vec<String>,
}

/// `POST /_api/v1/delete-paths`: removes these paths from a cache at once
/// (their storage is freed by the next GC run, once nothing else holds
/// it). Needs delete permission on the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletePathsRequest {
    pub cache: String,
    /// Store path hashes (the 32 characters before the first `-`).
    pub store_path_hashes: Vec<String>,
}

/// The answer to [`DeletePathsRequest`], each list in request order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletePathsResponse {
    /// The hashes that were in the cache and are gone now.
    pub deleted: Vec<String>,
    /// The hashes that were not in the cache.
    pub not_found: Vec<String>,
}

/// Request header carrying an [`UploadPathNarInfo`] as JSON.
pub const NAR_INFO_HEADER: &str = "x-attic-nar-info";

/// Request header saying that the body starts with an [`UploadPathNarInfo`]
/// of this many bytes of JSON, followed by the NAR (for metadata too large
/// for a header).
pub const NAR_INFO_PREAMBLE_SIZE_HEADER: &str = "x-attic-nar-info-preamble-size";

/// Request header of `upload-path`: `0` answers as soon as the upload is
/// acknowledged (verified and spooled) instead of waiting until the path is
/// visible.
pub const WAIT_HEADER: &str = "x-larder-wait";

/// What a client says about the path it uploads with
/// `PUT /_api/v1/upload-path`; the body is the uncompressed NAR. Attic's
/// field names and formats: `nar_hash` is `sha256:` followed by hex (Attic)
/// or Nix base-32; references and the deriver are base names
/// (`<hash>-<name>`); `store_path` is the full path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadPathNarInfo {
    pub cache: String,
    pub store_path_hash: String,
    pub store_path: String,
    pub references: Vec<String>,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub deriver: Option<String>,
    pub sigs: Vec<String>,
    #[serde(default)]
    pub ca: Option<String>,
    pub nar_hash: String,
    pub nar_size: u64,
}

/// How an upload was stored, as Attic's API names it.
///
/// Attic also has `Deduplicated`, for a NAR the server held already. Larder
/// never says so: whether a NAR is stored depends on what *other* tenants
/// pushed, and saying it would let a tenant confirm guessed contents of
/// their paths (Attic's own client treats every kind as a success, and
/// Attic documents that servers may answer `Uploaded` for a deduplicated
/// NAR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadPathResultKind {
    /// The NAR was received and verified, and its path is (or will be)
    /// stored.
    Uploaded,
}

/// The answer to `PUT /_api/v1/upload-path` (and to a narinfo `PUT`). It is
/// the same whether or not another cache holds the NAR: nothing in it
/// comes from stored data. Attic's client reads `kind`; the `file_size`
/// and `frac_deduplicated` it would also read are never sent (it takes
/// them as unknown), since both would describe the stored NAR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadPathResult {
    pub kind: UploadPathResultKind,
    /// The upload to follow with `GET /_api/v1/uploads/{id}`. `None` only
    /// on a server with `require-proof-of-possession = false`, which links
    /// an already stored NAR at once.
    pub upload_id: Option<String>,
    /// The upload's phase when the answer was sent (`done` once visible).
    pub phase: String,
}

/// The [`UploadStatus::phase`] of an upload whose path is visible.
pub const PHASE_DONE: &str = "done";
/// The [`UploadStatus::phase`] of an upload the pipeline gave up on.
pub const PHASE_FAILED: &str = "failed";

/// `GET /_api/v1/uploads/{id}`: where an upload is, in terms the upload
/// itself determines (its phase and its own size), never in chunks: which
/// chunks are stored already depends on other tenants' data. Times are
/// Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadStatus {
    pub id: String,
    pub cache: String,
    pub store_path: String,
    /// `spooled`, `chunking`, `compressing`, `done` or `failed`.
    pub phase: String,
    /// Why it failed.
    pub error: Option<String>,
    /// The NAR's size: every byte of it was received and verified before
    /// the upload was acknowledged.
    pub nar_size: u64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// `GET /_api/v1/cache-stats/{cache}`: what one cache holds and what it
/// costs to store, for any token with a permission on the cache.
///
/// Every figure depends on this cache's paths alone, never on what other
/// caches hold: how many of its chunks another cache shares would tell a
/// tenant what someone else stored (for the same reason quotas count
/// deduplicated bytes in full). So `stored_bytes` is what the cache would
/// take in storage by itself: each distinct chunk its paths use, counted
/// once, at its compressed size. How storage is shared between caches is
/// in [`ServerStats`], for the operator. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheStats {
    pub cache: String,
    /// Store paths in the cache.
    pub paths: u64,
    /// The NarSize of its paths, summed: what clients download, before
    /// compression.
    pub nar_bytes: u64,
    /// The compressed chunks its paths use, each distinct chunk once.
    pub stored_bytes: u64,
    /// `nar_bytes / stored_bytes`: compression and deduplication within the
    /// cache; absent while nothing is stored.
    pub dedup_ratio: Option<f64>,
    /// When its newest path was pushed; absent for an empty cache.
    pub last_push: Option<u64>,
    /// When a path of it was last fetched (recorded in batches, so up to a
    /// minute behind); absent for an empty cache.
    pub last_access: Option<u64>,
}

/// One cache in [`ServerStats`]: its own figures and how its stored bytes
/// are shared with other caches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedCacheStats {
    #[serde(flatten)]
    pub stats: CacheStats,
    /// Of `stored_bytes`, the chunks no other cache uses.
    pub unique_bytes: u64,
    /// Of `stored_bytes`, the chunks other caches use too.
    pub shared_bytes: u64,
    /// Its share of storage: each chunk's compressed size divided evenly
    /// among the caches using it. The caches' shares add up to the
    /// server's `referenced_bytes`.
    pub attributed_bytes: u64,
}

/// `GET /_api/v1/cache-stats`: the whole server, for an operator (a token
/// with `configure_cache_quota` on every cache, `*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    /// Store paths in all caches (a path in two caches counts twice).
    pub paths: u64,
    /// Their NarSize, summed: what the caches hold logically.
    pub nar_bytes: u64,
    /// Every stored chunk's compressed size, each chunk once: referenced
    /// or not yet collected.
    pub stored_bytes: u64,
    /// The chunks some cache's paths use.
    pub referenced_bytes: u64,
    /// `nar_bytes / stored_bytes`: compression and deduplication across
    /// every cache.
    pub dedup_ratio: Option<f64>,
    pub caches: Vec<SharedCacheStats>,
}

/// A token as the token API shows it: its claims, never the token string.
/// Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The token's id, by which it is revoked.
    pub jti: String,
    /// Who it was minted for.
    pub subject: String,
    pub issued_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
    pub expires_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    /// Permission names by cache-name pattern, as in the token's claims.
    pub caches: std::collections::BTreeMap<String, Vec<String>>,
}

/// `GET /_api/v1/tokens`: the tokens the caller manages, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

/// `POST /_api/v1/tokens`: mint a token, never granting more than the
/// caller's own token nor outliving it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintTokenRequest {
    pub subject: String,
    /// Seconds from now.
    pub valid_for_secs: u64,
    /// Permission names by cache-name pattern.
    pub caches: std::collections::BTreeMap<String, Vec<String>>,
}

/// The answer to [`MintTokenRequest`]: the token, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintTokenResponse {
    pub token: String,
    pub info: TokenInfo,
}

/// One event of the audit log. `at` is in Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Increasing with time: pass the last one seen as `before` for the
    /// next page.
    pub id: i64,
    pub at: i64,
    /// The cache acted on; absent for token changes.
    pub cache: Option<String>,
    /// The token's subject and id (`jti`); absent for anonymous changes,
    /// and the id for pushes recorded before it was kept.
    pub subject: Option<String>,
    pub jti: Option<String>,
    /// `push`, `delete`, `cache-create`, `cache-configure` (key rotations
    /// included), `cache-destroy`, `token-mint`, `token-revoke`,
    /// `pin-create` or `pin-delete`.
    pub action: String,
    /// What it was about: a store path, the settings changed, a token.
    pub detail: serde_json::Value,
}

/// `GET /_api/v1/audit/{cache}` and `GET /_api/v1/audit`: a page of
/// events, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditPage {
    pub events: Vec<AuditEvent>,
    /// The `before` of the next (older) page; absent on the last one.
    pub next_before: Option<i64>,
}

/// `POST /_api/v1/purge/{cache}`: the paths one subject or one token
/// pushed (the last push of each path counts), pushed at or after `since`
/// (Unix seconds) if given. A dry run unless `dry_run` is `false`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_by: Option<String>,
    /// A token's id (`jti`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    #[serde(default = "dry_run_by_default")]
    pub dry_run: bool,
}

fn dry_run_by_default() -> bool {
    true
}

/// The answer to a [`PurgeRequest`]: the store paths matched (a dry run)
/// or deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeResponse {
    pub dry_run: bool,
    pub paths: Vec<String>,
}

/// `POST /_api/v1/pins/{cache}`: pin a path of the cache under a name, or
/// add a revision to the pin of that name (none when its newest revision
/// has this root already). Needs push permission on the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatePinRequest {
    /// Letters, digits, `-`, `_` and `.`, starting with a letter or digit.
    pub name: String,
    /// The root's store path hash; the cache must hold the path.
    pub store_path_hash: String,
    /// Which revisions are kept, from now on. Absent: the pin's own
    /// policy, or for a new pin [`KeepPolicy::DEFAULT`], the newest only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<KeepPolicy>,
}

/// A pin as the pin API shows it. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinInfo {
    pub name: String,
    pub keep: KeepPolicy,
    pub created_at: u64,
    /// Newest first; the newest is never dropped.
    pub revisions: Vec<PinRevisionInfo>,
}

/// One root pinned under a pin's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRevisionInfo {
    pub revision: u64,
    pub store_path: String,
    pub created_at: u64,
    /// The subject of the token that pinned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// Whether the cache still holds the root: an explicit deletion removes
    /// a pinned path, and a push brings it back under the pin.
    pub present: bool,
}

/// `GET /_api/v1/pins/{cache}`: the cache's pins, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinList {
    pub pins: Vec<PinInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_period_matches_attics_encoding() {
        let global = serde_json::to_string(&RetentionPeriodConfig::Global).expect("json");
        assert_eq!(global, r#""Global""#);
        let period = serde_json::to_string(&RetentionPeriodConfig::Period(60)).expect("json");
        assert_eq!(period, r#"{"Period":60}"#);
    }

    #[test]
    fn quota_fields_are_left_out_when_absent_and_read_back_when_present() {
        // Attic's client sees exactly the fields it knows.
        let json = serde_json::to_value(CacheConfig {
            priority: Some(41),
            ..CacheConfig::default()
        })
        .expect("json");
        assert_eq!(json, serde_json::json!({"priority": 41}));

        let config = CacheConfig {
            storage_quota: Some(CacheQuota::Bytes(1 << 30)),
            quota_policy: Some(QuotaPolicy::EvictLru),
            storage_usage: Some(StorageUsage {
                quota_bytes: None,
                used_bytes: 3,
                paths_bytes: 2,
                pending_bytes: 1,
            }),
            ..CacheConfig::default()
        };
        let json = serde_json::to_value(&config).expect("json");
        assert_eq!(json["storage_quota"], serde_json::json!({"Bytes": 1 << 30}));
        assert_eq!(json["quota_policy"], "EvictLru");
        assert_eq!(
            json["storage_usage"]["quota_bytes"],
            serde_json::Value::Null
        );
        let back: CacheConfig = serde_json::from_value(json).expect("parse");
        assert_eq!(back, config);
        for (text, quota) in [
            (r#""Global""#, CacheQuota::Global),
            (r#""Unlimited""#, CacheQuota::Unlimited),
        ] {
            assert_eq!(serde_json::from_str::<CacheQuota>(text).expect(text), quota);
        }
        assert_eq!(
            "evict-lru".parse::<QuotaPolicy>(),
            Ok(QuotaPolicy::EvictLru)
        );
        assert!("lru".parse::<QuotaPolicy>().is_err());
    }

    #[test]
    fn key_rotation_fields_are_left_out_when_absent() {
        let json = serde_json::to_value(CacheConfig {
            public_key: Some("c-1:k".to_owned()),
            ..CacheConfig::default()
        })
        .expect("json");
        assert_eq!(json, serde_json::json!({"public_key": "c-1:k"}));
        let patch: CacheConfig =
            serde_json::from_str(r#"{"key_rotation":"Start"}"#).expect("parse");
        assert_eq!(patch.key_rotation, Some(KeyRotation::Start));
        let shown = CacheConfig {
            next_public_key: Some("c-2:k".to_owned()),
            key_rotation: Some(KeyRotation::Finish),
            ..CacheConfig::default()
        };
        let json = serde_json::to_value(&shown).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"next_public_key": "c-2:k", "key_rotation": "Finish"})
        );
    }

    #[test]
    fn attic_upload_info_parses() {
        // As Attic's client sends it: hex NAR hash, base-name references,
        // no system or deriver.
        let header = r#"{"cache":"demo","store_path_hash":"nhzy8v6fzgqnz5ksbk6qwm5ayjh9yx48",
            "store_path":"/nix/store/nhzy8v6fzgqnz5ksbk6qwm5ayjh9yx48-a",
            "references":["ss0xprzsdhbh3jcnm5vnvxb99wi0qcv0-c.sh"],"system":null,"deriver":null,
            "sigs":[],"ca":null,"nar_hash":"sha256:00","nar_size":168}"#;
        let info: UploadPathNarInfo = serde_json::from_str(header).expect("parse");
        assert_eq!(info.references, ["ss0xprzsdhbh3jcnm5vnvxb99wi0qcv0-c.sh"]);
        assert_eq!(info.nar_size, 168);
        let result = UploadPathResult {
            kind: UploadPathResultKind::Uploaded,
            upload_id: Some("0".repeat(32)),
            phase: "done".to_owned(),
        };
        let json = serde_json::to_value(&result).expect("json");
        assert_eq!(json["kind"], "Uploaded");
        // Attic's client reads these as unknown when absent; present, they
        // would describe the stored NAR.
        assert!(json.get("file_size").is_none(), "{json}");
        assert!(json.get("frac_deduplicated").is_none(), "{json}");
    }

    #[test]
    fn attic_create_request_parses() {
        let body = r#"{"keypair":"Generate","is_public":false,"store_dir":"/nix/store",
            "priority":41,"upstream_cache_key_names":["cache.nixos.org-1"]}"#;
        let request: CreateCacheRequest = serde_json::from_str(body).expect("parse");
        assert_eq!(request.keypair, KeypairConfig::Generate);
        let imported = r#"{"keypair":{"Keypair":"k-1:abc"},"is_public":true}"#;
        let request: CreateCacheRequest = serde_json::from_str(imported).expect("parse");
        assert_eq!(request.keypair, KeypairConfig::Keypair("k-1:abc".into()));
        assert!(request.is_public);
    }
}
