//! How NARs are cut into chunks: FastCDC's size parameters, and the bound
//! they put on the number of chunk entries a NAR of a given size can have.
//!
//! The chunker cuts with these; the store layer refuses a chunk list
//! longer than [`max_chunk_entries`] when it is recorded, so that no NAR's
//! list (which serving it walks, entry by entry) is out of proportion to
//! its bytes, whoever recorded it.

/// FastCDC's smallest chunk; only a NAR's last chunk may be smaller.
pub const MIN_CHUNK_SIZE: u32 = 16 * 1024;
/// FastCDC's target average chunk.
pub const AVG_CHUNK_SIZE: u32 = 64 * 1024;
/// FastCDC's largest chunk.
pub const MAX_CHUNK_SIZE: u32 = 256 * 1024;
/// NARs smaller than this are stored as one chunk: cutting them would
/// only add rows.
pub const ONE_CHUNK_BELOW: u64 = 64 * 1024;

/// The most chunk entries a NAR of `nar_size` bytes can have: every chunk
/// but the last is at least [`MIN_CHUNK_SIZE`] bytes long. A NAR of zeros
/// that repeats one chunk still has one entry per [`MIN_CHUNK_SIZE`] bytes
/// at most.
pub const fn max_chunk_entries(nar_size: u64) -> u64 {
    nar_size / MIN_CHUNK_SIZE as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_allows_every_cut_fastcdc_can_make() {
        let min = u64::from(MIN_CHUNK_SIZE);
        assert_eq!(max_chunk_entries(0), 1);
        assert_eq!(max_chunk_entries(ONE_CHUNK_BELOW - 1), 4);
        // n - 1 chunks of the minimum and a one-byte tail.
        for n in 1..10 {
            assert!(n <= max_chunk_entries((n - 1) * min + 1));
        }
        assert_eq!(max_chunk_entries(64 << 30), (64 << 30) / min + 1);
    }
}
