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
//! <home>/.staging/        layers being built (new-<id>-<pid>-<n>) and being deleted
//!                         (rm-<id>-<pid>-<n>), each flocked by the process working on it;
//!                         an entry nobody holds is abandoned, whatever its pid says
//! <home>/.mounts/         mount references (see [`mounts`](self#mount-references))
//! <home>/<id>/            one layer
//!     parent              the parent's id (absent for a base layer)
//!     rw                  present for read-write (container) layers
//!     incomplete          present while a diff is applied; such a layer counts as absent
//!     apply-*             an apply's staged tree and scratch entries (see [`APPLY_PREFIX`])
//!     apply-fresh         present while a layer created for the apply is applied in place
//!     committed           present once an apply into an image layer finished: the layer is
//!                         immutable from then on (see [`LayerStore::is_committed`])
//!     diff-id             the DiffID the layer was made from, if recorded (see
//!                         [`LayerStore::set_diff_id`]); deleted by every apply
//!     view/               the mount point of the layer's read-only view, made by the first
//!                         get that asks for one (see [`LayerStore::acquire_bind_view`])
//!     …                   the driver's own content (root/, upper/, …)
//! ```
//!
//! Layer ids never start with `.`, so the bookkeeping names cannot collide with a layer.
//!
//! # Trust
//!
//! The store trusts nothing it did not make. [`LayerStore::open`] refuses, like ssh's
//! `StrictModes`, a home that is a symlink, is not owned by the effective uid or can be written
//! by group or others, and the same for the root directory above it (which may also be owned
//! by root). The error names the path and what is wrong. Inside the home every file and directory
//! of the store is opened relative to the home's descriptor with `O_NOFOLLOW`: a symlink (or any
//! other type) where the store expects one of its directories or files is reported as an error
//! naming the path ("expected a directory, found a symlink"), never followed, and recovery never
//! deletes through one. Drivers ask [`LayerStore::layer_subdir`] for their own directories inside
//! a layer (`root/`, `upper/`, …), which refuses a symlink in the same way.
//!
//! # Atomicity
//!
//! [`LayerStore::create`] builds the layer in `.staging/` and renames it into place with
//! `RENAME_NOREPLACE`: a layer is either complete or absent. [`LayerStore::begin_apply`] marks an
//! existing layer incomplete while it is modified. A committed layer
//! ([`LayerStore::is_committed`]) is never modified: an apply into it is refused. An apply into
//! an uncommitted layer is all or nothing (see [`atomic`](self::atomic)): a layer this store
//! has just created is applied in place and removed if the apply fails or its process dies
//! (it was created for the apply); any other layer gets the diff in a staged copy of its tree
//! that replaces the tree by one `RENAME_EXCHANGE`, so a failure or a crash leaves it exactly
//! as it was ([`LayerStore::open`] removes the copy). Removal renames the layer into `.staging/`
//! first, so the id disappears at once. [`LayerStore::open`] deletes leftovers of processes that
//! died mid-way; work still in progress in another process is recognised by the flock its owner
//! holds and left alone. No layer is copied from a half-applied one: an apply is refused while a
//! child of the layer is being created or applied or its parent is being applied.
//!
//! # Durability
//!
//! What reaches the disk before a layer becomes visible is the store's [`Durability`] (the
//! drivers' `sync` option). By default the filesystem is flushed (`syncfs`) after a layer's
//! content is complete and before the rename or marker removal that publishes it, so a power
//! cut never leaves a listed layer with empty or short files; only the newest layers may be
//! missing after the reboot.
//!
//! # Mount references
//!
//! A get of a layer is a *reference* to it; the layer cannot be removed or applied to while
//! references are outstanding, and the last one going deactivates (unmounts) it. A reference is
//! owned either by a live process or by a durable record ([`Holder`]):
//!
//! ```text
//! <home>/.mounts/<id>                 durable references of <id>: a decimal count, replaced by
//!                                     rename (written to a new file and fsynced first), never
//!                                     rewritten in place, absent when zero
//! <home>/.mounts/.refs-<id>/          the per-layer lock (flock of the directory)
//!     ref-<pid>-<n>                   one process-owned reference, flocked by its holder
//!     count.new                       a durable count being written
//! ```
//!
//! * [`Holder::Process`] (the default, what [`MountOpts::default`](crate::MountOpts) asks for):
//!   the reference is a file its holder keeps flocked. It dies with the process (or when the last
//!   clone of this `LayerStore` is dropped): a holder file whose flock anyone else can take is
//!   dead, and is deleted by the next [`LayerStore::open`], [`LayerStore::mount_count`] (so by
//!   every `remove` and `begin_apply`), get or put of that layer. A `changes` or `diff` killed
//!   mid-way therefore leaves nothing that blocks `rm`. A mount left behind by a dead holder is
//!   adopted by the next get (and unmounted by its put), and unmounted by `remove` and by the
//!   driver's cleanup.
//! * [`Holder::Durable`] (`MountOpts::durable`, what `graphctl mount` asks for): a reference that
//!   must outlive the process; it is a count in `.mounts/<id>` that only a put (in any process)
//!   or [`LayerStore::release_all`] takes down. A kill mid-write leaves the old or the new count,
//!   never an empty or zero one.
//!
//! [`LayerStore::release_ref`] releases one of the references this `LayerStore` (or a clone)
//! holds as a process, else one durable reference: gets and puts in one process pair up, and a
//! put in a later process (`graphctl unmount`) releases a durable get. [`LayerStore::mount_count`]
//! counts live references only. Mount states are not trusted blindly either:
//! [`LayerStore::acquire_ref`] asks the driver whether the mount is really there, and
//! [`LayerStore::repair_mounts`] (called by mounting drivers at init) resets the durable counts
//! of mounts that vanished (a reboot, a manual umount).
//!
//! # Locking (several processes share one home)
//!
//! * The store lock `.lock`: exclusive around metadata changes (the commit of a create, a
//!   removal, the start of an apply, recovery), shared around reads that must see one state
//!   ([`LayerStore::list`], [`LayerStore::children`]) and around taking a mount reference (so a
//!   layer cannot be removed between the check that it exists and the count going up).
//! * Per-layer locks: the flock on `.mounts/.refs-<id>/` serialises gets and puts of one layer
//!   (and the mount/unmount they do); the flock on `<id>/incomplete` marks an apply in progress;
//!   staging and removed directories are flocked by the process working on them.
//! * Lock order: store lock, then a per-layer lock. Nothing waits for the store lock while it
//!   holds a per-layer lock, so the locks cannot deadlock.
//!
//! # Permissions
//!
//! The home is created 0700 and an existing one is made 0700 (0710 is left alone; one that group
//! or others can write is refused, see above), and layer directories are created 0700, so other
//! users cannot reach into layers (and the setuid binaries they may hold).

mod atomic;
mod details;
mod diff_id;
mod durability;
mod mounts;
mod nofollow;
mod staging;
#[cfg(test)]
mod tests;
mod views;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

pub use atomic::APPLY_PREFIX;
pub use details::LayerDetails;
pub use durability::Durability;
pub use mounts::Holder;
use nofollow::{lstat_type, open_dir, open_dir_opt, unexpected};
use staging::{Kind, StagingName};
pub use views::VIEW_DIR;

use crate::{Error, LayerId, LayerInfo, Result};

const LOCK_FILE: &str = ".lock";
const STAGING_DIR: &str = ".staging";
const MOUNTS_DIR: &str = ".mounts";
const PARENT_FILE: &str = "parent";
const RW_FILE: &str = "rw";
const INCOMPLETE_FILE: &str = "incomplete";
const COMMITTED_FILE: &str = "committed";

/// The bookkeeping of one driver home. Cheap to share: clones share the home's descriptor and
/// the process-owned mount references (see "Mount references" in `src/store/mod.rs`).
#[derive(Debug, Clone)]
pub struct LayerStore {
    home: PathBuf,
    /// The home, opened once (after its checks); everything inside is opened relative to it.
    dir: Arc<OwnedFd>,
    durability: Durability,
    /// The process-owned references this store holds, by layer.
    held: Arc<Mutex<HashMap<LayerId, Vec<mounts::HeldRef>>>>,
    /// Layers this store created (not read-write) and has neither handed out nor applied to
    /// (see [`ApplyGuard::is_fresh`]).
    fresh: Arc<Mutex<HashSet<LayerId>>>,
    /// The home's device and inode, and a scope that is 0 except in tests that play a second
    /// process: the key of this home's entries in [`PENDING`].
    home_key: (u64, u64, u64),
}

/// An exclusive or shared hold on a flock; released on drop.
#[derive(Debug)]
pub struct FileLock {
    file: Option<File>,
}

impl FileLock {
    /// Opens (creating, mode 0600) regular file `name` of `dir` without following a symlink and
    /// locks it with `op`, waiting for the lock. A read-only store (a read-only bind mount, a
    /// snapshot) can still be read: flock works on a read-only descriptor of an existing file.
    fn acquire_at(
        dir: BorrowedFd<'_>,
        name: &str,
        path: &Path,
        op: FlockOperation,
    ) -> Result<FileLock> {
        let file = match nofollow::open_file(dir, name, path, true, true) {
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EROFS) => {
                nofollow::open_file(dir, name, path, false, false)?.ok_or_else(|| {
                    Error::io(
                        "open lock file",
                        path,
                        io::Error::from(io::ErrorKind::NotFound),
                    )
                })?
            }
            other => other?.ok_or_else(|| {
                Error::io(
                    "open lock file",
                    path,
                    io::Error::from(io::ErrorKind::NotFound),
                )
            })?,
        };
        FileLock::on(file.into(), path, op)
    }

    /// Locks the open file or directory `fd` with `op`, waiting for the lock.
    fn on(fd: OwnedFd, path: &Path, op: FlockOperation) -> Result<FileLock> {
        rustix::fs::flock(&fd, op).map_err(|e| Error::io("lock", path, e.into()))?;
        Ok(FileLock {
            file: Some(File::from(fd)),
        })
    }

    /// The locked file's descriptor.
    fn fd(&self, path: &Path) -> Result<BorrowedFd<'_>> {
        self.file.as_ref().map(|f| f.as_fd()).ok_or_else(|| {
            Error::io(
                "use lock file",
                path,
                io::Error::new(io::ErrorKind::NotFound, "the lock file is missing"),
            )
        })
    }

    /// Tries to take an exclusive lock on an already open file or directory without blocking;
    /// `None` if someone else holds it.
    fn try_exclusive(fd: impl Into<OwnedFd>) -> Option<FileLock> {
        let fd: OwnedFd = fd.into();
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Some(FileLock {
                file: Some(File::from(fd)),
            }),
            Err(_) => None,
        }
    }
}

/// What [`LayerStore::open`] cleaned up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Staging directories of interrupted creates and removals that were deleted.
    pub staging_removed: Vec<PathBuf>,
    /// Fresh layers (created for the apply) left incomplete by an interrupted apply, now
    /// removed.
    pub incomplete_removed: Vec<LayerId>,
    /// Layers that existed before an interrupted apply, rolled back to their tree from before
    /// it (the staged copy removed).
    pub applies_rolled_back: Vec<LayerId>,
    /// Mount records of layers that no longer exist, dropped.
    pub stale_mount_records: Vec<String>,
    /// Layers whose process-owned mount references belonged to dead processes, with how many
    /// were dropped.
    pub dead_references: Vec<(LayerId, u32)>,
    /// Leftovers that could not be removed (for example a mount inside them) and entries the
    /// store did not make (a symlink where it expects a directory), one message each naming the
    /// path; they stay for the next open to retry, and the store is usable meanwhile.
    pub failed: Vec<String>,
}

impl Recovery {
    /// True if nothing needed cleaning.
    pub fn is_empty(&self) -> bool {
        self.staging_removed.is_empty()
            && self.incomplete_removed.is_empty()
            && self.applies_rolled_back.is_empty()
            && self.stale_mount_records.is_empty()
            && self.dead_references.is_empty()
            && self.failed.is_empty()
    }
}

impl LayerStore {
    /// Opens (creating if needed, mode 0700) the driver home `home`, and removes what interrupted
    /// work left behind (reported through `tracing` and returned).
    ///
    /// Refused with an error naming the path and what is wrong when `home` or the directory
    /// above it (the storage root) is a symlink, is owned by another user (the root may be owned
    /// by root) or can be written by group or others; and when `.staging` or `.mounts` inside it
    /// is not a directory. See "Trust" in `src/store/mod.rs`.
    ///
    /// `durability` says what is flushed to disk, and so what a power cut can cost (see
    /// [`Durability`]; `Durability::default()` unless the user configured `sync`).
    pub fn open(home: &Path, durability: Durability) -> Result<(LayerStore, Recovery)> {
        let dir = nofollow::open_home(home)?;
        let store = LayerStore {
            home: home.to_path_buf(),
            dir: Arc::new(dir),
            durability,
            held: Arc::default(),
            fresh: Arc::default(),
            home_key: (0, 0, 0),
        };
        let st = rustix::fs::fstat(&*store.dir).map_err(|e| Error::io("stat", home, e.into()))?;
        let store = LayerStore {
            home_key: (st.st_dev, st.st_ino, 0),
            ..store
        };
        for name in [STAGING_DIR, MOUNTS_DIR] {
            let path = home.join(name);
            nofollow::mkdir_if_missing(store.fd(), name, 0o700, &path)?;
            open_dir(store.fd(), name, &path)?;
        }
        if store.is_read_only() {
            // Nothing can be repaired, and nothing can be changed either: every change fails
            // with EROFS naming its path. Reading (list, get of image layers) still works.
            tracing::debug!(home = %home.display(), "store is read-only; skipping recovery");
            return Ok((store, Recovery::default()));
        }
        restrict_mode(store.fd(), home)?;
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

    fn fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// True if the home is on a filesystem mounted read-only: layers can be read, not changed.
    pub fn is_read_only(&self) -> bool {
        rustix::fs::fstatvfs(self.fd())
            .map(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
            .unwrap_or(false)
    }

    /// The directory of layer `id` (whether or not it exists).
    pub fn layer_dir(&self, id: &LayerId) -> PathBuf {
        self.home.join(id.as_str())
    }

    /// The driver-owned directory `name` (one path component, such as `root`) inside layer
    /// `id`'s directory: `None` if there is no entry of that name, an error naming the path if
    /// the entry is anything but a real directory (a symlink is refused, not followed), and
    /// [`Error::NotFound`] if the layer directory does not exist. Works on layers being applied
    /// too. Drivers use it before they hand such a directory to an apply, a mount or a copy.
    pub fn layer_subdir(&self, id: &LayerId, name: &str) -> Result<Option<PathBuf>> {
        let (layer, path) = self.layer_entry(id, name, "open layer directory")?;
        match lstat_type(layer.as_fd(), name, &path)? {
            None => Ok(None),
            Some(FileType::Directory) => Ok(Some(path)),
            Some(t) => Err(unexpected("open layer directory", &path, "a directory", t)),
        }
    }

    /// The small text file `name` (one component) of layer `id`, a driver's own record such as
    /// overlay's `lower-id`, read without following a symlink: `None` if absent, an error naming
    /// the path if it is anything but a regular file (a planted link is never read through).
    pub fn read_layer_file(&self, id: &LayerId, name: &str) -> Result<Option<String>> {
        let (layer, path) = self.layer_entry(id, name, "read layer file")?;
        nofollow::read_small(layer.as_fd(), name, &path)
    }

    /// Layer `id`'s directory (opened without following a symlink; [`Error::NotFound`] if
    /// absent) and the path of its entry `name`, which must be one component (`op` names the
    /// operation in the error otherwise).
    fn layer_entry(&self, id: &LayerId, name: &str, op: &str) -> Result<(OwnedFd, PathBuf)> {
        let path = self.layer_dir(id).join(name);
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Error::io(
                op,
                &path,
                io::Error::new(io::ErrorKind::InvalidInput, "expected a single name"),
            ));
        }
        let layer = self
            .layer_fd(id)?
            .ok_or_else(|| Error::NotFound(id.clone()))?;
        Ok((layer, path))
    }

    /// Layer `id`'s directory, opened without following a symlink; `None` if absent.
    fn layer_fd(&self, id: &LayerId) -> Result<Option<OwnedFd>> {
        open_dir_opt(self.fd(), id.as_str(), &self.layer_dir(id))
    }

    /// Layer `id`'s directory if it is complete; `None` if absent or being applied.
    fn complete_layer_fd(&self, id: &LayerId) -> Result<Option<OwnedFd>> {
        Ok(self
            .layer_fd(id)?
            .filter(|fd| is_complete(fd.as_fd()) || self.is_pending_here(id)))
    }

    /// True if this store created `id` with [`LayerStore::create_pending`] and its first apply
    /// has not finished: complete for this process, absent for every other.
    fn is_pending_here(&self, id: &LayerId) -> bool {
        pending_map().contains_key(&(self.home_key, id.clone()))
    }

    /// This store as another process would see the home: its own pending layers apart.
    #[cfg(test)]
    pub(crate) fn into_other_process(mut self) -> LayerStore {
        static SCOPE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        self.home_key.2 = SCOPE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Takes (and so releases when dropped) the marker lock of pending layer `id`, if this
    /// process created it pending and has not applied it yet.
    fn take_pending(&self, id: &LayerId) -> Option<FileLock> {
        pending_map().remove(&(self.home_key, id.clone()))
    }

    fn staging_fd(&self) -> Result<OwnedFd> {
        open_dir(self.fd(), STAGING_DIR, &self.home.join(STAGING_DIR))
    }

    /// Takes the store lock exclusively (blocks until free). Hold it around metadata changes
    /// that must not interleave with other processes' (check-then-rename).
    pub fn lock_exclusive(&self) -> Result<FileLock> {
        FileLock::acquire_at(
            self.fd(),
            LOCK_FILE,
            &self.home.join(LOCK_FILE),
            FlockOperation::LockExclusive,
        )
    }

    /// Takes the store lock shared (many readers). On a read-only store without a lock file
    /// nobody can change anything, and the hold is empty.
    pub fn lock_shared(&self) -> Result<FileLock> {
        let path = self.home.join(LOCK_FILE);
        match FileLock::acquire_at(self.fd(), LOCK_FILE, &path, FlockOperation::LockShared) {
            Err(Error::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && self.is_read_only() =>
            {
                Ok(FileLock { file: None })
            }
            other => other,
        }
    }

    /// True if a complete layer `id` exists (its directory exists and no apply is unfinished).
    /// Anything but a real directory under the id (a planted symlink) is not a layer; such an
    /// entry is logged, and [`require`](Self::require) reports it as an error.
    pub fn exists(&self, id: &LayerId) -> bool {
        match self.complete_layer_fd(id) {
            Ok(fd) => fd.is_some(),
            Err(e) => {
                tracing::warn!(layer = %id, error = %e, "not a layer");
                false
            }
        }
    }

    /// Fails with [`Error::NotFound`] unless a complete layer `id` exists, and with an error
    /// naming the path if something else than a directory is there (a symlink is not followed).
    pub fn require(&self, id: &LayerId) -> Result<PathBuf> {
        self.require_fd(id)?;
        Ok(self.layer_dir(id))
    }

    fn require_fd(&self, id: &LayerId) -> Result<OwnedFd> {
        self.complete_layer_fd(id)?
            .ok_or_else(|| Error::NotFound(id.clone()))
    }

    /// True while another process builds layer `id`: its directory exists, it is not complete
    /// and the builder holds its `incomplete` marker (a layer created pending, or being
    /// applied). An importer that finds the id taken waits for this to end, then reuses the
    /// finished layer. A layer left incomplete by a dead process is not being built.
    pub fn is_being_built(&self, id: &LayerId) -> Result<bool> {
        Ok(match self.layer_fd(id)? {
            Some(fd) => !is_complete(fd.as_fd()) && apply_in_progress(fd.as_fd()),
            None => false,
        })
    }

    /// The parent recorded for layer `id`.
    pub fn parent(&self, id: &LayerId) -> Result<Option<LayerId>> {
        let fd = self.require_fd(id)?;
        read_parent(fd.as_fd(), &self.layer_dir(id))
    }

    /// True if `id` is a read-write (container) layer.
    pub fn is_read_write(&self, id: &LayerId) -> bool {
        let path = self.layer_dir(id).join(RW_FILE);
        matches!(self.layer_fd(id), Ok(Some(fd))
            if matches!(lstat_type(fd.as_fd(), RW_FILE, &path), Ok(Some(_))))
    }

    /// True if layer `id` is committed, hence immutable: an apply into it finished and it is an
    /// image layer (the `committed` marker), or some layer (complete or being built) names it
    /// as parent. The one place that answers "may this layer's tree still change".
    pub fn is_committed(&self, id: &LayerId) -> Result<bool> {
        let fd = self.require_fd(id)?;
        let path = self.layer_dir(id).join(COMMITTED_FILE);
        if lstat_type(fd.as_fd(), COMMITTED_FILE, &path)?.is_some() {
            return Ok(true);
        }
        Ok(!self.children_any(id)?.is_empty())
    }

    /// Every complete layer, sorted by id; one consistent state (under the shared store lock).
    /// An entry named like a layer that is not a directory (a planted symlink) is an error
    /// naming its path.
    pub fn list(&self) -> Result<Vec<LayerInfo>> {
        let _lock = self.lock_shared()?;
        self.list_unlocked()
    }

    fn list_unlocked(&self) -> Result<Vec<LayerInfo>> {
        let mut out = Vec::new();
        for id in ids_in(self.fd(), &self.home)? {
            let dir = self.layer_dir(&id);
            let fd = open_dir(self.fd(), id.as_str(), &dir)?;
            if !is_complete(fd.as_fd()) {
                continue;
            }
            // One damaged layer (a crash emptied its `parent`) is reported and left out; it
            // must not make the store unlistable. `rm` still removes it. Something planted
            // there (a symlink) stays an error naming the path.
            let parent = match read_parent(fd.as_fd(), &dir) {
                Ok(p) => p,
                Err(e) if is_damaged(&e) => {
                    tracing::warn!(layer = %id, error = %e, "damaged layer left out; remove it with rm");
                    continue;
                }
                Err(e) => return Err(e),
            };
            out.push(LayerInfo {
                read_write: lstat_type(fd.as_fd(), RW_FILE, &dir.join(RW_FILE))?.is_some(),
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
        let mut out = self.children_in_home(id)?;
        // Children still being built in `.staging/` copy this layer's tree right now: they count
        // too, while their builder is alive.
        out.extend(self.children_being_built(id)?);
        out.sort();
        Ok(out)
    }

    /// The layer directories under the home naming `id` as parent, complete or not.
    fn children_in_home(&self, id: &LayerId) -> Result<Vec<LayerId>> {
        let mut out = Vec::new();
        for child in ids_in(self.fd(), &self.home)? {
            let dir = self.layer_dir(&child);
            let fd = open_dir(self.fd(), child.as_str(), &dir)?;
            match read_parent(fd.as_fd(), &dir) {
                Ok(p) if p.as_ref() == Some(id) => out.push(child),
                Ok(_) => {}
                // Its parent cannot be known: it does not hold up other layers.
                Err(e) if is_damaged(&e) => {
                    tracing::warn!(layer = %child, error = %e, "damaged layer");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The one answer to "is a live child of `id` being built": the ids of the `new-` entries
    /// of `.staging/` whose `parent` file names `id` and whose builder still holds their flock
    /// (see [`staging`]; the pid in the name is never trusted, it may be reused). An entry left
    /// by a dead builder pins nothing; recovery deletes it. Anything but a directory under a
    /// `new-` name is an error naming its path (never followed). Call under the store lock: a
    /// builder holds it (shared) from its entry's mkdir until the flock and `parent` are there.
    fn children_being_built(&self, id: &LayerId) -> Result<Vec<LayerId>> {
        let staging = self.staging_fd()?;
        let staging_path = self.home.join(STAGING_DIR);
        let mut out = Vec::new();
        for name in names_in(staging.as_fd(), &staging_path)? {
            let Some(entry) = StagingName::parse(&name).filter(|e| e.kind == Kind::New) else {
                continue;
            };
            let path = staging_path.join(&name);
            let Some(dir) = open_dir_opt(staging.as_fd(), &name, &path)? else {
                continue;
            };
            if read_parent(dir.as_fd(), &path)?.as_ref() != Some(id) {
                continue;
            }
            if staging::claim(dir).is_none() {
                out.push(entry.id);
            }
        }
        out.sort();
        Ok(out)
    }

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

    fn create_impl(
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
    fn bury(&self, id: &LayerId) -> Result<Grave> {
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
    fn discard_layer_dir(&self, id: &LayerId) -> Result<()> {
        self.unmount_all_inside(id)?;
        self.bury(id)?.delete()
    }

    /// Unmounts every mount point inside layer `id`'s directory, deepest first.
    fn unmount_all_inside(&self, id: &LayerId) -> Result<()> {
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

    /// A fresh, flocked staging directory for `id`, with its `parent` file. The parent is
    /// checked again after that file is written, under the shared store lock: an apply to the
    /// parent either started before (and the parent is absent now) or sees this child being
    /// created and is refused, so a child never copies a half-applied parent.
    fn staging_dir(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<StagingDir> {
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

    /// Why a diff cannot be applied to `id` (whose directory is `dir`) now because of its
    /// relatives, if it cannot: a child being created (it copies this layer) or applied (it may
    /// copy this layer's tree), or the parent being applied (this layer may copy it). Call under
    /// the store lock.
    fn relatives_busy(&self, id: &LayerId, dir: BorrowedFd<'_>) -> Result<Option<String>> {
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

    fn recover(&self) -> Result<Recovery> {
        let mut rec = Recovery::default();
        let _lock = self.lock_exclusive()?;
        let staging = self.staging_fd()?;
        let staging_path = self.home.join(STAGING_DIR);
        for name in names_in(staging.as_fd(), &staging_path)? {
            let path = staging_path.join(&name);
            // Only real directories are ours; anything else is reported and left alone (never
            // followed, never deleted through).
            let dir = match open_dir_opt(staging.as_fd(), &name, &path) {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) => {
                    rec.failed.push(e.to_string());
                    continue;
                }
            };
            // A live owner (builder or remover) holds the flock on its entry: the same answer as
            // every other check (see `staging`). Any other directory here is abandoned too,
            // whatever its name.
            if let Some(_held) = staging::claim(dir) {
                // One undeletable leftover must not make the whole store unusable.
                match nofollow::remove_entry(staging.as_fd(), &name, &path) {
                    Ok(()) => rec.staging_removed.push(path),
                    Err(e) => rec.failed.push(e.to_string()),
                }
            }
        }
        for id in ids_in(self.fd(), &self.home)? {
            let dir = match open_dir(self.fd(), id.as_str(), &self.layer_dir(&id)) {
                Ok(d) => d,
                Err(e) => {
                    rec.failed.push(e.to_string());
                    continue;
                }
            };
            let marker = self.layer_dir(&id).join(INCOMPLETE_FILE);
            let file =
                match nofollow::open_file(dir.as_fd(), INCOMPLETE_FILE, &marker, false, false) {
                    Ok(Some(f)) => f,
                    Ok(None) => continue,
                    Err(e) => {
                        rec.failed.push(e.to_string());
                        continue;
                    }
                };
            if let Some(held) = FileLock::try_exclusive(file) {
                // An apply that finished between our open and our lock removed the marker
                // first: the layer is complete, not abandoned.
                if !still_linked(&held, dir.as_fd(), INCOMPLETE_FILE) {
                    continue;
                }
                let fresh = lstat_type(
                    dir.as_fd(),
                    atomic::FRESH_FILE,
                    &self.layer_dir(&id).join(atomic::FRESH_FILE),
                );
                match fresh {
                    // Created for this apply by the dead process: it goes.
                    Ok(Some(_)) => match self.discard_layer_dir(&id) {
                        Ok(()) => rec.incomplete_removed.push(id),
                        Err(e) => rec.failed.push(format!("incomplete layer {id}: {e}")),
                    },
                    // It existed before: the apply went into a staged copy, which goes.
                    Ok(None) => match self.roll_back_apply(&id, dir.as_fd()) {
                        Ok(()) => rec.applies_rolled_back.push(id),
                        Err(e) => rec.failed.push(format!("interrupted apply of {id}: {e}")),
                    },
                    Err(e) => rec.failed.push(e.to_string()),
                }
            }
        }
        self.recover_mounts(&mut rec)?;
        Ok(rec)
    }
}

/// A layer being modified by [`LayerStore::begin_apply`].
#[derive(Debug)]
pub struct ApplyGuard<'a> {
    store: &'a LayerStore,
    id: LayerId,
    /// The layer's directory (opened without following a symlink).
    dir: OwnedFd,
    _lock: Option<FileLock>,
    finished: bool,
    /// See [`ApplyGuard::is_fresh`].
    fresh: bool,
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

/// A removed layer's directory in `.staging/`, flocked until its deletion is done.
struct Grave {
    path: PathBuf,
    /// `.staging/` and the grave's name in it.
    parent: OwnedFd,
    name: String,
    _lock: FileLock,
}

impl Grave {
    fn delete(self) -> Result<()> {
        nofollow::remove_entry(self.parent.as_fd(), &self.name, &self.path)
    }
}

struct StagingDir {
    path: PathBuf,
    /// `.staging/` and the directory's name in it.
    parent: OwnedFd,
    name: String,
    /// The directory itself.
    fd: OwnedFd,
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
            let _ = nofollow::remove_entry(self.parent.as_fd(), &self.name, &self.path);
        }
    }
}

/// True if the layer directory `dir` has no unfinished apply. The marker is looked up through
/// the directory's descriptor, so a layer renamed away meanwhile is judged by its own state,
/// not by a missing path.
fn is_complete(dir: BorrowedFd<'_>) -> bool {
    matches!(
        rustix::fs::statat(dir, INCOMPLETE_FILE, AtFlags::SYMLINK_NOFOLLOW),
        Err(Errno::NOENT)
    )
}

/// True if the file `lock` holds is still entry `name` of `dir` (not unlinked or replaced).
fn still_linked(lock: &FileLock, dir: BorrowedFd<'_>, name: &str) -> bool {
    let (Some(file), Ok(now)) = (
        lock.file.as_ref(),
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
    ) else {
        return false;
    };
    rustix::fs::fstat(file).is_ok_and(|held| held.st_ino == now.st_ino && held.st_dev == now.st_dev)
}

/// True if a live process holds the `incomplete` marker of layer directory `dir` (a marker
/// nobody holds is a dead process's leftover). A marker that is not a regular file counts as
/// in progress: nothing is done to such a layer.
fn apply_in_progress(dir: BorrowedFd<'_>) -> bool {
    match nofollow::open_file(
        dir,
        INCOMPLETE_FILE,
        Path::new(INCOMPLETE_FILE),
        false,
        false,
    ) {
        Ok(Some(f)) => match FileLock::try_exclusive(f) {
            None => true,
            // Free, but is it still there? (An apply that just finished unlinked it.)
            Some(held) => {
                !still_linked(&held, dir, INCOMPLETE_FILE)
                    && rustix::fs::statat(dir, INCOMPLETE_FILE, AtFlags::SYMLINK_NOFOLLOW).is_ok()
            }
        },
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Takes group and other access away from the home unless it is already 0700 or 0710.
fn restrict_mode(home: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let st = rustix::fs::fstat(home).map_err(|e| Error::io("stat", path, e.into()))?;
    let mode = st.st_mode & 0o7777;
    if mode & 0o067 != 0 || mode & 0o7000 != 0 {
        tracing::info!(home = %path.display(), mode = format!("{mode:o}"), "restricting the driver home to 0700");
        rustix::fs::fchmod(home, Mode::from_raw_mode(0o700))
            .map_err(|e| Error::io("chmod", path, e.into()))?;
    }
    Ok(())
}

/// The names in directory `dir` (shown as `path`), without `.` and `..`; names that are not
/// UTF-8 are skipped (the store never makes one).
fn names_in(dir: BorrowedFd<'_>, path: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let reader =
        rustix::fs::Dir::read_from(dir).map_err(|e| Error::io("read directory", path, e.into()))?;
    for entry in reader {
        let entry = entry.map_err(|e| Error::io("read directory", path, e.into()))?;
        let Ok(name) = entry.file_name().to_str() else {
            continue;
        };
        if name != "." && name != ".." {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// The entries of `dir` whose names are valid layer ids; other names (the store's dot-named
/// bookkeeping, stray files) are skipped.
fn ids_in(dir: BorrowedFd<'_>, path: &Path) -> Result<Vec<LayerId>> {
    Ok(names_in(dir, path)?
        .into_iter()
        .filter_map(|n| LayerId::new(n).ok())
        .collect())
}

/// The `parent` file of the layer (or staging) directory `dir`, shown as `path`.
fn read_parent(dir: BorrowedFd<'_>, path: &Path) -> Result<Option<LayerId>> {
    let path = path.join(PARENT_FILE);
    match nofollow::read_small(dir, PARENT_FILE, &path)? {
        Some(s) => LayerId::new(s.trim()).map(Some).map_err(|e| Error::Io {
            op: READ_PARENT_ID.into(),
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        }),
        None => Ok(None),
    }
}

/// Layers this process created with [`LayerStore::create_pending`] whose first apply has not
/// finished, by home (device, inode) and id: the flock on their `incomplete` marker, which
/// hides them from other processes. Process-wide, because a pending layer is the process's,
/// whichever of its stores (the driver's, the importer's) looks at it.
type PendingKey = ((u64, u64, u64), LayerId);

static PENDING: std::sync::OnceLock<Mutex<HashMap<PendingKey, FileLock>>> =
    std::sync::OnceLock::new();

fn pending_map() -> std::sync::MutexGuard<'static, HashMap<PendingKey, FileLock>> {
    PENDING
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The operation named by [`read_parent`] when the file holds no valid id.
const READ_PARENT_ID: &str = "read parent id";

/// True for a `parent` file whose content is unreadable (empty or garbage after a crash), as
/// opposed to something of the wrong type planted in its place (still a hard error).
fn is_damaged(e: &Error) -> bool {
    matches!(e, Error::Io { op, .. } if op == READ_PARENT_ID)
}

fn fsync_dir(dir: BorrowedFd<'_>, path: &Path) -> Result<()> {
    rustix::fs::fsync(dir).map_err(|e| Error::io("sync", path, e.into()))
}

/// Flushes the filesystem holding `dir` (syncfs): cheaper and more complete than syncing every
/// file of a large layer one by one.
fn sync_tree(dir: BorrowedFd<'_>, path: &Path) -> Result<()> {
    rustix::fs::syncfs(dir).map_err(|e| Error::io("sync filesystem", path, e.into()))
}
