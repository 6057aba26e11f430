//! The damage model's queries (`larder_db`'s `damage` module) against
//! both backends: what marking chunks damaged withdraws, what it leaves
//! alone, and how storing the chunks again brings the NARs back.

use larder_db::{
    Actor, CacheId, CacheKeypair, ChunkId, ChunkLocation, DamagedChunk, Database, NarId, NewCache,
    NewObject, NewPack, StoreState, StoredChunk, Timestamp,
};
use larder_nix::{NarHash, Sha256Hash, StorePathHash};

use crate::fresh_db::both_backends;

use crate::server::plain_metadata;

both_backends!(
    a_damaged_chunk_withdraws_every_nar_listing_it_and_nothing_else,
    damage_is_marked_only_where_it_was_found,
    storing_the_chunk_again_brings_its_nars_back,
    a_valid_nar_listing_an_unstored_chunk_is_withdrawn_by_the_sweep,
);

const T0: Timestamp = Timestamp::from_unix_millis(1_700_000_000_000);

/// The one pack object of these tests: chunk `n` is at offset `100 * n`.
const PACK: &str = "packs/ab/test.pack";

fn path_hash(n: u32) -> StorePathHash {
    let mut bytes = [9u8; 20];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    StorePathHash::from_bytes(&bytes)
}

fn nar_hash(n: u32) -> NarHash {
    NarHash::new(Sha256Hash::digest(
        &[b"nar".as_slice(), &n.to_be_bytes()].concat(),
    ))
}

fn location(n: u32) -> ChunkLocation {
    ChunkLocation {
        object_key: PACK.to_owned(),
        offset: 100 * u64::from(n),
        length: 100,
    }
}

fn stored_chunk(n: u32) -> StoredChunk {
    StoredChunk {
        chunk_hash: Sha256Hash::digest(&[b"chunk".as_slice(), &n.to_be_bytes()].concat()),
        chunk_size: 1000,
        location: location(n),
    }
}

struct Store {
    db: Database,
    cache: CacheId,
}

impl Store {
    async fn new(db: Database) -> Self {
        let keypair =
            CacheKeypair::new("c-1:c2VjcmV0LWtleS1ieXRlcy1mb3ItdGVzdHMtb25seQ==".to_owned());
        let cache = db
            .create_cache(&NewCache::new("c".parse().expect("name"), keypair), T0)
            .await
            .expect("creating a cache")
            .id;
        Self { db, cache }
    }

    /// NAR `n`, valid, of chunks `chunks`, with path `n` in the cache.
    async fn path(&self, n: u32, chunks: &[u32]) -> NarId {
        let stored: Vec<StoredChunk> = chunks.iter().map(|&c| stored_chunk(c)).collect();
        let nar = self
            .db
            .store_complete_nar(&nar_hash(n), 20_000 * chunks.len() as u64, &stored, T0)
            .await
            .expect("storing a NAR")
            .id;
        let hash = path_hash(n);
        let object = NewObject {
            store_path_hash: hash,
            nar_id: nar,
            metadata: plain_metadata(&format!("/nix/store/{hash}-p{n}")),
            created_by: Actor::default(),
        };
        self.db
            .upsert_object(self.cache, &object, T0)
            .await
            .expect("object");
        nar
    }

    async fn chunk_id(&self, n: u32) -> ChunkId {
        self.db
            .chunk_by_hash(&stored_chunk(n).chunk_hash)
            .await
            .expect("looking up a chunk")
            .expect("the chunk exists")
            .id
    }

    async fn damaged(&self, n: u32) -> DamagedChunk {
        DamagedChunk {
            id: self.chunk_id(n).await,
            location: location(n),
        }
    }

    async fn nar_state(&self, nar: NarId) -> StoreState {
        self.db
            .nar_by_id(nar)
            .await
            .expect("reading a NAR")
            .expect("the NAR exists")
            .state
    }

    /// Whether path `n` is served: its narinfo found, its NAR reachable,
    /// and not reported missing.
    async fn served(&self, n: u32) -> bool {
        let found = self
            .db
            .find_object(self.cache, &path_hash(n))
            .await
            .expect("finding an object")
            .is_some();
        let reachable = self
            .db
            .valid_nar_in_cache(self.cache, &nar_hash(n))
            .await
            .expect("finding a NAR")
            .is_some();
        let missing = self
            .db
            .missing_store_path_hashes(self.cache, &[path_hash(n)])
            .await
            .expect("missing paths");
        assert_eq!(found, reachable, "narinfo and NAR of path {n} disagree");
        assert_eq!(
            found,
            missing.is_empty(),
            "path {n}: served but missing, or the reverse"
        );
        found
    }
}

async fn a_damaged_chunk_withdraws_every_nar_listing_it_and_nothing_else(db: Database) {
    let store = Store::new(db).await;
    let a = store.path(1, &[1, 2]).await;
    let b = store.path(2, &[2, 3, 2]).await;
    let c = store.path(3, &[3]).await;
    let in_pack = store.db.chunks_in_object(PACK).await.expect("listing");
    let offsets: Vec<u64> = in_pack
        .iter()
        .map(|chunk| chunk.location.as_ref().expect("stored").offset)
        .collect();
    assert_eq!(offsets, [100, 200, 300]);

    let withdrawal = store
        .db
        .mark_chunks_damaged(&[store.damaged(2).await])
        .await
        .expect("marking");
    assert_eq!(withdrawal.chunks, 1);
    let mut withdrawn = withdrawal.nars.clone();
    withdrawn.sort_by_key(ToString::to_string);
    let mut expected = vec![nar_hash(1), nar_hash(2)];
    expected.sort_by_key(ToString::to_string);
    assert_eq!(withdrawn, expected);

    let chunk = store
        .db
        .chunk_by_hash(&stored_chunk(2).chunk_hash)
        .await
        .expect("reading")
        .expect("kept");
    assert_eq!(chunk.state, StoreState::Pending);
    assert_eq!(chunk.location, None);
    assert_eq!(store.nar_state(a).await, StoreState::Pending);
    assert_eq!(store.nar_state(b).await, StoreState::Pending);
    assert_eq!(store.nar_state(c).await, StoreState::Valid);
    assert!(!store.served(1).await);
    assert!(!store.served(2).await);
    assert!(store.served(3).await);
    // The chunk lists stay, for the push that heals them.
    assert_eq!(store.db.chunks_of_nar(b).await.expect("list").len(), 3);
    // What is left in the pack is what is still valid there.
    assert_eq!(
        store
            .db
            .chunks_in_object(PACK)
            .await
            .expect("listing")
            .len(),
        2
    );
}

async fn damage_is_marked_only_where_it_was_found(db: Database) {
    let store = Store::new(db).await;
    let a = store.path(1, &[1]).await;
    let id = store.chunk_id(1).await;
    // A report from a read of another location (the chunk was moved since)
    // changes nothing.
    for elsewhere in [
        ChunkLocation {
            object_key: "packs/cd/old.pack".to_owned(),
            ..location(1)
        },
        ChunkLocation {
            offset: 0,
            ..location(1)
        },
        ChunkLocation {
            length: 99,
            ..location(1)
        },
    ] {
        let withdrawal = store
            .db
            .mark_chunks_damaged(&[DamagedChunk {
                id,
                location: elsewhere,
            }])
            .await
            .expect("marking");
        assert!(withdrawal.is_empty(), "{withdrawal:?}");
    }
    assert!(store.served(1).await);
    // The right one, reported twice in one call and again: marked once.
    let damaged = store.damaged(1).await;
    let first = store
        .db
        .mark_chunks_damaged(&[damaged.clone(), damaged.clone()])
        .await
        .expect("marking");
    assert_eq!((first.chunks, first.nars.len()), (1, 1));
    let again = store
        .db
        .mark_chunks_damaged(&[damaged])
        .await
        .expect("marking again");
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(store.nar_state(a).await, StoreState::Pending);
}

async fn storing_the_chunk_again_brings_its_nars_back(db: Database) {
    let store = Store::new(db).await;
    let a = store.path(1, &[1, 2]).await;
    let b = store.path(2, &[2]).await;
    let before = store.db.nar_by_id(a).await.expect("reading").expect("kept");
    store
        .db
        .mark_chunks_damaged(&[store.damaged(2).await])
        .await
        .expect("marking");
    // What the compressor does for the chunk a re-push republished.
    let id = store.chunk_id(2).await;
    let moved = ChunkLocation {
        object_key: "packs/ef/new.pack".to_owned(),
        offset: 0,
        length: 120,
    };
    let pack = NewPack {
        object_key: moved.object_key.clone(),
        size: moved.length,
    };
    store
        .db
        .set_chunks_stored(&pack, &[(id, moved)], T0)
        .await
        .expect("storing");
    let pending = store.db.pending_nars_of_chunks(&[id]).await.expect("NARs");
    assert_eq!(pending, [a, b]);
    for nar in pending {
        assert!(store
            .db
            .mark_nar_valid_if_complete(nar)
            .await
            .expect("finalising"));
    }
    assert!(store.served(1).await);
    assert!(store.served(2).await);
    let after = store.db.nar_by_id(a).await.expect("reading").expect("kept");
    // The served size follows the frames' new lengths.
    assert_eq!(after.file_size, before.file_size.map(|size| size + 20));
}

async fn a_valid_nar_listing_an_unstored_chunk_is_withdrawn_by_the_sweep(db: Database) {
    let store = Store::new(db).await;
    let a = store.path(1, &[1, 2]).await;
    let c = store.path(3, &[3]).await;
    assert!(store
        .db
        .withdraw_incomplete_nars()
        .await
        .expect("sweeping")
        .is_empty());
    // The state a compressor's finalisation racing the marking can leave:
    // the NAR valid again while a chunk of it is pending.
    store
        .db
        .mark_chunks_damaged(&[store.damaged(2).await])
        .await
        .expect("marking");
    sqlx::query("UPDATE nars SET state = 'valid' WHERE id = $1")
        .bind(a.0)
        .execute(store.db.pool())
        .await
        .expect("forcing the race's outcome");
    assert_eq!(
        store.db.withdraw_incomplete_nars().await.expect("sweeping"),
        [nar_hash(1)]
    );
    assert_eq!(store.nar_state(a).await, StoreState::Pending);
    assert_eq!(store.nar_state(c).await, StoreState::Valid);
}
