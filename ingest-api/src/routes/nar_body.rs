//! The body of a NAR download: its chunks' zstd frames, in order, read
//! from storage as the body is sent, whole or from a byte range.
//!
//! Frames that lie next to each other in one storage object (a pack, where
//! a NAR's new chunks are written in order) are read with one ranged read,
//! streamed: frames are split out of it as its bytes arrive, so a read of
//! many MiB costs one storage request and a buffer. The first read of a
//! body is small and each next one may be twice as large, up to
//! [`MAX_READ_BYTES`], so that the first byte goes out after one short
//! read whatever the NAR's size, and a large NAR costs a few dozen
//! requests per GiB. Reads are opened ahead of the one being sent, each in
//! its own task, so that storage latency overlaps the network: up to
//! [`READ_AHEAD_BYTES`] of them, and at most [`READS_IN_FLIGHT`]. A chunk
//! repeated nearby (a NAR of zeros is one chunk listed thousands of times)
//! is read once and sent again from memory, and one repeated between other
//! frames (runs of zeros in a disk image) is read at most twice, then kept,
//! without splitting the read it sits in. A chunk the list names again far
//! on (the same file in two toolchains of one NAR) is kept from its first
//! use until its next one, which the chunk list records (`next_use`), up to
//! [`KEPT_BYTES`] of such frames, those needed soonest first: read again
//! instead, it would cost a request and cut the long read it falls into in
//! two.
//!
//! Memory per download is bounded whatever the NAR: a page of the chunk
//! list, the plans of the reads in flight (at most [`MAX_READ_FRAMES`]
//! frames each), a buffer of at most [`READ_BUFFER`] (or one frame) per
//! read in flight (about 8 MiB at most), the [`RECENT_FRAMES`] and
//! [`HOT_FRAMES`] frames remembered and at most [`KEPT_BYTES`] of frames
//! kept for a later use.
//!
//! Nothing is read until the body is polled, and nothing checks every
//! chunk first: the database's `valid` state is the truth. A read that
//! fails (a chunk's object missing from storage, an object shorter than its
//! frames, a chunk list that disagrees with its NAR row) ends the body with
//! an error, which makes hyper drop the connection: the client sees a
//! download cut short, never a complete response with wrong bytes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::stream::{self, BoxStream, Stream, StreamExt, TryStreamExt};
use futures::{FutureExt, TryFutureExt};
use tokio::io::AsyncReadExt;
use tokio_util::task::AbortOnDropHandle;

use larder_db::{ChunkId, ChunkLocation, Database, DbError, Nar, NarId, StoreState};
use larder_nix::NarHash;
use larder_storage::{ObjectKey, ObjectReader, Storage, StorageError};

/// Entries of a NAR's chunk list read per database round trip while it
/// streams: the list of a NAR of any length is read in bounded memory.
const CHUNK_LIST_PAGE: u32 = 1024;

/// Entries summed per database round trip when seeking to the start of a
/// range (see [`Database::seek_nar_chunks`]); the body then walks at most
/// this many entries by their lengths, without reading them, to reach it.
const SEEK_PAGE: u32 = 8192;

/// The first ranged read of a body covers at most this many bytes; each
/// next one at most twice the one before, up to [`MAX_READ_BYTES`].
const FIRST_READ_BYTES: u64 = 1 << 20;

/// The most bytes one ranged read covers: a GiB of frames in at least 32
/// storage requests, and never a read so long that its connection idles
/// for minutes while a slow client catches up.
const MAX_READ_BYTES: u64 = 32 << 20;

/// The most frames one ranged read covers, bounding the memory of its plan
/// when frames are tiny (chunks that compress to almost nothing).
const MAX_READ_FRAMES: usize = 8192;

/// The most entries of one remembered frame sent as one planned step, so
/// that a long run of one chunk is sent while its list is still being read.
const MAX_REPEATS: u32 = CHUNK_LIST_PAGE;

/// The most ranged reads opened (and their first [`READ_BUFFER`] read)
/// ahead of the one being sent: many when reads are short (one object per
/// chunk, as stores written before packs have: 32 reads of ~40 KiB on S3
/// at 25 ms each are ~50 MB/s), few when they are long.
const READS_IN_FLIGHT: usize = 32;

/// Reads are opened ahead until their planned lengths add up to this (or
/// [`READS_IN_FLIGHT`] are open): two or three of the longest reads.
const READ_AHEAD_BYTES: u64 = 64 << 20;

/// How much of a ranged read is taken from storage at a time.
const READ_BUFFER: usize = 256 << 10;

/// How many frames seen repeated a download keeps besides the recent ones
/// (copied, so that they pin no read buffer): a chunk of zeros repeated
/// all through a NAR, between other frames, stays remembered.
const HOT_FRAMES: usize = 4;

/// How many locations of whole frames read a download's plan remembers,
/// to tell a frame read a second time (which is then kept among the hot
/// ones) from a new one.
const SEEN_FRAMES: usize = 256;

/// How many distinct frames a download remembers after sending them, so
/// that a chunk repeated nearby is read from storage once, not once per
/// entry.
const RECENT_FRAMES: usize = 4;

/// The most bytes of frames a download keeps for their next use further
/// on in its list (copies, pinning no read buffer). On a NAR of two Rust
/// toolchains (2 GiB, 20 MiB of frames used twice, far apart), 16 MiB
/// keeps S3 requests per GiB served under 64, where none costs ~330.
const KEPT_BYTES: u64 = 16 << 20;

/// Bytes `first..=last` of a NAR's served file (its frames concatenated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub first: u64,
    pub last: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }
}

/// Why a NAR's body stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum NarBodyError {
    #[error("reading the chunk list")]
    Database(#[source] DbError),
    #[error("the chunk list does not match the NAR row: {0}")]
    ChunkList(String),
    /// Reading frames failed.
    #[error(transparent)]
    Storage(Box<ReadFailure>),
    /// The frame a planned repeat refers to was not remembered: a bug in
    /// this module, caught rather than sending wrong bytes.
    #[error("frame at {0:?} was to be remembered but was not")]
    FrameForgotten(ChunkLocation),
}

/// A ranged read that failed; `chunks` are the chunks whose frames it was
/// to return.
#[derive(Debug, thiserror::Error)]
#[error("reading bytes {offset}..{end} of object {key}", end = offset + length)]
pub struct ReadFailure {
    pub key: String,
    pub offset: u64,
    pub length: u64,
    pub chunks: Vec<ChunkId>,
    #[source]
    pub source: StorageError,
}

impl NarBodyError {
    /// Whether the failure is data missing from storage.
    pub fn is_missing_data(&self) -> bool {
        matches!(self, Self::Storage(failure) if matches!(failure.source, StorageError::NotFound(_)))
    }
}

/// The bytes `range` of the body of `nar` (its frames in order), read as
/// they are sent. The first error is logged and ends the body with an
/// error, so that hyper drops the connection; a missing or short object
/// is also handed to `larder_service::integrity::check_after_read_failure`.
pub fn nar_body(
    database: Database,
    storage: Arc<dyn Storage>,
    nar: Nar,
    range: ByteRange,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let nar_hash = nar.nar_hash;
    let (checker, check_storage) = (database.clone(), storage.clone());
    frames(database, storage, nar, range).map_err(move |error| {
        // A missing or short object withdraws the NARs of the chunks in it
        // (this one included), so that Nix's retry finds the path gone and
        // a push heals it.
        if let NarBodyError::Storage(failure) = &error {
            larder_service::integrity::check_after_read_failure(
                &checker,
                &check_storage,
                &failure.source,
            );
        }
        log_failure(&nar_hash, error)
    })
}

/// Logs why a body stopped, and turns it into the error that aborts the
/// connection.
fn log_failure(nar_hash: &NarHash, error: NarBodyError) -> std::io::Error {
    let missing = error.is_missing_data();
    let error = anyhow::Error::new(error);
    if missing {
        tracing::error!(
            %nar_hash,
            error = format!("{error:#}"),
            "data of a valid NAR is missing from storage; aborting its download"
        );
    } else {
        tracing::error!(
            %nar_hash,
            error = format!("{error:#}"),
            "reading a NAR failed mid-stream; aborting its download"
        );
    }
    std::io::Error::other(error)
}

fn frames(
    database: Database,
    storage: Arc<dyn Storage>,
    nar: Nar,
    range: ByteRange,
) -> BoxStream<'static, Result<Bytes, NarBodyError>> {
    let start = async move {
        // Where the range starts in the chunk list: the first entry, or
        // (for a range further in) a nearby one found by summing lengths.
        let (seq, offset) = if range.first == 0 {
            (0, 0)
        } else {
            database
                .seek_nar_chunks(nar.id, range.first, SEEK_PAGE)
                .await
                .map_err(NarBodyError::Database)?
        };
        let entries = chunk_entries(database, &nar, seq, offset);
        let planner = Planner::new(range.first - offset, range.len());
        Ok::<_, NarBodyError>(send(Ahead::new(plan(entries, planner), storage)))
    };
    start.try_flatten_stream().boxed()
}

/// One entry of a chunk list, as the body needs it.
struct Entry {
    chunk_id: ChunkId,
    location: ChunkLocation,
    /// The `seq` of the list's next entry with the same chunk.
    next_use: Option<u32>,
}

/// A NAR's chunk list from entry `seq` (which starts at served byte
/// `offset`) on, read from the database a page at a time. Checked against
/// the NAR row as it goes: exactly `n_chunks` entries, numbered in order,
/// each chunk stored, their frames adding up to `file_size` (the size
/// already promised to the client). A list that ends early (GC deleted the
/// NAR meanwhile) is an error, not a short body.
fn chunk_entries(
    database: Database,
    nar: &Nar,
    seq: u32,
    offset: u64,
) -> impl Stream<Item = Result<Entry, NarBodyError>> + Send + 'static {
    struct Cursor {
        database: Database,
        nar_id: NarId,
        n_chunks: u32,
        file_size: Option<u64>,
        next_seq: u32,
        bytes: u64,
    }
    let cursor = Cursor {
        database,
        nar_id: nar.id,
        n_chunks: nar.n_chunks,
        file_size: nar.file_size,
        next_seq: seq,
        bytes: offset,
    };
    stream::try_unfold(cursor, |mut cursor| async move {
        if cursor.next_seq == cursor.n_chunks {
            if Some(cursor.bytes) != cursor.file_size {
                return Err(NarBodyError::ChunkList(format!(
                    "its frames add up to {} bytes, not {:?}",
                    cursor.bytes, cursor.file_size
                )));
            }
            return Ok(None);
        }
        let page = cursor
            .database
            .chunks_of_nar_from(cursor.nar_id, cursor.next_seq, CHUNK_LIST_PAGE)
            .await
            .map_err(NarBodyError::Database)?;
        if page.is_empty() {
            return Err(NarBodyError::ChunkList(format!(
                "it ends after {} of {} entries",
                cursor.next_seq, cursor.n_chunks
            )));
        }
        let mut entries = Vec::with_capacity(page.len());
        for entry in page {
            if entry.seq != cursor.next_seq || entry.seq >= cursor.n_chunks {
                return Err(NarBodyError::ChunkList(format!(
                    "entry {} where {} of {} was expected",
                    entry.seq, cursor.next_seq, cursor.n_chunks
                )));
            }
            let location = match (entry.chunk.state, entry.chunk.location) {
                (StoreState::Valid, Some(location)) => location,
                (state, _) => {
                    return Err(NarBodyError::ChunkList(format!(
                        "entry {} is a chunk in state {state}",
                        entry.seq
                    )))
                }
            };
            cursor.bytes += location.length;
            cursor.next_seq += 1;
            entries.push(Entry {
                chunk_id: entry.chunk.id,
                location,
                next_use: entry.next_use,
            });
        }
        Ok(Some((entries, cursor)))
    })
    .map_ok(|page| stream::iter(page.into_iter().map(Ok)))
    .try_flatten()
}

/// A step of the body, planned from the chunk list before it is read.
#[derive(Debug, PartialEq, Eq)]
enum Piece {
    /// One ranged read of an object, sent as it arrives.
    Read(ReadPlan),
    /// A frame sent earlier in this body (and remembered), sent `count`
    /// more times: entries in a row, the first and the last of which are
    /// next listed at `uses` (the ones between, at the entry after them).
    Repeat {
        location: ChunkLocation,
        count: u32,
        uses: (Option<u32>, Option<u32>),
    },
}

/// Bytes `offset..offset + length` of `key`: consecutive segments, each a
/// frame or, at the ends of a range, part of one.
#[derive(Debug, PartialEq, Eq)]
struct ReadPlan {
    key: String,
    offset: u64,
    length: u64,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// The next `length` bytes of the read's object: a whole frame
    /// (remembered once sent) or part of one.
    Object {
        chunk_id: ChunkId,
        length: u64,
        whole: bool,
        /// A whole frame read before in this body and forgotten since:
        /// kept among the hot frames once sent.
        again: bool,
        /// Where the list names this chunk next (for a whole frame).
        next_use: Option<u32>,
    },
    /// A frame sent earlier and remembered, sent again here: a repeated
    /// chunk between frames of the read, which does not end it.
    Remembered {
        location: ChunkLocation,
        next_use: Option<u32>,
    },
}

/// The frames a download remembers, by location: the last
/// [`RECENT_FRAMES`] distinct whole frames sent from storage, the last
/// [`HOT_FRAMES`] of those seen repeated, and those the list names again
/// further on (see [`Memory::keep`]). The [`Planner`] (with `()`) and the
/// sender (with the bytes) make the same calls in the same order, so the
/// sender holds every frame the planner counted on.
struct Memory<T> {
    recent: VecDeque<(ChunkLocation, T)>,
    hot: VecDeque<(ChunkLocation, T)>,
    /// Frames kept for a later entry: the key in `kept_by_use` and the frame.
    kept: HashMap<ChunkLocation, ((u32, u64), T)>,
    /// The kept frames by the seq of their next use (and the order they
    /// were kept in, so that keys never collide).
    kept_by_use: BTreeMap<(u32, u64), ChunkLocation>,
    kept_bytes: u64,
    /// Frames kept so far.
    kept_count: u64,
}

impl<T: Clone> Memory<T> {
    fn new() -> Self {
        Self {
            recent: VecDeque::with_capacity(RECENT_FRAMES),
            hot: VecDeque::with_capacity(HOT_FRAMES),
            kept: HashMap::new(),
            kept_by_use: BTreeMap::new(),
            kept_bytes: 0,
            kept_count: 0,
        }
    }

    fn find(&self, location: &ChunkLocation) -> Option<&T> {
        if let Some((_, frame)) = self.kept.get(location) {
            return Some(frame);
        }
        self.hot
            .iter()
            .chain(&self.recent)
            .find(|(seen, _)| seen == location)
            .map(|(_, frame)| frame)
    }

    /// A whole frame just sent, which the list names next at `next_use`:
    /// kept until then (`frame` makes the copy kept), or, with no next
    /// use, no longer kept. When the kept frames pass [`KEPT_BYTES`], those
    /// needed last are dropped (Belady's rule: the fewest reads again for
    /// the memory). A frame kept past its next use (its chunk moved by
    /// compaction while the body was planned, so the entry named another
    /// location) only takes room until the body ends.
    fn keep(&mut self, location: &ChunkLocation, next_use: Option<u32>, frame: impl FnOnce() -> T) {
        if let Some((key, _)) = self.kept.get(location) {
            self.kept_by_use.remove(key);
            match next_use {
                Some(next_use) => {
                    let key = (next_use, key.1);
                    self.kept_by_use.insert(key, location.clone());
                    if let Some(kept) = self.kept.get_mut(location) {
                        kept.0 = key;
                    }
                }
                None => {
                    self.kept.remove(location);
                    self.kept_bytes -= location.length;
                }
            }
            return;
        }
        let Some(next_use) = next_use else {
            return;
        };
        if location.length > KEPT_BYTES {
            return;
        }
        let key = (next_use, self.kept_count);
        self.kept_count += 1;
        self.kept.insert(location.clone(), (key, frame()));
        self.kept_by_use.insert(key, location.clone());
        self.kept_bytes += location.length;
        while self.kept_bytes > KEPT_BYTES {
            let Some((_, farthest)) = self.kept_by_use.pop_last() else {
                break;
            };
            self.kept.remove(&farthest);
            self.kept_bytes -= farthest.length;
        }
    }

    /// A whole frame sent from storage.
    fn fresh(&mut self, location: ChunkLocation, frame: T) {
        if self.recent.len() == RECENT_FRAMES {
            self.recent.pop_front();
        }
        self.recent.push_back((location, frame));
    }

    /// A remembered frame sent again: kept among the hot ones, made a
    /// copy of by `keep`.
    fn repeated(&mut self, location: &ChunkLocation, keep: impl FnOnce(&T) -> T) {
        if self.hot.iter().any(|(seen, _)| seen == location) {
            return;
        }
        let Some(frame) = self.find(location).map(keep) else {
            return;
        };
        if self.hot.len() == HOT_FRAMES {
            self.hot.pop_front();
        }
        self.hot.push_back((location.clone(), frame));
    }
}

/// Turns a chunk list into [`Piece`]s: coalesces frames that are adjacent
/// in one object into one read, turns entries repeating a recently sent
/// frame into repeats, and cuts the list to the requested bytes.
struct Planner {
    /// Bytes of the list still to pass over before the first one sent.
    skip: u64,
    /// Bytes still to send.
    remaining: u64,
    /// What the sender will remember at each point of the plan.
    memory: Memory<()>,
    /// The last [`SEEN_FRAMES`] whole frames planned as reads.
    seen: VecDeque<ChunkLocation>,
    /// The piece being extended.
    pending: Option<Piece>,
    /// The most bytes of the read being planned.
    read_cap: u64,
}

impl Planner {
    fn new(skip: u64, length: u64) -> Self {
        Self {
            skip,
            remaining: length,
            memory: Memory::new(),
            seen: VecDeque::with_capacity(SEEN_FRAMES),
            pending: None,
            read_cap: FIRST_READ_BYTES,
        }
    }

    /// Whether every byte to send is planned.
    fn is_done(&self) -> bool {
        self.remaining == 0
    }

    /// Takes the next entry of the list; returns a piece when the entry
    /// cannot extend the one being planned, which is then complete.
    fn push(&mut self, entry: Entry) -> Option<Piece> {
        let Entry {
            chunk_id,
            location,
            next_use,
        } = entry;
        if self.remaining == 0 {
            return None;
        }
        if self.skip >= location.length {
            self.skip -= location.length;
            return None;
        }
        let start = std::mem::take(&mut self.skip);
        let length = (location.length - start).min(self.remaining);
        self.remaining -= length;
        let whole = start == 0 && length == location.length;
        if whole && self.memory.find(&location).is_some() {
            self.memory.repeated(&location, |()| ());
            self.memory.keep(&location, next_use, || ());
            match &mut self.pending {
                Some(Piece::Repeat {
                    location: repeated,
                    count,
                    uses,
                }) if *repeated == location && *count < MAX_REPEATS => {
                    *count += 1;
                    uses.1 = next_use;
                    return None;
                }
                Some(Piece::Read(read)) if read.segments.len() < MAX_READ_FRAMES => {
                    read.segments
                        .push(Segment::Remembered { location, next_use });
                    return None;
                }
                _ => {
                    return self.start(Piece::Repeat {
                        location,
                        count: 1,
                        uses: (next_use, next_use),
                    })
                }
            }
        }
        let offset = location.offset + start;
        let again = whole && self.seen.contains(&location);
        let segment = Segment::Object {
            chunk_id,
            length,
            whole,
            again,
            next_use,
        };
        if whole {
            self.memory.fresh(location.clone(), ());
            if again {
                self.memory.repeated(&location, |()| ());
            } else {
                if self.seen.len() == SEEN_FRAMES {
                    self.seen.pop_front();
                }
                self.seen.push_back(location.clone());
            }
            self.memory.keep(&location, next_use, || ());
        }
        if let Some(Piece::Read(read)) = &mut self.pending {
            if read.key == location.object_key
                && read.offset + read.length == offset
                && read.length + length <= self.read_cap
                && read.segments.len() < MAX_READ_FRAMES
            {
                read.length += length;
                read.segments.push(segment);
                return None;
            }
        }
        self.start(Piece::Read(ReadPlan {
            key: location.object_key,
            offset,
            length,
            segments: vec![segment],
        }))
    }

    /// Starts planning `piece`; returns the one planned before it.
    fn start(&mut self, piece: Piece) -> Option<Piece> {
        let done = self.pending.replace(piece);
        if let Some(Piece::Read(_)) = done {
            self.read_cap = (self.read_cap * 2).min(MAX_READ_BYTES);
        }
        done
    }

    /// The last piece, once the list (or the range) has ended.
    fn finish(&mut self) -> Option<Piece> {
        self.pending.take()
    }
}

/// The pieces of a body, planned from its entries as they are read.
fn plan(
    entries: impl Stream<Item = Result<Entry, NarBodyError>> + Send + 'static,
    planner: Planner,
) -> impl Stream<Item = Result<Piece, NarBodyError>> + Send + 'static {
    stream::try_unfold(
        (entries.boxed(), planner),
        |(mut entries, mut planner)| async move {
            loop {
                // Once every byte is planned, the rest of the list is not read.
                let entry = if planner.is_done() {
                    None
                } else {
                    entries.try_next().await?
                };
                let Some(entry) = entry else {
                    return Ok(planner.finish().map(|piece| (piece, (entries, planner))));
                };
                if let Some(piece) = planner.push(entry) {
                    return Ok(Some((piece, (entries, planner))));
                }
            }
        },
    )
}

/// A piece ready to send: a read opened with its first bytes in, or a
/// repeat.
enum Opened {
    Read(OpenRead),
    Repeat {
        location: ChunkLocation,
        count: u32,
        uses: (Option<u32>, Option<u32>),
        /// Whether the first copy is sent.
        started: bool,
    },
}

/// A ranged read being sent.
struct OpenRead {
    storage: Arc<dyn Storage>,
    key: ObjectKey,
    plan: ReadPlan,
    reader: ObjectReader,
    /// Bytes read and not sent yet.
    buffer: BytesMut,
    /// The segment being sent, and how much of it is sent.
    segment: usize,
    sent_of_segment: u64,
    /// Where in the object the next byte to send is.
    position: u64,
    /// How many times the read was resumed after failing mid-way.
    resumed: u32,
}

/// How many times a ranged read that fails mid-way (a connection an object
/// store closed while the read waited its turn behind a slow client) is
/// resumed from where it stopped before the body fails.
const READ_RESUMES: u32 = 2;

/// Starts a piece: a read is opened, and its first [`READ_BUFFER`] read,
/// in a task of its own, so that it makes progress while earlier pieces
/// are sent (and stops when the body is dropped).
fn open(
    storage: Arc<dyn Storage>,
    piece: Piece,
) -> futures::future::BoxFuture<'static, Result<Opened, NarBodyError>> {
    match piece {
        Piece::Repeat {
            location,
            count,
            uses,
        } => futures::future::ready(Ok(Opened::Repeat {
            location,
            count,
            uses,
            started: false,
        }))
        .boxed(),
        Piece::Read(plan) => {
            let task = AbortOnDropHandle::new(tokio::spawn(async move {
                let opened = async {
                    let key = ObjectKey::new(plan.key.as_str())?;
                    // A short read (one chunk of a store without packs)
                    // in one call: on local storage one blocking job,
                    // where a stream would take three (open, seek, read).
                    if plan.length <= READ_BUFFER as u64 {
                        let bytes = storage.get_bytes(&key, plan.offset, plan.length).await?;
                        let reader: ObjectReader = Box::pin(tokio::io::empty());
                        return Ok((key, reader, BytesMut::from(bytes)));
                    }
                    let mut reader = storage
                        .get_range(&key, plan.offset, Some(plan.length))
                        .await?;
                    let mut buffer = BytesMut::new();
                    fill(&key, &mut reader, &mut buffer, 1).await?;
                    Ok((key, reader, buffer))
                }
                .await;
                match opened {
                    Ok((key, reader, buffer)) => Ok(Opened::Read(OpenRead {
                        storage,
                        key,
                        position: plan.offset,
                        plan,
                        reader,
                        buffer,
                        segment: 0,
                        sent_of_segment: 0,
                        resumed: 0,
                    })),
                    Err(source) => Err(storage_error(&plan, source)),
                }
            }));
            task.map(|joined| match joined {
                Ok(opened) => opened,
                // The task is aborted only when this future is dropped,
                // and it does not panic; a panic is a bug, reported as one.
                Err(join_error) => std::panic::resume_unwind(join_error.into_panic()),
            })
            .boxed()
        }
    }
}

/// The pieces of a body, each opened as soon as it is planned, as far
/// ahead of the one being sent as [`READ_AHEAD_BYTES`] and
/// [`READS_IN_FLIGHT`] allow.
struct Ahead {
    pieces: BoxStream<'static, Result<Piece, NarBodyError>>,
    storage: Arc<dyn Storage>,
    /// Oldest first, with the bytes each one's read covers.
    in_flight: VecDeque<(
        u64,
        futures::future::BoxFuture<'static, Result<Opened, NarBodyError>>,
    )>,
    /// The sum of those bytes.
    bytes: u64,
    planned_all: bool,
}

impl Ahead {
    fn new(
        pieces: impl Stream<Item = Result<Piece, NarBodyError>> + Send + 'static,
        storage: Arc<dyn Storage>,
    ) -> Self {
        Self {
            pieces: pieces.boxed(),
            storage,
            in_flight: VecDeque::new(),
            bytes: 0,
            planned_all: false,
        }
    }

    /// The next piece, opened; `None` after the last.
    async fn next(&mut self) -> Result<Option<Opened>, NarBodyError> {
        while !self.planned_all
            && self.in_flight.len() < READS_IN_FLIGHT
            && (self.in_flight.is_empty() || self.bytes < READ_AHEAD_BYTES)
        {
            match self.pieces.try_next().await? {
                Some(piece) => {
                    let bytes = match &piece {
                        Piece::Read(read) => read.length,
                        Piece::Repeat { .. } => 0,
                    };
                    self.bytes += bytes;
                    self.in_flight
                        .push_back((bytes, open(self.storage.clone(), piece)));
                }
                None => self.planned_all = true,
            }
        }
        match self.in_flight.pop_front() {
            Some((bytes, opened)) => {
                self.bytes -= bytes;
                opened.await.map(Some)
            }
            None => Ok(None),
        }
    }
}

fn storage_error(plan: &ReadPlan, source: StorageError) -> NarBodyError {
    NarBodyError::Storage(Box::new(ReadFailure {
        key: plan.key.clone(),
        offset: plan.offset,
        length: plan.length,
        chunks: plan
            .segments
            .iter()
            .filter_map(|segment| match segment {
                Segment::Object { chunk_id, .. } => Some(*chunk_id),
                Segment::Remembered { .. } => None,
            })
            .collect(),
        source,
    }))
}

/// Reads from `reader` until `buffer` holds at least `wanted` bytes, in
/// reads of about [`READ_BUFFER`]; an object that ends first is too short
/// for the frames it is said to hold.
async fn fill(
    key: &ObjectKey,
    reader: &mut ObjectReader,
    buffer: &mut BytesMut,
    wanted: u64,
) -> Result<(), StorageError> {
    while (buffer.len() as u64) < wanted {
        // Bounded by a frame's length (`wanted`) or READ_BUFFER.
        let missing = usize::try_from(wanted).unwrap_or(usize::MAX) - buffer.len();
        buffer.reserve(missing.max(READ_BUFFER));
        let read = reader
            .read_buf(buffer)
            .await
            .map_err(|source| StorageError::io(key, source))?;
        if read == 0 {
            return Err(StorageError::Io {
                key: key.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the object ends before the frames it is said to hold",
                ),
            });
        }
    }
    Ok(())
}

impl OpenRead {
    /// Fills the buffer to `wanted` bytes; a read that fails mid-way for a
    /// reason other than the object being gone (or too short) is opened
    /// again where it stopped, up to [`READ_RESUMES`] times.
    async fn fill(&mut self, wanted: u64) -> Result<(), NarBodyError> {
        loop {
            let error = match fill(&self.key, &mut self.reader, &mut self.buffer, wanted).await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            let resumable = matches!(&error, StorageError::Io { source, .. }
                if source.kind() != std::io::ErrorKind::UnexpectedEof)
                || matches!(error, StorageError::Backend { .. });
            if !resumable || self.resumed == READ_RESUMES {
                return Err(storage_error(&self.plan, error));
            }
            self.resumed += 1;
            let from = self.position + self.buffer.len() as u64;
            let end = self.plan.offset + self.plan.length;
            tracing::warn!(
                key = %self.key,
                from,
                error = format!("{:#}", anyhow::Error::new(error)),
                "a ranged read failed mid-way; resuming it"
            );
            self.reader = self
                .storage
                .get_range(&self.key, from, Some(end - from))
                .await
                .map_err(|source| storage_error(&self.plan, source))?;
        }
    }

    /// The next bytes to send, or `None` once the read is all sent: part
    /// of a frame (at the ends of a range) as it arrives, a remembered
    /// frame, or as many whole frames as are read, in one buffer, each
    /// remembered.
    async fn next_bytes(
        &mut self,
        memory: &mut Memory<Bytes>,
    ) -> Result<Option<Bytes>, NarBodyError> {
        let (length, whole) = match self.plan.segments.get(self.segment) {
            None => return Ok(None),
            Some(Segment::Remembered { location, next_use }) => {
                let frame = remembered(memory, location)?;
                memory.keep(location, *next_use, || Bytes::copy_from_slice(&frame));
                self.segment += 1;
                return Ok(Some(frame));
            }
            Some(Segment::Object { length, whole, .. }) => (*length, *whole),
        };
        let left = length - self.sent_of_segment;
        if !whole {
            self.fill(1).await?;
            let take = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.buffer.len());
            self.position += take as u64;
            self.sent_of_segment += take as u64;
            if self.sent_of_segment == length {
                self.segment += 1;
                self.sent_of_segment = 0;
            }
            return Ok(Some(self.buffer.split_to(take).freeze()));
        }
        self.fill(left).await?;
        // The current frame and the whole frames after it already read.
        let (mut end, mut total) = (self.segment, 0_u64);
        while let Some(Segment::Object {
            length,
            whole: true,
            ..
        }) = self.plan.segments.get(end)
        {
            if total + length > self.buffer.len() as u64 {
                break;
            }
            total += length;
            end += 1;
        }
        // `total` is at most the buffer's length.
        let run = self.buffer.split_to(total as usize).freeze();
        let mut at = 0_u64;
        for segment in &self.plan.segments[self.segment..end] {
            if let Segment::Object {
                length,
                again,
                next_use,
                ..
            } = segment
            {
                let location = ChunkLocation {
                    object_key: self.plan.key.clone(),
                    offset: self.position + at,
                    length: *length,
                };
                let frame = run.slice(at as usize..(at + length) as usize);
                memory.fresh(location.clone(), frame.clone());
                if *again {
                    memory.repeated(&location, |frame| Bytes::copy_from_slice(frame));
                }
                memory.keep(&location, *next_use, || Bytes::copy_from_slice(&frame));
                at += length;
            }
        }
        self.position += total;
        self.segment = end;
        Ok(Some(run))
    }
}

/// A remembered frame, sent again: kept among the hot frames as a copy of
/// its own (not a slice pinning a read buffer).
fn remembered(memory: &mut Memory<Bytes>, location: &ChunkLocation) -> Result<Bytes, NarBodyError> {
    let frame = memory
        .find(location)
        .cloned()
        .ok_or_else(|| NarBodyError::FrameForgotten(location.clone()))?;
    memory.repeated(location, |frame| Bytes::copy_from_slice(frame));
    Ok(frame)
}

/// Sends the opened pieces in order: a read's bytes as they arrive, a
/// repeat's frame again.
fn send(pieces: Ahead) -> impl Stream<Item = Result<Bytes, NarBodyError>> + Send + 'static {
    struct Sender {
        pieces: Ahead,
        current: Option<Opened>,
        memory: Memory<Bytes>,
    }
    let sender = Sender {
        pieces,
        current: None,
        memory: Memory::new(),
    };
    stream::try_unfold(sender, |mut sender| async move {
        loop {
            let next = match &mut sender.current {
                Some(Opened::Read(read)) => read.next_bytes(&mut sender.memory).await?,
                Some(Opened::Repeat {
                    location,
                    count,
                    uses,
                    started,
                }) => repeat(&mut sender.memory, location, count, *uses, started)?,
                None => None,
            };
            if let Some(bytes) = next {
                return Ok(Some((bytes, sender)));
            }
            match sender.pieces.next().await? {
                Some(opened) => sender.current = Some(opened),
                None => return Ok(None),
            }
        }
    })
}

/// The next copies of a remembered frame, `None` once `count` are sent:
/// as many in one buffer as fit in about [`READ_BUFFER`], since a repeated
/// frame is often tiny (zeros compress to a few dozen bytes).
///
/// The planner kept the frame for each entry's next use in turn; the
/// sender does the same with the first and the last, which leaves its
/// memory as the planner's: the entries between are next listed at the
/// entry after them, which only moves a frame already kept, the soonest
/// needed of all (so that keeping it at the first dropped nothing else).
fn repeat(
    memory: &mut Memory<Bytes>,
    location: &ChunkLocation,
    count: &mut u32,
    (first_use, last_use): (Option<u32>, Option<u32>),
    started: &mut bool,
) -> Result<Option<Bytes>, NarBodyError> {
    if *count == 0 {
        return Ok(None);
    }
    let frame = remembered(memory, location)?;
    if !*started {
        *started = true;
        memory.keep(location, first_use, || Bytes::copy_from_slice(&frame));
    }
    let copies = (READ_BUFFER / frame.len().max(1)).clamp(1, *count as usize);
    *count -= copies as u32;
    if *count == 0 {
        memory.keep(location, last_use, || Bytes::copy_from_slice(&frame));
    }
    if copies == 1 {
        return Ok(Some(frame.clone()));
    }
    let mut out = BytesMut::with_capacity(copies * frame.len());
    for _ in 0..copies {
        out.extend_from_slice(&frame);
    }
    Ok(Some(out.freeze()))
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::task::{Context, Poll};

    use async_trait::async_trait;
    use larder_storage::{LocalStorage, ObjectListing};
    use tokio::io::{AsyncRead, ReadBuf};

    use super::*;

    /// Local storage whose ranged reads break after `break_after` bytes,
    /// the first `breaks` times: a connection closed mid-read.
    #[derive(Debug)]
    struct Breaking {
        inner: LocalStorage,
        break_after: u64,
        breaks: AtomicU32,
        reads: AtomicU32,
    }

    /// A reader that fails once `left` bytes are read.
    struct BreakingReader {
        inner: ObjectReader,
        left: u64,
    }

    impl AsyncRead for BreakingReader {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.left == 0 {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection reset",
                )));
            }
            let limit = usize::try_from(self.left)
                .unwrap_or(usize::MAX)
                .min(buf.remaining());
            let mut bytes = vec![0; limit];
            let mut limited = ReadBuf::new(&mut bytes);
            let polled = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
            let read = limited.filled().len();
            buf.put_slice(&bytes[..read]);
            self.left -= read as u64;
            polled
        }
    }

    #[async_trait]
    impl Storage for Breaking {
        async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StorageError> {
            self.inner.put(key, data).await
        }
        async fn put_reader(
            &self,
            key: &ObjectKey,
            reader: &mut (dyn AsyncRead + Send + Unpin),
        ) -> Result<u64, StorageError> {
            self.inner.put_reader(key, reader).await
        }
        async fn get_range(
            &self,
            key: &ObjectKey,
            offset: u64,
            length: Option<u64>,
        ) -> Result<ObjectReader, StorageError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let inner = self.inner.get_range(key, offset, length).await?;
            let broken = self
                .breaks
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                })
                .is_ok();
            Ok(if broken {
                Box::pin(BreakingReader {
                    inner,
                    left: self.break_after,
                })
            } else {
                inner
            })
        }
        async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StorageError> {
            self.inner.size(key).await
        }
        async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
            self.inner.delete(key).await
        }
        fn list(&self, prefix: &ObjectKey) -> ObjectListing {
            self.inner.list(prefix)
        }
        async fn check(&self) -> Result<(), StorageError> {
            self.inner.check().await
        }
    }

    /// One object of `frames` frames of `frame` bytes each (frame `i`
    /// filled with byte `i`), read through [`Breaking`].
    async fn packed_object(
        frames: u8,
        frame: u64,
        breaks: u32,
    ) -> (tempfile::TempDir, Arc<Breaking>) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let inner = LocalStorage::open(dir.path()).await.expect("local storage");
        let bytes: Vec<u8> = (0..frames)
            .flat_map(|i| std::iter::repeat_n(i, frame as usize))
            .collect();
        inner
            .put(
                &ObjectKey::new("packs/p").expect("a key"),
                Bytes::from(bytes),
            )
            .await
            .expect("storing the pack");
        let storage = Arc::new(Breaking {
            inner,
            break_after: frame * 3 + 7,
            breaks: AtomicU32::new(breaks),
            reads: AtomicU32::new(0),
        });
        (dir, storage)
    }

    /// The body of `entries` (or of `skip..skip + length` of them), from
    /// `storage`, as `send` makes it.
    async fn body(
        storage: Arc<dyn Storage>,
        entries: Vec<Entry>,
        skip: u64,
        length: u64,
    ) -> Result<Vec<u8>, NarBodyError> {
        let pieces = plan(
            stream::iter(entries.into_iter().map(Ok)),
            Planner::new(skip, length),
        );
        let parts: Vec<Bytes> = send(Ahead::new(pieces, storage)).try_collect().await?;
        Ok(parts.concat())
    }

    #[tokio::test]
    async fn frames_repeats_and_ranges_come_out_in_order() {
        let frame = 1000;
        let (_dir, storage) = packed_object(20, frame, 0).await;
        // Frames 0..20 in order, then frame 3 twice, then 18 and 19 again.
        let mut order: Vec<u64> = (0..20).collect();
        order.extend([3, 3, 18, 19]);
        let entries = || {
            order
                .iter()
                .map(|&i| entry(i as i64, "packs/p", i * frame, frame))
                .collect::<Vec<_>>()
        };
        let expected: Vec<u8> = order
            .iter()
            .flat_map(|&i| std::iter::repeat_n(i as u8, frame as usize))
            .collect();
        let whole = body(storage.clone(), entries(), 0, expected.len() as u64)
            .await
            .expect("the body");
        assert!(whole == expected, "the whole body");
        for (first, length) in [
            (0, 1),
            (999, 2),
            (2500, 17_000),
            (19_999, 4001),
            (23_999, 1),
        ] {
            let part = body(storage.clone(), entries(), first, length)
                .await
                .expect("the range");
            let (first, length) = (first as usize, length as usize);
            assert!(
                part[..] == expected[first..first + length],
                "{first}+{length}"
            );
        }
    }

    #[tokio::test]
    async fn a_read_broken_mid_way_is_resumed_where_it_stopped() {
        // Ten frames: one read (under FIRST_READ_BYTES), which breaks
        // every 300,007 bytes as many times as asked.
        let frame = 100_000;
        let entries = || {
            (0..10)
                .map(|i| entry(i, "packs/p", i as u64 * frame, frame))
                .collect()
        };
        let expected: Vec<u8> = (0..10_u8)
            .flat_map(|i| std::iter::repeat_n(i, frame as usize))
            .collect();

        let (_dir, storage) = packed_object(10, frame, READ_RESUMES).await;
        let whole = body(storage.clone(), entries(), 0, 10 * frame)
            .await
            .expect("the body, read again where it broke");
        assert!(whole == expected, "the body read again is not the object");
        assert_eq!(storage.reads.load(Ordering::SeqCst), 1 + READ_RESUMES);

        let (_dir, storage) = packed_object(10, frame, READ_RESUMES + 1).await;
        match body(storage.clone(), entries(), 0, 10 * frame).await {
            Err(NarBodyError::Storage(failure)) => {
                assert!(
                    matches!(failure.source, StorageError::Io { .. }),
                    "{failure:?}"
                );
                assert_eq!(failure.chunks.len(), 10);
            }
            Err(other) => panic!("not the read's error: {other:?}"),
            Ok(body) => panic!(
                "a read that keeps breaking sent a body of {} bytes",
                body.len()
            ),
        }
    }

    fn entry(id: i64, key: &str, offset: u64, length: u64) -> Entry {
        Entry {
            chunk_id: ChunkId(id),
            location: ChunkLocation {
                object_key: key.to_owned(),
                offset,
                length,
            },
            next_use: None,
        }
    }

    /// `entries` with each one's next use, as the database records them.
    fn with_next_uses(mut entries: Vec<Entry>) -> Vec<Entry> {
        let mut later = std::collections::HashMap::new();
        for (seq, entry) in entries.iter_mut().enumerate().rev() {
            entry.next_use = later.insert(entry.chunk_id, seq as u32);
        }
        entries
    }

    #[test]
    fn a_chunk_listed_again_far_on_is_kept_and_does_not_cut_the_read() {
        // A pack of 100 frames; the list then names frames 3 and 40 of
        // it again amid the frames of a second pack, far past the recent
        // and hot frames.
        let mut entries: Vec<Entry> = (0..100)
            .map(|i| entry(i, "packs/a", i as u64 * 100, 100))
            .collect();
        for i in 0..50_u64 {
            entries.push(entry(1000 + i as i64, "packs/b", i * 100, 100));
            if i == 10 {
                entries.push(entry(3, "packs/a", 300, 100));
            }
            if i == 30 {
                entries.push(entry(40, "packs/a", 4000, 100));
                entries.push(entry(3, "packs/a", 300, 100));
            }
        }
        let length = entries.iter().map(|entry| entry.location.length).sum();
        let pieces = run(Planner::new(0, length), with_next_uses(entries));
        let reads: Vec<_> = pieces.iter().map(read_of).collect();
        assert_eq!(
            reads,
            [("packs/a", 0, 10_000, 100), ("packs/b", 0, 5000, 53)]
        );
        // Without the next uses, each of the three repeats is a read of
        // its own and cuts the read of the second pack.
        let mut entries: Vec<Entry> = (0..100)
            .map(|i| entry(i, "packs/a", i as u64 * 100, 100))
            .collect();
        entries.extend((0..50).map(|i| entry(1000 + i, "packs/b", i as u64 * 100, 100)));
        entries.insert(111, entry(3, "packs/a", 300, 100));
        let pieces = run(Planner::new(0, length), entries);
        assert_eq!(pieces.len(), 4, "{pieces:?}");
    }

    #[test]
    fn kept_frames_stay_within_the_budget_and_the_soonest_needed_stay() {
        // Frames of a quarter of the budget: five listed again at the end,
        // in the order 4, 3, 2, 1, 0; only four fit, and the one needed
        // last (frame 0) is read again.
        let frame = KEPT_BYTES / 4;
        let mut entries: Vec<Entry> = (0..5)
            .map(|i| entry(i, "packs/a", i as u64 * frame, frame))
            .collect();
        entries.push(entry(9, "packs/b", 0, 100));
        entries.extend(
            (0..5)
                .rev()
                .map(|i| entry(i, "packs/a", i as u64 * frame, frame)),
        );
        let length = entries.iter().map(|entry| entry.location.length).sum();
        let mut planner = Planner::new(0, length);
        planner.read_cap = MAX_READ_BYTES;
        let pieces = run(planner, with_next_uses(entries));
        let reads: Vec<_> = pieces
            .iter()
            .filter(|piece| matches!(piece, Piece::Read(_)))
            .map(read_of)
            .collect();
        assert_eq!(
            reads,
            [
                ("packs/a", 0, 5 * frame, 5),
                ("packs/b", 0, 100, 5),
                ("packs/a", 0, frame, 1)
            ]
        );
    }

    #[tokio::test]
    async fn a_body_with_kept_frames_under_pressure_has_every_byte_in_order() {
        // 24 frames of 1 MiB, listed in a shuffled order with repeats,
        // far more than the kept budget: the sender must hold exactly
        // what the planner counted on (or fail with FrameForgotten).
        let frame = 1 << 20;
        let (_dir, storage) = packed_object(24, frame, 0).await;
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut order: Vec<u64> = (0..24).collect();
        for _ in 0..60 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            order.push(state % 24);
            if state.is_multiple_of(5) {
                // A run of the same chunk: one repeat piece.
                order.extend([state % 24; 3]);
            }
        }
        let entries = || {
            with_next_uses(
                order
                    .iter()
                    .map(|&i| entry(i as i64, "packs/p", i * frame, frame))
                    .collect(),
            )
        };
        let expected: Vec<u8> = order
            .iter()
            .flat_map(|&i| std::iter::repeat_n(i as u8, frame as usize))
            .collect();
        let whole = body(storage.clone(), entries(), 0, expected.len() as u64)
            .await
            .expect("the body");
        assert!(whole == expected, "the whole body");
        let (first, length) = (frame * 30 + 17, frame * 40);
        let part = body(storage.clone(), entries(), first, length)
            .await
            .expect("a range");
        assert!(
            part[..] == expected[first as usize..(first + length) as usize],
            "the range"
        );
    }

    fn run(mut planner: Planner, entries: Vec<Entry>) -> Vec<Piece> {
        let mut pieces = Vec::new();
        for entry in entries {
            if planner.is_done() {
                break;
            }
            pieces.extend(planner.push(entry));
        }
        pieces.extend(planner.finish());
        pieces
    }

    fn read_of(piece: &Piece) -> (&str, u64, u64, usize) {
        match piece {
            Piece::Read(read) => (
                read.key.as_str(),
                read.offset,
                read.length,
                read.segments.len(),
            ),
            Piece::Repeat { .. } => panic!("a read expected, not {piece:?}"),
        }
    }

    #[test]
    fn adjacent_frames_of_one_object_are_one_read() {
        let entries = vec![
            entry(1, "packs/a", 0, 100),
            entry(2, "packs/a", 100, 50),
            entry(3, "packs/a", 150, 70),
            // Not adjacent: a gap, another object, then adjacent again.
            entry(4, "packs/a", 300, 10),
            entry(5, "packs/b", 310, 10),
            entry(6, "packs/b", 320, 10),
        ];
        let pieces = run(Planner::new(0, 250), entries);
        let reads: Vec<_> = pieces.iter().map(read_of).collect();
        assert_eq!(
            reads,
            [
                ("packs/a", 0, 220, 3),
                ("packs/a", 300, 10, 1),
                ("packs/b", 310, 20, 2)
            ]
        );
    }

    #[test]
    fn reads_grow_from_a_small_first_one_to_the_cap() {
        let frame = 64 << 10;
        let count = (3 * MAX_READ_BYTES / frame) as i64;
        let entries = (0..count)
            .map(|i| entry(i, "packs/a", i as u64 * frame, frame))
            .collect();
        let pieces = run(Planner::new(0, count as u64 * frame), entries);
        let lengths: Vec<u64> = pieces.iter().map(|piece| read_of(piece).2).collect();
        assert_eq!(lengths[0], FIRST_READ_BYTES);
        assert_eq!(lengths[1], 2 * FIRST_READ_BYTES);
        assert!(lengths.iter().all(|length| *length <= MAX_READ_BYTES));
        assert_eq!(lengths.iter().sum::<u64>(), count as u64 * frame);
        // 96 MiB: 1 + 2 + 4 + 8 + 16 + 32 + 32 + 1.
        assert_eq!(lengths.len(), 8, "{lengths:?}");
    }

    #[test]
    fn tiny_frames_are_bounded_per_read() {
        let count = MAX_READ_FRAMES as i64 + 5;
        let entries = (0..count)
            .map(|i| entry(i, "packs/a", i as u64, 1))
            .collect();
        let pieces = run(Planner::new(0, count as u64), entries);
        let frames: Vec<usize> = pieces.iter().map(|piece| read_of(piece).3).collect();
        assert_eq!(frames, [MAX_READ_FRAMES, 5]);
    }

    #[test]
    fn a_repeated_frame_is_read_once_and_repeated_in_bounded_steps() {
        let count = (MAX_READ_FRAMES + 2 * MAX_REPEATS as usize + 1) as i64;
        let entries = (0..count).map(|i| entry(i, "chunks/z", 0, 20)).collect();
        let pieces = run(Planner::new(0, count as u64 * 20), entries);
        // One read of the frame, the read's segments filled with repeats
        // of it, then repeats in steps.
        match &pieces[0] {
            Piece::Read(read) => {
                assert_eq!((read.offset, read.length), (0, 20));
                assert_eq!(read.segments.len(), MAX_READ_FRAMES);
                assert!(read.segments[1..]
                    .iter()
                    .all(|segment| matches!(segment, Segment::Remembered { .. })));
            }
            other => panic!("a read expected, not {other:?}"),
        }
        let repeats: Vec<u32> = pieces[1..]
            .iter()
            .map(|piece| match piece {
                Piece::Repeat { count, .. } => *count,
                Piece::Read(_) => panic!("a repeat expected, not {piece:?}"),
            })
            .collect();
        assert_eq!(repeats, [MAX_REPEATS, MAX_REPEATS, 1]);
    }

    #[test]
    fn a_chunk_repeated_between_frames_of_a_pack_is_read_twice_at_most() {
        // A pack's frames with the zero chunk (stored in another object)
        // every third entry: more than RECENT_FRAMES fresh frames apart.
        let mut entries = vec![entry(0, "packs/zero", 500, 20)];
        for i in 0..30_u64 {
            entries.push(entry(i as i64 + 1, "packs/a", i * 100, 100));
            if i % 6 == 5 {
                entries.push(entry(0, "packs/zero", 500, 20));
            }
        }
        let length = entries.iter().map(|entry| entry.location.length).sum();
        let pieces = run(Planner::new(0, length), entries);
        let reads: Vec<_> = pieces.iter().map(read_of).collect();
        // Read again once (the second time, it is kept), then never.
        assert_eq!(
            reads,
            [
                ("packs/zero", 500, 20, 1),
                ("packs/a", 0, 600, 6),
                ("packs/zero", 500, 20, 1),
                ("packs/a", 600, 2400, 28)
            ]
        );
    }

    #[test]
    fn a_range_skips_whole_frames_unread_and_cuts_the_ends() {
        let entries = vec![
            entry(1, "packs/a", 0, 100),
            entry(2, "packs/a", 100, 100),
            entry(3, "packs/a", 200, 100),
            entry(4, "packs/a", 300, 100),
            entry(5, "packs/a", 400, 100),
        ];
        // Bytes 150..=349: half of the second frame, the third, half of
        // the fourth; the fifth is never looked at.
        let pieces = run(Planner::new(150, 200), entries);
        match &pieces[..] {
            [Piece::Read(read)] => {
                assert_eq!((read.offset, read.length), (150, 200));
                let segments: Vec<(u64, bool)> = read
                    .segments
                    .iter()
                    .map(|segment| match segment {
                        Segment::Object { length, whole, .. } => (*length, *whole),
                        Segment::Remembered { .. } => panic!("no repeats here"),
                    })
                    .collect();
                assert_eq!(segments, [(50, false), (100, true), (50, false)]);
            }
            other => panic!("one read expected: {other:?}"),
        }
    }

    #[test]
    fn a_partial_frame_is_not_taken_for_a_repeat() {
        // The same chunk three times; the range starts inside the first.
        let entries = (0..3).map(|i| entry(i, "chunks/z", 0, 100)).collect();
        let pieces = run(Planner::new(40, 260), entries);
        assert_eq!(read_of(&pieces[0]), ("chunks/z", 40, 60, 1));
        match &pieces[1] {
            Piece::Read(read) => {
                assert_eq!((read.offset, read.length), (0, 100));
                assert!(matches!(
                    read.segments[0],
                    Segment::Object { whole: true, .. }
                ));
                assert!(matches!(read.segments[1], Segment::Remembered { .. }));
                assert_eq!(read.segments.len(), 2);
            }
            other => panic!("a read expected, not {other:?}"),
        }
        assert_eq!(pieces.len(), 2);
    }
}
