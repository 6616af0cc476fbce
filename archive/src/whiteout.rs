//! Whiteout names and the overlay on-disk forms they convert to.
//!
//! A layer tarball deletes things from the layers below it with *whiteouts* (the AUFS/OCI
//! convention): an entry `dir/.wh.name` deletes `dir/name`, and an entry `dir/.wh..wh..opq`
//! makes `dir` opaque, hiding everything the lower layers had in it. Overlayfs stores the same
//! facts differently on disk: a whiteout is a character device 0/0 and an opaque directory carries
//! the xattr `trusted.overlay.opaque=y` (`user.overlay.opaque` when mounted with `userxattr`).

/// The prefix that turns a tar entry into a whiteout: `.wh.name` deletes `name`.
pub const WHITEOUT_PREFIX: &str = ".wh.";

/// The prefix reserved for whiteout *meta* entries (opaque marker, hardlink store).
pub const WHITEOUT_META_PREFIX: &str = ".wh..wh.";

/// The entry that marks its directory opaque.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";

/// The AUFS hardlink store directory (`.wh..wh.plnk/…`).
pub const WHITEOUT_LINK_DIR: &str = ".wh..wh.plnk";

/// Which xattr namespace overlayfs uses for its metadata on this mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum OverlayXattr {
    /// `trusted.overlay.*`: the normal (root) mount.
    #[default]
    Trusted,
    /// `user.overlay.*`: mounts with the `userxattr` option (rootless, user namespaces).
    User,
}

impl OverlayXattr {
    /// The name of the opaque-directory xattr in this namespace, e.g. `trusted.overlay.opaque`.
    pub fn opaque_name(self) -> &'static str {
        match self {
            OverlayXattr::Trusted => "trusted.overlay.opaque",
            OverlayXattr::User => "user.overlay.opaque",
        }
    }

    /// The prefix of every overlay xattr in this namespace, e.g. `trusted.overlay.`.
    pub fn prefix(self) -> &'static str {
        match self {
            OverlayXattr::Trusted => "trusted.overlay.",
            OverlayXattr::User => "user.overlay.",
        }
    }
}

/// How whiteouts are represented on the filesystem side of an export or apply.
///
/// In a tar stream whiteouts are always `.wh.` entries; this says what they correspond to in the
/// tree being read ([`crate::tar_tree`], [`crate::export_changes`]) or written
/// ([`crate::apply_layer`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WhiteoutFormat {
    /// The tree is a plain, fully merged tree.
    ///
    /// On apply, a `.wh.name` entry deletes `name` from the target and `.wh..wh..opq` empties
    /// the directory of everything this layer did not write. On export, files whose names start
    /// with `.wh.` are written as they are.
    #[default]
    Oci,
    /// The tree is an overlayfs upper directory.
    ///
    /// On apply, whiteouts are *written* in overlay form (a char device 0/0 for `.wh.name`, the
    /// opaque xattr for `.wh..wh..opq`) instead of deleting anything. On export, a char device
    /// 0/0 becomes an empty `.wh.name` entry and an opaque directory is followed by a
    /// `.wh..wh..opq` entry.
    Overlay(OverlayXattr),
}
