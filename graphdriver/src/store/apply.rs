//! Applying to a layer: [`LayerStore::begin_apply`] and the [`ApplyGuard`] that publishes,
//! rolls back or removes the layer when the apply ends.

use super::*;

/// A layer being modified by [`LayerStore::begin_apply`].
#[derive(Debug)]
pub struct ApplyGuard<'a> {
    pub(super) store: &'a LayerStore,
    pub(super) id: LayerId,
    /// The layer's directory (opened without following a symlink).
    pub(super) dir: OwnedFd,
    pub(super) _lock: Option<FileLock>,
    pub(super) finished: bool,
    /// See [`ApplyGuard::is_fresh`].
    pub(super) fresh: bool,
}

impl ApplyGuard<'_> {
    /// The modification succeeded: flush the layer unless the store's [`Durability`] is `None`,
    /// mark an image layer committed ([`LayerStore::is_committed`]) and make the layer visible
    /// again (flushing that step too under [`Durability::Full`]).
    pub fn finish(mut self) -> Result<()> {
        let path = self.store.layer_dir(&self.id);
        if self.store.durability.flush_before_publish(false) {
            sync_tree(self.dir.as_fd(), &path)?;
        }
        if lstat_type(self.dir.as_fd(), RW_FILE, &path.join(RW_FILE))?.is_none()
            && lstat_type(self.dir.as_fd(), COMMITTED_FILE, &path.join(COMMITTED_FILE))?.is_none()
        {
            nofollow::create_new_file(
                self.dir.as_fd(),
                COMMITTED_FILE,
                &path.join(COMMITTED_FILE),
            )?;
        }
        if self.fresh {
            nofollow::remove_entry(
                self.dir.as_fd(),
                atomic::FRESH_FILE,
                &path.join(atomic::FRESH_FILE),
            )?;
        }
        rustix::fs::unlinkat(&self.dir, INCOMPLETE_FILE, AtFlags::empty())
            .map_err(|e| Error::io("remove marker", path.join(INCOMPLETE_FILE), e.into()))?;
        self.finished = true;
        if self.store.durability.flush_after_publish() {
            fsync_dir(self.dir.as_fd(), &path)?;
        }
        Ok(())
    }
}

impl Drop for ApplyGuard<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if self.fresh {
            // Half-applied in place, and nothing in it predates this store's create: remove
            // it. If that fails the marker stays, so the layer counts as absent and the next
            // open removes it.
            let removed = self
                .store
                .lock_exclusive()
                .and_then(|_lock| self.store.discard_layer_dir(&self.id));
            if let Err(e) = removed {
                tracing::error!(layer = %self.id, error = %e,
                    "could not remove a fresh layer whose apply failed; the next open removes it");
            }
            return;
        }
        // The layer existed before this apply and its tree was not touched (the apply went
        // into a staged copy): drop what is left of the copy and make it visible again.
        if let Err(e) = self.store.roll_back_apply(&self.id, self.dir.as_fd()) {
            tracing::error!(layer = %self.id, error = %e, "could not roll back a failed apply");
        }
    }
}

impl LayerStore {
    /// Marks complete layer `id` as being modified; until [`ApplyGuard::finish`] it counts as
    /// absent. The driver then applies all or nothing: in place into a fresh layer
    /// ([`ApplyGuard::is_fresh`]), else into a staged copy that replaces the tree at once
    /// ([`ApplyGuard::replace_subdir`]). If the guard is dropped unfinished, a fresh layer is
    /// removed (it held nothing but what this store created, and a half-applied layer must not
    /// stay under its id); any other layer stays as it was, its staged entries removed.
    ///
    /// Refused with [`Error::WrongLayerKind`] naming the layer if it is committed
    /// ([`LayerStore::is_committed`]): a diff for it goes into a new layer on top.
    ///
    /// Refused with [`Error::InUse`] while another apply of `id` runs, while `id` is mounted
    /// (live references only: those of dead processes do not count), while a child of `id` is
    /// being created or applied, or while its parent is being applied (so no layer is ever
    /// copied from a half-applied one).
    pub fn begin_apply(&self, id: &LayerId) -> Result<ApplyGuard<'_>> {
        let _lock = self.lock_exclusive()?;
        let dir = self.require_fd(id)?;
        let count = self.mount_count(id)?;
        if count > 0 {
            return Err(Error::InUse {
                id: id.clone(),
                reason: format!("mounted {count} time(s); unmount it before applying a diff"),
            });
        }
        if let Some(reason) = self.relatives_busy(id, dir.as_fd())? {
            return Err(Error::InUse {
                id: id.clone(),
                reason,
            });
        }
        // A view left mounted by a killed holder would keep showing the old tree to the next
        // get, which adopts it.
        self.unmount_view(id)?;
        if self.is_committed(id)? {
            return Err(Error::WrongLayerKind {
                id: id.clone(),
                reason: format!(
                    "committed (a finished image layer or the parent of other layers), so \
                     immutable; apply the diff as a new layer on top: \
                     graphctl apply --parent {id} <new-id> FILE"
                ),
            });
        }
        if let Some(lock) = self.take_pending(id) {
            // Created pending by this process: its marker (and `apply-fresh`) are in place and
            // held; nobody else has seen it, so it is applied in place and removed on failure.
            // A DiffID recorded meanwhile (the one the importer expects) is kept: the layer
            // is published with it, or removed.
            self.take_fresh(id);
            return Ok(ApplyGuard {
                store: self,
                id: id.clone(),
                dir,
                _lock: Some(lock),
                finished: false,
                fresh: true,
            });
        }
        // The content is about to change: the recorded DiffID no longer vouches for it. Done
        // before the marker, so a failure here changes nothing but the (now absent) record.
        diff_id::forget(dir.as_fd(), &self.layer_dir(id))?;
        let marker = self.layer_dir(id).join(INCOMPLETE_FILE);
        let in_progress = || Error::InUse {
            id: id.clone(),
            reason: "another apply is in progress".to_string(),
        };
        let file = match rustix::fs::openat(
            &dir,
            INCOMPLETE_FILE,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => fd,
            Err(Errno::EXIST) => return Err(in_progress()),
            Err(e) => return Err(Error::io("create marker", &marker, e.into())),
        };
        let lock = FileLock::try_exclusive(file).ok_or_else(in_progress)?;
        let fresh = self.take_fresh(id) && {
            // Written before anything changes: recovery after a crash removes the layer only
            // when it finds this (a rolled-back apply keeps it).
            let fresh_path = self.layer_dir(id).join(atomic::FRESH_FILE);
            match nofollow::create_new_file(dir.as_fd(), atomic::FRESH_FILE, &fresh_path) {
                Ok(_) => true,
                Err(e) => {
                    let _ = rustix::fs::unlinkat(&dir, INCOMPLETE_FILE, AtFlags::empty());
                    return Err(e);
                }
            }
        };
        Ok(ApplyGuard {
            store: self,
            id: id.clone(),
            dir,
            _lock: Some(lock),
            finished: false,
            fresh,
        })
    }

    /// Why a diff cannot be applied to `id` (whose directory is `dir`) now because of its
    /// relatives, if it cannot: a child being created (it copies this layer) or applied (it may
    /// copy this layer's tree), or the parent being applied (this layer may copy it). Call under
    /// the store lock.
    pub(super) fn relatives_busy(
        &self,
        id: &LayerId,
        dir: BorrowedFd<'_>,
    ) -> Result<Option<String>> {
        if let Some(p) = read_parent(dir, &self.layer_dir(id))?
            && let Some(pfd) = self.layer_fd(&p)?
            && apply_in_progress(pfd.as_fd())
        {
            return Ok(Some(format!("its parent {p} is being applied")));
        }
        if let Some(child) = self.children_being_built(id)?.first() {
            return Ok(Some(format!("a child of it ({child}) is being created")));
        }
        for child in self.children_in_home(id)? {
            if let Some(cfd) = self.layer_fd(&child)?
                && apply_in_progress(cfd.as_fd())
            {
                return Ok(Some(format!("its child {child} is being applied")));
            }
        }
        Ok(None)
    }
}
