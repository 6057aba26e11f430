//! The metadata store (`larder_db`) against both backends.
//!
//! Every test is written once as an `async fn(TestDb)` and instantiated by
//! [`both_backends!`] twice: `db::sqlite::NAME` on a fresh SQLite file in a
//! temporary directory, and `db::postgres::NAME` on a fresh PostgreSQL
//! database (`tests::services::fresh_postgres_database`, which needs
//! `LARDER_TEST_POSTGRES_URL` and fails loudly without it).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use larder_api::cache_name::CacheName;
use larder_db::chunking::{max_chunk_entries, MIN_CHUNK_SIZE};
use larder_db::{
    migrations, Actor, Backend, Cache, CacheId, CacheKeypair, CacheScope, CacheStats, CacheUpdate,
    Chunk, ChunkId, ChunkLocation, Database, DbError, EncodedListing, Nar, NarId, NewCache,
    NewChunk, NewObject, NewPack, NewUpload, ObjectMetadata, StagedFile, StoreState, StoredChunk,
    Timestamp, TokenRecord, UploadId, UploadPhase,
};
use larder_nix::nar::{ListingNode, NarListing};
use larder_nix::{NarHash, Sha256Hash, StoreDir, StorePathHash};
use tempfile::TempDir;
use tests::services;

/// A migrated, empty database of one backend, and what keeps it alive.
struct TestDb {
    db: Database,
    url: String,
    /// The SQLite file's directory, deleted on drop.
    _dir: Option<TempDir>,
}

async fn open(backend: Backend) -> TestDb {
    let (url, dir) = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("creating a temporary directory");
            let url = format!("sqlite:{}", dir.path().join("larder.sqlite").display());
            (url, Some(dir))
        }
        Backend::Postgres => (services::fresh_postgres_database().await, None),
    };
    let db = Database::connect(&url)
        .await
        .unwrap_or_else(|error| panic!("connecting to {url}: {error}"));
    assert_eq!(db.backend(), backend);
    db.migrate()
        .await
        .unwrap_or_else(|error| panic!("migrating {url}: {error:?}"));
    TestDb { db, url, _dir: dir }
}

/// Instantiates each named `async fn(TestDb)` once per backend.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::open(larder_db::Backend::Sqlite).await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::open(larder_db::Backend::Postgres).await).await;
                }
            )*
        }
    };
}

both_backends!(
    migrations_apply_to_an_empty_database_and_rerun_cleanly,
    caches_are_created_read_updated_listed_and_deleted,
    a_key_rotation_is_stored_and_key_changes_apply_only_to_the_keys_read,
    a_public_scope_finds_a_private_cache_no_more_than_a_missing_one,
    cache_names_are_unique,
    destroying_a_cache_cascades_to_its_objects_and_uploads,
    an_object_is_hidden_while_its_nar_is_pending,
    objects_are_scoped_to_their_cache,
    upserting_an_object_replaces_its_metadata,
    missing_paths_exclude_objects_and_uploads_in_flight,
    concurrent_pending_inserts_of_one_nar_hash_yield_one_row,
    chunks_and_nars_round_trip_in_order,
    chunk_rows_are_shared_between_nars,
    a_batch_of_chunks_is_marked_stored_together_or_not_at_all,
    a_complete_nar_is_written_in_one_call,
    concurrent_writers_of_nars_sharing_chunks_all_succeed,
    long_chunk_lists_round_trip,
    chunk_lists_are_read_in_pages,
    each_entry_names_the_next_use_of_its_chunk,
    a_chunk_list_is_bounded_by_its_nar_size,
    listings_are_stored_once_and_go_with_their_nar,
    a_staged_file_is_kept_once_and_claimed_once,
    an_upload_in_flight_is_found_by_path_and_nar,
    uploads_move_forward_through_their_phases,
    stuck_uploads_are_listed_by_phase_and_age,
    finalising_an_upload_makes_its_object_visible,
    tokens_are_recorded_listed_and_revoked,
    access_times_only_move_forward,
    per_cache_stats_count_logical_and_stored_bytes,
);

// ---------------------------------------------------------------- fixtures

const T0: Timestamp = Timestamp::from_unix_millis(1_700_000_000_000);

fn at(seconds_after_t0: i64) -> Timestamp {
    Timestamp::from_unix_millis(T0.unix_millis() + seconds_after_t0 * 1000)
}

fn cache_name(name: &str) -> CacheName {
    name.parse().expect("valid test cache name")
}

fn keypair(name: &str) -> CacheKeypair {
    CacheKeypair::new(format!(
        "{name}-1:c2VjcmV0LWtleS1ieXRlcy1mb3ItdGVzdHMtb25seQ=="
    ))
}

async fn create_cache(db: &Database, name: &str) -> Cache {
    db.create_cache(&NewCache::new(cache_name(name), keypair(name)), T0)
        .await
        .expect("creating a test cache")
}

/// A distinct store path hash per `n`.
fn path_hash(n: u8) -> StorePathHash {
    StorePathHash::from_bytes(&[n; 20])
}

fn nar_hash(n: u8) -> NarHash {
    NarHash::new(Sha256Hash::digest(&[b'n', n]))
}

fn chunk_hash(n: u8) -> Sha256Hash {
    Sha256Hash::digest(&[b'c', n])
}

fn metadata(hash: &StorePathHash) -> ObjectMetadata {
    ObjectMetadata {
        store_path: format!("/nix/store/{hash}-hello-2.12"),
        references: vec![
            format!("{hash}-hello-2.12"),
            "3n58xw4373jp0ljirf06d8077j15pc4j-glibc-2.38".to_owned(),
        ],
        deriver: Some("fm4xkcd2rb6kd0bdbypy8s9ksbvdn2yz-hello-2.12.drv".to_owned()),
        system: Some("x86_64-linux".to_owned()),
        sigs: vec!["pusher-1:c2lnbmF0dXJl".to_owned()],
        ca: None,
    }
}

fn location(n: u8) -> ChunkLocation {
    ChunkLocation {
        object_key: format!("chunks/{}", chunk_hash(n).to_hex()),
        offset: 0,
        length: 100 + u64::from(n),
    }
}

/// Marks one chunk stored: `set_chunks_stored` of one, in a pack of its
/// own, the row it returns.
async fn set_chunk_stored(
    db: &Database,
    chunk_id: ChunkId,
    location: &ChunkLocation,
) -> Result<Chunk, DbError> {
    let pack = NewPack {
        object_key: location.object_key.clone(),
        size: location.offset + location.length,
    };
    let mut rows = db
        .set_chunks_stored(&pack, &[(chunk_id, location.clone())], T0)
        .await?;
    Ok(rows.pop().expect("one row per chunk marked"))
}

fn stored_chunk(n: u8) -> StoredChunk {
    StoredChunk {
        chunk_hash: chunk_hash(n),
        chunk_size: 1000 + u64::from(n),
        location: location(n),
    }
}

/// A valid NAR made of the chunks numbered `chunks`.
async fn valid_nar(db: &Database, n: u8, nar_size: u64, chunks: &[u8]) -> NarId {
    let stored: Vec<StoredChunk> = chunks.iter().map(|&c| stored_chunk(c)).collect();
    db.store_complete_nar(&nar_hash(n), nar_size, &stored, T0)
        .await
        .expect("storing a complete NAR")
        .id
}

fn new_object(hash: StorePathHash, nar_id: NarId) -> NewObject {
    NewObject {
        store_path_hash: hash,
        nar_id,
        metadata: metadata(&hash),
        created_by: Actor {
            subject: Some("alice".to_owned()),
            jti: None,
        },
    }
}

fn new_upload(cache_id: CacheId, hash: StorePathHash, n: u8) -> NewUpload {
    NewUpload {
        cache_id,
        store_path_hash: hash,
        nar_hash: nar_hash(n),
        nar_size: 4096,
        metadata: metadata(&hash),
        staged_key: format!("staging/{hash}.nar"),
        staged_crc32: Some(u32::from(n) << 24 | 0xab_cdef),
        trace_id: Some("trace-1".to_owned()),
        created_by: Actor {
            subject: Some("alice".to_owned()),
            jti: None,
        },
    }
}

// ------------------------------------------------------------------- tests

/// The embedded migration list matches the files in both directories, so a
/// migration file cannot be added without being run.
#[test]
fn embedded_migrations_match_the_migration_directories() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../common/db/migrations");
    for backend in ["sqlite", "postgres"] {
        let mut files: Vec<String> = std::fs::read_dir(root.join(backend))
            .unwrap_or_else(|error| panic!("reading migrations/{backend}: {error}"))
            .map(|entry| {
                entry
                    .expect("reading a directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        files.sort();
        assert_eq!(
            files,
            migrations::embedded_file_names(),
            "migrations/{backend}"
        );
    }
}

async fn migrations_apply_to_an_empty_database_and_rerun_cleanly(t: TestDb) {
    // `open` migrated an empty database; again, and from a second pool, is
    // a no-op.
    t.db.migrate().await.expect("re-running migrations");
    let second = Database::connect(&t.url).await.expect("second connection");
    second
        .migrate()
        .await
        .expect("migrating from a second pool");
    assert_eq!(
        second.list_cache_names().await.expect("listing"),
        Vec::<CacheName>::new()
    );
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(t.db.pool())
        .await
        .expect("counting applied migrations");
    assert_eq!(applied, migrations::embedded_file_names().len() as i64);
    second.close().await;

    if t.db.backend() == Backend::Sqlite {
        // The connection settings the store layer promises for SQLite.
        let journal_mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(t.db.pool())
            .await
            .expect("reading the journal mode");
        assert_eq!(journal_mode, "wal");
        let foreign_keys: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(t.db.pool())
            .await
            .expect("reading foreign_keys");
        assert_eq!(foreign_keys, 1);
        let busy_timeout: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(t.db.pool())
            .await
            .expect("reading busy_timeout");
        assert_eq!(busy_timeout, 10_000);
    }
}

async fn caches_are_created_read_updated_listed_and_deleted(t: TestDb) {
    let db = &t.db;
    let created = create_cache(db, "hello").await;
    assert_eq!(created.name.as_str(), "hello");
    assert!(!created.is_public);
    assert_eq!(created.store_dir.as_str(), "/nix/store");
    assert_eq!(created.priority, 41);
    assert_eq!(created.upstream_cache_key_names, ["cache.nixos.org-1"]);
    assert_eq!(created.retention_period, None);
    assert_eq!(created.keypair, keypair("hello"));
    assert_eq!(created.created_at, T0);
    let debug = format!("{created:?}");
    assert!(
        !debug.contains("c2VjcmV0"),
        "the secret key leaks into Debug: {debug}"
    );

    let by_name = db
        .cache_by_name(&cache_name("hello"))
        .await
        .expect("by name");
    assert_eq!(by_name.as_ref(), Some(&created));
    let by_id = db.cache_by_id(created.id).await.expect("by id");
    assert_eq!(by_id.as_ref(), Some(&created));
    assert_eq!(
        db.cache_by_name(&cache_name("nope"))
            .await
            .expect("by name"),
        None
    );

    // A partial update changes only what it names.
    let updated = db
        .update_cache(
            &cache_name("hello"),
            &CacheUpdate {
                is_public: Some(true),
                retention_period: Some(Some(Duration::from_secs(30 * 86400))),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect("updating");
    assert!(updated.is_public);
    assert_eq!(
        updated.retention_period,
        Some(Duration::from_secs(30 * 86400))
    );
    assert_eq!(updated.priority, 41);
    assert_eq!(updated.keypair, keypair("hello"));

    let updated = db
        .update_cache(
            &cache_name("hello"),
            &CacheUpdate {
                store_dir: Some(StoreDir::new("/opt/store").expect("store dir")),
                priority: Some(30),
                upstream_cache_key_names: Some(vec![]),
                keypair: Some(keypair("regenerated")),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect("updating");
    assert!(updated.is_public, "an unnamed field kept its value");
    assert_eq!(
        updated.retention_period,
        Some(Duration::from_secs(30 * 86400))
    );
    assert_eq!(updated.store_dir.as_str(), "/opt/store");
    assert_eq!(updated.priority, 30);
    assert!(updated.upstream_cache_key_names.is_empty());
    assert_eq!(updated.keypair, keypair("regenerated"));

    // `Some(None)` resets the retention period to the global default.
    let updated = db
        .update_cache(
            &cache_name("hello"),
            &CacheUpdate {
                retention_period: Some(None),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect("updating");
    assert_eq!(updated.retention_period, None);
    assert_eq!(
        db.cache_by_name(&cache_name("hello"))
            .await
            .expect("by name"),
        Some(updated)
    );

    let missing = db
        .update_cache(&cache_name("nope"), &CacheUpdate::default())
        .await
        .expect_err("updating a missing cache");
    assert!(missing.is_not_found(), "{missing:?}");

    // Names come back sorted bytewise, whatever the server's collation.
    for name in ["b-cache", "A-cache", "a-cache"] {
        create_cache(db, name).await;
    }
    let names: Vec<String> = db
        .list_cache_names()
        .await
        .expect("listing")
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names, ["A-cache", "a-cache", "b-cache", "hello"]);

    assert!(db
        .delete_cache(&cache_name("hello"))
        .await
        .expect("deleting"));
    assert!(!db
        .delete_cache(&cache_name("hello"))
        .await
        .expect("deleting again"));
    assert_eq!(
        db.cache_by_name(&cache_name("hello"))
            .await
            .expect("by name"),
        None
    );
}

/// The lookup the server makes for a caller whose token grants nothing on
/// a name: a private cache is as absent as a missing one.
async fn a_key_rotation_is_stored_and_key_changes_apply_only_to_the_keys_read(t: TestDb) {
    let db = &t.db;
    let name = cache_name("rotating");
    let created = create_cache(db, "rotating").await;
    assert_eq!(created.next_keypair, None);
    let next = keypair("rotating-next");
    let current = created.keypair.clone();

    // Started from the keys as read: the next key is stored beside the
    // current one, and any other update leaves it alone.
    let started = db
        .update_cache(
            &name,
            &CacheUpdate {
                next_keypair: Some(Some(next.clone())),
                if_keys_are: Some((current.clone(), None)),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect("starting a rotation");
    assert_eq!(started.keypair, current);
    assert_eq!(started.next_keypair, Some(next.clone()));
    let updated = db
        .update_cache(
            &name,
            &CacheUpdate {
                priority: Some(7),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect("updating");
    assert_eq!(updated.next_keypair, Some(next.clone()));

    // A change decided from keys read before the rotation started (a
    // second start racing the first) writes nothing.
    let stale = db
        .update_cache(
            &name,
            &CacheUpdate {
                next_keypair: Some(Some(keypair("rotating-other"))),
                priority: Some(1),
                if_keys_are: Some((current.clone(), None)),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect_err("the keys changed");
    assert!(matches!(stale, DbError::Changed { .. }), "{stale:?}");
    assert_eq!(
        db.cache_by_name(&name).await.expect("by name"),
        Some(updated)
    );

    // Finishing: the next key becomes the current one.
    let finished = db
        .update_cache(
            &name,
            &CacheUpdate {
                keypair: Some(next.clone()),
                next_keypair: Some(None),
                if_keys_are: Some((current.clone(), Some(next.clone()))),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect("finishing the rotation");
    assert_eq!(finished.keypair, next);
    assert_eq!(finished.next_keypair, None);

    // A guarded update of a missing cache is still "not found".
    let missing = db
        .update_cache(
            &cache_name("nope"),
            &CacheUpdate {
                next_keypair: Some(Some(keypair("nope"))),
                if_keys_are: Some((keypair("nope"), None)),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect_err("no such cache");
    assert!(matches!(missing, DbError::NotFound { .. }), "{missing:?}");
}

async fn a_public_scope_finds_a_private_cache_no_more_than_a_missing_one(t: TestDb) {
    let db = &t.db;
    let private = create_cache(db, "private").await;
    let public = create_cache(db, "public").await;
    let public = db
        .update_cache(
            &public.name,
            &CacheUpdate {
                is_public: Some(true),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect("making it public");
    let find = |name: &str, scope| {
        let name = cache_name(name);
        async move { db.cache_by_name_in(&name, scope).await.expect("lookup") }
    };
    assert_eq!(find("private", CacheScope::Public).await, None);
    assert_eq!(find("missing", CacheScope::Public).await, None);
    assert_eq!(
        find("public", CacheScope::Public).await,
        Some(public.clone())
    );
    assert_eq!(find("private", CacheScope::Any).await, Some(private));
    assert_eq!(find("public", CacheScope::Any).await, Some(public));
    assert_eq!(find("missing", CacheScope::Any).await, None);
}

async fn cache_names_are_unique(t: TestDb) {
    let db = &t.db;
    let first = create_cache(db, "taken").await;
    let error = db
        .create_cache(&NewCache::new(cache_name("taken"), keypair("other")), T0)
        .await
        .expect_err("a second cache of the same name");
    assert!(error.is_conflict(), "{error:?}");
    assert_eq!(error.to_string(), "cache \"taken\" already exists");
    // The first one is untouched, and the name is free again once deleted.
    assert_eq!(
        db.cache_by_name(&cache_name("taken"))
            .await
            .expect("by name"),
        Some(first.clone())
    );
    assert!(db
        .delete_cache(&cache_name("taken"))
        .await
        .expect("deleting"));
    let second = create_cache(db, "taken").await;
    assert_ne!(second.id, first.id, "ids are never reused");
}

async fn destroying_a_cache_cascades_to_its_objects_and_uploads(t: TestDb) {
    let db = &t.db;
    let doomed = create_cache(db, "doomed").await;
    let kept = create_cache(db, "kept").await;
    let nar = valid_nar(db, 1, 50_000, &[1, 2]).await;
    db.upsert_object(doomed.id, &new_object(path_hash(1), nar), T0)
        .await
        .expect("object");
    db.upsert_object(kept.id, &new_object(path_hash(1), nar), T0)
        .await
        .expect("object");
    let upload = db
        .create_upload(&new_upload(doomed.id, path_hash(2), 2), T0)
        .await
        .expect("upload");

    assert!(db
        .delete_cache(&cache_name("doomed"))
        .await
        .expect("deleting"));
    assert!(db
        .objects_of_cache(doomed.id)
        .await
        .expect("listing")
        .is_empty());
    assert_eq!(db.upload(&upload.id).await.expect("upload"), None);
    // The other cache and the global NAR are untouched.
    assert_eq!(
        db.objects_of_cache(kept.id).await.expect("listing").len(),
        1
    );
    let nar_row = db
        .nar_by_hash(&nar_hash(1))
        .await
        .expect("nar")
        .expect("the NAR stays");
    assert_eq!(nar_row.state, StoreState::Valid);
    assert_eq!(db.chunks_of_nar(nar).await.expect("chunks").len(), 2);
}

async fn an_object_is_hidden_while_its_nar_is_pending(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "hello").await;
    let (nar, created) = db
        .insert_nar_pending(&nar_hash(7), 2048, T0)
        .await
        .expect("pending NAR");
    assert!(created);
    assert_eq!(nar.state, StoreState::Pending);
    let object = db
        .upsert_object(cache.id, &new_object(path_hash(7), nar.id), T0)
        .await
        .expect("object");
    assert_eq!(
        db.find_object(cache.id, &path_hash(7))
            .await
            .expect("lookup"),
        None,
        "a narinfo must not be served for a pending NAR"
    );

    let chunks = db
        .upsert_chunks(
            &[NewChunk {
                chunk_hash: chunk_hash(1),
                chunk_size: 2048,
            }],
            T0,
        )
        .await
        .expect("chunks");
    db.set_nar_chunks(nar.id, &[chunks[0].id])
        .await
        .expect("chunk list");
    assert!(!db
        .mark_nar_valid_if_complete(nar.id)
        .await
        .expect("finalising"));
    assert_eq!(
        db.find_object(cache.id, &path_hash(7))
            .await
            .expect("lookup"),
        None
    );

    set_chunk_stored(db, chunks[0].id, &location(1))
        .await
        .expect("stored");
    assert!(db
        .mark_nar_valid_if_complete(nar.id)
        .await
        .expect("finalising"));
    let found = db
        .find_object(cache.id, &path_hash(7))
        .await
        .expect("lookup")
        .expect("visible once the NAR is valid");
    assert_eq!(found.object, object);
    assert_eq!(found.nar.id, nar.id);
    assert_eq!(found.nar.nar_hash, nar_hash(7));
    assert_eq!(found.nar.nar_size, 2048);
    assert_eq!(found.nar.state, StoreState::Valid);
    assert_eq!(found.nar.n_chunks, 1);
    assert_eq!(found.object.metadata, metadata(&path_hash(7)));
}

async fn objects_are_scoped_to_their_cache(t: TestDb) {
    let db = &t.db;
    let alice = create_cache(db, "alice").await;
    let bob = create_cache(db, "bob").await;
    let nar = valid_nar(db, 1, 100, &[1]).await;
    db.upsert_object(alice.id, &new_object(path_hash(1), nar), T0)
        .await
        .expect("object");
    assert!(db
        .find_object(alice.id, &path_hash(1))
        .await
        .expect("lookup")
        .is_some());
    assert_eq!(
        db.find_object(bob.id, &path_hash(1)).await.expect("lookup"),
        None
    );
    assert!(!db
        .delete_object(bob.id, &path_hash(1))
        .await
        .expect("deleting"));
    assert!(db
        .delete_object(alice.id, &path_hash(1))
        .await
        .expect("deleting"));
    assert_eq!(
        db.find_object(alice.id, &path_hash(1))
            .await
            .expect("lookup"),
        None
    );
    assert!(!db
        .delete_object(alice.id, &path_hash(1))
        .await
        .expect("deleting again"));

    let error = db
        .upsert_object(CacheId(i64::MAX), &new_object(path_hash(2), nar), T0)
        .await
        .expect_err("an object in a missing cache");
    assert!(error.is_not_found(), "{error:?}");
}

async fn upserting_an_object_replaces_its_metadata(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "hello").await;
    let first_nar = valid_nar(db, 1, 100, &[1]).await;
    let second_nar = valid_nar(db, 2, 200, &[2]).await;
    let first = db
        .upsert_object(cache.id, &new_object(path_hash(1), first_nar), at(0))
        .await
        .expect("object");
    let mut replacement = new_object(path_hash(1), second_nar);
    replacement.metadata.sigs = vec!["other-1:c2ln".to_owned()];
    replacement.metadata.ca =
        Some("fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".to_owned());
    replacement.created_by.subject = Some("bob".to_owned());
    let second = db
        .upsert_object(cache.id, &replacement, at(60))
        .await
        .expect("re-push");
    assert_eq!(second.id, first.id, "one row per path and cache");
    assert_eq!(second.nar_id, second_nar);
    assert_eq!(second.metadata, replacement.metadata);
    assert_eq!(second.created_by.subject.as_deref(), Some("bob"));
    assert_eq!(second.created_at, at(0), "the creation time is kept");
    assert_eq!(second.last_accessed_at, at(60));
    assert_eq!(
        db.objects_of_cache(cache.id).await.expect("listing"),
        [second]
    );
}

async fn missing_paths_exclude_objects_and_uploads_in_flight(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "hello").await;
    let other = create_cache(db, "other").await;
    let nar = valid_nar(db, 1, 100, &[1]).await;

    // 1: an object here. 2: an upload in the pipeline. 3: a failed upload.
    // 4: nothing. 5: an upload that finished, but the path was deleted
    // since. 6: an object in another cache only. 7..9: uploads in each
    // in-flight phase.
    db.upsert_object(cache.id, &new_object(path_hash(1), nar), T0)
        .await
        .expect("object");
    db.create_upload(&new_upload(cache.id, path_hash(2), 2), T0)
        .await
        .expect("upload");
    let failed = db
        .create_upload(&new_upload(cache.id, path_hash(3), 3), T0)
        .await
        .expect("upload");
    db.fail_upload(&failed.id, "NarHash mismatch", T0)
        .await
        .expect("failing");
    let done = db
        .create_upload(&new_upload(cache.id, path_hash(5), 1), T0)
        .await
        .expect("upload");
    db.set_upload_nar(&done.id, nar, T0).await.expect("linking");
    db.finalise_upload(&done.id, T0).await.expect("finalising");
    assert!(db
        .delete_object(cache.id, &path_hash(5))
        .await
        .expect("deleting"));
    db.upsert_object(other.id, &new_object(path_hash(6), nar), T0)
        .await
        .expect("object");
    for (n, phase) in [
        (7, None),
        (8, Some(UploadPhase::Chunking)),
        (9, Some(UploadPhase::Compressing)),
    ] {
        let upload = db
            .create_upload(&new_upload(cache.id, path_hash(n), n), T0)
            .await
            .expect("upload");
        if let Some(phase) = phase {
            assert!(db
                .set_upload_phase(&upload.id, phase, T0)
                .await
                .expect("phase"));
        }
    }

    let asked: Vec<StorePathHash> = [4, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        .into_iter()
        .map(path_hash)
        .collect();
    let missing = db
        .missing_store_path_hashes(cache.id, &asked)
        .await
        .expect("missing paths");
    let expected: Vec<StorePathHash> = [4, 3, 5, 6].into_iter().map(path_hash).collect();
    assert_eq!(missing, expected, "in input order, without duplicates");

    assert!(db
        .missing_store_path_hashes(cache.id, &[])
        .await
        .expect("no paths")
        .is_empty());

    // More hashes than one IN list holds.
    let many: Vec<StorePathHash> = (0..1200_u32)
        .map(|i| {
            let mut bytes = [0u8; 20];
            bytes[..4].copy_from_slice(&i.to_be_bytes());
            bytes[19] = 0xee;
            StorePathHash::from_bytes(&bytes)
        })
        .collect();
    let mut asked = many.clone();
    asked.push(path_hash(1));
    let missing = db
        .missing_store_path_hashes(cache.id, &asked)
        .await
        .expect("many missing paths");
    assert_eq!(missing, many);
}

async fn concurrent_pending_inserts_of_one_nar_hash_yield_one_row(t: TestDb) {
    const TASKS: usize = 32;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(TASKS));
    let handles: Vec<_> = (0..TASKS)
        .map(|_| {
            let db = t.db.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                db.insert_nar_pending(&nar_hash(42), 123_456, T0).await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut created = 0;
    for handle in handles {
        let (nar, was_created) = handle
            .await
            .expect("task panicked")
            .expect("inserting a pending NAR");
        ids.insert(nar.id);
        created += usize::from(was_created);
        assert_eq!(nar.state, StoreState::Pending);
        assert_eq!(nar.nar_size, 123_456);
    }
    assert_eq!(ids.len(), 1, "every caller got the same row");
    assert_eq!(created, 1, "exactly one caller created it");
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nars")
        .fetch_one(t.db.pool())
        .await
        .expect("counting NARs");
    assert_eq!(rows, 1);

    let error =
        t.db.insert_nar_pending(&nar_hash(42), 999, T0)
            .await
            .expect_err("the same hash with another size");
    assert!(error.is_conflict(), "{error:?}");
}

async fn chunks_and_nars_round_trip_in_order(t: TestDb) {
    let db = &t.db;
    let (nar, _) = db
        .insert_nar_pending(&nar_hash(1), 90_000, T0)
        .await
        .expect("NAR");
    // Chunk 3 appears twice in this NAR: a list, not a set.
    let order = [5_u8, 3, 9, 3, 1];
    let new: Vec<NewChunk> = order
        .iter()
        .map(|&n| NewChunk {
            chunk_hash: chunk_hash(n),
            chunk_size: 1000 + u64::from(n),
        })
        .collect();
    let chunks = db.upsert_chunks(&new, T0).await.expect("chunks");
    assert_eq!(chunks.len(), order.len());
    assert_eq!(chunks[1].id, chunks[3].id, "one row per chunk hash");
    for (chunk, &n) in chunks.iter().zip(&order) {
        assert_eq!(chunk.chunk_hash, chunk_hash(n));
        assert_eq!(chunk.chunk_size, 1000 + u64::from(n));
        assert_eq!(chunk.state, StoreState::Pending);
        assert_eq!(chunk.location, None);
    }
    let ids: Vec<_> = chunks.iter().map(|chunk| chunk.id).collect();
    db.set_nar_chunks(nar.id, &ids).await.expect("chunk list");
    // A redelivered chunk job records the same list again.
    db.set_nar_chunks(nar.id, &ids)
        .await
        .expect("chunk list again");
    assert_eq!(
        db.nar_by_id(nar.id)
            .await
            .expect("NAR")
            .expect("NAR")
            .n_chunks,
        5
    );

    let listed = db.chunks_of_nar(nar.id).await.expect("listing");
    let seqs: Vec<u32> = listed.iter().map(|entry| entry.seq).collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4]);
    let hashes: Vec<Sha256Hash> = listed.iter().map(|entry| entry.chunk.chunk_hash).collect();
    let expected: Vec<Sha256Hash> = order.iter().map(|&n| chunk_hash(n)).collect();
    assert_eq!(hashes, expected);

    assert_eq!(
        db.pending_nars_of_chunk(chunks[0].id).await.expect("NARs"),
        [nar.id]
    );
    let ids: Vec<_> = chunks.iter().map(|chunk| chunk.id).collect();
    assert_eq!(
        db.pending_nars_of_chunks(&ids).await.expect("NARs"),
        [nar.id],
        "one entry per NAR however many of its chunks are named"
    );

    // Store all but the last: not complete yet.
    for (chunk, &n) in chunks.iter().zip(&order).take(4) {
        let stored = set_chunk_stored(db, chunk.id, &location(n))
            .await
            .expect("stored");
        assert_eq!(stored.state, StoreState::Valid);
        assert!(!db
            .mark_nar_valid_if_complete(nar.id)
            .await
            .expect("finalising"));
    }
    // Storing a valid chunk again keeps its first location.
    let again = set_chunk_stored(db, chunks[0].id, &location(200))
        .await
        .expect("stored again");
    assert_eq!(again.location, Some(location(5)));

    set_chunk_stored(db, chunks[4].id, &location(1))
        .await
        .expect("stored");
    assert!(db
        .mark_nar_valid_if_complete(nar.id)
        .await
        .expect("finalising"));
    assert!(db
        .mark_nar_valid_if_complete(nar.id)
        .await
        .expect("finalising again"));
    assert!(db
        .pending_nars_of_chunk(chunks[0].id)
        .await
        .expect("NARs")
        .is_empty());

    let listed = db.chunks_of_nar(nar.id).await.expect("listing");
    for (entry, &n) in listed.iter().zip(&order) {
        assert_eq!(entry.chunk.state, StoreState::Valid);
        assert_eq!(entry.chunk.location, Some(location(n)));
    }
    let nar = db
        .nar_by_hash(&nar_hash(1))
        .await
        .expect("NAR")
        .expect("NAR");
    assert_eq!(nar.state, StoreState::Valid);

    // A valid NAR's chunk list is frozen.
    let error = db
        .set_nar_chunks(nar.id, &ids[..1])
        .await
        .expect_err("changing a valid NAR's chunks");
    assert!(error.is_conflict(), "{error:?}");
    let error = db
        .set_nar_chunks(NarId(i64::MAX), &ids)
        .await
        .expect_err("a missing NAR");
    assert!(error.is_not_found(), "{error:?}");
    let error = set_chunk_stored(db, larder_db::ChunkId(i64::MAX), &location(1))
        .await
        .expect_err("a missing chunk");
    assert!(error.is_not_found(), "{error:?}");
}

async fn chunk_rows_are_shared_between_nars(t: TestDb) {
    let db = &t.db;
    let first = valid_nar(db, 1, 50_000, &[1, 2, 3]).await;
    let shared = db
        .chunk_by_hash(&chunk_hash(2))
        .await
        .expect("chunk")
        .expect("chunk");
    let (second, _) = db
        .insert_nar_pending(&nar_hash(2), 20_000, T0)
        .await
        .expect("NAR");
    let chunks = db
        .upsert_chunks(
            &[
                NewChunk {
                    chunk_hash: chunk_hash(2),
                    chunk_size: 1002,
                },
                NewChunk {
                    chunk_hash: chunk_hash(4),
                    chunk_size: 1004,
                },
            ],
            T0,
        )
        .await
        .expect("chunks");
    assert_eq!(chunks[0], shared, "an existing chunk comes back as it is");
    assert_eq!(chunks[1].state, StoreState::Pending);
    db.set_nar_chunks(second.id, &[chunks[0].id, chunks[1].id])
        .await
        .expect("chunk list");
    set_chunk_stored(db, chunks[1].id, &location(4))
        .await
        .expect("stored");
    assert!(db
        .mark_nar_valid_if_complete(second.id)
        .await
        .expect("finalising"));
    assert_eq!(db.chunks_of_nar(first).await.expect("listing").len(), 3);

    let error = db
        .upsert_chunks(
            &[NewChunk {
                chunk_hash: chunk_hash(2),
                chunk_size: 7,
            }],
            T0,
        )
        .await
        .expect_err("a known chunk hash with another size");
    assert!(error.is_conflict(), "{error:?}");

    // A chunk GC has claimed comes back as a fresh pending row: a new id
    // (hence a new object key), no location.
    let claimed = valid_nar(db, 3, 1009, &[9]).await;
    let claimed_chunks = db.chunks_of_nar(claimed).await.expect("listing");
    assert_eq!(claimed_chunks.len(), 1);
    let claimed_id = claimed_chunks[0].chunk.id;
    sqlx::query("DELETE FROM nars WHERE id = $1")
        .bind(claimed.0)
        .execute(db.pool())
        .await
        .expect("dropping the NAR as GC would");
    sqlx::query("UPDATE chunks SET state = 'deleting' WHERE chunk_hash = $1")
        .bind(chunk_hash(9).to_hex())
        .execute(db.pool())
        .await
        .expect("claiming the chunk as GC would");
    let revived = db
        .upsert_chunks(
            &[NewChunk {
                chunk_hash: chunk_hash(9),
                chunk_size: 1009,
            }],
            T0,
        )
        .await
        .expect("reviving");
    assert_eq!(revived[0].state, StoreState::Pending);
    assert_eq!(revived[0].location, None);
    assert_ne!(revived[0].id, claimed_id, "a revived chunk is a new row");
    assert_eq!(
        db.chunks_by_id(&[claimed_id]).await.expect("lookup"),
        Vec::new(),
        "the claimed row is gone"
    );
    assert_eq!(
        db.chunk_by_hash(&chunk_hash(9)).await.expect("lookup"),
        Some(revived[0].clone())
    );
    // GC's late attempt to record the old row stored fails; the new one
    // is stored normally.
    assert!(set_chunk_stored(db, claimed_id, &location(9))
        .await
        .expect_err("the claimed row is gone")
        .is_not_found());
    set_chunk_stored(db, revived[0].id, &location(10))
        .await
        .expect("storing the revived chunk");
}

/// A compress job's chunks are marked stored in one transaction: rows come
/// back in the caller's order whatever order they are locked in, a valid
/// one keeps its first location, and a batch naming a chunk that is gone
/// marks none of the others (a retry of the job redoes them all).
async fn a_batch_of_chunks_is_marked_stored_together_or_not_at_all(t: TestDb) {
    let db = &t.db;
    let new: Vec<NewChunk> = [7_u8, 2, 4, 6]
        .iter()
        .map(|&n| NewChunk {
            chunk_hash: chunk_hash(n),
            chunk_size: 1000 + u64::from(n),
        })
        .collect();
    let chunks = db.upsert_chunks(&new, T0).await.expect("chunks");
    set_chunk_stored(db, chunks[1].id, &location(2))
        .await
        .expect("storing one alone");

    // Ids in descending order, so the id-ordered locking reorders them.
    let pack = NewPack {
        object_key: "packs/ab/batch.pack".to_owned(),
        size: 300,
    };
    let at = |offset| ChunkLocation {
        object_key: pack.object_key.clone(),
        offset,
        length: 100,
    };
    let batch = vec![
        (chunks[2].id, at(0)),
        (chunks[1].id, at(100)),
        (chunks[0].id, at(200)),
    ];
    let stored = db
        .set_chunks_stored(&pack, &batch, T0)
        .await
        .expect("storing a batch");
    let found: Vec<_> = stored
        .iter()
        .map(|chunk| (chunk.id, chunk.state, chunk.location.clone()))
        .collect();
    assert_eq!(
        found,
        [
            (chunks[2].id, StoreState::Valid, Some(at(0))),
            (chunks[1].id, StoreState::Valid, Some(location(2))),
            (chunks[0].id, StoreState::Valid, Some(at(200))),
        ]
    );

    let lost = NewPack {
        object_key: "packs/cd/lost.pack".to_owned(),
        size: 100,
    };
    let error = db
        .set_chunks_stored(
            &lost,
            &[
                (
                    chunks[3].id,
                    ChunkLocation {
                        object_key: lost.object_key.clone(),
                        offset: 0,
                        length: 100,
                    },
                ),
                (
                    larder_db::ChunkId(i64::MAX),
                    ChunkLocation {
                        object_key: lost.object_key.clone(),
                        offset: 0,
                        length: 100,
                    },
                ),
            ],
            T0,
        )
        .await
        .expect_err("a batch naming a missing chunk");
    assert!(error.is_not_found(), "{error:?}");
    let rows = db.chunks_by_id(&[chunks[3].id]).await.expect("lookup");
    assert_eq!(
        rows[0].state,
        StoreState::Pending,
        "nothing of the batch was kept"
    );
    let packs: Vec<String> = db
        .packs()
        .await
        .expect("packs")
        .into_iter()
        .map(|pack| pack.object_key)
        .collect();
    assert!(packs.contains(&pack.object_key), "{packs:?}");
    assert!(
        !packs.contains(&lost.object_key),
        "the failed batch's pack is not recorded: {packs:?}"
    );
    assert_eq!(
        db.set_chunks_stored(&pack, &[], T0)
            .await
            .expect("an empty batch"),
        []
    );
}

async fn a_complete_nar_is_written_in_one_call(t: TestDb) {
    let db = &t.db;
    let chunks = [stored_chunk(1), stored_chunk(2), stored_chunk(1)];
    let nar = db
        .store_complete_nar(&nar_hash(1), 50_003, &chunks, T0)
        .await
        .expect("storing");
    assert_eq!(nar.state, StoreState::Valid);
    assert_eq!(nar.n_chunks, 3);
    assert_eq!(nar.nar_size, 50_003);
    let listed = db.chunks_of_nar(nar.id).await.expect("listing");
    let got: Vec<(Sha256Hash, Option<ChunkLocation>)> = listed
        .into_iter()
        .map(|entry| (entry.chunk.chunk_hash, entry.chunk.location))
        .collect();
    let expected: Vec<(Sha256Hash, Option<ChunkLocation>)> = chunks
        .iter()
        .map(|chunk| (chunk.chunk_hash, Some(chunk.location.clone())))
        .collect();
    assert_eq!(got, expected);

    // Idempotent: the same NAR again is the same row.
    let again = db
        .store_complete_nar(&nar_hash(1), 50_003, &chunks, T0)
        .await
        .expect("storing again");
    assert_eq!(again, nar);

    let error = db
        .store_complete_nar(&nar_hash(2), 1, &[], T0)
        .await
        .expect_err("a NAR without chunks");
    assert!(
        matches!(error, larder_db::DbError::InvalidInput { .. }),
        "{error:?}"
    );
    assert_eq!(db.nar_by_hash(&nar_hash(2)).await.expect("lookup"), None);
}

async fn concurrent_writers_of_nars_sharing_chunks_all_succeed(t: TestDb) {
    // Sixteen writers: the same two NARs over and over, whose chunk lists
    // share chunks in opposite orders. Every write must succeed (no
    // deadlock, no "database is locked") and leave one row per hash.
    let forward: Vec<StoredChunk> = (1..=20).map(stored_chunk).collect();
    let backward: Vec<StoredChunk> = forward.iter().rev().cloned().collect();
    let handles: Vec<_> = (0..16_u8)
        .map(|i| {
            let db = t.db.clone();
            let (n, chunks) = if i % 2 == 0 {
                (1, forward.clone())
            } else {
                (2, backward.clone())
            };
            tokio::spawn(async move {
                db.store_complete_nar(&nar_hash(n), 500_000, &chunks, T0)
                    .await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for handle in handles {
        let nar = handle.await.expect("task panicked").expect("storing a NAR");
        assert_eq!(nar.state, StoreState::Valid);
        ids.insert(nar.id);
    }
    assert_eq!(ids.len(), 2);
    let chunk_rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chunks")
        .fetch_one(t.db.pool())
        .await
        .expect("counting chunks");
    assert_eq!(chunk_rows, 20);
}

/// A pending NAR listing `count` distinct 64 KiB chunks, with the chunks
/// as asked for and as stored.
async fn nar_of_distinct_chunks(db: &Database, count: u32) -> (Nar, Vec<NewChunk>, Vec<Chunk>) {
    let (nar, _) = db
        .insert_nar_pending(&nar_hash(1), 1 << 30, T0)
        .await
        .expect("NAR");
    let new: Vec<NewChunk> = (0..count)
        .map(|i| NewChunk {
            chunk_hash: Sha256Hash::digest(&i.to_be_bytes()),
            chunk_size: 65_536,
        })
        .collect();
    let chunks = db.upsert_chunks(&new, T0).await.expect("chunks");
    let ids: Vec<_> = chunks.iter().map(|chunk| chunk.id).collect();
    db.set_nar_chunks(nar.id, &ids).await.expect("chunk list");
    (nar, new, chunks)
}

async fn long_chunk_lists_round_trip(t: TestDb) {
    // Longer than one batch of the store layer's multi-row statements.
    let db = &t.db;
    let (nar, new, chunks) = nar_of_distinct_chunks(db, 1500).await;
    let ids: Vec<_> = chunks.iter().map(|chunk| chunk.id).collect();
    let listed = db.chunks_of_nar(nar.id).await.expect("listing");
    assert_eq!(listed.len(), 1500);
    for (i, (entry, new)) in listed.iter().zip(&new).enumerate() {
        assert_eq!(entry.seq as usize, i);
        assert_eq!(entry.chunk.chunk_hash, new.chunk_hash);
    }
    assert_eq!(db.chunks_by_id(&ids).await.expect("by id").len(), 1500);
    // Upserting them again finds the same rows.
    let again = db.upsert_chunks(&new, T0).await.expect("chunks again");
    assert_eq!(again, chunks);
}

async fn chunk_lists_are_read_in_pages(t: TestDb) {
    let db = &t.db;
    let (nar, _, chunks) = nar_of_distinct_chunks(db, 700).await;
    let page = db
        .chunks_of_nar_from(nar.id, 100, 256)
        .await
        .expect("a page");
    let seqs: Vec<u32> = page.iter().map(|entry| entry.seq).collect();
    assert_eq!(seqs, (100..356).collect::<Vec<u32>>());
    assert_eq!(page[0].chunk.id, chunks[100].id);
    let last = db
        .chunks_of_nar_from(nar.id, 650, 256)
        .await
        .expect("the last page");
    assert_eq!(last.len(), 50);
    assert!(db
        .chunks_of_nar_from(nar.id, 700, 256)
        .await
        .expect("past the end")
        .is_empty());
}

/// Every entry of a recorded list names the next entry with the same
/// chunk (what a download keeps a frame in memory for), across the store
/// layer's insert batches.
async fn each_entry_names_the_next_use_of_its_chunk(t: TestDb) {
    let db = &t.db;
    let (nar, _) = db
        .insert_nar_pending(&nar_hash(1), 1 << 30, T0)
        .await
        .expect("NAR");
    let new: Vec<NewChunk> = (0..3_u32)
        .map(|i| NewChunk {
            chunk_hash: Sha256Hash::digest(&i.to_be_bytes()),
            chunk_size: 65_536,
        })
        .collect();
    let chunks = db.upsert_chunks(&new, T0).await.expect("chunks");
    // Chunk 0 at 0, 1 and 1500; chunk 1 at 2 and 1498; chunk 2 elsewhere.
    let mut order = vec![0, 0, 1];
    order.extend(std::iter::repeat_n(2, 1495));
    order.extend([1, 2, 0]);
    let ids: Vec<_> = order.iter().map(|&i| chunks[i].id).collect();
    db.set_nar_chunks(nar.id, &ids).await.expect("chunk list");
    let listed = db.chunks_of_nar(nar.id).await.expect("listing");
    let next_uses: Vec<Option<u32>> = listed.iter().map(|entry| entry.next_use).collect();
    assert_eq!(next_uses[..4], [Some(1), Some(1500), Some(1498), Some(4)]);
    assert_eq!(next_uses[1496], Some(1497));
    assert_eq!(next_uses[1497], Some(1499));
    assert_eq!(next_uses[1498..], [None, None, None]);
}

/// A chunk list can have at most one entry per minimum chunk size of its
/// NAR (plus a short tail), however it is recorded: a NAR of one chunk
/// repeated cannot make serving walk more entries than its bytes allow.
async fn a_chunk_list_is_bounded_by_its_nar_size(t: TestDb) {
    let db = &t.db;
    let nar_size = 2 * u64::from(MIN_CHUNK_SIZE) + 1;
    let most = max_chunk_entries(nar_size) as usize;
    assert_eq!(most, 3);
    let (nar, _) = db
        .insert_nar_pending(&nar_hash(1), nar_size, T0)
        .await
        .expect("NAR");
    let chunk = db
        .upsert_chunks(
            &[NewChunk {
                chunk_hash: chunk_hash(1),
                chunk_size: u64::from(MIN_CHUNK_SIZE),
            }],
            T0,
        )
        .await
        .expect("chunk")[0]
        .id;
    let error = db
        .set_nar_chunks(nar.id, &vec![chunk; most + 1])
        .await
        .expect_err("one entry too many");
    assert!(matches!(error, DbError::InvalidInput { .. }), "{error:?}");
    assert_eq!(db.chunks_of_nar(nar.id).await.expect("listing").len(), 0);
    db.set_nar_chunks(nar.id, &vec![chunk; most])
        .await
        .expect("as many entries as the size allows");
    assert_eq!(db.chunks_of_nar(nar.id).await.expect("listing").len(), most);

    // The same bound when a whole NAR is written at once.
    let error = db
        .store_complete_nar(&nar_hash(2), 1000, &[stored_chunk(5), stored_chunk(5)], T0)
        .await
        .expect_err("two entries for a NAR of 1000 bytes");
    assert!(matches!(error, DbError::InvalidInput { .. }), "{error:?}");
    assert_eq!(db.nar_by_hash(&nar_hash(2)).await.expect("lookup"), None);
}

fn listing(names: &[&str]) -> NarListing {
    NarListing {
        root: ListingNode::Directory {
            entries: names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    (
                        name.as_bytes().to_vec(),
                        ListingNode::Regular {
                            size: i as u64,
                            executable: false,
                            nar_offset: 8 * i as u64,
                        },
                    )
                })
                .collect(),
        },
    }
}

async fn listings_are_stored_once_and_go_with_their_nar(t: TestDb) {
    let db = &t.db;
    let nar = valid_nar(db, 1, 50_000, &[1]).await;
    assert_eq!(db.nar_listing(nar).await.expect("lookup"), None);
    let first = EncodedListing::encode(&listing(&["a", "b"])).expect("encoding");
    db.set_nar_listing(nar, &first).await.expect("storing");
    let stored = db
        .nar_listing(nar)
        .await
        .expect("lookup")
        .expect("a listing");
    assert_eq!(
        stored.decode().expect("decoding"),
        listing(&["a", "b"]).to_json()
    );
    // A job done again stores its listing again.
    let second = EncodedListing::encode(&listing(&["c"])).expect("encoding");
    db.set_nar_listing(nar, &second).await.expect("replacing");
    assert_eq!(db.nar_listing(nar).await.expect("lookup"), Some(second));

    let error = db
        .set_nar_listing(NarId(i64::MAX), &first)
        .await
        .expect_err("no such NAR");
    assert!(error.is_not_found(), "{error:?}");

    // GC deletes the NAR, and its listing goes with it.
    assert_eq!(
        db.delete_unreferenced_nars(&[nar]).await.expect("deleting"),
        vec![nar]
    );
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nar_listings")
        .fetch_one(t.db.pool())
        .await
        .expect("counting listings");
    assert_eq!(left, 0);
}

fn staged_file(cache_id: CacheId, key: &str, at: Timestamp) -> StagedFile {
    StagedFile {
        cache_id,
        file_name: "x.nar.zst".to_owned(),
        staged_key: key.to_owned(),
        staged_crc32: Some(0xfedc_ba98),
        nar_hash: nar_hash(1),
        nar_size: 4096,
        created_at: at,
    }
}

/// The same NAR file PUT twice is kept once (the first copy), and a
/// narinfo claims it once, in the transaction that records its upload;
/// a claim that loses leaves nothing behind.
async fn a_staged_file_is_kept_once_and_claimed_once(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "hello").await;
    let first = staged_file(cache.id, "staging/first.nar", at(0));
    assert_eq!(
        db.put_staged_file(&first).await.expect("staging"),
        "staging/first.nar"
    );
    let second = staged_file(cache.id, "staging/second.nar", at(5));
    assert_eq!(
        db.put_staged_file(&second).await.expect("staging again"),
        "staging/first.nar",
        "the first copy is kept"
    );
    let kept = db
        .staged_file(cache.id, "x.nar.zst")
        .await
        .expect("lookup")
        .expect("the staged file");
    assert_eq!(kept.staged_key, "staging/first.nar");
    assert_eq!(kept.staged_crc32, Some(0xfedc_ba98));
    assert_eq!(kept.created_at, at(5), "its wait starts again");

    // A claim naming another copy than the one recorded claims nothing.
    let mut new = new_upload(cache.id, path_hash(1), 1);
    new.staged_key = "staging/second.nar".to_owned();
    assert_eq!(
        db.claim_staged_file(&new, "x.nar.zst", at(6))
            .await
            .expect("claiming"),
        None
    );
    // Concurrent claims of the recorded copy: exactly one wins.
    new.staged_key = "staging/first.nar".to_owned();
    let claims: Vec<_> = (0..8)
        .map(|_| {
            let (db, new) = (db.clone(), new.clone());
            tokio::spawn(async move { db.claim_staged_file(&new, "x.nar.zst", at(7)).await })
        })
        .collect();
    let mut won = Vec::new();
    for claim in claims {
        if let Some(upload) = claim.await.expect("join").expect("claiming") {
            won.push(upload);
        }
    }
    assert_eq!(won.len(), 1, "{won:?}");
    assert_eq!(won[0].staged_key, "staging/first.nar");
    assert_eq!(won[0].phase, UploadPhase::Spooled);
    let uploads: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM uploads")
        .fetch_one(t.db.pool())
        .await
        .expect("counting uploads");
    assert_eq!(uploads, 1, "the losing claims recorded no upload");
    assert_eq!(
        db.staged_file(cache.id, "x.nar.zst").await.expect("lookup"),
        None
    );
    // Claimed: the reaper finds nothing to take.
    assert_eq!(
        db.take_expired_staged_file(cache.id, "x.nar.zst", at(100))
            .await
            .expect("reaping"),
        None
    );
}

async fn an_upload_in_flight_is_found_by_path_and_nar(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "hello").await;
    let other = create_cache(db, "other").await;
    let upload = db
        .create_upload(&new_upload(cache.id, path_hash(1), 1), at(0))
        .await
        .expect("upload");
    let found = |cache: CacheId, path: u8, nar: u8| {
        let db = db.clone();
        async move {
            db.in_flight_upload_of_path(cache, &path_hash(path), &nar_hash(nar))
                .await
                .expect("lookup")
                .map(|upload| upload.id)
        }
    };
    assert_eq!(found(cache.id, 1, 1).await, Some(upload.id.clone()));
    assert_eq!(found(cache.id, 1, 2).await, None, "another NAR");
    assert_eq!(found(cache.id, 2, 1).await, None, "another path");
    assert_eq!(found(other.id, 1, 1).await, None, "another cache");
    db.fail_upload(&upload.id, "test", at(1))
        .await
        .expect("failing");
    assert_eq!(found(cache.id, 1, 1).await, None, "no longer in flight");
}

async fn uploads_move_forward_through_their_phases(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "hello").await;
    let new = new_upload(cache.id, path_hash(1), 1);
    let upload = db.create_upload(&new, at(0)).await.expect("creating");
    assert_eq!(upload.phase, UploadPhase::Spooled);
    assert_eq!(upload.cache_id, cache.id);
    assert_eq!(upload.store_path_hash, path_hash(1));
    assert_eq!(upload.nar_hash, nar_hash(1));
    assert_eq!(upload.nar_size, 4096);
    assert_eq!(upload.metadata, new.metadata);
    assert_eq!(upload.staged_key, new.staged_key);
    assert_eq!(upload.staged_crc32, new.staged_crc32);
    assert_eq!(upload.nar_id, None);
    assert_eq!(upload.error, None);
    assert_eq!(upload.attempts, 0);
    assert_eq!(upload.trace_id.as_deref(), Some("trace-1"));
    assert_eq!(upload.created_by.subject.as_deref(), Some("alice"));
    assert_eq!((upload.created_at, upload.updated_at), (at(0), at(0)));
    assert_eq!(
        db.upload(&upload.id).await.expect("reading").as_ref(),
        Some(&upload)
    );
    assert_eq!(
        db.upload_with_cache_name(&upload.id)
            .await
            .expect("reading with the cache's name"),
        Some((upload.clone(), cache_name("hello")))
    );
    assert_eq!(
        db.upload_with_cache_name(&UploadId::random())
            .await
            .expect("reading a missing upload"),
        None
    );

    assert!(db
        .set_upload_phase(&upload.id, UploadPhase::Chunking, at(1))
        .await
        .expect("phase"));
    // Redelivered: no change, not an error.
    assert!(!db
        .set_upload_phase(&upload.id, UploadPhase::Chunking, at(2))
        .await
        .expect("phase"));
    assert!(db
        .set_upload_phase(&upload.id, UploadPhase::Compressing, at(3))
        .await
        .expect("phase"));
    // Never backwards.
    assert!(!db
        .set_upload_phase(&upload.id, UploadPhase::Chunking, at(4))
        .await
        .expect("phase"));
    assert!(!db
        .set_upload_phase(&upload.id, UploadPhase::Spooled, at(4))
        .await
        .expect("phase"));
    let read = db
        .upload(&upload.id)
        .await
        .expect("reading")
        .expect("upload");
    assert_eq!(
        (read.phase, read.updated_at),
        (UploadPhase::Compressing, at(3))
    );

    let (nar, _) = db
        .insert_nar_pending(&nar_hash(1), 4096, T0)
        .await
        .expect("NAR");
    db.set_upload_nar(&upload.id, nar.id, at(5))
        .await
        .expect("linking");
    assert_eq!(
        db.record_upload_attempt(&upload.id, at(6))
            .await
            .expect("attempt"),
        1
    );
    assert_eq!(
        db.record_upload_attempt(&upload.id, at(7))
            .await
            .expect("attempt"),
        2
    );

    assert!(db
        .fail_upload(
            &upload.id,
            "chunk job dead-lettered: storage unavailable",
            at(8)
        )
        .await
        .expect("failing"));
    assert!(!db
        .fail_upload(&upload.id, "again", at(9))
        .await
        .expect("failing again"));
    assert!(!db
        .set_upload_phase(&upload.id, UploadPhase::Done, at(9))
        .await
        .expect("phase"));
    let read = db
        .upload(&upload.id)
        .await
        .expect("reading")
        .expect("upload");
    assert_eq!(read.phase, UploadPhase::Failed);
    assert_eq!(
        read.error.as_deref(),
        Some("chunk job dead-lettered: storage unavailable")
    );
    assert_eq!(read.nar_id, Some(nar.id));
    assert_eq!(read.attempts, 2);
    assert_eq!(read.updated_at, at(8));

    // Unknown ids and caches.
    let unknown = UploadId::random();
    assert_eq!(db.upload(&unknown).await.expect("reading"), None);
    for error in [
        db.set_upload_phase(&unknown, UploadPhase::Chunking, T0)
            .await
            .expect_err("phase"),
        db.set_upload_phase(&unknown, UploadPhase::Spooled, T0)
            .await
            .expect_err("phase"),
        db.fail_upload(&unknown, "x", T0)
            .await
            .expect_err("failing"),
        db.set_upload_nar(&unknown, nar.id, T0)
            .await
            .expect_err("linking"),
        db.record_upload_attempt(&unknown, T0)
            .await
            .map(|_| ())
            .expect_err("attempt"),
    ] {
        assert!(error.is_not_found(), "{error:?}");
    }
    let error = db
        .create_upload(&new_upload(CacheId(i64::MAX), path_hash(2), 2), T0)
        .await
        .expect_err("an upload to a missing cache");
    assert!(error.is_not_found(), "{error:?}");

    assert!(db.delete_upload(&upload.id).await.expect("deleting"));
    assert!(!db.delete_upload(&upload.id).await.expect("deleting again"));
}

async fn stuck_uploads_are_listed_by_phase_and_age(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "hello").await;
    let mut ids = Vec::new();
    // Upload n was last updated at n minutes; 0 and 1 stay spooled, 2 and
    // 3 move on to chunking, 4 fails.
    for n in 0..5_u8 {
        let upload = db
            .create_upload(
                &new_upload(cache.id, path_hash(n), n),
                at(60 * i64::from(n)),
            )
            .await
            .expect("upload");
        match n {
            2 | 3 => {
                db.set_upload_phase(&upload.id, UploadPhase::Chunking, at(60 * i64::from(n)))
                    .await
                    .expect("phase");
            }
            4 => {
                db.fail_upload(&upload.id, "broken", at(60 * i64::from(n)))
                    .await
                    .expect("failing");
            }
            _ => {}
        }
        ids.push(upload.id);
    }
    let listed = |phases: &'static [UploadPhase], before: Timestamp, limit: u32| async move {
        db.stuck_uploads(phases, before, limit)
            .await
            .expect("listing stuck uploads")
            .into_iter()
            .map(|upload| upload.id)
            .collect::<Vec<_>>()
    };
    const IN_FLIGHT: &[UploadPhase] = &[
        UploadPhase::Spooled,
        UploadPhase::Chunking,
        UploadPhase::Compressing,
    ];
    assert_eq!(listed(IN_FLIGHT, at(1000), 100).await, ids[..4]);
    // Strictly older than the cutoff, oldest first.
    assert_eq!(listed(IN_FLIGHT, at(120), 100).await, ids[..2]);
    assert_eq!(listed(IN_FLIGHT, at(1000), 3).await, ids[..3]);
    assert_eq!(
        listed(&[UploadPhase::Chunking], at(1000), 100).await,
        ids[2..4]
    );
    assert_eq!(
        listed(&[UploadPhase::Failed], at(1000), 100).await,
        ids[4..]
    );
    assert_eq!(
        listed(&[UploadPhase::Failed], at(240), 100).await,
        Vec::<UploadId>::new()
    );
    assert!(listed(&[], at(1000), 100).await.is_empty());
    // A republished job resets the clock.
    db.record_upload_attempt(&ids[0], at(500))
        .await
        .expect("attempt");
    assert_eq!(listed(IN_FLIGHT, at(400), 100).await, ids[1..4]);
}

async fn finalising_an_upload_makes_its_object_visible(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "hello").await;
    let upload = db
        .create_upload(&new_upload(cache.id, path_hash(1), 1), at(0))
        .await
        .expect("upload");
    let error = db
        .finalise_upload(&upload.id, at(1))
        .await
        .expect_err("an upload without a NAR");
    assert!(error.is_conflict(), "{error:?}");

    let (nar, _) = db
        .insert_nar_pending(&nar_hash(1), 4096, T0)
        .await
        .expect("NAR");
    db.set_upload_nar(&upload.id, nar.id, at(1))
        .await
        .expect("linking");
    assert_eq!(
        db.uploads_waiting_on_nar(nar.id)
            .await
            .expect("waiting")
            .len(),
        1
    );
    let error = db
        .finalise_upload(&upload.id, at(2))
        .await
        .expect_err("a pending NAR");
    assert!(error.is_conflict(), "{error:?}");
    assert_eq!(
        db.find_object(cache.id, &path_hash(1))
            .await
            .expect("lookup"),
        None
    );

    let chunks = db
        .upsert_chunks(
            &[NewChunk {
                chunk_hash: chunk_hash(1),
                chunk_size: 4096,
            }],
            T0,
        )
        .await
        .expect("chunks");
    db.set_nar_chunks(nar.id, &[chunks[0].id])
        .await
        .expect("chunk list");
    set_chunk_stored(db, chunks[0].id, &location(1))
        .await
        .expect("stored");
    assert!(db
        .mark_nar_valid_if_complete(nar.id)
        .await
        .expect("finalising NAR"));

    let object = db
        .finalise_upload(&upload.id, at(3))
        .await
        .expect("finalising");
    assert_eq!(object.store_path_hash, path_hash(1));
    assert_eq!(object.nar_id, nar.id);
    assert_eq!(object.metadata, metadata(&path_hash(1)));
    assert_eq!(object.created_by.subject.as_deref(), Some("alice"));
    let found = db
        .find_object(cache.id, &path_hash(1))
        .await
        .expect("lookup")
        .expect("visible");
    assert_eq!(found.object, object);
    let read = db
        .upload(&upload.id)
        .await
        .expect("reading")
        .expect("upload");
    assert_eq!((read.phase, read.updated_at), (UploadPhase::Done, at(3)));
    assert!(db
        .uploads_waiting_on_nar(nar.id)
        .await
        .expect("waiting")
        .is_empty());

    // Redelivered: the same object, still done.
    let again = db
        .finalise_upload(&upload.id, at(4))
        .await
        .expect("finalising again");
    assert_eq!(again.id, object.id);
    let error = db
        .finalise_upload(&UploadId::random(), at(4))
        .await
        .expect_err("an unknown upload");
    assert!(error.is_not_found(), "{error:?}");
}

async fn tokens_are_recorded_listed_and_revoked(t: TestDb) {
    let db = &t.db;
    let token = |jti: &str, sub: &str, issued: i64| TokenRecord {
        jti: jti.to_owned(),
        sub: sub.to_owned(),
        claims: serde_json::json!({
            "sub": sub,
            "jti": jti,
            "https://larder.dev/v1": {"caches": {"alice-*": {"pull": true, "push": true}}},
        }),
        issued_at: at(issued),
        expires_at: at(issued + 90 * 86400),
        revoked_at: None,
    };
    let alice = token("jti-alice", "alice", 10);
    let bob = token("jti-bob", "bob", 5);
    db.record_token(&alice).await.expect("recording");
    db.record_token(&bob).await.expect("recording");
    let error = db.record_token(&alice).await.expect_err("a duplicate jti");
    assert!(error.is_conflict(), "{error:?}");

    assert_eq!(
        db.list_tokens(None).await.expect("listing"),
        [bob.clone(), alice.clone()]
    );
    assert_eq!(
        db.token("jti-alice").await.expect("reading"),
        Some(alice.clone())
    );
    assert!(db.revoked_jtis().await.expect("revoked").is_empty());

    let revoked = db
        .revoke_token("jti-alice", at(100))
        .await
        .expect("revoking");
    assert_eq!(revoked.revoked_at, Some(at(100)));
    assert_eq!(revoked.claims, alice.claims);
    // Revoking again keeps the first time.
    let again = db
        .revoke_token("jti-alice", at(200))
        .await
        .expect("revoking again");
    assert_eq!(again.revoked_at, Some(at(100)));
    assert_eq!(db.revoked_jtis().await.expect("revoked"), ["jti-alice"]);

    let error = db
        .revoke_token("jti-nobody", at(100))
        .await
        .expect_err("an unknown jti");
    assert!(error.is_not_found(), "{error:?}");
    assert_eq!(db.token("jti-nobody").await.expect("reading"), None);
}

async fn access_times_only_move_forward(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "hello").await;
    let nar = valid_nar(db, 1, 100, &[1]).await;
    let mut hashes = Vec::new();
    for n in 0..3 {
        db.upsert_object(
            cache.id,
            &new_object(path_hash(n), nar),
            at(i64::from(n) * 100),
        )
        .await
        .expect("object");
        hashes.push(path_hash(n));
    }
    let accesses = |hashes: Vec<StorePathHash>| BTreeMap::from([(cache.id, hashes)]);
    // Objects at 0, 100 and 200 seconds; touched at 150: only the first two move.
    assert_eq!(
        db.touch_objects_by_path(&accesses(hashes.clone()), at(150))
            .await
            .expect("touching"),
        2
    );
    let times: Vec<Timestamp> = db
        .objects_of_cache(cache.id)
        .await
        .expect("listing")
        .iter()
        .map(|object| object.last_accessed_at)
        .collect();
    assert_eq!(times, [at(150), at(150), at(200)]);
    assert_eq!(
        db.touch_objects_by_path(&accesses(Vec::new()), at(500))
            .await
            .expect("touching nothing"),
        0
    );

    // More hashes than one IN list holds, most of them unknown: no error.
    let mut many: Vec<StorePathHash> = (0..1200_u32)
        .map(|n| {
            let mut bytes = [0xee; 20];
            bytes[..4].copy_from_slice(&n.to_be_bytes());
            StorePathHash::from_bytes(&bytes)
        })
        .collect();
    many.push(hashes[2]);
    assert_eq!(
        db.touch_objects_by_path(&accesses(many), at(300))
            .await
            .expect("touching"),
        1
    );
}

async fn per_cache_stats_count_logical_and_stored_bytes(t: TestDb) {
    let db = &t.db;
    let alice = create_cache(db, "alice").await;
    let bob = create_cache(db, "bob").await;
    let empty = create_cache(db, "empty").await;
    // Chunk n has compressed length 100 + n. NAR 1 = chunks 1, 2, 1;
    // NAR 2 = chunks 2, 3.
    let nar1 = valid_nar(db, 1, 40_000, &[1, 2, 1]).await;
    let nar2 = valid_nar(db, 2, 20_000, &[2, 3]).await;
    // alice has both NARs, one of them under two paths; bob has NAR 2.
    for (cache, n, nar) in [
        (&alice, 1, nar1),
        (&alice, 2, nar2),
        (&alice, 3, nar2),
        (&bob, 1, nar2),
    ] {
        db.upsert_object(cache.id, &new_object(path_hash(n), nar), T0)
            .await
            .expect("object");
    }
    assert_eq!(
        db.per_cache_stats(alice.id).await.expect("stats"),
        CacheStats {
            object_count: 3,
            logical_bytes: 80_000,
            stored_bytes: 101 + 102 + 103,
            last_push: Some(T0),
            last_access: Some(T0),
        }
    );
    let bob_stats = db.per_cache_stats(bob.id).await.expect("stats");
    assert_eq!(
        bob_stats,
        CacheStats {
            object_count: 1,
            logical_bytes: 20_000,
            stored_bytes: 102 + 103,
            last_push: Some(T0),
            last_access: Some(T0),
        }
    );
    assert_eq!(bob_stats.dedup_ratio(), Some(20_000.0 / 205.0));
    let empty_stats = db.per_cache_stats(empty.id).await.expect("stats");
    assert_eq!(empty_stats, CacheStats::default());
    assert_eq!(empty_stats.dedup_ratio(), None);

    // The server's view: chunks 2 and 3 are shared, so each cache is
    // attributed half of them.
    let server = db.server_stats().await.expect("server stats");
    assert_eq!(server.stored_bytes, 101 + 102 + 103);
    assert_eq!(server.referenced_bytes, 101 + 102 + 103);
    let shares = server
        .caches
        .iter()
        .map(|cache| {
            (
                cache.name.as_str(),
                cache.stats.stored_bytes,
                cache.unique_bytes,
                cache.attributed_bytes,
            )
        })
        .collect::<Vec<_>>();
    assert_eq!(
        shares,
        [
            ("alice", 306, 101, 101.0 + 205.0 / 2.0),
            ("bob", 205, 0, 205.0 / 2.0),
            ("empty", 0, 0, 0.0),
        ]
    );
}

// Quota usage, with the fixtures above.
mod quota;
