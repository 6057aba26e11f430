//! Consumes chunk jobs: FastCDC and SHA-256 over a spooled NAR, global chunk deduplication, and compress jobs for the chunks that are new.
//!
//! Not built yet: issue #4 gives this crate its `run(config, shutdown)`.
