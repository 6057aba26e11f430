//! Pushes through a running `ingest-api` for the push benchmark
//! (`ops/bench-push.sh`) and prints how long each push took until its
//! paths were visible.
//!
//! Every push goes through Attic's `upload-path` endpoint, the way `larder
//! push` and Attic's client send it: the uncompressed NAR as the body, the
//! path's metadata in `X-Attic-Nar-Info`. The server answers once the path
//! is visible (it waits up to its `ingest.wait-for-visible`); should it
//! answer earlier, with the upload still in flight, this program polls the
//! upload's status until it is `done`, so each figure always spans "request
//! start until visible".
//!
//! ```text
//! bench_push --url URL --token TOKEN --cache NAME large NAR_FILE...
//! bench_push --url URL --token TOKEN --cache NAME small COUNT JOBS SOURCE_DIR
//! bench_push --url URL --token TOKEN --cache NAME door FILE
//! bench_push --url URL --token TOKEN --cache NAME download NAR_URL COUNT
//! bench_push make-nar OUT SOURCE_DIR MIB
//! bench_push seed-packed CONFIG CACHE SOURCE_DIR MIB PACK_MIB
//! ```
//!
//! `large` pushes each NAR file as one path, one after the other, and
//! prints `LARGE_SECONDS_<i>=…` per file. `small` makes COUNT small paths
//! (NARs of 10–500 KiB of real file contents taken from SOURCE_DIR, so they
//! compress like real data) and pushes them with JOBS requests in flight,
//! printing `SMALL_SECONDS=…` and `SMALL_BYTES=…` (the NAR bytes pushed).
//! `door` measures the door alone: it pushes a NAR holding FILE's bytes as
//! one regular file (so it is new to the server) with `X-Larder-Wait: 0`,
//! which the server answers once the NAR is verified and spooled, and
//! prints `DOOR_SECONDS=…` and `DOOR_BYTES=…` (the NAR's size).
//! `large` also prints each NAR's URL relative to its cache,
//! `LARGE_NAR_URL_<i>=nar/….nar.zst`. `make-nar` writes to OUT a NAR of one
//! regular file holding the first MIB MiB of the regular files under
//! SOURCE_DIR (real data, which compresses as real data does), and
//! `download` fetches NAR_URL (relative to the cache) COUNT times, one after
//! the other, printing `DOWNLOAD_FIRST_BYTE_MS_<i>=…` (to the first byte
//! of the body, not of the head), `DOWNLOAD_BYTES_<i>=…` and
//! `DOWNLOAD_SECONDS_<i>=…`, for `ops/bench-s3.sh`. `seed-packed` writes
//! a NAR of one file (the line `packed`, then the first MIB MiB of the
//! regular files under SOURCE_DIR: the same data as `make-nar`'s, in
//! other chunks) as the path `bench-packed` of CACHE straight through the
//! store layer of the server whose config is CONFIG (its database and
//! storage, local or S3), cut into 64 KiB chunks whose frames are written
//! in pack objects of PACK_MIB MiB (the layout of issue #16's packs), and
//! prints `PACKED_NAR_URL=…` and `PACKED_NAR_SHA256=…`: a packed NAR to
//! read back before the push pipeline writes packs itself.
//! Output on stdout: `KEY=VALUE` lines; progress on stderr.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use larder_nix::Sha256Hash;
use tests::server::pseudo_random;

use tests::bench::{single_file_nar, Pusher, Result};

/// The smallest and largest small path, in bytes of file contents.
const SMALL_MIN: usize = 10 << 10;
const SMALL_MAX: usize = 500 << 10;

/// Up to `limit` bytes of regular files under `dir`, in sorted walk order.
fn real_bytes(dir: &Path, limit: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(limit);
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .collect();
        entries.sort();
        for path in entries.into_iter().rev() {
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                if let Ok(bytes) = std::fs::read(&path) {
                    out.extend_from_slice(&bytes[..bytes.len().min(limit - out.len())]);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
        }
    }
    Ok(out)
}

async fn push_large(pusher: &Pusher, files: &[PathBuf]) -> Result<()> {
    for (index, file) in files.iter().enumerate() {
        let nar = std::fs::read(file)?;
        let size = nar.len();
        let info = pusher.info(&format!("bench-large-{index}"), &nar);
        let url = format!("nar/{}.nar.zst", Sha256Hash::digest(&nar).to_base32());
        let started = Instant::now();
        pusher.push_as(&info, nar).await?;
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "bench_push: {} ({:.0} MiB) visible after {seconds:.2} s",
            file.display(),
            size as f64 / f64::from(1 << 20)
        );
        println!("LARGE_SECONDS_{index}={seconds:.3}");
        println!("LARGE_NAR_URL_{index}={url}");
    }
    Ok(())
}

async fn push_door(pusher: &Pusher, file: &Path) -> Result<()> {
    let nar = single_file_nar(&std::fs::read(file)?)?;
    let size = nar.len();
    let info = pusher.info("bench-door", &nar);
    let started = Instant::now();
    let (_, phase) = pusher.upload(&info, nar, Some("0")).await?;
    let seconds = started.elapsed().as_secs_f64();
    if phase.as_deref() == Some("failed") {
        return Err("the door push failed".into());
    }
    eprintln!(
        "bench_push: a NAR of {} ({:.0} MiB) acknowledged after {seconds:.2} s",
        file.display(),
        size as f64 / f64::from(1 << 20)
    );
    println!("DOOR_SECONDS={seconds:.3}");
    println!("DOOR_BYTES={size}");
    Ok(())
}

async fn push_small(pusher: Arc<Pusher>, count: usize, jobs: usize, source: &Path) -> Result<()> {
    let pool = real_bytes(source, 64 << 20)?;
    if pool.len() < SMALL_MAX {
        return Err(format!("{} holds too few bytes", source.display()).into());
    }
    // Sizes and offsets from a fixed pseudo-random sequence: reruns push
    // the same paths, and each run starts from a fresh server.
    let dice = pseudo_random(count * 16, 0x5eed);
    let mut nars = Vec::with_capacity(count);
    for index in 0..count {
        let word = |at: usize| u64::from_le_bytes(dice[at..at + 8].try_into().expect("8 bytes"));
        let size = SMALL_MIN + (word(index * 16) as usize) % (SMALL_MAX - SMALL_MIN);
        let offset = (word(index * 16 + 8) as usize) % (pool.len() - size);
        // The index up front makes every path's NAR distinct.
        let mut contents = format!("bench-small-{index}\n").into_bytes();
        contents.extend_from_slice(&pool[offset..offset + size]);
        nars.push((format!("bench-small-{index}"), single_file_nar(&contents)?));
    }
    let total_bytes: usize = nars.iter().map(|(_, nar)| nar.len()).sum();
    let queue = Arc::new(tokio::sync::Mutex::new(nars));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..jobs {
        let queue = queue.clone();
        let pusher = pusher.clone();
        workers.spawn(async move {
            loop {
                let next = queue.lock().await.pop();
                let Some((name, nar)) = next else {
                    return Ok::<(), tests::bench::Error>(());
                };
                pusher.push(&name, nar).await?;
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result??;
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "bench_push: {count} small paths ({:.1} MiB) visible after {seconds:.2} s",
        total_bytes as f64 / f64::from(1 << 20)
    );
    println!("SMALL_SECONDS={seconds:.3}");
    println!("SMALL_BYTES={total_bytes}");
    Ok(())
}

async fn seed_packed(config: &Path, cache: &str, nar: &[u8], pack_bytes: usize) -> Result<()> {
    let config = larder_config::ServerConfig::load(config)?;
    let database = larder_db::Database::connect(config.database.url.expose()).await?;
    let storage = larder_storage::open(&config.storage).await?;
    let cache = database
        .cache_by_name(&cache.parse()?)
        .await?
        .ok_or_else(|| format!("no cache {cache}"))?;
    let hash = tests::bench::store_path_hash_for("bench-packed");
    let store_path_hash = larder_nix::StorePathHash::parse(&hash)?;
    let metadata = larder_db::ObjectMetadata {
        store_path: format!("{}/{hash}-bench-packed", cache.store_dir.as_str()),
        references: Vec::new(),
        deriver: None,
        system: None,
        sigs: Vec::new(),
        ca: None,
    };
    let started = Instant::now();
    let (row, _) = tests::server::seed_packed_nar(
        &database,
        storage.as_ref(),
        cache.id,
        store_path_hash,
        metadata,
        "bench-push",
        nar,
        pack_bytes,
    )
    .await?;
    eprintln!(
        "bench_push: seeded {} chunks in packs of {} MiB in {:.1?}",
        row.n_chunks,
        pack_bytes >> 20,
        started.elapsed()
    );
    println!(
        "PACKED_NAR_URL=nar/{}.nar.zst",
        row.nar_hash.sha256().to_base32()
    );
    println!("PACKED_NAR_SHA256={}", row.nar_hash.sha256().to_hex());
    Ok(())
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_push --url URL --token TOKEN --cache NAME large NAR_FILE...\n       \
         bench_push --url URL --token TOKEN --cache NAME small COUNT JOBS SOURCE_DIR\n       \
         bench_push --url URL --token TOKEN --cache NAME door FILE\n       \
         bench_push --url URL --token TOKEN --cache NAME download NAR_URL COUNT\n       \
         bench_push make-nar OUT SOURCE_DIR MIB\n       \
         bench_push seed-packed CONFIG CACHE SOURCE_DIR MIB PACK_MIB"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> Result<()> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, out, source, mib] = &all[..] {
        if mode == "make-nar" {
            let Ok(mib) = mib.parse::<usize>() else {
                usage()
            };
            let contents = real_bytes(Path::new(source), mib << 20)?;
            if contents.len() < mib << 20 {
                return Err(format!("{source} holds fewer than {mib} MiB of files").into());
            }
            std::fs::write(out, single_file_nar(&contents)?)?;
            return Ok(());
        }
    }
    if let [mode, config, cache, source, mib, pack_mib] = &all[..] {
        if mode == "seed-packed" {
            let (Ok(mib), Ok(pack_mib)) = (mib.parse::<usize>(), pack_mib.parse::<usize>()) else {
                usage()
            };
            let mut contents = b"packed\n".to_vec();
            contents.extend(real_bytes(Path::new(source), mib << 20)?);
            let nar = single_file_nar(&contents)?;
            return seed_packed(Path::new(config), cache, &nar, pack_mib << 20).await;
        }
    }
    let mut args = all.into_iter();
    let (mut url, mut token, mut cache) = (None, None, None);
    let mut rest = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--url" => url = args.next(),
            "--token" => token = args.next(),
            "--cache" => cache = args.next(),
            _ => rest.push(arg),
        }
    }
    let (Some(url), Some(token), Some(cache)) = (url, token, cache) else {
        usage()
    };
    let pusher = Arc::new(Pusher::new(&url, &token, &cache)?);
    match rest.split_first() {
        Some((mode, files)) if mode == "large" && !files.is_empty() => {
            let files: Vec<PathBuf> = files.iter().map(PathBuf::from).collect();
            push_large(&pusher, &files).await
        }
        Some((mode, [count, jobs, source])) if mode == "small" => {
            let (Ok(count), Ok(jobs)) = (count.parse(), jobs.parse()) else {
                usage()
            };
            push_small(pusher, count, jobs, Path::new(source)).await
        }
        Some((mode, [file])) if mode == "door" => push_door(&pusher, Path::new(file)).await,
        Some((mode, [url, count])) if mode == "download" => {
            let Ok(count) = count.parse::<usize>() else {
                usage()
            };
            for index in 0..count {
                let (first_byte, bytes, total) = pusher.download(url).await?;
                println!(
                    "DOWNLOAD_FIRST_BYTE_MS_{index}={:.1}",
                    first_byte.as_secs_f64() * 1000.0
                );
                println!("DOWNLOAD_BYTES_{index}={bytes}");
                println!("DOWNLOAD_SECONDS_{index}={:.3}", total.as_secs_f64());
            }
            Ok(())
        }
        _ => usage(),
    }
}
