//! Receiving a NAR at the door: one streaming pass over the request body
//! that decompresses it when Nix sent it compressed, hashes the bytes as
//! sent and as a NAR, validates the NAR with the strict reader, holds it to
//! the size, declared-size and decompression-ratio limits, and writes the
//! verified bytes to `staging/<random>.nar`.
//!
//! No thread ever waits for the network here. The request's own task reads
//! the body asynchronously and hands what has arrived, in batches of up to
//! [`BATCH_SIZE`], to [`larder_verify::NarVerifier`], which does the CPU
//! work (decoding, SHA-256, grammar) as short jobs on a bounded pool
//! ([`Door`]), each producing at most [`JOB_OUTPUT`] bytes. Where storage
//! hands out a blocking writer (local files), a blocking job of its own
//! writes each job's output while the next is verified, so a megabyte
//! costs a thread hop for each rather than one per write and per channel;
//! elsewhere (S3) the task sends each job's output to storage's
//! `put_reader` and waits for it to take them. Either
//! way storage's pace holds back the body, and memory per upload is a few
//! batches and job outputs, whatever the NAR's size. A rejected body never
//! completes a staged object (the writer is dropped uncommitted, or the
//! stream storage reads ends with an error), and whatever was written is
//! deleted before the answer.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue};
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::io::StreamReader;

use larder_config::IngestConfig;
use larder_service::metrics::{larder, PushStage};
use larder_storage::{BlockingWriter, ObjectKey, Storage};
use larder_verify::encoded::{BodyDecodeError, BodyDecoder, BodyLimits, ContentEncoding};
use larder_verify::{Limits, NarVerifier, Progress, Verified, VerifyError};

pub use larder_verify::{Encoding, Expected};

use crate::error::ApiError;

/// The request body as a stream of byte frames.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, axum::Error>> + Send>>;

/// The most body bytes one verification job takes: what has already
/// arrived, up to this, so that a fast upload is a thread hop per megabyte
/// rather than per network frame.
const BATCH_SIZE: usize = 1 << 20;

/// The most NAR bytes one verification job hands out; a compressed batch
/// that decodes to more takes several jobs, each waiting for storage first.
const JOB_OUTPUT: usize = 1 << 20;

/// Batches read ahead of the verifier.
const INPUT_DEPTH: usize = 2;

/// Verified slices waiting for storage's reader (S3's `put_reader`).
const OUTPUT_DEPTH: usize = 4;

/// The request body as a stream.
pub fn body_stream(body: Body) -> BodyStream {
    Box::pin(body.into_data_stream())
}

/// A verified NAR in staging storage.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub key: ObjectKey,
    pub nar_hash: larder_nix::NarHash,
    pub nar_size: u64,
    /// The CRC-32 of the staged bytes, recorded with them for the chunker.
    pub crc32: u32,
}

/// A fresh staging key, `staging/<32 random lowercase hex>.nar`.
pub fn staging_key() -> ObjectKey {
    let random: [u8; 16] = rand::random();
    // Hex digits and a fixed prefix always make a valid key.
    ObjectKey::new(format!("staging/{}.nar", hex::encode(random)))
        .expect("a staging key is a valid object key")
}

/// The door's limits and the bounded pool its CPU work runs on, shared by
/// every upload.
///
/// The pool is tokio's blocking pool behind a semaphore of
/// `[ingest] verify-threads` permits, rather than threads of its own: a job
/// holds a permit and a thread only while it computes and writes its
/// output to a local file (never while its upload waits for the network or
/// for a remote storage, which the request's task does asynchronously), so
/// verification occupies at most that many of the pool's threads and the
/// rest stay free for other storage I/O and the pipeline, however many
/// uploads are open. Permits are handed out in
/// arrival order, so a busy upload cannot starve a quiet one, and no second
/// pool with its own queue is needed.
#[derive(Debug, Clone)]
pub struct Door {
    jobs: Arc<Semaphore>,
    limits: Limits,
}

impl Door {
    pub fn new(config: &IngestConfig) -> Self {
        Self {
            jobs: Arc::new(Semaphore::new(config.verify_threads())),
            limits: Limits {
                max_nar_size: config.max_nar_size,
                max_decompression_ratio: u64::from(config.max_decompression_ratio),
            },
        }
    }

    /// Runs one short CPU job on the pool, once a permit is free.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Rejection> {
        let permit = self.jobs.clone().acquire_owned().await.map_err(|_| {
            // The semaphore is never closed.
            Rejection::Internal(anyhow::anyhow!("the verification pool is closed"))
        })?;
        tokio::task::spawn_blocking(move || {
            let result = job();
            drop(permit);
            result
        })
        .await
        .map_err(|error| {
            Rejection::Internal(anyhow::anyhow!("a NAR verification job failed: {error}"))
        })
    }
}

/// Why a body was not spooled.
#[derive(Debug)]
enum Rejection {
    /// The body is not what it claims to be (400) or breaks a limit (413).
    Refused(VerifyError),
    /// The body could not be read to its end.
    Unreadable { encoding: Encoding, error: String },
    /// Storage stopped taking bytes; its own error says why.
    StorageGone,
    /// Storage failed to write a job's output.
    Storage(larder_storage::StorageError),
    /// A bug or a server failure.
    Internal(anyhow::Error),
}

impl Rejection {
    fn into_api_error(self) -> ApiError {
        match self {
            Self::Refused(error) if error.is_too_large() => {
                ApiError::PayloadTooLarge(error.to_string())
            }
            Self::Refused(error) => ApiError::BadRequest(error.to_string()),
            Self::Unreadable { encoding, error } => {
                ApiError::BadRequest(format!("could not read the {encoding}: {error}"))
            }
            Self::StorageGone => {
                ApiError::internal(anyhow::anyhow!("storage stopped reading a staged NAR"))
            }
            // Kept as the storage error, which the caller tells apart (a
            // full disk is a 507).
            Self::Storage(error) => ApiError::internal(error),
            Self::Internal(error) => ApiError::Internal(error),
        }
    }

    fn into_spool_error(self) -> SpoolError {
        match self {
            Self::Refused(VerifyError::NarTooLarge { limit }) => {
                SpoolError::PastBound { bound: limit }
            }
            rejection => SpoolError::Refused(rejection.into_api_error()),
        }
    }
}

/// Why a body was not spooled.
#[derive(Debug)]
pub enum SpoolError {
    /// It decoded to more than the `bound` it was spooled with, which the
    /// caller words in the terms of what set the bound (a quota, the disk,
    /// or `max-nar-size`).
    PastBound { bound: u64 },
    /// Any other refusal, as the client is to be told.
    Refused(ApiError),
}

impl From<SpoolError> for ApiError {
    fn from(error: SpoolError) -> Self {
        match error {
            SpoolError::PastBound { bound } => {
                ApiError::PayloadTooLarge(VerifyError::NarTooLarge { limit: bound }.to_string())
            }
            SpoolError::Refused(error) => error,
        }
    }
}

/// Verifies the body and writes it, uncompressed, to a fresh staging key,
/// refusing a NAR of more than `bound` bytes (at most `max-nar-size`). On
/// any failure nothing is left in storage.
pub async fn spool(
    door: &Door,
    storage: Arc<dyn Storage>,
    body: BodyStream,
    encoding: Encoding,
    expected: Expected,
    bound: u64,
) -> Result<Spooled, SpoolError> {
    let key = staging_key();
    let limits = Limits {
        max_nar_size: bound.min(door.limits.max_nar_size),
        ..door.limits
    };
    let checked = Checked {
        door,
        limits,
        encoding,
        expected,
    };
    let outcome = match storage.blocking_writer(&key).await {
        Ok(Some(writer)) => spool_in_jobs(checked, body, writer).await,
        Ok(None) => spool_through_reader(checked, body, storage.as_ref(), &key).await,
        Err(error) => Err(SpoolError::Refused(ApiError::internal(error))),
    };
    match outcome {
        Ok(verified) => Ok(Spooled {
            key,
            nar_hash: verified.nar_hash,
            nar_size: verified.nar_size,
            crc32: verified.crc32,
        }),
        Err(error) => {
            discard(storage.as_ref(), &key).await;
            Err(error)
        }
    }
}

/// What a body is checked against.
#[derive(Clone, Copy)]
struct Checked<'a> {
    door: &'a Door,
    limits: Limits,
    encoding: Encoding,
    expected: Expected,
}

/// Spools through a storage writer driven from blocking threads: each
/// job's output is written by a blocking job of its own while the next
/// verification job runs, so that hashing and writing use both cores (one
/// thread hop per megabyte for each, none per write). The object is
/// committed (flushed and put under its key) only after the verdict. Writes
/// and the commit run outside the pool's permits: they wait for the disk,
/// not the CPU.
async fn spool_in_jobs(
    checked: Checked<'_>,
    body: BodyStream,
    writer: Box<dyn BlockingWriter>,
) -> Result<Verified, SpoolError> {
    let mut staging = Staging {
        idle: Some(writer),
        writing: None,
    };
    let started = Instant::now();
    let verdict = check(checked, body, Output::Writer(&mut staging)).await;
    let verified_at = record_verdict_time(started);
    // The last write's outcome decides before the verdict: a NAR is only
    // as good as its staged copy.
    let written = staging.settle().await;
    let verdict = written.and(verdict);
    match (verdict, staging.idle) {
        (Ok(verified), Some(writer)) => {
            let committed = tokio::task::spawn_blocking(move || writer.commit()).await;
            larder().push_stage(PushStage::Spool, verified_at.elapsed());
            match committed {
                Ok(Ok(_)) => Ok(verified),
                Ok(Err(error)) => Err(SpoolError::Refused(ApiError::internal(error))),
                Err(error) => Err(SpoolError::Refused(ApiError::internal(anyhow::anyhow!(
                    "committing a staged NAR failed: {error}"
                )))),
            }
        }
        // Each write hands the writer back with its result.
        (Ok(_), None) => Err(SpoolError::Refused(ApiError::internal(anyhow::anyhow!(
            "a verified NAR's staging writer was lost"
        )))),
        (Err(rejection), writer) => {
            // Dropping the writer removes its file: a blocking call, made
            // on a blocking thread (and awaited, so that nothing is left
            // when the answer goes out).
            if let Some(writer) = writer {
                let _ = tokio::task::spawn_blocking(move || drop(writer)).await;
            }
            Err(rejection.into_spool_error())
        }
    }
}

/// Spools through [`Storage::put_reader`] (S3's multipart upload), fed by
/// a channel that the request's task fills with each job's output,
/// waiting for storage to take it, so that storage's pace holds back the
/// body.
async fn spool_through_reader(
    checked: Checked<'_>,
    body: BodyStream,
    storage: &dyn Storage,
    key: &ObjectKey,
) -> Result<Verified, SpoolError> {
    let (nar_sender, nar_receiver) = mpsc::channel::<io::Result<Bytes>>(OUTPUT_DEPTH);
    let started = Instant::now();
    let verifying = async move {
        let verdict = check(checked, body, Output::Channel(&nar_sender)).await;
        let verified_at = record_verdict_time(started);
        if let Err(rejection) = &verdict {
            // Storage must never see a clean end of a rejected NAR; it may
            // have gone already, and then there is nobody to tell.
            let _ = nar_sender
                .send(Err(io::Error::other(format!(
                    "the NAR was rejected: {rejection:?}"
                ))))
                .await;
        }
        // The end of the stream storage reads.
        drop(nar_sender);
        (verdict, verified_at)
    };
    let store = async {
        // Owned by this future, so that storage failing mid-write (a full
        // disk) drops the receiver: the verifier's next send fails and it
        // stops reading the body, instead of both waiting forever.
        let mut nar_receiver = nar_receiver;
        let verified_bytes = futures::stream::poll_fn(|cx| nar_receiver.poll_recv(cx));
        let mut reader = StreamReader::new(verified_bytes);
        storage.put_reader(key, &mut reader).await
    };
    let ((verdict, verified_at), stored) = tokio::join!(verifying, store);
    larder().push_stage(PushStage::Spool, verified_at.elapsed());
    match (verdict, stored) {
        (Ok(verified), Ok(_)) => Ok(verified),
        (Ok(_) | Err(Rejection::StorageGone), Err(error)) => {
            Err(SpoolError::Refused(ApiError::internal(error)))
        }
        (Err(rejection), _) => Err(rejection.into_spool_error()),
    }
}

/// Counts the time from `started` (the body's first read) to now as the
/// door's `receive_verify` stage, and returns now: from there on, what
/// storage takes is the `spool` stage.
fn record_verdict_time(started: Instant) -> Instant {
    let now = Instant::now();
    larder().push_stage(PushStage::ReceiveVerify, now - started);
    now
}

/// Deletes a staged object that will not be used; a failure is logged (the
/// reaper removes what is left in staging).
pub async fn discard(storage: &dyn Storage, key: &ObjectKey) {
    if let Err(error) = storage.delete(key).await {
        tracing::warn!(
            %key,
            error = format!("{:#}", anyhow::Error::new(error)),
            "could not delete a staged NAR"
        );
    }
}

/// Body frames that had arrived together, and the body's failure if it
/// failed after them.
struct Batch {
    frames: Vec<Bytes>,
    failure: Option<axum::Error>,
}

/// Where verified bytes go.
enum Output<'a> {
    /// Written by a blocking job, one job's output at a time.
    Writer(&'a mut Staging),
    /// Sent to storage's reader, waiting for it to take them.
    Channel(&'a mpsc::Sender<io::Result<Bytes>>),
}

/// A staging writer and the write in progress, if any: at most one at a
/// time, so writes land in order and at most one job's output waits.
struct Staging {
    /// The writer, when no write holds it.
    idle: Option<Box<dyn BlockingWriter>>,
    writing: Option<tokio::task::JoinHandle<WriteOutcome>>,
}

/// A finished write: the writer back, and whether the bytes were written.
type WriteOutcome = (
    Box<dyn BlockingWriter>,
    Result<(), larder_storage::StorageError>,
);

impl Staging {
    /// Waits for the write in progress, taking the writer back.
    async fn settle(&mut self) -> Result<(), Rejection> {
        let Some(writing) = self.writing.take() else {
            return Ok(());
        };
        let (writer, written) = writing.await.map_err(|error| {
            Rejection::Internal(anyhow::anyhow!("a staging write failed: {error}"))
        })?;
        self.idle = Some(writer);
        written.map_err(Rejection::Storage)
    }

    /// Writes `verified` on a blocking thread, once the write before it is
    /// done.
    async fn write(&mut self, verified: Vec<Bytes>) -> Result<(), Rejection> {
        self.settle().await?;
        if verified.is_empty() {
            return Ok(());
        }
        let Some(mut writer) = self.idle.take() else {
            return Err(Rejection::Internal(anyhow::anyhow!(
                "the staging writer was lost"
            )));
        };
        self.writing = Some(tokio::task::spawn_blocking(move || {
            let written = verified.iter().try_for_each(|bytes| writer.write(bytes));
            (writer, written)
        }));
        Ok(())
    }
}

/// The whole check: the body read ahead in batches while the verifier
/// works through them, both on this task, until the verdict. Verified
/// bytes go to `output`.
async fn check(
    checked: Checked<'_>,
    body: BodyStream,
    output: Output<'_>,
) -> Result<Verified, Rejection> {
    let (batch_sender, batch_receiver) = mpsc::channel(INPUT_DEPTH);
    let reading = read_batches(body, batch_sender);
    let verifying = verify_batches(checked, batch_receiver, output);
    tokio::pin!(reading, verifying);
    let mut read_all = false;
    loop {
        tokio::select! {
            // A verdict ends the reading too: a refused body is not read
            // on, however long its client keeps it open.
            verdict = &mut verifying => return verdict,
            () = &mut reading, if !read_all => read_all = true,
        }
    }
}

/// Reads the body and sends it on in batches of the frames that have
/// already arrived (up to [`BATCH_SIZE`]), until it ends, fails, or the
/// verifier stops listening; the channel closing is the end of the body.
async fn read_batches(mut body: BodyStream, sender: mpsc::Sender<Batch>) {
    loop {
        let mut batch = Batch {
            frames: Vec::new(),
            failure: None,
        };
        let mut size = 0;
        let mut ended = false;
        let mut next = body.next().await;
        loop {
            match next {
                None => ended = true,
                Some(Err(error)) => {
                    batch.failure = Some(error);
                    ended = true;
                }
                Some(Ok(frame)) => {
                    size += frame.len();
                    batch.frames.push(frame);
                }
            }
            if ended || size >= BATCH_SIZE {
                break;
            }
            // Only frames that are already there: waiting here would
            // delay the ones in hand.
            match body.next().now_or_never() {
                Some(more) => next = more,
                None => break,
            }
        }
        let has_news = !batch.frames.is_empty() || batch.failure.is_some();
        if (has_news && sender.send(batch).await.is_err()) || ended {
            return;
        }
    }
}

/// Feeds the batches to a [`NarVerifier`], one pool job at a time, and
/// each job's output to `output`.
async fn verify_batches(
    checked: Checked<'_>,
    mut batches: mpsc::Receiver<Batch>,
    mut output: Output<'_>,
) -> Result<Verified, Rejection> {
    let Checked {
        door,
        limits,
        encoding,
        expected,
    } = checked;
    let mut verifier = NarVerifier::new(encoding, expected, limits)
        .map_err(|error| Rejection::Internal(anyhow::Error::new(error)))?;
    let mut input = VecDeque::new();
    let mut end = false;
    let mut output_pending = false;
    loop {
        if !end && !output_pending {
            // Wait for body bytes, then take whatever else has arrived.
            let mut next = batches.recv().await;
            loop {
                match next {
                    None => end = true,
                    Some(batch) => {
                        input.extend(batch.frames);
                        if let Some(error) = batch.failure {
                            return Err(Rejection::Unreadable {
                                encoding,
                                error: error.to_string(),
                            });
                        }
                    }
                }
                if end || queued(&input) >= BATCH_SIZE {
                    break;
                }
                next = match batches.try_recv() {
                    Ok(batch) => Some(batch),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                };
            }
        }
        let mut job_input = std::mem::take(&mut input);
        let (returned, job_input, verified, progress) = door
            .run(move || {
                let mut verified = Vec::new();
                let progress = verifier.push(&mut job_input, end, &mut verified, JOB_OUTPUT);
                (verifier, job_input, verified, progress)
            })
            .await?;
        verifier = returned;
        input = job_input;
        let progress = progress.map_err(Rejection::Refused);
        match &mut output {
            // Bytes before a refusal are not worth writing.
            Output::Writer(staging) if progress.is_ok() => staging.write(verified).await?,
            Output::Writer(_) => {}
            Output::Channel(sender) => {
                for bytes in verified {
                    sender
                        .send(Ok(bytes))
                        .await
                        .map_err(|_| Rejection::StorageGone)?;
                }
            }
        }
        match progress? {
            Progress::OutputFull => output_pending = true,
            Progress::NeedInput => output_pending = false,
            Progress::Done => return verifier.finish().map_err(Rejection::Refused),
        }
    }
}

/// Bytes waiting in `input`.
fn queued(input: &VecDeque<Bytes>) -> usize {
    input.iter().map(Bytes::len).sum()
}

/// Reads a small body whole, refusing more than `limit` bytes.
pub async fn read_small_body(body: Body, limit: u64, what: &str) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut collected = Vec::new();
    while let Some(frame) = stream.next().await {
        let frame = frame.map_err(|error| {
            ApiError::bad_request(format!("could not read the {what}: {error}"))
        })?;
        if (collected.len() + frame.len()) as u64 > limit {
            return Err(ApiError::PayloadTooLarge(format!(
                "the {what} is larger than this server's limit of {limit} bytes"
            )));
        }
        collected.extend_from_slice(&frame);
    }
    Ok(collected.into())
}

/// The `Content-Encoding` of a small upload (narinfo, `.ls`, build log,
/// debug info): a name this server does not decode is a 415, answered
/// before anything is looked up or read.
pub fn content_encoding(headers: &HeaderMap) -> Result<ContentEncoding, ApiError> {
    ContentEncoding::parse(
        headers
            .get(header::CONTENT_ENCODING)
            .map(HeaderValue::as_bytes),
    )
    .map_err(|error| ApiError::UnsupportedMediaType(error.to_string()))
}

/// The limit on one kind of small upload: its decoded size, and what sets
/// it (`[ingest] max-log-size`), named in the 413.
#[derive(Debug, Clone, Copy)]
pub struct SmallBodyLimit {
    pub bytes: u64,
    pub setting: &'static str,
}

/// Reads a small upload whole and decodes it from `encoding`: at most
/// `limit` decoded bytes, and as for NARs at most
/// `[ingest] max-decompression-ratio` decoded bytes per body byte (plus
/// 1 MiB). The body is read asynchronously; decoding runs on the door's
/// pool in jobs of at most [`JOB_OUTPUT`] bytes, like a NAR's. Past a limit
/// is a 413, a body that does not decode a 400 (`what` names the upload in
/// both); nothing is kept either way.
pub async fn read_encoded_body(
    door: &Door,
    encoding: ContentEncoding,
    body: Body,
    limit: SmallBodyLimit,
    what: &str,
) -> Result<Bytes, ApiError> {
    let limits = BodyLimits {
        max_size: limit.bytes,
        max_decompression_ratio: door.limits.max_decompression_ratio,
    };
    let refused = |error: BodyDecodeError| {
        let message = format!("the {what} was refused: {error}");
        if error.is_too_large() {
            ApiError::PayloadTooLarge(format!("{message} ({})", limit.setting))
        } else {
            ApiError::BadRequest(message)
        }
    };
    let sent = read_small_body(body, limits.max_body_size(encoding), what)
        .await
        .map_err(|error| match error {
            ApiError::PayloadTooLarge(message) => {
                ApiError::PayloadTooLarge(format!("{message} ({})", limit.setting))
            }
            other => other,
        })?;
    if encoding == ContentEncoding::Identity {
        return Ok(sent);
    }
    let mut decoder = BodyDecoder::new(encoding, sent, limits).map_err(refused)?;
    loop {
        let (returned, outcome) = door
            .run(move || {
                let outcome = decoder.step(JOB_OUTPUT);
                (decoder, outcome)
            })
            .await
            .map_err(Rejection::into_api_error)?;
        decoder = returned;
        if outcome.map_err(refused)? {
            return Ok(decoder.finish().into());
        }
    }
}

/// Runs one CPU job of a small upload (compressing a log to store it) on
/// the door's pool.
pub async fn run_on_door<T: Send + 'static>(
    door: &Door,
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    door.run(job).await.map_err(Rejection::into_api_error)
}

/// Reads and drops a body Larder accepts but does not keep.
pub async fn drain(body: Body) -> Result<(), ApiError> {
    let mut stream = body.into_data_stream();
    while let Some(frame) = stream.next().await {
        frame
            .map_err(|error| ApiError::bad_request(format!("could not read the body: {error}")))?;
    }
    Ok(())
}

/// Splits an Attic preamble off the body: the first `size` bytes, and the
/// rest of the body (the NAR) as a stream.
pub async fn split_preamble(
    mut body: BodyStream,
    size: usize,
) -> Result<(Vec<u8>, BodyStream), ApiError> {
    let mut preamble = Vec::with_capacity(size);
    let mut rest = Bytes::new();
    while preamble.len() < size {
        let Some(frame) = body.next().await else {
            return Err(ApiError::bad_request(format!(
                "the body ends inside its {size}-byte preamble"
            )));
        };
        let mut frame = frame.map_err(|error| {
            ApiError::bad_request(format!("could not read the preamble: {error}"))
        })?;
        let wanted = (size - preamble.len()).min(frame.len());
        preamble.extend_from_slice(&frame.split_to(wanted));
        rest = frame;
    }
    let nar: BodyStream = if rest.is_empty() {
        body
    } else {
        Box::pin(futures::stream::once(async move { Ok(rest) }).chain(body))
    };
    Ok((preamble, nar))
}

#[cfg(test)]
mod tests {
    use super::*;
    use larder_nix::nar::NarEncoder;
    use larder_nix::{NarHash, Sha256Hash};
    use larder_storage::{LocalStorage, ObjectListing, ObjectReader, StorageError};
    use tokio::io::AsyncRead;

    /// Local storage without its blocking writer, so that the door spools
    /// through `put_reader` as it does to S3.
    #[derive(Debug)]
    struct ReaderOnly(LocalStorage);

    #[async_trait::async_trait]
    impl Storage for ReaderOnly {
        async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StorageError> {
            self.0.put(key, data).await
        }

        async fn put_reader(
            &self,
            key: &ObjectKey,
            reader: &mut (dyn AsyncRead + Send + Unpin),
        ) -> Result<u64, StorageError> {
            self.0.put_reader(key, reader).await
        }

        async fn get_range(
            &self,
            key: &ObjectKey,
            offset: u64,
            length: Option<u64>,
        ) -> Result<ObjectReader, StorageError> {
            self.0.get_range(key, offset, length).await
        }

        async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StorageError> {
            self.0.size(key).await
        }

        async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
            self.0.delete(key).await
        }

        fn list(&self, prefix: &ObjectKey) -> ObjectListing {
            self.0.list(prefix)
        }

        async fn check(&self) -> Result<(), StorageError> {
            self.0.check().await
        }
    }

    /// Local storage under `root` twice: as it is (the door writes in its
    /// verification jobs) and through `put_reader` alone (as to S3).
    async fn both_ways(root: &std::path::Path) -> [(&'static str, Arc<dyn Storage>); 2] {
        let local = LocalStorage::open(root).await.expect("storage");
        assert!(
            local
                .blocking_writer(&staging_key())
                .await
                .expect("a writer")
                .is_some(),
            "local storage has a blocking writer"
        );
        [
            ("blocking writer", Arc::new(local.clone())),
            ("put_reader", Arc::new(ReaderOnly(local))),
        ]
    }

    fn door(max_nar_size: u64) -> Door {
        Door::new(&IngestConfig {
            max_nar_size,
            ..IngestConfig::default()
        })
    }

    fn file_nar(contents: &[u8]) -> Vec<u8> {
        let mut encoder = NarEncoder::new(Vec::new()).expect("a Vec");
        encoder.regular(false, contents).expect("a file");
        encoder.finish().expect("a NAR")
    }

    /// The body cut into small frames, as a network would deliver it.
    fn framed(bytes: &[u8]) -> BodyStream {
        let frames: Vec<Result<Bytes, axum::Error>> = bytes
            .chunks(1000)
            .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
            .collect();
        Box::pin(futures::stream::iter(frames))
    }

    async fn staged_objects(root: &std::path::Path) -> usize {
        match std::fs::read_dir(root.join("staging")) {
            Ok(entries) => entries.count(),
            Err(_) => 0,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_zstd_body_is_stored_uncompressed_and_checked_against_its_name() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // Several jobs' worth of input and output, compressible within the
        // decompression-ratio bound.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let contents: Vec<u8> = (0..3_000_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Few distinct bytes: compressible, but not a bomb.
                (state % 16) as u8
            })
            .collect();
        let nar = file_nar(&contents);
        let compressed = zstd::bulk::compress(&nar, 3).expect("zstd");
        for (way, storage) in both_ways(dir.path()).await {
            let expected = Expected {
                file_hash: Some(Sha256Hash::digest(&compressed)),
                ..Expected::default()
            };
            let spooled = spool(
                &door(1 << 30),
                storage.clone(),
                framed(&compressed),
                Encoding::Zstd,
                expected,
                u64::MAX,
            )
            .await
            .expect("a valid upload");
            assert_eq!(
                spooled.nar_hash,
                NarHash::from(Sha256Hash::digest(&nar)),
                "{way}"
            );
            let stored = storage
                .get_bytes(&spooled.key, 0, nar.len() as u64)
                .await
                .expect("the staged NAR");
            assert_eq!(stored.as_ref(), nar.as_slice(), "{way}");
            assert_eq!(
                storage.size(&spooled.key).await.expect("a size"),
                Some(nar.len() as u64),
                "{way}"
            );
            storage.delete(&spooled.key).await.expect("deleting it");

            // The same bytes under another name: rejected, nothing kept.
            let wrong = Expected {
                file_hash: Some(Sha256Hash::digest(b"other")),
                ..Expected::default()
            };
            let error = spool(
                &door(1 << 30),
                storage.clone(),
                framed(&compressed),
                Encoding::Zstd,
                wrong,
                u64::MAX,
            )
            .await
            .map_err(ApiError::from)
            .expect_err("a wrong file hash");
            assert!(matches!(error, ApiError::BadRequest(_)), "{way}: {error}");
            assert_eq!(staged_objects(dir.path()).await, 0, "{way}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plain_body_is_stored_as_sent() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let nar = file_nar(
            &(0..5_000_000u32)
                .map(|i| (i % 241) as u8)
                .collect::<Vec<_>>(),
        );
        for (way, storage) in both_ways(dir.path()).await {
            let expected = Expected {
                nar_hash: Some(NarHash::from(Sha256Hash::digest(&nar))),
                nar_size: Some(nar.len() as u64),
                ..Expected::default()
            };
            let spooled = spool(
                &door(1 << 30),
                storage.clone(),
                framed(&nar),
                Encoding::Plain,
                expected,
                u64::MAX,
            )
            .await
            .expect("a valid upload");
            assert_eq!(spooled.nar_size, nar.len() as u64, "{way}");
            let stored = storage
                .get_bytes(&spooled.key, 0, nar.len() as u64)
                .await
                .expect("the staged NAR");
            assert_eq!(stored.as_ref(), nar.as_slice(), "{way}");
            assert_eq!(staged_objects(dir.path()).await, 1, "{way}: the NAR alone");
            storage.delete(&spooled.key).await.expect("deleting it");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_bodies_leave_nothing() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // Longer than a job, so that some of it is written before the end
        // shows what is wrong.
        let nar = file_nar(&vec![1u8; 3_000_000]);
        let cases: Vec<(&str, Vec<u8>, Expected, u64)> = vec![
            (
                "truncated",
                nar[..nar.len() - 8].to_vec(),
                Expected::default(),
                1 << 30,
            ),
            ("not a NAR", vec![0u8; 5000], Expected::default(), 1 << 30),
            (
                "trailing bytes",
                [nar.clone(), vec![0; 8]].concat(),
                Expected::default(),
                1 << 30,
            ),
            (
                "over the limit",
                nar.clone(),
                Expected::default(),
                2_000_000,
            ),
            (
                "wrong size",
                nar.clone(),
                Expected {
                    nar_size: Some(nar.len() as u64 + 1),
                    ..Expected::default()
                },
                1 << 30,
            ),
            (
                "wrong hash",
                nar.clone(),
                Expected {
                    nar_hash: Some(NarHash::from(Sha256Hash::digest(b"other"))),
                    ..Expected::default()
                },
                1 << 30,
            ),
        ];
        for (way, storage) in both_ways(dir.path()).await {
            for (case, body, expected, limit) in &cases {
                let error = spool(
                    &door(*limit),
                    storage.clone(),
                    framed(body),
                    Encoding::Plain,
                    *expected,
                    u64::MAX,
                )
                .await
                .map_err(ApiError::from)
                .expect_err(case);
                assert!(
                    matches!(
                        error,
                        ApiError::BadRequest(_) | ApiError::PayloadTooLarge(_)
                    ),
                    "{way}, {case}: {error}"
                );
                assert_eq!(staged_objects(dir.path()).await, 0, "{way}, {case}");
            }
        }
    }

    /// A body that sends `first` and then nothing, never ending: a client
    /// that stalled.
    fn stalled(first: Vec<u8>) -> BodyStream {
        Box::pin(
            futures::stream::once(async move { Ok(Bytes::from(first)) })
                .chain(futures::stream::pending()),
        )
    }

    #[test]
    fn stalled_uploads_hold_no_blocking_thread() {
        // Few blocking threads: were every stalled upload to hold one, the
        // storage write below would wait for a thread forever.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(4)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let storage: Arc<dyn Storage> =
                Arc::new(LocalStorage::open(dir.path()).await.expect("storage"));
            let nar = file_nar(&vec![3u8; 100_000]);
            let door = door(1 << 30);
            let uploads: Vec<_> = (0..16)
                .map(|i| {
                    let (door, storage) = (door.clone(), storage.clone());
                    let body = if i % 2 == 0 {
                        (Encoding::Plain, nar[..4000].to_vec())
                    } else {
                        let compressed = zstd::bulk::compress(&nar, 3).expect("zstd");
                        (Encoding::Zstd, compressed[..compressed.len() / 2].to_vec())
                    };
                    tokio::spawn(async move {
                        spool(
                            &door,
                            storage,
                            stalled(body.1),
                            body.0,
                            Expected::default(),
                            u64::MAX,
                        )
                        .await
                    })
                })
                .collect();
            // Every upload has begun its staged object; a generous bound
            // only guards against a hang.
            let started = async {
                while staged_objects(dir.path()).await < 16 {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(60), started)
                .await
                .expect("every upload starts");
            let key = ObjectKey::new("other/object").expect("a key");
            let put = storage.put(&key, Bytes::from_static(b"another tenant's bytes"));
            tokio::time::timeout(std::time::Duration::from_secs(60), put)
                .await
                .expect("storage I/O is not starved by stalled uploads")
                .expect("a storage write");
            for upload in &uploads {
                assert!(!upload.is_finished(), "a stalled upload ended");
            }
            for upload in uploads {
                upload.abort();
            }
        });
    }

    #[tokio::test]
    async fn a_preamble_is_split_across_frames() {
        let body = framed(&[vec![b'{'; 2500], b"NAR".to_vec()].concat());
        let (preamble, rest) = split_preamble(body, 2500).await.expect("a preamble");
        assert_eq!(preamble.len(), 2500);
        let rest: Vec<Bytes> = rest.map(|frame| frame.expect("a frame")).collect().await;
        assert_eq!(rest.concat(), b"NAR");
    }
}
