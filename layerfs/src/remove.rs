//! Removing a whole tree relative to a directory descriptor, at any depth, never following links.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::dirs::{DirEntry, read_dir_sorted, stat_at};
use super::open::{open_dir_at, open_root_dir};
use super::stack::DirStack;

/// Removes the entry `name` of the directory open as `parent`, and everything below it if it
/// is a directory.
///
/// * Nothing is followed: a symlink anywhere in the tree (`name` included) is unlinked, never
///   resolved, so a link to a host directory leaves that directory untouched.
/// * Iterative (an explicit stack, no recursion) on a [`DirStack`]: a tree 10,000 levels deep
///   is removed with a bounded number of descriptors and constant native stack, and no path
///   longer than one component is ever resolved.
/// * A directory whose mode keeps its owner out (for example `000`, as a normal user: it can be
///   neither opened, listed nor emptied, `EACCES`) is made `u+rwx` and the operation retried:
///   `fchmod` on its descriptor when it is open, otherwise `fchmodat2(AT_SYMLINK_NOFOLLOW)`
///   through its parent's descriptor (on kernels before 6.6, `chmod` of
///   `/proc/self/fd/<fd>` of an `O_PATH | O_NOFOLLOW` descriptor checked to be that
///   directory). A directory the caller may not chmod (not its owner, no `CAP_FOWNER`) fails
///   with the original error.
/// * It does not cross into another filesystem: a directory below `name` whose device differs
///   from `name`'s (a mount point, e.g. a still-mounted overlay) is refused with `EXDEV`, and
///   nothing on that filesystem is removed.
/// * An entry that disappears meanwhile is not an error, but `name` itself missing is
///   (`ErrorKind::NotFound`, as `std::fs::remove_dir_all`).
///
/// Errors below `name` keep their [`io::ErrorKind`] and say which entry (path relative to
/// `name`, shortened when very long) and which operation failed; entries removed before the
/// error stay removed.
pub fn remove_tree_at(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // The caller's `parent` is not ours to chmod: only `name` and what is below it are.
    let root = match open_or_unlink(parent, name, false)? {
        Opened::Dir(fd) => fd,
        Opened::Unlinked => return Ok(()),
    };
    empty_tree(root)?;
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR).map_err(io::Error::from)
}

/// [`remove_tree_at`] of the last component of `path` in its parent directory.
///
/// *Ambient*: the parent of `path` is resolved like `open(2)`, from the working directory and
/// following symlinks, so pass only a path the caller controls (a driver's own layer or scratch
/// directory), never a path found inside a layer. The last component itself is not followed.
/// A path without a last component (`/`, `..`, empty) is refused with `InvalidInput`.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: no last component to remove", path.display()),
        ));
    };
    let name = CString::new(name.as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => open_root_dir(p)?,
        _ => open_root_dir(Path::new("."))?,
    };
    remove_tree_at(parent.as_fd(), &name)
}

enum Opened {
    Dir(OwnedFd),
    Unlinked,
}

/// Opens `name` in `dir` as a directory (not following it), or unlinks it if it is anything
/// else; makes it `u+rwx` and retries if its mode keeps us out (and, with `fix_dir`, `dir` too,
/// when `dir` is part of the tree being removed).
fn open_or_unlink(dir: BorrowedFd<'_>, name: &CStr, fix_dir: bool) -> io::Result<Opened> {
    let mut retried = false;
    loop {
        match open_dir_at(dir, name) {
            Ok(fd) => return Ok(Opened::Dir(fd)),
            Err(e) => match e.raw_os_error() {
                // A symlink (O_NOFOLLOW) or not a directory: unlink the entry itself.
                Some(libc::ELOOP | libc::ENOTDIR) => {
                    return match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
                        Ok(()) => Ok(Opened::Unlinked),
                        // Became a directory meanwhile: open it on the next round.
                        Err(rustix::io::Errno::ISDIR) if !retried => {
                            retried = true;
                            continue;
                        }
                        Err(e) => Err(e.into()),
                    };
                }
                Some(libc::EACCES) if !retried => {
                    retried = true;
                    // `dir` itself may be what keeps us out (no search permission).
                    if fix_dir {
                        let _ = make_owner_rwx_fd(dir);
                    }
                    if chmod_child_rwx(dir, name).is_err() {
                        return Err(e);
                    }
                }
                _ => return Err(e),
            },
        }
    }
}

/// `op` on the directory `dir`; if it fails with `EACCES`, makes `dir` `u+rwx` and retries once.
fn retry_eacces(
    dir: BorrowedFd<'_>,
    mut op: impl FnMut() -> rustix::io::Result<()>,
) -> rustix::io::Result<()> {
    match op() {
        Err(rustix::io::Errno::ACCESS) => {
            if make_owner_rwx_fd(dir).is_err() {
                return Err(rustix::io::Errno::ACCESS);
            }
            op()
        }
        r => r,
    }
}

/// Adds `u+rwx` to the directory open as `dir` (`fchmod`), unless it has it already.
fn make_owner_rwx_fd(dir: BorrowedFd<'_>) -> rustix::io::Result<()> {
    let st = rustix::fs::fstat(dir)?;
    if st.st_mode & 0o700 == 0o700 {
        // Not a permission problem we can fix.
        return Err(rustix::io::Errno::ACCESS);
    }
    rustix::fs::fchmod(dir, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700))
}

/// Adds `u+rwx` to the directory `name` in `dir` without following a symlink there.
pub(crate) fn chmod_child_rwx(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let st = stat_at(dir, name)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    let mode = (st.st_mode & 0o7777) | 0o700;
    if FCHMODAT2.load(Ordering::Relaxed) {
        match fchmodat2(dir, name, mode) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                FCHMODAT2.store(false, Ordering::Relaxed);
            }
            r => return r,
        }
    }
    // Before Linux 6.6: pin the inode with O_PATH (no permission needed, no link followed),
    // check it is that directory, and chmod it: as "." after an fchdir into it in a
    // single-threaded process (the confined child, which has no /proc but may enter any
    // directory of the tree: it is root, or root of its own user namespace owning the tree),
    // else through its /proc magic link.
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let now = rustix::fs::fstat(&fd)?;
    if !super::open::same_inode(&now, &st) {
        return Err(super::open::changed_during_walk(
            FileType::Directory,
            FileType::from_raw_mode(now.st_mode),
        ));
    }
    let mode = Mode::from_raw_mode(mode);
    if super::xattr::single_threaded() {
        return super::xattr::in_dir(fd.as_fd(), || {
            rustix::fs::chmod(c".", mode).map_err(io::Error::from)
        });
    }
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::chmod(proc.as_str(), mode).map_err(io::Error::from)
}

/// Cleared after the first `ENOSYS` from `fchmodat2` (kernels before 6.6).
static FCHMODAT2: AtomicBool = AtomicBool::new(true);

/// Whether `fchmodat2` is used (`false` once the kernel answered `ENOSYS`).
pub fn fchmodat2_supported() -> bool {
    FCHMODAT2.load(Ordering::Relaxed)
}

/// Probes, without effect, whether the kernel has `fchmodat2` (Linux 6.6): on descriptor -1 it
/// fails with `EBADF` where it exists and `ENOSYS` where not. Records the answer.
pub fn probe_fchmodat2() -> bool {
    // SAFETY: a NUL-terminated constant path; the call fails before touching anything.
    let r = unsafe { libc::syscall(libc::SYS_fchmodat2, -1, c"x".as_ptr(), 0, 0) };
    if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        FCHMODAT2.store(false, Ordering::Relaxed);
    }
    fchmodat2_supported()
}

/// Test hook: forget that `fchmodat2` works, as on a kernel before 6.6. Only with the `test-util` feature.
#[cfg(any(test, feature = "test-util"))]
pub fn force_fchmodat2_missing() {
    FCHMODAT2.store(false, Ordering::Relaxed);
}

/// `fchmodat2(dir, name, mode, AT_SYMLINK_NOFOLLOW)`.
fn fchmodat2(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is a NUL-terminated string valid for the call, `dir` an open descriptor;
    // fchmodat2 only reads its arguments.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::c_uint,
            libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

struct Level {
    entries: Vec<DirEntry>,
    next: usize,
    /// This directory's name in its parent (empty for the root).
    name: CString,
}

/// Reads the directory open as `dir`, making it `u+rwx` and retrying if its mode keeps us out.
fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<DirEntry>> {
    match read_dir_sorted(dir) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) && make_owner_rwx_fd(dir).is_ok() => {
            read_dir_sorted(dir)
        }
        r => r,
    }
}

/// An error of the entry `rel` (relative to the tree being removed): same kind, with the
/// operation and entry named. Very long paths keep their last components only.
/// An empty `name` names the directory `rel` itself.
fn at(op: &str, rel: &[u8], name: &CStr, e: impl Into<io::Error>) -> io::Error {
    let e = e.into();
    let mut path = rel.to_vec();
    if !path.is_empty() && !name.is_empty() {
        path.push(b'/');
    }
    path.extend_from_slice(name.to_bytes());
    if path.is_empty() {
        path.push(b'.');
    }
    const KEEP: usize = 200;
    let shown = if path.len() > KEEP {
        let tail = &path[path.len() - KEEP..];
        let depth = path.iter().filter(|&&b| b == b'/').count() + 1;
        format!(
            "(a path {depth} levels deep) …{}",
            String::from_utf8_lossy(tail)
        )
    } else {
        String::from_utf8_lossy(&path).into_owned()
    };
    io::Error::new(e.kind(), format!("{op} {shown}: {e}"))
}

/// Removes every entry below the directory `root` (left empty, not removed).
fn empty_tree(root: OwnedFd) -> io::Result<()> {
    let root_dev = rustix::fs::fstat(&root)?.st_dev;
    let mut stack = DirStack::new(root)?;
    let mut levels = vec![Level {
        entries: list(stack.top()).map_err(|e| at("read directory", b"", c"", e))?,
        next: 0,
        name: CString::default(),
    }];
    loop {
        let Some(level) = levels.last_mut() else {
            return Ok(());
        };
        let Some(ent) = level.entries.get(level.next) else {
            // Every entry of the top is gone: leave it, then remove it from its parent.
            let Some(done) = levels.pop() else {
                return Ok(());
            };
            if levels.is_empty() {
                return Ok(());
            }
            pop(&mut stack).map_err(|e| at("return to the parent of", stack.rel(), c"", e))?;
            let top = stack.top();
            match retry_eacces(top, || {
                rustix::fs::unlinkat(top, done.name.as_c_str(), AtFlags::REMOVEDIR)
            }) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(at("remove directory", stack.rel(), &done.name, e)),
            }
            continue;
        };
        level.next += 1;
        let name = ent.name.clone();
        let top = stack.top();
        if ent.file_type != FileType::Directory && ent.file_type != FileType::Unknown {
            match retry_eacces(top, || {
                rustix::fs::unlinkat(top, name.as_c_str(), AtFlags::empty())
            }) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => continue,
                // d_type said otherwise, or it was replaced by a directory: open it below.
                Err(rustix::io::Errno::ISDIR) => {}
                Err(e) => return Err(at("remove", stack.rel(), &name, e)),
            }
        }
        let fd = match open_or_unlink(top, &name, true) {
            Ok(Opened::Dir(fd)) => fd,
            Ok(Opened::Unlinked) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(at("open directory", stack.rel(), &name, e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| at("stat", stack.rel(), &name, e))?;
        if st.st_dev != root_dev {
            return Err(at(
                "refusing to remove below the mount point",
                stack.rel(),
                &name,
                io::Error::from_raw_os_error(libc::EXDEV),
            ));
        }
        stack
            .push_fd(fd, &name)
            .map_err(|e| at("open directory", stack.rel(), &name, e))?;
        let entries = list(stack.top()).map_err(|e| at("read directory", stack.rel(), c"", e))?;
        levels.push(Level {
            entries,
            next: 0,
            name,
        });
    }
}

/// [`DirStack::pop`], first making the top searchable if its mode keeps us from reopening its
/// parent through `..`.
fn pop(stack: &mut DirStack) -> io::Result<()> {
    match stack.pop() {
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) && make_owner_rwx_fd(stack.top()).is_ok() =>
        {
            stack.pop().map(drop)
        }
        r => r.map(drop),
    }
}

#[cfg(test)]
mod tests;
