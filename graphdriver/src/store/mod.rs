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
//! an uncommitted layer is all or nothing (see [`atomic`]): a layer this store
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
//! # Where each part lives
//!
//! `locks` (the store lock, [`FileLock`]), `create` (staging and renaming into place, pending
//! layers), `apply` ([`LayerStore::begin_apply`], [`ApplyGuard`]) with `atomic` (staged
//! replacement of a tree), `remove`, `recovery` ([`Recovery`]), `mounts` and `views` (mount
//! references, read-only views), `details` and `diff_id` (what `graphctl info` shows),
//! `staging` (the names in `.staging/`), `nofollow` (the symlink-proof calls all of them use).
//! This file holds the store itself: opening, lookups, listing.
//!
//! # Permissions
//!
//! The home is created 0700 and an existing one is made 0700 (0710 is left alone; one that group
//! or others can write is refused, see above), and layer directories are created 0700, so other
//! users cannot reach into layers (and the setuid binaries they may hold).

mod apply;
mod atomic;
mod create;
mod details;
mod diff_id;
mod durability;
mod locks;
mod mounts;
mod nofollow;
mod recovery;
mod remove;
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

pub use apply::ApplyGuard;
pub use atomic::APPLY_PREFIX;
use create::pending_map;
pub use details::LayerDetails;
pub use durability::Durability;
pub use locks::FileLock;
use locks::still_linked;
pub use mounts::Holder;
use nofollow::{lstat_type, open_dir, open_dir_opt, unexpected};
pub use recovery::Recovery;
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
    /// process: the key of this home's entries in [`PENDING`](create::PENDING).
    home_key: (u64, u64, u64),
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

    /// Like [`read_layer_file`](Self::read_layer_file) for a record of up to `max` bytes (a
    /// longer file is an error naming the limit), such as overlay2's lower chain.
    pub fn read_layer_record(&self, id: &LayerId, name: &str, max: u64) -> Result<Option<String>> {
        let (layer, path) = self.layer_entry(id, name, "read layer file")?;
        nofollow::read_limited(layer.as_fd(), name, &path, max)
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
