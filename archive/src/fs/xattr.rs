//! Reading extended attributes without following links and without opening special files.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Whether the `*xattrat` system calls are used (`false` once the kernel answered `ENOSYS`).
pub fn xattr_at_supported() -> bool {
    XATTRAT.load(Ordering::Relaxed)
}

// The `*xattrat` calls have one number on every architecture (they postdate the unified table);
// libc does not name them yet.
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
            dir.as_raw_fd(),
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
            rustix::fs::llistxattr(proc_path(dir, name).as_c_str(), buf).map_err(io::Error::from)
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
            rustix::fs::lgetxattr(proc_path(dir, name).as_c_str(), attr, buf)
                .map_err(io::Error::from)
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

/// Test hook: forget that the `*xattrat` calls work, as on a kernel before 6.13.
#[cfg(test)]
pub(crate) fn force_xattrat_missing() {
    XATTRAT.store(false, Ordering::Relaxed);
}
