//! Issue #5's distributed topology, as processes from the real binaries
//! (`tests::cluster::Cluster`): two `ingest-api --mode api`, two chunkers,
//! two compressors and `gc-scheduler` on RabbitMQ, PostgreSQL and Garage.
//!
//! `push` is the acceptance push (both protocols, to different API
//! servers, substituted back and verified) and the poison message;
//! `faults` kills workers and disturbs each service during pushes; `tls`
//! runs a push with every service reached over TLS. Every
//! test ends with [`assert_whole`]: nothing lost, nothing duplicated, no
//! upload left stuck.

mod compose;
mod faults;
mod push;
mod tls;

use std::collections::BTreeSet;
use std::time::Duration;

use larder_db::{Upload, UploadPhase};
use larder_queue::{CHUNK_DEAD_LETTER_QUEUE, COMPRESS_DEAD_LETTER_QUEUE};
use larder_token::Permission;
use tests::cluster::Cluster;

use crate::server::pushing::Pushing;

/// How long a cluster may take to finish its uploads after the pushes.
const SETTLE_LIMIT: Duration = Duration::from_secs(240);

/// A token that may pull from and push to `caches`.
async fn pusher_token(cluster: &Cluster, caches: &[&str]) -> String {
    let grants: Vec<(&str, &[Permission])> = caches
        .iter()
        .map(|cache| (*cache, &[Permission::Pull, Permission::Push][..]))
        .collect();
    cluster.mint("pusher", &grants).await
}

/// Checks the end state after pushes: no upload in flight; none failed
/// except `failed_paths`; each cache of `pushed` holds exactly its paths;
/// every NAR and chunk row is valid (the schema keeps them unique), and
/// the bucket holds exactly one object per chunk row; every staged NAR
/// left is a staged file still waiting for its narinfo or a failed
/// upload's; the dead-letter queues are empty unless some uploads were
/// expected to fail. Returns the uploads.
async fn assert_whole(
    cluster: &Cluster,
    pushed: &[(&str, &[String])],
    failed_paths: &[String],
) -> Vec<Upload> {
    let uploads = cluster.settled_uploads(SETTLE_LIMIT).await;
    let failed: BTreeSet<&str> = uploads
        .iter()
        .filter(|upload| upload.phase == UploadPhase::Failed)
        .map(|upload| upload.metadata.store_path.as_str())
        .collect();
    let expected_failures: BTreeSet<&str> = failed_paths.iter().map(String::as_str).collect();
    assert_eq!(
        failed,
        expected_failures,
        "failed uploads: {:?}",
        uploads
            .iter()
            .filter(|upload| upload.phase == UploadPhase::Failed)
            .map(|upload| (&upload.metadata.store_path, &upload.error))
            .collect::<Vec<_>>()
    );

    for (cache, paths) in pushed {
        let stored: Vec<String> = sqlx::query_scalar(
            "SELECT o.store_path FROM objects o JOIN caches c ON c.id = o.cache_id \
             WHERE c.name = $1",
        )
        .bind(*cache)
        .fetch_all(cluster.database().pool())
        .await
        .expect("listing a cache's objects");
        let stored_set: BTreeSet<&str> = stored.iter().map(String::as_str).collect();
        assert_eq!(stored.len(), stored_set.len(), "{cache}: a path twice");
        let expected: BTreeSet<&str> = paths
            .iter()
            .map(String::as_str)
            .filter(|path| !expected_failures.contains(path))
            .collect();
        assert_eq!(stored_set, expected, "{cache}: the paths stored");
    }

    // A failed upload may leave its NAR pending, with the chunks cut so
    // far; everything else is complete.
    let count = |sql: &'static str| async move {
        let count: i64 = sqlx::query_scalar(sql)
            .fetch_one(cluster.database().pool())
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
        count
    };
    assert_eq!(
        count(concat!(
            "SELECT COUNT(*) FROM nars WHERE state <> 'valid' AND id NOT IN ",
            "(SELECT nar_id FROM uploads WHERE phase = 'failed' AND nar_id IS NOT NULL)"
        ))
        .await,
        0,
        "every NAR is valid"
    );
    assert_eq!(
        count(concat!(
            "SELECT COUNT(*) FROM chunks WHERE state <> 'valid' AND id NOT IN ",
            "(SELECT chunk_id FROM nar_chunks WHERE nar_id IN ",
            "(SELECT nar_id FROM uploads WHERE phase = 'failed' AND nar_id IS NOT NULL))"
        ))
        .await,
        0,
        "every chunk is stored"
    );
    // Every chunk is in a recorded pack, and every recorded pack is in
    // storage. A worker killed between writing a pack and recording it
    // leaves one more object under `packs/`, which GC's orphan sweep
    // removes after its grace.
    let chunk_keys: Vec<String> =
        sqlx::query_scalar("SELECT object_key FROM chunks WHERE object_key IS NOT NULL")
            .fetch_all(cluster.database().pool())
            .await
            .expect("listing chunk locations");
    let chunk_keys: BTreeSet<String> = chunk_keys.into_iter().collect();
    let pack_keys: Vec<String> = sqlx::query_scalar("SELECT object_key FROM packs")
        .fetch_all(cluster.database().pool())
        .await
        .expect("listing packs");
    let pack_keys: BTreeSet<String> = pack_keys.into_iter().collect();
    let stored_packs: BTreeSet<String> = cluster.object_keys("packs/").await.into_iter().collect();
    assert!(
        chunk_keys.is_subset(&pack_keys),
        "every chunk is in a recorded pack: {:?}",
        chunk_keys.difference(&pack_keys).collect::<Vec<_>>()
    );
    assert!(
        pack_keys.is_subset(&stored_packs),
        "every recorded pack is stored: {:?}",
        pack_keys.difference(&stored_packs).collect::<Vec<_>>()
    );
    assert_eq!(
        cluster.object_keys("chunks/").await,
        Vec::<String>::new(),
        "no chunk is stored outside a pack"
    );

    let waiting: Vec<String> = sqlx::query_scalar("SELECT staged_key FROM staged_files")
        .fetch_all(cluster.database().pool())
        .await
        .expect("listing staged files");
    // A failed upload keeps its staged NAR until the reaper comes.
    let waiting: BTreeSet<String> = waiting
        .into_iter()
        .chain(
            uploads
                .iter()
                .filter(|upload| upload.phase == UploadPhase::Failed)
                .map(|upload| upload.staged_key.clone()),
        )
        .collect();
    let staged: BTreeSet<String> = cluster.object_keys("staging/").await.into_iter().collect();
    assert!(
        staged.is_subset(&waiting),
        "staged NARs no upload or staged file accounts for: {:?}",
        staged.difference(&waiting).collect::<Vec<_>>()
    );

    let dead_letters = cluster.queue_length(CHUNK_DEAD_LETTER_QUEUE).await
        + cluster.queue_length(COMPRESS_DEAD_LETTER_QUEUE).await;
    if failed_paths.is_empty() {
        assert_eq!(dead_letters, 0, "nothing was dead-lettered");
    }
    uploads
}
