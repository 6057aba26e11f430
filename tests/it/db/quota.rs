//! Per-cache quota usage in the store layer (`larder_db`'s `quota`
//! module), against both backends: the counters follow every row that
//! counts, pushes over a quota write nothing, concurrent admissions never
//! overshoot, eviction takes the least recently accessed paths and only as
//! many as needed (never a pinned closure), and GC's recomputation heals
//! drift.

use larder_api::v1::{CacheQuota, QuotaPolicy};
use larder_db::{
    Actor, CacheId, CacheUpdate, CacheUsage, Database, DbError, LinkedPath, QuotaDefaults,
    StagedFile, UploadPhase,
};
use larder_nix::StorePathHash;

use super::{
    at, cache_name, create_cache, metadata, nar_hash, new_object, new_upload, open, path_hash,
    valid_nar, TestDb, T0,
};

both_backends!(
    usage_follows_every_row_that_counts,
    a_push_over_the_quota_writes_nothing,
    the_server_default_applies_to_caches_without_a_quota,
    concurrent_admissions_never_overshoot,
    eviction_takes_the_least_recently_accessed_and_only_what_is_needed,
    eviction_never_takes_a_pinned_closure,
    recomputing_heals_drifted_counters,
);

/// The counted usage of a cache, which must also be what its rows add up
/// to: a recomputation finds nothing to correct.
async fn assert_usage(db: &Database, cache_id: CacheId, path_bytes: u64, pending_bytes: u64) {
    let usage = db
        .cache_usage(cache_id)
        .await
        .expect("reading usage")
        .expect("the cache exists");
    assert_eq!(
        usage,
        CacheUsage {
            path_bytes,
            pending_bytes
        }
    );
    let corrections = db.recompute_usage().await.expect("recomputing");
    assert!(
        corrections.is_empty(),
        "the counters drifted: {corrections:?}"
    );
}

/// An upload of `nar_size` bytes of the path `n`, with NAR `n`.
fn sized_upload(cache_id: CacheId, n: u8, nar_size: u64) -> larder_db::NewUpload {
    let mut upload = new_upload(cache_id, path_hash(n), n);
    upload.nar_size = nar_size;
    upload
}

fn staged(cache_id: CacheId, name: &str, nar_size: u64) -> StagedFile {
    StagedFile {
        cache_id,
        file_name: format!("{name}.nar.zst"),
        staged_key: format!("staging/{name}-{nar_size}.nar"),
        staged_crc32: None,
        nar_hash: nar_hash(200),
        nar_size,
        created_at: T0,
    }
}

fn linked(n: u8) -> LinkedPath {
    let hash = path_hash(n);
    LinkedPath {
        store_path_hash: hash,
        metadata: metadata(&hash),
        created_by: Actor::default(),
    }
}

async fn set_quota(db: &Database, name: &str, quota: CacheQuota, policy: QuotaPolicy) {
    db.update_cache(
        &cache_name(name),
        &CacheUpdate {
            quota: Some(quota),
            quota_policy: Some(policy),
            ..CacheUpdate::default()
        },
    )
    .await
    .expect("setting a quota");
}

fn is_quota_exceeded(error: &DbError, quota: u64, used: u64, requested: u64) -> bool {
    matches!(
        error,
        DbError::QuotaExceeded { quota: q, used: u, requested: r }
            if (*q, *u, *r) == (quota, used, requested)
    )
}

async fn usage_follows_every_row_that_counts(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "counted").await;
    let other = create_cache(db, "other").await;
    assert_usage(db, cache.id, 0, 0).await;

    // An object counts its NAR's size; re-linking the same path to the
    // same NAR adds nothing; a path pointing at another NAR counts the
    // difference.
    let small = valid_nar(db, 1, 1000, &[1]).await;
    let large = valid_nar(db, 2, 3000, &[2]).await;
    db.upsert_object(cache.id, &new_object(path_hash(1), small), T0)
        .await
        .expect("an object");
    assert_usage(db, cache.id, 1000, 0).await;
    db.link_valid_nar(cache.id, &nar_hash(1), &linked(2), T0)
        .await
        .expect("linking")
        .expect("a valid NAR");
    db.link_valid_nar(cache.id, &nar_hash(1), &linked(2), T0)
        .await
        .expect("linking again")
        .expect("a valid NAR");
    assert_usage(db, cache.id, 2000, 0).await;
    db.link_valid_nar(cache.id, &nar_hash(2), &linked(2), T0)
        .await
        .expect("relinking to another NAR")
        .expect("a valid NAR");
    assert_usage(db, cache.id, 4000, 0).await;
    // Another cache's paths are its own, even with the same NAR.
    db.upsert_object(other.id, &new_object(path_hash(1), large), T0)
        .await
        .expect("another cache's object");
    assert_usage(db, cache.id, 4000, 0).await;
    assert_usage(db, other.id, 3000, 0).await;

    // Uploads in flight and staged files are pending; the same file PUT
    // again keeps the copy waiting (a name is a FileHash: same bytes) and
    // counts nothing more; claiming or reaping a file ends its count.
    let upload = db
        .create_upload(&sized_upload(cache.id, 10, 500), T0)
        .await
        .expect("an upload");
    assert_usage(db, cache.id, 4000, 500).await;
    db.put_staged_file(&staged(cache.id, "a", 50))
        .await
        .expect("a staged file");
    let kept = db
        .put_staged_file(&staged(cache.id, "a", 50))
        .await
        .expect("the staged file again");
    assert_eq!(kept, staged(cache.id, "a", 50).staged_key);
    db.put_staged_file(&staged(cache.id, "b", 30))
        .await
        .expect("a second staged file");
    assert_usage(db, cache.id, 4000, 580).await;
    assert!(db
        .take_expired_staged_file(cache.id, "a.nar.zst", at(1))
        .await
        .expect("reaping")
        .is_some());
    assert_usage(db, cache.id, 4000, 530).await;
    assert!(db
        .take_expired_staged_file(cache.id, "b.nar.zst", T0)
        .await
        .expect("reaping too early")
        .is_none());
    db.take_expired_staged_file(cache.id, "b.nar.zst", at(1))
        .await
        .expect("reaping")
        .expect("the expired staged file");
    assert_usage(db, cache.id, 4000, 500).await;

    // Moving through the pipeline changes nothing; failing ends the
    // count, and a failed upload's row goes without another change.
    db.set_upload_phase(&upload.id, UploadPhase::Chunking, at(1))
        .await
        .expect("chunking");
    assert_usage(db, cache.id, 4000, 500).await;
    assert!(db
        .fail_upload(&upload.id, "broken", at(2))
        .await
        .expect("failing"));
    assert!(!db
        .fail_upload(&upload.id, "again", at(2))
        .await
        .expect("failing twice"));
    assert_usage(db, cache.id, 4000, 0).await;
    assert!(db.delete_upload(&upload.id).await.expect("deleting"));
    assert_usage(db, cache.id, 4000, 0).await;

    // Reaping an upload still in flight ends its count.
    let stuck = db
        .create_upload(&sized_upload(cache.id, 11, 700), T0)
        .await
        .expect("an upload");
    assert_usage(db, cache.id, 4000, 700).await;
    assert!(db.delete_upload(&stuck.id).await.expect("reaping"));
    assert_usage(db, cache.id, 4000, 0).await;

    // Finalising moves an upload's bytes from pending to the path (less
    // the NAR of the object it replaces), once however often it is done.
    let nar = valid_nar(db, 12, 4096, &[12]).await;
    let finished = db
        .create_upload(&new_upload(cache.id, path_hash(1), 12), T0)
        .await
        .expect("an upload replacing path 1");
    assert_usage(db, cache.id, 4000, 4096).await;
    db.set_upload_nar(&finished.id, nar, at(1))
        .await
        .expect("linking the upload");
    db.finalise_upload(&finished.id, at(2))
        .await
        .expect("finalising");
    assert_usage(db, cache.id, 4000 - 1000 + 4096, 0).await;
    db.finalise_upload(&finished.id, at(3))
        .await
        .expect("finalising again");
    assert_usage(db, cache.id, 7096, 0).await;

    // Deleting paths, one, several or by retention, frees their bytes.
    assert!(db
        .delete_object(cache.id, &path_hash(1))
        .await
        .expect("deleting a path"));
    assert_usage(db, cache.id, 3000, 0).await;
    db.upsert_object(cache.id, &new_object(path_hash(3), small), at(5))
        .await
        .expect("an object");
    db.upsert_object(cache.id, &new_object(path_hash(4), small), at(5))
        .await
        .expect("an object");
    let deleted = db
        .delete_objects(cache.id, &[path_hash(3), path_hash(9)])
        .await
        .expect("deleting paths");
    assert_eq!(deleted, vec![path_hash(3)]);
    assert_usage(db, cache.id, 4000, 0).await;
    // Path 2 was last touched at T0, path 4 at 5 s.
    assert_eq!(
        db.delete_expired_objects(cache.id, at(1), 100)
            .await
            .expect("expiring"),
        1
    );
    assert_usage(db, cache.id, 1000, 0).await;

    // A destroyed cache takes its counters; the others keep theirs.
    assert!(db
        .delete_cache(&cache_name("counted"))
        .await
        .expect("destroying"));
    assert!(db.cache_usage(cache.id).await.expect("reading").is_none());
    assert_usage(db, other.id, 3000, 0).await;
}

async fn a_push_over_the_quota_writes_nothing(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "capped").await;
    set_quota(db, "capped", CacheQuota::Bytes(1000), QuotaPolicy::Refuse).await;
    let upload = db
        .create_upload(&sized_upload(cache.id, 1, 600), T0)
        .await
        .expect("600 of 1000 fits");

    let error = db
        .create_upload(&sized_upload(cache.id, 2, 401), T0)
        .await
        .expect_err("401 more does not fit");
    assert!(is_quota_exceeded(&error, 1000, 600, 401), "{error}");
    let error = db
        .put_staged_file(&staged(cache.id, "x", 401))
        .await
        .expect_err("a staged file does not fit either");
    assert!(is_quota_exceeded(&error, 1000, 600, 401), "{error}");
    let nar = valid_nar(db, 3, 401, &[3]).await;
    let error = db
        .link_valid_nar(cache.id, &nar_hash(3), &linked(3), T0)
        .await
        .expect_err("nor a link");
    assert!(is_quota_exceeded(&error, 1000, 600, 401), "{error}");
    let error = db
        .upsert_object(cache.id, &new_object(path_hash(3), nar), T0)
        .await
        .expect_err("nor an object");
    assert!(is_quota_exceeded(&error, 1000, 600, 401), "{error}");
    // Nothing of the refused pushes was written.
    assert_eq!(
        db.missing_store_path_hashes(cache.id, &[path_hash(2), path_hash(3)])
            .await
            .expect("missing paths"),
        vec![path_hash(2), path_hash(3)]
    );
    assert!(db
        .staged_file(cache.id, "x.nar.zst")
        .await
        .expect("lookup")
        .is_none());
    assert_usage(db, cache.id, 0, 600).await;

    // Exactly the room left fits.
    db.put_staged_file(&staged(cache.id, "y", 400))
        .await
        .expect("400 more fits exactly");
    assert_usage(db, cache.id, 0, 1000).await;

    // A quota lowered below the usage keeps what is there and refuses
    // more; finishing an upload admitted earlier is never refused.
    set_quota(db, "capped", CacheQuota::Bytes(10), QuotaPolicy::Refuse).await;
    let error = db
        .create_upload(&sized_upload(cache.id, 4, 1), T0)
        .await
        .expect_err("over a lowered quota");
    assert!(is_quota_exceeded(&error, 10, 1000, 1), "{error}");
    let nar = valid_nar(db, 1, 600, &[1]).await;
    db.set_upload_nar(&upload.id, nar, T0)
        .await
        .expect("linking");
    db.finalise_upload(&upload.id, at(1))
        .await
        .expect("an admitted upload finishes");
    assert_usage(db, cache.id, 600, 400).await;

    // Unlimited lifts it.
    set_quota(db, "capped", CacheQuota::Unlimited, QuotaPolicy::Refuse).await;
    db.create_upload(&sized_upload(cache.id, 5, 1 << 40), T0)
        .await
        .expect("no limit");
}

async fn the_server_default_applies_to_caches_without_a_quota(t: TestDb) {
    let db = t.db.clone().with_quota_defaults(QuotaDefaults {
        default_quota: Some(100),
    });
    let cache = create_cache(&db, "defaulted").await;
    assert_eq!(cache.quota, CacheQuota::Global);
    db.create_upload(&sized_upload(cache.id, 1, 100), T0)
        .await
        .expect("up to the default");
    let error = db
        .create_upload(&sized_upload(cache.id, 2, 1), T0)
        .await
        .expect_err("over the default");
    assert!(is_quota_exceeded(&error, 100, 100, 1), "{error}");
    // The same cache through a handle without a default is unlimited, and
    // a cache's own quota wins over the default either way.
    t.db.create_upload(&sized_upload(cache.id, 3, 1), T0)
        .await
        .expect("no default, no limit");
    set_quota(&db, "defaulted", CacheQuota::Unlimited, QuotaPolicy::Refuse).await;
    db.create_upload(&sized_upload(cache.id, 4, 1000), T0)
        .await
        .expect("unlimited beats the default");
    set_quota(
        &db,
        "defaulted",
        CacheQuota::Bytes(5000),
        QuotaPolicy::Refuse,
    )
    .await;
    db.create_upload(&sized_upload(cache.id, 5, 1000), T0)
        .await
        .expect("its own quota beats the default");
    let status = db
        .quota_status(cache.id, None)
        .await
        .expect("status")
        .expect("the cache");
    assert_eq!(status.quota, Some(5000));
    assert_eq!(status.usage.used(), 2101);
    assert_eq!(status.room(), Some(2899));
}

async fn concurrent_admissions_never_overshoot(t: TestDb) {
    const SIZE: u64 = 1000;
    const FITS: usize = 10;
    const TRIES: usize = 40;
    let db = &t.db;
    let cache = create_cache(db, "raced").await;
    set_quota(
        db,
        "raced",
        CacheQuota::Bytes(SIZE * FITS as u64),
        QuotaPolicy::Refuse,
    )
    .await;
    // Uploads and staged files at once, each of SIZE bytes: exactly FITS
    // of them can be admitted, whatever the interleaving.
    let tasks: Vec<_> = (0..TRIES)
        .map(|n| {
            let db = db.clone();
            tokio::spawn(async move {
                if n % 2 == 0 {
                    db.create_upload(&sized_upload(cache.id, n as u8, SIZE), T0)
                        .await
                        .map(|_| ())
                } else {
                    db.put_staged_file(&staged(cache.id, &format!("f{n}"), SIZE))
                        .await
                        .map(|_| ())
                }
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        match task.await.expect("the task panicked") {
            Ok(()) => admitted += 1,
            Err(DbError::QuotaExceeded { .. }) => {}
            Err(other) => panic!("an admission failed otherwise: {other}"),
        }
    }
    assert_eq!(admitted, FITS, "exactly what fits is admitted");
    assert_usage(db, cache.id, 0, SIZE * FITS as u64).await;
}

async fn eviction_takes_the_least_recently_accessed_and_only_what_is_needed(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "lru").await;
    let nar = valid_nar(db, 1, 100, &[1]).await;
    // Paths 1..=4, accessed in the order 2, 3, 1, 4 (oldest first).
    for (n, accessed) in [(1, 30), (2, 10), (3, 20), (4, 40)] {
        db.upsert_object(cache.id, &new_object(path_hash(n), nar), at(accessed))
            .await
            .expect("an object");
    }
    set_quota(db, "lru", CacheQuota::Bytes(400), QuotaPolicy::EvictLru).await;
    let present = |hashes: Vec<StorePathHash>| async move {
        let objects = db.objects_of_cache(cache.id).await.expect("objects");
        let mut found: Vec<StorePathHash> = objects.iter().map(|o| o.store_path_hash).collect();
        found.sort();
        let mut expected = hashes;
        expected.sort();
        assert_eq!(found, expected);
    };

    // 150 more needs 150 freed: paths 2 and 3, not 1 or 4.
    db.create_upload(&sized_upload(cache.id, 5, 150), at(50))
        .await
        .expect("room made by eviction");
    present(vec![path_hash(1), path_hash(4)]).await;
    assert_usage(db, cache.id, 200, 150).await;

    // Never the path being pushed: path 1 is the least recently accessed,
    // but it is the one being pushed again, so path 4 makes way.
    db.create_upload(&sized_upload(cache.id, 1, 100), at(60))
        .await
        .expect("room made by evicting another path");
    present(vec![path_hash(1)]).await;
    assert_usage(db, cache.id, 100, 250).await;

    // When evicting every other path cannot make room, nothing is evicted.
    let error = db
        .create_upload(&sized_upload(cache.id, 6, 200), at(70))
        .await
        .expect_err("in-flight uploads and the pushed path cannot make way");
    assert!(is_quota_exceeded(&error, 400, 350, 200), "{error}");
    let error = db
        .create_upload(&sized_upload(cache.id, 7, 151), at(70))
        .await
        .expect_err("one byte more than path 1 would free");
    assert!(matches!(error, DbError::QuotaExceeded { .. }), "{error}");
    present(vec![path_hash(1)]).await;
    assert_usage(db, cache.id, 100, 250).await;

    // Staged files and links make room the same way.
    db.put_staged_file(&staged(cache.id, "s", 150))
        .await
        .expect("room for a staged file");
    present(vec![]).await;
    assert_usage(db, cache.id, 0, 400).await;
}

async fn recomputing_heals_drifted_counters(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "drifted").await;
    let nar = valid_nar(db, 1, 1234, &[1]).await;
    db.upsert_object(cache.id, &new_object(path_hash(1), nar), T0)
        .await
        .expect("an object");
    db.create_upload(&sized_upload(cache.id, 2, 55), T0)
        .await
        .expect("an upload");
    // A counting bug, or a hand edit.
    sqlx::query(
        "UPDATE caches SET usage_path_bytes = 7, usage_pending_bytes = 999999 WHERE id = $1",
    )
    .bind(cache.id.0)
    .execute(db.pool())
    .await
    .expect("corrupting the counters");
    let corrections = db.recompute_usage().await.expect("recomputing");
    assert_eq!(corrections.len(), 1, "{corrections:?}");
    assert_eq!(corrections[0].cache_id, cache.id);
    assert_eq!(
        corrections[0].recorded,
        CacheUsage {
            path_bytes: 7,
            pending_bytes: 999_999
        }
    );
    assert_usage(db, cache.id, 1234, 55).await;
}

async fn eviction_never_takes_a_pinned_closure(t: TestDb) {
    let db = &t.db;
    let cache = create_cache(db, "pinned-lru").await;
    let nar = valid_nar(db, 1, 100, &[1]).await;
    // Path 1 (pinned) references path 2; both were accessed before path 3.
    let mut root = new_object(path_hash(1), nar);
    root.metadata
        .references
        .push(format!("{}-dep", path_hash(2)));
    db.upsert_object(cache.id, &root, at(10))
        .await
        .expect("the root");
    for (n, accessed) in [(2, 20), (3, 30)] {
        db.upsert_object(cache.id, &new_object(path_hash(n), nar), at(accessed))
            .await
            .expect("an object");
    }
    let pinned = db
        .pin_path(
            cache.id,
            &"release".parse().expect("a pin name"),
            &path_hash(1),
            Some(larder_api::pin::KeepPolicy::Forever),
            Some("alice"),
            at(40),
        )
        .await
        .expect("pinning")
        .expect("the path is in the cache");
    assert_eq!(pinned.revisions.len(), 1);
    set_quota(
        db,
        "pinned-lru",
        CacheQuota::Bytes(300),
        QuotaPolicy::EvictLru,
    )
    .await;

    // 100 more: path 3 goes, although 1 and 2 were accessed less recently.
    db.create_upload(&sized_upload(cache.id, 4, 100), at(50))
        .await
        .expect("room made by evicting the unpinned path");
    let mut left: Vec<StorePathHash> = db
        .objects_of_cache(cache.id)
        .await
        .expect("objects")
        .iter()
        .map(|object| object.store_path_hash)
        .collect();
    left.sort();
    assert_eq!(left, [path_hash(1), path_hash(2)]);
    // Nothing else can make way: the pinned closure still counts.
    let error = db
        .create_upload(&sized_upload(cache.id, 5, 100), at(60))
        .await
        .expect_err("only pinned paths are left to evict");
    assert!(is_quota_exceeded(&error, 300, 300, 100), "{error}");
}
