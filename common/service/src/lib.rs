//! The service runtime: what every Larder service process shares above the
//! layers it opens.
//!
//! - [`service`] — a process's life: flags, config loading, logging,
//!   opening the database, storage and queue, signals, and `run_service`,
//!   a binary's whole `main`.
//! - [`metrics`] — Larder's metrics and the ops endpoints (`/metrics`,
//!   `/healthz`, `/readyz`).
//! - [`worker`] — what the pipeline's workers share: failure policy,
//!   consume loop, chunk keys, NAR finalisation.
//! - [`integrity`] — withdrawing chunks found damaged in storage: the
//!   scrub's and the read path's shared reaction.

pub mod integrity;
pub mod metrics;
pub mod service;
pub mod worker;
