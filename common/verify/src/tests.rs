//! `NarVerifier` driven as the server drives it (`verify::harness`): every
//! encoding, bound and refusal of an uploaded NAR body.

use std::io::{Read, Write};

use super::harness::{run, Run};
use super::*;
use larder_nix::nar::{NarEncoder, NarErrorKind};

const MIB: u64 = 1 << 20;

fn limits(max_nar_size: u64, max_decompression_ratio: u64) -> Limits {
    Limits {
        max_nar_size,
        max_decompression_ratio,
    }
}

const GENEROUS: Limits = Limits {
    max_nar_size: 1 << 30,
    max_decompression_ratio: 1 << 20,
};

/// A NAR of one regular file.
fn file_nar(contents: &[u8]) -> Vec<u8> {
    let mut encoder = NarEncoder::new(Vec::new()).expect("a Vec");
    encoder.regular(false, contents).expect("a file");
    encoder.finish().expect("a NAR")
}

/// A NAR of one file of `size` zero bytes, written straight into `out`.
fn zeros_nar_into<W: Write>(size: u64, out: W) -> W {
    let mut encoder = NarEncoder::new(out).expect("a writer");
    encoder
        .regular_from_reader(false, size, &mut std::io::repeat(0).take(size))
        .expect("a file");
    encoder.finish().expect("a NAR")
}

/// Bytes zstd and xz cannot shrink (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).expect("zstd")
}

fn xz(data: &[u8], preset: u32) -> Vec<u8> {
    let mut encoder = liblzma::write::XzEncoder::new(Vec::new(), preset);
    encoder.write_all(data).expect("xz");
    encoder.finish().expect("xz")
}

fn encode(encoding: Encoding, nar: &[u8]) -> Vec<u8> {
    match encoding {
        Encoding::Plain => nar.to_vec(),
        Encoding::Zstd => zstd(nar),
        Encoding::Xz => xz(nar, 6),
    }
}

fn verify(encoding: Encoding, expected: Expected, limits: Limits, body: &[u8]) -> Run {
    run(encoding, expected, limits, body, || 16 * 1024, 1 << 20)
}

const ENCODINGS: [Encoding; 3] = [Encoding::Plain, Encoding::Zstd, Encoding::Xz];

#[test]
fn every_encoding_verifies_at_any_framing_and_output_bound() {
    let small = file_nar(&[b"hello ".repeat(3000), noise(3000)].concat());
    let large = file_nar(&[noise(700_000), vec![5u8; 600_000]].concat());
    for encoding in ENCODINGS {
        for (nar, frame_sizes, max_outputs) in [
            (&small, &[1usize, 7, 4096][..], &[1usize, 1000, 1 << 20][..]),
            (
                &large,
                &[16 * 1024, 300_000, usize::MAX][..],
                &[4096, 1 << 20][..],
            ),
        ] {
            let body = encode(encoding, nar);
            for &frame_size in frame_sizes {
                for &max_output in max_outputs {
                    let expected = Expected {
                        file_hash: Some(Sha256Hash::digest(&body)),
                        nar_hash: Some(NarHash::from(Sha256Hash::digest(nar))),
                        nar_size: Some(nar.len() as u64),
                    };
                    let run = run(
                        encoding,
                        expected,
                        GENEROUS,
                        &body,
                        || frame_size,
                        max_output,
                    );
                    let case = format!("{encoding}, frames of {frame_size}, output {max_output}");
                    let verified = run.result.unwrap_or_else(|error| panic!("{case}: {error}"));
                    assert_eq!(verified.nar_size, nar.len() as u64, "{case}");
                    assert_eq!(run.output, *nar, "{case}");
                }
            }
        }
    }
}

#[test]
fn concatenated_zstd_frames_and_xz_streams_are_one_body() {
    let nar = file_nar(&noise(200_000));
    let (head, tail) = nar.split_at(77_777);
    for (encoding, body) in [
        (Encoding::Zstd, [zstd(head), zstd(tail)].concat()),
        (Encoding::Xz, [xz(head, 1), xz(tail, 1)].concat()),
    ] {
        let run = verify(encoding, Expected::default(), GENEROUS, &body);
        assert_eq!(run.result.expect("a valid body").nar_size, nar.len() as u64);
        assert_eq!(run.output, nar);
    }
}

#[test]
fn claims_that_do_not_match_are_refused() {
    let nar = file_nar(b"contents");
    let other = NarHash::from(Sha256Hash::digest(b"other"));
    for encoding in ENCODINGS {
        let body = encode(encoding, &nar);
        let cases = [
            Expected {
                file_hash: Some(Sha256Hash::digest(b"other")),
                ..Expected::default()
            },
            Expected {
                nar_hash: Some(other),
                ..Expected::default()
            },
            Expected {
                nar_size: Some(nar.len() as u64 + 8),
                ..Expected::default()
            },
        ];
        let errors: Vec<VerifyError> = cases
            .into_iter()
            .map(|expected| {
                verify(encoding, expected, GENEROUS, &body)
                    .result
                    .expect_err("a wrong claim")
            })
            .collect();
        assert!(
            matches!(
                errors.as_slice(),
                [
                    VerifyError::FileHashMismatch { .. },
                    VerifyError::NarHashMismatch { .. },
                    VerifyError::NarSizeMismatch { .. },
                ]
            ),
            "{encoding}: {errors:?}"
        );
        assert!(errors.iter().all(|error| !error.is_too_large()));
    }
}

#[test]
fn a_plain_body_is_hashed_once_as_its_file_hash() {
    let nar = file_nar(b"contents");
    let expected = Expected {
        file_hash: Some(Sha256Hash::digest(&nar)),
        ..Expected::default()
    };
    verify(Encoding::Plain, expected, GENEROUS, &nar)
        .result
        .expect("the file hash of a plain NAR is its NAR hash");
}

#[test]
fn bodies_that_are_not_nars_are_refused() {
    let nar = file_nar(&noise(50_000));
    let nar_error = |error: &VerifyError| match error {
        VerifyError::Nar(error) => Some(error.kind.clone()),
        _ => None,
    };
    for encoding in ENCODINGS {
        // Truncated inside the NAR, but a complete compressed stream.
        let body = encode(encoding, &nar[..nar.len() - 8]);
        let error = verify(encoding, Expected::default(), GENEROUS, &body)
            .result
            .expect_err("a truncated NAR");
        assert!(
            matches!(nar_error(&error), Some(NarErrorKind::Truncated { .. })),
            "{encoding}: {error}"
        );
        // Not a NAR at all.
        let body = encode(encoding, &noise(5000));
        let error = verify(encoding, Expected::default(), GENEROUS, &body)
            .result
            .expect_err("not a NAR");
        assert!(
            matches!(nar_error(&error), Some(NarErrorKind::BadMagic { .. })),
            "{encoding}: {error}"
        );
        // More NAR after the end of the NAR.
        let body = encode(encoding, &[nar.clone(), vec![0; 8]].concat());
        let error = verify(encoding, Expected::default(), GENEROUS, &body)
            .result
            .expect_err("trailing NAR bytes");
        assert!(
            matches!(nar_error(&error), Some(NarErrorKind::TrailingBytes)),
            "{encoding}: {error}"
        );
        // Nothing.
        let error = verify(encoding, Expected::default(), GENEROUS, &[])
            .result
            .expect_err("an empty body");
        assert!(
            matches!(error, VerifyError::Truncated { .. }) || nar_error(&error).is_some(),
            "{encoding}: {error}"
        );
    }
}

#[test]
fn broken_compressed_streams_are_refused() {
    let nar = file_nar(&noise(50_000));
    for encoding in [Encoding::Zstd, Encoding::Xz] {
        let body = encode(encoding, &nar);
        let cut = verify(
            encoding,
            Expected::default(),
            GENEROUS,
            &body[..body.len() - 3],
        );
        assert!(
            matches!(
                cut.result,
                Err(VerifyError::Truncated { .. }
                    | VerifyError::Decode { .. }
                    | VerifyError::UnendedAfterNar { .. })
            ),
            "{encoding}: {:?}",
            cut.result
        );
        let garbage = verify(encoding, Expected::default(), GENEROUS, &noise(5000));
        assert!(
            matches!(garbage.result, Err(VerifyError::Decode { .. })),
            "{encoding}: {:?}",
            garbage.result
        );
        assert!(garbage.output.is_empty());
        let trailing = verify(
            encoding,
            Expected::default(),
            GENEROUS,
            &[body.clone(), b"garbage!".to_vec()].concat(),
        );
        // zstd sees at once that the garbage is no frame; xz waits for
        // the rest of what could be another stream's header.
        assert!(
            matches!(
                trailing.result,
                Err(VerifyError::TrailingBytes { .. } | VerifyError::UnendedAfterNar { .. })
            ),
            "{encoding}: {:?}",
            trailing.result
        );
        let long_trailing = verify(
            encoding,
            Expected::default(),
            GENEROUS,
            &[body.clone(), noise(100)].concat(),
        );
        assert_eq!(
            long_trailing.result,
            Err(VerifyError::TrailingBytes { encoding }),
        );
    }
}

#[test]
fn nothing_past_the_size_limit_is_handed_out() {
    let nar = file_nar(&noise(300_000));
    for encoding in ENCODINGS {
        let body = encode(encoding, &nar);
        let run = verify(
            encoding,
            Expected::default(),
            limits(100_000, 1 << 20),
            &body,
        );
        assert_eq!(
            run.result,
            Err(VerifyError::NarTooLarge { limit: 100_000 }),
            "{encoding}"
        );
        assert!(run.result.as_ref().unwrap_err().is_too_large());
        assert!(run.output.len() <= 100_000);
        assert_eq!(run.output, nar[..run.output.len()]);
    }
}

#[test]
fn nothing_past_the_declared_nar_size_is_handed_out() {
    let nar = file_nar(&noise(300_000));
    let declared = nar.len() as u64 - 1000;
    for encoding in ENCODINGS {
        let body = encode(encoding, &nar);
        let expected = Expected {
            nar_size: Some(declared),
            ..Expected::default()
        };
        for frame_size in [1000, 16 * 1024, usize::MAX] {
            let run = run(encoding, expected, GENEROUS, &body, || frame_size, 1 << 20);
            assert_eq!(
                run.result,
                Err(VerifyError::LongerThanDeclared { declared }),
                "{encoding}"
            );
            // Stopped exactly at the declared size: everything before it
            // was handed out, nothing after.
            assert_eq!(run.output, nar[..declared as usize], "{encoding}");
        }
    }
}

#[test]
fn a_decompression_bomb_stops_at_the_ratio() {
    let size = 64 * MIB;
    let bombs = [
        (
            Encoding::Zstd,
            zeros_nar_into(
                size,
                zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd"),
            )
            .finish()
            .expect("zstd"),
        ),
        (
            Encoding::Xz,
            zeros_nar_into(size, liblzma::write::XzEncoder::new(Vec::new(), 1))
                .finish()
                .expect("xz"),
        ),
    ];
    for (encoding, bomb) in bombs {
        assert!((bomb.len() as u64) < size / 1000, "{encoding}: not a bomb");
        let ratio = 10;
        let run = verify(encoding, Expected::default(), limits(1 << 30, ratio), &bomb);
        let Err(VerifyError::RatioExceeded {
            consumed, decoded, ..
        }) = run.result
        else {
            panic!("{encoding}: {:?}", run.result);
        };
        assert!(decoded <= ratio * consumed + RATIO_ALLOWANCE);
        assert_eq!(run.output.len() as u64, decoded);
        assert!(run.result.unwrap_err().is_too_large());
        // The same body passes a server whose ratio allows it.
        let run = verify(
            encoding,
            Expected::default(),
            limits(1 << 30, 1_000_000),
            &bomb,
        );
        assert_eq!(
            run.result.expect("within the ratio").nar_size,
            run.output.len() as u64
        );
    }
}

#[test]
fn incompressible_and_plain_bodies_pass_any_ratio() {
    let nar = file_nar(&noise(3 << 20));
    for encoding in ENCODINGS {
        let body = encode(encoding, &nar);
        let run = verify(encoding, Expected::default(), limits(1 << 30, 1), &body);
        run.result.expect("ratio 1 and the allowance");
    }
    // A plain NAR of zeros is the sender's own bytes: no ratio applies.
    let zeros = zeros_nar_into(8 * MIB, Vec::new());
    let run = verify(
        Encoding::Plain,
        Expected::default(),
        limits(1 << 30, 1),
        &zeros,
    );
    run.result.expect("a plain NAR has no ratio");
}

#[test]
fn a_compressed_body_that_decodes_to_little_is_not_read_forever() {
    // Skippable zstd frames decode to nothing.
    let mut body = Vec::new();
    while body.len() < 3 << 20 {
        body.extend_from_slice(&0x184d_2a50u32.to_le_bytes());
        body.extend_from_slice(&(60_000u32).to_le_bytes());
        body.extend_from_slice(&[0; 60_000]);
    }
    let run = verify(Encoding::Zstd, Expected::default(), limits(1000, 10), &body);
    assert!(
        matches!(run.result, Err(VerifyError::BodyTooLarge { .. })),
        "{:?}",
        run.result
    );
}

/// The window a zstd frame declares (RFC 8878, 3.1.1.1.2).
fn zstd_window(frame: &[u8]) -> u64 {
    assert_eq!(frame[..4], 0xfd2f_b528u32.to_le_bytes());
    let descriptor = frame[4];
    assert_eq!(descriptor & 0x20, 0, "a single-segment frame has no window");
    let window = frame[5];
    let base = 1u64 << (10 + (window >> 3));
    base + base / 8 * u64::from(window & 7)
}

/// zstd with an explicit window log, streamed so that the frame does not
/// shrink the window to its size.
fn zstd_with_window_log(data: &[u8], window_log: u32) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd");
    encoder
        .set_parameter(zstd::stream::raw::CParameter::WindowLog(window_log))
        .expect("a window log");
    encoder.write_all(data).expect("zstd");
    encoder.finish().expect("zstd")
}

#[test]
fn zstd_frames_decode_up_to_the_window_nix_writes_at_level_22() {
    let nar = file_nar(&noise(100_000));
    let largest = zstd_with_window_log(&nar, ZSTD_WINDOW_LOG_MAX);
    assert_eq!(zstd_window(&largest), 128 * MIB);
    let run = verify(Encoding::Zstd, Expected::default(), GENEROUS, &largest);
    run.result.expect("the largest window Nix writes");

    let beyond = zstd_with_window_log(&nar, ZSTD_WINDOW_LOG_MAX + 1);
    assert_eq!(zstd_window(&beyond), 256 * MIB);
    let run = verify(Encoding::Zstd, Expected::default(), GENEROUS, &beyond);
    let error = run.result.expect_err("a window past the limit");
    assert_eq!(error, VerifyError::ZstdWindowTooLarge { limit: 128 * MIB });
    assert!(error.to_string().contains("134217728 bytes"), "{error}");
    assert!(run.output.is_empty());
}

/// An xz stream whose block header declares the LZMA2 dictionary of
/// property byte `dictionary` (`(2 | (b & 1)) << (b / 2 + 11)` bytes; 40 is
/// 4 GiB - 1), with the header's CRC-32 fixed; the data is left as the
/// small-dictionary encoder wrote it, which decodes the same with any
/// larger dictionary.
fn xz_declaring_dictionary(data: &[u8], dictionary: u8) -> Vec<u8> {
    let mut stream = xz(data, 0);
    // The 12-byte stream header, then the block header: its size, flags
    // (one filter, no sizes), the LZMA2 filter ID, its 1-byte properties.
    let header_len = (usize::from(stream[12]) + 1) * 4;
    assert_eq!(stream[13..16], [0x00, 0x21, 0x01], "a simple block header");
    stream[16] = dictionary;
    let crc_at = 12 + header_len - 4;
    let crc = crc32fast::hash(&stream[12..crc_at]);
    stream[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    stream
}

#[test]
fn xz_streams_decode_up_to_the_dictionary_nix_writes_at_level_9() {
    let nar = file_nar(&noise(100_000));
    // Level 9 as liblzma writes it, and its dictionary declared by hand.
    let run = verify(Encoding::Xz, Expected::default(), GENEROUS, &xz(&nar, 9));
    run.result.expect("xz -9");
    let sixty_four_mib = xz_declaring_dictionary(&nar, 28);
    let run = verify(Encoding::Xz, Expected::default(), GENEROUS, &sixty_four_mib);
    run.result.expect("a 64 MiB dictionary");

    for (dictionary, what) in [(29, "96 MiB"), (40, "4 GiB")] {
        let body = xz_declaring_dictionary(&nar, dictionary);
        let run = verify(Encoding::Xz, Expected::default(), GENEROUS, &body);
        let error = run.result.expect_err(what);
        assert_eq!(
            error,
            VerifyError::XzMemoryLimit {
                limit: XZ_MEMORY_LIMIT
            },
            "{what}"
        );
        assert!(error.to_string().contains("68157440 bytes"), "{error}");
        assert!(run.output.is_empty(), "{what}");
    }
}

#[test]
fn finish_without_the_end_is_truncated() {
    let nar = file_nar(b"contents");
    let mut verifier =
        NarVerifier::new(Encoding::Plain, Expected::default(), GENEROUS).expect("a verifier");
    let mut input = VecDeque::from([Bytes::from(nar)]);
    let mut output = Vec::new();
    let progress = verifier
        .push(&mut input, false, &mut output, 1 << 20)
        .expect("valid bytes");
    assert_eq!(progress, Progress::NeedInput);
    assert_eq!(
        verifier.finish(),
        Err(VerifyError::Truncated {
            encoding: Encoding::Plain
        })
    );
}
