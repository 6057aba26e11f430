//! Cache statistics (`/_api/v1/cache-stats`): after real pushes into two
//! caches that share a NAR, every figure matches sums computed apart from
//! the server's own, from the NAR bytes sent and the pack files that each
//! push added to storage; and who may read which figures.

use std::path::Path;

use larder_api::v1::{CacheStats, ServerStats};
use larder_db::Backend;
use larder_token::Permission;
use reqwest::StatusCode;
use tests::server::{pseudo_random, TestServer};

use super::push::push_visible;
use super::{api_error, fake_store_path, file_nar, get, ok_json, HOUR};

/// The bytes of every pack file under `dir`.
fn pack_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|entry| {
            let entry = entry.expect("directory entry");
            let metadata = entry.metadata().expect("metadata");
            if metadata.is_dir() {
                pack_bytes(&entry.path())
            } else if entry.file_name().to_string_lossy().ends_with(".pack") {
                metadata.len()
            } else {
                0
            }
        })
        .sum()
}

/// Pushes a path holding `nar` into `cache` through `upload-path`, waiting
/// until it is visible; returns the pack bytes the push added to storage.
async fn push(server: &TestServer, token: &str, cache: &str, name: &str, nar: &[u8]) -> u64 {
    let packs = server.dir().join("storage/packs");
    let before = pack_bytes(&packs);
    push_visible(server, token, cache, &fake_store_path(name), nar).await;
    pack_bytes(&packs) - before
}

fn assert_ratio(ratio: Option<f64>, nar_bytes: u64, stored_bytes: u64) {
    let ratio = ratio.expect("a ratio once something is stored");
    let expected = nar_bytes as f64 / stored_bytes as f64;
    assert!((ratio - expected).abs() < 1e-9, "{ratio} vs {expected}");
}

async fn figures_match_independent_sums(backend: Backend) {
    let server = TestServer::on(backend).await;
    for cache in ["alpha", "beta"] {
        server.create_cache(cache, false).await;
    }
    let alpha = server
        .mint(
            "alpha",
            HOUR,
            &[("alpha", &[Permission::Pull, Permission::Push])],
        )
        .await;
    let beta = server
        .mint("beta", HOUR, &[("beta", &[Permission::Push])])
        .await;
    let operator = server.root_token().await;

    // Random bytes, so that nothing is shared but the NAR pushed twice; a
    // small NAR (stored by the chunker itself) and a large one (cut into
    // compress jobs).
    let small = file_nar(&pseudo_random(300 << 10, 1));
    let large = file_nar(&pseudo_random(3 << 20, 2));
    let other = file_nar(&pseudo_random(150 << 10, 3));
    let small_packs = push(&server, &alpha, "alpha", "small", &small).await;
    let large_packs = push(&server, &alpha, "alpha", "large", &large).await;
    let large_again = push(&server, &beta, "beta", "large", &large).await;
    let other_packs = push(&server, &beta, "beta", "other", &other).await;
    assert!(small_packs > 0 && large_packs > 0 && other_packs > 0);
    assert_eq!(large_again, 0, "a stored NAR is not stored again");

    let stats: CacheStats =
        ok_json(get(&server, "/_api/v1/cache-stats/alpha", Some(&alpha)).await).await;
    assert_eq!(stats.cache, "alpha");
    assert_eq!(stats.paths, 2);
    let alpha_nars = (small.len() + large.len()) as u64;
    assert_eq!(stats.nar_bytes, alpha_nars);
    assert_eq!(stats.stored_bytes, small_packs + large_packs);
    assert_ratio(stats.dedup_ratio, alpha_nars, small_packs + large_packs);
    let now = larder_api::time::unix_seconds(std::time::SystemTime::now());
    let last_push = stats.last_push.expect("a last push");
    assert!(
        last_push <= now && last_push + 600 > now,
        "{last_push} vs {now}"
    );
    assert!(stats.last_access.is_some());

    // Beta counts the shared NAR in full: its figures do not tell that
    // alpha holds it too.
    let stats: CacheStats =
        ok_json(get(&server, "/_api/v1/cache-stats/beta", Some(&beta)).await).await;
    let beta_nars = (large.len() + other.len()) as u64;
    assert_eq!((stats.paths, stats.nar_bytes), (2, beta_nars));
    assert_eq!(stats.stored_bytes, large_packs + other_packs);

    let server_stats: ServerStats =
        ok_json(get(&server, "/_api/v1/cache-stats", Some(&operator)).await).await;
    let everything = small_packs + large_packs + other_packs;
    assert_eq!(server_stats.paths, 4);
    assert_eq!(server_stats.nar_bytes, alpha_nars + beta_nars);
    assert_eq!(server_stats.stored_bytes, everything);
    assert_eq!(server_stats.referenced_bytes, everything);
    assert_ratio(server_stats.dedup_ratio, alpha_nars + beta_nars, everything);
    let names = server_stats
        .caches
        .iter()
        .map(|cache| cache.stats.cache.as_str())
        .collect::<Vec<_>>();
    assert_eq!(names, ["alpha", "beta"]);
    for (cache, own) in server_stats.caches.iter().zip([small_packs, other_packs]) {
        assert_eq!(cache.stats.stored_bytes, own + large_packs, "{cache:?}");
        assert_eq!(cache.unique_bytes, own, "{cache:?}");
        assert_eq!(cache.shared_bytes, large_packs, "{cache:?}");
        // Half of the shared NAR each, give or take the rounding of each
        // cache's share to whole bytes.
        let attributed = own as f64 + large_packs as f64 / 2.0;
        assert!(
            (cache.attributed_bytes as f64 - attributed).abs() <= 1.0,
            "{cache:?}"
        );
    }
    let attributed: u64 = server_stats
        .caches
        .iter()
        .map(|cache| cache.attributed_bytes)
        .sum();
    assert!(
        attributed.abs_diff(everything) <= 2,
        "{attributed} vs {everything}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_match_independent_sums_on_sqlite() {
    figures_match_independent_sums(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_match_independent_sums_on_postgres() {
    figures_match_independent_sums(Backend::Postgres).await;
}

/// A cache's figures are for its tenants (any permission on it), the
/// server's for an operator; nobody else learns more than that the cache
/// is hidden from them.
#[tokio::test]
async fn statistics_are_for_tenants_and_operators_only() {
    let server = TestServer::sqlite().await;
    server.create_cache("private", false).await;
    server.create_cache("open", true).await;
    let puller = server
        .mint("puller", HOUR, &[("private", &[Permission::Pull])])
        .await;
    let stranger = server
        .mint("stranger", HOUR, &[("elsewhere", &[Permission::Pull])])
        .await;
    // Every permission but the operator's on every cache.
    let tenant_admin = server
        .mint(
            "almost",
            HOUR,
            &[(
                "*",
                &[Permission::Pull, Permission::Push, Permission::ManageTokens],
            )],
        )
        .await;

    let stats: CacheStats =
        ok_json(get(&server, "/_api/v1/cache-stats/private", Some(&puller)).await).await;
    assert_eq!(
        (stats.paths, stats.stored_bytes, stats.dedup_ratio),
        (0, 0, None)
    );
    assert_eq!((stats.last_push, stats.last_access), (None, None));

    for (path, token, status, name) in [
        (
            "/_api/v1/cache-stats/private",
            None,
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
        ),
        (
            "/_api/v1/cache-stats/private",
            Some(&stranger),
            StatusCode::NOT_FOUND,
            "NoSuchCache",
        ),
        (
            "/_api/v1/cache-stats/missing",
            Some(&stranger),
            StatusCode::NOT_FOUND,
            "NoSuchCache",
        ),
        // Public: anyone may know it exists, not how big it is.
        (
            "/_api/v1/cache-stats/open",
            None,
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
        ),
        (
            "/_api/v1/cache-stats/open",
            Some(&stranger),
            StatusCode::FORBIDDEN,
            "Forbidden",
        ),
        (
            "/_api/v1/cache-stats/-bad",
            Some(&stranger),
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
        (
            "/_api/v1/cache-stats",
            None,
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
        ),
        (
            "/_api/v1/cache-stats",
            Some(&tenant_admin),
            StatusCode::FORBIDDEN,
            "Forbidden",
        ),
    ] {
        let (error, _) =
            api_error(get(&server, path, token.map(String::as_str)).await, status).await;
        assert_eq!(
            error.error, name,
            "{path} with {token:?}: {}",
            error.message
        );
    }
}
