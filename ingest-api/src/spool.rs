//! Receiving a NAR at the door: one streaming pass over the request body
//! that decompresses it when Nix sent it compressed, hashes the bytes as
//! sent and as a NAR, validates the NAR with the strict reader, counts its
//! size against the limit, and writes the verified bytes to
//! `staging/<random>.nar`.
//!
//! The CPU work (decompression, SHA-256, NAR grammar) runs on a blocking
//! thread, so a large upload never stalls the runtime's workers. Bytes flow
//! body → verifier → storage through two small bounded channels, so memory
//! per upload is a few buffers whatever the NAR's size. The verifier ends
//! the stream it feeds to storage with an error on any mismatch, so storage
//! never completes an object for a rejected body, and whatever was written
//! is deleted before the answer.

use std::io::{self, Read};
use std::pin::Pin;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::io::StreamReader;

use common::nix::hash::Sha256Hasher;
use common::nix::nar::NarReader;
use common::nix::{NarHash, Sha256Hash};
use common::storage::{ObjectKey, Storage};

use crate::error::ApiError;

/// The request body as a stream of byte frames.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, axum::Error>> + Send>>;

/// How many frames wait in each channel between the body, the verifier and
/// storage.
const CHANNEL_DEPTH: usize = 8;

/// The size of the buffer the verifier reads decompressed bytes into.
const READ_BUFFER_SIZE: usize = 256 * 1024;

/// The request body as a stream.
pub fn body_stream(body: Body) -> BodyStream {
    Box::pin(body.into_data_stream())
}

/// How the body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The NAR itself.
    Plain,
    Zstd,
    Xz,
}

impl Encoding {
    fn describe(self) -> &'static str {
        match self {
            Self::Plain => "NAR",
            Self::Zstd => "zstd-compressed NAR",
            Self::Xz => "xz-compressed NAR",
        }
    }
}

/// What the body must turn out to be; unset fields are not checked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expected {
    /// The SHA-256 of the body as sent (Nix's `FileHash`).
    pub file_hash: Option<Sha256Hash>,
    pub nar_hash: Option<NarHash>,
    pub nar_size: Option<u64>,
}

/// A verified NAR.
#[derive(Debug, Clone)]
pub struct Verified {
    pub nar_hash: NarHash,
    pub nar_size: u64,
}

/// A verified NAR in staging storage.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub key: ObjectKey,
    pub nar_hash: NarHash,
    pub nar_size: u64,
}

/// A fresh staging key, `staging/<32 random lowercase hex>.nar`.
pub fn staging_key() -> ObjectKey {
    let random: [u8; 16] = rand::random();
    // Hex digits and a fixed prefix always make a valid key.
    ObjectKey::new(format!("staging/{}.nar", hex::encode(random)))
        .expect("a staging key is a valid object key")
}

/// Why the verifier stopped.
#[derive(Debug)]
enum Rejection {
    /// The body is not what it claims to be: a 400.
    Invalid(String),
    /// The NAR (or the body) is larger than the limit: a 413.
    TooLarge(String),
    /// Storage stopped taking bytes; its own error says why.
    StorageGone,
}

impl Rejection {
    fn into_api_error(self) -> ApiError {
        match self {
            Self::Invalid(message) => ApiError::BadRequest(message),
            Self::TooLarge(message) => ApiError::PayloadTooLarge(message),
            Self::StorageGone => {
                ApiError::internal(anyhow::anyhow!("storage stopped reading a staged NAR"))
            }
        }
    }
}

/// Verifies the body and writes it, uncompressed, to a fresh staging key.
/// On any failure nothing is left in storage.
pub async fn spool(
    storage: Arc<dyn Storage>,
    body: BodyStream,
    encoding: Encoding,
    expected: Expected,
    max_nar_size: u64,
) -> Result<Spooled, ApiError> {
    let key = staging_key();
    let (body_sender, body_receiver) = mpsc::channel(CHANNEL_DEPTH);
    let (nar_sender, nar_receiver) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_DEPTH);
    let verifier = tokio::task::spawn_blocking(move || {
        verify_blocking(
            body_receiver,
            Some(nar_sender),
            encoding,
            expected,
            max_nar_size,
        )
    });
    let store = async {
        // Owned by this future, so that storage failing mid-write (a full
        // disk) drops the receiver: the verifier's next send fails and it
        // stops reading the body, instead of both waiting forever.
        let mut nar_receiver = nar_receiver;
        let verified_bytes = futures::stream::poll_fn(|cx| nar_receiver.poll_recv(cx));
        let mut reader = StreamReader::new(verified_bytes);
        storage.put_reader(&key, &mut reader).await
    };
    let ((), stored) = tokio::join!(pump_body(body, body_sender), store);
    let verdict = verifier
        .await
        .map_err(|error| ApiError::internal(anyhow::anyhow!("the NAR verifier failed: {error}")));
    let outcome = match (verdict, stored) {
        (Ok(Ok(verified)), Ok(_)) => {
            return Ok(Spooled {
                key,
                nar_hash: verified.nar_hash,
                nar_size: verified.nar_size,
            })
        }
        (Ok(Err(Rejection::StorageGone)) | Ok(Ok(_)), Err(error)) => ApiError::internal(error),
        (Ok(Err(rejection)), _) => rejection.into_api_error(),
        (Err(error), _) => error,
    };
    discard(storage.as_ref(), &key).await;
    Err(outcome)
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

/// Forwards the body's frames to the verifier until the body ends, fails,
/// or the verifier stops listening.
async fn pump_body(mut body: BodyStream, sender: mpsc::Sender<io::Result<Bytes>>) {
    while let Some(frame) = body.next().await {
        let (frame, last) = match frame {
            Ok(bytes) => (Ok(bytes), false),
            Err(error) => (Err(io::Error::other(error)), true),
        };
        if sender.send(frame).await.is_err() || last {
            return;
        }
    }
}

/// The body as a blocking reader over the channel, hashing and counting
/// the bytes as sent.
struct ChannelReader {
    receiver: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    hasher: Sha256Hasher,
    max_body_size: u64,
}

impl Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(error)) => return Err(error),
                None => return Ok(0),
            }
        }
        let n = buffer.len().min(self.current.len());
        let bytes = self.current.split_to(n);
        self.hasher.update(&bytes);
        if self.hasher.len() > self.max_body_size {
            return Err(io::Error::new(io::ErrorKind::FileTooLarge, BodyTooLarge));
        }
        buffer[..n].copy_from_slice(&bytes);
        Ok(n)
    }
}

/// The marker error of a body past its limit.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than the limit")]
struct BodyTooLarge;

/// The whole check, on a blocking thread. When `output` is given, every
/// verified slice goes there, and any failure is sent as an error before
/// the channel closes, so the storage side never sees a clean end of a
/// rejected NAR.
fn verify_blocking(
    input: mpsc::Receiver<io::Result<Bytes>>,
    output: Option<mpsc::Sender<io::Result<Bytes>>>,
    encoding: Encoding,
    expected: Expected,
    max_nar_size: u64,
) -> Result<Verified, Rejection> {
    let verdict = check(input, output.as_ref(), encoding, expected, max_nar_size);
    if let (Err(rejection), Some(output)) = (&verdict, &output) {
        // Storage may have gone already; then there is nobody to tell.
        let _ = output.blocking_send(Err(io::Error::other(format!(
            "the NAR was rejected: {rejection:?}"
        ))));
    }
    verdict
}

fn check(
    input: mpsc::Receiver<io::Result<Bytes>>,
    output: Option<&mpsc::Sender<io::Result<Bytes>>>,
    encoding: Encoding,
    expected: Expected,
    max_nar_size: u64,
) -> Result<Verified, Rejection> {
    let what = encoding.describe();
    let too_large = || {
        Rejection::TooLarge(format!(
            "the NAR is larger than this server's limit of {max_nar_size} bytes"
        ))
    };
    let mut source = ChannelReader {
        receiver: input,
        current: Bytes::new(),
        hasher: Sha256Hasher::new(),
        // Compressed data may be a little larger than what it holds; beyond
        // that, a body that decompresses to little is not read forever.
        max_body_size: max_nar_size
            .saturating_add(max_nar_size / 8)
            .saturating_add(1 << 20),
    };
    let read_error = |error: io::Error| {
        if error
            .get_ref()
            .is_some_and(|inner| inner.is::<BodyTooLarge>())
        {
            too_large()
        } else {
            Rejection::Invalid(format!("could not read the {what}: {error}"))
        }
    };
    let mut nar = NarReader::new();
    {
        let mut decoder: Box<dyn Read + '_> = match encoding {
            Encoding::Plain => Box::new(&mut source),
            Encoding::Zstd => Box::new(zstd::stream::read::Decoder::new(&mut source).map_err(
                |error| Rejection::Invalid(format!("could not start decoding zstd: {error}")),
            )?),
            Encoding::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(&mut source)),
        };
        let mut buffer = vec![0u8; READ_BUFFER_SIZE];
        loop {
            let n = decoder.read(&mut buffer).map_err(read_error)?;
            if n == 0 {
                break;
            }
            if nar.bytes_read() + n as u64 > max_nar_size {
                return Err(too_large());
            }
            nar.update(&buffer[..n]).map_err(|error| {
                Rejection::Invalid(format!("the body is not a valid NAR: {error}"))
            })?;
            if let Some(output) = output {
                output
                    .blocking_send(Ok(Bytes::copy_from_slice(&buffer[..n])))
                    .map_err(|_| Rejection::StorageGone)?;
            }
        }
    }
    // The decoder stops at the end of its data; anything after it is not
    // part of the NAR and must not be silently ignored.
    let mut rest = [0u8; 1];
    if source.read(&mut rest).map_err(read_error)? != 0 {
        return Err(Rejection::Invalid(format!(
            "the {what} is followed by trailing bytes"
        )));
    }
    let summary = nar
        .finish()
        .map_err(|error| Rejection::Invalid(format!("the body is not a valid NAR: {error}")))?;
    let (file_hash, _) = source.hasher.finish();
    if let Some(claimed) = expected.file_hash {
        if claimed != file_hash {
            return Err(Rejection::Invalid(format!(
                "the body's SHA-256 is {}, not the {} its name says",
                file_hash.to_base32(),
                claimed.to_base32()
            )));
        }
    }
    if let Some(claimed) = expected.nar_size {
        if claimed != summary.nar_size {
            return Err(Rejection::Invalid(format!(
                "NarSize mismatch: the NAR has {} bytes, {claimed} were claimed",
                summary.nar_size
            )));
        }
    }
    if let Some(claimed) = expected.nar_hash {
        if claimed != summary.nar_hash {
            return Err(Rejection::Invalid(format!(
                "NarHash mismatch: the NAR hashes to {}, {claimed} was claimed",
                summary.nar_hash
            )));
        }
    }
    Ok(Verified {
        nar_hash: summary.nar_hash,
        nar_size: summary.nar_size,
    })
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
    use common::nix::nar::NarEncoder;
    use common::storage::LocalStorage;

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
        let storage: Arc<dyn Storage> =
            Arc::new(LocalStorage::open(dir.path()).await.expect("storage"));
        let nar = file_nar(&vec![7u8; 300_000]);
        let compressed = zstd::bulk::compress(&nar, 3).expect("zstd");
        let expected = Expected {
            file_hash: Some(Sha256Hash::digest(&compressed)),
            ..Expected::default()
        };
        let spooled = spool(
            storage.clone(),
            framed(&compressed),
            Encoding::Zstd,
            expected,
            1 << 30,
        )
        .await
        .expect("a valid upload");
        assert_eq!(spooled.nar_hash, NarHash::from(Sha256Hash::digest(&nar)));
        let stored = storage
            .get_bytes(&spooled.key, 0, nar.len() as u64)
            .await
            .expect("the staged NAR");
        assert_eq!(stored.as_ref(), nar.as_slice());

        // The same bytes under another name: rejected, nothing kept.
        let wrong = Expected {
            file_hash: Some(Sha256Hash::digest(b"other")),
            ..Expected::default()
        };
        let error = spool(
            storage.clone(),
            framed(&compressed),
            Encoding::Zstd,
            wrong,
            1 << 30,
        )
        .await
        .expect_err("a wrong file hash");
        assert!(matches!(error, ApiError::BadRequest(_)), "{error}");
        assert_eq!(staged_objects(dir.path()).await, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_bodies_leave_nothing() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let storage: Arc<dyn Storage> =
            Arc::new(LocalStorage::open(dir.path()).await.expect("storage"));
        let nar = file_nar(&vec![1u8; 100_000]);
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
            ("over the limit", nar.clone(), Expected::default(), 50_000),
            (
                "wrong size",
                nar.clone(),
                Expected {
                    nar_size: Some(nar.len() as u64 + 1),
                    ..Expected::default()
                },
                1 << 30,
            ),
        ];
        for (case, body, expected, limit) in cases {
            let error = spool(
                storage.clone(),
                framed(&body),
                Encoding::Plain,
                expected,
                limit,
            )
            .await
            .expect_err(case);
            assert!(
                matches!(
                    error,
                    ApiError::BadRequest(_) | ApiError::PayloadTooLarge(_)
                ),
                "{case}: {error}"
            );
        }
        assert_eq!(staged_objects(dir.path()).await, 0);
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
