//! The error type every driver returns.
//!
//! Callers branch on the variant (the *kind*), never on the message. Every message names the
//! layer id, path, driver or option involved, is lowercase and has no trailing period. A wrapped
//! error (an `io::Error`, an `archive::Error`) is part of the message *and* the `source()`, so
//! that `to_string()` alone is complete; printers of whole cause chains (graphctl) skip a cause
//! whose text is already on the line.

use std::io;
use std::path::PathBuf;

use crate::LayerId;

/// Result alias used by every driver.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a driver, the registry, selection or configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The driver cannot work on this host (kernel, privileges, missing filesystem support).
    /// Selection skips such a driver and reports the reason.
    #[error("driver {driver} is not supported here: {reason}")]
    NotSupported {
        /// The driver's name.
        driver: String,
        /// Why, in words a user can act on.
        reason: String,
    },
    /// A prerequisite of the driver is missing (a kernel module, a helper binary, a privilege).
    /// Selection skips such a driver.
    #[error("driver {driver}: prerequisites not met: {reason}")]
    PrerequisitesNotMet {
        /// The driver's name.
        driver: String,
        /// What is missing.
        reason: String,
    },
    /// The filesystem backing the driver's home cannot host this driver (for example no d_type,
    /// or overlay on overlay). Selection skips such a driver.
    #[error("driver {driver} cannot run on {fs} at {}: {reason}", home.display())]
    IncompatibleFs {
        /// The driver's name.
        driver: String,
        /// The backing filesystem type.
        fs: String,
        /// The driver's home.
        home: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// No layer with this id exists (or it is an unfinished one, which counts as absent).
    #[error("layer {0} does not exist")]
    NotFound(LayerId),
    /// A layer with this id already exists.
    #[error("layer {0} already exists")]
    AlreadyExists(LayerId),
    /// A string given as a layer id breaks the id rules (see [`LayerId`]).
    #[error("invalid layer id {id:?}: {reason}")]
    InvalidId {
        /// The rejected input.
        id: String,
        /// The rule it broke.
        reason: &'static str,
    },
    /// The layer is in use (mounted) and cannot be removed or changed now.
    #[error("layer {id} is in use: {reason}")]
    InUse {
        /// The layer.
        id: LayerId,
        /// How it is in use, for example `"mounted 2 times"`.
        reason: String,
    },
    /// The layer has children and cannot be removed before them.
    #[error("layer {id} has children ({}); remove them first", join(children))]
    HasChildren {
        /// The layer.
        id: LayerId,
        /// Its children.
        children: Vec<LayerId>,
    },
    /// The operation needs a layer of another kind (for example a child of a read-write layer).
    #[error("layer {id}: {reason}")]
    WrongLayerKind {
        /// The layer.
        id: LayerId,
        /// What was expected and what was found.
        reason: String,
    },
    /// A driver option is unknown or has a bad value.
    #[error("{}option {key:?}{}: {reason}", if driver.is_empty() { String::new() } else { format!("driver {driver}: ") }, origin.as_ref().map(|o| format!(" (from {o})")).unwrap_or_default())]
    InvalidOption {
        /// The driver's name; empty when the option names none and no driver is chosen yet
        /// (a malformed `-o` item), and then left out of the message.
        driver: String,
        /// The option key.
        key: String,
        /// Where the option came from (`"/etc/graphctl/storage.toml:7"`, `"command line"`).
        origin: Option<String>,
        /// What was expected and what was found.
        reason: String,
    },
    /// The configuration file is unreadable or malformed.
    #[error("config {}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line and key where known.
        message: String,
    },
    /// No driver of that name is linked into this program.
    #[error(
        "driver {name:?} is not registered (registered: {}); link the crate that provides it and name it in the binary, e.g. `use drivers as _;`",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )]
    UnknownDriver {
        /// The requested name.
        name: String,
        /// The names that are registered.
        known: Vec<String>,
    },
    /// Two registrations use the same driver name.
    #[error("driver {name:?} is registered twice, by {first} and by {second}")]
    DuplicateDriver {
        /// The name.
        name: String,
        /// The module of the first registration.
        first: String,
        /// The module of the second registration.
        second: String,
    },
    /// Automatic selection found no driver that works here.
    #[error("no usable graph driver: {}", tried.iter().map(|(d, r)| format!("{d}: {r}")).collect::<Vec<_>>().join("; "))]
    NoUsableDriver {
        /// Each driver tried and why it was refused.
        tried: Vec<(String, String)>,
    },
    /// More than one driver has layers under the root; the user must choose.
    #[error("{} holds layers of several drivers ({}); choose one with --driver or `driver =` in the config", root.display(), drivers.join(", "))]
    AmbiguousPriorState {
        /// The storage root.
        root: PathBuf,
        /// The drivers with non-empty homes.
        drivers: Vec<String>,
    },
    /// The driver named by the user (`--driver`, `GRAPHDRIVER` or `driver =` in the config) is
    /// not the one whose layers are under the root; one root holds one driver's layers.
    #[error("{} holds layers of driver {}, not of the requested driver {requested}; use driver {} with this root (or drop --driver, GRAPHDRIVER and `driver =`), or give driver {requested} a root of its own", root.display(), found.join(", "), found.join(" or "))]
    DriverMismatch {
        /// The storage root.
        root: PathBuf,
        /// The driver the user named.
        requested: String,
        /// The drivers whose layers are under the root.
        found: Vec<String>,
    },
    /// The driver that owns the existing layers under the root cannot be used now; selection
    /// refuses to silently switch to another one.
    #[error("{} holds layers of driver {driver}, which cannot be used now ({reason}); refusing to switch drivers under existing layers", root.display())]
    PriorDriverUnusable {
        /// The storage root.
        root: PathBuf,
        /// The driver owning the existing layers.
        driver: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A filesystem call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The operation, for example `"create directory"`.
        op: String,
        /// The path it failed on.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Mounting or unmounting failed.
    #[error("mount {} ({options}): {source}", target.display())]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// The options or operation, for example `"lowerdir=…,upperdir=…"` or `"unmount"`.
        options: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading, writing or applying a layer tar failed.
    #[error("layer {id}: {source}")]
    Archive {
        /// The layer being read or written.
        id: LayerId,
        /// What went wrong in the tar code (for the in-tree drivers an `archive::Error`; reach
        /// it with `downcast_ref`). Boxed so the core does not depend on the tar machinery.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

fn join(ids: &[LayerId]) -> String {
    ids.iter()
        .map(LayerId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
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

    /// Wraps an error of the tar code (reading, writing or applying a layer tar) for layer `id`.
    pub fn archive(id: &LayerId, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Archive {
            id: id.clone(),
            source: Box::new(source),
        }
    }

    /// True for the kinds that mean "this driver cannot work here" ([`Error::NotSupported`],
    /// [`Error::PrerequisitesNotMet`], [`Error::IncompatibleFs`]): selection skips the driver.
    pub fn is_not_supported(&self) -> bool {
        matches!(
            self,
            Error::NotSupported { .. }
                | Error::PrerequisitesNotMet { .. }
                | Error::IncompatibleFs { .. }
        )
    }

    /// The kind of this error as a stable snake_case name (`"not_found"`, `"in_use"`, …): the
    /// variant's name, for programs that report errors as data (`graphctl --json` puts it in
    /// its error objects). A name, once given, is never changed or reused for another kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotSupported { .. } => "not_supported",
            Error::PrerequisitesNotMet { .. } => "prerequisites_not_met",
            Error::IncompatibleFs { .. } => "incompatible_fs",
            Error::NotFound(_) => "not_found",
            Error::AlreadyExists(_) => "already_exists",
            Error::InvalidId { .. } => "invalid_id",
            Error::InUse { .. } => "in_use",
            Error::HasChildren { .. } => "has_children",
            Error::WrongLayerKind { .. } => "wrong_layer_kind",
            Error::InvalidOption { .. } => "invalid_option",
            Error::Config { .. } => "config",
            Error::UnknownDriver { .. } => "unknown_driver",
            Error::DuplicateDriver { .. } => "duplicate_driver",
            Error::NoUsableDriver { .. } => "no_usable_driver",
            Error::AmbiguousPriorState { .. } => "ambiguous_prior_state",
            Error::DriverMismatch { .. } => "driver_mismatch",
            Error::PriorDriverUnusable { .. } => "prior_driver_unusable",
            Error::Io { .. } => "io",
            Error::Mount { .. } => "mount",
            Error::Archive { .. } => "archive",
        }
    }

    /// The OS error number behind this error, if any (`ENOSPC`, `EROFS`, …).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::Mount { source, .. } => source.raw_os_error(),
            // The first OS error in the tar code's chain of causes.
            Error::Archive { source, .. } => {
                let first: &(dyn std::error::Error + 'static) = source.as_ref();
                std::iter::successors(Some(first), |e| e.source())
                    .find_map(|e| e.downcast_ref::<io::Error>())
                    .and_then(io::Error::raw_os_error)
            }
            _ => None,
        }
    }
}

/// Adds the operation and path to an `io::Result`, turning it into a driver [`Result`].
pub trait IoContext<T> {
    /// Maps an `io::Error` to [`Error::Io`] naming `op` and `path`.
    fn ctx(self, op: &str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}
