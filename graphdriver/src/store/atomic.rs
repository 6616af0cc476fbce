//! All-or-nothing applies: a diff goes into a staged copy of a layer's tree, which replaces the
//! tree in one `renameat2(RENAME_EXCHANGE)`.
//!
//! An apply into a layer that existed before the command (a read-write container layer, an
//! image layer created by an earlier process) must leave it exactly as it was if the diff is
//! bad or the process dies. The driver builds the new tree next to the old one, under a name
//! starting with [`APPLY_PREFIX`] (a hardlink copy of the old tree with the diff applied: the
//! apply replaces entries, it never writes into an existing file, so the old tree's files are
//! not touched), and [`ApplyGuard::replace_subdir`] swaps the two directories atomically.
//!
//! A layer this store created itself and has neither handed out (`get`) nor applied to yet is
//! **fresh** ([`ApplyGuard::is_fresh`]): there is nothing in it to keep, so the driver applies in
//! place (no copy), and if that fails the layer is removed, as moby's layer store does for a
//! layer whose `ApplyDiff` failed. Recovery after a crash tells the two cases apart by the
//! `apply-fresh` file a fresh apply writes before its marker: a fresh layer is removed, any
//! other one is rolled back (its `apply-*` entries removed, mounts there unmounted first).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use rustix::fs::{AtFlags, RenameFlags};

use super::nofollow::{self, lstat_type};
use super::{ApplyGuard, LayerStore, names_in, sync_tree};
use crate::{Error, LayerId, Result, mountinfo};

/// Names in a layer directory that start with this belong to an apply in progress: staged
/// trees and the scratch entries a driver needs for one (an overlay work directory and mount
/// point). Recovery and the next apply remove them, unmounting a mount point first.
pub const APPLY_PREFIX: &str = "apply-";

/// Present (beside the `incomplete` marker) while a fresh layer is applied in place.
pub(super) const FRESH_FILE: &str = "apply-fresh";

impl LayerStore {
    /// Records that this store just created `id` (not read-write): it is fresh until its first
    /// get or apply.
    pub(super) fn mark_fresh(&self, id: &LayerId) {
        self.fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
    }

    /// Forgets that `id` is fresh (a get may write into it); true if it was.
    pub(super) fn take_fresh(&self, id: &LayerId) -> bool {
        self.fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Removes every `apply-*` entry of layer directory `dir` (the layer `id`), unmounting a
    /// mount point among them first. Used by recovery, by a failed apply and before a staged
    /// apply.
    pub(super) fn remove_apply_entries(&self, id: &LayerId, dir: BorrowedFd<'_>) -> Result<()> {
        let path = self.layer_dir(id);
        for name in names_in(dir, &path)? {
            if name.starts_with(APPLY_PREFIX) {
                self.remove_apply_entry(dir, &name, &path.join(&name))?;
            }
        }
        Ok(())
    }

    fn remove_apply_entry(&self, dir: BorrowedFd<'_>, name: &str, path: &Path) -> Result<()> {
        if lstat_type(dir, name, path)? == Some(rustix::fs::FileType::Directory) {
            while mountinfo::is_mountpoint(path)? {
                mountinfo::unmount(path)?;
            }
        }
        nofollow::remove_entry(dir, name, path)
    }

    /// Rolls back an apply into `id` whose process died: removes its staged entries, then the
    /// marker. The layer's own tree was never touched (or already replaced whole).
    pub(super) fn roll_back_apply(&self, id: &LayerId, dir: BorrowedFd<'_>) -> Result<()> {
        self.remove_apply_entries(id, dir)?;
        let marker = self.layer_dir(id).join(super::INCOMPLETE_FILE);
        match rustix::fs::unlinkat(dir, super::INCOMPLETE_FILE, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(Error::io("remove marker", marker, e.into())),
        }
    }
}

impl ApplyGuard<'_> {
    /// True if the layer is fresh: this store created it and has neither handed it out nor
    /// applied to it. Then there is nothing to preserve: apply in place, and if the apply
    /// fails the guard removes the layer. Otherwise apply with [`ApplyGuard::replace_subdir`].
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Replaces the layer's subdirectory `name` (`root`, `upper`, …) with a new tree, all or
    /// nothing. `build` gets the path where the new tree must be made (`<layer>/apply-<name>`,
    /// absent when called; typically a hardlink copy of the old tree with the diff applied)
    /// and may create other `apply-*` scratch entries beside it. If `build` fails, everything
    /// it made is removed and the old tree is untouched. If it succeeds, the new tree takes
    /// the old one's place in one `renameat2(RENAME_EXCHANGE)` (after a `syncfs` unless the
    /// store's [`Durability`](super::Durability) is `None`) and the old tree is deleted. A crash at any point leaves either the old tree or
    /// the new one under `name`; recovery removes the rest.
    pub fn replace_subdir<T>(
        &self,
        name: &str,
        build: impl FnOnce(&Path) -> Result<T>,
    ) -> Result<T> {
        let layer = self.store.layer_dir(&self.id);
        if lstat_type(self.dir.as_fd(), name, &layer.join(name))?
            != Some(rustix::fs::FileType::Directory)
        {
            return Err(Error::io(
                "replace",
                layer.join(name),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        // Leftovers of an earlier apply that could not clean up.
        self.store
            .remove_apply_entries(&self.id, self.dir.as_fd())?;
        let stage_name = format!("{APPLY_PREFIX}{name}");
        let stage = layer.join(&stage_name);
        let value = match build(&stage) {
            Ok(v) => v,
            Err(e) => {
                if let Err(e2) = self.store.remove_apply_entries(&self.id, self.dir.as_fd()) {
                    tracing::error!(layer = %self.id, error = %e2,
                        "could not remove the staged tree of a failed apply");
                }
                return Err(e);
            }
        };
        if self.store.durability.flush_before_publish(false) {
            sync_tree(self.dir.as_fd(), &layer)?;
        }
        rustix::fs::renameat_with(
            &self.dir,
            stage_name.as_str(),
            &self.dir,
            name,
            RenameFlags::EXCHANGE,
        )
        .map_err(|e| Error::io("exchange staged tree with", layer.join(name), e.into()))?;
        // The old tree now has the staged name; the layer is complete without it.
        if let Err(e) = self.store.remove_apply_entries(&self.id, self.dir.as_fd()) {
            tracing::warn!(layer = %self.id, error = %e,
                "could not remove the replaced tree (an apply-* entry left in the layer)");
        }
        Ok(value)
    }
}
