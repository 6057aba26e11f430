//! An 8 GiB NAR end to end, on local storage and on Garage: pushed with
//! `nix copy`, substituted by Nix (which checks its NAR hash) and verified
//! with `nix store verify`, then collected by GC until neither the
//! database nor storage holds anything of it.
//!
//! The NAR is one regular file of zeros: generated, never written whole to
//! disk anywhere (this machine's disk has less room than the NAR). The
//! source is a `file://` binary cache holding it zstd-compressed (Nix 2.8
//! cannot register a sparse file in a chroot store: `--register-validity`
//! looks for the path outside the chroot), Nix recompresses it for the
//! upload (so its client buffers kilobytes, not gigabytes), local storage
//! stages it with holes, Garage deduplicates its blocks, and the
//! substitution goes to another `file://` cache, zstd-compressed (local
//! storage is on tmpfs: see the test). Every
//! byte still goes through every hash and every check on the way.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use reqwest::StatusCode;

use larder_api::duration::HumanDuration;
use larder_config::{GcConfig, IngestConfig, StorageConfig};
use larder_db::{Backend, CacheUpdate, Timestamp};
use larder_nix::nar::NarEncoder;
use larder_nix::narinfo::{Compression, NarInfo};
use larder_nix::{NarHash, Sha256Hash, StoreDir, StorePath, StorePathHash};
use larder_storage::{ObjectKey, Storage};
use tests::nix::{NixEnv, NixVersion};
use tests::server::{TestServer, TestServerOptions};
use tests::services::{self, S3Settings};

use crate::server::push::{blocking, hash_of, public_key_of};
use crate::server::HOUR;

/// The NAR's file: 8 GiB of zeros.
const FILE_SIZE: u64 = 8 << 30;

/// A `Write` that hashes what goes through it into a zstd encoder.
struct HashingEncoder<W: Write> {
    hasher: sha2::Sha256,
    size: u64,
    encoder: zstd::stream::write::Encoder<'static, W>,
}

impl<W: Write> Write for HashingEncoder<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let written = self.encoder.write(bytes)?;
        self.hasher.update(&bytes[..written]);
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.encoder.flush()
    }
}

/// Writes a `file://` binary cache at `dir` holding one path, a regular
/// file of [`FILE_SIZE`] zeros, and returns the path.
fn zeros_binary_cache(dir: &std::path::Path) -> String {
    use sha2::Digest;
    std::fs::create_dir_all(dir.join("nar")).expect("creating the source cache");
    std::fs::write(
        dir.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
    )
    .expect("writing nix-cache-info");
    let compressed = dir.join("nar/zeros.nar.zst");
    let file = std::io::BufWriter::new(std::fs::File::create(&compressed).expect("a NAR file"));
    let mut nar = NarEncoder::new(HashingEncoder {
        hasher: sha2::Sha256::new(),
        size: 0,
        encoder: zstd::stream::write::Encoder::new(file, 3).expect("a zstd encoder"),
    })
    .expect("a NAR encoder");
    nar.regular_from_reader(false, FILE_SIZE, &mut std::io::repeat(0))
        .expect("writing the NAR");
    let out = nar.finish().expect("finishing the NAR");
    let nar_hash = NarHash::from(Sha256Hash::from_bytes(out.hasher.finalize().into()));
    let nar_size = out.size;
    out.encoder
        .finish()
        .expect("finishing zstd")
        .flush()
        .expect("flushing the NAR file");
    let bytes = std::fs::read(&compressed).expect("reading the NAR file back");
    let file_hash = Sha256Hash::digest(&bytes);
    let url = format!("nar/{}.nar.zst", file_hash.to_base32());
    std::fs::rename(&compressed, dir.join(&url)).expect("naming the NAR file");
    let hash = StorePathHash::from_bytes(&rand::random::<[u8; 20]>());
    let store_dir = StoreDir::default();
    let store_path: StorePath = format!("{hash}-eight-gib-of-zeros")
        .parse()
        .expect("a store path");
    let narinfo = NarInfo {
        store_path: store_path.clone(),
        url,
        compression: Compression::Zstd,
        file_hash: Some(file_hash),
        file_size: Some(bytes.len() as u64),
        nar_hash,
        nar_size,
        references: Default::default(),
        deriver: None,
        system: None,
        signatures: Default::default(),
        ca: None,
    };
    std::fs::write(
        dir.join(format!("{hash}.narinfo")),
        narinfo.render(&store_dir),
    )
    .expect("writing the narinfo");
    store_path.to_full_path(&store_dir)
}

/// Every object under `prefix` in `storage`.
async fn objects_under(storage: &dyn Storage, prefix: &str) -> Vec<String> {
    storage
        .list(&ObjectKey::new(prefix).expect("a prefix"))
        .map_ok(|object| object.key.to_string())
        .try_collect()
        .await
        .expect("listing storage")
}

async fn an_eight_gib_nar_is_pushed_substituted_verified_and_collected(
    backend: Backend,
    on_garage: bool,
    version: NixVersion,
) {
    // Local storage on tmpfs: the door reserves room by a NAR's size
    // before its bytes arrive (it cannot know they are zeros), and the
    // root disk here has less free than 8 GiB; tmpfs keeps holes as holes.
    let shm = tempfile::Builder::new()
        .prefix("larder-eight-gib-")
        .tempdir_in("/dev/shm")
        .expect("a directory on /dev/shm");
    let storage_config = if on_garage {
        let prefix = format!("{}/", services::unique_name("eight-gib"));
        StorageConfig::S3(S3Settings::from_env().storage_config(&prefix))
    } else {
        StorageConfig::Local {
            path: shm.path().join("storage"),
        }
    };
    let server = TestServer::start(TestServerOptions {
        backend,
        ingest: IngestConfig {
            // Nix compresses 8 GiB of zeros some 30,000-fold; the default
            // ratio refuses that (as it should for an upload from a
            // stranger), this test's pusher is trusted.
            max_decompression_ratio: u32::MAX,
            // A push answers once its upload is acknowledged; the test
            // then waits for the path itself.
            wait_for_visible: HumanDuration::from_secs(0),
            ..IngestConfig::default()
        },
        edit_config: Some(Arc::new(move |config: &mut larder_config::ServerConfig| {
            config.storage = storage_config.clone();
        })),
        ..TestServerOptions::default()
    })
    .await;
    let storage = larder_storage::open(&server.config().storage)
        .await
        .expect("the server's storage");
    let cache = "eight-gib";
    server.create_cache(cache, false).await;
    let token = server
        .mint(
            "pusher",
            HOUR,
            &[(
                cache,
                &[
                    larder_token::Permission::Pull,
                    larder_token::Permission::Push,
                ],
            )],
        )
        .await;
    let public_key = public_key_of(&server, &token, cache).await;
    let push_url = format!("{}?compression=zstd", server.cache_url(cache));
    let cache_url = server.cache_url(cache);

    let (env, path) = {
        let token = token.clone();
        blocking(move || {
            let mut env = NixEnv::with_version(version).expect("a Nix environment");
            env.use_netrc("127.0.0.1", &token).expect("a netrc");
            let source = env.path("source-cache");
            let path = zeros_binary_cache(&source);
            let from = format!("file://{}", source.display());
            env.run(
                "nix",
                &[
                    "copy",
                    "--no-check-sigs",
                    "--from",
                    &from,
                    "--to",
                    &push_url,
                    &path,
                ],
            )
            .expect("nix copy of the 8 GiB NAR to the server");
            (env, path)
        })
        .await
    };

    // Visible once the pipeline has cut and stored it (a hang guard).
    let narinfo_url = server.url_of(&format!("/{cache}/{}.narinfo", hash_of(&path)));
    let narinfo_status = || async {
        server
            .http()
            .get(&narinfo_url)
            .bearer_auth(&token)
            .send()
            .await
            .expect("GET narinfo")
            .status()
    };
    let mut visible = false;
    for _ in 0..1800 {
        if narinfo_status().await == StatusCode::OK {
            visible = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(visible, "the 8 GiB path was not visible within 15 minutes");
    let cache_row = server
        .database()
        .cache_by_name(&cache.parse().expect("a cache name"))
        .await
        .expect("reading the cache")
        .expect("the cache exists");
    let nar = server
        .database()
        .find_object(
            cache_row.id,
            &StorePathHash::parse(&hash_of(&path)).expect("a path hash"),
        )
        .await
        .expect("finding the path")
        .expect("served")
        .nar;
    assert_eq!(
        nar.nar_size,
        FILE_SIZE + 112,
        "a regular file's NAR framing"
    );
    assert!(
        u64::from(nar.n_chunks) >= FILE_SIZE / (256 << 10),
        "{} chunk entries",
        nar.n_chunks
    );

    let env = {
        let (cache_url, public_key, path) = (cache_url.clone(), public_key.clone(), path.clone());
        blocking(move || {
            let mut env = env;
            env.add_config("narinfo-cache-positive-ttl", "0");
            let destination = format!(
                "file://{}?compression=zstd",
                env.path("substituted").display()
            );
            env.run(
                "nix",
                &[
                    "copy",
                    "--from",
                    &cache_url,
                    "--to",
                    &destination,
                    "--option",
                    "trusted-public-keys",
                    &public_key,
                    &path,
                ],
            )
            .expect("substituting the 8 GiB path");
            let verified = env
                .store_verify(&cache_url, &public_key, std::slice::from_ref(&path))
                .expect("nix store verify");
            assert!(verified.status.success(), "{verified:?}");
            env
        })
        .await
    };
    drop(env);

    // Expired: an hour of retention, collected as if two hours from now.
    server
        .database()
        .update_cache(
            &cache.parse().expect("a cache name"),
            &CacheUpdate {
                retention_period: Some(Some(HOUR)),
                ..CacheUpdate::default()
            },
        )
        .await
        .expect("setting a retention period");
    let later = Timestamp::now().saturating_add(2 * HOUR);
    let gc = GcConfig {
        orphan_grace: HumanDuration::from_secs(0),
        ..GcConfig::default()
    };
    let report = gc_scheduler::gc::collect_garbage(server.database(), &*storage, &gc, later)
        .await
        .expect("collecting");
    assert_eq!((report.objects, report.nars), (1, 1), "{report:?}");
    assert!(report.chunks >= 1, "{report:?}");
    for table in ["nars", "chunks", "nar_chunks", "objects"] {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(server.database().pool())
            .await
            .expect("counting rows");
        assert_eq!(rows, 0, "{table}");
    }
    for prefix in ["chunks", "packs", "staging"] {
        assert_eq!(
            objects_under(&*storage, prefix).await,
            Vec::<String>::new(),
            "storage under {prefix}/"
        );
    }
    for _ in 0..300 {
        if narinfo_status().await == StatusCode::NOT_FOUND {
            server.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the collected path is still served");
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn heavy_sqlite_local_an_eight_gib_nar_is_pushed_substituted_verified_and_collected(version: NixVersion) {
        an_eight_gib_nar_is_pushed_substituted_verified_and_collected(Backend::Sqlite, false, version).await;
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn heavy_postgres_garage_an_eight_gib_nar_is_pushed_substituted_verified_and_collected(version: NixVersion) {
        an_eight_gib_nar_is_pushed_substituted_verified_and_collected(Backend::Postgres, true, version).await;
    }
}
