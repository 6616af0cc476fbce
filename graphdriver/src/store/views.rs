//! Read-only views of layers: a layer's tree seen through a read-only mount at `<id>/view`.
//!
//! A view is one more mount of a layer, so it shares the layer's reference count with plain
//! gets (see the [store docs](super#mount-references)): the first get that asks for a view
//! mounts it, the last put of the layer unmounts it (drivers call [`LayerStore::unmount_view`]
//! from their deactivation, removal and cleanup).

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use super::LayerStore;
use super::nofollow;
use crate::{Error, LayerId, MountOpts, Result, mountinfo};

/// The mount point of a layer's view, inside its directory.
pub const VIEW_DIR: &str = "view";

impl LayerStore {
    /// The mount point of layer `id`'s read-only view, `<id>/view`, created (mode 0700) if it
    /// is missing; an error naming the path if anything but a real directory is there (never
    /// followed). For drivers that mount a view themselves (an overlay of lower directories
    /// only); the others use [`LayerStore::acquire_bind_view`].
    pub fn view_dir(&self, id: &LayerId) -> Result<PathBuf> {
        let (layer, path) = self.layer_entry(id, VIEW_DIR, "create view directory")?;
        nofollow::mkdir_if_missing(layer.as_fd(), VIEW_DIR, 0o700, &path)?;
        self.layer_subdir(id, VIEW_DIR)?
            .ok_or_else(|| Error::io("open", &path, io::Error::from(io::ErrorKind::NotFound)))
    }

    /// A get of layer `id` whose tree is the plain directory `tree` (vfs, the reflink example,
    /// overlay's image layers): with [`MountOpts::read_only`] the read-only view of
    /// [`LayerStore::acquire_bind_view`] (with the extra mount `flags`); otherwise a reference
    /// like [`LayerStore::acquire_ref`] takes, with nothing to mount, and `tree` itself.
    pub fn acquire_tree(
        &self,
        driver: &str,
        id: &LayerId,
        tree: &Path,
        opts: &MountOpts,
        flags: rustix::mount::MountFlags,
    ) -> Result<PathBuf> {
        if opts.read_only {
            return self.acquire_bind_view(driver, id, tree, opts, flags);
        }
        self.acquire_ref(id, opts.holder(), || Ok(true), || Ok(()))?;
        Ok(tree.to_path_buf())
    }

    /// A get of layer `id` as a read-only view of its directory `tree` (for drivers whose
    /// layers are plain directories, such as vfs): a reference like
    /// [`LayerStore::acquire_ref`] takes (owned as `opts` says), and a read-only bind mount of
    /// `tree` at [`LayerStore::view_dir`], made by the first get that needs it, with the extra
    /// mount `flags` (`MS_NODEV`, …). Returns the view's path.
    ///
    /// Without mount privilege (not root) it fails with [`Error::NotSupported`] naming
    /// `driver`: handing out the writable tree instead would break the promise of a view.
    pub fn acquire_bind_view(
        &self,
        driver: &str,
        id: &LayerId,
        tree: &Path,
        opts: &MountOpts,
        flags: rustix::mount::MountFlags,
    ) -> Result<PathBuf> {
        if !rustix::process::geteuid().is_root() {
            return Err(Error::NotSupported {
                driver: driver.to_string(),
                reason: format!(
                    "a read-only view of layer {id} is a read-only bind mount, which needs \
                     root (CAP_SYS_ADMIN); run as root, or read the layer without mounting \
                     it (graphctl diff {id})"
                ),
            });
        }
        self.require(id)?;
        let view = self.view_dir(id)?;
        self.acquire_ref(
            id,
            opts.holder(),
            || mountinfo::is_mountpoint(&view),
            || mountinfo::bind_read_only(tree, &view, flags),
        )?;
        Ok(view)
    }

    /// Unmounts layer `id`'s view if it is mounted (every mount stacked there, so one left by
    /// a killed process goes too). Drivers call it wherever they take a layer's mounts down:
    /// the last put, removal, cleanup, before an apply.
    pub fn unmount_view(&self, id: &LayerId) -> Result<()> {
        let Some(view) = self.layer_subdir(id, VIEW_DIR)? else {
            return Ok(());
        };
        while mountinfo::is_mountpoint(&view)? {
            mountinfo::unmount(&view)?;
        }
        Ok(())
    }

    /// True if layer `id`'s view is mounted now.
    pub fn view_is_mounted(&self, id: &LayerId) -> Result<bool> {
        match self.layer_subdir(id, VIEW_DIR)? {
            Some(view) => mountinfo::is_mountpoint(&view),
            None => Ok(false),
        }
    }
}
