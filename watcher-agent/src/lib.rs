//! Everything that runs on a Nix user's machine: the `larder` CLI and the `watcher-agent` daemon.
//!
//! Not built yet: issue #6 gives this crate its `run(config, shutdown)`.
