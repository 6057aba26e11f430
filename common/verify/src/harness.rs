//! Driving a [`NarVerifier`] as the server does, checking every bound
//! after every push: shared by the unit tests and the `upload_decoders`
//! fuzz target (feature `verify-harness`), so both check the same things.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{
    Encoding, Expected, Limits, NarVerifier, Progress, Verified, VerifyError, RATIO_ALLOWANCE,
};

/// What a run of the verifier did.
pub struct Run {
    pub result: Result<Verified, VerifyError>,
    /// Every byte handed out.
    pub output: Vec<u8>,
}

/// Feeds `body` in frames of `frame_size()` bytes (at least one), one frame
/// per push, and pushes again while the output is full, as the server does.
/// Panics if a push hands out more than `max_output` bytes, or if what was
/// handed out so far passes `max-nar-size`, the declared NarSize, the body
/// itself (plain) or the decompression ratio's bound (zstd, xz).
pub fn run(
    encoding: Encoding,
    expected: Expected,
    limits: Limits,
    body: &[u8],
    mut frame_size: impl FnMut() -> usize,
    max_output: usize,
) -> Run {
    let mut verifier = NarVerifier::new(encoding, expected, limits).expect("a decoder");
    let mut rest = body;
    let mut input = VecDeque::new();
    let mut output = Vec::new();
    let outcome = 'body: loop {
        let end = rest.is_empty();
        if !end {
            let size = frame_size().clamp(1, rest.len());
            input.push_back(Bytes::copy_from_slice(&rest[..size]));
            rest = &rest[size..];
        }
        loop {
            let mut out = Vec::new();
            let progress = verifier.push(&mut input, end, &mut out, max_output);
            let produced: usize = out.iter().map(Bytes::len).sum();
            assert!(produced <= max_output, "{produced} > {max_output}");
            for bytes in out {
                output.extend_from_slice(&bytes);
            }
            let decoded = verifier.decoded();
            assert_eq!(decoded, output.len() as u64);
            assert!(decoded <= limits.max_nar_size);
            assert!(verifier.consumed() <= body.len() as u64);
            if let Some(declared) = expected.nar_size {
                assert!(
                    decoded <= declared,
                    "{decoded} past the declared {declared}"
                );
            }
            if encoding == Encoding::Plain {
                assert_eq!(decoded, verifier.consumed());
            } else {
                let bound = limits.max_decompression_ratio * verifier.consumed() + RATIO_ALLOWANCE;
                assert!(decoded <= bound, "{decoded} past the ratio bound {bound}");
            }
            match progress {
                Err(error) => break 'body Err(error),
                Ok(Progress::OutputFull) => {}
                Ok(Progress::NeedInput) => {
                    assert!(!end && input.is_empty());
                    break;
                }
                Ok(Progress::Done) => break 'body Ok(()),
            }
        }
    };
    Run {
        result: outcome.and_then(|()| verifier.finish()),
        output,
    }
}
