//! Support for Larder's integration tests: finding the real services the
//! `ops/` harness started, driving the real Nix client, and running
//! `ingest-api` in process or as a child process, or the whole distributed
//! topology as processes.

pub mod bench;
pub mod cluster;
pub mod counting_storage;
pub mod nix;
pub mod ports;
pub mod process;
pub mod prometheus;
pub mod server;
pub mod services;
