//! The `overlay` driver: hardlinked image roots and overlayfs container layers (the Docker 1.4.1
//! design, re-implemented).
//!
//! # Layout of a layer `<home>/<id>/` (besides the [`LayerStore`] bookkeeping)
//!
//! * **Image layers** that have been filled hold `root/`: a full tree. A base layer starts with
//!   an empty `root/`. Applying a diff to a layer whose parent has a `root/` makes a
//!   [`CopyMode::Hardlink`] copy of the parent's root in a staging directory inside the layer
//!   dir, applies the tar into it in a confined child, and renames it to `root/`: unchanged
//!   files share their inode (and data) with the parent; directories are real copies. This relies
//!   on the apply never writing a file in place (it unlinks before it creates).
//! * **Overlay layers** (every read-write layer, and an image layer created on a parent with a
//!   `root/` before any diff is applied) hold `upper/ work/ merged/ lower-id`: `get` mounts
//!   `overlay lowerdir=<lower>/root,upperdir=upper,workdir=work` on `merged/`.
//! * A layer created on a parent **without** `root/` (a container layer on its `-init` layer)
//!   copies the parent's `upper/` ([`CopyMode::Content`]: whiteout char devices and opaque
//!   xattrs survive) and its `lower-id`, as the seed does: overlay mounts only one lower here.
//!
//! Mounts are reference counted across processes by [`LayerStore::acquire_ref`]; a mount that
//! vanished behind our back (manual umount) is made again by the next get. Image layers with a
//! `root/` are returned without mounting but still counted.
//!
//! A **read-only view** (`MountOpts::read_only`) is mounted at `<id>/view`: a read-only bind
//! mount of `root/`, or for an overlay layer an overlay with `lowerdir=<upper>:<lower>` and no
//! upper directory, which the kernel mounts read-only.

pub mod mountopt;
mod plugin;

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use graphdriver::{
    Error, IoContext, LayerId, LayerInfo, LayerStore, MountOpts, ProtoDriver, Result,
};
use naive_diff::{DiffHooks, NaiveDiffDriver, Native};

use crate::Kind;
use crate::copy::{CopyMode, copy_tree};
use crate::mountinfo;
use crate::probe;

pub use plugin::init;

/// The registered name.
pub const NAME: &str = "overlay";

const ROOT: &str = "root";
const UPPER: &str = "upper";
const WORK: &str = "work";
const MERGED: &str = "merged";
const LOWER_ID: &str = "lower-id";
/// Where a layer's new `root/` is built from its parent's (an `apply-*` name, so recovery
/// removes it after a crash: see [`graphdriver::APPLY_PREFIX`]).
const STAGING_ROOT: &str = "apply-root";
/// The work directory and mount point of an apply into a read-write layer's staged upper.
const STAGING_WORK: &str = "apply-work";
const STAGING_MERGED: &str = "apply-merged";

/// The kernel copies at most one page of mount data; the last byte is the terminating NUL.
const MAX_MOUNT_DATA: usize = 4096;

/// What a layer of this driver is on disk, as [`Overlay::shape`] reads it from the entries of
/// its directory (see the module documentation for how each shape comes about).
#[derive(Debug)]
enum LayerShape {
    /// A layer with a full tree in `root/` (a filled image layer or a base layer): returned by
    /// `get` without mounting.
    Root {
        /// `<layer>/root`.
        root: PathBuf,
    },
    /// A layer mounted as an overlay of its upper directory on the `root/` of another layer.
    Overlay(OverlayDirs),
}

/// The entries of a [`LayerShape::Overlay`] layer.
#[derive(Debug)]
struct OverlayDirs {
    /// `<layer>/upper`: the layer's own changes (whiteouts included).
    upper: PathBuf,
    /// `<layer>/work`: overlay's work directory for `upper`.
    work: PathBuf,
    /// `<layer>/merged`: where the overlay is mounted.
    merged: PathBuf,
    /// The layer named in `lower-id`, whose `root/` is the overlay's lower directory.
    lower: LayerId,
}

/// Settings of the overlay driver.
#[derive(Clone, Debug, Default)]
pub struct OverlayConfig {
    /// Extra mount options for every overlay mount (`mount_options`): mount flags and the
    /// overlay options [`mountopt`] allows, checked by [`Overlay::new`].
    pub mount_options: Option<String>,
    /// What is flushed to disk (`sync`: `none`, `layers` (default) or `full`; see
    /// [`graphdriver::Durability`]).
    pub durability: graphdriver::Durability,
}

/// The overlay driver's state: its store, its settings and what the init probe found.
#[derive(Debug)]
pub struct Overlay {
    store: LayerStore,
    config: OverlayConfig,
    backing_fs: String,
    index_param: bool,
    /// `config.mount_options`, parsed.
    user_opts: mountopt::MountOptions,
}

impl Overlay {
    /// Starts the driver in `home` after checking that it can work there (see the `init` of the
    /// plugin): [`Error::NotSupported`] or [`Error::IncompatibleFs`] with the reason otherwise.
    pub fn new(home: &Path, config: OverlayConfig) -> Result<Overlay> {
        let fail = |reason: String| Error::NotSupported {
            driver: NAME.to_string(),
            reason,
        };
        let probe::Home {
            store,
            magic,
            backing_fs,
            user_opts,
        } = probe::open_home(
            NAME,
            home,
            config.mount_options.as_deref(),
            config.durability,
        )?;
        // A read-only home (a snapshot, a read-only bind mount) can still be listed and read:
        // the checks that need to write are skipped, and every change fails with EROFS.
        let read_only = store.is_read_only();
        let index_param = probe::has_index_param();
        // The probes below write and mount in the home. Once they passed for this kernel,
        // filesystem and options, a record says so and later starts skip them: every command
        // is one mount cheaper, and a full disk can still run ls, rm and cleanup.
        let probe_key = probe::probe_key(magic, index_param, config.mount_options.as_deref());
        let probed = read_only || probe::probe_record_matches(home, &probe_key);
        if !probed {
            probe::remove_stale_scratch(home);
        }
        if !probed {
            probe::require_d_type(NAME, home, &backing_fs)?;
        }
        let driver = Overlay {
            store,
            config,
            backing_fs,
            index_param,
            user_opts,
        };
        if !probed {
            driver
                .probe_mount(false)
                .map_err(|e| fail(format!("a test overlay mount failed: {e}")))?;
            if let Some(extra) = driver
                .config
                .mount_options
                .as_deref()
                .filter(|s| !s.trim().is_empty())
            {
                // Overlay works here; a failure now is the user's option, not the host's.
                driver.probe_mount(true).map_err(|e| Error::InvalidOption {
                    driver: NAME.to_string(),
                    key: "mount_options".to_string(),
                    origin: None,
                    reason: format!("a test overlay mount with {extra:?} failed: {e}"),
                })?;
            }
        }
        if !probed {
            probe::write_probe_record(home, &probe_key);
        }
        // Mount counts are not trusted across reboots and manual umounts: mountinfo is.
        // A layer of neither shape (a damaged store) must not stop the driver from starting:
        // its count stays only if something is mounted on its `merged/`.
        driver.store.repair_mounts(|id| match driver.shape(id) {
            Ok(LayerShape::Root { .. }) => Ok(true),
            Ok(LayerShape::Overlay(o)) => mountinfo::is_mountpoint(&o.merged),
            Err(_) => mountinfo::is_mountpoint(&driver.store.layer_dir(id).join(MERGED)),
        })?;
        Ok(driver)
    }

    /// The overlay driver as a complete [`graphdriver::Driver`].
    pub fn driver(home: &Path, config: OverlayConfig) -> Result<NaiveDiffDriver<Overlay>> {
        Ok(NaiveDiffDriver::new(Overlay::new(home, config)?))
    }

    /// The directory of layer `id`.
    pub fn layer_dir(&self, id: &LayerId) -> PathBuf {
        self.store.layer_dir(id)
    }

    /// Directory `name` of layer `id`, which must exist and be a real directory (a planted
    /// symlink is refused, not followed).
    fn subdir(&self, id: &LayerId, name: &str) -> Result<PathBuf> {
        self.store.layer_subdir(id, name)?.ok_or_else(|| {
            Error::io(
                "open layer directory",
                self.store.layer_dir(id).join(name),
                io::Error::from(io::ErrorKind::NotFound),
            )
        })
    }

    /// The shape of layer `id`, read from the entries of its directory; the one place that
    /// decides what a layer is.
    ///
    /// A `root/` makes it [`LayerShape::Root`] (even if overlay entries are left beside it: an
    /// apply that turned an overlay layer into a full tree renames `root/` in before it removes
    /// them). Otherwise it must hold all of `upper/ work/ merged/ lower-id` for
    /// [`LayerShape::Overlay`]. Every entry is checked without following a symlink (the
    /// kernel would follow one given as upper or work): a planted link, or an entry of the wrong
    /// type, is refused with an error naming its path, as [`LayerStore::layer_subdir`] and
    /// [`LayerStore::read_layer_file`] do. A layer that is neither shape is an error naming the
    /// layer directory and the entries it does hold.
    fn shape(&self, id: &LayerId) -> Result<LayerShape> {
        if let Some(root) = self.store.layer_subdir(id, ROOT)? {
            return Ok(LayerShape::Root { root });
        }
        let upper = self.store.layer_subdir(id, UPPER)?;
        let work = self.store.layer_subdir(id, WORK)?;
        let merged = self.store.layer_subdir(id, MERGED)?;
        let lower = self.store.read_layer_file(id, LOWER_ID)?;
        match (upper, work, merged, lower) {
            (Some(upper), Some(work), Some(merged), Some(lower)) => {
                Ok(LayerShape::Overlay(OverlayDirs {
                    upper,
                    work,
                    merged,
                    lower: LayerId::new(lower.trim())?,
                }))
            }
            (upper, work, merged, lower) => {
                let found: Vec<&str> = [
                    upper.map(|_| "upper/"),
                    work.map(|_| "work/"),
                    merged.map(|_| "merged/"),
                    lower.map(|_| LOWER_ID),
                ]
                .into_iter()
                .flatten()
                .collect();
                let found = if found.is_empty() {
                    "none of them".to_string()
                } else {
                    format!("only {}", found.join(" "))
                };
                Err(Error::io(
                    "open layer directory",
                    self.store.layer_dir(id),
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "expected root/ (an image layer) or upper/ work/ merged/ lower-id \
                             (an overlay layer), found {found}"
                        ),
                    ),
                ))
            }
        }
    }

    /// Unmounts `merged/` of layer `id` if it is mounted; a `merged` that is not a real
    /// directory is an error, never followed.
    fn unmount_layer(&self, id: &LayerId) -> Result<()> {
        match self.store.layer_subdir(id, MERGED)? {
            Some(merged) => Self::unmount_if_mounted(&merged),
            None => Ok(()),
        }
    }

    /// The mount data for an overlay of `lower` under `dir`'s upper and work: the driver's own
    /// options, then (with `user_opts`) the overlay options of `mount_options` that [`mountopt`]
    /// allowed, then the mount label.
    fn mount_data(&self, lower: &Path, dir: &Path, opts: &MountOpts, user_opts: bool) -> String {
        self.overlay_data(lower, &dir.join(UPPER), &dir.join(WORK), opts, user_opts)
    }

    /// Like [`Overlay::mount_data`], with the upper and work directories given.
    fn overlay_data(
        &self,
        lower: &Path,
        upper: &Path,
        work: &Path,
        opts: &MountOpts,
        user_opts: bool,
    ) -> String {
        let mut data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        if self.index_param {
            data.push_str(",index=off");
        }
        if user_opts {
            self.push_user_data(&mut data, opts);
        } else if let Some(label) = opts.mount_label.as_deref().filter(|s| !s.is_empty()) {
            data.push_str(&format!(",context=\"{label}\""));
        }
        data
    }

    /// Appends the overlay options of `mount_options` that [`mountopt`] allowed, then the mount
    /// label of `opts`, to the mount data `data`.
    fn push_user_data(&self, data: &mut String, opts: &MountOpts) {
        for item in &self.user_opts.data {
            data.push(',');
            data.push_str(item);
        }
        if let Some(label) = opts.mount_label.as_deref().filter(|s| !s.is_empty()) {
            data.push_str(&format!(",context=\"{label}\""));
        }
    }

    /// The mount flags of `mount_options` (with `user_opts`), else none.
    fn mount_flags(&self, user_opts: bool) -> rustix::mount::MountFlags {
        if user_opts {
            self.user_opts.flags
        } else {
            rustix::mount::MountFlags::empty()
        }
    }

    /// Mounts a tiny overlay in a scratch dir under the home and takes it down again; with
    /// `user_opts`, with the configured `mount_options`.
    fn probe_mount(&self, user_opts: bool) -> Result<()> {
        let scratch = self
            .store
            .home()
            .join(format!(".probe-{}", std::process::id()));
        let _ = archive::fs::remove_tree(&scratch);
        let result = (|| {
            for d in ["lower", UPPER, WORK, MERGED] {
                fs::create_dir_all(scratch.join(d)).ctx("create directory", &scratch)?;
            }
            let data = self.mount_data(
                &scratch.join("lower"),
                &scratch,
                &MountOpts::default(),
                user_opts,
            );
            mountinfo::mount_with_flags(
                "overlay",
                &scratch.join(MERGED),
                "overlay",
                self.mount_flags(user_opts),
                &data,
            )?;
            mountinfo::unmount(&scratch.join(MERGED))
        })();
        let cleaned = archive::fs::remove_tree(&scratch).ctx("remove", &scratch);
        result.and(cleaned)
    }

    fn create_layer(&self, id: &LayerId, parent: Option<&LayerId>, kind: Kind) -> Result<()> {
        kind.create(&self.store, id, parent, |dir| {
            let Some(p) = parent else {
                return mkdir(&dir.join(ROOT), 0o755);
            };
            let upper = dir.join(UPPER);
            let lower = match self.shape(p)? {
                // An empty upper on the parent's tree, owned and with the mode of its root.
                LayerShape::Root { root: proot } => {
                    let meta = fs::symlink_metadata(&proot).ctx("stat", &proot)?;
                    mkdir(&upper, meta.mode() & 0o7777)?;
                    fs::set_permissions(&upper, fs::Permissions::from_mode(meta.mode() & 0o7777))
                        .ctx("chmod", &upper)?;
                    rustix::fs::chown(&upper, Some(uid(meta.uid())), Some(gid(meta.gid())))
                        .map_err(|e| Error::io("chown", &upper, e.into()))?;
                    p.clone()
                }
                // A layer on an overlay layer: inherit its lower and a copy of its upper.
                LayerShape::Overlay(on) => {
                    copy_tree(&on.upper, &upper, CopyMode::Content)?;
                    on.lower
                }
            };
            fs::write(dir.join(LOWER_ID), lower.as_str()).ctx("write", &dir.join(LOWER_ID))?;
            mkdir(&dir.join(WORK), 0o700)?;
            mkdir(&dir.join(MERGED), 0o700)
        })
    }

    /// The lower directory of an overlay on layer `lower` ([`OverlayDirs::lower`]):
    /// its `root/`, which must be a real directory.
    fn lower_root(&self, lower: &LayerId) -> Result<PathBuf> {
        self.subdir(lower, ROOT)
    }

    /// Applies a diff to an overlay layer (read-write, or on a parent without `root/`) through a
    /// private overlay mount, under [`LayerStore::begin_apply`]: the layer counts as absent until
    /// the apply ends. Overlay itself turns the diff's deletions into whiteouts in the upper.
    ///
    /// All or nothing: a fresh layer ([`graphdriver::ApplyGuard::is_fresh`]) is applied in
    /// place (removed if the apply fails); any other gets the diff in a hardlink copy of its
    /// `upper/` (`apply-upper`, mounted with its own work directory at `apply-merged`), which
    /// then replaces `upper/` in one exchange. The copy is safe to share inodes with: an apply
    /// replaces entries and never writes into an existing file, and overlay copies up only
    /// from the lower layer.
    ///
    /// `layer` holds the entries of the layer's [`LayerShape::Overlay`].
    fn apply_through_mount(
        &self,
        id: &LayerId,
        dir: &Path,
        layer: &OverlayDirs,
        diff: &mut dyn Read,
        opts: &archive::ApplyOptions,
    ) -> Result<Native<u64>> {
        let guard = self.store.begin_apply(id)?;
        // A mount left behind by a killed reader (its reference died with it) must not stay
        // stacked under ours: nobody can get the layer while it is being applied.
        Self::unmount_if_mounted(&layer.merged)?;
        let lower = self.lower_root(&layer.lower)?;
        let apply = |upper: &Path, work: &Path, target: &Path| -> Result<u64> {
            let data = self.overlay_data(&lower, upper, work, &MountOpts::default(), true);
            check_mount_data_len(target, &data)?;
            mountinfo::mount_with_flags(
                "overlay",
                target,
                "overlay",
                self.mount_flags(true),
                &data,
            )?;
            let mounted = UnmountOnDrop(target);
            let bytes = chrootarchive::apply_layer(target, diff, opts)
                .map_err(|e| Error::archive(id, e))?;
            mounted.unmount()?;
            Ok(bytes)
        };
        let bytes = if guard.is_fresh() {
            apply(&layer.upper, &layer.work, &layer.merged)?
        } else {
            guard.replace_subdir(UPPER, |stage| {
                copy_tree(&layer.upper, stage, CopyMode::Hardlink)?;
                let (work, target) = (dir.join(STAGING_WORK), dir.join(STAGING_MERGED));
                for d in [&work, &target] {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(d)
                        .ctx("create directory", d)?;
                }
                apply(stage, &work, &target)
            })?
        };
        guard.finish()?;
        Ok(Native::Done(bytes))
    }

    /// Unmounts `merged` if it is mounted (a vanished mount is not an error).
    fn unmount_if_mounted(merged: &Path) -> Result<()> {
        if mountinfo::is_mountpoint(merged)? {
            mountinfo::unmount(merged)?;
        }
        Ok(())
    }
}

/// Refuses mount data the kernel would truncate (it copies one page): a clear error naming the
/// mount point and the options instead of a confusing `ENOENT` for a cut-off path.
fn check_mount_data_len(target: &Path, data: &str) -> Result<()> {
    if data.len() < MAX_MOUNT_DATA {
        return Ok(());
    }
    Err(Error::Mount {
        target: target.to_path_buf(),
        options: data.to_string(),
        source: io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("expected mount options shorter than {MAX_MOUNT_DATA} bytes (one page)"),
        ),
    })
}

/// Unmounts a private mount when dropped, unless [`UnmountOnDrop::unmount`] already did.
struct UnmountOnDrop<'a>(&'a Path);

impl UnmountOnDrop<'_> {
    fn unmount(self) -> Result<()> {
        let res = mountinfo::unmount(self.0);
        std::mem::forget(self);
        res
    }
}

impl Drop for UnmountOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(e) = mountinfo::unmount(self.0) {
            tracing::error!(path = %self.0.display(), error = %e, "could not unmount after a failed apply");
        }
    }
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .ctx("create directory", path)
}

fn uid(raw: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(raw)
}

fn gid(raw: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(raw)
}

impl ProtoDriver for Overlay {
    fn name(&self) -> &str {
        NAME
    }
    fn home(&self) -> &Path {
        self.store.home()
    }
    fn create(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        self.create_layer(id, parent, Kind::Image)
    }
    fn create_read_write(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        self.create_layer(id, parent, Kind::ReadWrite)
    }
    fn create_pending(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        self.create_layer(id, parent, Kind::Pending)
    }
    fn remove(&self, id: &LayerId) -> Result<()> {
        self.store.remove(id, |_| self.unmount_layer(id))
    }
    fn get(&self, id: &LayerId, opts: &MountOpts) -> Result<PathBuf> {
        self.store.require(id)?;
        let OverlayDirs {
            upper,
            work,
            merged,
            lower,
        } = match self.shape(id)? {
            LayerShape::Root { root } => {
                return self
                    .store
                    .acquire_tree(NAME, id, &root, opts, self.mount_flags(true));
            }
            LayerShape::Overlay(layer) => layer,
        };
        if let Some(label) = opts.mount_label.as_deref().filter(|s| !s.is_empty()) {
            // It is quoted into the mount data: a quote or control character could end it.
            if !mountopt::label_ok(label) || label.starts_with('"') {
                return Err(Error::Mount {
                    target: merged,
                    options: format!("context={label:?}"),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "expected a mount label without quotes or control characters",
                    ),
                });
            }
        }
        let lower_root = self.lower_root(&lower)?;
        let (target, data, flags) = if opts.read_only {
            // A view: the layer's upper stacked on its lower, both as lower directories, so
            // overlay has nowhere to write and the upper's whiteouts still hide what they hide.
            let mut data = format!("lowerdir={}:{}", upper.display(), lower_root.display());
            self.push_user_data(&mut data, opts);
            let flags = self.mount_flags(true) | rustix::mount::MountFlags::RDONLY;
            (self.store.view_dir(id)?, data, flags)
        } else {
            let data = self.overlay_data(&lower_root, &upper, &work, opts, true);
            (merged, data, self.mount_flags(true))
        };
        check_mount_data_len(&target, &data)?;
        self.store.acquire_ref(
            id,
            opts.holder(),
            || mountinfo::is_mountpoint(&target),
            || mountinfo::mount_with_flags("overlay", &target, "overlay", flags, &data),
        )?;
        Ok(target)
    }
    fn put(&self, id: &LayerId) -> Result<()> {
        self.store
            .release_ref(id, || self.unmount_layer(id))
            .map(|_| ())
    }
    fn exists(&self, id: &LayerId) -> bool {
        self.store.exists(id)
    }
    fn status(&self) -> Vec<(String, String)> {
        let show = |r: Result<usize>| match r {
            Ok(n) => n.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        vec![
            ("Backing Filesystem".to_string(), self.backing_fs.clone()),
            ("Supports d_type".to_string(), "true".to_string()),
            (
                "Layers".to_string(),
                show(self.store.list().map(|l| l.len())),
            ),
            (
                "Mounted".to_string(),
                show(self.store.mounted().map(|m| m.len())),
            ),
        ]
    }
    fn cleanup(&self) -> Result<()> {
        self.store.release_every_layer(|id| self.unmount_layer(id))
    }
    fn list(&self) -> Result<Vec<LayerInfo>> {
        self.store.list()
    }
    fn parent(&self, id: &LayerId) -> Result<Option<LayerId>> {
        self.store.parent(id)
    }
}

impl DiffHooks for Overlay {
    /// Natively: into `root/` of a layer that has one (a base layer), or into a hardlink copy
    /// of the parent's `root/` that then becomes this layer's `root/`. Overlay layers
    /// are applied through a private mount of the layer, with the same guarantees.
    fn apply_diff_native(
        &self,
        id: &LayerId,
        _parent: Option<&LayerId>,
        diff: &mut dyn Read,
    ) -> Result<Native<u64>> {
        let dir = self.store.require(id)?;
        let opts = archive::ApplyOptions::default();
        let layer = match self.shape(id)? {
            LayerShape::Root { root } => {
                let guard = self.store.begin_apply(id)?;
                let bytes = crate::apply_all_or_nothing(&guard, id, &root, diff, &opts)?;
                guard.finish()?;
                return Ok(Native::Done(bytes));
            }
            LayerShape::Overlay(layer) => layer,
        };
        let Some(parent) = self.store.parent(id)? else {
            return Ok(Native::Fallback);
        };
        // An image layer on a full tree gets a full tree of its own; any other stays an overlay.
        let parent_root = match self.shape(&parent)? {
            LayerShape::Root { root } if !self.store.is_read_write(id) => root,
            _ => return self.apply_through_mount(id, &dir, &layer, diff, &opts),
        };
        let guard = self.store.begin_apply(id)?;
        let staging = dir.join(STAGING_ROOT);
        let built = copy_tree(&parent_root, &staging, CopyMode::Hardlink).and_then(|()| {
            chrootarchive::apply_layer(&staging, diff, &opts).map_err(|e| Error::archive(id, e))
        });
        let bytes = match built {
            Ok(bytes) => bytes,
            Err(e) => {
                // The layer itself is untouched so far: drop the half-built copy, keep the layer.
                if let Err(e2) = archive::fs::remove_tree(&staging) {
                    tracing::error!(path = %staging.display(), error = %e2, "could not remove");
                }
                return Err(e);
            }
        };
        fs::rename(&staging, dir.join(ROOT)).ctx("rename into place", &staging)?;
        for p in [layer.upper, layer.work, layer.merged] {
            archive::fs::remove_tree(&p).ctx("remove", &p)?;
        }
        let lower_id = dir.join(LOWER_ID);
        fs::remove_file(&lower_id).ctx("remove", &lower_id)?;
        guard.finish()?;
        Ok(Native::Done(bytes))
    }
}
