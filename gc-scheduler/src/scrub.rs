//! Scrubbing: every stored chunk read back by its recorded location,
//! decompressed and checked against its SHA-256, and what is damaged
//! withdrawn (`larder_service::integrity`; the rows' side is `larder_db`'s
//! `damage` module): its NARs stop being served in every cache until their
//! paths are pushed again, which stores the chunks anew.
//!
//! A pass ([`scrub`]) walks the objects that hold valid chunks in key
//! order, a page of keys at a time, [`OBJECTS_IN_FLIGHT`] objects at once.
//! Within an object, chunks whose frames are adjacent are read as one
//! ranged read of at most [`RUN_BYTES`] (a pack is a few reads, a per-chunk
//! object one), so that requests follow the bytes, not the chunk count.
//! Reads are paced to `[gc] scrub-bytes-per-second` on average, so that a
//! pass cannot starve serving; memory is bounded by the reads in flight.
//!
//! What counts as damage, and what does not:
//!
//! - a frame that does not decompress to exactly its chunk's size and hash:
//!   that chunk, at that location;
//! - an object missing, or shorter than its chunks' ranges: the chunks it
//!   lacks, as storage's own answer for its size says
//!   ([`larder_service::integrity::check_object`]);
//! - any other read failure (a timeout, a 5xx) is not: those chunks count
//!   as unreadable, and the next pass tries again.
//!
//! Concurrent work is safe: a chunk is marked only while it is still valid
//! at the location that was read, so chunks GC deleted or compaction moved
//! during the pass are left alone. The pass ends by withdrawing any valid
//! NAR that lists a chunk that is not stored
//! ([`Database::withdraw_incomplete_nars`]), which closes the one race the
//! marking's transaction cannot.
//!
//! One scrubber at a time: on PostgreSQL an advisory lock of its own (a
//! replica that cannot take it skips its pass), apart from GC's, so that a
//! long scrub does not hold up collection.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use larder_config::GcConfig;
use larder_db::{Chunk, DamagedChunk, Database};
use larder_nix::Sha256Hash;
use larder_service::integrity::{self, FoundBy};
use larder_service::metrics::larder;
use larder_storage::{adjacent_runs, ObjectKey, Storage};

use crate::gc::{GcError, GcLock};

/// The most bytes one ranged read of a scrub covers.
pub const RUN_BYTES: u64 = 8 << 20;

/// Objects scrubbed at once: enough to overlap an object store's latency,
/// few enough that memory stays at a few runs.
pub const OBJECTS_IN_FLIGHT: usize = 4;

/// Object keys read per database round trip.
const KEYS_PAGE: u32 = 256;

/// What one pass found. Counts are of this pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScrubReport {
    /// Objects holding valid chunks that the pass visited.
    pub objects: u64,
    /// Chunks read, decompressed and checked against their hash.
    pub chunks_checked: u64,
    /// Stored (compressed) bytes read.
    pub bytes_read: u64,
    /// Chunks found damaged and withdrawn.
    pub chunks_damaged: u64,
    /// NARs withdrawn, their chunks being damaged or not stored.
    pub nars_withdrawn: u64,
    /// Chunks that could not be read (storage failed to answer); not
    /// damage: the next pass tries again.
    pub chunks_unreadable: u64,
    pub duration: Duration,
}

impl ScrubReport {
    fn add(&mut self, other: &ScrubReport) {
        self.objects += other.objects;
        self.chunks_checked += other.chunks_checked;
        self.bytes_read += other.bytes_read;
        self.chunks_damaged += other.chunks_damaged;
        self.nars_withdrawn += other.nars_withdrawn;
        self.chunks_unreadable += other.chunks_unreadable;
    }

    /// Logs the pass (what it withdrew was logged as an error when found).
    fn log(&self) {
        tracing::info!(
            objects = self.objects,
            chunks_checked = self.chunks_checked,
            bytes_read = self.bytes_read,
            chunks_damaged = self.chunks_damaged,
            nars_withdrawn = self.nars_withdrawn,
            chunks_unreadable = self.chunks_unreadable,
            duration_ms = self.duration.as_millis() as u64,
            "scrub pass finished"
        );
    }
}

impl std::fmt::Display for ScrubReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "scrubbed: {} objects, {} chunks checked ({} bytes read), {} damaged chunks \
             withdrawn with {} NARs, {} chunks unreadable, in {} ms",
            self.objects,
            self.chunks_checked,
            self.bytes_read,
            self.chunks_damaged,
            self.nars_withdrawn,
            self.chunks_unreadable,
            self.duration.as_millis()
        )
    }
}

/// Spaces reads so that the bytes read since the pass began stay within
/// `rate` per second: a read waits until the bytes granted before it are
/// due. The first read goes at once.
struct Pacer {
    /// Bytes per second; 0: no limit.
    rate: u64,
    started: tokio::time::Instant,
    granted: Mutex<u64>,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            started: tokio::time::Instant::now(),
            granted: Mutex::new(0),
        }
    }

    /// Waits until `bytes` more may be read.
    async fn take(&self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let due = {
            // A poisoned lock only means another read panicked while
            // adding; the count is still a number.
            let mut granted = self
                .granted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = self.started + time_for(*granted, self.rate);
            *granted = granted.saturating_add(bytes);
            due
        };
        tokio::time::sleep_until(due).await;
    }
}

/// How long reading `bytes` takes at `rate` bytes per second (`rate` > 0).
fn time_for(bytes: u64, rate: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / rate as f64)
}

/// One scrub pass; see the module documentation.
pub async fn scrub(
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
) -> Result<ScrubReport, GcError> {
    let started = Instant::now();
    let pacer = Pacer::new(config.scrub_bytes_per_second.bytes());
    let mut report = ScrubReport::default();
    let mut after = String::new();
    loop {
        let page = database.stored_object_keys(&after, KEYS_PAGE).await?;
        let Some(last) = page.last().cloned() else {
            break;
        };
        let full = page.len() == KEYS_PAGE as usize;
        let objects = page
            .into_iter()
            .map(|key| scrub_object(database, storage, &pacer, key));
        let mut objects = futures::stream::iter(objects).buffer_unordered(OBJECTS_IN_FLIGHT);
        while let Some(object) = objects.next().await {
            report.add(&object?);
        }
        if !full {
            break;
        }
        after = last;
    }
    let incomplete = database.withdraw_incomplete_nars().await?;
    if !incomplete.is_empty() {
        let withdrawal = larder_db::Withdrawal {
            chunks: 0,
            nars: incomplete,
        };
        integrity::log_withdrawal(
            &withdrawal,
            FoundBy::Scrub,
            "valid NARs listed chunks that are not stored",
        );
        report.nars_withdrawn += withdrawal.nars.len() as u64;
    }
    report.duration = started.elapsed();
    Ok(report)
}

/// Reads and checks the valid chunks of the object `key`, withdrawing
/// what is damaged.
async fn scrub_object(
    database: &Database,
    storage: &dyn Storage,
    pacer: &Pacer,
    key: String,
) -> Result<ScrubReport, GcError> {
    let mut report = ScrubReport {
        objects: 1,
        ..ScrubReport::default()
    };
    let chunks = database.chunks_in_object(&key).await?;
    let object = match ObjectKey::new(key.as_str()) {
        Ok(object) => object,
        Err(error) => {
            // Keys are validated when written: a row with one that is not
            // is a database problem, not the storage's.
            tracing::error!(key, %error, "chunk rows record an invalid object key; not scrubbed");
            report.chunks_unreadable = chunks.len() as u64;
            larder().scrub_progress(0, 0, report.chunks_unreadable);
            return Ok(report);
        }
    };
    for run in runs(&chunks) {
        let (start, length) = span(run);
        pacer.take(length).await;
        let bytes = match storage.get_bytes(&object, start, length).await {
            Ok(bytes) => bytes,
            Err(error) if integrity::damage_evidence(&error).is_some() => {
                let withdrawal =
                    integrity::check_object(database, storage, &object, FoundBy::Scrub).await?;
                report.chunks_damaged += withdrawal.chunks;
                report.nars_withdrawn += withdrawal.nars.len() as u64;
                if withdrawal.chunks == 0 {
                    // Storage says the object is whole after all: these
                    // chunks were not checked.
                    report.chunks_unreadable += run.len() as u64;
                    larder().scrub_progress(0, 0, run.len() as u64);
                }
                continue;
            }
            Err(error) => {
                tracing::warn!(
                    key,
                    error = format!("{:#}", anyhow::Error::new(error)),
                    "scrub could not read an object; its chunks are checked next pass"
                );
                report.chunks_unreadable += run.len() as u64;
                larder().scrub_progress(0, 0, run.len() as u64);
                continue;
            }
        };
        let checked = run.to_vec();
        // Decompressing and hashing are CPU work.
        let damaged =
            tokio::task::spawn_blocking(move || damaged_frames(&checked, start, &bytes)).await?;
        report.chunks_checked += run.len() as u64;
        report.bytes_read += length;
        larder().scrub_progress(run.len() as u64, length, 0);
        if let Some((first, why)) = damaged.first() {
            let reason = format!(
                "{} chunk frames in object {key} are corrupt (at offset {}: {why})",
                damaged.len(),
                first.location.offset
            );
            let chunks: Vec<DamagedChunk> = damaged.into_iter().map(|(chunk, _)| chunk).collect();
            let withdrawal =
                integrity::withdraw_damaged(database, &chunks, FoundBy::Scrub, &reason).await?;
            report.chunks_damaged += withdrawal.chunks;
            report.nars_withdrawn += withdrawal.nars.len() as u64;
        }
    }
    Ok(report)
}

/// `chunks` (valid ones of one object, in offset order) cut into runs of
/// adjacent frames, each at most [`RUN_BYTES`] unless one frame alone is
/// larger.
fn runs(chunks: &[Chunk]) -> Vec<&[Chunk]> {
    adjacent_runs(chunks, RUN_BYTES, |chunk| {
        chunk
            .location
            .as_ref()
            .map(|location| (location.offset, location.length))
    })
}

/// The byte range a run covers in its object: `(start, length)`.
fn span(run: &[Chunk]) -> (u64, u64) {
    let mut locations = run.iter().filter_map(|chunk| chunk.location.as_ref());
    let Some(first) = locations.next() else {
        return (0, 0);
    };
    let end = run
        .iter()
        .filter_map(|chunk| chunk.location.as_ref())
        .map(|location| location.offset + location.length)
        .max()
        .unwrap_or(first.offset + first.length);
    (first.offset, end - first.offset)
}

/// The chunks of a run whose frames, in `bytes` (read from `start` of
/// their object), do not decompress to exactly their size and hash, with
/// why.
fn damaged_frames(run: &[Chunk], start: u64, bytes: &[u8]) -> Vec<(DamagedChunk, String)> {
    let mut decompressor = zstd::bulk::Decompressor::new().ok();
    run.iter()
        .filter_map(|chunk| {
            let location = chunk.location.as_ref()?;
            let from = usize::try_from(location.offset.checked_sub(start)?).ok()?;
            let to = from.checked_add(usize::try_from(location.length).ok()?)?;
            let why = match bytes.get(from..to) {
                None => Some("the read came back short".to_owned()),
                Some(frame) => check_frame(decompressor.as_mut(), chunk, frame).err(),
            }?;
            Some((
                DamagedChunk {
                    id: chunk.id,
                    location: location.clone(),
                },
                why,
            ))
        })
        .collect()
}

/// Whether `frame` decompresses to exactly `chunk`'s bytes.
fn check_frame(
    decompressor: Option<&mut zstd::bulk::Decompressor<'static>>,
    chunk: &Chunk,
    frame: &[u8],
) -> Result<(), String> {
    let size = usize::try_from(chunk.chunk_size).map_err(|_| "an impossible size".to_owned())?;
    let data = match decompressor {
        Some(decompressor) => decompressor.decompress(frame, size),
        None => zstd::bulk::decompress(frame, size),
    }
    .map_err(|error| format!("not a zstd frame of {size} bytes: {error}"))?;
    if data.len() != size {
        return Err(format!("{} bytes, not {size}", data.len()));
    }
    if Sha256Hash::digest(&data) != chunk.chunk_hash {
        return Err("the bytes do not have the chunk's hash".to_owned());
    }
    Ok(())
}

/// One pass under the scrub lock: `None` when another process was
/// scrubbing. The report is logged and the pass counted.
pub async fn scrub_locked(
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
) -> Result<Option<ScrubReport>, GcError> {
    let Some(lock) = GcLock::try_acquire_scrubbing(database).await? else {
        tracing::info!("another gc-scheduler is scrubbing; skipping this pass");
        return Ok(None);
    };
    let result = scrub(database, storage, config).await;
    lock.release().await;
    larder().scrub_pass(result.is_ok());
    let report = result?;
    report.log();
    Ok(Some(report))
}

/// Runs a scrub pass every `scrub-interval` (the first one interval after
/// the start) until `shutdown`; nothing when it is unset. A failed pass is
/// logged and the next one tries again; a pass in progress when `shutdown`
/// fires is dropped, which is safe at any point (it only reads, and each
/// marking is one transaction).
pub async fn run_scrub_loop(
    database: Database,
    storage: std::sync::Arc<dyn Storage>,
    config: GcConfig,
    shutdown: CancellationToken,
) {
    let Some(interval) = config.scrub_interval else {
        return;
    };
    tracing::info!(
        every = %interval,
        bytes_per_second = %config.scrub_bytes_per_second,
        "scrubbing storage"
    );
    crate::repeat_every(interval.as_duration(), &shutdown, || async {
        if let Err(error) = scrub_locked(&database, &*storage, &config).await {
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::new(error)),
                "scrub pass failed; trying again next period"
            );
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use larder_db::{ChunkId, ChunkLocation, StoreState, Timestamp};

    use super::*;

    fn chunk(id: i64, data: &[u8], offset: u64, length: u64) -> Chunk {
        Chunk {
            id: ChunkId(id),
            chunk_hash: Sha256Hash::digest(data),
            chunk_size: data.len() as u64,
            state: StoreState::Valid,
            location: Some(ChunkLocation {
                object_key: "packs/ab/x.pack".to_owned(),
                offset,
                length,
            }),
            created_at: Timestamp::from_unix_millis(0),
        }
    }

    /// A pack of frames of `contents`, and their chunk rows.
    fn pack(contents: &[&[u8]]) -> (Vec<u8>, Vec<Chunk>) {
        let mut bytes = Vec::new();
        let mut chunks = Vec::new();
        for (i, data) in contents.iter().enumerate() {
            let frame = zstd::bulk::compress(data, 3).expect("compressing");
            chunks.push(chunk(
                i as i64 + 1,
                data,
                bytes.len() as u64,
                frame.len() as u64,
            ));
            bytes.extend_from_slice(&frame);
        }
        (bytes, chunks)
    }

    fn damaged_ids(run: &[Chunk], start: u64, bytes: &[u8]) -> Vec<i64> {
        damaged_frames(run, start, bytes)
            .into_iter()
            .map(|(chunk, _)| chunk.id.0)
            .collect()
    }

    #[test]
    fn sound_frames_pass() {
        let (bytes, chunks) = pack(&[b"one", &[7; 5000], b"three"]);
        assert!(damaged_ids(&chunks, 0, &bytes).is_empty());
        // A run read from an offset.
        let start = chunks[1].location.as_ref().expect("stored").offset;
        assert!(damaged_ids(&chunks[1..], start, &bytes[start as usize..]).is_empty());
    }

    #[test]
    fn a_flipped_byte_a_wrong_hash_and_a_short_read_are_damage() {
        let (mut bytes, mut chunks) = pack(&[b"one", &[7; 5000], b"three"]);
        // The middle frame's last byte (its content, or its checksum).
        let middle = chunks[1].location.clone().expect("stored");
        bytes[(middle.offset + middle.length - 1) as usize] ^= 0xff;
        assert_eq!(damaged_ids(&chunks, 0, &bytes), [2]);
        // A frame that decodes, to other bytes than its row's hash says.
        chunks[0].chunk_hash = Sha256Hash::digest(b"uno");
        assert_eq!(damaged_ids(&chunks, 0, &bytes), [1, 2]);
        let short = &bytes[..bytes.len() - 1];
        assert_eq!(damaged_ids(&chunks[2..], 0, short).len(), 1);
    }

    #[test]
    fn a_frame_of_another_size_is_damage() {
        let (bytes, mut chunks) = pack(&[b"abcdef"]);
        chunks[0].chunk_size = 5;
        assert_eq!(damaged_ids(&chunks, 0, &bytes), [1]);
        chunks[0].chunk_size = 7;
        assert_eq!(damaged_ids(&chunks, 0, &bytes), [1]);
    }

    #[test]
    fn runs_join_adjacent_frames_up_to_the_cap() {
        let at = |id, offset, length| {
            let mut chunk = chunk(id, b"x", offset, length);
            chunk.chunk_size = length;
            chunk
        };
        let mb = 1 << 20;
        let chunks = [
            at(1, 0, 100),
            at(2, 100, 50),
            // A gap (a dead chunk in a pack): a new run.
            at(3, 200, 10),
            at(4, 210, 6 * mb),
            // Would pass the cap.
            at(5, 210 + 6 * mb, 3 * mb),
            // Larger than the cap alone.
            at(6, 210 + 9 * mb, 9 * mb),
        ];
        let lengths: Vec<Vec<i64>> = runs(&chunks)
            .iter()
            .map(|run| run.iter().map(|chunk| chunk.id.0).collect())
            .collect();
        assert_eq!(lengths, [vec![1, 2], vec![3, 4], vec![5], vec![6]]);
        assert_eq!(span(&chunks[2..4]), (200, 10 + 6 * mb));
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn reads_are_due_when_the_bytes_before_them_are_paid_for() {
        assert_eq!(time_for(0, 1000), Duration::ZERO);
        assert_eq!(time_for(500, 1000), Duration::from_millis(500));
        assert_eq!(time_for(64 << 20, 64 << 20), Duration::from_secs(1));
    }
}
