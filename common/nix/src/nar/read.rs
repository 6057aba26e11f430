//! A strict, push-based NAR reader: feed it byte slices of any size as they
//! arrive and it validates the archive without blocking or buffering file
//! contents, hashing it on the way ([`NarReader`]; [`UnhashedNarReader`]
//! leaves the hash out) and, on request, building its listing.
//!
//! Memory is bounded by the nesting depth ([`MAX_DEPTH`]) times the longest
//! name ([`MAX_NAME_LEN`]), plus the listing when one is asked for (which
//! grows with the number of entries, so it is optional and can be given a
//! budget: [`NarReader::with_listing_budget`]).

use std::io::{self, Read};

use thiserror::Error;

use super::listing::{ListingNode, NarListing};
use super::{check_name, check_target, padding_len, show_bytes, NameProblem, TargetProblem};
use super::{MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN, NAR_MAGIC};
use crate::hash::{NarHash, Sha256Hasher};

/// What one listing node counts against [`NarReader::with_listing_budget`]
/// besides its name and symlink target: about what the node and its entry
/// take in memory.
pub const LISTING_NODE_COST: usize = 64;

/// A NAR that is not exactly what Nix would write, and where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid NAR at byte {offset}: {kind}")]
pub struct NarError {
    /// The offset of the token (or byte) at fault.
    pub offset: u64,
    pub kind: NarErrorKind,
}

/// What is wrong with a NAR.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NarErrorKind {
    #[error("expected the magic \"nix-archive-1\", found {found}")]
    BadMagic { found: String },
    #[error("expected {expected}, found {found}")]
    UnexpectedToken {
        expected: &'static str,
        found: String,
    },
    #[error("unknown node type {found}")]
    UnknownNodeType { found: String },
    #[error("{what} of {len} bytes is longer than the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("non-zero padding byte")]
    NonZeroPadding,
    #[error("invalid entry name {name}: {problem}")]
    InvalidName { name: String, problem: NameProblem },
    #[error("entry {name} does not sort after the previous entry {previous}")]
    UnsortedEntry { previous: String, name: String },
    #[error("duplicate entry {name}")]
    DuplicateEntry { name: String },
    #[error("invalid symlink target {target}: {problem}")]
    InvalidTarget {
        target: String,
        problem: TargetProblem,
    },
    #[error("directories nested deeper than {max} levels")]
    TooDeep { max: usize },
    #[error("archive ends while expecting {expected}")]
    Truncated { expected: &'static str },
    #[error("trailing bytes after the end of the archive")]
    TrailingBytes,
}

/// What a valid NAR turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarSummary {
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// Present when the reader was made with [`NarReader::with_listing`].
    pub listing: Option<NarListing>,
}

/// The next token the grammar allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Magic,
    NodeOpen,
    TypeKeyword,
    TypeValue,
    /// `executable` or `contents`.
    RegularField,
    ExecutableValue,
    ContentsKeyword,
    Contents,
    RegularClose,
    TargetKeyword,
    Target,
    SymlinkClose,
    /// `entry` or `)`.
    DirectoryField,
    EntryOpen,
    NameKeyword,
    Name,
    NodeKeyword,
    EntryClose,
    /// The archive is complete; no more bytes.
    End,
}

impl Expect {
    fn describe(self) -> &'static str {
        match self {
            Self::Magic => "the magic \"nix-archive-1\"",
            Self::NodeOpen | Self::EntryOpen => "\"(\"",
            Self::TypeKeyword => "\"type\"",
            Self::TypeValue => "a node type",
            Self::RegularField => "\"executable\" or \"contents\"",
            Self::ExecutableValue => "\"\" after \"executable\"",
            Self::ContentsKeyword => "\"contents\"",
            Self::Contents => "file contents",
            Self::RegularClose | Self::SymlinkClose | Self::EntryClose => "\")\"",
            Self::TargetKeyword => "\"target\"",
            Self::Target => "a symlink target",
            Self::DirectoryField => "\"entry\" or \")\"",
            Self::NameKeyword => "\"name\"",
            Self::Name => "an entry name",
            Self::NodeKeyword => "\"node\"",
            Self::End => "the end of the archive",
        }
    }

    /// The longest token allowed here (for everything but contents).
    fn max_len(self) -> usize {
        match self {
            Self::Name => MAX_NAME_LEN,
            Self::Target => MAX_TARGET_LEN,
            // Every keyword, node type and the magic fit in 16 bytes.
            _ => 16,
        }
    }
}

/// What the bytes being consumed are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The 8-byte length of the next token; `filled` bytes are in `length`.
    Length { filled: usize },
    /// The bytes of a small token, collected in `token` up to `token_len`.
    Bytes,
    /// File contents, which are hashed and skipped, never kept.
    Contents { remaining: u64 },
    /// Zero padding after a token of `len` bytes; then the token is handled.
    Padding {
        remaining: usize,
        after: AfterPadding,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterPadding {
    Token,
    Contents,
}

/// One open directory.
#[derive(Debug)]
struct OpenDirectory {
    last_name: Option<Vec<u8>>,
    /// Entries completed so far, kept only when a listing is built.
    entries: Vec<(Vec<u8>, ListingNode)>,
}

/// The grammar (and the listing) of a NAR, fed bytes in order: what
/// [`NarReader`] and [`UnhashedNarReader`] share.
#[derive(Debug)]
struct NarGrammar {
    expect: Expect,
    phase: Phase,
    /// Bytes consumed so far.
    offset: u64,
    /// Where the current token's length field starts.
    token_start: u64,
    length: [u8; 8],
    token_len: usize,
    token: Vec<u8>,
    /// The file being read: executable, size, offset of its contents.
    executable: bool,
    contents_size: u64,
    contents_offset: u64,
    directories: Vec<OpenDirectory>,
    /// The listing node for the root, once it is complete.
    root: Option<ListingNode>,
    /// A symlink target kept for the listing until its `)`.
    target: Vec<u8>,
    want_listing: bool,
    /// What the listing may still cost (see [`LISTING_NODE_COST`]) before
    /// it is given up.
    listing_budget: usize,
    error: Option<NarError>,
}

/// The push-based reader. Call [`update`](Self::update) with each chunk,
/// then [`finish`](Self::finish). After the first error every call returns
/// that error again.
#[derive(Debug)]
pub struct NarReader {
    grammar: NarGrammar,
    hasher: Sha256Hasher,
}

/// A NAR's size and (when asked for) listing, from an
/// [`UnhashedNarReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarShape {
    pub nar_size: u64,
    pub listing: Option<NarListing>,
}

/// [`NarReader`] without the SHA-256: for bytes verified already whose copy
/// is checked by cheaper means (the chunker reading a staged NAR back,
/// against the checksum the API recorded as it wrote it), where hashing
/// again would cost as much CPU as the rest of the reading.
#[derive(Debug)]
pub struct UnhashedNarReader {
    grammar: NarGrammar,
}

impl UnhashedNarReader {
    /// A reader that builds the listing within `budget`, as
    /// [`NarReader::with_listing_budget`].
    pub fn with_listing_budget(budget: usize) -> Self {
        Self {
            grammar: NarGrammar::with_listing_budget(budget),
        }
    }

    /// Feeds the next chunk of the archive.
    pub fn update(&mut self, data: &[u8]) -> Result<(), NarError> {
        self.grammar.update(data)
    }

    /// Ends the archive: checks that it is complete and returns its size
    /// and listing.
    pub fn finish(self) -> Result<NarShape, NarError> {
        let (nar_size, listing) = self.grammar.finish()?;
        Ok(NarShape { nar_size, listing })
    }
}

impl Default for NarReader {
    fn default() -> Self {
        Self::new()
    }
}

impl NarReader {
    /// A reader that validates and hashes.
    pub fn new() -> Self {
        Self {
            grammar: NarGrammar::new(),
            hasher: Sha256Hasher::new(),
        }
    }

    /// A reader that also builds the `.ls` listing (memory grows with the
    /// number of entries).
    pub fn with_listing() -> Self {
        Self::with_listing_budget(usize::MAX)
    }

    /// A reader that builds the `.ls` listing while it costs at most
    /// `budget` bytes, counted as [`LISTING_NODE_COST`] per node plus its
    /// name and symlink target; past that it drops what it built and goes
    /// on validating and hashing, and [`finish`](Self::finish) returns no
    /// listing. The budget bounds the memory an untrusted NAR of many
    /// small entries can make the listing take (and, within a factor of
    /// six for names made of control characters, its rendered size).
    pub fn with_listing_budget(budget: usize) -> Self {
        Self {
            grammar: NarGrammar::with_listing_budget(budget),
            hasher: Sha256Hasher::new(),
        }
    }

    /// The number of bytes fed so far.
    pub fn bytes_read(&self) -> u64 {
        self.grammar.offset
    }

    /// Whether the archive is complete (more bytes would be an error).
    pub fn is_complete(&self) -> bool {
        self.grammar.is_complete()
    }

    /// Feeds the next chunk of the archive.
    pub fn update(&mut self, data: &[u8]) -> Result<(), NarError> {
        if self.grammar.error.is_none() {
            self.hasher.update(data);
        }
        self.grammar.update(data)
    }

    /// Ends the archive: checks that it is complete and returns its hash,
    /// size and (when asked for) listing.
    pub fn finish(self) -> Result<NarSummary, NarError> {
        let (_, listing) = self.grammar.finish()?;
        let (hash, nar_size) = self.hasher.finish();
        Ok(NarSummary {
            nar_hash: NarHash::new(hash),
            nar_size,
            listing,
        })
    }
}

impl NarGrammar {
    fn new() -> Self {
        Self {
            expect: Expect::Magic,
            phase: Phase::Length { filled: 0 },
            offset: 0,
            token_start: 0,
            length: [0; 8],
            token_len: 0,
            token: Vec::with_capacity(64),
            executable: false,
            contents_size: 0,
            contents_offset: 0,
            directories: Vec::new(),
            root: None,
            target: Vec::new(),
            want_listing: false,
            listing_budget: 0,
            error: None,
        }
    }

    fn with_listing_budget(budget: usize) -> Self {
        Self {
            want_listing: true,
            listing_budget: budget,
            ..Self::new()
        }
    }

    fn is_complete(&self) -> bool {
        self.error.is_none() && self.expect == Expect::End
    }

    fn update(&mut self, data: &[u8]) -> Result<(), NarError> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        let result = self.consume(data);
        if let Err(error) = &result {
            self.error = Some(error.clone());
        }
        result
    }

    /// Checks that the archive is complete; its size and listing.
    fn finish(self) -> Result<(u64, Option<NarListing>), NarError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.expect != Expect::End {
            return Err(NarError {
                offset: self.offset,
                kind: NarErrorKind::Truncated {
                    expected: self.expect.describe(),
                },
            });
        }
        Ok((self.offset, self.root.map(|root| NarListing { root })))
    }

    fn fail<T>(&self, offset: u64, kind: NarErrorKind) -> Result<T, NarError> {
        Err(NarError { offset, kind })
    }

    fn consume(&mut self, mut data: &[u8]) -> Result<(), NarError> {
        while !data.is_empty() {
            if self.expect == Expect::End {
                return self.fail(self.offset, NarErrorKind::TrailingBytes);
            }
            let taken = match self.phase {
                Phase::Length { filled } => {
                    if filled == 0 {
                        self.token_start = self.offset;
                    }
                    let n = data.len().min(8 - filled);
                    self.length[filled..filled + n].copy_from_slice(&data[..n]);
                    self.phase = Phase::Length { filled: filled + n };
                    n
                }
                Phase::Bytes => {
                    let n = data.len().min(self.token_len - self.token.len());
                    self.token.extend_from_slice(&data[..n]);
                    n
                }
                Phase::Contents { remaining } => {
                    // `n` is at most `data.len()`, so it fits in usize.
                    let n = usize::try_from(remaining).map_or(data.len(), |r| r.min(data.len()));
                    self.phase = Phase::Contents {
                        remaining: remaining - n as u64,
                    };
                    n
                }
                Phase::Padding { remaining, after } => {
                    let n = data.len().min(remaining);
                    if let Some(position) = data[..n].iter().position(|&byte| byte != 0) {
                        return self
                            .fail(self.offset + position as u64, NarErrorKind::NonZeroPadding);
                    }
                    self.phase = Phase::Padding {
                        remaining: remaining - n,
                        after,
                    };
                    n
                }
            };
            self.offset += taken as u64;
            data = &data[taken..];
            self.advance()?;
        }
        Ok(())
    }

    /// Moves on from phases that are complete. Loops because empty tokens,
    /// empty files and tokens without padding complete without more input.
    fn advance(&mut self) -> Result<(), NarError> {
        loop {
            match self.phase {
                Phase::Length { filled: 8 } => self.on_length(u64::from_le_bytes(self.length))?,
                Phase::Bytes if self.token.len() == self.token_len => {
                    self.phase = Phase::Padding {
                        remaining: padding_len(self.token_len as u64),
                        after: AfterPadding::Token,
                    };
                }
                Phase::Contents { remaining: 0 } => {
                    self.phase = Phase::Padding {
                        remaining: padding_len(self.contents_size),
                        after: AfterPadding::Contents,
                    };
                }
                Phase::Padding {
                    remaining: 0,
                    after,
                } => {
                    self.phase = Phase::Length { filled: 0 };
                    match after {
                        AfterPadding::Token => self.on_token()?,
                        AfterPadding::Contents => self.expect = Expect::RegularClose,
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn on_length(&mut self, len: u64) -> Result<(), NarError> {
        if self.expect == Expect::Contents {
            // The padded length must not overflow either.
            if len > u64::MAX - 7 {
                return self.fail(
                    self.token_start,
                    NarErrorKind::TooLong {
                        what: "file contents",
                        len,
                        max: u64::MAX - 7,
                    },
                );
            }
            self.contents_size = len;
            self.contents_offset = self.offset;
            self.phase = Phase::Contents { remaining: len };
            return Ok(());
        }
        let max = self.expect.max_len();
        if len > max as u64 {
            let kind = match self.expect {
                Expect::Name => NarErrorKind::TooLong {
                    what: "entry name",
                    len,
                    max: max as u64,
                },
                Expect::Target => NarErrorKind::TooLong {
                    what: "symlink target",
                    len,
                    max: max as u64,
                },
                Expect::Magic => NarErrorKind::BadMagic {
                    found: format!("a token of {len} bytes"),
                },
                expect => NarErrorKind::UnexpectedToken {
                    expected: expect.describe(),
                    found: format!("a token of {len} bytes"),
                },
            };
            return self.fail(self.token_start, kind);
        }
        // `len` is at most `max`, a small usize.
        self.token_len = len as usize;
        self.token.clear();
        self.phase = Phase::Bytes;
        Ok(())
    }

    fn unexpected<T>(&self) -> Result<T, NarError> {
        let found = show_bytes(&self.token);
        let kind = match self.expect {
            Expect::Magic => NarErrorKind::BadMagic { found },
            Expect::TypeValue => NarErrorKind::UnknownNodeType { found },
            expect => NarErrorKind::UnexpectedToken {
                expected: expect.describe(),
                found,
            },
        };
        self.fail(self.token_start, kind)
    }

    /// Handles a complete small token (after its padding was checked).
    fn on_token(&mut self) -> Result<(), NarError> {
        let token = self.token.as_slice();
        self.expect = match (self.expect, token) {
            (Expect::Magic, NAR_MAGIC) => Expect::NodeOpen,
            (Expect::NodeOpen, b"(") => Expect::TypeKeyword,
            (Expect::TypeKeyword, b"type") => Expect::TypeValue,
            (Expect::TypeValue, b"regular") => {
                self.executable = false;
                Expect::RegularField
            }
            (Expect::TypeValue, b"symlink") => Expect::TargetKeyword,
            (Expect::TypeValue, b"directory") => {
                if self.directories.len() >= MAX_DEPTH {
                    return self.fail(self.token_start, NarErrorKind::TooDeep { max: MAX_DEPTH });
                }
                self.directories.push(OpenDirectory {
                    last_name: None,
                    entries: Vec::new(),
                });
                Expect::DirectoryField
            }
            (Expect::RegularField, b"executable") => Expect::ExecutableValue,
            (Expect::RegularField | Expect::ContentsKeyword, b"contents") => Expect::Contents,
            (Expect::ExecutableValue, b"") => {
                self.executable = true;
                Expect::ContentsKeyword
            }
            (Expect::RegularClose, b")") => {
                let node = ListingNode::Regular {
                    size: self.contents_size,
                    executable: self.executable,
                    nar_offset: self.contents_offset,
                };
                return self.node_done(node);
            }
            (Expect::TargetKeyword, b"target") => Expect::Target,
            (Expect::Target, target) => {
                if let Err(problem) = check_target(target) {
                    let target = show_bytes(target);
                    return self.fail(
                        self.token_start,
                        NarErrorKind::InvalidTarget { target, problem },
                    );
                }
                if self.want_listing {
                    self.target.clear();
                    self.target.extend_from_slice(target);
                }
                Expect::SymlinkClose
            }
            (Expect::SymlinkClose, b")") => {
                let node = ListingNode::Symlink {
                    target: std::mem::take(&mut self.target),
                };
                return self.node_done(node);
            }
            (Expect::DirectoryField, b"entry") => Expect::EntryOpen,
            (Expect::DirectoryField, b")") => {
                // `DirectoryField` is only expected inside an open directory.
                let directory = self
                    .directories
                    .pop()
                    .expect("DirectoryField implies an open directory");
                let node = ListingNode::Directory {
                    entries: directory.entries,
                };
                return self.node_done(node);
            }
            (Expect::EntryOpen, b"(") => Expect::NameKeyword,
            (Expect::NameKeyword, b"name") => Expect::Name,
            (Expect::Name, _) => {
                self.on_name()?;
                Expect::NodeKeyword
            }
            (Expect::NodeKeyword, b"node") => Expect::NodeOpen,
            (Expect::EntryClose, b")") => Expect::DirectoryField,
            _ => return self.unexpected(),
        };
        Ok(())
    }

    fn on_name(&mut self) -> Result<(), NarError> {
        let name = self.token.as_slice();
        if let Err(problem) = check_name(name) {
            let name = show_bytes(name);
            return self.fail(
                self.token_start,
                NarErrorKind::InvalidName { name, problem },
            );
        }
        // Names are only read inside an open directory.
        let directory = self
            .directories
            .last_mut()
            .expect("Expect::Name implies an open directory");
        if let Some(previous) = &directory.last_name {
            let kind = match name.cmp(previous.as_slice()) {
                std::cmp::Ordering::Greater => None,
                std::cmp::Ordering::Equal => Some(NarErrorKind::DuplicateEntry {
                    name: show_bytes(name),
                }),
                std::cmp::Ordering::Less => Some(NarErrorKind::UnsortedEntry {
                    previous: show_bytes(previous),
                    name: show_bytes(name),
                }),
            };
            if let Some(kind) = kind {
                return Err(NarError {
                    offset: self.token_start,
                    kind,
                });
            }
        }
        // Reuse the allocation of the previous name.
        let last = directory.last_name.get_or_insert_with(Vec::new);
        last.clear();
        last.extend_from_slice(name);
        Ok(())
    }

    /// Charges a listing node of `cost` bytes to the budget; once it is
    /// spent, gives the listing up: everything built so far is freed and
    /// nothing more is kept.
    fn charge_listing(&mut self, cost: usize) {
        match self.listing_budget.checked_sub(cost) {
            Some(left) => self.listing_budget = left,
            None => {
                self.want_listing = false;
                self.root = None;
                self.target = Vec::new();
                for directory in &mut self.directories {
                    directory.entries = Vec::new();
                }
            }
        }
    }

    /// A node is complete: attach it to its entry, or end the archive.
    fn node_done(&mut self, node: ListingNode) -> Result<(), NarError> {
        if self.want_listing {
            let name_len = self
                .directories
                .last()
                .and_then(|parent| parent.last_name.as_ref())
                .map_or(0, Vec::len);
            let target_len = match &node {
                ListingNode::Symlink { target } => target.len(),
                _ => 0,
            };
            self.charge_listing(LISTING_NODE_COST + name_len + target_len);
        }
        let want_listing = self.want_listing;
        match self.directories.last_mut() {
            None => {
                if want_listing {
                    self.root = Some(node);
                }
                self.expect = Expect::End;
            }
            Some(parent) => {
                if want_listing {
                    // A node inside a directory always follows its entry's name.
                    let name = parent
                        .last_name
                        .clone()
                        .expect("a node inside a directory has an entry name");
                    parent.entries.push((name, node));
                }
                self.expect = Expect::EntryClose;
            }
        }
        Ok(())
    }
}

/// Why [`read_nar`] failed: the reader, or the NAR itself.
#[derive(Debug, Error)]
pub enum ReadNarError {
    #[error("reading NAR input")]
    Io(#[source] io::Error),
    #[error(transparent)]
    Nar(#[from] NarError),
}

/// Reads and validates a whole NAR from `reader`, a convenience over
/// [`NarReader`] for blocking code.
pub fn read_nar(mut reader: impl Read, with_listing: bool) -> Result<NarSummary, ReadNarError> {
    let mut nar = if with_listing {
        NarReader::with_listing()
    } else {
        NarReader::new()
    };
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => return Ok(nar.finish()?),
            Ok(n) => nar.update(&buffer[..n])?,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(ReadNarError::Io(error)),
        }
    }
}
