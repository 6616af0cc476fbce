//! Tree snapshots and comparison: the oracle every test suite uses.
//!
//! [`snapshot`] records, for every path below a root, what a layer store must preserve (type,
//! mode with setuid/setgid/sticky, owner, size, content digest, symlink target, device number,
//! hardlink grouping, xattrs, mtime). [`differences`] lists every mismatch between two snapshots
//! as a readable line; [`assert_same_tree`] does both for two directories.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, OsStr, OsString};
use std::fs as fs_std;
use std::hash::Hasher;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Stat};

use crate::fs::{self, XattrTarget};
use crate::{Error, Result};

/// What [`differences`] compares.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// Compare mtimes (whole seconds) of everything but directories.
    pub mtimes: bool,
    /// Compare mtimes (whole seconds) of directories.
    pub dir_mtimes: bool,
    /// Compare extended attributes (overlayfs' own `*.overlay.*` are never recorded).
    pub xattrs: bool,
    /// Compare the root directory's own mode, owner, mtime and xattrs.
    pub root_metadata: bool,
    /// Paths (relative to the roots, a leading `/` allowed) left out with everything below.
    pub ignore: Vec<PathBuf>,
}

impl Default for CompareOptions {
    /// Everything compared, nothing ignored.
    fn default() -> Self {
        CompareOptions {
            mtimes: true,
            dir_mtimes: true,
            xattrs: true,
            root_metadata: true,
            ignore: Vec::new(),
        }
    }
}

/// The kind of a file in a [`Snapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

impl From<std::fs::FileType> for Kind {
    /// The kind of an `lstat` result; anything that is no other kind is a socket.
    fn from(ft: std::fs::FileType) -> Kind {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_char_device() {
            Kind::Char
        } else if ft.is_block_device() {
            Kind::Block
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            Kind::Socket
        }
    }
}

/// What a snapshot records about one path.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryInfo {
    /// The file type.
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`0o7777` mask).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Size in bytes for regular files and symlinks, 0 otherwise.
    pub size: u64,
    /// A 128-bit SipHash digest of a regular file's content (not cryptographic).
    pub digest: Option<u128>,
    /// A symlink's target.
    pub link_target: Option<PathBuf>,
    /// Device number of character and block devices.
    pub rdev: Option<u64>,
    /// For files sharing an inode with another path of the tree: the smallest such path.
    pub hardlink_group: Option<PathBuf>,
    /// Extended attributes, sorted by name, without `trusted.overlay.*` and `user.overlay.*`.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Modification time, whole seconds.
    pub mtime: i64,
}

/// Every path below a root (written `/a/b`, the root itself `/`) with its [`EntryInfo`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Path → info, sorted.
    entries: BTreeMap<PathBuf, EntryInfo>,
}

impl Snapshot {
    /// The info recorded for `path` (`/a/b`), if present.
    pub fn get(&self, path: impl AsRef<Path>) -> Option<&EntryInfo> {
        self.entries.get(path.as_ref())
    }

    /// All paths and infos, sorted by path.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &EntryInfo)> {
        self.entries.iter().map(|(p, e)| (p.as_path(), e))
    }

    /// How many paths were recorded (the root included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Records every path below `root` (not following symlinks). Errors name the path that failed.
///
/// The tree is read through [`crate::fs`]: one iterative [`fs::walk`] (bounded descriptors and
/// constant native stack, so trees 10,000 levels deep work), files opened with
/// [`fs::open_file_checked`], xattrs read without following or opening anything but
/// directories and regular files.
pub fn snapshot(root: &Path) -> Result<Snapshot> {
    let fd = fs::open_root_dir(root).map_err(|e| Error::io("open directory", root, e))?;
    let mut v = Snap {
        root,
        entries: BTreeMap::new(),
        inodes: HashMap::new(),
        buf: vec![0u8; 64 * 1024],
    };
    fs::walk(fd, root, &mut v)?;
    let Snap {
        mut entries,
        inodes,
        ..
    } = v;
    for paths in inodes.into_values() {
        if paths.len() < 2 {
            continue;
        }
        let Some(min) = paths.iter().min().cloned() else {
            continue;
        };
        for p in paths {
            if let Some(e) = entries.get_mut(&p) {
                e.hardlink_group = Some(min.clone());
            }
        }
    }
    Ok(Snapshot { entries })
}

/// The visitor of [`snapshot`].
struct Snap<'a> {
    root: &'a Path,
    entries: BTreeMap<PathBuf, EntryInfo>,
    inodes: HashMap<(u64, u64), Vec<PathBuf>>,
    buf: Vec<u8>,
}

fn kind_of(st: &Stat) -> Kind {
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        FileType::RegularFile => Kind::File,
        FileType::CharacterDevice => Kind::Char,
        FileType::BlockDevice => Kind::Block,
        FileType::Fifo => Kind::Fifo,
        _ => Kind::Socket,
    }
}

impl Snap<'_> {
    fn full(&self, rel: &[u8]) -> PathBuf {
        self.root.join(OsStr::from_bytes(rel))
    }

    #[allow(clippy::unnecessary_cast)]
    fn record(
        &mut self,
        rel: &[u8],
        st: &Stat,
        xt: XattrTarget<'_>,
        digest: Option<u128>,
        link_target: Option<PathBuf>,
    ) -> Result<()> {
        let kind = kind_of(st);
        let mut p = Vec::with_capacity(rel.len() + 1);
        p.push(b'/');
        p.extend_from_slice(rel);
        let path = PathBuf::from(OsString::from_vec(p));
        if kind != Kind::Dir && st.st_nlink > 1 {
            self.inodes
                .entry((st.st_dev as u64, st.st_ino as u64))
                .or_default()
                .push(path.clone());
        }
        let info = EntryInfo {
            kind,
            mode: st.st_mode as u32 & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: if matches!(kind, Kind::File | Kind::Symlink) {
                u64::try_from(st.st_size).unwrap_or(0)
            } else {
                0
            },
            digest,
            link_target,
            rdev: matches!(kind, Kind::Char | Kind::Block).then_some(st.st_rdev as u64),
            hardlink_group: None,
            xattrs: read_xattrs(xt, &self.full(rel))?,
            mtime: st.st_mtime as i64,
        };
        self.entries.insert(path, info);
        Ok(())
    }
}

impl fs::Visitor for Snap<'_> {
    type Error = Error;

    fn entry(&mut self, dir: BorrowedFd<'_>, name: &CStr, rel: &[u8], st: &Stat) -> Result<bool> {
        match kind_of(st) {
            // Recorded by `enter`, through its own descriptor.
            Kind::Dir => Ok(true),
            Kind::File => {
                let full = self.full(rel);
                let mut f = fs::open_file_checked(dir, name, st)
                    .map_err(|e| Error::io("open", &full, e))?;
                let digest = digest_file(&mut f, &mut self.buf, &full)?;
                self.record(rel, st, XattrTarget::Fd(f.as_fd()), Some(digest), None)?;
                Ok(false)
            }
            Kind::Symlink => {
                let target = fs::readlink_at(dir, name)
                    .map_err(|e| Error::io("readlink", self.full(rel), e))?;
                let target = PathBuf::from(OsString::from_vec(target));
                self.record(rel, st, XattrTarget::At(dir, name), None, Some(target))?;
                Ok(false)
            }
            _ => {
                self.record(rel, st, XattrTarget::At(dir, name), None, None)?;
                Ok(false)
            }
        }
    }

    fn enter(&mut self, dir: BorrowedFd<'_>, rel: &[u8], st: &Stat) -> Result<()> {
        self.record(rel, st, XattrTarget::Fd(dir), None, None)
    }
}

/// A 128-bit digest of a file's content: two SipHash runs with different keys.
fn digest_file(f: &mut fs_std::File, buf: &mut [u8], path: &Path) -> Result<u128> {
    #[allow(deprecated)]
    let (mut a, mut b) = (
        std::hash::SipHasher::new_with_keys(1, 2),
        std::hash::SipHasher::new_with_keys(3, 4),
    );
    loop {
        let n = match f.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("read", path, e)),
        };
        if n == 0 {
            break;
        }
        a.write(&buf[..n]);
        b.write(&buf[..n]);
    }
    Ok((u128::from(a.finish()) << 64) | u128::from(b.finish()))
}

/// The sorted xattrs of an entry, without overlayfs' own.
fn read_xattrs(t: XattrTarget<'_>, path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let names = fs::list_xattrs(t).map_err(|e| Error::io("listxattr", path, e))?;
    let mut out = Vec::new();
    for name in names {
        let s = name.to_string_lossy().into_owned();
        if s.starts_with("trusted.overlay.") || s.starts_with("user.overlay.") {
            continue;
        }
        let value = fs::get_xattr(t, &name)
            .map_err(|e| Error::io(format!("getxattr {s}"), path, e))?
            .unwrap_or_default();
        out.push((s, value));
    }
    out.sort();
    Ok(out)
}

/// Whether `p` is at or below one of the ignored paths.
fn ignored(p: &Path, opts: &CompareOptions) -> bool {
    let rel = p.strip_prefix("/").unwrap_or(p);
    opts.ignore.iter().any(|i| {
        let i = i.strip_prefix("/").unwrap_or(i);
        !i.as_os_str().is_empty() && rel.starts_with(i)
    })
}

/// Every difference between `expected` and `actual`, one readable line each, such as
/// `"/a/b: mode expected 0644, found 0600"`; empty when the trees are equal under `opts`.
pub fn differences(expected: &Snapshot, actual: &Snapshot, opts: &CompareOptions) -> Vec<String> {
    let mut out = Vec::new();
    for (p, e) in &expected.entries {
        if ignored(p, opts) {
            continue;
        }
        let Some(a) = actual.entries.get(p) else {
            out.push(format!(
                "{}: expected a {:?}, found nothing",
                p.display(),
                e.kind
            ));
            continue;
        };
        let d = p.display();
        if e.kind != a.kind {
            out.push(format!(
                "{d}: type expected {:?}, found {:?}",
                e.kind, a.kind
            ));
            continue;
        }
        let is_root = p == Path::new("/");
        let meta = !is_root || opts.root_metadata;
        if meta && e.mode != a.mode {
            out.push(format!(
                "{d}: mode expected {:04o}, found {:04o}",
                e.mode, a.mode
            ));
        }
        if meta && (e.uid, e.gid) != (a.uid, a.gid) {
            out.push(format!(
                "{d}: owner expected {}:{}, found {}:{}",
                e.uid, e.gid, a.uid, a.gid
            ));
        }
        if e.size != a.size {
            out.push(format!("{d}: size expected {}, found {}", e.size, a.size));
        } else if e.digest != a.digest {
            out.push(format!("{d}: content differs"));
        }
        if e.link_target != a.link_target {
            out.push(format!(
                "{d}: symlink target expected {:?}, found {:?}",
                e.link_target, a.link_target
            ));
        }
        if e.rdev != a.rdev {
            out.push(format!(
                "{d}: device expected {:?}, found {:?}",
                e.rdev, a.rdev
            ));
        }
        if e.hardlink_group != a.hardlink_group {
            out.push(format!(
                "{d}: hardlink group expected {:?}, found {:?}",
                e.hardlink_group, a.hardlink_group
            ));
        }
        if meta && opts.xattrs && e.xattrs != a.xattrs {
            out.push(format!(
                "{d}: xattrs expected {:?}, found {:?}",
                e.xattrs, a.xattrs
            ));
        }
        let check_mtime = if e.kind == Kind::Dir {
            opts.dir_mtimes
        } else {
            opts.mtimes
        };
        if meta && check_mtime && e.mtime != a.mtime {
            out.push(format!(
                "{d}: mtime expected {}, found {}",
                e.mtime, a.mtime
            ));
        }
    }
    for (p, a) in &actual.entries {
        if !ignored(p, opts) && !expected.entries.contains_key(p) {
            out.push(format!(
                "{}: expected nothing, found a {:?}",
                p.display(),
                a.kind
            ));
        }
    }
    out
}

/// Snapshots both trees and compares them; `Err` holds every difference, one per line.
pub fn assert_same_tree(
    expected: &Path,
    actual: &Path,
    opts: &CompareOptions,
) -> std::result::Result<(), String> {
    let e = snapshot(expected).map_err(|e| e.to_string())?;
    let a = snapshot(actual).map_err(|e| e.to_string())?;
    let diffs = differences(&e, &a, opts);
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("\n"))
    }
}
