//! Support for Larder's integration tests: finding the real services the
//! `ops/` harness started, and driving the real Nix client.

pub mod nix;
pub mod services;
