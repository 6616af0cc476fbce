//! Extended attributes of entries reached through their parent directory: never following a
//! symlink, never opening a special file, never resolving a path outside the directory.
//!
//! Linux 6.13 has `*xattrat(2)` with `AT_SYMLINK_NOFOLLOW`, which do exactly that. Before 6.13
//! (the `ENOSYS` is remembered after the first call; [`xattr_at_supported`]) one of two routes
//! is taken, both ending in an `l*xattr` call on a single component that is not followed:
//!
//! * **A single-threaded process** (the confined apply child, which declared itself with
//!   [`declare_single_threaded`]): `fchdir` to the directory, `l*xattr(name)` relative to the
//!   working directory, `fchdir` back. `/proc` is not needed (there is none after the child's
//!   `pivot_root`), and a name that is one component (no `/`, not `.` or `..`) cannot leave
//!   the directory. The working directory is per process, so this route is taken only where no
//!   other thread can observe it.
//! * **Any other process**: `l*xattr("/proc/self/fd/<dir>/<name>")`, where the kernel resolves
//!   the descriptor's magic link to the directory itself (not through any path in the tree) and
//!   then looks up the one component. This needs `/proc`, which an ordinary host process has.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Mode, OFlags};

/// Where [`list_xattrs`] and [`get_xattr`] read from.
#[derive(Clone, Copy, Debug)]
pub enum XattrTarget<'a> {
    /// An open descriptor of the inode itself (a regular file or directory opened for reading).
    Fd(BorrowedFd<'a>),
    /// The entry `name` of the directory open as the descriptor, never followed if it is a
    /// symlink and never opened (for symlinks, device nodes, FIFOs and sockets): `getxattrat(2)`
    /// / `listxattrat(2)` with `AT_SYMLINK_NOFOLLOW` (Linux 6.13), and on older kernels
    /// `lgetxattr`/`llistxattr` of `/proc/self/fd/<dir>/<name>`, which the kernel resolves
    /// through the directory descriptor, not through any path inside the tree.
    At(BorrowedFd<'a>, &'a CStr),
}

/// Cleared after the first `ENOSYS` from the `*xattrat` calls (kernels before 6.13).
static XATTRAT: AtomicBool = AtomicBool::new(true);

/// Set by [`declare_single_threaded`]: the `fchdir` route is safe in this process.
static SINGLE_THREADED: AtomicBool = AtomicBool::new(false);

/// Declares that this process has exactly one thread and will not start another (a child
/// right after `fork`, such as `chrootarchive`'s confined apply process). On kernels without
/// the `*xattrat` calls, xattrs of symlinks and special files are then read and written after
/// an `fchdir` into their directory (restored afterwards) instead of through `/proc/self/fd`,
/// which a process confined by `pivot_root` or `chroot` does not have.
///
/// Calling it in a multi-threaded process would briefly move every thread's working directory.
pub fn declare_single_threaded() {
    SINGLE_THREADED.store(true, Ordering::Relaxed);
}

/// Probes, without effect, whether the kernel has the `*xattrat` calls (Linux 6.13): a
/// `getxattrat` on descriptor -1 fails with `EBADF` where it exists and `ENOSYS` where not.
/// Records the answer as the first real call would.
pub fn probe_xattr_at() -> bool {
    let mut buf = [0u8; 1];
    let present = !matches!(getxattrat_raw(-1, c"x", c"user.x", &mut buf), Err(e) if is_nosys(&e));
    if !present {
        XATTRAT.store(false, Ordering::Relaxed);
    }
    present && XATTRAT.load(Ordering::Relaxed)
}

/// Whether the `*xattrat` system calls are used (`false` once the kernel answered `ENOSYS`).
pub fn xattr_at_supported() -> bool {
    XATTRAT.load(Ordering::Relaxed)
}

// The `*xattrat` calls have one number on every architecture (they postdate the unified table);
// libc does not name them yet.
const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;

/// `struct xattr_args` of `getxattrat(2)`.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

fn listxattrat(dir: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the path is a valid NUL-terminated string and `buf` is valid for writes of
    // `buf.len()` bytes for the duration of the call; the kernel writes at most that many.
    let r = unsafe {
        libc::syscall(
            SYS_LISTXATTRAT,
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    ret(r)
}

fn getxattrat(dir: BorrowedFd<'_>, name: &CStr, attr: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    getxattrat_raw(dir.as_raw_fd(), name, attr, buf)
}

fn getxattrat_raw(dir: RawFd, name: &CStr, attr: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    let mut args = XattrArgs {
        value: buf.as_mut_ptr() as u64,
        size: u32::try_from(buf.len()).unwrap_or(u32::MAX),
        flags: 0,
    };
    // SAFETY: both strings are NUL-terminated; `args` points into `buf`, valid for writes of
    // `args.size <= buf.len()` bytes, and `args` itself lives across the call with the size
    // passed as the struct's size.
    let r = unsafe {
        libc::syscall(
            SYS_GETXATTRAT,
            dir,
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
            attr.as_ptr(),
            &mut args as *mut XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    };
    ret(r)
}

fn ret(r: libc::c_long) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(usize::try_from(r).unwrap_or(0))
    }
}

/// `/proc/self/fd/<dir>/<name>`: resolved by the kernel through the descriptor's magic link,
/// then one component looked up without following it (the `l*xattr` calls).
fn proc_path(dir: BorrowedFd<'_>, name: &CStr) -> CString {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.to_bytes());
    // `name` has no interior NUL (it is a CStr), so neither has the result.
    CString::new(p).unwrap_or_default()
}

/// Runs `call` on a path naming the entry `name` of `dir` without the `*xattrat` calls: after
/// an `fchdir` into `dir` in a single-threaded process, else through `/proc/self/fd` (see the
/// module documentation). `name` must be one component: no `/`, not `.` or `..`.
fn fallback<T>(
    dir: BorrowedFd<'_>,
    name: &CStr,
    call: impl FnOnce(&CStr) -> io::Result<T>,
) -> io::Result<T> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    if !single_threaded() {
        return call(proc_path(dir, name).as_c_str());
    }
    in_dir(dir, || call(name))
}

/// Whether [`declare_single_threaded`] was called in this process.
pub(crate) fn single_threaded() -> bool {
    SINGLE_THREADED.load(Ordering::Relaxed)
}

/// Runs `f` with `dir` as the working directory, then returns to the previous one. Only for a
/// single-threaded process ([`single_threaded`]): the working directory is per process.
pub(crate) fn in_dir<T>(dir: BorrowedFd<'_>, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let saved = rustix::fs::open(
        c".",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::process::fchdir(dir)?;
    let result = f();
    // Going back can only fail if `saved` stopped being a directory we may enter, which the
    // kernel does not allow for an open descriptor of one; report it all the same.
    rustix::process::fchdir(&saved)?;
    result
}

/// Sets the xattr `attr` of the entry `name` of `dir` (a symlink, device node, FIFO or socket
/// is neither followed nor opened): `setxattrat(2)` where the kernel has it, else the route
/// described in the module documentation.
pub fn set_xattr_at(dir: BorrowedFd<'_>, name: &CStr, attr: &CStr, value: &[u8]) -> io::Result<()> {
    if XATTRAT.load(Ordering::Relaxed) {
        match setxattrat(dir, name, attr, value) {
            Err(e) if is_nosys(&e) => XATTRAT.store(false, Ordering::Relaxed),
            r => return r,
        }
    }
    fallback(dir, name, |path| {
        rustix::fs::lsetxattr(path, attr, value, rustix::fs::XattrFlags::empty())
            .map_err(io::Error::from)
    })
}

fn setxattrat(dir: BorrowedFd<'_>, name: &CStr, attr: &CStr, value: &[u8]) -> io::Result<()> {
    let args = XattrArgs {
        value: value.as_ptr() as u64,
        size: u32::try_from(value.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        flags: 0,
    };
    // SAFETY: both strings are NUL-terminated and live across the call; `args` is a correctly
    // laid out `struct xattr_args` whose `value` covers `value.len()` readable bytes, passed
    // with its size; the kernel only reads from them. The fd is borrowed and open.
    let r = unsafe {
        libc::syscall(
            SYS_SETXATTRAT,
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
            attr.as_ptr(),
            &args as *const XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    };
    ret(r).map(|_| ())
}

fn is_nosys(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSYS)
}

/// One call into `buf`, by whichever route the target and the kernel allow.
fn list_into(t: XattrTarget<'_>, buf: &mut [u8]) -> io::Result<usize> {
    match t {
        XattrTarget::Fd(fd) => rustix::fs::flistxattr(fd, buf).map_err(io::Error::from),
        XattrTarget::At(dir, name) => {
            if XATTRAT.load(Ordering::Relaxed) {
                match listxattrat(dir, name, buf) {
                    Err(e) if is_nosys(&e) => XATTRAT.store(false, Ordering::Relaxed),
                    r => return r,
                }
            }
            fallback(dir, name, |path| {
                rustix::fs::llistxattr(path, &mut *buf).map_err(io::Error::from)
            })
        }
    }
}

fn get_into(t: XattrTarget<'_>, attr: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    match t {
        XattrTarget::Fd(fd) => rustix::fs::fgetxattr(fd, attr, buf).map_err(io::Error::from),
        XattrTarget::At(dir, name) => {
            if XATTRAT.load(Ordering::Relaxed) {
                match getxattrat(dir, name, attr, buf) {
                    Err(e) if is_nosys(&e) => XATTRAT.store(false, Ordering::Relaxed),
                    r => return r,
                }
            }
            fallback(dir, name, |path| {
                rustix::fs::lgetxattr(path, attr, &mut *buf).map_err(io::Error::from)
            })
        }
    }
}

/// Runs `call` into a buffer that grows until the value fits (`ERANGE` means it grew).
fn grow(mut call: impl FnMut(&mut [u8]) -> io::Result<usize>) -> io::Result<Vec<u8>> {
    let mut stack = [0u8; 512];
    match call(&mut stack) {
        Ok(n) => return Ok(stack[..n.min(stack.len())].to_vec()),
        Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {}
        Err(e) => return Err(e),
    }
    // The largest value or list the kernel hands out (XATTR_SIZE_MAX / XATTR_LIST_MAX).
    let mut size = 4096;
    loop {
        let mut v = vec![0u8; size];
        match call(&mut v) {
            Ok(n) => {
                v.truncate(n);
                return Ok(v);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) && size < (1 << 16) => size *= 4,
            Err(e) => return Err(e),
        }
    }
}

/// The names of every extended attribute of the target, in the order the filesystem lists
/// them; empty when the filesystem does not support xattrs (`ENOTSUP`).
pub fn list_xattrs(target: XattrTarget<'_>) -> io::Result<Vec<CString>> {
    let raw = match grow(|b| list_into(target, b)) {
        Ok(v) => v,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(raw
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .filter_map(|n| CString::new(n).ok())
        .collect())
}

/// The value of the extended attribute `attr` of the target; `None` when it is not set, when
/// the filesystem has no xattrs, or when the caller may not read it (`ENODATA`, `ENOTSUP`,
/// `EPERM`: `trusted.*` as a normal user).
pub fn get_xattr(target: XattrTarget<'_>, attr: &CStr) -> io::Result<Option<Vec<u8>>> {
    match grow(|b| get_into(target, attr, b)) {
        Ok(v) => Ok(Some(v)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENODATA | libc::ENOTSUP | libc::EPERM)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Test hook: forget that the `*xattrat` calls work, as on a kernel before 6.13. Only with the
/// `test-util` feature.
#[cfg(any(test, feature = "test-util"))]
pub fn force_xattrat_missing() {
    XATTRAT.store(false, Ordering::Relaxed);
}
