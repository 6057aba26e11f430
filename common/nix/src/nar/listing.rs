//! The `.ls` listing of a NAR, rendered byte for byte as Nix 2.8 writes it
//! with `nix copy --to 'file://…?write-nar-listing=true'`.
//!
//! Nix's JSON writer escapes only `"`, `\`, `\n`, `\r`, `\t` and the other
//! control characters (as `\u00xx`, lowercase); every other byte, including
//! DEL and bytes that are not UTF-8, is copied as is. Keys come in a fixed
//! order: `type`, then `size`, `executable` (only when true) and `narOffset`
//! for files, `target` for symlinks, `entries` for directories.

use std::io::{self, Write};

/// One node of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListingNode {
    Regular {
        size: u64,
        executable: bool,
        /// The offset of the file's first content byte within the NAR.
        nar_offset: u64,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Entries in NAR order, which is sorted by name.
    Directory {
        entries: Vec<(Vec<u8>, ListingNode)>,
    },
}

/// The listing of a whole NAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarListing {
    pub root: ListingNode,
}

impl NarListing {
    /// The `.ls` file contents. These are bytes, not a `String`: names that
    /// are not UTF-8 are copied raw, exactly as Nix does.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        self.write_json(&mut out).expect("writing to a Vec");
        out
    }

    /// Writes [`to_json`](Self::to_json)'s bytes to `out` as they are
    /// rendered, so that a large listing can go straight into a compressor.
    pub fn write_json(&self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(b"{\"version\":1,\"root\":")?;
        write_node(out, &self.root)?;
        out.write_all(b"}")
    }
}

fn write_node(out: &mut impl Write, node: &ListingNode) -> io::Result<()> {
    match node {
        ListingNode::Regular {
            size,
            executable,
            nar_offset,
        } => {
            write!(out, "{{\"type\":\"regular\",\"size\":{size}")?;
            if *executable {
                out.write_all(b",\"executable\":true")?;
            }
            write!(out, ",\"narOffset\":{nar_offset}}}")
        }
        ListingNode::Symlink { target } => {
            out.write_all(b"{\"type\":\"symlink\",\"target\":")?;
            write_string(out, target)?;
            out.write_all(b"}")
        }
        ListingNode::Directory { entries } => {
            out.write_all(b"{\"type\":\"directory\",\"entries\":{")?;
            for (index, (name, child)) in entries.iter().enumerate() {
                if index > 0 {
                    out.write_all(b",")?;
                }
                write_string(out, name)?;
                out.write_all(b":")?;
                write_node(out, child)?;
            }
            out.write_all(b"}}")
        }
    }
}

fn write_string(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.write_all(b"\"")?;
    // Runs of bytes that need no escape are written in one call.
    let mut plain_from = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match byte {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.write_all(&bytes[plain_from..index])?;
        plain_from = index + 1;
        match escape {
            Some(escape) => out.write_all(escape)?,
            None => out.write_all(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ])?,
        }
    }
    out.write_all(&bytes[plain_from..])?;
    out.write_all(b"\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_nix() {
        // Listing written by `nix copy --to file://…?write-nar-listing=true`
        // (Nix 2.8) for a directory with awkward names and a symlink.
        let listing = NarListing {
            root: ListingNode::Directory {
                entries: vec![
                    (
                        b"a\tb".to_vec(),
                        ListingNode::Regular {
                            size: 1,
                            executable: false,
                            nar_offset: 232,
                        },
                    ),
                    (
                        b"b\x08f\x0c".to_vec(),
                        ListingNode::Regular {
                            size: 10,
                            executable: true,
                            nar_offset: 424,
                        },
                    ),
                    (
                        b"bad\xff\x7f".to_vec(),
                        ListingNode::Directory { entries: vec![] },
                    ),
                    (
                        b"link".to_vec(),
                        ListingNode::Symlink {
                            target: "tar\"get\\\x01\x1f/é".as_bytes().to_vec(),
                        },
                    ),
                ],
            },
        };
        let expected: &[u8] = b"{\"version\":1,\"root\":{\"type\":\"directory\",\"entries\":{\
\"a\\tb\":{\"type\":\"regular\",\"size\":1,\"narOffset\":232},\
\"b\\u0008f\\u000c\":{\"type\":\"regular\",\"size\":10,\"executable\":true,\"narOffset\":424},\
\"bad\xff\x7f\":{\"type\":\"directory\",\"entries\":{}},\
\"link\":{\"type\":\"symlink\",\"target\":\"tar\\\"get\\\\\\u0001\\u001f/\xc3\xa9\"}}}}";
        assert_eq!(
            listing.to_json(),
            expected,
            "{}",
            String::from_utf8_lossy(&listing.to_json())
        );
    }
}
