//! Layer bookkeeping shared by every driver: directories, parents, staging, locks, mount counts.
//!
//! A driver keeps its layer *contents* however it likes; where layers live, who their parent is,
//! how a new one appears atomically and how many gets are outstanding is the same for all of them,
//! so it lives here (like containerd's `snapshots/storage`), not copied into each driver.
//!
//! # Layout of a driver home
//!
//! ```text
//! <home>/.lock            store lock (flock): held exclusively around metadata changes
//! <home>/.staging/        layers being built, and layers being deleted
//! <home>/.mounts/<id>     outstanding gets of <id> (a decimal count), flock-guarded
//! <home>/<id>/            one layer
//!     parent              the parent's id (absent for a base layer)
//!     rw                  present for read-write (container) layers
//!     incomplete          present while a diff is applied; such a layer counts as absent
//!     …                   the driver's own content (root/, upper/, …)
//! ```
//!
//! Layer ids never start with `.`, so the bookkeeping names cannot collide with a layer.
//!
//! # Atomicity
//!
//! [`LayerStore::create`] builds the layer in `.staging/` and renames it into place with
//! `RENAME_NOREPLACE`: a layer is either complete or absent. [`LayerStore::begin_apply`] marks an
//! existing layer incomplete while it is modified; if the modification fails (or the process dies)
//! the layer is removed rather than left half-applied. Removal renames the layer into `.staging/`
//! first, so the id disappears at once. [`LayerStore::open`] deletes leftovers of processes that
//! died mid-way; work still in progress in another process is recognised by the flock its owner
//! holds and left alone. No layer is copied from a half-applied one: an apply is refused while a
//! child of the layer is being created or applied or its parent is being applied.
//!
//! Mount counts live on disk (`.mounts/<id>`), so gets and puts pair up across processes. They
//! are not trusted blindly: [`LayerStore::acquire_ref`] asks the driver whether the mount is
//! really there, and [`LayerStore::repair_mounts`] (called by mounting drivers at init) resets
//! the counts of mounts that vanished (a reboot, a manual umount).
//!
//! # Locking (several processes share one home)
//!
//! * The store lock `.lock`: exclusive around metadata changes (the commit of a create, a
//!   removal, the start of an apply, recovery), shared around reads that must see one state
//!   ([`LayerStore::list`], [`LayerStore::children`]) and around taking a mount reference (so a
//!   layer cannot be removed between the check that it exists and the count going up).
//! * Per-layer locks: the flock on `.mounts/<id>` serialises gets and puts of one layer (and the
//!   mount/unmount they do); the flock on `<id>/incomplete` marks an apply in progress; staging
//!   and removed directories are flocked by the process working on them.
//! * Lock order: store lock, then a per-layer lock. Nothing waits for the store lock while it
//!   holds a per-layer lock, so the locks cannot deadlock.
//!
//! # Permissions
//!
//! The home is made 0700 (0710 is left alone) and layer directories are created 0700, so other
//! users cannot reach into layers (and the setuid binaries they may hold).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{FlockOperation, RenameFlags};

use crate::error::IoContext;
use crate::{Error, LayerId, LayerInfo, Result};

const LOCK_FILE: &str = ".lock";
const STAGING_DIR: &str = ".staging";
const MOUNTS_DIR: &str = ".mounts";
const PARENT_FILE: &str = "parent";
const RW_FILE: &str = "rw";
const INCOMPLETE_FILE: &str = "incomplete";

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The bookkeeping of one driver home. Cheap to share: it holds only paths.
#[derive(Debug, Clone)]
pub struct LayerStore {
    home: PathBuf,
    sync: bool,
}

/// An exclusive or shared hold on a flock; released on drop.
#[derive(Debug)]
pub struct FileLock {
    file: Option<File>,
}

impl FileLock {
    fn acquire(path: &Path, op: FlockOperation) -> Result<FileLock> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
        {
            // A read-only store (a read-only bind mount, a snapshot) can still be read: flock
            // works on a read-only descriptor of an existing lock file.
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => File::open(path),
            other => other,
        }
        .ctx("open lock file", path)?;
        rustix::fs::flock(&file, op)
            .map_err(io::Error::from)
            .ctx("lock", path)?;
        Ok(FileLock { file: Some(file) })
    }

    /// Opens an existing file (for writing too unless `op` is shared) and locks it (`None` if
    /// it does not exist).
    fn acquire_existing(path: &Path, op: FlockOperation) -> Result<Option<FileLock>> {
        let write = !matches!(
            op,
            FlockOperation::LockShared | FlockOperation::NonBlockingLockShared
        );
        let file = match OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open lock file", path, e)),
        };
        rustix::fs::flock(&file, op)
            .map_err(io::Error::from)
            .ctx("lock", path)?;
        Ok(Some(FileLock { file: Some(file) }))
    }

    /// Opens directory `path` and locks it exclusively, waiting for the lock.
    fn lock_dir(path: &Path) -> Result<FileLock> {
        let dir = File::open(path).ctx("open directory", path)?;
        rustix::fs::flock(&dir, FlockOperation::LockExclusive)
            .map_err(io::Error::from)
            .ctx("lock", path)?;
        Ok(FileLock { file: Some(dir) })
    }

    fn file(&mut self, path: &Path) -> Result<&mut File> {
        self.file.as_mut().ok_or_else(|| {
            Error::io(
                "use lock file",
                path,
                io::Error::new(io::ErrorKind::NotFound, "the lock file is missing"),
            )
        })
    }

    /// Tries to take an exclusive lock on an already open file or directory without blocking;
    /// `None` if someone else holds it.
    fn try_exclusive(file: File) -> Option<FileLock> {
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Some(FileLock { file: Some(file) }),
            Err(_) => None,
        }
    }
}

/// What [`LayerStore::open`] cleaned up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Staging directories of interrupted creates and removals that were deleted.
    pub staging_removed: Vec<PathBuf>,
    /// Layers left incomplete by an interrupted apply, now removed.
    pub incomplete_removed: Vec<LayerId>,
    /// Mount counts of layers that no longer exist, dropped.
    pub stale_mount_records: Vec<String>,
    /// Leftovers that could not be removed (for example a mount inside them), one message
    /// each; they stay for the next open to retry, and the store is usable meanwhile.
    pub failed: Vec<String>,
}

impl Recovery {
    /// True if nothing needed cleaning.
    pub fn is_empty(&self) -> bool {
        self.staging_removed.is_empty()
            && self.incomplete_removed.is_empty()
            && self.stale_mount_records.is_empty()
            && self.failed.is_empty()
    }
}

impl LayerStore {
    /// Opens (creating if needed, mode 0700) the driver home `home`, and removes what interrupted
    /// work left behind (reported through `tracing` and returned).
    ///
    /// With `sync`, layer data is flushed to disk before a new layer becomes visible.
    pub fn open(home: &Path, sync: bool) -> Result<(LayerStore, Recovery)> {
        for dir in [
            home.to_path_buf(),
            home.join(STAGING_DIR),
            home.join(MOUNTS_DIR),
        ] {
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("create directory", &dir, e)),
            }
        }
        let store = LayerStore {
            home: home.to_path_buf(),
            sync,
        };
        if is_read_only(home) {
            // Nothing can be repaired, and nothing can be changed either: every change fails
            // with EROFS naming its path. Reading (list, get of image layers) still works.
            tracing::debug!(home = %home.display(), "store is read-only; skipping recovery");
            return Ok((store, Recovery::default()));
        }
        restrict_mode(home)?;
        let recovery = store.recover()?;
        if !recovery.failed.is_empty() {
            tracing::error!(home = %home.display(), failed = ?recovery.failed, "could not remove some leftovers of interrupted work; will retry at the next open");
        }
        if !recovery.is_empty() {
            tracing::warn!(home = %home.display(), ?recovery, "cleaned up after interrupted work");
        }
        Ok((store, recovery))
    }

    /// The driver home.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// True if the home is on a filesystem mounted read-only: layers can be read, not changed.
    pub fn is_read_only(&self) -> bool {
        is_read_only(&self.home)
    }

    /// The directory of layer `id` (whether or not it exists).
    pub fn layer_dir(&self, id: &LayerId) -> PathBuf {
        self.home.join(id.as_str())
    }

    /// Takes the store lock exclusively (blocks until free). Hold it around metadata changes
    /// that must not interleave with other processes' (check-then-rename).
    pub fn lock_exclusive(&self) -> Result<FileLock> {
        FileLock::acquire(&self.home.join(LOCK_FILE), FlockOperation::LockExclusive)
    }

    /// Takes the store lock shared (many readers). On a read-only store without a lock file
    /// nobody can change anything, and the hold is empty.
    pub fn lock_shared(&self) -> Result<FileLock> {
        let path = self.home.join(LOCK_FILE);
        match FileLock::acquire(&path, FlockOperation::LockShared) {
            Err(Error::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && is_read_only(&self.home) =>
            {
                Ok(FileLock { file: None })
            }
            other => other,
        }
    }

    /// True if a complete layer `id` exists (its directory exists and no apply is unfinished).
    pub fn exists(&self, id: &LayerId) -> bool {
        is_complete(&self.layer_dir(id))
    }

    /// Fails with [`Error::NotFound`] unless a complete layer `id` exists.
    pub fn require(&self, id: &LayerId) -> Result<PathBuf> {
        if self.exists(id) {
            Ok(self.layer_dir(id))
        } else {
            Err(Error::NotFound(id.clone()))
        }
    }

    /// The parent recorded for layer `id`.
    pub fn parent(&self, id: &LayerId) -> Result<Option<LayerId>> {
        let dir = self.require(id)?;
        read_parent(&dir)
    }

    /// True if `id` is a read-write (container) layer.
    pub fn is_read_write(&self, id: &LayerId) -> bool {
        self.layer_dir(id).join(RW_FILE).exists()
    }

    /// Every complete layer, sorted by id; one consistent state (under the shared store lock).
    pub fn list(&self) -> Result<Vec<LayerInfo>> {
        let _lock = self.lock_shared()?;
        self.list_unlocked()
    }

    fn list_unlocked(&self) -> Result<Vec<LayerInfo>> {
        let mut out = Vec::new();
        for (id, entry_path) in entries_named_by_id(&self.home)? {
            let dir = entry_path;
            if !is_complete(&dir) {
                continue;
            }
            let parent = read_parent(&dir)?;
            out.push(LayerInfo {
                read_write: dir.join(RW_FILE).exists(),
                id,
                parent,
            });
        }
        out.sort();
        Ok(out)
    }

    /// The complete layers whose parent is `id`.
    pub fn children(&self, id: &LayerId) -> Result<Vec<LayerId>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|l| l.parent.as_ref() == Some(id))
            .map(|l| l.id)
            .collect())
    }

    /// Every layer directory naming `id` as parent, complete or not (a child being applied
    /// still needs its parent), sorted.
    fn children_any(&self, id: &LayerId) -> Result<Vec<LayerId>> {
        let mut out = Vec::new();
        for (child, entry_path) in entries_named_by_id(&self.home)? {
            let dir = entry_path;
            if dir.is_dir() && read_parent(&dir)?.as_ref() == Some(id) {
                out.push(child);
            }
        }
        // Children still being built in `.staging/` copy this layer's tree right now: they count
        // too, while their builder is alive (it holds the staging dir's flock).
        let staging = self.home.join(STAGING_DIR);
        for entry in fs::read_dir(&staging).ctx("read directory", &staging)? {
            let entry = entry.ctx("read directory", &staging)?;
            let name = entry.file_name();
            let Some(child) = name
                .to_str()
                .and_then(|n| n.strip_prefix("new-"))
                .and_then(|n| n.rsplitn(3, '-').nth(2))
                .and_then(|n| LayerId::new(n).ok())
            else {
                continue;
            };
            let dir = entry.path();
            if read_parent(&dir)?.as_ref() != Some(id) {
                continue;
            }
            let alive = File::open(&dir)
                .map(|f| FileLock::try_exclusive(f).is_none())
                .unwrap_or(false);
            if alive {
                out.push(child);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Creates layer `id` atomically.
    ///
    /// `populate` fills a fresh staging directory (which already holds the store's metadata);
    /// the directory is then renamed to `<home>/<id>`. Fails with [`Error::AlreadyExists`] if
    /// `id` exists and [`Error::NotFound`] if `parent` does not — checked again under the store
    /// lock at the rename, so a parent removed concurrently is noticed. On any failure the staging
    /// directory is deleted and `id` stays absent.
    pub fn create(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
        read_write: bool,
        populate: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        if self.layer_dir(id).exists() {
            return Err(Error::AlreadyExists(id.clone()));
        }
        if let Some(p) = parent {
            self.require(p)?;
        }
        let staging = self.staging_dir(id, parent)?;
        if read_write {
            write_file(&staging.path.join(RW_FILE), b"")?;
        }
        populate(&staging.path)?;
        if self.sync {
            sync_tree(&staging.path)?;
        }
        let _lock = self.lock_exclusive()?;
        if let Some(p) = parent {
            self.require(p)?;
        }
        let target = self.layer_dir(id);
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staging.path,
            rustix::fs::CWD,
            &target,
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) | Err(rustix::io::Errno::NOTEMPTY) => {
                return Err(Error::AlreadyExists(id.clone()));
            }
            Err(e) => return Err(Error::io("rename into place", &target, e.into())),
        }
        staging.committed();
        if self.sync {
            fsync_dir(&self.home)?;
        }
        Ok(())
    }

    /// Marks complete layer `id` as being modified; until [`ApplyGuard::finish`] it counts as
    /// absent, and if the guard is dropped unfinished the layer is removed.
    ///
    /// Refused with [`Error::InUse`] while another apply of `id` runs, while `id` is mounted,
    /// while a child of `id` is being created or applied, or while its parent is being applied
    /// (so no layer is ever copied from a half-applied one).
    pub fn begin_apply(&self, id: &LayerId) -> Result<ApplyGuard<'_>> {
        let _lock = self.lock_exclusive()?;
        let dir = self.require(id)?;
        let count = self.mount_count(id)?;
        if count > 0 {
            return Err(Error::InUse {
                id: id.clone(),
                reason: format!("mounted {count} time(s); unmount it before applying a diff"),
            });
        }
        if let Some(reason) = self.relatives_busy(id)? {
            return Err(Error::InUse {
                id: id.clone(),
                reason,
            });
        }
        let marker = dir.join(INCOMPLETE_FILE);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&marker)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Error::InUse {
                        id: id.clone(),
                        reason: "another apply is in progress".to_string(),
                    }
                } else {
                    Error::io("create marker", &marker, e)
                }
            })?;
        let lock = FileLock::try_exclusive(file).ok_or_else(|| Error::InUse {
            id: id.clone(),
            reason: "another apply is in progress".to_string(),
        })?;
        Ok(ApplyGuard {
            store: self,
            id: id.clone(),
            _lock: Some(lock),
            finished: false,
        })
    }

    /// Removes layer `id`: refused with [`Error::InUse`] while it has outstanding gets and with
    /// [`Error::HasChildren`] while layers name it as parent. `before` runs under the store lock
    /// after those checks and before the layer disappears (drivers unmount or release there).
    ///
    /// Also refused with [`Error::InUse`] while another process applies a diff to `id`, and with
    /// [`Error::HasChildren`] for a child that is still being applied. The layer disappears by
    /// one rename under the store lock; its data is deleted after the lock is released.
    pub fn remove(&self, id: &LayerId, before: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let grave = {
            let _lock = self.lock_exclusive()?;
            let dir = self.layer_dir(id);
            if !dir.is_dir() {
                return Err(Error::NotFound(id.clone()));
            }
            if apply_in_progress(&dir) {
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
            before(&dir)?;
            self.bury(id)?
        };
        grave.delete()
    }

    /// Renames `<home>/<id>` into `.staging/` (flocked, so recovery elsewhere leaves it to us)
    /// and drops its mount record. No checks: callers have done them.
    fn bury(&self, id: &LayerId) -> Result<Grave> {
        let dir = self.layer_dir(id);
        // The flock follows the directory through the rename: there is no moment where the
        // grave is in `.staging/` unlocked while we still work on it.
        let lock = FileLock::lock_dir(&dir)?;
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self.home.join(STAGING_DIR).join(format!(
            "rm-{}-{}-{n}",
            id.as_str(),
            std::process::id()
        ));
        fs::rename(&dir, &path).ctx("rename for removal", &dir)?;
        let record = self.mount_record(id);
        match fs::remove_file(&record) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %record.display(), error = %e, "could not remove a mount record")
            }
        }
        Ok(Grave { path, _lock: lock })
    }

    /// Renames `<home>/<id>` away and deletes it. No checks: callers have done them.
    fn discard_layer_dir(&self, id: &LayerId) -> Result<()> {
        self.bury(id)?.delete()
    }

    /// A fresh, flocked staging directory for `id`, with its `parent` file. The parent is
    /// checked again after that file is written, under the shared store lock: an apply to the
    /// parent either started before (and the parent is absent now) or sees this child being
    /// created and is refused, so a child never copies a half-applied parent.
    fn staging_dir(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<StagingDir> {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self.home.join(STAGING_DIR).join(format!(
            "new-{}-{}-{n}",
            id.as_str(),
            std::process::id()
        ));
        // Recovery (which holds the store lock exclusively) deletes staging dirs nobody has
        // locked: hold the lock shared from the mkdir until our flock is taken.
        let _store = self.lock_shared()?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .ctx("create staging directory", &path)?;
        let dir = match File::open(&path) {
            Ok(d) => d,
            Err(e) => {
                let _ = remove_any(&path);
                return Err(Error::io("open staging directory", &path, e));
            }
        };
        let Some(lock) = FileLock::try_exclusive(dir) else {
            let _ = remove_any(&path);
            let e = io::Error::from(io::ErrorKind::WouldBlock);
            return Err(Error::io("lock", &path, e));
        };
        let staging = StagingDir {
            path,
            _lock: lock,
            committed: false,
        };
        if let Some(p) = parent {
            write_file(&staging.path.join(PARENT_FILE), p.as_str().as_bytes())?;
            self.require(p)?;
        }
        Ok(staging)
    }

    /// Why a diff cannot be applied to `id` now because of its relatives, if it cannot: a
    /// child being created (it copies this layer) or applied (it may copy this layer's tree),
    /// or the parent being applied (this layer may copy it). Call under the store lock.
    fn relatives_busy(&self, id: &LayerId) -> Result<Option<String>> {
        if let Some(p) = read_parent(&self.layer_dir(id))? {
            if apply_in_progress(&self.layer_dir(&p)) {
                return Ok(Some(format!("its parent {p} is being applied")));
            }
        }
        for child in self.children_any(id)? {
            if apply_in_progress(&self.layer_dir(&child)) {
                return Ok(Some(format!("its child {child} is being applied")));
            }
        }
        let staging = self.home.join(STAGING_DIR);
        for entry in fs::read_dir(&staging).ctx("read directory", &staging)? {
            let entry = entry.ctx("read directory", &staging)?;
            if !entry.file_name().to_string_lossy().starts_with("new-") {
                continue;
            }
            if read_parent(&entry.path())?.as_ref() == Some(id) {
                return Ok(Some("a child of it is being created".to_string()));
            }
        }
        Ok(None)
    }

    fn recover(&self) -> Result<Recovery> {
        let mut rec = Recovery::default();
        let _lock = self.lock_exclusive()?;
        let staging = self.home.join(STAGING_DIR);
        for entry in fs::read_dir(&staging).ctx("read directory", &staging)? {
            let path = entry.ctx("read directory", &staging)?.path();
            let Ok(file) = File::open(&path) else {
                continue;
            };
            // A live owner holds the flock on its staging dir (removals: no owner, always stale
            // once we hold the store lock... unless mid-delete; deleting twice is harmless).
            if let Some(_held) = FileLock::try_exclusive(file) {
                // One undeletable leftover must not make the whole store unusable.
                match remove_any(&path) {
                    Ok(()) => rec.staging_removed.push(path),
                    Err(e) => rec.failed.push(e.to_string()),
                }
            }
        }
        for (id, entry_path) in entries_named_by_id(&self.home)? {
            let marker = entry_path.join(INCOMPLETE_FILE);
            let Ok(file) = File::open(&marker) else {
                continue;
            };
            if let Some(held) = FileLock::try_exclusive(file) {
                // An apply that finished between our open and our lock removed the marker
                // first: the layer is complete, not abandoned.
                if !still_linked(&held, &marker) {
                    continue;
                }
                match self.discard_layer_dir(&id) {
                    Ok(()) => rec.incomplete_removed.push(id),
                    Err(e) => rec.failed.push(format!("incomplete layer {id}: {e}")),
                }
            }
        }
        let mounts = self.home.join(MOUNTS_DIR);
        for entry in fs::read_dir(&mounts).ctx("read directory", &mounts)? {
            let entry = entry.ctx("read directory", &mounts)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let gone = LayerId::new(name.as_str())
                .map(|id| !self.layer_dir(&id).is_dir())
                .unwrap_or(true);
            if gone {
                let _ = fs::remove_file(entry.path());
                rec.stale_mount_records.push(name);
            }
        }
        Ok(rec)
    }

    // === mount reference counts ===

    fn mount_record(&self, id: &LayerId) -> PathBuf {
        self.home.join(MOUNTS_DIR).join(id.as_str())
    }

    /// Outstanding gets of `id`, in any process.
    ///
    /// Read under the record's lock (shared), so a count being rewritten is never seen half
    /// written.
    pub fn mount_count(&self, id: &LayerId) -> Result<u32> {
        let path = self.mount_record(id);
        match FileLock::acquire_existing(&path, FlockOperation::LockShared)? {
            None => Ok(0),
            Some(mut lock) => read_count(lock.file(&path)?, &path),
        }
    }

    /// Every layer with outstanding gets and its count.
    pub fn mounted(&self) -> Result<Vec<(LayerId, u32)>> {
        let mut out = Vec::new();
        let dir = self.home.join(MOUNTS_DIR);
        for (id, _) in entries_named_by_id(&dir)? {
            let count = self.mount_count(&id)?;
            if count > 0 {
                out.push((id, count));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Records one more get of `id` and returns the new count.
    ///
    /// Under the shared store lock (so `id` cannot be removed meanwhile) and a per-layer lock
    /// (shared by all processes). `is_active` reports whether the layer's mount exists right
    /// now (drivers that mount nothing answer `true`); `activate` (it mounts) runs exactly when
    /// it does not: on the first get, and when the mount vanished behind our back (a reboot, a
    /// manual umount). A mount that exists although no get was recorded (a process killed
    /// between mounting and counting) is adopted rather than mounted a second time.
    pub fn acquire_ref(
        &self,
        id: &LayerId,
        is_active: impl FnOnce() -> Result<bool>,
        activate: impl FnOnce() -> Result<()>,
    ) -> Result<u32> {
        let _store = self.lock_shared()?;
        self.require(id)?;
        let path = self.mount_record(id);
        let mut lock = FileLock::acquire(&path, FlockOperation::LockExclusive)?;
        let file = lock.file(&path)?;
        let count = read_count(file, &path)?;
        if !is_active()? {
            if count > 0 {
                tracing::warn!(layer = %id, count, "mount vanished behind our back; mounting again");
            }
            activate()?;
        } else if count == 0 {
            tracing::debug!(layer = %id, "adopting a mount that has no recorded get");
        }
        let count = count.saturating_add(1);
        write_count(file, &path, count)?;
        Ok(count)
    }

    /// Releases one get of `id` and returns the remaining count; at zero `deactivate` runs
    /// (it unmounts). Releasing a layer with no outstanding get is a no-op returning 0.
    pub fn release_ref(
        &self,
        id: &LayerId,
        deactivate: impl FnOnce() -> Result<()>,
    ) -> Result<u32> {
        let path = self.mount_record(id);
        if !path.exists() {
            return Ok(0);
        }
        let Some(mut lock) = FileLock::acquire_existing(&path, FlockOperation::LockExclusive)?
        else {
            return Ok(0);
        };
        let file = lock.file(&path)?;
        let count = read_count(file, &path)?;
        if count == 0 {
            return Ok(0);
        }
        let left = count - 1;
        if left == 0 {
            deactivate()?;
        }
        write_count(file, &path, left)?;
        Ok(left)
    }

    /// Drops every outstanding get of `id` at once, running `deactivate` if any was outstanding.
    pub fn release_all(&self, id: &LayerId, deactivate: impl FnOnce() -> Result<()>) -> Result<()> {
        let path = self.mount_record(id);
        if !path.exists() {
            return Ok(());
        }
        let Some(mut lock) = FileLock::acquire_existing(&path, FlockOperation::LockExclusive)?
        else {
            return Ok(());
        };
        let file = lock.file(&path)?;
        if read_count(file, &path)? > 0 {
            deactivate()?;
        }
        write_count(file, &path, 0)
    }

    /// Resets the mount count of every layer whose recorded gets are outstanding but whose
    /// mount is gone (a reboot, a manual umount, a process killed while unmounting): the record
    /// is not trusted, `is_active` (the driver's look at `/proc/self/mountinfo`) is. Returns the
    /// layers repaired with the count they had, reported through `tracing`. Drivers that mount
    /// call it from their init; on a read-only store it does nothing.
    ///
    /// Each record is checked under its per-layer lock, so a get or put in progress in another
    /// process is never mistaken for a vanished mount.
    pub fn repair_mounts(
        &self,
        is_active: impl Fn(&LayerId) -> Result<bool>,
    ) -> Result<Vec<(LayerId, u32)>> {
        let mut repaired = Vec::new();
        if is_read_only(&self.home) {
            return Ok(repaired);
        }
        let dir = self.home.join(MOUNTS_DIR);
        for (id, entry_path) in entries_named_by_id(&dir)? {
            let path = entry_path;
            let Some(mut lock) = FileLock::acquire_existing(&path, FlockOperation::LockExclusive)?
            else {
                continue;
            };
            let file = lock.file(&path)?;
            let count = read_count(file, &path)?;
            if count == 0 || !self.exists(&id) || is_active(&id)? {
                continue;
            }
            write_count(file, &path, 0)?;
            repaired.push((id, count));
        }
        repaired.sort();
        if !repaired.is_empty() {
            tracing::warn!(home = %self.home.display(), ?repaired, "reset the mount counts of layers whose mounts are gone");
        }
        Ok(repaired)
    }
}

/// A layer being modified by [`LayerStore::begin_apply`].
#[derive(Debug)]
pub struct ApplyGuard<'a> {
    store: &'a LayerStore,
    id: LayerId,
    _lock: Option<FileLock>,
    finished: bool,
}

impl ApplyGuard<'_> {
    /// The modification succeeded: sync if configured and make the layer visible again.
    pub fn finish(mut self) -> Result<()> {
        let dir = self.store.layer_dir(&self.id);
        if self.store.sync {
            sync_tree(&dir)?;
        }
        let marker = dir.join(INCOMPLETE_FILE);
        fs::remove_file(&marker).ctx("remove marker", &marker)?;
        self.finished = true;
        if self.store.sync {
            fsync_dir(&dir)?;
        }
        Ok(())
    }
}

impl Drop for ApplyGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // Never leave a half-applied layer under its id.
            if let Err(e) = self.store.discard_layer_dir(&self.id) {
                tracing::error!(layer = %self.id, error = %e, "could not remove a failed layer");
            }
        }
    }
}

/// A removed layer's directory in `.staging/`, flocked until its deletion is done.
struct Grave {
    path: PathBuf,
    _lock: FileLock,
}

impl Grave {
    fn delete(self) -> Result<()> {
        remove_any(&self.path)
    }
}

struct StagingDir {
    path: PathBuf,
    _lock: FileLock,
    committed: bool,
}

impl StagingDir {
    fn committed(mut self) {
        self.committed = true;
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = remove_any(&self.path);
        }
    }
}

/// True if `dir` is a layer directory without an unfinished apply. The marker is looked up
/// through the directory's descriptor, so a layer renamed away meanwhile is judged by its own
/// state, not by a missing path.
fn is_complete(dir: &Path) -> bool {
    let Ok(fd) = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) else {
        return false;
    };
    matches!(
        rustix::fs::statat(&fd, INCOMPLETE_FILE, rustix::fs::AtFlags::SYMLINK_NOFOLLOW),
        Err(rustix::io::Errno::NOENT)
    )
}

/// True if the file `lock` holds is still the one at `path` (not unlinked or replaced).
fn still_linked(lock: &FileLock, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Some(file), Ok(now)) = (lock.file.as_ref(), fs::symlink_metadata(path)) else {
        return false;
    };
    file.metadata()
        .is_ok_and(|held| held.ino() == now.ino() && held.dev() == now.dev())
}

/// True if a live process holds the `incomplete` marker of layer directory `dir` (a marker
/// nobody holds is a dead process's leftover).
fn apply_in_progress(dir: &Path) -> bool {
    let marker = dir.join(INCOMPLETE_FILE);
    match File::open(&marker) {
        Ok(f) => match FileLock::try_exclusive(f) {
            None => true,
            // Free, but is it still there? (An apply that just finished unlinked it.)
            Some(held) => !still_linked(&held, &marker) && marker.exists(),
        },
        Err(_) => false,
    }
}

/// Takes group and other access away from `home` unless it is already 0700 or 0710.
fn restrict_mode(home: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(home).ctx("stat", home)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o067 != 0 || mode & 0o7000 != 0 {
        tracing::info!(home = %home.display(), mode = format!("{mode:o}"), "restricting the driver home to 0700");
        fs::set_permissions(home, fs::Permissions::from_mode(0o700)).ctx("chmod", home)?;
    }
    Ok(())
}

/// True if `path` is on a filesystem mounted read-only.
fn is_read_only(path: &Path) -> bool {
    rustix::fs::statvfs(path)
        .map(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
        .unwrap_or(false)
}

/// The entries of `dir` whose names are valid layer ids, with their paths; other names (the
/// store's dot-named bookkeeping, stray files) are skipped.
fn entries_named_by_id(dir: &Path) -> Result<Vec<(LayerId, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).ctx("read directory", dir)? {
        let entry = entry.ctx("read directory", dir)?;
        if let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| LayerId::new(n).ok())
        {
            out.push((id, entry.path()));
        }
    }
    Ok(out)
}

fn read_parent(dir: &Path) -> Result<Option<LayerId>> {
    let path = dir.join(PARENT_FILE);
    match fs::read_to_string(&path) {
        Ok(s) => LayerId::new(s.trim()).map(Some).map_err(|e| Error::Io {
            op: "read parent id".into(),
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", &path, e)),
    }
}

fn read_count(file: &mut File, path: &Path) -> Result<u32> {
    let mut s = String::new();
    use std::io::Seek;
    file.seek(io::SeekFrom::Start(0)).ctx("seek", path)?;
    file.read_to_string(&mut s).ctx("read", path)?;
    Ok(s.trim().parse().unwrap_or(0))
}

fn write_count(file: &mut File, path: &Path, count: u32) -> Result<()> {
    use std::io::Seek;
    file.set_len(0).ctx("truncate", path)?;
    file.seek(io::SeekFrom::Start(0)).ctx("seek", path)?;
    file.write_all(count.to_string().as_bytes())
        .ctx("write", path)
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    fs::write(path, data).ctx("write", path)
}

/// Removes a file or a tree; one that is (or becomes) absent meanwhile is not an error.
fn remove_any(path: &Path) -> Result<()> {
    let res = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match res {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.ctx("remove", path),
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).ctx("sync", dir)
}

/// Flushes the filesystem holding `dir` (syncfs): cheaper and more complete than syncing every
/// file of a large layer one by one.
fn sync_tree(dir: &Path) -> Result<()> {
    let f = File::open(dir).ctx("open", dir)?;
    rustix::fs::syncfs(&f)
        .map_err(io::Error::from)
        .ctx("sync filesystem", dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> LayerId {
        LayerId::new(s).unwrap()
    }

    fn store() -> (tempfile::TempDir, LayerStore) {
        let dir = tempfile::tempdir().unwrap();
        let (s, rec) = LayerStore::open(&dir.path().join("home"), false).unwrap();
        assert!(rec.is_empty());
        (dir, s)
    }

    #[test]
    fn create_list_remove() {
        let (_d, s) = store();
        s.create(&id("a"), None, false, |_| Ok(())).unwrap();
        s.create(&id("b"), Some(&id("a")), true, |p| {
            fs::write(p.join("data"), "x").ctx("write", p)
        })
        .unwrap();
        assert!(s.exists(&id("b")));
        assert!(s.is_read_write(&id("b")));
        assert_eq!(s.parent(&id("b")).unwrap(), Some(id("a")));
        let list = s.list().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].parent, Some(id("a")));
        assert!(matches!(
            s.remove(&id("a"), |_| Ok(())),
            Err(Error::HasChildren { .. })
        ));
        s.remove(&id("b"), |_| Ok(())).unwrap();
        s.remove(&id("a"), |_| Ok(())).unwrap();
        assert!(s.list().unwrap().is_empty());
        assert!(matches!(
            s.remove(&id("a"), |_| Ok(())),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn duplicate_and_missing_parent() {
        let (_d, s) = store();
        s.create(&id("a"), None, false, |_| Ok(())).unwrap();
        assert!(matches!(
            s.create(&id("a"), None, false, |_| Ok(())),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            s.create(&id("c"), Some(&id("zz")), false, |_| Ok(())),
            Err(Error::NotFound(p)) if p == id("zz")
        ));
    }

    #[test]
    fn a_child_being_built_pins_its_parent() {
        let (_d, s) = store();
        s.create(&id("p"), None, false, |_| Ok(())).unwrap();
        s.create(&id("c"), Some(&id("p")), false, |_| {
            // While the child copies the parent, the parent can be neither removed nor changed.
            match s.remove(&id("p"), |_| Ok(())) {
                Err(Error::HasChildren { children, .. }) => assert_eq!(children, vec![id("c")]),
                other => panic!("expected HasChildren, found {other:?}"),
            }
            assert!(matches!(s.begin_apply(&id("p")), Err(Error::InUse { .. })));
            Ok(())
        })
        .unwrap();
        assert_eq!(s.children(&id("p")).unwrap(), vec![id("c")]);
    }

    #[test]
    fn failed_populate_leaves_nothing() {
        let (_d, s) = store();
        let err = s
            .create(&id("a"), None, false, |p| {
                fs::write(p.join("half"), "x").unwrap();
                Err(Error::io("boom", p, io::Error::other("injected")))
            })
            .unwrap_err();
        assert!(err.to_string().contains("injected"));
        assert!(!s.exists(&id("a")));
        assert!(!s.layer_dir(&id("a")).exists());
        assert_eq!(fs::read_dir(s.home().join(STAGING_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn failed_apply_removes_the_layer() {
        let (_d, s) = store();
        s.create(&id("a"), None, false, |_| Ok(())).unwrap();
        {
            let _g = s.begin_apply(&id("a")).unwrap();
            assert!(!s.exists(&id("a")), "an applying layer counts as absent");
            assert!(matches!(s.begin_apply(&id("a")), Err(Error::NotFound(_))));
        }
        assert!(!s.layer_dir(&id("a")).exists());
        s.create(&id("a"), None, false, |_| Ok(())).unwrap();
        s.begin_apply(&id("a")).unwrap().finish().unwrap();
        assert!(s.exists(&id("a")));
    }

    /// A fake mount: `is_active` reports the cell, `activate` sets it.
    fn acquire(s: &LayerStore, l: &str, mounted: &std::cell::Cell<bool>, calls: &mut u32) -> u32 {
        s.acquire_ref(
            &id(l),
            || Ok(mounted.get()),
            || {
                *calls += 1;
                mounted.set(true);
                Ok(())
            },
        )
        .unwrap()
    }

    #[test]
    fn mount_counts_nest_and_block_removal() {
        let (_d, s) = store();
        s.create(&id("a"), None, false, |_| Ok(())).unwrap();
        let mounted = std::cell::Cell::new(false);
        let mut activations = 0;
        for _ in 0..2 {
            acquire(&s, "a", &mounted, &mut activations);
        }
        assert_eq!(activations, 1);
        assert_eq!(s.mount_count(&id("a")).unwrap(), 2);
        assert_eq!(s.mounted().unwrap(), vec![(id("a"), 2)]);
        assert!(matches!(
            s.remove(&id("a"), |_| Ok(())),
            Err(Error::InUse { .. })
        ));
        let mut deactivations = 0;
        assert_eq!(s.release_ref(&id("a"), || Ok(())).unwrap(), 1);
        assert_eq!(
            s.release_ref(&id("a"), || {
                deactivations += 1;
                Ok(())
            })
            .unwrap(),
            0
        );
        assert_eq!(deactivations, 1);
        assert_eq!(s.release_ref(&id("a"), || Ok(())).unwrap(), 0);
        s.remove(&id("a"), |_| Ok(())).unwrap();
        assert!(!s.mount_record(&id("a")).exists());
    }

    #[test]
    fn vanished_mount_is_activated_again() {
        let (_d, s) = store();
        s.create(&id("a"), None, false, |_| Ok(())).unwrap();
        let mounted = std::cell::Cell::new(false);
        let mut activations = 0;
        acquire(&s, "a", &mounted, &mut activations);
        mounted.set(false); // a manual umount
        acquire(&s, "a", &mounted, &mut activations);
        assert_eq!(activations, 2);
        assert_eq!(s.mount_count(&id("a")).unwrap(), 2);
    }

    #[test]
    fn an_uncounted_mount_is_adopted_not_stacked() {
        let (_d, s) = store();
        s.create(&id("a"), None, false, |_| Ok(())).unwrap();
        // A process was killed after mounting and before counting.
        let mounted = std::cell::Cell::new(true);
        let mut activations = 0;
        assert_eq!(acquire(&s, "a", &mounted, &mut activations), 1);
        assert_eq!(activations, 0);
    }

    #[test]
    fn repair_mounts_resets_counts_of_vanished_mounts_only() {
        let (_d, s) = store();
        for l in ["a", "b", "c"] {
            s.create(&id(l), None, false, |_| Ok(())).unwrap();
            s.acquire_ref(&id(l), || Ok(false), || Ok(())).unwrap();
        }
        s.acquire_ref(&id("a"), || Ok(true), || Ok(())).unwrap();
        s.release_ref(&id("c"), || Ok(())).unwrap();
        // "a" (2 gets) lost its mount, "b" still has it, "c" has no gets.
        let repaired = s.repair_mounts(|l| Ok(l.as_str() != "a")).unwrap();
        assert_eq!(repaired, vec![(id("a"), 2)]);
        assert_eq!(s.mount_count(&id("a")).unwrap(), 0);
        assert_eq!(s.mount_count(&id("b")).unwrap(), 1);
        s.remove(&id("a"), |_| Ok(())).unwrap();
        assert!(s.repair_mounts(|_| Ok(false)).unwrap() == vec![(id("b"), 1)]);
    }

    #[test]
    fn remove_refuses_a_layer_being_applied_and_a_parent_of_one() {
        let (_d, s) = store();
        s.create(&id("p"), None, false, |_| Ok(())).unwrap();
        s.create(&id("c"), Some(&id("p")), false, |_| Ok(()))
            .unwrap();
        let guard = s.begin_apply(&id("c")).unwrap();
        assert!(matches!(
            s.remove(&id("c"), |_| Ok(())),
            Err(Error::InUse { .. })
        ));
        // The applying child is not listed, but it still pins its parent.
        assert!(s.children(&id("p")).unwrap().is_empty());
        assert!(matches!(
            s.remove(&id("p"), |_| Ok(())),
            Err(Error::HasChildren { children, .. }) if children == vec![id("c")]
        ));
        guard.finish().unwrap();
        s.remove(&id("c"), |_| Ok(())).unwrap();
        s.remove(&id("p"), |_| Ok(())).unwrap();
        assert_eq!(fs::read_dir(s.home().join(STAGING_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn no_layer_is_copied_from_a_half_applied_one() {
        let (_d, s) = store();
        s.create(&id("p"), None, false, |_| Ok(())).unwrap();
        // A child being created (copying p) blocks an apply to p...
        s.create(&id("c"), Some(&id("p")), false, |_| {
            match s.begin_apply(&id("p")) {
                Err(Error::InUse { reason, .. }) => assert!(reason.contains("being created")),
                other => panic!("apply during a child's create: {other:?}"),
            }
            Ok(())
        })
        .unwrap();
        // ...a child being applied blocks it too, and the other way round.
        let child = s.begin_apply(&id("c")).unwrap();
        assert!(matches!(s.begin_apply(&id("p")), Err(Error::InUse { .. })));
        child.finish().unwrap();
        let parent = s.begin_apply(&id("p")).unwrap();
        assert!(matches!(s.begin_apply(&id("c")), Err(Error::InUse { .. })));
        // A create on a parent being applied finds it absent.
        assert!(matches!(
            s.create(&id("d"), Some(&id("p")), false, |_| Ok(())),
            Err(Error::NotFound(p)) if p == id("p")
        ));
        parent.finish().unwrap();
        s.begin_apply(&id("c")).unwrap().finish().unwrap();
        assert_eq!(fs::read_dir(s.home().join(STAGING_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn a_removal_in_progress_is_not_recovered_by_another_opener() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let (s, _) = LayerStore::open(&home, false).unwrap();
        s.create(&id("a"), None, false, |_| Ok(())).unwrap();
        let grave = s.bury(&id("a")).unwrap();
        assert!(!s.exists(&id("a")));
        let (_s2, rec) = LayerStore::open(&home, false).unwrap();
        assert!(rec.staging_removed.is_empty(), "{rec:?}");
        assert!(grave.path.exists());
        grave.delete().unwrap();
        assert_eq!(fs::read_dir(home.join(STAGING_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn an_undeletable_leftover_does_not_brick_the_store() {
        let root = rustix::process::geteuid().is_root();
        if !root && std::env::var("CI").as_deref() != Ok("true") {
            eprintln!("skipping: needs root to mount a tmpfs (set CI=true to force it)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let (s, _) = LayerStore::open(&home, false).unwrap();
        s.create(&id("a"), None, false, |_| Ok(())).unwrap();
        // A dead process's staging dir with something mounted inside.
        let stale = home.join(STAGING_DIR).join("new-x-1-1");
        fs::create_dir_all(stale.join("m")).unwrap();
        rustix::mount::mount(
            "tmpfs",
            stale.join("m"),
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .unwrap();
        let opened = LayerStore::open(&home, false);
        rustix::mount::unmount(stale.join("m"), rustix::mount::UnmountFlags::empty()).unwrap();
        let (s2, rec) = opened.unwrap();
        assert_eq!(rec.failed.len(), 1, "{rec:?}");
        assert!(rec.failed[0].contains("new-x-1-1"), "{rec:?}");
        assert!(s2.exists(&id("a")));
        // The next open retries and succeeds.
        let (_, rec) = LayerStore::open(&home, false).unwrap();
        assert_eq!(rec.staging_removed, vec![stale]);
    }

    #[test]
    fn home_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        fs::create_dir(&home).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
        let (s, _) = LayerStore::open(&home, false).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&home), 0o700);
        s.create(&id("a"), None, false, |_| Ok(())).unwrap();
        assert_eq!(mode(&s.layer_dir(&id("a"))), 0o700);
        // 0710 (group traversal for a remapped root) is a deliberate choice and kept.
        fs::set_permissions(&home, fs::Permissions::from_mode(0o710)).unwrap();
        LayerStore::open(&home, false).unwrap();
        assert_eq!(mode(&home), 0o710);
    }

    #[test]
    fn sync_stores_work() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = LayerStore::open(&dir.path().join("home"), true).unwrap();
        s.create(&id("a"), None, false, |p| {
            fs::write(p.join("f"), "x").ctx("write", p)
        })
        .unwrap();
        s.begin_apply(&id("a")).unwrap().finish().unwrap();
        assert_eq!(
            fs::read_to_string(s.layer_dir(&id("a")).join("f")).unwrap(),
            "x"
        );
    }

    #[test]
    fn concurrent_threads_keep_counts_and_layers_consistent() {
        // flock is per open file description, so threads contend like processes do.
        let (_d, s) = store();
        s.create(&id("base"), None, false, |_| Ok(())).unwrap();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let s = s.clone();
                scope.spawn(move || {
                    for i in 0..30 {
                        let l = id(&format!("l{}", (t + i) % 5));
                        let _ = s.create(&l, Some(&id("base")), false, |_| Ok(()));
                        if s.acquire_ref(&l, || Ok(true), || Ok(())).is_ok() {
                            s.release_ref(&l, || Ok(())).unwrap();
                        }
                        if let Ok(g) = s.begin_apply(&l) {
                            if i % 3 == 0 {
                                drop(g);
                            } else {
                                g.finish().unwrap();
                            }
                        }
                        let _ = s.remove(&l, |_| Ok(()));
                        let _ = s.remove(&id("base"), |_| Ok(()));
                    }
                });
            }
        });
        let list = s.list().unwrap();
        for l in &list {
            assert!(
                l.id.as_str() == "base" || l.parent == Some(id("base")),
                "{l:?}"
            );
        }
        assert!(s.mounted().unwrap().is_empty());
        assert_eq!(fs::read_dir(s.home().join(STAGING_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn recovery_removes_leftovers_but_not_live_work() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let (s, _) = LayerStore::open(&home, false).unwrap();
        s.create(&id("a"), None, false, |_| Ok(())).unwrap();
        s.create(&id("b"), None, false, |_| Ok(())).unwrap();
        // A dead process's staging dir and incomplete layer: nobody holds their locks.
        fs::create_dir(home.join(STAGING_DIR).join("new-x-1-1")).unwrap();
        fs::write(home.join("a").join(INCOMPLETE_FILE), "").unwrap();
        fs::write(home.join(MOUNTS_DIR).join("gone"), "1").unwrap();
        // Live work: a guard held by "another process" (same effect: the flock is held).
        let live = s.begin_apply(&id("b")).unwrap();
        let (_s2, rec) = LayerStore::open(&home, false).unwrap();
        assert_eq!(rec.staging_removed.len(), 1);
        assert_eq!(rec.incomplete_removed, vec![id("a")]);
        assert_eq!(rec.stale_mount_records, vec!["gone".to_string()]);
        assert!(home.join("b").exists(), "live apply must be left alone");
        live.finish().unwrap();
        assert!(s.exists(&id("b")));
    }
}
