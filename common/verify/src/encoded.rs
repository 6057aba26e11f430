//! Decoding the small uploads Nix may send with a `Content-Encoding`
//! (narinfos, `.ls` listings and build logs, with Nix ≥ 2.33's
//! `narinfo-compression`, `ls-compression` and `log-compression`): the
//! body, already received whole, decoded under the same kind of bounds as a
//! NAR upload.
//!
//! - At most `max_size` decoded bytes (the caller's limit for that kind of
//!   file): the first byte past it is never kept.
//! - At most `max_decompression_ratio` decoded bytes per body byte, plus
//!   [`RATIO_ALLOWANCE`]: a bomb is cut off after about as much work as
//!   its sender could have caused by sending the bytes plainly.
//! - The body itself at most [`BodyLimits::max_body_size`].
//! - Decoder memory as for NARs: zstd windows up to
//!   [`ZSTD_WINDOW_LOG_MAX`], xz within [`XZ_MEMORY_LIMIT`]; gzip (32 KiB),
//!   brotli (16 MiB without the large-window extension, which the decoder
//!   does not accept) and bzip2 (under 4 MiB) are bounded by their formats.
//!
//! Decoding is stepped ([`BodyDecoder::step`] hands out at most a given
//! number of bytes per call) so that the server runs it as short jobs on its
//! verification pool; it does no IO and never waits (the body is in memory).
//! The same decoders as the NAR door's are used for zstd and xz (the `zstd`
//! and `liblzma` crates with the same limits).

use std::fmt;
use std::io::{self, Read};

use bytes::Bytes;

use super::{RATIO_ALLOWANCE, XZ_MEMORY_LIMIT, ZSTD_WINDOW_LOG_MAX};

/// The most bytes one read of the decoder produces, so that the bounds are
/// checked often.
const DECODE_STEP: usize = 64 * 1024;

/// A request's `Content-Encoding`, as Nix writes it (`showCompressionAlgo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentEncoding {
    /// No header, `identity`, or Nix's `none`.
    Identity,
    Gzip,
    Zstd,
    Xz,
    Brotli,
    Bzip2,
}

/// A `Content-Encoding` this server does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the Content-Encoding {0:?} is not supported; use one of identity, gzip, zstd, xz, br, bzip2"
)]
pub struct UnsupportedEncoding(pub String);

impl ContentEncoding {
    /// Every encoding decoded here, identity first.
    pub const ALL: [Self; 6] = [
        Self::Identity,
        Self::Gzip,
        Self::Zstd,
        Self::Xz,
        Self::Brotli,
        Self::Bzip2,
    ];

    /// The encoding a header value names (absent: identity). Names are
    /// matched without regard to case; a list of several encodings is
    /// refused like any unknown name.
    pub fn parse(value: Option<&[u8]>) -> Result<Self, UnsupportedEncoding> {
        let Some(value) = value else {
            return Ok(Self::Identity);
        };
        let text = std::str::from_utf8(value)
            .map_err(|_| UnsupportedEncoding(String::from_utf8_lossy(value).into_owned()))?
            .trim();
        Ok(match text.to_ascii_lowercase().as_str() {
            "" | "identity" | "none" => Self::Identity,
            "gzip" | "x-gzip" => Self::Gzip,
            "zstd" => Self::Zstd,
            "xz" => Self::Xz,
            "br" => Self::Brotli,
            "bzip2" => Self::Bzip2,
            _ => return Err(UnsupportedEncoding(text.chars().take(64).collect())),
        })
    }

    /// The name the header uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
            Self::Xz => "xz",
            Self::Brotli => "br",
            Self::Bzip2 => "bzip2",
        }
    }
}

impl fmt::Display for ContentEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The bounds on one body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// The most decoded bytes.
    pub max_size: u64,
    /// Decoded bytes allowed per body byte, beyond [`RATIO_ALLOWANCE`].
    pub max_decompression_ratio: u64,
}

impl BodyLimits {
    /// The largest body sent with `encoding`: the decoded limit itself
    /// when plain; compressed data may be a little larger than what it
    /// holds, as for NARs.
    pub fn max_body_size(&self, encoding: ContentEncoding) -> u64 {
        match encoding {
            ContentEncoding::Identity => self.max_size,
            _ => self
                .max_size
                .saturating_add(self.max_size / 8)
                .saturating_add(1 << 20),
        }
    }
}

/// Why a body was refused. [`BodyDecodeError::is_too_large`] tells the
/// limits (a 413) from bodies that do not decode (a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyDecodeError {
    #[error("it is larger than this server's limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("its {encoding} body of {body} bytes is larger than this server's limit of {limit}")]
    BodyTooLarge {
        encoding: ContentEncoding,
        body: u64,
        limit: u64,
    },
    #[error(
        "its {encoding} body of {body} bytes decodes to more than {ratio} times its size, past \
         this server's [ingest] max-decompression-ratio (plus {allowance} bytes)",
        allowance = RATIO_ALLOWANCE
    )]
    RatioExceeded {
        encoding: ContentEncoding,
        body: u64,
        ratio: u64,
    },
    #[error("it could not be decoded as {encoding}: {message}")]
    Decode {
        encoding: ContentEncoding,
        message: String,
    },
}

impl BodyDecodeError {
    /// Whether a server limit refused the body, rather than its content.
    pub fn is_too_large(&self) -> bool {
        match self {
            Self::TooLarge { .. } | Self::BodyTooLarge { .. } | Self::RatioExceeded { .. } => true,
            Self::Decode { .. } => false,
        }
    }
}

/// The stepped decoder of one body received whole.
pub struct BodyDecoder {
    encoding: ContentEncoding,
    /// The decoder reading the body; `None` once it ended.
    reader: Option<Box<dyn Read + Send>>,
    body_len: u64,
    limits: BodyLimits,
    output: Vec<u8>,
}

impl fmt::Debug for BodyDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodyDecoder")
            .field("encoding", &self.encoding)
            .field("body_len", &self.body_len)
            .field("decoded", &self.output.len())
            .finish_non_exhaustive()
    }
}

impl BodyDecoder {
    /// A decoder of `body`, refused at once when the body alone is past
    /// its limit.
    pub fn new(
        encoding: ContentEncoding,
        body: Bytes,
        limits: BodyLimits,
    ) -> Result<Self, BodyDecodeError> {
        let body_len = body.len() as u64;
        let limit = limits.max_body_size(encoding);
        if body_len > limit {
            return Err(match encoding {
                ContentEncoding::Identity => BodyDecodeError::TooLarge {
                    limit: limits.max_size,
                },
                _ => BodyDecodeError::BodyTooLarge {
                    encoding,
                    body: body_len,
                    limit,
                },
            });
        }
        let input = io::Cursor::new(body);
        let decode_error = |error: io::Error| BodyDecodeError::Decode {
            encoding,
            message: error.to_string(),
        };
        let reader: Box<dyn Read + Send> = match encoding {
            ContentEncoding::Identity => Box::new(input),
            ContentEncoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
            ContentEncoding::Zstd => {
                let mut decoder = zstd::stream::read::Decoder::new(input).map_err(decode_error)?;
                decoder
                    .window_log_max(ZSTD_WINDOW_LOG_MAX)
                    .map_err(decode_error)?;
                Box::new(decoder)
            }
            ContentEncoding::Xz => {
                let stream = liblzma::stream::Stream::new_stream_decoder(
                    XZ_MEMORY_LIMIT,
                    liblzma::stream::CONCATENATED,
                )
                .map_err(|error| decode_error(io::Error::other(error)))?;
                Box::new(liblzma::read::XzDecoder::new_stream(input, stream))
            }
            ContentEncoding::Brotli => {
                Box::new(brotli_decompressor::Decompressor::new(input, DECODE_STEP))
            }
            ContentEncoding::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(input)),
        };
        Ok(Self {
            encoding,
            reader: Some(reader),
            body_len,
            limits,
            output: Vec::new(),
        })
    }

    /// The most decoded bytes this body may yield.
    fn bound(&self) -> u64 {
        match self.encoding {
            ContentEncoding::Identity => self.limits.max_size,
            _ => self.limits.max_size.min(
                self.limits
                    .max_decompression_ratio
                    .saturating_mul(self.body_len)
                    .saturating_add(RATIO_ALLOWANCE),
            ),
        }
    }

    /// The limit the next decoded byte breaks.
    fn limit_error(&self) -> BodyDecodeError {
        if self.output.len() as u64 >= self.limits.max_size {
            BodyDecodeError::TooLarge {
                limit: self.limits.max_size,
            }
        } else {
            BodyDecodeError::RatioExceeded {
                encoding: self.encoding,
                body: self.body_len,
                ratio: self.limits.max_decompression_ratio,
            }
        }
    }

    /// Decodes up to `max_output` more bytes; `Ok(true)` once the body has
    /// been decoded to its end. Bytes past a limit are never kept: the call
    /// fails first. After an error the decoder must not be used again.
    pub fn step(&mut self, max_output: usize) -> Result<bool, BodyDecodeError> {
        let mut produced = 0usize;
        while produced < max_output {
            let room = self.bound().saturating_sub(self.output.len() as u64);
            // With no room left, one byte of space still shows whether the
            // decoder has more: that byte is then refused.
            let space = usize::try_from(room)
                .unwrap_or(usize::MAX)
                .min(DECODE_STEP)
                .min(max_output - produced)
                .max(1);
            let Some(reader) = self.reader.as_mut() else {
                return Ok(true);
            };
            let start = self.output.len();
            self.output.resize(start + space, 0);
            let read = match reader.read(&mut self.output[start..]) {
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => 0,
                Err(error) => {
                    self.output.truncate(start);
                    return Err(BodyDecodeError::Decode {
                        encoding: self.encoding,
                        message: error.to_string(),
                    });
                }
            };
            self.output.truncate(start + read);
            if read == 0 {
                self.reader = None;
                return Ok(true);
            }
            if room == 0 {
                self.output.truncate(start);
                return Err(self.limit_error());
            }
            produced += read;
        }
        Ok(false)
    }

    /// The decoded bytes, once [`step`](Self::step) said the end was
    /// reached (before that, what was decoded so far).
    pub fn finish(self) -> Vec<u8> {
        self.output
    }
}

/// Decodes a whole body in one go, for tests and the fuzz harness: the
/// server steps through [`BodyDecoder`] on its pool instead.
pub fn decode_body(
    encoding: ContentEncoding,
    body: Bytes,
    limits: BodyLimits,
) -> Result<Vec<u8>, BodyDecodeError> {
    let mut decoder = BodyDecoder::new(encoding, body, limits)?;
    while !decoder.step(1 << 20)? {}
    Ok(decoder.finish())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const LIMITS: BodyLimits = BodyLimits {
        max_size: 1 << 20,
        max_decompression_ratio: 1000,
    };

    fn compress(encoding: ContentEncoding, data: &[u8]) -> Vec<u8> {
        match encoding {
            ContentEncoding::Identity => data.to_vec(),
            ContentEncoding::Gzip => {
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                encoder.write_all(data).unwrap();
                encoder.finish().unwrap()
            }
            ContentEncoding::Zstd => zstd::bulk::compress(data, 3).unwrap(),
            ContentEncoding::Xz => {
                let mut encoder = liblzma::write::XzEncoder::new(Vec::new(), 6);
                encoder.write_all(data).unwrap();
                encoder.finish().unwrap()
            }
            ContentEncoding::Bzip2 => {
                let mut encoder =
                    bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
                encoder.write_all(data).unwrap();
                encoder.finish().unwrap()
            }
            // The crate decodes only; a fixed stream made by `brotli -c`
            // of the text below.
            ContentEncoding::Brotli => {
                assert_eq!(data, BROTLI_TEXT);
                BROTLI_STREAM.to_vec()
            }
        }
    }

    const BROTLI_TEXT: &[u8] = b"hello, build log\n";
    /// A brotli stream of [`BROTLI_TEXT`] written by hand (RFC 7932): a
    /// 16-bit window, one uncompressed meta-block of 17 bytes (`MNIBBLES`
    /// 4, `MLEN - 1` = 16, `ISUNCOMPRESSED`), then an empty last one.
    const BROTLI_STREAM: &[u8] = b"\x00\x01\x10hello, build log\n\x03";

    #[test]
    fn parses_what_nix_sends_and_refuses_the_rest() {
        let parse = |text: &str| ContentEncoding::parse(Some(text.as_bytes()));
        assert_eq!(ContentEncoding::parse(None), Ok(ContentEncoding::Identity));
        assert_eq!(parse("none"), Ok(ContentEncoding::Identity));
        assert_eq!(parse("Identity"), Ok(ContentEncoding::Identity));
        for encoding in ContentEncoding::ALL {
            assert_eq!(parse(encoding.name()), Ok(encoding));
        }
        assert_eq!(parse(" ZSTD "), Ok(ContentEncoding::Zstd));
        for unknown in ["lz4", "compress", "gzip, br", "deflate"] {
            let error = parse(unknown).unwrap_err();
            assert!(error.to_string().contains(unknown), "{error}");
        }
        assert!(ContentEncoding::parse(Some(b"\xff")).is_err());
    }

    #[test]
    fn every_encoding_round_trips() {
        for encoding in ContentEncoding::ALL {
            let data = BROTLI_TEXT;
            let decoded = decode_body(encoding, compress(encoding, data).into(), LIMITS).unwrap();
            assert_eq!(decoded, data, "{encoding}");
        }
    }

    #[test]
    fn large_bodies_decode_in_bounded_steps() {
        let data: Vec<u8> = (0..300_000u32).flat_map(|n| n.to_le_bytes()).collect();
        for encoding in ContentEncoding::ALL
            .into_iter()
            .filter(|e| *e != ContentEncoding::Brotli)
        {
            let limits = BodyLimits {
                max_size: 2 << 20,
                ..LIMITS
            };
            let mut decoder =
                BodyDecoder::new(encoding, compress(encoding, &data).into(), limits).unwrap();
            let mut steps = 0;
            let mut before = 0;
            while !decoder.step(100_000).unwrap() {
                steps += 1;
                assert!(decoder.output.len() - before <= 100_000);
                before = decoder.output.len();
            }
            assert!(steps >= 11, "{encoding}: {steps} steps");
            assert_eq!(decoder.finish(), data, "{encoding}");
        }
    }

    #[test]
    fn garbage_and_truncation_are_decode_errors() {
        for encoding in ContentEncoding::ALL
            .into_iter()
            .filter(|e| *e != ContentEncoding::Identity)
        {
            let garbage = decode_body(
                encoding,
                Bytes::from_static(b"not compressed at all"),
                LIMITS,
            );
            assert!(
                matches!(garbage, Err(BodyDecodeError::Decode { .. })),
                "{encoding}: {garbage:?}"
            );
            let mut whole = compress(encoding, BROTLI_TEXT);
            whole.truncate(whole.len() - 2);
            let cut = decode_body(encoding, whole.into(), LIMITS);
            assert!(
                matches!(cut, Err(BodyDecodeError::Decode { .. })),
                "{encoding}: {cut:?}"
            );
        }
    }

    #[test]
    fn size_and_ratio_limits_refuse_before_keeping_bytes() {
        let zeros = vec![0u8; 4 << 20];
        for encoding in ContentEncoding::ALL
            .into_iter()
            .filter(|e| *e != ContentEncoding::Brotli)
        {
            let body: Bytes = compress(encoding, &zeros).into();
            let small = BodyLimits {
                max_size: 3 << 20,
                max_decompression_ratio: 1_000_000,
            };
            let error = decode_body(encoding, body.clone(), small).unwrap_err();
            assert!(error.is_too_large(), "{encoding}: {error}");
            if encoding == ContentEncoding::Identity {
                continue;
            }
            let tight = BodyLimits {
                max_size: 64 << 20,
                max_decompression_ratio: 2,
            };
            let mut decoder = BodyDecoder::new(encoding, body.clone(), tight).unwrap();
            let error = loop {
                match decoder.step(1 << 20) {
                    Ok(false) => {}
                    Ok(true) => panic!("{encoding}: a bomb decoded"),
                    Err(error) => break error,
                }
            };
            assert!(
                matches!(error, BodyDecodeError::RatioExceeded { .. }),
                "{encoding}: {error}"
            );
            assert!(decoder.output.len() as u64 <= 2 * body.len() as u64 + RATIO_ALLOWANCE);
        }
        let error = BodyDecoder::new(
            ContentEncoding::Identity,
            Bytes::from(vec![b'x'; 11]),
            BodyLimits {
                max_size: 10,
                max_decompression_ratio: 1,
            },
        )
        .unwrap_err();
        assert_eq!(error, BodyDecodeError::TooLarge { limit: 10 });
    }

    #[test]
    fn a_zstd_window_past_the_limit_is_refused() {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        encoder
            .set_parameter(zstd::stream::raw::CParameter::WindowLog(
                ZSTD_WINDOW_LOG_MAX + 1,
            ))
            .unwrap();
        encoder.write_all(b"a window too large").unwrap();
        let body = encoder.finish().unwrap();
        let error = decode_body(ContentEncoding::Zstd, body.into(), LIMITS).unwrap_err();
        assert!(matches!(error, BodyDecodeError::Decode { .. }), "{error}");
    }
}
