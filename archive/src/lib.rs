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
//! * [`apply_layer`] applies a layer tar onto a directory, honouring whiteouts (a char device
//!   0/0 is one too) and refusing any entry that would reach outside the target
//!   ([`ApplyOptions`]), at any depth with bounded fds; [`apply_layer_report`] also returns the
//!   entries it had to skip (device nodes without the privilege to create them,
//!   [`ApplyReport`]), which [`apply_layer`] leaves for [`take_skipped`]; [`untar`] extracts a
//!   plain tar without whiteout semantics.
//! * [`fs`] is the one fd-relative layer every read (and removal) of a tree goes through:
//!   nothing below a root is resolved as a path from `/`, no symlink is followed, entries are
//!   checked against their listing, and any depth works with bounded descriptors
//!   ([`fs::walk`], [`fs::remove_tree_at`]).
//! * [`decompress`] detects gzip, zstd, xz and bzip2 by their magic bytes.
//! * [`compare`] snapshots trees and reports every difference, the oracle of the test suites.
//! * [`quote`] prints names found in a layer so that they cannot forge output (Go `%q` style).
//!
//! Drivers rarely call [`apply_layer`] directly: `chrootarchive` runs it in a confined child
//! process. Code in the apply path therefore never logs, prints or reads the environment (see
//! `chrootarchive`'s documentation for why).
//!
//! Every error is an [`Error`] naming the entry, path and OS error involved.
//!
//! # Example
//!
//! A layer made from the difference of two trees, applied onto a copy of the older one,
//! reproduces the newer one:
//!
//! ```
//! use std::fs;
//! use archive::{ApplyOptions, ChangeKind, TarOptions, compare};
//!
//! let (old, new, copy) = (tempfile::tempdir()?, tempfile::tempdir()?, tempfile::tempdir()?);
//! // "kept" is the same in all three: same content and, set explicitly (writes a clock tick
//! // apart would differ), the same mtime.
//! let stamp = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
//! for dir in [old.path(), new.path(), copy.path()] {
//!     fs::write(dir.join("kept"), "same")?;
//!     fs::File::options().write(true).open(dir.join("kept"))?.set_modified(stamp)?;
//! }
//! fs::write(old.path().join("gone"), "bye")?;
//! fs::write(copy.path().join("gone"), "bye")?;
//! fs::write(new.path().join("added"), "hello")?;
//!
//! let changes = archive::changes(new.path(), Some(old.path()))?;
//! let kinds: Vec<_> = changes.iter().map(|c| (c.path.to_str().unwrap(), c.kind)).collect();
//! assert_eq!(kinds, [("/added", ChangeKind::Add), ("/gone", ChangeKind::Delete)]);
//!
//! // The layer: "added" as a file, "gone" as a `.wh.gone` whiteout.
//! let layer = archive::export_changes(new.path(), &changes, &TarOptions::default())?;
//! let bytes = archive::apply_layer(copy.path(), layer, &ApplyOptions::default())?;
//! assert_eq!(bytes, 5);
//! assert!(!copy.path().join("gone").exists());
//! let same_content = compare::CompareOptions { mtimes: false, dir_mtimes: false,
//!     root_metadata: false, ..Default::default() };
//! compare::assert_same_tree(new.path(), copy.path(), &same_content)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod apply;
mod change;
mod codec;
pub mod compare;
mod compression;
mod error;
mod export;
/// Printing names that came from a layer: re-exported from the core crate.
pub use graphdriver::quote;
/// The fd-relative filesystem layer, [`layerfs`]: re-exported under its old name.
pub use layerfs as fs;
mod whiteout;

#[cfg(any(test, feature = "test-util"))]
pub use apply::set_spill_limit;
pub use apply::{
    ApplyOptions, ApplyReport, MAX_SKIPPED, MAX_TRAILING, apply_layer, apply_layer_report,
    note_skipped, take_skipped, untar, untar_report,
};
pub use change::{Change, ChangeKind, changes, changes_from_overlay_upper, changes_size};
pub use compression::{Compression, Encoder, decompress, detect_compression};
pub use error::{Error, Result};
pub use export::{TarOptions, TarStream, export_changes, tar_tree};
pub use whiteout::{
    OverlayXattr, WHITEOUT_LINK_DIR, WHITEOUT_META_PREFIX, WHITEOUT_OPAQUE, WHITEOUT_PREFIX,
    WhiteoutFormat,
};
