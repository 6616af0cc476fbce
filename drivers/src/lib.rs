//! The in-tree graph drivers: `overlay` and `vfs`.
//!
//! # Brief overview
//!
//! * [`overlay`]: image layers are full trees whose unchanged files are hardlinks of the
//!   parent's; container layers are overlayfs mounts over one image layer (Docker 1.4.1's design,
//!   re-implemented without its known defects).
//! * [`vfs`]: every layer is a full copy of its parent; slow, simple, and the oracle the other
//!   drivers are tested against.
//! * [`copy`]: faithful tree copies (content or hardlink), shared by both.
//! * [`mountinfo`]: re-exported from [`graphdriver::mountinfo`] (it moved to the core, where
//!   [`graphdriver::LayerStore`]'s read-only views need it).
//!
//! Both drivers keep their bookkeeping in [`graphdriver::LayerStore`] and get diffs from
//! `naive_diff`. Registration lives apart from the implementations (`plugin` modules): linking
//! this crate (`use drivers as _;`) registers `"overlay"` and `"vfs"` with
//! [`graphdriver::register_driver!`]; implementation modules hold no global state.

#![deny(missing_docs)]

pub mod copy;
pub use graphdriver::mountinfo;
pub mod overlay;
pub mod vfs;
