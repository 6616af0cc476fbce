//! The errors of a confined apply: the apply's own ([`archive::Error`]), or the confinement's.

use std::io;

/// What a confined apply or extraction can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The apply itself failed (a bad entry, a malformed tar, an I/O error in the target), in the
    /// child or while decompressing in the caller: the error `archive` would have returned.
    #[error(transparent)]
    Archive(#[from] archive::Error),
    /// Setting up the confined apply (fork, namespaces, pivot_root, pipes) failed; the layer was
    /// not applied (never unconfined).
    #[error("confining the layer apply: {step}: {source}")]
    Confinement {
        /// The step that failed, for example `"pivot_root"`.
        step: String,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// The confined child that applies a layer ended without reporting a result.
    #[error("the confined apply process {how}")]
    ChildDied {
        /// How it ended, for example `"was killed by signal SIGKILL"`.
        how: String,
    },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`archive::Error::Io`] for `op` on `path`, as this crate's error.
    pub fn io(
        op: impl Into<String>,
        path: impl Into<std::path::PathBuf>,
        source: io::Error,
    ) -> Self {
        Error::Archive(archive::Error::io(op, path, source))
    }

    /// The OS error number behind this error, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Archive(e) => e.errno(),
            Error::Confinement { source, .. } => source.raw_os_error(),
            Error::ChildDied { .. } => None,
        }
    }

    /// The kind of this error as a stable snake_case name: the tar code's kind
    /// ([`archive::Error::kind`]) for a layer the apply refused, `confinement` or `child_died`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Archive(e) => e.kind(),
            Error::Confinement { .. } => "confinement",
            Error::ChildDied { .. } => "child_died",
        }
    }
}
