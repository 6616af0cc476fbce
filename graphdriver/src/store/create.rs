//! Creating a layer: built in a flocked staging directory and renamed into place, and the
//! pending layers ([`LayerStore::create_pending`]) this process hides until their first apply.

use super::*;

pub(super) struct StagingDir {
    pub(super) path: PathBuf,
    /// `.staging/` and the directory's name in it.
    pub(super) parent: OwnedFd,
    pub(super) name: String,
    /// The directory itself.
    pub(super) fd: OwnedFd,
    pub(super) _lock: FileLock,
    pub(super) committed: bool,
}

impl StagingDir {
    pub(super) fn committed(mut self) {
        self.committed = true;
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = nofollow::remove_entry(self.parent.as_fd(), &self.name, &self.path);
        }
    }
}

/// Layers this process created with [`LayerStore::create_pending`] whose first apply has not
/// finished, by home (device, inode) and id: the flock on their `incomplete` marker, which
/// hides them from other processes. Process-wide, because a pending layer is the process's,
/// whichever of its stores (the driver's, the importer's) looks at it.
pub(super) type PendingKey = ((u64, u64, u64), LayerId);

pub(super) static PENDING: std::sync::OnceLock<Mutex<HashMap<PendingKey, FileLock>>> =
    std::sync::OnceLock::new();

pub(super) fn pending_map() -> std::sync::MutexGuard<'static, HashMap<PendingKey, FileLock>> {
    PENDING
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

impl LayerStore {
    /// Creates layer `id` atomically.
    ///
    /// `populate` fills a fresh staging directory (which already holds the store's metadata);
    /// the directory is then renamed to `<home>/<id>`. Fails with [`Error::AlreadyExists`] if
    /// `id` exists (any entry of that name counts) and [`Error::NotFound`] if `parent` does not —
    /// checked again under the store lock at the rename, so a parent removed concurrently is
    /// noticed. On any failure the staging directory is deleted and `id` stays absent.
    pub fn create(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
        read_write: bool,
        populate: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        self.create_impl(id, parent, read_write, false, populate)
    }

    /// Creates image layer `id` like [`LayerStore::create`] for a diff this process applies
    /// next (moby's `Create` + `ApplyDiff`), so that no other process ever sees it without its
    /// data: it is renamed into place already marked incomplete, with the marker's flock held
    /// by this store. Other processes see it as absent (and cannot create it); this store sees
    /// it as present. The first apply into it ([`LayerStore::begin_apply`]) takes the marker
    /// over and publishes the layer when it finishes; if that apply fails, or this process
    /// dies first, the layer is removed (by the guard, or by the next [`LayerStore::open`]).
    ///
    /// Only for drivers whose `apply_diff` runs under [`LayerStore::begin_apply`]: a layer
    /// applied any other way (through a get, as `naive_diff` does) would stay pending and be
    /// removed when the process exits.
    pub fn create_pending(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
        populate: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        self.create_impl(id, parent, false, true, populate)
    }

    pub(super) fn create_impl(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
        read_write: bool,
        pending: bool,
        populate: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        if lstat_type(self.fd(), id.as_str(), &self.layer_dir(id))?.is_some() {
            return Err(Error::AlreadyExists(id.clone()));
        }
        if let Some(p) = parent {
            self.require(p)?;
        }
        let staging = self.staging_dir(id, parent)?;
        if read_write {
            nofollow::create_new_file(staging.fd.as_fd(), RW_FILE, &staging.path.join(RW_FILE))?;
        }
        populate(&staging.path)?;
        let marker = if pending {
            // The marker and its flock travel with the directory through the rename.
            let fresh_path = staging.path.join(atomic::FRESH_FILE);
            nofollow::create_new_file(staging.fd.as_fd(), atomic::FRESH_FILE, &fresh_path)?;
            let path = staging.path.join(INCOMPLETE_FILE);
            let file = nofollow::create_new_file(staging.fd.as_fd(), INCOMPLETE_FILE, &path)?;
            Some(FileLock::try_exclusive(file).ok_or_else(|| {
                Error::io("lock", &path, io::Error::from(io::ErrorKind::WouldBlock))
            })?)
        } else {
            None
        };
        // A pending layer's content comes with its apply, which flushes before it publishes.
        if !pending && self.durability.flush_before_publish(read_write) {
            sync_tree(staging.fd.as_fd(), &staging.path)?;
        }
        let _lock = self.lock_exclusive()?;
        if let Some(p) = parent {
            self.require(p)?;
        }
        let target = self.layer_dir(id);
        match rustix::fs::renameat_with(
            &staging.parent,
            staging.name.as_str(),
            self.fd(),
            id.as_str(),
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(Errno::EXIST) | Err(Errno::NOTEMPTY) => {
                return Err(Error::AlreadyExists(id.clone()));
            }
            Err(e) => return Err(Error::io("rename into place", &target, e.into())),
        }
        staging.committed();
        if !read_write {
            self.mark_fresh(id);
        }
        if let Some(lock) = marker {
            pending_map().insert((self.home_key, id.clone()), lock);
        }
        if self.durability.flush_after_publish() {
            fsync_dir(self.fd(), &self.home)?;
        }
        Ok(())
    }

    /// A fresh, flocked staging directory for `id`, with its `parent` file. The parent is
    /// checked again after that file is written, under the shared store lock: an apply to the
    /// parent either started before (and the parent is absent now) or sees this child being
    /// created and is refused, so a child never copies a half-applied parent.
    pub(super) fn staging_dir(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<StagingDir> {
        let name = StagingName::fresh(Kind::New, id).to_string();
        let path = self.home.join(STAGING_DIR).join(&name);
        // Recovery (which holds the store lock exclusively) deletes staging dirs nobody has
        // locked: hold the lock shared from the mkdir until our flock is taken.
        let _store = self.lock_shared()?;
        let staging = self.staging_fd()?;
        rustix::fs::mkdirat(&staging, name.as_str(), Mode::from_raw_mode(0o700))
            .map_err(|e| Error::io("create staging directory", &path, e.into()))?;
        let remove = |staging: &OwnedFd| {
            let _ = nofollow::remove_entry(staging.as_fd(), &name, &path);
        };
        let dir = match open_dir(staging.as_fd(), &name, &path) {
            Ok(d) => d,
            Err(e) => {
                remove(&staging);
                return Err(e);
            }
        };
        let fd = match dir.try_clone() {
            Ok(fd) => fd,
            Err(e) => {
                remove(&staging);
                return Err(Error::io("open staging directory", &path, e));
            }
        };
        let Some(lock) = FileLock::try_exclusive(dir) else {
            remove(&staging);
            let e = io::Error::from(io::ErrorKind::WouldBlock);
            return Err(Error::io("lock", &path, e));
        };
        let staging = StagingDir {
            path,
            parent: staging,
            name,
            fd,
            _lock: lock,
            committed: false,
        };
        if let Some(p) = parent {
            use std::io::Write;
            let path = staging.path.join(PARENT_FILE);
            // Synced whatever `sync` says: a layer renamed into place with an empty `parent`
            // after a crash would be a child without its parent (moby writes its small
            // metadata files durably for the same reason). One fsync of a few bytes.
            let mut file = nofollow::create_new_file(staging.fd.as_fd(), PARENT_FILE, &path)?;
            file.write_all(p.as_str().as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io("write", &path, e))?;
            self.require(p)?;
        }
        Ok(staging)
    }
}
