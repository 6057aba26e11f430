//! Writing NARs: a streaming encoder over any `impl Write`, an in-memory
//! tree for small archives, and [`dump_path`], which serialises a directory
//! tree from the filesystem exactly as `nix-store --dump` does.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
#[cfg(unix)]
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{check_name, check_target, padding_len, show_bytes, NameProblem, TargetProblem};
use super::{MAX_DEPTH, NAR_MAGIC};

/// Why a NAR could not be written.
#[derive(Debug, Error)]
pub enum NarWriteError {
    #[error("writing NAR output")]
    Write(#[source] io::Error),
    #[error("invalid entry name {name}: {problem}")]
    InvalidName { name: String, problem: NameProblem },
    #[error("invalid symlink target {target}: {problem}")]
    InvalidTarget {
        target: String,
        problem: TargetProblem,
    },
    #[error("entry {name} does not sort after the previous entry {previous}")]
    UnsortedEntry { previous: String, name: String },
    #[error("directories nested deeper than {max} levels")]
    TooDeep { max: usize },
    #[error("NAR encoder misuse: {operation} is not allowed {state}")]
    Misuse {
        operation: &'static str,
        state: &'static str,
    },
    #[error("file contents ended after {actual} of {expected} bytes")]
    ContentsShort { expected: u64, actual: u64 },
    #[error("reading file contents")]
    ReadContents(#[source] io::Error),
    #[error("reading {path:?}")]
    ReadPath {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path:?} is neither a regular file, a directory nor a symlink")]
    UnsupportedFileType { path: std::path::PathBuf },
}

/// Where the encoder is in the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The next call must write a node: the root, or an entry's node.
    Node,
    /// Inside an open directory: `entry` or `end_directory` come next.
    Directory,
    /// The root node is complete.
    Done,
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            Self::Node => "where a node is expected",
            Self::Directory => "directly inside a directory (call `entry` first)",
            Self::Done => "after the root node is complete",
        }
    }
}

/// Streams a NAR into `out`, checking that callers describe a tree Nix
/// could have written: entries in strictly increasing bytewise order, valid
/// names and targets. Directories are opened with [`begin_directory`],
/// each entry is announced with [`entry`] and followed by exactly one node,
/// and [`end_directory`] closes the directory.
///
/// [`begin_directory`]: NarEncoder::begin_directory
/// [`entry`]: NarEncoder::entry
/// [`end_directory`]: NarEncoder::end_directory
#[derive(Debug)]
pub struct NarEncoder<W: Write> {
    out: W,
    state: State,
    /// The last entry name of each open directory, innermost last.
    open_directories: Vec<Option<Vec<u8>>>,
}

impl<W: Write> NarEncoder<W> {
    /// Writes the magic; the root node comes next.
    pub fn new(out: W) -> Result<Self, NarWriteError> {
        let mut encoder = Self {
            out,
            state: State::Node,
            open_directories: Vec::new(),
        };
        encoder.token(NAR_MAGIC)?;
        Ok(encoder)
    }

    fn token(&mut self, bytes: &[u8]) -> Result<(), NarWriteError> {
        self.out
            .write_all(&(bytes.len() as u64).to_le_bytes())
            .and_then(|()| self.out.write_all(bytes))
            .and_then(|()| {
                self.out
                    .write_all(&[0; 8][..padding_len(bytes.len() as u64)])
            })
            .map_err(NarWriteError::Write)
    }

    fn tokens(&mut self, tokens: &[&[u8]]) -> Result<(), NarWriteError> {
        tokens.iter().try_for_each(|token| self.token(token))
    }

    fn expect_state(&self, expected: State, operation: &'static str) -> Result<(), NarWriteError> {
        if self.state == expected {
            Ok(())
        } else {
            Err(NarWriteError::Misuse {
                operation,
                state: self.state.describe(),
            })
        }
    }

    /// After a node: close the entry that held it, or end the archive.
    fn node_done(&mut self) -> Result<(), NarWriteError> {
        if self.open_directories.is_empty() {
            self.state = State::Done;
            Ok(())
        } else {
            self.state = State::Directory;
            self.token(b")")
        }
    }

    fn regular_header(&mut self, executable: bool) -> Result<(), NarWriteError> {
        self.expect_state(State::Node, "a regular file")?;
        self.tokens(&[b"(", b"type", b"regular"])?;
        if executable {
            self.tokens(&[b"executable", b""])?;
        }
        self.token(b"contents")
    }

    /// Writes a regular file whose contents are in memory.
    pub fn regular(&mut self, executable: bool, contents: &[u8]) -> Result<(), NarWriteError> {
        self.regular_header(executable)?;
        self.token(contents)?;
        self.token(b")")?;
        self.node_done()
    }

    /// Writes a regular file of `size` bytes streamed from `contents`,
    /// which must yield at least that many (more are ignored, as Nix does
    /// when a file grows while it is dumped).
    pub fn regular_from_reader(
        &mut self,
        executable: bool,
        size: u64,
        contents: &mut impl Read,
    ) -> Result<(), NarWriteError> {
        self.regular_header(executable)?;
        self.out
            .write_all(&size.to_le_bytes())
            .map_err(NarWriteError::Write)?;
        let mut buffer = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        while written < size {
            let want = usize::try_from(size - written)
                .unwrap_or(usize::MAX)
                .min(buffer.len());
            let n = match contents.read(&mut buffer[..want]) {
                Ok(0) => {
                    return Err(NarWriteError::ContentsShort {
                        expected: size,
                        actual: written,
                    })
                }
                Ok(n) => n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(NarWriteError::ReadContents(error)),
            };
            self.out
                .write_all(&buffer[..n])
                .map_err(NarWriteError::Write)?;
            written += n as u64;
        }
        self.out
            .write_all(&[0; 8][..padding_len(size)])
            .map_err(NarWriteError::Write)?;
        self.token(b")")?;
        self.node_done()
    }

    /// Writes a symlink.
    pub fn symlink(&mut self, target: &[u8]) -> Result<(), NarWriteError> {
        self.expect_state(State::Node, "a symlink")?;
        check_target(target).map_err(|problem| NarWriteError::InvalidTarget {
            target: show_bytes(target),
            problem,
        })?;
        self.tokens(&[b"(", b"type", b"symlink", b"target", target, b")"])?;
        self.node_done()
    }

    /// Opens a directory; add entries with [`NarEncoder::entry`].
    pub fn begin_directory(&mut self) -> Result<(), NarWriteError> {
        self.expect_state(State::Node, "a directory")?;
        if self.open_directories.len() >= MAX_DEPTH {
            return Err(NarWriteError::TooDeep { max: MAX_DEPTH });
        }
        self.tokens(&[b"(", b"type", b"directory"])?;
        self.open_directories.push(None);
        self.state = State::Directory;
        Ok(())
    }

    /// Starts an entry of the innermost open directory; the next call must
    /// write its node. Names must increase strictly in bytewise order.
    pub fn entry(&mut self, name: &[u8]) -> Result<(), NarWriteError> {
        self.expect_state(State::Directory, "an entry")?;
        check_name(name).map_err(|problem| NarWriteError::InvalidName {
            name: show_bytes(name),
            problem,
        })?;
        // `State::Directory` means a directory is open.
        let last = self
            .open_directories
            .last_mut()
            .expect("State::Directory implies an open directory");
        if let Some(previous) = last {
            if name <= previous.as_slice() {
                return Err(NarWriteError::UnsortedEntry {
                    previous: show_bytes(previous),
                    name: show_bytes(name),
                });
            }
        }
        *last = Some(name.to_vec());
        self.tokens(&[b"entry", b"(", b"name", name, b"node"])?;
        self.state = State::Node;
        Ok(())
    }

    /// Closes the innermost open directory.
    pub fn end_directory(&mut self) -> Result<(), NarWriteError> {
        self.expect_state(State::Directory, "closing a directory")?;
        self.token(b")")?;
        self.open_directories.pop();
        self.node_done()
    }

    /// Checks that the archive is complete and hands back the writer.
    pub fn finish(self) -> Result<W, NarWriteError> {
        self.expect_state(State::Done, "finishing")?;
        Ok(self.out)
    }
}

/// A file system object held in memory, for small archives and tests.
/// Directory entries live in a `BTreeMap`, so they are always sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarTree {
    Regular { executable: bool, contents: Vec<u8> },
    Symlink { target: Vec<u8> },
    Directory(BTreeMap<Vec<u8>, NarTree>),
}

/// Serialises `tree` into `out`.
pub fn encode_tree<W: Write>(tree: &NarTree, out: W) -> Result<W, NarWriteError> {
    fn node<W: Write>(encoder: &mut NarEncoder<W>, tree: &NarTree) -> Result<(), NarWriteError> {
        match tree {
            NarTree::Regular {
                executable,
                contents,
            } => encoder.regular(*executable, contents),
            NarTree::Symlink { target } => encoder.symlink(target),
            NarTree::Directory(entries) => {
                encoder.begin_directory()?;
                for (name, child) in entries {
                    encoder.entry(name)?;
                    node(encoder, child)?;
                }
                encoder.end_directory()
            }
        }
    }
    let mut encoder = NarEncoder::new(out)?;
    node(&mut encoder, tree)?;
    encoder.finish()
}

/// Serialises the file, symlink or directory tree at `path` exactly as
/// `nix-store --dump` does. This is the only function in `larder_nix`
/// that touches the filesystem.
///
/// As in Nix: `path` itself is not followed if it is a symlink; a regular
/// file is executable when its owner-execute bit is set; directory entries
/// are sorted bytewise by name; ownership, timestamps and other permission
/// bits are not recorded; sockets, FIFOs and devices are errors.
#[cfg(unix)]
pub fn dump_path<W: Write>(path: &Path, out: W) -> Result<W, NarWriteError> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::os::unix::fs::PermissionsExt;

    fn read_error(path: &Path) -> impl FnOnce(io::Error) -> NarWriteError + '_ {
        move |source| NarWriteError::ReadPath {
            path: path.to_owned(),
            source,
        }
    }

    fn node<W: Write>(encoder: &mut NarEncoder<W>, path: &Path) -> Result<(), NarWriteError> {
        let metadata = std::fs::symlink_metadata(path).map_err(read_error(path))?;
        let file_type = metadata.file_type();
        if file_type.is_file() {
            let executable = metadata.permissions().mode() & 0o100 != 0;
            let mut file = std::fs::File::open(path).map_err(read_error(path))?;
            encoder
                .regular_from_reader(executable, metadata.len(), &mut file)
                .map_err(|error| match error {
                    NarWriteError::ReadContents(source) => NarWriteError::ReadPath {
                        path: path.to_owned(),
                        source,
                    },
                    other => other,
                })
        } else if file_type.is_symlink() {
            let target = std::fs::read_link(path).map_err(read_error(path))?;
            encoder.symlink(target.as_os_str().as_bytes())
        } else if file_type.is_dir() {
            let mut names = std::fs::read_dir(path)
                .and_then(|entries| {
                    entries
                        .map(|entry| entry.map(|entry| entry.file_name().into_vec()))
                        .collect::<Result<Vec<_>, _>>()
                })
                .map_err(read_error(path))?;
            names.sort_unstable();
            encoder.begin_directory()?;
            for name in names {
                encoder.entry(&name)?;
                let child: PathBuf = path.join(std::ffi::OsStr::from_bytes(&name));
                node(encoder, &child)?;
            }
            encoder.end_directory()
        } else {
            Err(NarWriteError::UnsupportedFileType {
                path: path.to_owned(),
            })
        }
    }

    // The encoder writes many 8-byte tokens; buffer them.
    let mut encoder = NarEncoder::new(io::BufWriter::with_capacity(64 * 1024, out))?;
    node(&mut encoder, path)?;
    encoder
        .finish()?
        .into_inner()
        .map_err(|error| NarWriteError::Write(error.into_error()))
}
