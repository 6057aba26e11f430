//! The HTTP server: Nix's binary-cache protocol, the push API and cache management; spools uploads and publishes ingest jobs.
//!
//! Not built yet: issue #3 gives this crate its `run(config, shutdown)`.
