//! What a layer changed: the vocabulary of [`DiffDriver::changes`](crate::DiffDriver::changes).
//!
//! Computing changes between trees is `archive`'s job; the types live in the core so a driver
//! can name them without the tar machinery.

use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// What happened to a path between the parent tree and the layer's tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChangeKind {
    /// The path exists in both trees and differs (`C` in `docker diff`).
    Modify,
    /// The path exists only in the new tree (`A`).
    Add,
    /// The path exists only in the old tree (`D`).
    Delete,
}

impl ChangeKind {
    /// The one-letter code `docker diff` prints: `C`, `A` or `D`.
    pub fn letter(self) -> char {
        match self {
            ChangeKind::Modify => 'C',
            ChangeKind::Add => 'A',
            ChangeKind::Delete => 'D',
        }
    }
}

/// One change: a path, written as an absolute path from the layer's root (`/etc/passwd`), and
/// what happened to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Change {
    /// The changed path, absolute from the layer root.
    pub path: PathBuf,
    /// What happened to it.
    pub kind: ChangeKind,
}

impl fmt::Display for Change {
    /// Formats as `docker diff` does: `"A /path"`, the path written by
    /// [`crate::quote::quote_name`] (raw when plain, else a Go-style quoted string), so that a
    /// name holding a newline or escape sequence cannot forge a line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = crate::quote::quote_name(self.path.as_os_str().as_bytes());
        write!(f, "{} {path}", self.kind.letter())
    }
}
