//! fd-relative filesystem access for layer trees: every read of a tree stays inside it.
//!
//! The lowest crate of the workspace (only `rustix` and `libc` below it): the layer store
//! (`graphdriver`) removes trees with it, `archive` walks, exports and applies through it, the
//! drivers copy with it. `archive` re-exports it as `archive::fs`.
//!
//! A layer's tree can be changed while we read it: a container whose read-write layer is being
//! diffed can swap a directory for a symlink to a host directory, or a file for a block device or
//! a FIFO, between our `stat` and our `open`. Code here (and in the crates above) therefore
//! never resolves a path from `/` inside a layer. It holds a descriptor of the directory it works
//! in and names one component at a time, in the spirit of cap-std's primitives:
//!
//! * [`open_dir_at`] opens one child directory without following a symlink, and
//!   [`open_dir_checked`] / [`open_file_checked`] additionally verify, with `fstat` on the opened
//!   descriptor, that it is still the very inode (type, device, inode number) a listing saw — a
//!   swapped entry is refused with [`changed_during_walk`], never read. Files are opened with
//!   `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`, so a FIFO planted in the window cannot block us and a
//!   terminal cannot become our controlling one.
//! * [`open_beneath`] opens a relative path below a directory with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` where the kernel has it (5.6+), and with a
//!   per-component `O_NOFOLLOW` walk otherwise; the `ENOSYS` is remembered after the first call.
//!   Paths of any length work: the walk is not limited by `PATH_MAX`.
//! * [`read_dir_sorted`], [`stat_at`], [`readlink_at`], and the xattr readers [`list_xattrs`] /
//!   [`get_xattr`], which reach symlinks and device nodes through their parent directory
//!   ([`XattrTarget::At`]) and never open them.
//! * [`DirStack`] is the path of open directories from a root down to the current one, holding
//!   a bounded number of descriptors whatever the depth: deeper than [`MAX_HELD_FDS`] levels, the
//!   shallower descriptors are closed and reopened on the way back up through `..`, checked
//!   against the device and inode recorded on the way down.
//! * [`walk`] is the one iterative (explicit stack, no recursion) depth-first walk built on it,
//!   for export, copies and comparisons: a tree 10,000 levels deep is walked with a few dozen
//!   descriptors and a constant native stack.
//! * [`remove_tree_at`] removes a tree the same way (iterative, bounded descriptors, no link
//!   followed, mode-000 directories made removable); [`remove_tree`] is its ambient-path form.
//!
//! Function names say how safe they are: everything here takes a directory descriptor and never
//! leaves it, except [`open_root_dir`] and [`remove_tree`], whose paths are the caller's own
//! (trusted) paths.

mod dirs;
mod open;
mod remove;
mod stack;
mod walk;
mod xattr;

pub use dirs::{DirEntry, read_dir_sorted, readlink_at, stat_at};
pub use open::note_openat2_missing;
pub use open::{
    changed_during_walk, describe, open_beneath, open_dir_at, open_dir_checked, open_file_checked,
    open_root_dir, openat2_supported, probe_openat2, same_inode,
};
pub use remove::{fchmodat2_supported, probe_fchmodat2, remove_tree, remove_tree_at};
pub use stack::{DirStack, MAX_HELD_FDS};
pub use walk::{Visitor, WalkError, walk};
pub use xattr::set_xattr_at;
pub use xattr::{
    XattrTarget, declare_single_threaded, get_xattr, list_xattrs, probe_xattr_at,
    xattr_at_supported,
};

/// A system call that older kernels lack, and what this crate does without it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fallback {
    /// The system call(s), e.g. `"openat2"`.
    pub call: &'static str,
    /// The first kernel that has it, e.g. `"5.6"`.
    pub since: &'static str,
    /// Whether it is used here (the kernel has it and it has not answered `ENOSYS`).
    pub available: bool,
    /// What is done instead where it is missing.
    pub instead: &'static str,
}

/// Probes (without effect: each call is made on descriptor -1, which fails with `EBADF` where
/// the call exists and `ENOSYS` where it does not) and reports every system call this crate
/// has a fallback for. The answers are recorded, so later calls go straight to the fallback.
pub fn fallbacks() -> Vec<Fallback> {
    vec![
        Fallback {
            call: "openat2",
            since: "5.6",
            available: probe_openat2(),
            instead: "an O_NOFOLLOW walk, one component at a time",
        },
        Fallback {
            call: "setxattrat/getxattrat/listxattrat",
            since: "6.13",
            available: probe_xattr_at(),
            instead: "l*xattr on one component: after fchdir in the confined child, \
                      through /proc/self/fd elsewhere",
        },
        Fallback {
            call: "fchmodat2",
            since: "6.6",
            available: probe_fchmodat2(),
            instead: "chmod of an O_PATH-pinned directory: after fchdir in the confined child, \
                      through /proc/self/fd elsewhere",
        },
    ]
}

/// The kind of an inode as far as tree readers care.
pub use rustix::fs::FileType;
/// `lstat`-style metadata, as `statat(…, AT_SYMLINK_NOFOLLOW)` returns it.
pub use rustix::fs::Stat;

#[cfg(test)]
mod tests;

#[cfg(any(test, feature = "test-util"))]
pub use open::force_openat2_missing;
#[cfg(any(test, feature = "test-util"))]
pub use remove::force_fchmodat2_missing;
#[cfg(any(test, feature = "test-util"))]
pub use xattr::force_xattrat_missing;
