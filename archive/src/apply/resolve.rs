//! fd-relative path resolution confined to the apply target, for paths of any length.
//!
//! Every name in a layer is resolved *beneath* an fd of the target directory: symlinks (planted by
//! the layer or already present), `..` and absolute link targets all stay inside it, as if the
//! target were `/`.
//!
//! * **Short paths** (below [`SHORT_PATH`] bytes, the common case) resolve in one
//!   `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` call.
//! * **Long paths** (a 10,000-level tree has 20,000-byte names, far beyond `PATH_MAX`, which
//!   `openat2` refuses with `ENAMETOOLONG`) and kernels without `openat2` (`ENOSYS`) use
//!   [`walk_beneath`]: the components are opened one by one with `O_NOFOLLOW`, symlinks are
//!   read and expanded by hand (absolute targets restart at the root), and `..` never climbs
//!   above the root. It holds **one** directory fd whatever the depth: a `..` reopens the parent
//!   through the kernel's `..` and checks its device and inode against the ones recorded on the
//!   way down.
//! * [`Cursor`] keeps the directory used last (tars list a directory's entries together) and
//!   moves from it to the next one: down by opening the extra components one at a time without
//!   following symlinks, up by `../..` checked against the recorded device and inode. Anything
//!   it cannot do exactly (a symlink on the way, an unknown or changed ancestor) starts again
//!   from the root.
//!
//! [`crate::fs::remove_tree_at`] removes a tree of any depth the same way: iteratively, with a bounded
//! number of fds.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// Symlinks followed while resolving one path before giving up with `ELOOP` (as Linux does).
const MAX_SYMLINKS: usize = 40;

/// Paths at least this long (bytes) are resolved component by component; shorter ones in one
/// `openat2` call. Well below `PATH_MAX` (4096) so that symlink targets met on the way cannot
/// push the kernel's walk over it.
pub(crate) const SHORT_PATH: usize = 3072;

/// How many `..` one `openat` climbs at most (`"../"` × this stays below `PATH_MAX`).
const UP_CHUNK: usize = 1000;

/// A directory's identity: device and inode.
pub(crate) type Id = (u64, u64);

/// Flags for directory fds used as the base of `*at()` calls.
fn dir_path_flags() -> OFlags {
    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC
}

/// The device and inode of the open file `fd`.
fn id_of(fd: BorrowedFd<'_>) -> io::Result<Id> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// The error for a directory that is no longer where it was recorded.
fn moved() -> io::Error {
    io::Error::other(
        "a directory was moved while it was being resolved (its `..` is not the recorded parent)",
    )
}

/// Opens the target directory itself (trusted path given by the caller) as an `O_PATH` fd.
pub(crate) fn open_root(dest: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(dest, dir_path_flags(), Mode::empty())?)
}

/// Whether `rel` can be resolved by one `openat2` call.
fn short(rel: &Path) -> bool {
    rel.as_os_str().len() < SHORT_PATH && crate::fs::openat2_supported()
}

/// Creates the directory `name` in `parent` with mode exactly 0755; an existing name is fine.
fn mkdir_exact(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)) {
        // mkdirat is subject to the umask; make the mode exact.
        Ok(()) => Ok(rustix::fs::chmodat(
            parent,
            name,
            Mode::from_raw_mode(0o755),
            AtFlags::empty(),
        )?),
        Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Opens the directory `rel` (relative, already normalised) beneath `root` as an `O_PATH` fd.
///
/// Symlinks met on the way resolve as if `root` were `/`. With `create`, missing directories are
/// made (mode 0755) one component at a time, each again resolved beneath `root`. Paths of any
/// length work; at most two fds are open at any time.
pub(crate) fn open_dir_beneath(
    root: BorrowedFd<'_>,
    rel: &Path,
    create: bool,
) -> io::Result<OwnedFd> {
    if !short(rel) {
        return walk_beneath(root, rel, create).map(|(fd, _)| fd);
    }
    match open_beneath_once(root, rel) {
        Err(e) if create && e.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    // Some component is missing: walk prefix by prefix, creating what is absent.
    let mut prefix = PathBuf::new();
    let mut fd = rustix::io::dup(root)?;
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            continue;
        };
        prefix.push(name);
        fd = match open_beneath_once(root, &prefix) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                mkdir_exact(fd.as_fd(), name)?;
                open_beneath_once(root, &prefix)?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(fd)
}

/// One resolution of the short path `rel` beneath `root`, by `openat2` or the manual walk.
fn open_beneath_once(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    if crate::fs::openat2_supported() {
        let path: &OsStr = if rel.as_os_str().is_empty() {
            OsStr::new(".")
        } else {
            rel.as_os_str()
        };
        match rustix::fs::openat2(
            root,
            path,
            dir_path_flags(),
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::NOSYS) => crate::fs::note_openat2_missing(),
            // openat2 may fail with EAGAIN under concurrent renames; the manual walk is exact.
            Err(rustix::io::Errno::AGAIN) => {}
            Err(e) => return Err(e.into()),
        }
    }
    open_dir_beneath_manual(root, rel)
}

/// Resolves the directory `rel` beneath `root` without `openat2` (see [`walk_beneath`]).
pub(crate) fn open_dir_beneath_manual(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    walk_beneath(root, rel, false).map(|(fd, _)| fd)
}

/// Resolves the directory `rel` beneath `root` one component at a time, for paths of any
/// length: every component is opened with `O_NOFOLLOW`; symlinks are read and expanded by hand
/// (absolute targets restart at `root`, at most [`MAX_SYMLINKS`]), and `..` never climbs above
/// `root`. One directory fd is held at a time: `..` reopens the parent through the kernel and
/// checks it against the device and inode recorded on the way down.
///
/// With `create`, a missing component of `rel` itself (not of a symlink's target) is created as
/// a directory (mode 0755). Returns the fd and, when no symlink was followed, the identity of
/// the directory at each level of `rel` (for [`Cursor`]).
pub(crate) fn walk_beneath(
    root: BorrowedFd<'_>,
    rel: &Path,
    create: bool,
) -> io::Result<(OwnedFd, Option<Vec<Id>>)> {
    let mut cur: Option<OwnedFd> = None;
    // Identities of the directories between root (excluded) and `cur` (included).
    let mut stack: Vec<Id> = Vec::new();
    // Components still to resolve, last first; `true` for components of `rel` itself.
    let mut queue: Vec<(OsString, bool)> = components_rev(rel.as_os_str().as_bytes())
        .into_iter()
        .map(|c| (c, true))
        .collect();
    let mut links = 0usize;
    while let Some((name, own)) = queue.pop() {
        if name.is_empty() || name == "." {
            continue;
        }
        if name == ".." {
            if stack.pop().is_none() {
                continue; // `..` of the root is the root.
            }
            cur = match stack.last() {
                None => None,
                Some(&want) => {
                    let base = cur.as_ref().map_or(root, |fd| fd.as_fd());
                    let up = rustix::fs::openat(
                        base,
                        "..",
                        dir_path_flags() | OFlags::NOFOLLOW,
                        Mode::empty(),
                    )?;
                    if id_of(up.as_fd())? != want {
                        return Err(moved());
                    }
                    Some(up)
                }
            };
            continue;
        }
        let base = cur.as_ref().map_or(root, |fd| fd.as_fd());
        let open = || {
            rustix::fs::openat(
                base,
                &name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
        };
        let fd = match open() {
            Err(rustix::io::Errno::NOENT) if create && own => {
                mkdir_exact(base, &name)?;
                open()?
            }
            other => other?,
        };
        let st = rustix::fs::fstat(&fd)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                stack.push((st.st_dev, st.st_ino));
                cur = Some(fd);
            }
            FileType::Symlink => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = rustix::fs::readlinkat(&fd, "", Vec::new())?;
                let bytes = target.as_bytes();
                if bytes.starts_with(b"/") {
                    stack.clear();
                    cur = None;
                }
                queue.extend(components_rev(bytes).into_iter().map(|c| (c, false)));
            }
            _ => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
        }
    }
    let fd = match cur {
        Some(fd) => fd,
        None => rustix::fs::openat(root, ".", dir_path_flags(), Mode::empty())?,
    };
    Ok((fd, (links == 0).then_some(stack)))
}

/// The `/`-separated components of `bytes`, last first (so `pop` yields them in order).
fn components_rev(bytes: &[u8]) -> Vec<OsString> {
    bytes
        .split(|&b| b == b'/')
        .rev()
        .map(|c| OsStr::from_bytes(c).to_os_string())
        .collect()
}

/// The number of components of a normalised relative path (`""` has none).
fn depth_of(p: &[u8]) -> usize {
    if p.is_empty() {
        0
    } else {
        1 + p.iter().filter(|&&b| b == b'/').count()
    }
}

/// An `O_PATH` fd of the directory at a (lexical, normalised) path beneath the root, reused to
/// reach the next directory cheaply (see the module documentation).
///
/// Paths are handled as bytes: a normalised relative path has no `.`, `..`, empty component
/// or leading or trailing `/`, so `/` separates components exactly, and comparisons stay
/// `memcmp`s even for 20,000-byte names.
pub(crate) struct Cursor {
    /// The lexical path the fd was resolved from.
    path: PathBuf,
    /// Its number of components.
    depth: usize,
    /// The directory.
    fd: OwnedFd,
    /// `ids[i]`: identity of the directory at the first `i + 1` components of `path`, when it
    /// was reached by opening that component without following a symlink; `None` or missing
    /// when unknown (reached through `openat2` or a symlink).
    ids: Vec<Option<Id>>,
}

impl Cursor {
    /// Whether this cursor stands at `p`.
    pub(crate) fn is_at(&self, p: &Path) -> bool {
        self.path.as_os_str().as_bytes() == p.as_os_str().as_bytes()
    }

    /// The directory's `O_PATH` fd.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens the directory `target` (normalised) beneath `root`, creating missing components
    /// with `create` like [`open_dir_beneath`], starting from `prev` when that saves work.
    pub(crate) fn open(
        root: BorrowedFd<'_>,
        prev: Option<Cursor>,
        target: &Path,
        create: bool,
    ) -> io::Result<Cursor> {
        if short(target) {
            // One openat2 from the root: as fast as anything the cursor could do.
            return Self::from_root(root, target, create);
        }
        let Some(prev) = prev else {
            return Self::from_root(root, target, create);
        };
        let t = target.as_os_str().as_bytes();
        let p = prev.path.as_os_str().as_bytes();
        // Length of the longest common prefix that ends at a component boundary.
        let under = |len: usize| t.len() == len || t.get(len) == Some(&b'/');
        let (common_len, common) = if t.starts_with(p) && (p.is_empty() || under(p.len())) {
            (p.len(), prev.depth)
        } else {
            let mut n = t.iter().zip(p).take_while(|(a, b)| a == b).count();
            let boundary = |n: usize| under(n) && (p.len() == n || p.get(n) == Some(&b'/'));
            while n > 0 && !boundary(n) {
                n -= 1;
            }
            (n, depth_of(&t[..n]))
        };
        let start = if common == prev.depth {
            Some(prev)
        } else if common_len < SHORT_PATH {
            let prefix = Path::new(OsStr::from_bytes(&t[..common_len]));
            open_dir_beneath(root, prefix, false).ok().map(|fd| Cursor {
                fd,
                path: prefix.to_path_buf(),
                depth: common,
                ids: Vec::new(),
            })
        } else {
            let want = prev.ids.get(common - 1).copied().flatten();
            match want.map(|want| climb(prev.fd.as_fd(), prev.depth - common, want)) {
                Some(Ok(Some(fd))) => {
                    let mut ids = prev.ids;
                    ids.truncate(common);
                    Some(Cursor {
                        path: PathBuf::from(OsStr::from_bytes(&t[..common_len])),
                        depth: common,
                        fd,
                        ids,
                    })
                }
                _ => None,
            }
        };
        let Some(mut cur) = start else {
            return Self::from_root(root, target, create);
        };
        cur.ids.resize(common, None);
        let rest = t[common_len..]
            .strip_prefix(b"/")
            .unwrap_or(&t[common_len..]);
        for name in rest
            .split(|&b| b == b'/')
            .filter(|n| !n.is_empty())
            .map(OsStr::from_bytes)
        {
            let open = |base: BorrowedFd<'_>| {
                rustix::fs::openat(
                    base,
                    name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
            };
            let fd = match open(cur.fd.as_fd()) {
                Err(rustix::io::Errno::NOENT) if create => {
                    mkdir_exact(cur.fd.as_fd(), name)?;
                    open(cur.fd.as_fd())?
                }
                other => other?,
            };
            let st = rustix::fs::fstat(&fd)?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => {
                    cur.fd = fd;
                    cur.depth += 1;
                    cur.ids.push(Some((st.st_dev, st.st_ino)));
                }
                // Symlinks are expanded by the walk from the root.
                FileType::Symlink => return Self::from_root(root, target, create),
                _ => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
            }
        }
        cur.path = target.to_path_buf();
        Ok(cur)
    }

    /// Resolves `target` from the root, recording what can be recorded.
    fn from_root(root: BorrowedFd<'_>, target: &Path, create: bool) -> io::Result<Cursor> {
        if short(target) {
            return Ok(Cursor {
                path: target.to_path_buf(),
                depth: depth_of(target.as_os_str().as_bytes()),
                fd: open_dir_beneath(root, target, create)?,
                ids: Vec::new(),
            });
        }
        let (fd, ids) = walk_beneath(root, target, create)?;
        Ok(Cursor {
            path: target.to_path_buf(),
            depth: depth_of(target.as_os_str().as_bytes()),
            fd,
            ids: ids
                .map(|ids| ids.into_iter().map(Some).collect())
                .unwrap_or_default(),
        })
    }
}

/// Climbs `levels` `..` from `fd` (in chunks below `PATH_MAX`); `Some` fd when the directory
/// reached is `want`, `None` when it is not (something was moved).
fn climb(fd: BorrowedFd<'_>, mut levels: usize, want: Id) -> io::Result<Option<OwnedFd>> {
    let mut cur: Option<OwnedFd> = None;
    while levels > 0 {
        let n = levels.min(UP_CHUNK);
        let path = "../".repeat(n);
        let base = cur.as_ref().map_or(fd, |f| f.as_fd());
        cur = Some(rustix::fs::openat(
            base,
            path.as_str(),
            dir_path_flags() | OFlags::NOFOLLOW,
            Mode::empty(),
        )?);
        levels -= n;
    }
    match cur {
        Some(up) if id_of(up.as_fd())? == want => Ok(Some(up)),
        _ => Ok(None),
    }
}

/// The names in the open directory `dir`, without `.` and `..`.
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut reader = rustix::fs::Dir::read_from(dir)?;
    let mut names = Vec::new();
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}
