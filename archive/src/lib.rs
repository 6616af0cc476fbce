//! Layer tarballs: the format every graph driver speaks.
//!
//! # Brief overview
//!
//! A container image is a stack of *layers*; each layer is a tar stream of the files it adds or
//! changes, with *whiteout* entries (`.wh.name`, `.wh..wh..opq`) for what it deletes. This crate
//! turns trees into such streams and streams back into trees:
//!
//! * [`changes`] compares two trees and lists what was added, modified and deleted
//!   ([`Change`]); [`changes_size`] sums the bytes those changes hold;
//!   [`changes_from_overlay_upper`] reads the same list straight from an overlayfs upper dir.
//! * [`tar_tree`] and [`export_changes`] write a whole tree, or only a change list, as a
//!   streaming PAX tar ([`TarOptions`]).
//! * [`apply_layer`] applies a layer tar onto a directory, honouring whiteouts and refusing any
//!   entry that would reach outside the target ([`ApplyOptions`]); [`untar`] extracts a plain
//!   tar without whiteout semantics.
//! * [`decompress`] detects gzip, zstd, xz and bzip2 by their magic bytes.
//! * [`compare`] snapshots trees and reports every difference, the oracle of the test suites.
//!
//! Drivers rarely call [`apply_layer`] directly: `chrootarchive` runs it in a confined child
//! process. Code in the apply path therefore never logs, prints or reads the environment (see
//! `chrootarchive`'s documentation for why).
//!
//! Every error is an [`Error`] naming the entry, path and OS error involved.

#![deny(missing_docs)]

mod apply;
mod change;
pub mod compare;
mod compression;
mod error;
mod export;
mod whiteout;

pub use apply::{ApplyOptions, apply_layer, untar};
pub use change::{Change, ChangeKind, changes, changes_from_overlay_upper, changes_size};
pub use compression::{Compression, decompress, detect_compression};
pub use error::{Error, Result};
pub use export::{TarOptions, TarStream, export_changes, tar_tree};
pub use whiteout::{
    OverlayXattr, WHITEOUT_LINK_DIR, WHITEOUT_META_PREFIX, WHITEOUT_OPAQUE, WHITEOUT_PREFIX,
    WhiteoutFormat,
};
