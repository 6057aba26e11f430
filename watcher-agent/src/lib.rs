//! Everything that runs on a Nix user's machine: the `larder` CLI and the
//! `watcher-agent` daemon.
//!
//! The crate talks to the local store only through the `nix` command line
//! ([`nix`]) and to servers only through the API's wire types ([`api`]).
//! Of Larder's layers it links only `larder-api` and `larder-nix`: no
//! database, storage or queue code.

pub mod agent;
pub mod api;
pub mod config;
pub mod control;
pub mod nix;
pub mod nix_conf;
pub mod progress;
pub mod push;
pub mod spool;
pub mod watch;
