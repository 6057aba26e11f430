//! The `.ls` listing of a NAR, rendered byte for byte as Nix 2.8 writes it
//! with `nix copy --to 'file://…?write-nar-listing=true'`.
//!
//! Nix's JSON writer escapes only `"`, `\`, `\n`, `\r`, `\t` and the other
//! control characters (as `\u00xx`, lowercase); every other byte, including
//! DEL and bytes that are not UTF-8, is copied as is. Keys come in a fixed
//! order: `type`, then `size`, `executable` (only when true) and `narOffset`
//! for files, `target` for symlinks, `entries` for directories.

use std::io::Write as _;

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
        out.extend_from_slice(b"{\"version\":1,\"root\":");
        write_node(&mut out, &self.root);
        out.push(b'}');
        out
    }
}

fn write_node(out: &mut Vec<u8>, node: &ListingNode) {
    match node {
        ListingNode::Regular {
            size,
            executable,
            nar_offset,
        } => {
            // Writing to a Vec cannot fail (here and below).
            write!(out, "{{\"type\":\"regular\",\"size\":{size}").expect("writing to a Vec");
            if *executable {
                out.extend_from_slice(b",\"executable\":true");
            }
            write!(out, ",\"narOffset\":{nar_offset}}}").expect("writing to a Vec");
        }
        ListingNode::Symlink { target } => {
            out.extend_from_slice(b"{\"type\":\"symlink\",\"target\":");
            write_string(out, target);
            out.push(b'}');
        }
        ListingNode::Directory { entries } => {
            out.extend_from_slice(b"{\"type\":\"directory\",\"entries\":{");
            for (index, (name, child)) in entries.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_string(out, name);
                out.push(b':');
                write_node(out, child);
            }
            out.extend_from_slice(b"}}");
        }
    }
}

fn write_string(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &byte in bytes {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ]),
            _ => out.push(byte),
        }
    }
    out.push(b'"');
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
