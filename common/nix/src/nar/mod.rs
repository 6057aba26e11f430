//! NAR (Nix ARchive) serialisation: an encoder, a strict streaming reader
//! and the `.ls` listing, all byte-identical to what Nix 2.8 produces.
//!
//! Every token is a string: its length as a little-endian `u64`, its bytes,
//! and zero padding up to a multiple of 8. A NAR is the magic
//! `nix-archive-1` followed by one node:
//!
//! ```text
//! node      := "(" "type" ( regular | symlink | directory )
//! regular   := [ "executable" "" ] "contents" <bytes> ")"
//! symlink   := "target" <target> ")"
//! directory := { "entry" "(" "name" <name> "node" node ")" } ")"
//! ```
//!
//! with directory entries in strictly increasing bytewise order. The reader
//! accepts exactly this grammar, which is what `nix-store --dump` writes;
//! anything else would give the same store path two different NAR hashes.

mod listing;
mod read;
mod write;

pub use listing::{ListingNode, NarListing};
pub use read::{
    read_nar, NarError, NarErrorKind, NarReader, NarShape, NarSummary, ReadNarError,
    UnhashedNarReader, LISTING_NODE_COST,
};
#[cfg(unix)]
pub use write::dump_path;
pub use write::{encode_tree, NarEncoder, NarTree, NarWriteError};

use std::fmt;

/// The first token of every NAR.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";

/// The longest entry name accepted: `NAME_MAX` on Linux, so no file Nix
/// could have dumped is refused.
pub const MAX_NAME_LEN: usize = 255;

/// The longest symlink target accepted: `PATH_MAX - 1` on Linux, the
/// longest target `symlink(2)` can create.
pub const MAX_TARGET_LEN: usize = 4095;

/// The deepest directory nesting accepted. `nix-store --dump` opens every
/// file by its absolute path, which is at most `PATH_MAX` (4096) bytes, and
/// each level adds at least two (`/` and a one-byte name), so Nix cannot
/// produce anything deeper. The cap bounds the reader's memory.
pub const MAX_DEPTH: usize = 2048;

/// The number of zero bytes that follow a token of `len` bytes.
pub(crate) const fn padding_len(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Why a directory entry name is not one Nix could have written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameProblem {
    Empty,
    Dot,
    DotDot,
    Slash,
    Nul,
    TooLong,
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "it is empty",
            Self::Dot => "it is `.`",
            Self::DotDot => "it is `..`",
            Self::Slash => "it contains `/`",
            Self::Nul => "it contains a NUL byte",
            Self::TooLong => "it is longer than 255 bytes",
        })
    }
}

/// Checks a directory entry name; the encoder and the reader share it so
/// that everything the encoder writes, the reader accepts.
pub(crate) fn check_name(name: &[u8]) -> Result<(), NameProblem> {
    match name {
        [] => Err(NameProblem::Empty),
        b"." => Err(NameProblem::Dot),
        b".." => Err(NameProblem::DotDot),
        _ if name.len() > MAX_NAME_LEN => Err(NameProblem::TooLong),
        _ if name.contains(&b'/') => Err(NameProblem::Slash),
        _ if name.contains(&0) => Err(NameProblem::Nul),
        _ => Ok(()),
    }
}

/// Why a symlink target is not one Nix could have written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetProblem {
    Empty,
    Nul,
    TooLong,
}

impl fmt::Display for TargetProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "it is empty",
            Self::Nul => "it contains a NUL byte",
            Self::TooLong => "it is longer than 4095 bytes",
        })
    }
}

/// Checks a symlink target: Linux cannot create empty targets, targets with
/// NUL, or targets of `PATH_MAX` bytes or more.
pub(crate) fn check_target(target: &[u8]) -> Result<(), TargetProblem> {
    if target.is_empty() {
        Err(TargetProblem::Empty)
    } else if target.len() > MAX_TARGET_LEN {
        Err(TargetProblem::TooLong)
    } else if target.contains(&0) {
        Err(TargetProblem::Nul)
    } else {
        Ok(())
    }
}

/// Quotes (a bounded prefix of) untrusted bytes for error messages.
pub(crate) fn show_bytes(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let shown = &bytes[..bytes.len().min(MAX)];
    let ellipsis = if bytes.len() > MAX { "…" } else { "" };
    format!("\"{}{ellipsis}\"", shown.escape_ascii())
}

#[cfg(test)]
mod tests;
