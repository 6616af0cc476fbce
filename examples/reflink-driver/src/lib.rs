//! `reflink`: a graph driver written outside the framework, against its public API only.
//!
//! Every layer is a full copy of its parent, like `vfs`, but file contents are cloned with the
//! `FICLONE` ioctl (btrfs, XFS with reflink, bcachefs…: instant, copy-on-write). Where the
//! filesystem cannot clone (ext4, tmpfs) init refuses with [`graphdriver::Error::NotSupported`]
//! naming the filesystem, so automatic selection moves on (to vfs, which copies honestly),
//! unless the option `copy_fallback = true` asks for plain byte copies there. The author writes
//! only the tree copy and the [`ProtoDriver`] glue:
//!
//! * [`LayerStore`] does the bookkeeping: parents, atomic creation, crash recovery, mount
//!   reference counts, removal checks;
//! * [`NaiveDiffDriver`] provides diff, changes, apply and sizes (the empty [`DiffHooks`] impl
//!   says this driver answers none of them natively);
//! * [`graphdriver::register_driver!`] makes it selectable as `driver = "reflink"`;
//! * `graphdriver_conformance::conformance_tests!(driver = "reflink")` proves it correct.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use graphdriver::{
    Driver, DriverOptions, IoContext, LayerId, LayerInfo, LayerStore, MountOpts, ProtoDriver,
    Result,
};
use naive_diff::{DiffHooks, NaiveDiffDriver};

/// The registered name.
pub const NAME: &str = "reflink";

graphdriver::register_driver!("reflink", init);

/// Starts the driver in `home`. Options: `sync` (`none`, `layers` (default) or `full`: what is
/// flushed to disk, see [`graphdriver::Durability`]); `copy_fallback` (bool, default false): on a filesystem that cannot clone, copy the
/// bytes instead of refusing.
pub fn init(home: &Path, options: &DriverOptions) -> Result<Box<dyn Driver>> {
    options.reject_unknown(NAME, &["sync", "copy_fallback"])?;
    let durability = options.get_durability(NAME)?;
    let copy_fallback = options.get_bool(NAME, "copy_fallback", false)?;
    let driver = Reflink::new(home, durability)?;
    if !copy_fallback
        && !driver.store.is_read_only()
        && let Err(e) = can_clone(home)
    {
        return Err(graphdriver::Error::NotSupported {
            driver: NAME.to_string(),
            reason: format!(
                "the filesystem of {} cannot clone files (FICLONE: {e}); use XFS with \
                     reflink or btrfs, the vfs driver, or the option copy_fallback = true",
                home.display()
            ),
        });
    }
    Ok(Box::new(NaiveDiffDriver::new(driver)))
}

/// Clones a small probe file in `home` with `FICLONE`; the error if the filesystem cannot.
/// The probe files are removed again.
fn can_clone(home: &Path) -> io::Result<()> {
    let src_path = home.join(format!(".clone-probe-{}", std::process::id()));
    let dst_path = home.join(format!(".clone-probe-{}-copy", std::process::id()));
    let result = (|| {
        fs::write(&src_path, [7u8; 4096])?;
        let src = fs::File::open(&src_path)?;
        let dst = fs::File::create(&dst_path)?;
        rustix::fs::ioctl_ficlone(&dst, &src).map_err(io::Error::from)
    })();
    let _ = fs::remove_file(&src_path);
    let _ = fs::remove_file(&dst_path);
    result
}

/// The driver's state: its store and how file contents were copied so far.
#[derive(Debug)]
pub struct Reflink {
    store: LayerStore,
    cloned: AtomicU64,
    copied: AtomicU64,
}

impl Reflink {
    /// Opens (creating) the home `home`, flushing to disk as `durability` says.
    pub fn new(home: &Path, durability: graphdriver::Durability) -> Result<Reflink> {
        let (store, _recovery) = LayerStore::open(home, durability)?;
        Ok(Reflink {
            store,
            cloned: AtomicU64::new(0),
            copied: AtomicU64::new(0),
        })
    }

    /// The tree of existing layer `id`; [`LayerStore::layer_subdir`] refuses a planted symlink.
    fn root(&self, id: &LayerId) -> Result<PathBuf> {
        let path = self.store.layer_dir(id).join("root");
        self.store.layer_subdir(id, "root")?.ok_or_else(|| {
            graphdriver::Error::io(
                "open layer directory",
                path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })
    }

    fn create_layer(&self, id: &LayerId, parent: Option<&LayerId>, rw: bool) -> Result<()> {
        self.store.create(id, parent, rw, |dir| {
            let root = dir.join("root");
            // The store has checked that the parent exists.
            let src = parent.map(|p| self.root(p)).transpose()?;
            match &src {
                Some(src) => {
                    let mut links = HashMap::new();
                    self.copy(src, &root, &mut links)
                }
                None => {
                    fs::create_dir(&root).ctx("create directory", &root)?;
                    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
                        .ctx("chmod", &root)
                }
            }
        })
    }

    /// Copies `src` to the new path `dst` with everything a layer must keep: type, content,
    /// owner, mode, xattrs, timestamps, device numbers and hardlinks (`links` maps a source
    /// inode to its first copy).
    fn copy(&self, src: &Path, dst: &Path, links: &mut HashMap<(u64, u64), PathBuf>) -> Result<()> {
        let md = fs::symlink_metadata(src).ctx("lstat", src)?;
        let ft = md.file_type();
        if !ft.is_dir() && md.nlink() > 1 {
            if let Some(first) = links.get(&(md.dev(), md.ino())) {
                return fs::hard_link(first, dst).ctx("link", dst);
            }
            links.insert((md.dev(), md.ino()), dst.to_path_buf());
        }
        if ft.is_dir() {
            fs::create_dir(dst).ctx("create directory", dst)?;
            for entry in fs::read_dir(src).ctx("read directory", src)? {
                let entry = entry.ctx("read directory", src)?;
                self.copy(&entry.path(), &dst.join(entry.file_name()), links)?;
            }
        } else if ft.is_file() {
            let from = fs::File::open(src).ctx("open", src)?;
            let mut to = fs::File::create_new(dst).ctx("create", dst)?;
            if rustix::fs::ioctl_ficlone(&to, &from).is_ok() {
                self.cloned.fetch_add(1, Ordering::Relaxed);
            } else {
                // EOPNOTSUPP, EXDEV, EINVAL: this filesystem cannot clone; copy the bytes.
                let mut from = from;
                io::copy(&mut from, &mut to).ctx("copy", dst)?;
                self.copied.fetch_add(1, Ordering::Relaxed);
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(src).ctx("readlink", src)?;
            std::os::unix::fs::symlink(target, dst).ctx("symlink", dst)?;
        } else {
            let kind = if ft.is_char_device() {
                rustix::fs::FileType::CharacterDevice
            } else if ft.is_block_device() {
                rustix::fs::FileType::BlockDevice
            } else if ft.is_fifo() {
                rustix::fs::FileType::Fifo
            } else {
                rustix::fs::FileType::Socket
            };
            rustix::fs::mknodat(
                rustix::fs::CWD,
                dst,
                kind,
                rustix::fs::Mode::empty(),
                md.rdev(),
            )
            .map_err(io::Error::from)
            .ctx("mknod", dst)?;
        }
        copy_metadata(&md, src, dst)
    }
}

/// Owner (as root), mode (after the owner, which clears setuid), xattrs and timestamps.
fn copy_metadata(md: &fs::Metadata, src: &Path, dst: &Path) -> Result<()> {
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid())).ctx("chown", dst)?;
    }
    if !md.file_type().is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))
            .ctx("chmod", dst)?;
    }
    match xattr::list(src) {
        Ok(names) => {
            for name in names {
                if let Some(value) = xattr::get(src, &name).ctx("getxattr", src)? {
                    xattr::set(dst, &name, &value).ctx("setxattr", dst)?;
                }
            }
        }
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => {}
        Err(e) => return Err(graphdriver::Error::io("listxattr", src, e)),
    }
    let ts = |s: i64, ns: i64| rustix::fs::Timespec {
        tv_sec: s,
        tv_nsec: ns as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: ts(md.atime(), md.atime_nsec()),
        last_modification: ts(md.mtime(), md.mtime_nsec()),
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        dst,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)
    .ctx("set times", dst)
}

/// No native diff, changes, apply or size: every call takes the naive path.
impl DiffHooks for Reflink {}

impl ProtoDriver for Reflink {
    fn name(&self) -> &str {
        NAME
    }
    fn home(&self) -> &Path {
        self.store.home()
    }
    fn create(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        self.create_layer(id, parent, false)
    }
    fn create_read_write(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        self.create_layer(id, parent, true)
    }
    fn remove(&self, id: &LayerId) -> Result<()> {
        self.store.remove(id, |_| Ok(()))
    }
    /// Nothing to mount: counts the reference and returns the copy; a read-only view is a
    /// read-only bind mount of it, made by the store.
    fn get(&self, id: &LayerId, opts: &MountOpts) -> Result<PathBuf> {
        self.store.require(id)?;
        let root = self.root(id)?;
        self.store
            .acquire_tree(NAME, id, &root, opts, rustix::mount::MountFlags::empty())
    }
    fn put(&self, id: &LayerId) -> Result<()> {
        self.store.release_ref(id, || Ok(())).map(|_| ())
    }
    fn exists(&self, id: &LayerId) -> bool {
        self.store.exists(id)
    }
    fn status(&self) -> Vec<(String, String)> {
        vec![
            (
                "files cloned".into(),
                self.cloned.load(Ordering::Relaxed).to_string(),
            ),
            (
                "files copied".into(),
                self.copied.load(Ordering::Relaxed).to_string(),
            ),
        ]
    }
    /// Drops every reference (durable ones included) and unmounts every read-only view.
    fn cleanup(&self) -> Result<()> {
        self.store.release_every_layer(|_| Ok(()))
    }
    fn list(&self) -> Result<Vec<LayerInfo>> {
        self.store.list()
    }
}
