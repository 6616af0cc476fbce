//! The `overlay2` driver: every layer stores only its own files, stacked as overlay lower
//! directories (moby's overlay2, containers/storage's overlay), with a native diff read from
//! the layer alone.
//!
//! # Layout of a layer `<home>/<id>/` (besides the [`LayerStore`] bookkeeping)
//!
//! * `diff/`: the layer's own files. A layer on a parent holds overlay whiteouts there (char
//!   device 0/0 for a deleted name, `trusted.overlay.opaque=y` on a directory whose lower
//!   contents are gone); applying a layer tar writes straight into it, converting `.wh.`
//!   entries, and never copies the parent.
//! * `link`: the layer's short name; `<home>/.l/<short>` is a symlink to `../<id>/diff`, so the
//!   lower chain in mount data is short (as moby does).
//! * `lower`: the short names of the parent chain, topmost first, `:`-separated, written once
//!   when the layer is created.
//! * `work/`, `merged/`: overlay's work directory and the mount point of a read-write get.
//!
//! A layer without a parent is a plain directory: a get returns `diff/` itself (a read-only
//! get a read-only bind mount of it). A layer with a parent is mounted: read-write with
//! `lowerdir=<chain>,upperdir=diff,workdir=work` on `merged/`, read-only (a view) with its own
//! `diff/` on top of the chain and no upper.
//!
//! Chains of any depth mount where the kernel takes `lowerdir+` (Linux 6.8+: one `fsconfig`
//! per lower); elsewhere the option string of `mount(2)` limits the depth, and the error says
//! so.
//!
//! `diff`, `changes` and `diff_size` against the layer's own parent are answered from `diff/`
//! alone ([`archive::changes_from_overlay_upper`]): the cost follows the layer, not the tree.
//! The driver mounts with `redirect_dir=off`, `metacopy=off` and `index=off` where the kernel
//! knows them (and [`mountopt`] refuses options that turn them on), so the upper is exact;
//! against another layer, for base layers, and for an upper written elsewhere with redirects or
//! metacopy, the naive comparison of mounted trees runs instead, decided per call.

mod mount;
mod plugin;

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use archive::{OverlayXattr, WhiteoutFormat};
use graphdriver::{
    Change, Error, IoContext, LayerId, LayerInfo, LayerStore, MountOpts, ProtoDriver, Result,
};
use naive_diff::{DiffHooks, NaiveDiffDriver, Native};

use crate::Kind;
use crate::mountinfo;
use crate::overlay::mountopt;
use crate::probe;

pub use mount::MountApi;
pub use plugin::init;

/// The registered name.
pub const NAME: &str = "overlay2";

const DIFF: &str = "diff";
const WORK: &str = "work";
const MERGED: &str = "merged";
const LINK: &str = "link";
const LOWER: &str = "lower";
/// The directory of short links (a dot-name: never a layer id).
const LINK_DIR: &str = ".l";
/// Length of a short name: 10 base32 characters (50 bits).
const SHORT_LEN: usize = 10;
/// The longest lower record read: 100,000 layers of short names.
const MAX_LOWER: u64 = 100_000 * (SHORT_LEN as u64 + 1);
const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// Settings of the overlay2 driver.
#[derive(Clone, Debug, Default)]
pub struct Overlay2Config {
    /// Extra mount options for every overlay mount (`mount_options`), checked as the `overlay`
    /// driver checks them ([`mountopt`]).
    pub mount_options: Option<String>,
    /// What is flushed to disk (`sync`, see [`graphdriver::Durability`]).
    pub durability: graphdriver::Durability,
    /// Force `mount(2)` option strings even where the kernel takes `lowerdir+` (`mount_api =
    /// "legacy"`): for kernels where the new mount API misbehaves, and for tests of that path.
    pub legacy_mount_api: bool,
}

/// The overlay2 driver's state.
#[derive(Debug)]
pub struct Overlay2 {
    store: LayerStore,
    backing_fs: String,
    /// How lower chains are handed to the kernel.
    api: MountApi,
    /// The driver's own overlay options (`index=off`, …), then the user's.
    data: Vec<String>,
    /// Mount flags of `mount_options`.
    flags: rustix::mount::MountFlags,
    /// `Ok` when a layer's `diff/` tells its changes exactly on this host, else why not.
    native: std::result::Result<(), String>,
}

impl Overlay2 {
    /// Starts the driver in `home` after the host probes ([`crate::probe`]):
    /// [`Error::NotSupported`] or [`Error::IncompatibleFs`] with the reason when it cannot work
    /// there, [`Error::InvalidOption`] for bad `mount_options`.
    pub fn new(home: &Path, config: Overlay2Config) -> Result<Overlay2> {
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
        // The driver's own options: what makes an upper directory exact, where the kernel has it.
        let mut data = Vec::new();
        for (param, option) in [
            ("index", "index=off"),
            ("redirect_dir", "redirect_dir=off"),
            ("metacopy", "metacopy=off"),
        ] {
            if probe::module_param(param).is_some() {
                data.push(option.to_string());
            }
        }
        let native = probe::native_diff_exact(&user_opts.data);
        data.extend(user_opts.data.iter().cloned());
        let read_only = store.is_read_only();
        let link_dir = home.join(LINK_DIR);
        if !read_only {
            match fs::DirBuilder::new().mode(0o700).create(&link_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("create directory", &link_dir, e)),
            }
        }
        let api = if config.legacy_mount_api || !mount::lowerdir_plus_supported(&link_dir) {
            MountApi::OptionString
        } else {
            MountApi::LowerdirPlus
        };
        let key = format!(
            "{NAME} {} api={api:?}",
            probe::probe_key(
                magic,
                probe::has_index_param(),
                config.mount_options.as_deref()
            )
        );
        let probed = read_only || probe::probe_record_matches(home, &key);
        if !probed {
            probe::remove_stale_scratch(home);
            probe::require_d_type(NAME, home, &backing_fs)?;
        }
        let driver = Overlay2 {
            store,
            backing_fs,
            api,
            data,
            flags: user_opts.flags,
            native,
        };
        if !probed {
            driver.probe_mount().map_err(|e| {
                if config
                    .mount_options
                    .as_deref()
                    .is_some_and(|o| !o.trim().is_empty())
                {
                    Error::InvalidOption {
                        driver: NAME.to_string(),
                        key: "mount_options".to_string(),
                        origin: None,
                        reason: format!("a test overlay mount with these options failed: {e}"),
                    }
                } else {
                    fail(format!("a test overlay mount failed: {e}"))
                }
            })?;
            probe::write_probe_record(home, &key);
        }
        driver.store.repair_mounts(|id| {
            if driver.store.parent(id)?.is_none() {
                return Ok(true);
            }
            mountinfo::is_mountpoint(&driver.store.layer_dir(id).join(MERGED))
        })?;
        Ok(driver)
    }

    /// The overlay2 driver as a complete [`graphdriver::Driver`].
    pub fn driver(home: &Path, config: Overlay2Config) -> Result<NaiveDiffDriver<Overlay2>> {
        Ok(NaiveDiffDriver::new(Overlay2::new(home, config)?))
    }

    /// How this driver hands lower chains to the kernel.
    pub fn mount_api(&self) -> MountApi {
        self.api
    }

    /// The directory of layer `id`.
    pub fn layer_dir(&self, id: &LayerId) -> PathBuf {
        self.store.layer_dir(id)
    }

    /// Mounts a two-lower overlay with an upper in a scratch directory under the home, writes
    /// through it and takes it down again: the whole mount path the driver uses.
    fn probe_mount(&self) -> Result<()> {
        let scratch = self
            .store
            .home()
            .join(format!(".probe-{}", std::process::id()));
        let _ = archive::fs::remove_tree(&scratch);
        let result = (|| {
            for d in ["l1", "l2", "upper", WORK, MERGED] {
                fs::create_dir_all(scratch.join(d)).ctx("create directory", &scratch)?;
            }
            let lowers = [scratch.join("l1"), scratch.join("l2")];
            let (upper, work) = (scratch.join("upper"), scratch.join(WORK));
            let spec = mount::Spec {
                lowers: &lowers,
                upper: Some((&upper, &work)),
                data: &self.data,
                flags: self.flags,
            };
            let merged = scratch.join(MERGED);
            mount::mount(&merged, &spec, self.api)?;
            let wrote = fs::write(merged.join("probe"), b"probe").ctx("write", &merged);
            mountinfo::unmount(&merged)?;
            wrote
        })();
        let cleaned = archive::fs::remove_tree(&scratch).ctx("remove", &scratch);
        result.and(cleaned)
    }

    /// Removes the short link `short` of a layer that is gone. A link left behind (by a crash
    /// between the link and the layer) is never swept by another process, which could not
    /// tell it from the link of a layer being created right now; it only reserves its name.
    fn remove_link(&self, short: &str) {
        let link = self.store.home().join(LINK_DIR).join(short);
        if let Err(e) = fs::remove_file(&link)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(link = %link.display(), error = %e, "could not remove a short link");
        }
    }

    /// Directory `name` of layer `id`, which must exist and be a real directory.
    fn subdir(&self, id: &LayerId, name: &str) -> Result<PathBuf> {
        self.store.layer_subdir(id, name)?.ok_or_else(|| {
            Error::io(
                "open layer directory",
                self.store.layer_dir(id).join(name),
                io::Error::from(io::ErrorKind::NotFound),
            )
        })
    }

    /// A short name for layer `id` that no link uses yet.
    fn new_short(&self, id: &LayerId) -> String {
        let dir = self.store.home().join(LINK_DIR);
        let mut salt = std::process::id() as u64;
        loop {
            let mut h = DefaultHasher::new();
            (id.as_str(), salt).hash(&mut h);
            let mut bits = h.finish();
            let short: String = (0..SHORT_LEN)
                .map(|_| {
                    let c = BASE32[(bits & 31) as usize];
                    bits >>= 5;
                    c as char
                })
                .collect();
            if fs::symlink_metadata(dir.join(&short)).is_err() {
                return short;
            }
            salt = salt.wrapping_add(0x9E37_79B9_7F4A_7C15);
        }
    }

    /// A short name read from a layer file, checked (it becomes part of a path).
    fn checked_short(&self, id: &LayerId, text: &str) -> Result<String> {
        let ok = text.len() == SHORT_LEN && text.bytes().all(|b| BASE32.contains(&b));
        if ok {
            Ok(text.to_string())
        } else {
            Err(Error::io(
                "read the lower chain",
                self.store.layer_dir(id),
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "expected a short layer name of {SHORT_LEN} base32 characters, found {text:?}"
                    ),
                ),
            ))
        }
    }

    /// Layer `id`'s short name.
    fn short(&self, id: &LayerId) -> Result<String> {
        let text = self.store.read_layer_file(id, LINK)?.ok_or_else(|| {
            Error::io(
                "read",
                self.store.layer_dir(id).join(LINK),
                io::Error::from(io::ErrorKind::NotFound),
            )
        })?;
        self.checked_short(id, text.trim())
    }

    /// The short names of layer `id`'s parent chain, topmost first.
    fn lower_shorts(&self, id: &LayerId) -> Result<Vec<String>> {
        let Some(text) = self.store.read_layer_record(id, LOWER, MAX_LOWER)? else {
            return Ok(Vec::new());
        };
        let text = text.trim();
        if text.is_empty() {
            return Ok(Vec::new());
        }
        text.split(':').map(|s| self.checked_short(id, s)).collect()
    }

    /// The mount paths (`<home>/.l/<short>`) of `shorts`.
    fn link_paths(&self, shorts: &[String]) -> Vec<PathBuf> {
        let dir = self.store.home().join(LINK_DIR);
        shorts.iter().map(|s| dir.join(s)).collect()
    }

    /// The `diff/` directories of layer `id`'s ancestors, topmost first, found through the
    /// recorded parents.
    fn ancestor_diffs(&self, id: &LayerId) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut cur = self.store.parent(id)?;
        while let Some(p) = cur {
            out.push(self.subdir(&p, DIFF)?);
            cur = self.store.parent(&p)?;
        }
        Ok(out)
    }

    fn create_layer(&self, id: &LayerId, parent: Option<&LayerId>, kind: Kind) -> Result<()> {
        let parent_info = match parent {
            None => None,
            Some(p) => {
                let mut chain = vec![self.short(p)?];
                chain.extend(self.lower_shorts(p)?);
                let meta = fs::symlink_metadata(self.subdir(p, DIFF)?)
                    .ctx("stat", &self.store.layer_dir(p).join(DIFF))?;
                Some((chain, meta))
            }
        };
        let short = self.new_short(id);
        let link = self.store.home().join(LINK_DIR).join(&short);
        let created = kind.create(&self.store, id, parent, |dir| {
            let diff = dir.join(DIFF);
            mkdir(&diff, 0o755)?;
            if let Some((chain, meta)) = &parent_info {
                // The merged root takes its metadata from the upper: the parent's, until a
                // diff says otherwise.
                fs::set_permissions(&diff, fs::Permissions::from_mode(meta.mode() & 0o7777))
                    .ctx("chmod", &diff)?;
                rustix::fs::chown(
                    &diff,
                    Some(rustix::fs::Uid::from_raw(meta.uid())),
                    Some(rustix::fs::Gid::from_raw(meta.gid())),
                )
                .map_err(|e| Error::io("chown", &diff, e.into()))?;
                fs::write(dir.join(LOWER), chain.join(":")).ctx("write", &dir.join(LOWER))?;
            }
            mkdir(&dir.join(WORK), 0o700)?;
            mkdir(&dir.join(MERGED), 0o700)?;
            fs::write(dir.join(LINK), &short).ctx("write", &dir.join(LINK))?;
            // Made before the layer is visible: a crash leaves a dangling link (it only
            // reserves its name), never a layer without one.
            std::os::unix::fs::symlink(format!("../{id}/{DIFF}"), &link).ctx("symlink", &link)
        });
        if created.is_err()
            && fs::read_link(&link).is_ok_and(|t| t == Path::new(&format!("../{id}/{DIFF}")))
            && !link.join(".").is_dir()
        {
            let _ = fs::remove_file(&link);
        }
        created
    }

    /// Unmounts `merged/` of layer `id` if it is mounted.
    fn unmount_layer(&self, id: &LayerId) -> Result<()> {
        match self.store.layer_subdir(id, MERGED)? {
            Some(merged) => {
                if mountinfo::is_mountpoint(&merged)? {
                    mountinfo::unmount(&merged)?;
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The changes of layer `id` read from its `diff/` alone, when that is exact for this call:
    /// against its own parent, which it has, on a host where uppers are exact.
    fn native_changes(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
    ) -> Result<Option<Vec<Change>>> {
        if self.native.is_err() || parent.is_none() || self.store.parent(id)?.as_ref() != parent {
            return Ok(None);
        }
        let diff = self.subdir(id, DIFF)?;
        let lowers = self.ancestor_diffs(id)?;
        match archive::changes_from_overlay_upper(&diff, &lowers, OverlayXattr::Trusted) {
            Ok(changes) => Ok(Some(changes)),
            Err(archive::Error::Io { source, .. })
                if source.kind() == io::ErrorKind::Unsupported =>
            {
                let e = source;
                // An upper written with redirects or metacopy (not by this driver's mounts).
                tracing::info!(layer = %id, error = %e, "native diff not exact here; comparing trees");
                Ok(None)
            }
            Err(e) => Err(Error::archive(id, e)),
        }
    }
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .ctx("create directory", path)
}

impl ProtoDriver for Overlay2 {
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
        let short = self.short(id).ok();
        self.store.remove(id, |_| self.unmount_layer(id))?;
        if let Some(short) = short {
            self.remove_link(&short);
        }
        Ok(())
    }
    fn get(&self, id: &LayerId, opts: &MountOpts) -> Result<PathBuf> {
        let dir = self.store.require(id)?;
        let diff = self.subdir(id, DIFF)?;
        if self.store.parent(id)?.is_none() {
            return self.store.acquire_tree(NAME, id, &diff, opts, self.flags);
        }
        let merged = self.subdir(id, MERGED)?;
        self.subdir(id, WORK)?;
        let mut data = self.data.clone();
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
            data.push(format!("context=\"{label}\""));
        }
        let mut shorts = self.lower_shorts(id)?;
        let (target, flags, upper) = if opts.read_only {
            shorts.insert(0, self.short(id)?);
            let flags = self.flags | rustix::mount::MountFlags::RDONLY;
            (self.store.view_dir(id)?, flags, None)
        } else {
            (merged, self.flags, Some((diff, dir.join(WORK))))
        };
        let lowers = self.link_paths(&shorts);
        let spec = mount::Spec {
            lowers: &lowers,
            upper: upper.as_ref().map(|(u, w)| (u.as_path(), w.as_path())),
            data: &data,
            flags,
        };
        self.store.acquire_ref(
            id,
            opts.holder(),
            || mountinfo::is_mountpoint(&target),
            || mount::mount(&target, &spec, self.api),
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
                "Native Overlay Diff".to_string(),
                match &self.native {
                    Ok(()) => "true".to_string(),
                    Err(why) => format!("false ({why})"),
                },
            ),
            (
                "Mount API".to_string(),
                match self.api {
                    MountApi::LowerdirPlus => "lowerdir+ (no chain depth limit)".to_string(),
                    MountApi::OptionString => {
                        "mount(2) option string (chain depth limited by one page)".to_string()
                    }
                },
            ),
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

impl DiffHooks for Overlay2 {
    /// Natively, always: straight into `diff/`, whiteouts written in overlay form for a layer
    /// with a parent (a hardlink to a file of a lower layer copies that file up first, as
    /// overlayfs does), all or nothing under [`LayerStore::begin_apply`].
    fn apply_diff_native(
        &self,
        id: &LayerId,
        _parent: Option<&LayerId>,
        diff: &mut dyn Read,
    ) -> Result<Native<u64>> {
        // Read while the layer is complete: under the guard it counts as absent.
        let has_parent = self.store.parent(id)?.is_some();
        let mut opts = archive::ApplyOptions::default();
        if has_parent {
            opts.whiteout_format = WhiteoutFormat::Overlay(OverlayXattr::Trusted);
            for lower in self.ancestor_diffs(id)? {
                let fd: OwnedFd =
                    archive::fs::open_root_dir(&lower).map_err(|e| Error::io("open", &lower, e))?;
                opts.link_lowers.push(Arc::new(fd));
            }
        }
        let tree = self.subdir(id, DIFF)?;
        let short = self.short(id)?;
        let guard = self.store.begin_apply(id)?;
        let applied = crate::apply_all_or_nothing(&guard, id, &tree, diff, &opts);
        let bytes = match applied {
            Ok(bytes) => bytes,
            Err(e) => {
                // A fresh layer is removed with its failed apply: so is its short link.
                drop(guard);
                if fs::symlink_metadata(self.store.layer_dir(id)).is_err() {
                    self.remove_link(&short);
                }
                return Err(e);
            }
        };
        guard.finish()?;
        Ok(Native::Done(bytes))
    }

    /// From `diff/` alone when exact for this call (see the [module docs](self)).
    fn changes_native(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
    ) -> Result<Native<Vec<Change>>> {
        Ok(match self.native_changes(id, parent)? {
            Some(changes) => Native::Done(changes),
            None => Native::Fallback,
        })
    }

    /// The native changes exported from `diff/`, whiteouts converted back to `.wh.` entries.
    fn diff_native<'a>(
        &'a self,
        id: &LayerId,
        parent: Option<&LayerId>,
    ) -> Result<Native<Box<dyn Read + Send + 'a>>> {
        let Some(changes) = self.native_changes(id, parent)? else {
            return Ok(Native::Fallback);
        };
        let diff = self.subdir(id, DIFF)?;
        let mut opts = archive::TarOptions::default();
        opts.whiteout_format = WhiteoutFormat::Overlay(OverlayXattr::Trusted);
        let stream =
            archive::export_changes(&diff, &changes, &opts).map_err(|e| Error::archive(id, e))?;
        Ok(Native::Done(Box::new(stream)))
    }

    /// [`archive::changes_size`] of the native changes, read in `diff/`.
    fn diff_size_native(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<Native<u64>> {
        let Some(changes) = self.native_changes(id, parent)? else {
            return Ok(Native::Fallback);
        };
        let diff = self.subdir(id, DIFF)?;
        archive::changes_size(&diff, &changes)
            .map(Native::Done)
            .map_err(|e| Error::archive(id, e))
    }
}
