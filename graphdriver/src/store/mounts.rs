//! Mount references: process-owned ones that die with their holder, and durable counts written
//! atomically. See the [store docs](super#mount-references) for the design.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use super::nofollow::{self, lstat_type, open_dir, open_dir_opt};
use super::{FileLock, LayerStore, MOUNTS_DIR, Recovery, names_in};
use crate::{Error, LayerId, Result};

/// Prefix of the per-layer directory in `.mounts/` (a dot-name: never a layer id).
const REFS_PREFIX: &str = ".refs-";
/// Prefix of a process-owned reference's file in the per-layer directory.
const REF_PREFIX: &str = "ref-";
/// A durable count being written, in the per-layer directory.
const COUNT_NEW: &str = "count.new";

static REF_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Who owns a mount reference taken with [`LayerStore::acquire_ref`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Holder {
    /// The calling process (more exactly: this `LayerStore` and its clones). The reference is
    /// released by a put in this process, and automatically when the process dies or the store
    /// is dropped; it never outlives its holder. What short-lived readers (diffs, change lists)
    /// take.
    #[default]
    Process,
    /// Nobody in particular: the reference outlives the process and is released by a put in
    /// any process (`graphctl mount`, then `graphctl unmount` later).
    Durable,
}

/// One process-owned reference: its file, kept flocked while it is held.
#[derive(Debug)]
pub(super) struct HeldRef {
    name: String,
    _file: File,
}

/// The per-layer lock of `.mounts/.refs-<id>/`, with the directory's descriptor.
struct RefsLock {
    lock: FileLock,
    path: PathBuf,
}

impl RefsLock {
    fn fd(&self) -> Result<BorrowedFd<'_>> {
        self.lock.fd(&self.path)
    }
}

/// What one look at a layer's references found.
struct Counted {
    durable: u32,
    live: u32,
    /// Process-owned references of dead processes, deleted by the look.
    dead: u32,
}

impl LayerStore {
    fn mounts_fd(&self) -> Result<OwnedFd> {
        open_dir(self.fd(), MOUNTS_DIR, &self.home.join(MOUNTS_DIR))
    }

    fn durable_path(&self, id: &LayerId) -> PathBuf {
        self.home.join(MOUNTS_DIR).join(id.as_str())
    }

    /// Takes the per-layer lock of `id` (waiting for it), creating its directory if `create`;
    /// `None` if it does not exist and `create` is false.
    fn lock_refs(
        &self,
        mounts: BorrowedFd<'_>,
        id: &LayerId,
        create: bool,
    ) -> Result<Option<RefsLock>> {
        let name = format!("{REFS_PREFIX}{}", id.as_str());
        let path = self.home.join(MOUNTS_DIR).join(&name);
        if create {
            nofollow::mkdir_if_missing(mounts, &name, 0o700, &path)?;
        }
        let Some(fd) = open_dir_opt(mounts, &name, &path)? else {
            return Ok(None);
        };
        let lock = FileLock::on(fd, &path, FlockOperation::LockExclusive)?;
        Ok(Some(RefsLock { lock, path }))
    }

    /// Counts `id`'s references under its per-layer lock `refs` (if it exists), deleting the
    /// process-owned ones whose holder is dead.
    fn count_refs(
        &self,
        mounts: BorrowedFd<'_>,
        id: &LayerId,
        refs: Option<&RefsLock>,
    ) -> Result<Counted> {
        let durable = read_durable(mounts, &self.durable_path(id), id)?;
        let (mut live, mut dead) = (0, 0);
        if let Some(refs) = refs {
            let dir = refs.fd()?;
            for name in names_in(dir, &refs.path)? {
                if !name.starts_with(REF_PREFIX) {
                    continue;
                }
                let path = refs.path.join(&name);
                // A holder keeps its file flocked: if we can take the flock, the holder is dead.
                // Anything but a regular file cannot be held and is dropped (the link itself,
                // never what it points to).
                let alive = match nofollow::open_file(dir, &name, &path, false, false) {
                    Ok(Some(f)) => FileLock::try_exclusive(f).is_none(),
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "dropping a mount reference the store did not make");
                        false
                    }
                };
                if alive {
                    live += 1;
                    continue;
                }
                match rustix::fs::unlinkat(dir, name.as_str(), AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => dead += 1,
                    // A read-only store: the dead reference stays, but does not count.
                    Err(e) => {
                        tracing::debug!(path = %path.display(), error = %e, "could not drop a dead mount reference");
                    }
                }
            }
        }
        if dead > 0 {
            tracing::info!(layer = %id, dead, "dropped mount references of dead processes");
        }
        Ok(Counted {
            durable,
            live,
            dead,
        })
    }

    /// Live references of `id`, in any process: the durable count plus the process-owned
    /// references whose holder is alive. Process-owned references of dead processes are
    /// deleted on the way and never counted.
    pub fn mount_count(&self, id: &LayerId) -> Result<u32> {
        let mounts = self.mounts_fd()?;
        let refs = self.lock_refs(mounts.as_fd(), id, false)?;
        let c = self.count_refs(mounts.as_fd(), id, refs.as_ref())?;
        Ok(c.durable.saturating_add(c.live))
    }

    /// The layers that have mount records (durable or process-owned), sorted.
    fn ids_with_records(&self, mounts: BorrowedFd<'_>) -> Result<Vec<LayerId>> {
        let mut ids = BTreeSet::new();
        for name in names_in(mounts, &self.home.join(MOUNTS_DIR))? {
            let id = name.strip_prefix(REFS_PREFIX).unwrap_or(&name);
            if let Ok(id) = LayerId::new(id) {
                ids.insert(id);
            }
        }
        Ok(ids.into_iter().collect())
    }

    /// Every layer with live references and their count.
    pub fn mounted(&self) -> Result<Vec<(LayerId, u32)>> {
        let mounts = self.mounts_fd()?;
        let mut out = Vec::new();
        for id in self.ids_with_records(mounts.as_fd())? {
            let count = self.mount_count(&id)?;
            if count > 0 {
                out.push((id, count));
            }
        }
        Ok(out)
    }

    /// Records one more reference to `id`, owned by `holder`, and returns the number of live
    /// references now.
    ///
    /// Under the shared store lock (so `id` cannot be removed meanwhile) and the per-layer lock
    /// (shared by all processes). `is_active` reports whether the layer's mount exists right
    /// now (drivers that mount nothing answer `true`); `activate` (it mounts) runs exactly when
    /// it does not: on the first get, and when the mount vanished behind our back (a reboot, a
    /// manual umount). A mount that exists although no live reference does (a process killed
    /// after mounting, or while holding a reference) is adopted rather than mounted again.
    pub fn acquire_ref(
        &self,
        id: &LayerId,
        holder: Holder,
        is_active: impl FnOnce() -> Result<bool>,
        activate: impl FnOnce() -> Result<()>,
    ) -> Result<u32> {
        let _store = self.lock_shared()?;
        self.require(id)?;
        // Handed out, so possibly written: no longer fresh (see `ApplyGuard::is_fresh`).
        self.take_fresh(id);
        let mounts = self.mounts_fd()?;
        let refs = self
            .lock_refs(mounts.as_fd(), id, true)?
            .ok_or_else(|| Error::NotFound(id.clone()))?;
        let c = self.count_refs(mounts.as_fd(), id, Some(&refs))?;
        let count = c.durable.saturating_add(c.live);
        if !is_active()? {
            if count > 0 {
                // Held, yet this mount is missing: it vanished behind our back, or the layer is
                // held through its other mount (a view while the writable mount is asked for,
                // or the reverse), which is normal.
                tracing::info!(layer = %id, count, "layer held but this mount is missing; mounting it");
            }
            activate()?;
        } else if count == 0 {
            tracing::debug!(layer = %id, "adopting a mount that has no live reference");
        }
        match holder {
            Holder::Durable => {
                self.write_durable(mounts.as_fd(), &refs, id, c.durable.saturating_add(1))?
            }
            Holder::Process => {
                let n = REF_COUNTER.fetch_add(1, Ordering::Relaxed);
                let name = format!("{REF_PREFIX}{}-{n}", std::process::id());
                let path = refs.path.join(&name);
                let file = nofollow::create_new_file(refs.fd()?, &name, &path)?;
                rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive)
                    .map_err(|e| Error::io("lock", &path, e.into()))?;
                self.held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(id.clone())
                    .or_default()
                    .push(HeldRef { name, _file: file });
            }
        }
        Ok(count.saturating_add(1))
    }

    /// Releases one reference to `id` and returns the live references left; when none is left
    /// `deactivate` runs first (it unmounts; if it fails, nothing is released), then the
    /// layer's read-only view is unmounted ([`LayerStore::unmount_view`]).
    ///
    /// The reference released is one this store (or a clone) holds as a process if there is
    /// one, else a durable one. Releasing when neither exists is a no-op returning the live
    /// references of others.
    pub fn release_ref(
        &self,
        id: &LayerId,
        deactivate: impl FnOnce() -> Result<()>,
    ) -> Result<u32> {
        let mounts = self.mounts_fd()?;
        let Some(refs) = self.lock_refs(mounts.as_fd(), id, false)? else {
            // No per-layer directory: no reference was ever taken (or the layer was removed).
            self.held_for(id).take();
            return Ok(0);
        };
        let c = self.count_refs(mounts.as_fd(), id, Some(&refs))?;
        let total = c.durable.saturating_add(c.live);
        let own = self.held_for(id).peek();
        if own.is_none() && c.durable == 0 {
            return Ok(total);
        }
        let left = total.saturating_sub(1);
        if left == 0 {
            // A process still working in the mount (its cwd or open files there) makes the
            // unmount fail with EBUSY: the reference stays, and the error says so.
            let busy = |e: Error| match &e {
                Error::Mount { target, source, .. }
                    if source.raw_os_error() == Some(Errno::BUSY.raw_os_error()) =>
                {
                    Error::InUse {
                        id: id.clone(),
                        reason: format!(
                            "a process is using its mount at {} (its working directory or open \
                             files are there), so it stays mounted; stop that process and retry",
                            target.display()
                        ),
                    }
                }
                _ => e,
            };
            deactivate().map_err(busy)?;
            self.unmount_view(id).map_err(busy)?;
        }
        match own {
            Some(name) => {
                let path = refs.path.join(&name);
                match rustix::fs::unlinkat(refs.fd()?, name.as_str(), AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(Error::io("remove", &path, e.into())),
                }
                // Dropping the file releases its flock.
                self.held_for(id).remove(&name);
            }
            None => self.write_durable(mounts.as_fd(), &refs, id, c.durable - 1)?,
        }
        Ok(left)
    }

    /// Drops every reference to `id` at once — durable ones, this store's, and other
    /// processes' (live or dead) — after running `deactivate`, which runs whether or not a
    /// reference was recorded (a dead holder may have left a mount behind), so it must be a
    /// no-op when nothing is active; the layer's read-only view is unmounted too.
    pub fn release_all(&self, id: &LayerId, deactivate: impl FnOnce() -> Result<()>) -> Result<()> {
        let mounts = self.mounts_fd()?;
        let refs = self.lock_refs(mounts.as_fd(), id, false)?;
        deactivate()?;
        self.unmount_view(id)?;
        if let Some(refs) = &refs {
            let dir = refs.fd()?;
            for name in names_in(dir, &refs.path)? {
                if name.starts_with(REF_PREFIX) {
                    nofollow::remove_entry(dir, &name, &refs.path.join(&name))?;
                }
            }
        }
        self.held_for(id).take();
        remove_durable(mounts.as_fd(), &self.durable_path(id), id)
    }

    /// [`release_all`](Self::release_all) of every layer, with `deactivate(id)` for each: what a
    /// driver's [`ProtoDriver::cleanup`](crate::ProtoDriver::cleanup) does. Every layer is
    /// visited, not only those with live references (a reader killed while holding one leaves
    /// a mount no record counts); a failure is logged and the first one returned after all
    /// layers were tried.
    pub fn release_every_layer(&self, deactivate: impl Fn(&LayerId) -> Result<()>) -> Result<()> {
        let mut first_err = None;
        for layer in self.list()? {
            let id = layer.id;
            if let Err(e) = self.release_all(&id, || deactivate(&id)) {
                tracing::warn!(layer = %id, error = %e, "cleanup could not release a layer");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Resets the durable count of every layer whose mount is gone while no live process holds
    /// a reference (a reboot, a manual umount, a process killed while unmounting): the record is
    /// not trusted, `is_active` (the driver's look at `/proc/self/mountinfo`) is. Process-owned
    /// references of dead processes are dropped on the way. Returns the layers repaired with the
    /// references they had (durable and dead), reported through `tracing`. Drivers that mount
    /// call it from their init; on a read-only store it does nothing.
    ///
    /// Each layer is checked under its per-layer lock, so a get or put in progress in another
    /// process is never mistaken for a vanished mount.
    pub fn repair_mounts(
        &self,
        is_active: impl Fn(&LayerId) -> Result<bool>,
    ) -> Result<Vec<(LayerId, u32)>> {
        let mut repaired = Vec::new();
        if self.is_read_only() {
            return Ok(repaired);
        }
        let mounts = self.mounts_fd()?;
        for id in self.ids_with_records(mounts.as_fd())? {
            let refs = self.lock_refs(mounts.as_fd(), &id, false)?;
            let c = self.count_refs(mounts.as_fd(), &id, refs.as_ref())?;
            let had = c.durable.saturating_add(c.dead);
            if had == 0
                || c.live > 0
                || !self.exists(&id)
                || is_active(&id)?
                || self.view_is_mounted(&id)?
            {
                continue;
            }
            remove_durable(mounts.as_fd(), &self.durable_path(&id), &id)?;
            repaired.push((id, had));
        }
        if !repaired.is_empty() {
            tracing::warn!(home = %self.home.display(), ?repaired, "reset the mount counts of layers whose mounts are gone");
        }
        Ok(repaired)
    }

    /// Part of [`LayerStore::open`]'s recovery (under the exclusive store lock): drops the
    /// records of layers that no longer exist and the references of dead processes.
    pub(super) fn recover_mounts(&self, rec: &mut Recovery) -> Result<()> {
        let mounts = self.mounts_fd()?;
        let mounts_path = self.home.join(MOUNTS_DIR);
        for name in names_in(mounts.as_fd(), &mounts_path)? {
            let path = mounts_path.join(&name);
            let (id, is_refs) = match name.strip_prefix(REFS_PREFIX) {
                Some(id) => (LayerId::new(id).ok(), true),
                None => (LayerId::new(name.as_str()).ok(), false),
            };
            let expected = if is_refs {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            match lstat_type(mounts.as_fd(), &name, &path)? {
                Some(t) if t == expected => {}
                Some(t) => {
                    let what = if is_refs {
                        "a directory"
                    } else {
                        "a regular file"
                    };
                    rec.failed.push(
                        nofollow::unexpected("check mount record", &path, what, t).to_string(),
                    );
                    continue;
                }
                None => continue,
            }
            // A record of a layer that no longer exists (or of no valid id at all) is stale.
            let gone = match &id {
                Some(id) => lstat_type(self.fd(), id.as_str(), &self.layer_dir(id))?.is_none(),
                None => true,
            };
            if gone {
                match nofollow::remove_entry(mounts.as_fd(), &name, &path) {
                    Ok(()) => rec.stale_mount_records.push(name),
                    Err(e) => rec.failed.push(e.to_string()),
                }
                continue;
            }
            if let (Some(id), true) = (id, is_refs) {
                let refs = self.lock_refs(mounts.as_fd(), &id, false)?;
                match self.count_refs(mounts.as_fd(), &id, refs.as_ref()) {
                    Ok(c) if c.dead > 0 => rec.dead_references.push((id, c.dead)),
                    Ok(_) => {}
                    Err(e) => rec.failed.push(e.to_string()),
                }
            }
        }
        Ok(())
    }

    /// Drops every mount record of `id` (its layer is being removed); failures are logged.
    pub(super) fn drop_mount_records(&self, id: &LayerId) {
        self.held_for(id).take();
        let res = self.mounts_fd().and_then(|mounts| {
            let refs = format!("{REFS_PREFIX}{}", id.as_str());
            nofollow::remove_entry(
                mounts.as_fd(),
                &refs,
                &self.home.join(MOUNTS_DIR).join(&refs),
            )?;
            remove_durable(mounts.as_fd(), &self.durable_path(id), id)
        });
        if let Err(e) = res {
            tracing::warn!(layer = %id, error = %e, "could not remove a mount record");
        }
    }

    /// Replaces `id`'s durable count with `count` (removing it at zero): written to a new file
    /// in the per-layer directory, synced, and renamed over the old one, so a kill at any moment
    /// leaves the old or the new count.
    fn write_durable(
        &self,
        mounts: BorrowedFd<'_>,
        refs: &RefsLock,
        id: &LayerId,
        count: u32,
    ) -> Result<()> {
        let path = self.durable_path(id);
        if count == 0 {
            return remove_durable(mounts, &path, id);
        }
        let dir = refs.fd()?;
        let tmp_path = refs.path.join(COUNT_NEW);
        let fd = rustix::fs::openat(
            dir,
            COUNT_NEW,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| Error::io("create", &tmp_path, e.into()))?;
        let mut file = File::from(fd);
        file.write_all(count.to_string().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("write", &tmp_path, e))?;
        rustix::fs::renameat(dir, COUNT_NEW, mounts, id.as_str())
            .map_err(|e| Error::io("rename into place", &path, e.into()))?;
        rustix::fs::fsync(mounts).map_err(|e| Error::io("sync", &path, e.into()))
    }

    /// The process-owned references this store holds on `id`.
    fn held_for<'a>(&'a self, id: &'a LayerId) -> HeldFor<'a> {
        HeldFor { store: self, id }
    }
}

/// Access to the process-owned references of one layer in a store's table.
struct HeldFor<'a> {
    store: &'a LayerStore,
    id: &'a LayerId,
}

impl HeldFor<'_> {
    fn with<T>(&self, f: impl FnOnce(&mut Vec<HeldRef>) -> T) -> T {
        let mut table = self.store.held.lock().unwrap_or_else(|p| p.into_inner());
        let list = table.entry(self.id.clone()).or_default();
        let out = f(list);
        if list.is_empty() {
            table.remove(self.id);
        }
        out
    }

    /// The name of the most recent reference held, if any.
    fn peek(&self) -> Option<String> {
        self.with(|l| l.last().map(|h| h.name.clone()))
    }

    /// Drops the reference `name` (its file closes, and its flock goes with it).
    fn remove(&self, name: &str) {
        self.with(|l| l.retain(|h| h.name != name));
    }

    /// Drops every reference held.
    fn take(&self) {
        self.with(Vec::clear);
    }
}

/// The durable count of `id` (at `path` in `mounts`); 0 if absent. An empty file (left by
/// versions that rewrote the count in place) is 0; anything else but a decimal is an error.
fn read_durable(mounts: BorrowedFd<'_>, path: &Path, id: &LayerId) -> Result<u32> {
    let Some(s) = nofollow::read_small(mounts, id.as_str(), path)? else {
        return Ok(0);
    };
    let s = s.trim();
    if s.is_empty() {
        return Ok(0);
    }
    s.parse().map_err(|_| {
        Error::io(
            "read mount count",
            path,
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected a decimal count, found {s:?}"),
            ),
        )
    })
}

fn remove_durable(mounts: BorrowedFd<'_>, path: &Path, id: &LayerId) -> Result<()> {
    match rustix::fs::unlinkat(mounts, id.as_str(), AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(Error::io("remove", path, e.into())),
    }
}
