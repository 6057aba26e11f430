//! Nix's formats, byte for byte: pure code with no IO of its own.
//!
//! The one exception is [`nar::dump_path`], which reads a directory tree
//! from the filesystem to serialise it as `nix-store --dump` does. Every
//! format here is checked against the real Nix client (2.8) in
//! `tests/it/nix_formats.rs`.
//!
//! # Modules
//!
//! - [`store_path`] — store paths and their parts as validated newtypes.
//! - [`hash`], [`base32`] — SHA-256 hashes as Nix spells them.
//! - [`nar`] — the NAR encoder, `dump_path`, and the strict push-based reader
//!   that also builds `.ls` listings.
//! - [`narinfo`], [`cache_info`] — the files a substituter reads.
//! - [`nar_file`] — the NAR file names of Nix's upload protocol and the
//!   pure join of a pushed narinfo with what its file held.
//! - [`realisation`] — content-addressed derivations' realisations.
//! - [`signing`] — ed25519 keys, fingerprints and signatures.
//!
//! This crate must know nothing of caches, tenants, HTTP, databases or async
//! runtimes: it depends on no other Larder crate.

pub mod base32;
pub mod cache_info;
pub mod hash;
pub mod nar;
pub mod nar_file;
pub mod narinfo;
pub mod realisation;
pub mod signing;
pub mod store_path;

pub use cache_info::NixCacheInfo;
pub use hash::{HashError, NarHash, Sha256Hash, Sha256Hasher};
pub use narinfo::{Compression, NarInfo, NarInfoError};
pub use signing::{PublicKey, SecretKey, Signature, SigningError};
pub use store_path::{
    StoreDir, StorePath, StorePathError, StorePathHash, StorePathName, DEFAULT_STORE_DIR,
};
