//! Verifying a pushed NAR body as its bytes arrive, push-style: the server
//! feeds [`NarVerifier`] the body's frames, and it decodes them (zstd, xz,
//! or nothing for a plain NAR), hashes the bytes as sent, checks the NAR's
//! strict grammar, hash and size, and hands back the verified NAR bytes, at
//! most a given amount per call. It does no IO and never waits, so
//! `ingest-api` runs it as short jobs on a bounded pool while the request
//! itself waits for the network asynchronously, and the fuzz target
//! `upload_decoders` drives it exactly as the server does.
//!
//! # Modules
//!
//! - Here: [`NarVerifier`], a pushed NAR body's verification.
//! - [`encoded`] — decoding the small uploads (narinfo, `.ls`, logs) sent
//!   with a `Content-Encoding`.
//! - [`harness`] (feature `harness`, and tests) — the verifier driven as the
//!   server drives it, with every bound checked.
//!
//! Besides a body that is not what it claims to be, it refuses work out of
//! proportion to what the sender sent:
//! - more decoded bytes than the server's `max-nar-size`, or than the
//!   NarSize the upload declared: it stops at the first byte past the
//!   limit, which is never handed out;
//! - more decoded bytes than `max-decompression-ratio` times the body bytes
//!   consumed so far, plus [`RATIO_ALLOWANCE`]: a decompression bomb is cut
//!   off after writing about as much as its sender could have sent plainly
//!   at that ratio;
//! - decoder memory beyond what Nix itself can write: [`XZ_MEMORY_LIMIT`]
//!   and [`ZSTD_WINDOW_LOG_MAX`]. Decoders allocate these lazily, so what is
//!   resident grows only with what was decoded, which the ratio bounds.

use std::collections::VecDeque;
use std::fmt;

use bytes::{Bytes, BytesMut};

use larder_nix::hash::Sha256Hasher;
use larder_nix::nar::{NarError, NarReader};
use larder_nix::{NarHash, Sha256Hash};

/// The memory the xz decoder may use: what a 64 MiB dictionary needs.
///
/// Nix (2.8 through 2.34 at least) compresses with libarchive's xz filter,
/// whose `compression-level` (Nix's `compression-level`) is a single digit
/// 0–9 mapped to liblzma's presets without the extreme flag, 6 by default
/// (an 8 MiB dictionary). Level 9 has the largest dictionary, 64 MiB, which
/// liblzma decodes in 65 MiB (the "DecMem" column of xz(1)); Nix's
/// `parallel-compression` changes the block size, not the dictionary, and
/// the server decodes single-threaded. The next dictionary size an LZMA2
/// header can declare is 96 MiB, which is refused, and so is anything up to
/// the format's 4 GiB.
pub const XZ_MEMORY_LIMIT: u64 = 65 << 20;

/// The base-2 logarithm of the largest zstd window decoded: 128 MiB.
///
/// Nix compresses with libarchive's zstd filter, which takes levels up to
/// `ZSTD_maxCLevel()` (22) and, from Nix, no `long` (window log) option.
/// zstd derives the window from the level (clevels.h, for inputs of
/// unknown size): 2 MiB at Nix's default level 3, 8 MiB at 19, 32 MiB at
/// 20, 64 MiB at 21 and 128 MiB (2^27) at 22; multi-threaded compression
/// keeps the level's window. 2^27 is also zstd's own default decoder limit,
/// named here so that it is documented and a frame beyond it gets a clear
/// answer.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// Decoded bytes a compressed body may yield beyond the ratio bound: small
/// NARs are never refused for their ratio, and the unit in which decoders
/// produce output (a zstd block is at most 128 KiB) never trips it at the
/// start of a stream.
pub const RATIO_ALLOWANCE: u64 = 1 << 20;

/// The most output one decoder call produces, so that the ratio and size
/// bounds are checked often and no call holds much memory.
const DECODE_STEP: usize = 128 * 1024;

/// How the body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The NAR itself.
    Plain,
    Zstd,
    Xz,
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Plain => "NAR",
            Self::Zstd => "zstd-compressed NAR",
            Self::Xz => "xz-compressed NAR",
        })
    }
}

/// What the body must turn out to be; unset fields are not checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expected {
    /// The SHA-256 of the body as sent (Nix's `FileHash`).
    pub file_hash: Option<Sha256Hash>,
    pub nar_hash: Option<NarHash>,
    /// The NarSize the upload declared: no byte past it is decoded.
    pub nar_size: Option<u64>,
}

/// The server's limits on any upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest NAR, in decoded bytes (`[ingest] max-nar-size`).
    pub max_nar_size: u64,
    /// Decoded bytes allowed per body byte consumed, beyond
    /// [`RATIO_ALLOWANCE`] (`[ingest] max-decompression-ratio`); plain NARs
    /// have a ratio of 1 by construction.
    pub max_decompression_ratio: u64,
}

impl Limits {
    /// The largest compressed body: compressed data may be a little larger
    /// than what it holds, and beyond that a body that decodes to little
    /// (empty or skippable frames) is not read forever.
    pub fn max_body_size(&self) -> u64 {
        self.max_nar_size
            .saturating_add(self.max_nar_size / 8)
            .saturating_add(1 << 20)
    }
}

/// A verified NAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// The CRC-32 of the NAR bytes handed out: of what staging holds once
    /// they are written. The chunker checks the staged copy against it
    /// instead of hashing the NAR again.
    pub crc32: u32,
}

/// Why a body was refused. [`VerifyError::is_too_large`] tells the limits
/// (a 413) from bodies that are not what they claim to be (a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the NAR is larger than this server's limit of {limit} bytes ([ingest] max-nar-size)")]
    NarTooLarge { limit: u64 },
    #[error("the {encoding} body is larger than this server's limit of {limit} bytes")]
    BodyTooLarge { encoding: Encoding, limit: u64 },
    #[error(
        "the {encoding} decodes to more than {ratio} times its size: {decoded} bytes from the \
         first {consumed}, past this server's [ingest] max-decompression-ratio of {ratio} (plus \
         {allowance} bytes); push it uncompressed (compression=none) instead",
        allowance = RATIO_ALLOWANCE
    )]
    RatioExceeded {
        encoding: Encoding,
        ratio: u64,
        consumed: u64,
        decoded: u64,
    },
    #[error("the NAR is longer than the {declared} bytes its NarSize declares")]
    LongerThanDeclared { declared: u64 },
    #[error(
        "the xz stream needs more memory to decode than this server's limit of {limit} bytes \
         (a 64 MiB dictionary, xz level 9, the most Nix writes)"
    )]
    XzMemoryLimit { limit: u64 },
    #[error(
        "a zstd frame's window is larger than this server's limit of {limit} bytes (window log \
         {log}, zstd level 22, the most Nix writes)",
        log = ZSTD_WINDOW_LOG_MAX
    )]
    ZstdWindowTooLarge { limit: u64 },
    #[error("could not decode the {encoding}: {message}")]
    Decode { encoding: Encoding, message: String },
    #[error("the {encoding} is truncated")]
    Truncated { encoding: Encoding },
    #[error("the {encoding} is followed by trailing bytes")]
    TrailingBytes { encoding: Encoding },
    #[error(
        "the {encoding} does not end with its NAR: the compressed stream is cut short or \
         followed by trailing bytes"
    )]
    UnendedAfterNar { encoding: Encoding },
    #[error("the body is not a valid NAR: {0}")]
    Nar(#[from] NarError),
    #[error("the body's SHA-256 is {}, not the {} its name says", actual.to_base32(), claimed.to_base32())]
    FileHashMismatch {
        claimed: Sha256Hash,
        actual: Sha256Hash,
    },
    #[error("NarSize mismatch: the NAR has {actual} bytes, {claimed} were claimed")]
    NarSizeMismatch { claimed: u64, actual: u64 },
    #[error("NarHash mismatch: the NAR hashes to {actual}, {claimed} was claimed")]
    NarHashMismatch { claimed: NarHash, actual: NarHash },
}

impl VerifyError {
    /// Whether a server limit refused the body, rather than its content.
    pub fn is_too_large(&self) -> bool {
        match self {
            Self::NarTooLarge { .. } | Self::BodyTooLarge { .. } | Self::RatioExceeded { .. } => {
                true
            }
            Self::LongerThanDeclared { .. }
            | Self::XzMemoryLimit { .. }
            | Self::ZstdWindowTooLarge { .. }
            | Self::Decode { .. }
            | Self::Truncated { .. }
            | Self::TrailingBytes { .. }
            | Self::UnendedAfterNar { .. }
            | Self::Nar(_)
            | Self::FileHashMismatch { .. }
            | Self::NarSizeMismatch { .. }
            | Self::NarHashMismatch { .. } => false,
        }
    }
}

/// Why a call to [`NarVerifier::push`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// All the input was used: push more, or the end of the body.
    NeedInput,
    /// `max_output` bytes were handed out: push again, with the input that
    /// is left (possibly none), before anything else.
    OutputFull,
    /// The body ended and was decoded to its end: call
    /// [`NarVerifier::finish`].
    Done,
}

/// The push-style verifier of one body.
pub struct NarVerifier {
    /// The body's decoder; none for a plain NAR.
    decoder: Option<Decoder>,
    checks: Checks,
    done: bool,
}

/// Everything but the decoder, so that both can be borrowed at once.
struct Checks {
    encoding: Encoding,
    expected: Expected,
    limits: Limits,
    /// The SHA-256 of the body as sent; a plain body's is its NAR hash, so
    /// it is not hashed twice.
    file_hasher: Option<Sha256Hasher>,
    nar: NarReader,
    /// The CRC-32 of the NAR bytes handed out (`Verified::crc32`).
    crc32: crc32fast::Hasher,
    /// Body bytes consumed so far.
    consumed: u64,
    /// NAR bytes decoded (and handed out) so far.
    decoded: u64,
}

impl fmt::Debug for NarVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NarVerifier")
            .field("encoding", &self.checks.encoding)
            .field("consumed", &self.checks.consumed)
            .field("decoded", &self.checks.decoded)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl NarVerifier {
    /// A verifier for one body; fails only when a decoder cannot be
    /// allocated, which is the server's problem, not the body's.
    pub fn new(
        encoding: Encoding,
        expected: Expected,
        limits: Limits,
    ) -> Result<Self, std::io::Error> {
        let decoder = match encoding {
            Encoding::Plain => None,
            Encoding::Zstd => {
                let mut decoder = zstd::stream::raw::Decoder::new()?;
                decoder.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
                    ZSTD_WINDOW_LOG_MAX,
                ))?;
                Some(Decoder::Zstd {
                    decoder,
                    frame_complete: true,
                })
            }
            Encoding::Xz => Some(Decoder::Xz(
                liblzma::stream::Stream::new_stream_decoder(
                    XZ_MEMORY_LIMIT,
                    liblzma::stream::CONCATENATED,
                )
                .map_err(std::io::Error::other)?,
            )),
        };
        Ok(Self {
            decoder,
            checks: Checks {
                encoding,
                expected,
                limits,
                file_hasher: (encoding != Encoding::Plain).then(Sha256Hasher::new),
                nar: NarReader::new(),
                crc32: crc32fast::Hasher::new(),
                consumed: 0,
                decoded: 0,
            },
            done: false,
        })
    }

    /// Body bytes consumed so far.
    pub fn consumed(&self) -> u64 {
        self.checks.consumed
    }

    /// NAR bytes decoded and handed out so far.
    pub fn decoded(&self) -> u64 {
        self.checks.decoded
    }

    /// Consumes body bytes from the front of `input` (the body's next
    /// frames, in order; `end` when they are the last) and appends the
    /// verified NAR bytes they decode to `output`, stopping once
    /// `max_output` bytes were appended in this call. Bytes past a limit are
    /// never appended: the call fails first. After an error the verifier
    /// must not be used again.
    pub fn push(
        &mut self,
        input: &mut VecDeque<Bytes>,
        end: bool,
        output: &mut Vec<Bytes>,
        max_output: usize,
    ) -> Result<Progress, VerifyError> {
        let progress = match &mut self.decoder {
            None => self.checks.push_plain(input, end, output, max_output)?,
            Some(decoder) => {
                let mut buffer = BytesMut::new();
                let progress =
                    self.checks
                        .decode_into(decoder, input, end, &mut buffer, max_output);
                if !buffer.is_empty() {
                    // A mostly empty buffer is copied, so that what waits
                    // for storage holds no more memory than its bytes.
                    output.push(if buffer.len() < buffer.capacity() / 2 {
                        Bytes::copy_from_slice(&buffer)
                    } else {
                        buffer.freeze()
                    });
                }
                progress?
            }
        };
        self.done = progress == Progress::Done;
        Ok(progress)
    }

    /// Ends a verification whose last [`push`](Self::push) returned
    /// [`Progress::Done`]: checks that the NAR is complete and that it and
    /// the body are what `expected` says.
    pub fn finish(self) -> Result<Verified, VerifyError> {
        let checks = self.checks;
        if !self.done {
            return Err(VerifyError::Truncated {
                encoding: checks.encoding,
            });
        }
        let summary = checks.nar.finish()?;
        let file_hash = match checks.file_hasher {
            Some(hasher) => hasher.finish().0,
            None => *summary.nar_hash.sha256(),
        };
        let expected = checks.expected;
        if let Some(claimed) = expected.file_hash {
            if claimed != file_hash {
                return Err(VerifyError::FileHashMismatch {
                    claimed,
                    actual: file_hash,
                });
            }
        }
        if let Some(claimed) = expected.nar_size {
            if claimed != summary.nar_size {
                return Err(VerifyError::NarSizeMismatch {
                    claimed,
                    actual: summary.nar_size,
                });
            }
        }
        if let Some(claimed) = expected.nar_hash {
            if claimed != summary.nar_hash {
                return Err(VerifyError::NarHashMismatch {
                    claimed,
                    actual: summary.nar_hash,
                });
            }
        }
        Ok(Verified {
            nar_hash: summary.nar_hash,
            nar_size: summary.nar_size,
            crc32: checks.crc32.finalize(),
        })
    }
}

impl Checks {
    /// A plain body is its own output: frames are checked and handed on
    /// without a copy.
    fn push_plain(
        &mut self,
        input: &mut VecDeque<Bytes>,
        end: bool,
        output: &mut Vec<Bytes>,
        max_output: usize,
    ) -> Result<Progress, VerifyError> {
        let mut produced = 0usize;
        while let Some(frame) = input.front_mut() {
            if frame.is_empty() {
                input.pop_front();
                continue;
            }
            if produced >= max_output {
                return Ok(Progress::OutputFull);
            }
            let room = self.room();
            if room == 0 {
                return Err(self.limit_error());
            }
            let n = frame
                .len()
                .min(clamp_to_usize(room))
                .min(max_output - produced);
            let slice = frame.split_to(n);
            self.nar.update(&slice)?;
            self.crc32.update(&slice);
            self.consumed += n as u64;
            self.decoded += n as u64;
            produced += n;
            output.push(slice);
        }
        Ok(if end {
            Progress::Done
        } else {
            Progress::NeedInput
        })
    }

    /// Runs the decoder until the input is used up, `max_output` bytes are
    /// in `buffer`, the stream ends, or a check fails; `buffer` holds only
    /// verified bytes in every case.
    fn decode_into(
        &mut self,
        decoder: &mut Decoder,
        input: &mut VecDeque<Bytes>,
        end: bool,
        buffer: &mut BytesMut,
        max_output: usize,
    ) -> Result<Progress, VerifyError> {
        loop {
            while input.front().is_some_and(Bytes::is_empty) {
                input.pop_front();
            }
            if buffer.len() >= max_output {
                return Ok(Progress::OutputFull);
            }
            if buffer.capacity() == 0 {
                buffer.reserve(max_output);
            }
            // With no room left, one byte of space still shows whether the
            // decoder has more: that byte is then refused, never handed out.
            let space = clamp_to_usize(self.room())
                .min(DECODE_STEP)
                .min(max_output - buffer.len())
                .max(1);
            let start = buffer.len();
            buffer.resize(start + space, 0);
            let (slice, last): (&[u8], bool) = match input.front() {
                Some(frame) => (frame, end && input.len() == 1),
                None => (&[], end),
            };
            let step = decoder.step(slice, &mut buffer[start..], last);
            buffer.truncate(start + step.written);
            if step.consumed > 0 {
                // Something was consumed, so there is a front frame.
                if let Some(frame) = input.front_mut() {
                    let taken = frame.split_to(step.consumed);
                    if let Some(hasher) = &mut self.file_hasher {
                        hasher.update(&taken);
                    }
                }
                self.consumed += step.consumed as u64;
                let limit = self.limits.max_body_size();
                if self.consumed > limit {
                    buffer.truncate(start);
                    return Err(VerifyError::BodyTooLarge {
                        encoding: self.encoding,
                        limit,
                    });
                }
            }
            if step.written > 0 {
                if self.decoded + step.written as u64 > self.bound() {
                    buffer.truncate(start);
                    return Err(self.limit_error());
                }
                if let Err(error) = self.nar.update(&buffer[start..]) {
                    buffer.truncate(start);
                    return Err(error.into());
                }
                self.crc32.update(&buffer[start..]);
                self.decoded += step.written as u64;
            }
            if let Some(failure) = step.failure {
                return Err(self.decode_error(failure));
            }
            if step.ended {
                return Ok(Progress::Done);
            }
            if step.consumed == 0 && step.written == 0 {
                if !input.is_empty() {
                    // Decoders always move with input and output space;
                    // stopping anyway must not spin.
                    return Err(VerifyError::Decode {
                        encoding: self.encoding,
                        message: "the decoder stopped making progress".to_owned(),
                    });
                }
                return match (end, self.nar.is_complete()) {
                    (false, _) => Ok(Progress::NeedInput),
                    (true, false) => Err(VerifyError::Truncated {
                        encoding: self.encoding,
                    }),
                    // The decoder wants more than the NAR: either its
                    // stream was cut after the NAR, or bytes after the NAR
                    // look like the start of another.
                    (true, true) => Err(VerifyError::UnendedAfterNar {
                        encoding: self.encoding,
                    }),
                };
            }
        }
    }

    /// The most NAR bytes the body may have decoded to by now.
    fn bound(&self) -> u64 {
        let mut bound = self.limits.max_nar_size;
        if let Some(declared) = self.expected.nar_size {
            bound = bound.min(declared);
        }
        if self.encoding != Encoding::Plain {
            bound = bound.min(
                self.limits
                    .max_decompression_ratio
                    .saturating_mul(self.consumed)
                    .saturating_add(RATIO_ALLOWANCE),
            );
        }
        bound
    }

    /// How many more NAR bytes may be decoded now.
    fn room(&self) -> u64 {
        self.bound().saturating_sub(self.decoded)
    }

    /// The limit the next decoded byte breaks, most specific first.
    fn limit_error(&self) -> VerifyError {
        if let Some(declared) = self.expected.nar_size {
            if self.decoded >= declared {
                return VerifyError::LongerThanDeclared { declared };
            }
        }
        if self.decoded >= self.limits.max_nar_size {
            return VerifyError::NarTooLarge {
                limit: self.limits.max_nar_size,
            };
        }
        VerifyError::RatioExceeded {
            encoding: self.encoding,
            ratio: self.limits.max_decompression_ratio,
            consumed: self.consumed,
            decoded: self.decoded,
        }
    }

    fn decode_error(&self, failure: DecodeFailure) -> VerifyError {
        match failure {
            DecodeFailure::ZstdWindow => VerifyError::ZstdWindowTooLarge {
                limit: 1 << ZSTD_WINDOW_LOG_MAX,
            },
            DecodeFailure::XzMemory => VerifyError::XzMemoryLimit {
                limit: XZ_MEMORY_LIMIT,
            },
            // Whatever follows a complete NAR is not part of it; that it
            // does not even decode is the lesser news.
            DecodeFailure::Corrupt(_) if self.nar.is_complete() => VerifyError::TrailingBytes {
                encoding: self.encoding,
            },
            DecodeFailure::Corrupt(message) => VerifyError::Decode {
                encoding: self.encoding,
                message,
            },
        }
    }
}

/// A `u64` count as a `usize`, saturating (only 32-bit targets saturate).
fn clamp_to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The decoder of a body's encoding.
enum Decoder {
    Zstd {
        decoder: zstd::stream::raw::Decoder<'static>,
        /// Whether the last frame begun was also finished and flushed
        /// (true before the first): a body may only end there.
        frame_complete: bool,
    },
    Xz(liblzma::stream::Stream),
}

/// What one decoder call did. A call that fails may still have consumed
/// input and written valid output before the failure.
struct Step {
    consumed: usize,
    written: usize,
    /// The stream ended (only when the input given was the last).
    ended: bool,
    failure: Option<DecodeFailure>,
}

/// Why a decoder gave up.
enum DecodeFailure {
    ZstdWindow,
    XzMemory,
    Corrupt(String),
}

impl Decoder {
    /// Decodes from `input` into `output`; `last` says that `input` is all
    /// that is left of the body.
    fn step(&mut self, input: &[u8], output: &mut [u8], last: bool) -> Step {
        match self {
            Self::Zstd {
                decoder,
                frame_complete,
            } => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                use zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode;
                let mut in_buffer = InBuffer::around(input);
                let mut out_buffer = OutBuffer::around(output);
                let outcome = decoder.run(&mut in_buffer, &mut out_buffer);
                let (consumed, written) = (in_buffer.pos(), out_buffer.pos());
                let failure = match outcome {
                    Ok(hint) => {
                        if consumed > 0 || written > 0 {
                            // 0: a frame is complete and fully flushed.
                            *frame_complete = hint == 0;
                        }
                        None
                    }
                    Err(error) => {
                        let window = error
                            .get_ref()
                            .and_then(|inner| inner.downcast_ref::<zstd::Error>())
                            .is_some_and(|inner| {
                                inner.is(ZSTD_ErrorCode::ZSTD_error_frameParameter_windowTooLarge)
                            });
                        Some(if window {
                            DecodeFailure::ZstdWindow
                        } else {
                            DecodeFailure::Corrupt(error.to_string())
                        })
                    }
                };
                Step {
                    consumed,
                    written,
                    ended: failure.is_none() && last && consumed == input.len() && *frame_complete,
                    failure,
                }
            }
            Self::Xz(stream) => {
                use liblzma::stream::{Action, Error, Status};
                let (in_before, out_before) = (stream.total_in(), stream.total_out());
                // With concatenated streams, only `Finish` tells liblzma
                // that no further stream follows.
                let action = if last { Action::Finish } else { Action::Run };
                let outcome = stream.process(input, output, action);
                // Both totals only grow, by at most the buffers' lengths,
                // also in a call that fails.
                let consumed = usize::try_from(stream.total_in() - in_before)
                    .expect("consumed at most the input slice");
                let written = usize::try_from(stream.total_out() - out_before)
                    .expect("wrote at most the output slice");
                let (ended, failure) = match outcome {
                    Ok(status) => (status == Status::StreamEnd, None),
                    Err(error) => (
                        false,
                        Some(match error {
                            Error::MemLimit => DecodeFailure::XzMemory,
                            Error::Data => DecodeFailure::Corrupt("corrupt data".to_owned()),
                            Error::Format => {
                                DecodeFailure::Corrupt("not in the xz format".to_owned())
                            }
                            Error::Options => {
                                DecodeFailure::Corrupt("unsupported options".to_owned())
                            }
                            other => DecodeFailure::Corrupt(format!("{other:?}")),
                        }),
                    ),
                };
                Step {
                    consumed,
                    written,
                    ended,
                    failure,
                }
            }
        }
    }
}

pub mod encoded;
#[cfg(any(test, feature = "harness"))]
pub mod harness;
#[cfg(test)]
mod tests;
