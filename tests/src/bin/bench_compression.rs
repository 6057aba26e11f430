//! The compression curve for `ops/bench-compression.sh`: how many bytes
//! Larder would store for a set of NARs, and how fast one core compresses
//! them, at each zstd level, with chunks cut and compressed exactly as the
//! pipeline does (FastCDC at `larder_db::chunking`'s sizes, one chunk below
//! 64 KiB, every distinct chunk once, one zstd frame per chunk through a
//! reused context).
//!
//! ```text
//! bench_compression LEVELS NAR_FILE...
//! ```
//!
//! LEVELS is a comma-separated list (`1,3,5`). Prints `UNIQUE_BYTES=…`
//! (the distinct chunks' bytes), then per level `LEVEL_<n>_BYTES=…` (the
//! frames' bytes) and `LEVEL_<n>_SECONDS=…` (one thread's CPU time for
//! them); progress goes to stderr.

use std::collections::HashSet;

use fastcdc::v2020::StreamCDC;

use larder_db::chunking::{AVG_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, ONE_CHUNK_BELOW};
use larder_nix::Sha256Hash;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Every distinct chunk of the files, in the order first cut.
fn distinct_chunks(files: &[String]) -> Result<Vec<Vec<u8>>> {
    let mut seen = HashSet::new();
    let mut chunks = Vec::new();
    let mut keep = |data: Vec<u8>| {
        if seen.insert(Sha256Hash::digest(&data)) {
            chunks.push(data);
        }
    };
    for file in files {
        let size = std::fs::metadata(file)?.len();
        if size < ONE_CHUNK_BELOW {
            keep(std::fs::read(file)?);
            continue;
        }
        let reader = std::fs::File::open(file)?;
        for chunk in StreamCDC::new(reader, MIN_CHUNK_SIZE, AVG_CHUNK_SIZE, MAX_CHUNK_SIZE) {
            keep(chunk?.data);
        }
    }
    Ok(chunks)
}

/// This thread's CPU time so far, in seconds (the first field of
/// `/proc/thread-self/schedstat`, in nanoseconds): unlike wall time, other
/// load on the machine does not inflate it.
fn thread_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let nanos: u64 = stat
        .split_whitespace()
        .next()
        .ok_or("an empty /proc/thread-self/schedstat")?
        .parse()?;
    Ok(nanos as f64 / 1e9)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [levels, files @ ..] = args.as_slice() else {
        return Err("usage: bench_compression LEVELS NAR_FILE...".into());
    };
    if files.is_empty() {
        return Err("usage: bench_compression LEVELS NAR_FILE...".into());
    }
    let levels: Vec<i32> = levels
        .split(',')
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()?;
    let chunks = distinct_chunks(files)?;
    let unique: usize = chunks.iter().map(Vec::len).sum();
    eprintln!(
        "bench_compression: {} distinct chunks, {unique} bytes",
        chunks.len()
    );
    println!("UNIQUE_BYTES={unique}");
    for level in levels {
        let mut compressor = zstd::bulk::Compressor::new(level)?;
        let started = thread_cpu_seconds()?;
        let mut stored = 0;
        for chunk in &chunks {
            stored += compressor.compress(chunk)?.len();
        }
        let seconds = thread_cpu_seconds()? - started;
        eprintln!("bench_compression: level {level}: {stored} bytes in {seconds:.2} s");
        println!("LEVEL_{level}_BYTES={stored}");
        println!("LEVEL_{level}_SECONDS={seconds:.3}");
    }
    Ok(())
}
