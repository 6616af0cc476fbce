//! Removing a layer: checked under the store lock, renamed into `.staging/` at once, deleted
//! after the lock is released.

use super::*;

/// A removed layer's directory in `.staging/`, flocked until its deletion is done.
pub(super) struct Grave {
    pub(super) path: PathBuf,
    /// `.staging/` and the grave's name in it.
    pub(super) parent: OwnedFd,
    pub(super) name: String,
    pub(super) _lock: FileLock,
}

impl Grave {
    pub(super) fn delete(self) -> Result<()> {
        nofollow::remove_entry(self.parent.as_fd(), &self.name, &self.path)
    }
}

impl LayerStore {
    /// Removes layer `id`: refused with [`Error::InUse`] while it has live references (those of
    /// dead processes are dropped first) and with [`Error::HasChildren`] while layers name it as
    /// parent. `before` runs under the store lock after those checks and before the layer
    /// disappears (drivers unmount or release there).
    ///
    /// Also refused with [`Error::InUse`] while another process applies a diff to `id`, and with
    /// [`Error::HasChildren`] for a child that is still being applied. A symlink (or anything but
    /// a directory) under the id is an error naming the path; nothing is deleted through it. The
    /// layer disappears by one rename under the store lock; its data is deleted after the lock
    /// is released. A failure of that deletion (a filesystem gone read-only) is logged, not
    /// returned: the layer is removed, and the next [`LayerStore::open`] that can write deletes
    /// the leftover.
    pub fn remove(&self, id: &LayerId, before: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let grave = {
            let _lock = self.lock_exclusive()?;
            let dir = self.layer_dir(id);
            let Some(fd) = self.layer_fd(id)? else {
                return Err(Error::NotFound(id.clone()));
            };
            // A layer this process created pending and never applied: ours to remove.
            drop(self.take_pending(id));
            if apply_in_progress(fd.as_fd()) {
                return Err(Error::InUse {
                    id: id.clone(),
                    reason: "a diff is being applied to it".to_string(),
                });
            }
            let count = self.mount_count(id)?;
            if count > 0 {
                return Err(Error::InUse {
                    id: id.clone(),
                    reason: format!("mounted {count} time(s)"),
                });
            }
            let children = self.children_any(id)?;
            if !children.is_empty() {
                return Err(Error::HasChildren {
                    id: id.clone(),
                    children,
                });
            }
            // A view left mounted by a killed holder must not be walked into by the deletion.
            self.unmount_view(id)?;
            before(&dir)?;
            self.bury(id)?
        };
        // The layer is gone; what is left is freeing its space. If that fails (the filesystem
        // went read-only, an I/O error), the files wait in `.staging/` for the next open.
        if let Err(e) = grave.delete() {
            tracing::warn!(layer = %id, error = %e,
                "the layer is removed, but deleting its files failed; the next command that can \
                 write to the store deletes them");
        }
        Ok(())
    }

    /// Renames `<home>/<id>` into `.staging/` (flocked, so recovery elsewhere leaves it to us)
    /// and drops its mount records. No checks: callers have done them.
    pub(super) fn bury(&self, id: &LayerId) -> Result<Grave> {
        let dir = self.layer_dir(id);
        // The flock follows the directory through the rename: there is no moment where the
        // grave is in `.staging/` unlocked while we still work on it.
        let lock = FileLock::on(
            open_dir(self.fd(), id.as_str(), &dir)?,
            &dir,
            FlockOperation::LockExclusive,
        )?;
        let name = StagingName::fresh(Kind::Rm, id).to_string();
        let staging = self.staging_fd()?;
        rustix::fs::renameat(self.fd(), id.as_str(), &staging, name.as_str())
            .map_err(|e| Error::io("rename for removal", &dir, e.into()))?;
        self.drop_mount_records(id);
        Ok(Grave {
            path: self.home.join(STAGING_DIR).join(&name),
            parent: staging,
            name,
            _lock: lock,
        })
    }

    /// Renames `<home>/<id>` away and deletes it, after unmounting whatever a dead or failed
    /// process left mounted inside it (an overlay `merged/`, a view), which the deletion would
    /// otherwise stop at and leave mounted in `.staging/`. No checks: callers have done them.
    pub(super) fn discard_layer_dir(&self, id: &LayerId) -> Result<()> {
        self.unmount_all_inside(id)?;
        self.bury(id)?.delete()
    }

    /// Unmounts every mount point inside layer `id`'s directory, deepest first.
    pub(super) fn unmount_all_inside(&self, id: &LayerId) -> Result<()> {
        let dir = self.layer_dir(id);
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let mut inside: Vec<PathBuf> = crate::mountinfo::mount_points()?
            .into_iter()
            .filter(|m| m.starts_with(&dir) && *m != dir)
            .collect();
        inside.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        inside.dedup();
        for m in inside {
            while crate::mountinfo::is_mountpoint(&m)? {
                crate::mountinfo::unmount(&m)?;
            }
        }
        Ok(())
    }
}
