//! Consumes compress jobs: one zstd frame per chunk written to storage by content, and the finalisation that makes a NAR visible.
//!
//! Not built yet: issue #4 gives this crate its `run(config, shutdown)`.
