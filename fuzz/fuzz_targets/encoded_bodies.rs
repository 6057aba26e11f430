//! Fuzzes the decoders of small uploads sent with a `Content-Encoding`
//! (narinfos, `.ls` listings, build logs): the first byte picks the
//! encoding, the rest is the body. Any body must decode or fail cleanly,
//! and what it decodes to must stay within the size limit and the
//! decompression ratio, whatever it claims.
#![no_main]

use bytes::Bytes;
use larder_verify::encoded::{BodyDecoder, BodyLimits, ContentEncoding};
use larder_verify::RATIO_ALLOWANCE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let encoding = ContentEncoding::ALL[usize::from(pick) % ContentEncoding::ALL.len()];
    let limits = BodyLimits {
        max_size: 4 << 20,
        max_decompression_ratio: 10,
    };
    let bound = limits
        .max_size
        .min(10 * body.len() as u64 + RATIO_ALLOWANCE);
    let Ok(mut decoder) = BodyDecoder::new(encoding, Bytes::copy_from_slice(body), limits) else {
        return;
    };
    loop {
        match decoder.step(256 << 10) {
            Ok(false) => {}
            Ok(true) => {
                let decoded = decoder.finish();
                assert!(decoded.len() as u64 <= bound);
                if encoding == ContentEncoding::Identity {
                    assert_eq!(decoded, body);
                }
                return;
            }
            Err(_) => return,
        }
    }
});
