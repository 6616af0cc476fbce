//! fd-relative path resolution confined to the apply target.
//!
//! Every name in a layer is resolved *beneath* an fd of the target directory: symlinks (planted by
//! the layer or already present), `..` and absolute link targets all stay inside it, as if the
//! target were `/`. The kernel does this with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`;
//! on kernels without `openat2` (`ENOSYS`) [`open_dir_beneath_manual`] walks the components one
//! by one with `O_NOFOLLOW`, expanding symlinks itself and clamping `..` at the root.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// Symlinks followed while resolving one path before giving up with `ELOOP` (as Linux does).
const MAX_SYMLINKS: usize = 40;

/// Set once `openat2` returned `ENOSYS`; lock-free, so it is safe after `fork`.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Flags for directory fds used as the base of `*at()` calls.
fn dir_path_flags() -> OFlags {
    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC
}

/// Opens the target directory itself (trusted path given by the caller) as an `O_PATH` fd.
pub(crate) fn open_root(dest: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(dest, dir_path_flags(), Mode::empty())?)
}

/// Opens the directory `rel` (relative, already normalised) beneath `root` as an `O_PATH` fd.
///
/// Symlinks met on the way resolve as if `root` were `/`. With `create`, missing directories are
/// made (mode 0755) one component at a time, each again resolved beneath `root`.
pub(crate) fn open_dir_beneath(
    root: BorrowedFd<'_>,
    rel: &Path,
    create: bool,
) -> io::Result<OwnedFd> {
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
                match rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) => {
                        // mkdirat is subject to the umask; make the mode exact.
                        rustix::fs::chmodat(
                            &fd,
                            name,
                            Mode::from_raw_mode(0o755),
                            AtFlags::empty(),
                        )?;
                    }
                    Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                open_beneath_once(root, &prefix)?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(fd)
}

/// One resolution of `rel` beneath `root`, by `openat2` or the manual walk.
fn open_beneath_once(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
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
            Err(rustix::io::Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            // openat2 may fail with EAGAIN under concurrent renames; the manual walk is exact.
            Err(rustix::io::Errno::AGAIN) => {}
            Err(e) => return Err(e.into()),
        }
    }
    open_dir_beneath_manual(root, rel)
}

/// Resolves the directory `rel` beneath `root` without `openat2`: every component is opened
/// with `O_NOFOLLOW`; symlinks are read and expanded by hand (absolute targets restart at
/// `root`), and `..` never climbs above `root`.
pub(crate) fn open_dir_beneath_manual(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut queue: Vec<OsString> = components_rev(rel.as_os_str().as_bytes());
    let mut links = 0usize;
    while let Some(name) = queue.pop() {
        if name.is_empty() || name == "." {
            continue;
        }
        if name == ".." {
            stack.pop();
            continue;
        }
        let cur = stack.last().map_or(root, |fd| fd.as_fd());
        let fd = rustix::fs::openat(
            cur,
            &name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => stack.push(fd),
            FileType::Symlink => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = rustix::fs::readlinkat(&fd, "", Vec::new())?;
                let bytes = target.as_bytes();
                if bytes.starts_with(b"/") {
                    stack.clear();
                }
                queue.extend(components_rev(bytes));
            }
            _ => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
        }
    }
    match stack.pop() {
        Some(fd) => Ok(fd),
        None => Ok(rustix::fs::openat(
            root,
            ".",
            dir_path_flags(),
            Mode::empty(),
        )?),
    }
}

/// The `/`-separated components of `bytes`, last first (so `pop` yields them in order).
fn components_rev(bytes: &[u8]) -> Vec<OsString> {
    bytes
        .split(|&b| b == b'/')
        .rev()
        .map(|c| OsStr::from_bytes(c).to_os_string())
        .collect()
}

/// Removes `name` in `parent` whatever it is; directories with everything below them. Nothing
/// is followed: a symlink is removed, not its target. A missing `name` is not an error.
pub(crate) fn remove_all_at(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let st = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return match rustix::fs::unlinkat(parent, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        };
    }
    let dir = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    empty_dir(dir.as_fd())?;
    match rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes every entry of the open directory `dir`.
pub(crate) fn empty_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    for name in list_dir(dir)? {
        remove_all_at(dir, &name)?;
    }
    Ok(())
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
