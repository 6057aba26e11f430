//! Nix's formats, byte for byte: pure code with no IO of its own.
//!
//! The one exception is [`nar::dump_path`], which reads a directory tree
//! from the filesystem to serialise it as `nix-store --dump` does. Every
//! format here is checked against the real Nix client (2.8) in
//! `tests/it/nix_formats.rs`.

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
