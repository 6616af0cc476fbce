//! The graph driver contract: how container layer stores plug into a runtime.
//!
//! # Brief overview
//!
//! A *graph driver* stores container image layers and container writable layers and makes each
//! one available as a directory tree. This crate is the small, stable core that drivers and
//! programs share (like `tracing-core`): driver crates depend on it and nothing else of ours is
//! required.
//!
//! * [`ProtoDriver`], [`DiffDriver`] and [`Driver`] are the contract; `driver` module docs define
//!   the terms and walk through a layer's lifecycle.
//! * [`LayerId`] is a validated id: hostile strings are refused before any filesystem call.
//! * [`Error`] is the one error type; callers branch on its variants.
//! * [`register_driver!`] registers a driver by name at link time; [`registered`] and [`lookup`]
//!   find it again.
//! * [`Config`] reads `storage.toml`, the environment and command-line options; [`open`] picks
//!   a driver (by name, by the layers already on disk, or by priority) and starts it.
//! * [`LayerStore`] is the bookkeeping every driver needs (parents, atomic creation, crash
//!   recovery, mount reference counts shared across processes, read-only views).
//! * [`mountinfo`]: mount points from `/proc/self/mountinfo` and thin mount wrappers, for
//!   drivers that mount.
//! * The test suite every driver must pass is its own crate, `graphdriver-conformance`.
//!
//! # Example
//!
//! ```
//! use graphdriver::{Config, LayerId};
//!
//! // The storage root is the embedding program's choice; a config file may override it.
//! let mut config = Config::from_toml(
//!     Config::new("/var/lib/my-engine"),
//!     "[storage]\ndriver = \"vfs\"\n[storage.options.vfs]\nsync = true\n",
//!     std::path::Path::new("storage.toml"),
//! )?;
//! config.add_option("vfs.copy=reflink", "command line")?;
//! assert_eq!(config.driver.as_deref(), Some("vfs"));
//! assert!(LayerId::new("../../etc").is_err());
//! // `graphdriver::open(&config)` would now start the vfs driver, if a crate providing it is
//! // linked (`use drivers as _;`).
//! # Ok::<(), graphdriver::Error>(())
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod change;
mod config;
mod driver;
mod error;
mod id;
pub mod mountinfo;
pub mod quote;
mod registry;
mod select;
mod store;

pub use change::{Change, ChangeKind};
pub use config::{Config, DEFAULT_PRIORITY, ScopedOption};
pub use driver::{DiffDriver, Driver, LayerInfo, MountOpts, ProtoDriver};
pub use error::{Error, IoContext, Result};
pub use id::{LayerId, MAX_ID_LEN};
pub use registry::{
    DriverOption, DriverOptions, InitFn, Registration, lookup, registered, registrations,
};
pub use select::{Selected, SelectedBy, open, prior_state};
pub use store::{
    APPLY_PREFIX, ApplyGuard, Durability, FileLock, Holder, LayerDetails, LayerStore, Recovery,
    VIEW_DIR,
};

#[doc(hidden)]
pub use inventory;
