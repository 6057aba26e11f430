//! Seeds an `ingest-api` server's database and storage for the serving
//! benchmark (`ops/bench-serve.sh`), then prints what the script needs.
//!
//! The server runs as its own process so that its peak memory can be read
//! from `/proc`; this program only writes, through the store layer, into
//! the SQLite database and storage directory that the server's config
//! names, before the server starts. Paths are written the way
//! [`tests::server::TestServer::seed_path`] writes them: the NAR cut into
//! [`tests::server::SEED_CHUNK_SIZE`] slices, each one zstd frame under
//! `chunks/<sha256 hex>.zst`, then the NAR, chunk and object rows. (Seeding
//! through the push pipeline instead would also measure FastCDC's uneven
//! chunk sizes; the serving figures so far are for fixed 64 KiB chunks.)
//!
//! It writes two paths into a private cache:
//! - a **small** one whose narinfo the benchmark requests over and over:
//!   the NAR of a real directory (by default `/usr/lib/python3.11`) with a
//!   few references, a deriver and an upstream signature, as a narinfo
//!   from cache.nixos.org has;
//! - a **large** one whose NAR the benchmark downloads: a flat directory
//!   holding the first regular files (in sorted walk order) of a real tree
//!   (by default `/usr/lib/x86_64-linux-gnu`, binaries and text, so the
//!   data compresses unevenly) up to a size cap, i.e. thousands of chunks.
//!
//! ```text
//! bench_serve --config DIR/server.toml [--cache NAME]
//!             [--narinfo-source DIR] [--nar-source DIR] [--nar-mib N]
//! ```
//!
//! Output on stdout: `KEY=VALUE` lines (no spaces, nothing to quote);
//! progress on stderr.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use larder_api::cache_name::CacheName;
use larder_config::StorageConfig;
use larder_db::{Cache, CacheKeypair, Database, Nar, NewCache, ObjectMetadata, Timestamp};
use larder_nix::nar::NarEncoder;
use larder_nix::signing::fingerprint;
use larder_nix::{NarHash, SecretKey, Sha256Hash, StorePath, StorePathHash};
use larder_storage::LocalStorage;

/// The store path names of the two seeded paths.
const SMALL_NAME: &str = "python3-3.11.2";
const LARGE_NAME: &str = "bench-large-nar";

/// Any error, as a message: a benchmark driver only reports and exits.
type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

struct Options {
    config: PathBuf,
    cache: String,
    narinfo_source: PathBuf,
    nar_source: PathBuf,
    nar_bytes: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_serve --config DIR/server.toml [--cache NAME] \
         [--narinfo-source DIR] [--nar-source DIR] [--nar-mib N]"
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let mut options = Options {
        config: PathBuf::new(),
        cache: "bench".to_owned(),
        narinfo_source: PathBuf::from("/usr/lib/python3.11"),
        nar_source: PathBuf::from("/usr/lib/x86_64-linux-gnu"),
        nar_bytes: 320 << 20,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else { usage() };
        match flag.as_str() {
            "--config" => options.config = value.into(),
            "--cache" => options.cache = value,
            "--narinfo-source" => options.narinfo_source = value.into(),
            "--nar-source" => options.nar_source = value.into(),
            "--nar-mib" => match value.parse::<u64>() {
                Ok(mib) if mib > 0 => options.nar_bytes = mib << 20,
                _ => usage(),
            },
            _ => usage(),
        }
    }
    if options.config.as_os_str().is_empty() {
        usage();
    }
    options
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(parse_options()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench_serve: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> Result<()> {
    let config = ingest_api::first_start::load_existing(&options.config)?;
    // Local is the only backend until S3 (issue 5); the `else` is for then.
    #[allow(irrefutable_let_patterns)]
    let StorageConfig::Local { path: storage_dir } = &config.storage
    else {
        return Err(
            "the benchmark seeds a local storage directory; this config names another backend"
                .into(),
        );
    };
    let database = Database::connect(config.database.url.expose()).await?;
    database.migrate().await?;
    let storage = LocalStorage::open(storage_dir).await?;
    let cache = open_cache(&database, &options.cache).await?;

    // The small path: a real directory's NAR, with the metadata a path
    // from cache.nixos.org carries.
    let started = Instant::now();
    let small_nar = larder_nix::nar::dump_path(&options.narinfo_source, Vec::new())?;
    let small_hash = derived_path_hash(SMALL_NAME, &small_nar);
    let references: Vec<StorePath> = std::iter::once(base_name(&small_hash, SMALL_NAME))
        .chain(
            [
                "glibc-2.37-8",
                "openssl-3.0.10",
                "zlib-1.3",
                "expat-2.5.0",
                "libffi-3.4.4",
            ]
            .iter()
            .map(|name| base_name(&derived_path_hash(name, name.as_bytes()), name)),
        )
        .map(|base| StorePath::from_base_name(&base))
        .collect::<std::result::Result<_, _>>()?;
    let deriver_name = format!("{SMALL_NAME}.drv");
    let deriver = base_name(&derived_path_hash(&deriver_name, &small_nar), &deriver_name);
    let small_metadata = ObjectMetadata {
        store_path: full_path(&cache, &small_hash, SMALL_NAME),
        references: references.iter().map(StorePath::to_base_name).collect(),
        deriver: Some(deriver),
        system: Some("x86_64-linux".to_owned()),
        sigs: vec![upstream_signature(
            &cache,
            &small_hash,
            SMALL_NAME,
            &small_nar,
            &references,
        )?],
        ca: None,
    };
    let small = seed_nar(
        &database,
        &storage,
        &cache,
        small_hash,
        small_metadata,
        &small_nar,
    )
    .await?;
    eprintln!(
        "bench_serve: seeded {} ({} bytes of NAR, {} chunks) in {:.1?}",
        options.narinfo_source.display(),
        small.nar.nar_size,
        small.chunks,
        started.elapsed()
    );

    // The large path: real files, flattened, up to the size cap.
    let started = Instant::now();
    let (large_nar, files) = flat_nar_of_files(&options.nar_source, options.nar_bytes)?;
    let large_hash = derived_path_hash(LARGE_NAME, &large_nar);
    let large_metadata = ObjectMetadata {
        store_path: full_path(&cache, &large_hash, LARGE_NAME),
        references: Vec::new(),
        deriver: None,
        system: Some("x86_64-linux".to_owned()),
        sigs: Vec::new(),
        ca: None,
    };
    let large = seed_nar(
        &database,
        &storage,
        &cache,
        large_hash,
        large_metadata,
        &large_nar,
    )
    .await?;
    eprintln!(
        "bench_serve: seeded {files} files of {} ({} bytes of NAR, {} bytes compressed, {} chunks) in {:.1?}",
        options.nar_source.display(),
        large.nar.nar_size,
        large.nar.file_size.unwrap_or(0),
        large.chunks,
        started.elapsed()
    );
    database.close().await;

    let nar_url = |nar: &Nar| format!("nar/{}.nar.zst", nar.nar_hash.sha256().to_base32());
    let lines = [
        ("CACHE", cache.name.to_string()),
        ("NARINFO_HASH", small_hash.as_str().to_owned()),
        ("NARINFO_NAR_SIZE", small.nar.nar_size.to_string()),
        ("NARINFO_CHUNKS", small.chunks.to_string()),
        ("LARGE_HASH", large_hash.as_str().to_owned()),
        ("LARGE_NAR_URL", nar_url(&large.nar)),
        ("LARGE_NAR_SIZE", large.nar.nar_size.to_string()),
        (
            "LARGE_FILE_SIZE",
            large.nar.file_size.unwrap_or(0).to_string(),
        ),
        ("LARGE_CHUNKS", large.chunks.to_string()),
        ("LARGE_FILES", files.to_string()),
        ("LARGE_NAR_SHA256_HEX", large.nar.nar_hash.sha256().to_hex()),
    ];
    for (key, value) in lines {
        println!("{key}={value}");
    }
    Ok(())
}

/// The benchmark's private cache, created with a generated key unless it
/// exists already.
async fn open_cache(database: &Database, name: &str) -> Result<Cache> {
    let cache_name: CacheName = name.parse()?;
    if let Some(cache) = database.cache_by_name(&cache_name).await? {
        return Ok(cache);
    }
    let key = SecretKey::generate(&format!("{name}-1"))?;
    let new = NewCache::new(cache_name, CacheKeypair::new(key.to_nix_secret_string()));
    Ok(database.create_cache(&new, Timestamp::now()).await?)
}

/// A store-path hash derived from a name and some bytes: stable across
/// runs with the same data, and distinct per path.
fn derived_path_hash(name: &str, data: &[u8]) -> StorePathHash {
    let mut input = name.as_bytes().to_vec();
    input.extend_from_slice(Sha256Hash::digest(data).as_bytes());
    let digest = Sha256Hash::digest(&input);
    let mut bytes = [0u8; 20];
    bytes.copy_from_slice(&digest.as_bytes()[..20]);
    StorePathHash::from_bytes(&bytes)
}

fn base_name(hash: &StorePathHash, name: &str) -> String {
    format!("{}-{name}", hash.as_str())
}

fn full_path(cache: &Cache, hash: &StorePathHash, name: &str) -> String {
    format!("{}/{}", cache.store_dir.as_str(), base_name(hash, name))
}

/// A signature over the path's fingerprint by a throwaway "upstream" key,
/// standing in for the cache.nixos.org signature a pushed path keeps.
fn upstream_signature(
    cache: &Cache,
    hash: &StorePathHash,
    name: &str,
    nar: &[u8],
    references: &[StorePath],
) -> Result<String> {
    let key = SecretKey::generate("upstream-bench-1")?;
    let store_path = StorePath::from_base_name(&base_name(hash, name))?;
    let nar_hash = NarHash::from(Sha256Hash::digest(nar));
    let references: BTreeSet<&StorePath> = references.iter().collect();
    let message = fingerprint(
        &cache.store_dir,
        &store_path,
        &nar_hash,
        nar.len() as u64,
        references,
    );
    Ok(key.sign(message.as_bytes()).to_string())
}

/// The NAR of a directory holding, flattened and numbered, the regular
/// files found under `source` (walked in sorted order, symlinks not
/// followed), up to `cap` bytes of contents; with how many files it holds.
fn flat_nar_of_files(source: &Path, cap: u64) -> Result<(Vec<u8>, usize)> {
    let mut files = Vec::new();
    let mut total = 0u64;
    collect_files(source, cap, &mut total, &mut files)?;
    if files.is_empty() {
        return Err(format!("no readable regular files under {}", source.display()).into());
    }
    let mut encoder = NarEncoder::new(Vec::with_capacity(usize::try_from(total)? + (1 << 20)))?;
    encoder.begin_directory()?;
    for (index, path) in files.iter().enumerate() {
        // Zero-padded numbers keep the entries in NAR (bytewise) order;
        // the file name after them is only for whoever lists the NAR.
        let file_name = path
            .file_name()
            .map(|name| name.to_string_lossy())
            .unwrap_or_default();
        let file_name: String = file_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || ".-_+".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        encoder.entry(format!("{index:06}-{file_name}").as_bytes())?;
        let contents = std::fs::read(path)?;
        encoder.regular(false, &contents)?;
    }
    encoder.end_directory()?;
    Ok((encoder.finish()?, files.len()))
}

fn collect_files(dir: &Path, cap: u64, total: &mut u64, files: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    entries.sort();
    for path in entries {
        if *total >= cap {
            return Ok(());
        }
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if metadata.is_dir() {
            collect_files(&path, cap, total, files)?;
        } else if metadata.is_file()
            && *total + metadata.len() <= cap
            && std::fs::File::open(&path).is_ok()
        {
            // A file that would overshoot the cap is left out; smaller
            // ones after it may still fit.
            *total += metadata.len();
            files.push(path);
        }
    }
    Ok(())
}

/// What [`seed_nar`] wrote.
struct Seeded {
    nar: Nar,
    chunks: usize,
}

/// Writes a store path into `cache` through [`tests::server::seed_nar`],
/// the same way the test harness seeds its paths.
async fn seed_nar(
    database: &Database,
    storage: &LocalStorage,
    cache: &Cache,
    store_path_hash: StorePathHash,
    metadata: ObjectMetadata,
    nar: &[u8],
) -> Result<Seeded> {
    let (nar, chunk_keys) = tests::server::seed_nar(
        database,
        storage,
        cache.id,
        store_path_hash,
        metadata,
        "bench-seed",
        nar,
    )
    .await?;
    Ok(Seeded {
        nar,
        chunks: chunk_keys.len(),
    })
}
