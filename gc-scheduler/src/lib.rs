//! Garbage collection on three levels (objects, NARs, chunks), reaping of stale uploads, and the reconciler that re-publishes stuck jobs.
//!
//! Not built yet: issue #7 gives this crate its `run(config, shutdown)`.
