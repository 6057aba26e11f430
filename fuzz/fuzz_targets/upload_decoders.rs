//! Fuzzes the upload verifier (`larder_verify`) as the server drives it:
//! a body, plain, zstd or xz, fed in frames and pushed again while the
//! output is full, under a decompression ratio, a size limit and sometimes
//! a declared NarSize. It must never panic, never hand out a byte past any
//! bound (checked after every push), never hold more memory than its
//! decoder limits (libFuzzer's RSS limit), and give the same NAR bytes
//! whatever the framing: a body one framing accepts, another may refuse
//! only for a limit that depends on how far the decoder had read.
//!
//! Input: byte 0 picks the encoding, byte 1 the ratio and output bound,
//! byte 2 the framing and whether a NarSize is declared; the rest is the
//! body. Seeds are small valid bodies of each encoding.
#![no_main]

use larder_verify::harness::run;
use larder_verify::{Encoding, Expected, Limits};
use libfuzzer_sys::fuzz_target;

/// The size limit: above what the ratio lets a fuzz input reach, so both
/// bounds are exercised.
const MAX_NAR_SIZE: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let [encoding, shape, framing, body @ ..] = data else {
        return;
    };
    let encoding = match encoding % 3 {
        0 => Encoding::Plain,
        1 => Encoding::Zstd,
        _ => Encoding::Xz,
    };
    let limits = Limits {
        max_nar_size: MAX_NAR_SIZE,
        max_decompression_ratio: [1, 4, 64, 1000][usize::from(shape & 3)],
    };
    let max_output = [1, 4096, 65536, 1 << 20][usize::from((shape >> 2) & 3)];
    let expected = Expected {
        // Sometimes a NarSize is declared, small enough to be passed.
        nar_size: (framing & 0x80 != 0).then(|| u64::from(framing & 0x7f) * 4096),
        ..Expected::default()
    };
    let whole = run(encoding, expected, limits, body, || usize::MAX, max_output);
    // Frame sizes from a small PRNG seeded by the input: 1..=4096 bytes.
    let mut state = u32::from(*framing) | (body.len() as u32) << 8 | 1;
    let framed = run(
        encoding,
        expected,
        limits,
        body,
        || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 4096) as usize + 1
        },
        max_output,
    );
    // The same bytes, however the body was cut.
    let shorter = whole.output.len().min(framed.output.len());
    assert_eq!(whole.output[..shorter], framed.output[..shorter]);
    match (&whole.result, &framed.result) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Ok(_), Err(error)) | (Err(error), Ok(_)) => {
            assert!(error.is_too_large(), "a framing refused a valid body: {error}")
        }
        (Err(_), Err(_)) => {}
    }
});
