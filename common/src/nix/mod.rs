//! Nix's formats, byte for byte: pure code with no IO of its own.
//!
//! The one exception is [`nar::dump_path`], which reads a directory tree
//! from the filesystem to serialise it as `nix-store --dump` does.

pub mod base32;
pub mod hash;
pub mod store_path;

pub use hash::{HashError, NarHash, Sha256Hash, Sha256Hasher};
pub use store_path::{
    StoreDir, StorePath, StorePathError, StorePathHash, StorePathName, DEFAULT_STORE_DIR,
};
pub mod nar;
