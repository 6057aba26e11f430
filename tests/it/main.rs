//! Larder's integration tests: one binary, one module per area.
//!
//! Every test here runs against real parts (RabbitMQ, PostgreSQL, Garage and
//! the real Nix client) started by `ops/test.sh`; a missing service is a
//! failure with a clear message, never a skip.

mod abuse;
mod client;
mod db;
mod distributed;
mod fresh_db;
mod gc;
mod integrity;
mod nix_formats;
mod pipeline;
mod queue;
mod server;
mod services;
mod storage;
mod systemd;
mod tidy;
mod tls;
