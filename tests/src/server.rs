//! An `ingest-api` server running inside the test process, on a port the
//! kernel picks, with everything it keeps in a temporary directory.
//!
//! [`TestServer`] goes through the same [`ingest_api::Server::build`] as the
//! binary, with a config file written beside its data (so the real
//! `ingest-api` binary's admin commands can run against the same server
//! with `--config`), runs the in-process pipeline as the binary does, and
//! stops when dropped. For read-side tests that need exact control over
//! chunks, [`TestServer::seed_path`] writes store paths the way the
//! pipeline leaves them: the NAR cut into chunks, each chunk one zstd
//! frame in storage, and the NAR, chunk and object rows written through
//! the store layer.
//!
//! Binaries for command-line tests are found by [`binary`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use larder_api::cache_name::{CacheName, CacheNamePattern};
use larder_config::{
    AuthConfig, DatabaseConfig, GcConfig, HttpConfig, IngestConfig, LogConfig, OpsConfig,
    PipelineConfig, QueueConfig, QuotaConfig, Secret, ServerConfig, StorageConfig,
};
use larder_db::{
    Actor, Backend, Cache, CacheId, CacheKeypair, ChunkLocation, Database, EncodedListing, Nar,
    NewCache, NewObject, Object, ObjectMetadata, StoredChunk, Timestamp, TokenRecord,
};
use larder_nix::nar::read_nar;
use larder_nix::{NarHash, SecretKey, Sha256Hash, StorePathHash};
use larder_storage::{LocalStorage, ObjectKey, Storage};
use larder_token::{
    MintedToken, Permission, Permissions, TokenAlgorithm, TokenBuilder, TokenSigningKey,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::counting_storage::CountingStorage;
use crate::services;

/// The size of the slices [`TestServer::seed_path`] cuts NARs into: small,
/// so that a NAR of a few hundred KiB already has several chunks.
pub const SEED_CHUNK_SIZE: usize = 64 * 1024;

/// The zstd level seeded chunks are compressed with (the level does not
/// matter to readers; a low one keeps seeding fast).
const SEED_ZSTD_LEVEL: i32 = 3;

/// RSA keys for RS256 servers. They are test fixtures from
/// `common/token/src/testdata/` and protect nothing.
pub const RS256_PEM: &str = include_str!("../../common/token/src/testdata/rsa-2048-pkcs8.pem");
/// A second, unrelated RSA key: tokens it signs must fail on a server
/// configured with [`RS256_PEM`].
pub const OTHER_RS256_PEM: &str =
    include_str!("../../common/token/src/testdata/rsa-2048-pkcs1.pem");

/// A change to the config a [`TestServer`] writes and starts with, for the
/// settings the named fields below do not cover (limits, timeouts, quotas).
pub type ConfigEdit = Arc<dyn Fn(&mut ServerConfig) + Send + Sync>;

/// Which database and which token algorithm a [`TestServer`] uses.
#[derive(Clone)]
pub struct TestServerOptions {
    pub backend: Backend,
    pub algorithm: TokenAlgorithm,
    /// The config's `api-endpoint`, if any.
    pub api_endpoint: Option<String>,
    /// The push endpoints' limits and waiting.
    pub ingest: IngestConfig,
    /// GC and access-time flushing.
    pub gc: GcConfig,
    /// A database to use instead of a fresh one of `backend` (which must
    /// then name its kind), e.g. one on a private PostgreSQL a fault test
    /// stops.
    pub database_url: Option<String>,
    /// Applied last, to the whole config.
    pub edit_config: Option<ConfigEdit>,
    /// Serve through a [`CountingStorage`] around the configured storage,
    /// read back with [`TestServer::storage_requests`].
    pub count_storage: bool,
}

impl std::fmt::Debug for TestServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServerOptions")
            .field("backend", &self.backend)
            .field("algorithm", &self.algorithm)
            .field("api_endpoint", &self.api_endpoint)
            .field("ingest", &self.ingest)
            .field("gc", &self.gc)
            .field("database_url", &self.database_url)
            .field("edit_config", &self.edit_config.as_ref().map(|_| "…"))
            .field("count_storage", &self.count_storage)
            .finish()
    }
}

impl Default for TestServerOptions {
    fn default() -> Self {
        Self {
            backend: Backend::Sqlite,
            algorithm: TokenAlgorithm::Hs256,
            api_endpoint: None,
            ingest: IngestConfig::default(),
            gc: GcConfig::default(),
            database_url: None,
            edit_config: None,
            count_storage: false,
        }
    }
}

/// Any failure while seeding, as a message.
pub type SeedError = Box<dyn std::error::Error + Send + Sync>;

/// Writes a store path into a cache as the push pipeline would: the NAR
/// cut into [`SEED_CHUNK_SIZE`] slices, each compressed into one zstd frame
/// and stored under `chunks/<sha256 hex>.zst`, then the NAR (made valid),
/// its chunks, its `.ls` listing (when the bytes are a NAR) and the
/// object, through the store layer. Returns the NAR row and its chunks'
/// keys in order. Used by [`TestServer::seed_path`] and by the serving
/// benchmark's driver.
pub async fn seed_nar(
    database: &Database,
    storage: &dyn Storage,
    cache_id: CacheId,
    store_path_hash: StorePathHash,
    metadata: ObjectMetadata,
    created_by: &str,
    nar: &[u8],
) -> Result<(Nar, Vec<ObjectKey>), SeedError> {
    let mut chunks = Vec::new();
    for slice in nar.chunks(SEED_CHUNK_SIZE) {
        chunks.push(store_seed_chunk(storage, slice).await?);
    }
    record_seeded_nar(
        database,
        cache_id,
        store_path_hash,
        metadata,
        created_by,
        nar,
        &chunks,
    )
    .await
}

/// [`seed_nar`] with the NAR's frames written into pack objects
/// (`packs/<sha256 hex of the pack>.pack`) of at most `pack_bytes` each
/// (or one frame, when a frame is larger), in order, each chunk's location
/// a range of its pack: the layout of packed storage (issue #16). As in
/// the pipeline, a chunk the NAR repeats is written once, at its first
/// use.
#[allow(clippy::too_many_arguments)]
pub async fn seed_packed_nar(
    database: &Database,
    storage: &dyn Storage,
    cache_id: CacheId,
    store_path_hash: StorePathHash,
    metadata: ObjectMetadata,
    created_by: &str,
    nar: &[u8],
    pack_bytes: usize,
) -> Result<(Nar, Vec<ObjectKey>), SeedError> {
    // Each slice's hash and size, and its frame's place: the index of its
    // pack in `keys`, then the offset and length in it.
    let mut slices: Vec<(Sha256Hash, u64, (usize, u64, u64))> = Vec::new();
    let mut written: HashMap<Sha256Hash, (usize, u64, u64)> = HashMap::new();
    let mut keys: Vec<String> = Vec::new();
    let mut pack: Vec<u8> = Vec::new();
    for slice in nar.chunks(SEED_CHUNK_SIZE) {
        let chunk_hash = Sha256Hash::digest(slice);
        let place = match written.get(&chunk_hash) {
            Some(place) => *place,
            None => {
                if !pack.is_empty() && pack.len() >= pack_bytes {
                    keys.push(put_seed_pack(storage, std::mem::take(&mut pack)).await?);
                }
                let frame = zstd::bulk::compress(slice, SEED_ZSTD_LEVEL)?;
                let place = (keys.len(), pack.len() as u64, frame.len() as u64);
                pack.extend_from_slice(&frame);
                written.insert(chunk_hash, place);
                place
            }
        };
        slices.push((chunk_hash, slice.len() as u64, place));
    }
    if !pack.is_empty() {
        keys.push(put_seed_pack(storage, pack).await?);
    }
    let chunks: Vec<StoredChunk> = slices
        .into_iter()
        .map(
            |(chunk_hash, chunk_size, (pack, offset, length))| StoredChunk {
                chunk_hash,
                chunk_size,
                location: ChunkLocation {
                    object_key: keys[pack].clone(),
                    offset,
                    length,
                },
            },
        )
        .collect();
    record_seeded_nar(
        database,
        cache_id,
        store_path_hash,
        metadata,
        created_by,
        nar,
        &chunks,
    )
    .await
}

/// The rows of a seeded NAR whose chunks are stored: NAR hash and listing
/// from its bytes, then [`record_seeded`].
async fn record_seeded_nar(
    database: &Database,
    cache_id: CacheId,
    store_path_hash: StorePathHash,
    metadata: ObjectMetadata,
    created_by: &str,
    nar: &[u8],
    chunks: &[StoredChunk],
) -> Result<(Nar, Vec<ObjectKey>), SeedError> {
    let nar_hash = NarHash::from(Sha256Hash::digest(nar));
    let listing = match read_nar(nar, true) {
        Ok(summary) => summary
            .listing
            .map(|listing| EncodedListing::encode(&listing)),
        Err(_) => None,
    }
    .transpose()?;
    let nar_row = record_seeded(
        database,
        cache_id,
        store_path_hash,
        metadata,
        created_by,
        (nar_hash, nar.len() as u64),
        chunks,
        listing.as_ref(),
    )
    .await?;
    Ok((nar_row, seed_chunk_keys(chunks)?))
}

/// Compresses one slice into a zstd frame and stores it under
/// `chunks/<sha256 hex>.zst`.
/// Stores a seeded pack under the hash of its bytes; returns its key.
async fn put_seed_pack(storage: &dyn Storage, pack: Vec<u8>) -> Result<String, SeedError> {
    let key = format!("packs/{}.pack", Sha256Hash::digest(&pack).to_hex());
    storage
        .put(&ObjectKey::new(key.as_str())?, Bytes::from(pack))
        .await?;
    Ok(key)
}

async fn store_seed_chunk(storage: &dyn Storage, slice: &[u8]) -> Result<StoredChunk, SeedError> {
    let chunk_hash = Sha256Hash::digest(slice);
    let compressed = zstd::bulk::compress(slice, SEED_ZSTD_LEVEL)?;
    let key = ObjectKey::new(format!("chunks/{}.zst", chunk_hash.to_hex()))?;
    let length = compressed.len() as u64;
    storage.put(&key, Bytes::from(compressed)).await?;
    Ok(StoredChunk {
        chunk_hash,
        chunk_size: slice.len() as u64,
        location: ChunkLocation {
            object_key: key.as_str().to_owned(),
            offset: 0,
            length,
        },
    })
}

fn seed_chunk_keys(chunks: &[StoredChunk]) -> Result<Vec<ObjectKey>, SeedError> {
    chunks
        .iter()
        .map(|chunk| Ok(ObjectKey::new(chunk.location.object_key.as_str())?))
        .collect()
}

/// The NAR (made valid with `chunks`), its listing if any, and the object,
/// through the store layer.
#[allow(clippy::too_many_arguments)]
async fn record_seeded(
    database: &Database,
    cache_id: CacheId,
    store_path_hash: StorePathHash,
    metadata: ObjectMetadata,
    created_by: &str,
    (nar_hash, nar_size): (NarHash, u64),
    chunks: &[StoredChunk],
    listing: Option<&EncodedListing>,
) -> Result<Nar, SeedError> {
    let nar_row = database
        .store_complete_nar(&nar_hash, nar_size, chunks, Timestamp::now())
        .await?;
    if let Some(listing) = listing {
        database.set_nar_listing(nar_row.id, listing).await?;
    }
    database
        .upsert_object(
            cache_id,
            &NewObject {
                store_path_hash,
                nar_id: nar_row.id,
                metadata,
                created_by: Actor {
                    subject: Some(created_by.to_owned()),
                    jti: None,
                },
            },
            Timestamp::now(),
        )
        .await?;
    Ok(nar_row)
}

/// Deterministic pseudo-random bytes (xorshift) that zstd cannot shrink
/// much, for NARs that span several chunks and contents that exercise real
/// data paths.
pub fn pseudo_random(len: usize, mut state: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What [`TestServer::seed_path`] wrote.
#[derive(Debug, Clone)]
pub struct SeededPath {
    pub store_path_hash: StorePathHash,
    pub nar: Nar,
    /// The storage keys of the NAR's chunks, in order.
    pub chunk_keys: Vec<ObjectKey>,
}

impl SeededPath {
    /// `nar/<nix-base32 NAR hash>.nar.zst`, the NAR's URL relative to a
    /// cache (the server names NARs by their hash).
    pub fn nar_url(&self) -> String {
        format!("nar/{}.nar.zst", self.nar.nar_hash.sha256().to_base32())
    }
}

/// A running in-process server; stopped (gracefully) when dropped.
pub struct TestServer {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: ServerConfig,
    address: SocketAddr,
    /// The ops listener's address, when the config sets `[ops] listen`.
    ops_address: Option<SocketAddr>,
    database: Database,
    storage: Arc<LocalStorage>,
    /// The configured storage (local, or S3 when the config says so),
    /// uncounted: where seeding writes.
    seed_storage: Arc<dyn Storage>,
    /// What the server asked of storage, when counted.
    storage_requests: Option<Arc<CountingStorage>>,
    signing_key: TokenSigningKey,
    http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ingest_api::ServerError>>>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("address", &self.address)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl TestServer {
    /// A server on a fresh SQLite database, signing tokens with HS256.
    pub async fn sqlite() -> Self {
        Self::start(TestServerOptions::default()).await
    }

    /// A server on a fresh PostgreSQL database (from the harness's
    /// PostgreSQL), signing tokens with HS256.
    pub async fn postgres() -> Self {
        Self::start(TestServerOptions {
            backend: Backend::Postgres,
            ..TestServerOptions::default()
        })
        .await
    }

    /// A server on a fresh database of `backend`, signing tokens with HS256.
    pub async fn on(backend: Backend) -> Self {
        Self::start(TestServerOptions {
            backend,
            ..TestServerOptions::default()
        })
        .await
    }

    /// Writes the config file, builds the server exactly as the binary
    /// does, and serves in a background task.
    ///
    /// # Panics
    ///
    /// When any step fails: a test cannot go on without its server.
    pub async fn start(options: TestServerOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("larder-server-")
            .tempdir()
            .expect("creating the server's temporary directory");
        let database_url = match (&options.database_url, options.backend) {
            (Some(url), _) => url.clone(),
            (None, Backend::Sqlite) => {
                format!("sqlite://{}", dir.path().join("server.db").display())
            }
            (None, Backend::Postgres) => services::fresh_postgres_database().await,
        };
        let auth = match options.algorithm {
            TokenAlgorithm::Hs256 => {
                let secret: [u8; 32] = rand::random();
                AuthConfig {
                    hs256_secret_base64: Some(Secret::new(
                        base64::engine::general_purpose::STANDARD.encode(secret),
                    )),
                    rs256_private_key_pem: None,
                }
            }
            TokenAlgorithm::Rs256 => AuthConfig {
                hs256_secret_base64: None,
                rs256_private_key_pem: Some(Secret::new(RS256_PEM)),
            },
        };
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse().expect("a valid socket address"),
            api_endpoint: options.api_endpoint.clone(),
            database: DatabaseConfig {
                url: Secret::new(database_url),
            },
            storage: StorageConfig::Local {
                path: dir.path().join("storage"),
            },
            auth,
            ingest: options.ingest.clone(),
            http: HttpConfig::default(),
            pipeline: PipelineConfig::default(),
            gc: options.gc.clone(),
            queue: QueueConfig::default(),
            quota: QuotaConfig::default(),
            log: LogConfig::default(),
            ops: OpsConfig::default(),
        };
        if let Some(edit) = &options.edit_config {
            edit(&mut config);
        }
        let config_path = dir.path().join("server.toml");
        std::fs::write(&config_path, config.to_toml()).expect("writing the server's config");

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .expect("binding 127.0.0.1:0");
        let address = listener.local_addr().expect("the listener's address");
        let served_storage = larder_storage::open(&config.storage)
            .await
            .unwrap_or_else(|error| {
                panic!("opening the server's storage: {}", error_chain(&error))
            });
        let seed_storage = served_storage.clone();
        let storage_requests = options
            .count_storage
            .then(|| Arc::new(CountingStorage::new(served_storage.clone())));
        let served_storage = match &storage_requests {
            Some(counting) => counting.clone() as Arc<dyn Storage>,
            None => served_storage,
        };
        let server = ingest_api::Server::build_with_storage(
            config.clone(),
            listener,
            ingest_api::Role::Monolithic,
            served_storage,
        )
        .await
        .unwrap_or_else(|error| panic!("building the server: {}", error_chain(&error)));
        let ops_address = server.ops_local_addr().expect("the ops listener's address");
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run_until(async move {
            // A dropped sender stops the server as well.
            let _ = stopped.await;
        }));

        // A second pool on the same database: what the test writes is what
        // the server reads, as with the pipeline's workers.
        let database = Database::connect(config.database.url.expose())
            .await
            .unwrap_or_else(|error| panic!("connecting the test's own pool: {error}"));
        let storage = Arc::new(
            LocalStorage::open(dir.path().join("storage"))
                .await
                .expect("opening the server's storage directory"),
        );
        let signing_key = ingest_api::signing_key(&config).expect("the configured signing key");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("building the HTTP client");
        Self {
            dir,
            config_path,
            config,
            address,
            ops_address,
            database,
            storage,
            seed_storage,
            storage_requests,
            signing_key,
            http,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The URL of `path` on this server; `path` starts with `/`.
    pub fn url_of(&self, path: &str) -> String {
        format!("{}{path}", self.url())
    }

    /// The substituter URL of a cache, `http://127.0.0.1:PORT/<cache>`.
    pub fn cache_url(&self, cache: &str) -> String {
        format!("{}/{cache}", self.url())
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT` of the ops listener, when the config sets
    /// `[ops] listen`.
    pub fn ops_url(&self) -> Option<String> {
        self.ops_address.map(|address| format!("http://{address}"))
    }

    /// The config file, for `ingest-api --config` against this server.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The server's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A pool on the server's database.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// The server's storage directory.
    pub fn storage(&self) -> &LocalStorage {
        &self.storage
    }

    /// What the server asked of storage so far.
    ///
    /// # Panics
    ///
    /// Unless the server was started with `count_storage`.
    pub fn storage_requests(&self) -> &CountingStorage {
        self.storage_requests
            .as_deref()
            .expect("a server started with `count_storage: true`")
    }

    /// The token-signing key from the server's config.
    pub fn signing_key(&self) -> &TokenSigningKey {
        &self.signing_key
    }

    /// A shared HTTP client (60 s timeout).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Mints a token for `subject` valid for `validity`, granting each
    /// pattern its permissions, and records it in the database (as
    /// `make-token` does) so that it can be listed and revoked.
    pub async fn mint_token(
        &self,
        subject: &str,
        validity: Duration,
        grants: &[(&str, &[Permission])],
    ) -> MintedToken {
        let builder = token_builder(subject, validity, grants);
        let minted = builder.mint(&self.signing_key).expect("minting a token");
        self.record_token(&minted).await;
        minted
    }

    /// [`mint_token`](Self::mint_token), returning just the token string.
    pub async fn mint(
        &self,
        subject: &str,
        validity: Duration,
        grants: &[(&str, &[Permission])],
    ) -> String {
        self.mint_token(subject, validity, grants).await.token
    }

    /// A token with every permission on every cache, valid for an hour.
    pub async fn root_token(&self) -> String {
        self.mint(
            "root",
            Duration::from_secs(3600),
            &[("*", &Permission::ALL)],
        )
        .await
    }

    /// Records a minted token in the token table.
    pub async fn record_token(&self, minted: &MintedToken) {
        record_token(&self.database, minted).await;
    }

    /// Creates a cache with a generated key named `<name>-1` (see
    /// [`create_cache`]).
    pub async fn create_cache(&self, name: &str, is_public: bool) -> Cache {
        create_cache(&self.database, name, is_public).await
    }

    /// Writes a store path into `cache` as the push pipeline would: the NAR
    /// cut into [`SEED_CHUNK_SIZE`] slices, each compressed into one zstd
    /// frame and stored under `chunks/<sha256 hex>.zst`, then the NAR (made
    /// valid), its chunks and the object, through the store layer.
    /// `metadata.store_path` is the full path; references and deriver are
    /// base names.
    pub async fn seed_path(&self, cache: &str, metadata: ObjectMetadata, nar: &[u8]) -> SeededPath {
        let cache = self.cache_row(cache).await;
        let store_path_hash = store_path_hash_of(&metadata);

        let (nar_row, chunk_keys) = seed_nar(
            &self.database,
            self.seed_storage.as_ref(),
            cache.id,
            store_path_hash,
            metadata,
            "test-seed",
            nar,
        )
        .await
        .unwrap_or_else(|error| panic!("seeding {store_path_hash}: {error}"));
        SeededPath {
            store_path_hash,
            nar: nar_row,
            chunk_keys,
        }
    }

    /// [`seed_path`](Self::seed_path) with the NAR's frames in pack
    /// objects of at most `pack_bytes` (see [`seed_packed_nar`]).
    pub async fn seed_packed_path(
        &self,
        cache: &str,
        metadata: ObjectMetadata,
        nar: &[u8],
        pack_bytes: usize,
    ) -> SeededPath {
        let cache = self.cache_row(cache).await;
        let store_path_hash = store_path_hash_of(&metadata);
        let (nar_row, chunk_keys) = seed_packed_nar(
            &self.database,
            self.seed_storage.as_ref(),
            cache.id,
            store_path_hash,
            metadata,
            "test-seed",
            nar,
            pack_bytes,
        )
        .await
        .unwrap_or_else(|error| panic!("seeding {store_path_hash}: {error}"));
        SeededPath {
            store_path_hash,
            nar: nar_row,
            chunk_keys,
        }
    }

    /// Writes a store path into `cache` whose NAR is `chunk` repeated
    /// `times` times: one chunk object, listed `times` times, as a NAR of
    /// zeros cut by FastCDC is. Its NAR hash is made up (hashing gigabytes
    /// would only slow the test; serving never rehashes) and it has no
    /// listing.
    pub async fn seed_repeated_chunk(
        &self,
        cache: &str,
        metadata: ObjectMetadata,
        chunk: &[u8],
        times: usize,
    ) -> SeededPath {
        let cache = self.cache_row(cache).await;
        let store_path_hash = store_path_hash_of(&metadata);
        let stored = store_seed_chunk(self.seed_storage.as_ref(), chunk)
            .await
            .unwrap_or_else(|error| panic!("storing the chunk: {error}"));
        let nar_hash = NarHash::from(Sha256Hash::digest(
            format!("{} repeated {times} times", stored.chunk_hash.to_hex()).as_bytes(),
        ));
        let chunks = vec![stored; times];
        let nar = record_seeded(
            &self.database,
            cache.id,
            store_path_hash,
            metadata,
            "test-seed",
            (nar_hash, (chunk.len() * times) as u64),
            &chunks,
            None,
        )
        .await
        .unwrap_or_else(|error| panic!("seeding {store_path_hash}: {error}"));
        SeededPath {
            store_path_hash,
            nar,
            chunk_keys: seed_chunk_keys(&chunks).expect("keys made by store_seed_chunk"),
        }
    }

    /// Every object (path) `cache` holds.
    pub async fn objects(&self, cache: &str) -> Vec<Object> {
        let cache = self.cache_row(cache).await;
        self.database
            .objects_of_cache(cache.id)
            .await
            .expect("listing the cache's objects")
    }

    async fn cache_row(&self, cache: &str) -> Cache {
        let cache_name: CacheName = cache.parse().expect("a valid cache name");
        self.database
            .cache_by_name(&cache_name)
            .await
            .expect("looking up the cache")
            .unwrap_or_else(|| panic!("cache {cache_name} does not exist"))
    }

    /// Sends a request whose target is written on the wire exactly as
    /// given, for paths an HTTP client library would normalise (`..`
    /// segments, stray percent escapes). One request per connection.
    pub async fn raw_request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> RawResponse {
        raw_request(self.address, method, target, headers, body).await
    }

    /// Stops the server and waits for it, reporting how it ended.
    pub async fn stop(mut self) {
        self.shut_down().await;
    }

    /// Stops the server and waits for it, reporting how it ended, and
    /// keeps its directory and database for a look at what it left.
    pub async fn shut_down(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("the server task panicked")
                .expect("the server failed");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // The runtime cancels the task when the test ends; this lets it
        // finish its in-flight requests first if the runtime lives on.
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// The hash part of `metadata.store_path`.
fn store_path_hash_of(metadata: &ObjectMetadata) -> StorePathHash {
    let base_name = metadata
        .store_path
        .rsplit('/')
        .next()
        .expect("split yields at least one part");
    StorePathHash::parse(base_name.get(..32).unwrap_or(base_name))
        .unwrap_or_else(|error| panic!("store path {}: {error}", metadata.store_path))
}

/// An error and its causes, `: `-separated.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// A running Larder HTTP API: the in-process [`TestServer`], or an API
/// process of a [`crate::cluster::Cluster`].
pub trait HttpApi {
    /// `http://127.0.0.1:PORT` (no trailing slash).
    fn url(&self) -> String;

    fn http(&self) -> &reqwest::Client;

    /// The URL of `path` on this server; `path` starts with `/`.
    fn url_of(&self, path: &str) -> String {
        format!("{}{path}", self.url())
    }

    /// The substituter URL of a cache, `http://127.0.0.1:PORT/<cache>`.
    fn cache_url(&self, cache: &str) -> String {
        format!("{}/{cache}", self.url())
    }
}

impl HttpApi for TestServer {
    fn url(&self) -> String {
        TestServer::url(self)
    }

    fn http(&self) -> &reqwest::Client {
        TestServer::http(self)
    }
}

/// Creates a cache through the store layer with a generated key named
/// `<name>-1`, and returns it.
pub async fn create_cache(database: &Database, name: &str, is_public: bool) -> Cache {
    let cache_name: CacheName = name.parse().expect("a valid cache name");
    let key = SecretKey::generate(&format!("{name}-1")).expect("generating a cache key");
    let mut new = NewCache::new(cache_name, CacheKeypair::new(key.to_nix_secret_string()));
    new.is_public = is_public;
    database
        .create_cache(&new, Timestamp::now())
        .await
        .unwrap_or_else(|error| panic!("creating cache {name}: {error}"))
}

/// Records a minted token in the token table, as `make-token` does, so
/// that it can be listed and revoked.
pub async fn record_token(database: &Database, minted: &MintedToken) {
    let claims = &minted.claims;
    database
        .record_token(&TokenRecord {
            jti: claims.jti.clone(),
            sub: claims.sub.clone(),
            claims: serde_json::to_value(claims).expect("claims serialise"),
            issued_at: claims.issued_at().into(),
            expires_at: claims.expires_at().into(),
            revoked_at: None,
        })
        .await
        .expect("recording a token");
}

/// A [`TokenBuilder`] with the given grants.
pub fn token_builder(
    subject: &str,
    validity: Duration,
    grants: &[(&str, &[Permission])],
) -> TokenBuilder {
    grants.iter().fold(
        TokenBuilder::new(subject, validity),
        |builder, (pattern, permissions)| {
            let pattern: CacheNamePattern = pattern.parse().expect("a valid cache pattern");
            builder.grant(
                pattern,
                permissions.iter().copied().collect::<Permissions>(),
            )
        },
    )
}

/// A token that expired a day ago (it was valid for one day, two days
/// ago), signed with `key`. Not recorded anywhere.
pub fn expired_token(key: &TokenSigningKey, grants: &[(&str, &[Permission])]) -> String {
    let day = Duration::from_secs(24 * 3600);
    token_builder("expired", day, grants)
        .mint_at(key, SystemTime::now() - 2 * day)
        .expect("minting an expired token")
        .token
}

/// An HTTP response read off a raw connection.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header names in lower case, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// See [`TestServer::raw_request`].
pub async fn raw_request(
    address: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .unwrap_or_else(|error| panic!("connecting to {address}: {error}"));
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await.expect("sending the request");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .expect("the server answered within 30 s")
        .expect("reading the response");
    parse_raw_response(&response, method == "HEAD")
}

fn parse_raw_response(response: &[u8], head: bool) -> RawResponse {
    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no end of headers in {:?}",
                String::from_utf8_lossy(response)
            )
        });
    let head_text = std::str::from_utf8(&response[..split]).expect("headers are text");
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let rest = &response[split + 4..];
    let chunked = headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
    let body = if head {
        Vec::new()
    } else if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    RawResponse {
        status,
        headers,
        body,
    }
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = data.windows(2).position(|window| window == b"\r\n") else {
            return out;
        };
        let size_text = std::str::from_utf8(&data[..end]).unwrap_or("0");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
}

/// The path of a binary built from this workspace, e.g. `ingest-api`:
/// `$LARDER_TEST_BIN_DIR/<name>` when that is set, else beside the test
/// executable's `deps/` directory (`target/debug/<name>`).
///
/// # Panics
///
/// When the binary is not there: it must be built first.
pub fn binary(name: &str) -> PathBuf {
    let directory = match std::env::var_os("LARDER_TEST_BIN_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("the test executable's path");
            // …/target/debug/deps/it-<hash> → …/target/debug
            let deps = exe.parent().expect("the test executable has a directory");
            deps.parent().unwrap_or(deps).to_owned()
        }
    };
    let path = directory.join(name);
    assert!(
        path.is_file(),
        "{} does not exist: build it with `cargo build --workspace --bins` (ops/test.sh does)",
        path.display()
    );
    path
}

/// The number of files under `dir`, at any depth (0 when it does not
/// exist), leaving out the temporary files of writes still in progress
/// (`LocalStorage` writes `NAME.tmp-…`, then renames it to `NAME`): how
/// tests count the objects a local storage holds. A redundant job may still
/// be rewriting an object after the upload it served is done.
pub fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|entry| {
            let entry = entry.expect("directory entry");
            if entry.file_type().expect("file type").is_dir() {
                count_files(&entry.path())
            } else {
                usize::from(!entry.file_name().to_string_lossy().contains(".tmp-"))
            }
        })
        .sum()
}
