//! GC's queries (`larder_db`'s `gc` module) against both backends, and
//! their races with linking a path and recording a chunk list.

use std::collections::BTreeMap;

use larder_db::{
    Actor, CacheId, CacheKeypair, ChunkId, ChunkLocation, Database, DbError, LinkedPath, NarId,
    NewCache, NewChunk, NewObject, NewUpload, StoreState, StoredChunk, Timestamp,
};
use larder_nix::{NarHash, Sha256Hash, StorePathHash};

use crate::fresh_db::both_backends;

use super::plain_metadata;

both_backends!(
    objects_expire_by_last_access_per_cache,
    a_nar_is_kept_while_an_object_or_an_upload_in_flight_holds_it,
    chunks_are_claimed_when_unlisted_past_the_grace_and_come_back_fresh,
    a_chunk_list_naming_a_claimed_chunk_is_refused,
    a_nar_linked_while_it_is_collected_is_either_kept_or_not_linked,
    a_chunk_list_recorded_while_its_chunks_are_claimed_never_names_a_claimed_chunk,
);

const T0: Timestamp = Timestamp::from_unix_millis(1_700_000_000_000);

fn at(seconds_after_t0: i64) -> Timestamp {
    Timestamp::from_unix_millis(T0.unix_millis() + seconds_after_t0 * 1000)
}

async fn create_cache(db: &Database, name: &str) -> CacheId {
    let keypair = CacheKeypair::new(format!(
        "{name}-1:c2VjcmV0LWtleS1ieXRlcy1mb3ItdGVzdHMtb25seQ=="
    ));
    db.create_cache(&NewCache::new(name.parse().expect("name"), keypair), T0)
        .await
        .expect("creating a cache")
        .id
}

fn path_hash(n: u32) -> StorePathHash {
    let mut bytes = [7u8; 20];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    StorePathHash::from_bytes(&bytes)
}

fn nar_hash(n: u32) -> NarHash {
    NarHash::new(Sha256Hash::digest(
        &[b"nar".as_slice(), &n.to_be_bytes()].concat(),
    ))
}

fn chunk_hash(n: u32) -> Sha256Hash {
    Sha256Hash::digest(&[b"chunk".as_slice(), &n.to_be_bytes()].concat())
}

fn stored_chunk(n: u32) -> StoredChunk {
    StoredChunk {
        chunk_hash: chunk_hash(n),
        chunk_size: 1000,
        location: ChunkLocation {
            object_key: format!("chunks/test-{n}.zst"),
            offset: 0,
            length: 100,
        },
    }
}

async fn valid_nar(db: &Database, n: u32, chunks: &[u32], when: Timestamp) -> NarId {
    let stored: Vec<StoredChunk> = chunks.iter().map(|&c| stored_chunk(c)).collect();
    // At least the chunker's minimum chunk size per entry, as the store
    // layer requires.
    db.store_complete_nar(&nar_hash(n), 20_000 * chunks.len() as u64, &stored, when)
        .await
        .expect("storing a NAR")
        .id
}

fn new_object(n: u32, nar_id: NarId) -> NewObject {
    let hash = path_hash(n);
    NewObject {
        store_path_hash: hash,
        nar_id,
        metadata: plain_metadata(&format!("/nix/store/{hash}-p{n}")),
        created_by: Actor::default(),
    }
}

async fn unreferenced_nars(db: &Database) -> Vec<NarId> {
    db.unreferenced_nars(NarId(0), 1000).await.expect("listing")
}

async fn collect_chunks(db: &Database, linked_before: Timestamp) -> u64 {
    let candidates = db
        .unreferenced_chunks(ChunkId(0), linked_before, 1000)
        .await
        .expect("listing");
    db.claim_unreferenced_chunks(&candidates, linked_before)
        .await
        .expect("claiming")
}

async fn objects_expire_by_last_access_per_cache(db: Database) {
    let short = create_cache(&db, "short").await;
    let other = create_cache(&db, "other").await;
    let nar = valid_nar(&db, 1, &[1], T0).await;
    for n in 0..5 {
        db.upsert_object(short, &new_object(n, nar), at(0))
            .await
            .expect("object");
    }
    db.upsert_object(other, &new_object(9, nar), at(0))
        .await
        .expect("object");
    // Paths 0 and 1 were fetched at 50 s: one by narinfo, one by NAR...
    let paths = BTreeMap::from([(short, vec![path_hash(0)])]);
    assert_eq!(
        db.touch_objects_by_path(&paths, at(50))
            .await
            .expect("touch"),
        1
    );
    // ...a NAR fetch touches every object of the cache on that NAR.
    let nars = BTreeMap::from([(other, vec![nar])]);
    assert_eq!(
        db.touch_objects_by_nar(&nars, at(50)).await.expect("touch"),
        1
    );
    // Never backwards.
    assert_eq!(
        db.touch_objects_by_path(&paths, at(40))
            .await
            .expect("touch"),
        0
    );

    // Retention 30 s at 60 s: paths 1..5 of `short` are older; two a page.
    let mut deleted = 0;
    loop {
        let page = db
            .delete_expired_objects(short, at(30), 2)
            .await
            .expect("expiring");
        deleted += page;
        if page < 2 {
            break;
        }
    }
    assert_eq!(deleted, 4);
    let left: Vec<StorePathHash> = db
        .objects_of_cache(short)
        .await
        .expect("objects")
        .into_iter()
        .map(|object| object.store_path_hash)
        .collect();
    assert_eq!(left, vec![path_hash(0)]);
    assert_eq!(db.objects_of_cache(other).await.expect("objects").len(), 1);

    // Path deletion answers what was there.
    let gone = db
        .delete_objects(short, &[path_hash(0), path_hash(3)])
        .await
        .expect("deleting");
    assert_eq!(gone, vec![path_hash(0)]);
}

async fn a_nar_is_kept_while_an_object_or_an_upload_in_flight_holds_it(db: Database) {
    let cache = create_cache(&db, "c").await;
    let held_by_object = valid_nar(&db, 1, &[1], T0).await;
    let held_by_upload = valid_nar(&db, 2, &[2], T0).await;
    let free = valid_nar(&db, 3, &[3], T0).await;
    db.upsert_object(cache, &new_object(1, held_by_object), T0)
        .await
        .expect("object");
    let hash = path_hash(2);
    let upload = db
        .create_upload(
            &NewUpload {
                cache_id: cache,
                store_path_hash: hash,
                nar_hash: nar_hash(2),
                nar_size: 1000,
                metadata: plain_metadata(&format!("/nix/store/{hash}-p2")),
                staged_key: "staging/u.nar".to_owned(),
                staged_crc32: None,
                trace_id: None,
                created_by: Actor::default(),
            },
            T0,
        )
        .await
        .expect("upload");

    assert_eq!(unreferenced_nars(&db).await, vec![free]);
    assert_eq!(
        db.delete_unreferenced_nars(&[held_by_object, held_by_upload, free])
            .await
            .expect("deleting"),
        vec![free],
        "only the NAR nothing holds goes, even when asked for all three"
    );
    assert!(db.nar_by_id(free).await.expect("lookup").is_none());
    assert!(db.chunks_of_nar(free).await.expect("chunks").is_empty());

    // Once the upload has failed, it no longer holds its NAR.
    db.fail_upload(&upload.id, "test", at(1))
        .await
        .expect("fail");
    assert_eq!(unreferenced_nars(&db).await, vec![held_by_upload]);
    // Deleted with its cache's objects, the last NAR goes too.
    db.delete_objects(cache, &[path_hash(1)])
        .await
        .expect("delete");
    let deleted = db
        .delete_unreferenced_nars(&unreferenced_nars(&db).await)
        .await
        .expect("deleting");
    assert_eq!(deleted, vec![held_by_object, held_by_upload]);
}

async fn chunks_are_claimed_when_unlisted_past_the_grace_and_come_back_fresh(db: Database) {
    let nar = valid_nar(&db, 1, &[1, 2], T0).await;
    let other = valid_nar(&db, 2, &[2, 3], T0).await;
    // Listed chunks are never claimed.
    assert_eq!(collect_chunks(&db, at(100)).await, 0);
    assert_eq!(
        db.delete_unreferenced_nars(&[nar]).await.expect("delete"),
        vec![nar]
    );
    // Chunk 1 is unlisted now; within the grace (looked up at T0) it stays.
    assert_eq!(collect_chunks(&db, T0).await, 0);
    assert_eq!(collect_chunks(&db, at(100)).await, 1);
    let claimed = db.claimed_chunks(ChunkId(0), 10).await.expect("claimed");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].chunk_hash, chunk_hash(1));
    assert_eq!(claimed[0].state, StoreState::Deleting);

    // A chunker needing the bytes again gets a fresh row, with a new id.
    let revived = db
        .upsert_chunks(
            &[NewChunk {
                chunk_hash: chunk_hash(1),
                chunk_size: 1000,
            }],
            at(200),
        )
        .await
        .expect("upsert");
    assert_eq!(revived[0].state, StoreState::Pending);
    assert_ne!(revived[0].id, claimed[0].id);
    // GC's delete of the old row finds nothing left to delete.
    assert_eq!(
        db.delete_claimed_chunks(&[claimed[0].id])
            .await
            .expect("delete"),
        0
    );
    // The fresh row was just looked up: within the grace it stays.
    assert_eq!(collect_chunks(&db, at(150)).await, 0);
    // Chunks 2 and 3 are still listed by the other NAR.
    assert_eq!(db.chunks_of_nar(other).await.expect("chunks").len(), 2);
    assert_eq!(
        collect_chunks(&db, at(300)).await,
        1,
        "only the revived one"
    );
    let claimed = db.claimed_chunks(ChunkId(0), 10).await.expect("claimed");
    let ids: Vec<ChunkId> = claimed.iter().map(|chunk| chunk.id).collect();
    assert_eq!(db.delete_claimed_chunks(&ids).await.expect("delete"), 1);
    assert!(db
        .chunk_by_hash(&chunk_hash(1))
        .await
        .expect("lookup")
        .is_none());
}

async fn a_chunk_list_naming_a_claimed_chunk_is_refused(db: Database) {
    // A chunker looked chunk 1 up (dedup), then GC claimed it before the
    // chunker recorded its NAR's list.
    let found = db
        .upsert_chunks(
            &[NewChunk {
                chunk_hash: chunk_hash(1),
                chunk_size: 1000,
            }],
            T0,
        )
        .await
        .expect("upsert");
    assert_eq!(collect_chunks(&db, at(1)).await, 1);
    let (nar, _) = db
        .insert_nar_pending(&nar_hash(1), 1000, T0)
        .await
        .expect("NAR");
    let refused = db.set_nar_chunks(nar.id, &[found[0].id]).await;
    assert!(
        matches!(refused, Err(DbError::Conflict { .. })),
        "{refused:?}"
    );
    assert!(db.chunks_of_nar(nar.id).await.expect("chunks").is_empty());
}

/// How many rounds a race test may take to see each outcome
/// `RACE_OUTCOMES_WANTED` times; a test that has not seen both by then fails,
/// since it would not have tested the race.
const RACE_ROUNDS: u32 = 400;
const RACE_OUTCOMES_WANTED: u32 = 3;

/// Spawns both sides of one round of a race, `a` first on even rounds and
/// `b` first on odd ones, so that each side gets the head start half of the
/// time and both outcomes come up.
fn race<A, B>(
    round: u32,
    a: A,
    b: B,
) -> (
    tokio::task::JoinHandle<A::Output>,
    tokio::task::JoinHandle<B::Output>,
)
where
    A: std::future::Future + Send + 'static,
    A::Output: Send + 'static,
    B: std::future::Future + Send + 'static,
    B::Output: Send + 'static,
{
    if round.is_multiple_of(2) {
        let a = tokio::spawn(a);
        (a, tokio::spawn(b))
    } else {
        let b = tokio::spawn(b);
        (tokio::spawn(a), b)
    }
}

/// Fails unless a race test saw both of its outcomes: one that always went
/// the same way proved nothing about the other.
fn assert_both_outcomes_seen(first: (&str, u32), second: (&str, u32)) {
    eprintln!("{}: {}, {}: {}", first.0, first.1, second.0, second.1);
    assert!(
        first.1 >= RACE_OUTCOMES_WANTED && second.1 >= RACE_OUTCOMES_WANTED,
        "after {RACE_ROUNDS} rounds at most: {} {} times, {} {} times; \
         the race was not exercised both ways",
        first.0,
        first.1,
        second.0,
        second.1,
    );
}

/// Links a path to a valid, unreferenced NAR while GC deletes unreferenced
/// NARs, round after round until both outcomes were seen: either the link
/// wins (the NAR stays, with the object) or GC does (the link finds no NAR
/// and writes nothing).
async fn a_nar_linked_while_it_is_collected_is_either_kept_or_not_linked(db: Database) {
    let cache = create_cache(&db, "race").await;
    let (mut linked, mut collected) = (0, 0);
    for n in 0..RACE_ROUNDS {
        if linked >= RACE_OUTCOMES_WANTED && collected >= RACE_OUTCOMES_WANTED {
            break;
        }
        let nar = valid_nar(&db, n, &[n], T0).await;
        let hash = path_hash(n);
        let path = LinkedPath {
            store_path_hash: hash,
            metadata: plain_metadata(&format!("/nix/store/{hash}-p")),
            created_by: Actor::default(),
        };
        let (link, gc) = {
            let (link_db, gc_db) = (db.clone(), db.clone());
            race(
                n,
                async move {
                    link_db
                        .link_valid_nar(cache, &nar_hash(n), &path, at(1))
                        .await
                },
                async move { gc_db.delete_unreferenced_nars(&[nar]).await },
            )
        };
        let link = link.await.expect("join").expect("link");
        let deleted = gc.await.expect("join").expect("gc");
        let object = db
            .objects_of_cache(cache)
            .await
            .expect("objects")
            .into_iter()
            .find(|object| object.store_path_hash == hash);
        let nar_row = db.nar_by_id(nar).await.expect("lookup");
        if deleted.is_empty() {
            linked += 1;
            assert!(link.is_some() && object.is_some() && nar_row.is_some());
        } else {
            collected += 1;
            assert!(link.is_none(), "linked to NAR {nar} which GC deleted");
            assert!(object.is_none() && nar_row.is_none());
        }
    }
    assert_both_outcomes_seen(("linked", linked), ("collected", collected));
}

/// Records a NAR's chunk list while GC claims unlisted chunks, round after
/// round until both outcomes were seen: a recorded list never names a claimed chunk, and a refused one
/// is recorded after the chunks come back fresh.
async fn a_chunk_list_recorded_while_its_chunks_are_claimed_never_names_a_claimed_chunk(
    db: Database,
) {
    let (mut recorded_first, mut claimed_first) = (0, 0);
    for n in 0..RACE_ROUNDS {
        if recorded_first >= RACE_OUTCOMES_WANTED && claimed_first >= RACE_OUTCOMES_WANTED {
            break;
        }
        let new: Vec<NewChunk> = (0..3)
            .map(|i| NewChunk {
                chunk_hash: chunk_hash(1000 * n + i),
                chunk_size: 1000,
            })
            .collect();
        let chunks = db.upsert_chunks(&new, T0).await.expect("upsert");
        let (nar, _) = db
            .insert_nar_pending(&nar_hash(n), 60_000, T0)
            .await
            .expect("NAR");
        let ids: Vec<ChunkId> = chunks.iter().map(|chunk| chunk.id).collect();
        let (record, claim) = {
            let (record_db, record_ids) = (db.clone(), ids.clone());
            let (claim_db, claim_ids) = (db.clone(), ids.clone());
            race(
                n,
                async move { record_db.set_nar_chunks(nar.id, &record_ids).await },
                async move { claim_db.claim_unreferenced_chunks(&claim_ids, at(1)).await },
            )
        };
        let recorded = record.await.expect("join");
        let claimed = claim.await.expect("join").expect("claim");
        let listed = db.chunks_of_nar(nar.id).await.expect("chunks");
        assert!(
            listed
                .iter()
                .all(|entry| entry.chunk.state != StoreState::Deleting),
            "a recorded list names a claimed chunk"
        );
        match recorded {
            Ok(()) => {
                recorded_first += 1;
                assert_eq!((claimed, listed.len()), (0, 3));
            }
            Err(DbError::Conflict { .. }) => {
                claimed_first += 1;
                assert!(claimed > 0 && listed.is_empty());
                // What the chunker's retry does: look the chunks up again.
                let fresh = db.upsert_chunks(&new, at(2)).await.expect("upsert");
                let ids: Vec<ChunkId> = fresh.iter().map(|chunk| chunk.id).collect();
                db.set_nar_chunks(nar.id, &ids).await.expect("recorded");
            }
            Err(error) => panic!("recording the list: {error}"),
        }
    }
    assert_both_outcomes_seen(
        ("recorded before the claim", recorded_first),
        ("claimed before the recording", claimed_first),
    );
}
