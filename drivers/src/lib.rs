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
#![forbid(unsafe_code)]

pub mod copy;
pub use graphdriver::mountinfo;
pub mod overlay;
pub mod overlay2;
mod probe;
pub mod vfs;

/// Applies `diff` to the layer tree `tree` of layer `id` under `guard`, all or nothing (the
/// apply both drivers use for a layer that is one plain directory): in place when the layer is
/// fresh ([`graphdriver::ApplyGuard::is_fresh`]: nothing in it to keep, and the guard removes
/// it if the apply fails), else into a hardlink copy of `tree` that replaces it in one exchange
/// ([`graphdriver::ApplyGuard::replace_subdir`]). The copy may share inodes with `tree`: an
/// apply replaces entries (unlink, then create) and never writes into an existing file, and
/// directories are copied, not linked. Returns the bytes the apply wrote.
fn apply_all_or_nothing(
    guard: &graphdriver::ApplyGuard<'_>,
    id: &graphdriver::LayerId,
    tree: &std::path::Path,
    diff: &mut dyn std::io::Read,
    opts: &archive::ApplyOptions,
) -> graphdriver::Result<u64> {
    let apply = |dst: &std::path::Path| {
        chrootarchive::apply_layer(dst, diff, opts).map_err(|e| graphdriver::Error::archive(id, e))
    };
    if guard.is_fresh() {
        return apply(tree);
    }
    let name = tree.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        graphdriver::Error::io(
            "replace",
            tree,
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })?;
    guard.replace_subdir(name, |stage| {
        copy::copy_tree(tree, stage, copy::CopyMode::Hardlink)?;
        apply(stage)
    })
}

/// What a driver's `create_layer` makes: which [`graphdriver::LayerStore`] create it calls.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// An image layer ([`graphdriver::ProtoDriver::create`]).
    Image,
    /// A read-write layer ([`graphdriver::ProtoDriver::create_read_write`]).
    ReadWrite,
    /// An image layer hidden until its first apply ([`graphdriver::ProtoDriver::create_pending`]).
    Pending,
}

impl Kind {
    /// Creates layer `id` of this kind in `store`, filled by `populate`.
    fn create(
        self,
        store: &graphdriver::LayerStore,
        id: &graphdriver::LayerId,
        parent: Option<&graphdriver::LayerId>,
        populate: impl FnOnce(&std::path::Path) -> graphdriver::Result<()>,
    ) -> graphdriver::Result<()> {
        match self {
            Kind::Pending => store.create_pending(id, parent, populate),
            Kind::Image => store.create(id, parent, false, populate),
            Kind::ReadWrite => store.create(id, parent, true, populate),
        }
    }
}

/// The README's code ("Use it from code"), compiled and run as a doc test so that it stays
/// true (`cargo test -p drivers --doc`).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
