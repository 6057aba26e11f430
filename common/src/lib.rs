//! Larder's shared library.
//!
//! Everything more than one Larder process needs lives here, so that the
//! server, the workers and the client cannot drift apart: Nix's formats
//! ([`nix`]), and, as they are built, the API and queue wire types, auth,
//! storage, database and queue layers.

pub mod api;
#[cfg(feature = "auth")]
pub mod auth;
pub mod byte_size;
pub mod cache_name;
pub mod chunking;
pub mod config;
#[cfg(feature = "db")]
pub mod db;
pub mod duration;
#[cfg(feature = "integrity")]
pub mod integrity;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod nix;
pub mod pin;
#[cfg(feature = "queue")]
pub mod queue;
#[cfg(feature = "service")]
pub mod service;
#[cfg(feature = "storage")]
pub mod storage;
pub mod time;
#[cfg(feature = "tls")]
pub mod tls;
pub mod upload_info;
#[cfg(feature = "verify")]
pub mod verify;
#[cfg(feature = "worker")]
pub mod worker;
