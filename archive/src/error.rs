//! The one error type of the crate.
//!
//! Errors are data: they carry the entry name, path and OS error number involved so that
//! `chrootarchive` can send them from its confined child to the parent over a pipe and rebuild
//! an equal error there (see [`Error::errno`]). Messages are lowercase, have no trailing period,
//! and say what was expected and what was found.

use std::io;
use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading, writing or comparing layers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem call failed on `path` (relative to the tree being worked on where one exists).
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The operation that failed, for example `"open"` or `"mknod"`.
        op: String,
        /// The path it failed on.
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// Reading the layer stream itself failed (the input, not the tree being written): `op` is
    /// what was being done, for example `"read"` or `"start the xz decoder"`.
    #[error("layer stream: {op}: {source}")]
    Stream {
        /// What was being done with the stream.
        op: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// One entry of a layer tarball was refused: it tried to leave the target, used a reserved
    /// whiteout name, had a type we do not write, and similar.
    #[error("layer entry {entry:?}: {reason}")]
    BadEntry {
        /// The entry's name as written in the tar.
        entry: String,
        /// Why it was refused.
        reason: String,
    },
    /// The tar stream itself is malformed (bad checksum, truncated, a PAX record that lies).
    #[error("malformed layer tar{}: {reason}", entry.as_ref().map(|e| format!(" at entry {e:?}")).unwrap_or_default())]
    Malformed {
        /// The entry being read when the problem was found, if any.
        entry: Option<String>,
        /// What was wrong.
        reason: String,
    },
    /// A configured limit (`max_entries`, `max_bytes`) was exceeded: an archive bomb, or a limit
    /// set too low.
    #[error("layer exceeds the {what} limit of {limit}")]
    LimitExceeded {
        /// Which limit, for example `"max_entries"`.
        what: String,
        /// The configured limit.
        limit: u64,
    },
    /// The input starts with bytes that are neither a tar header nor a known compression format.
    #[error(
        "unrecognised layer format: expected a tar, gzip, zstd, xz or bzip2 stream, {}; give a \
         layer tar (plain or compressed), such as an image's layer blob or `graphctl diff` output",
        describe_magic(magic)
    )]
    UnknownFormat {
        /// The first bytes of the input (at most 8).
        magic: Vec<u8>,
    },
}

impl From<layerfs::WalkError> for Error {
    /// A failure of the tree walk itself is an [`Error::Io`] naming its operation and path.
    fn from(e: layerfs::WalkError) -> Self {
        Error::io(e.op, e.path, e.source)
    }
}

impl Error {
    /// Builds an [`Error::Io`] for `op` on `path`.
    pub fn io(op: impl Into<String>, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op: op.into(),
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::BadEntry`] for `entry`.
    pub fn bad_entry(entry: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::BadEntry {
            entry: entry.into(),
            reason: reason.into(),
        }
    }

    /// The OS error number behind this error, if there is one (`ENOSPC`, `EACCES`, …).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::Stream { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The kind of this error as a stable snake_case name (`"bad_entry"`, `"malformed"`, …),
    /// for programs that report errors as data. A name is never changed once given.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Stream { .. } => "stream",
            Error::BadEntry { .. } => "bad_entry",
            Error::Malformed { .. } => "malformed",
            Error::LimitExceeded { .. } => "limit_exceeded",
            Error::UnknownFormat { .. } => "unknown_format",
        }
    }
}

/// The first bytes of an unrecognised stream for [`Error::UnknownFormat`]: `the first 4 bytes
/// are 0x1f 0x8b 0x00 0x42 (hex)`, or `the stream is empty`.
fn describe_magic(magic: &[u8]) -> String {
    if magic.is_empty() {
        return "the stream is empty".to_string();
    }
    let hex: Vec<String> = magic.iter().map(|b| format!("0x{b:02x}")).collect();
    let what = if magic.len() == 1 {
        "byte is"
    } else {
        "bytes are"
    };
    format!("the first {} {what} {} (hex)", magic.len(), hex.join(" "))
}
