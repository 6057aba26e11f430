//! Fuzzes the streaming NAR reader: any bytes, fed whole or in chunks of
//! varying sizes, must give a result (never a panic), and the result (the
//! error and its offset included) must not depend on the chunking, nor on
//! a listing budget, which may only drop the listing.
//! Inputs are raw NARs, so real archives seed the corpus as they are.
#![no_main]

use larder_nix::nar::{NarError, NarReader};
use libfuzzer_sys::fuzz_target;

fn read(data: &[u8], mut next_chunk: impl FnMut() -> usize) -> Result<(u64, Vec<u8>), NarError> {
    let mut reader = NarReader::with_listing();
    let mut rest = data;
    while !rest.is_empty() {
        let size = next_chunk().clamp(1, rest.len());
        reader.update(&rest[..size])?;
        rest = &rest[size..];
    }
    let summary = reader.finish()?;
    assert_eq!(summary.nar_size, data.len() as u64);
    let listing = summary.listing.map(|listing| listing.to_json()).unwrap_or_default();
    Ok((summary.nar_size, listing))
}

fuzz_target!(|data: &[u8]| {
    let whole = read(data, || usize::MAX);
    // Chunk sizes from a small PRNG seeded by the input length: 1..=24
    // bytes, so every token boundary is crossed somewhere.
    let mut state = data.len() as u32 | 1;
    let chunked = read(data, || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state % 24) as usize + 1
    });
    assert_eq!(whole, chunked, "chunking changed the result");
    // Without a listing the verdict is the same.
    let mut plain = NarReader::new();
    let plain_result = plain.update(data).and_then(|()| plain.finish().map(|_| ()));
    assert_eq!(plain_result.is_ok(), whole.is_ok());
    // A budget from the input's length, small enough to run out on most
    // archives with a few entries: the same verdict, and the whole listing
    // or none.
    let mut reader = NarReader::with_listing_budget(data.len() % 700);
    let budgeted = reader.update(data).and_then(|()| reader.finish());
    match (&whole, budgeted) {
        (Ok((size, listing)), Ok(summary)) => {
            assert_eq!(summary.nar_size, *size);
            if let Some(partial) = summary.listing {
                assert_eq!(&partial.to_json(), listing, "a budget changed the listing");
            }
        }
        (Err(error), Err(budget_error)) => assert_eq!(*error, budget_error),
        (whole, budgeted) => panic!("a budget changed the verdict: {whole:?} / {budgeted:?}"),
    }
});
