//! Closing every descriptor above the child's pipe ends, on every kernel.
//!
//! `close_range(2)` (Linux 5.9) does it in one call. Older kernels answer `ENOSYS`; the child
//! then lists `/proc/self/fd` with raw `getdents64` into a stack buffer and closes each entry,
//! and where `/proc` is not mounted closes every number up to the soft `RLIMIT_NOFILE`. Both
//! fallbacks run before the child confines itself (so `/proc` is still the host's) and neither
//! allocates, takes a lock or touches anything but descriptors (the post-fork rules of
//! `child.rs`).
//!
//! Whether `close_range` exists is probed once, in the parent before its first fork, with
//! arguments that make the call fail without effect (`first > last`: `EINVAL` where it exists,
//! `ENOSYS` where it does not); the child inherits the answer in its copy of memory, so the
//! fallback is chosen up front on every apply after the first probe.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU8, Ordering};

use nix::errno::Errno;

const UNKNOWN: u8 = 0;
const PRESENT: u8 = 1;
const MISSING: u8 = 2;

/// What the probe found (or a test forced).
static CLOSE_RANGE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether the kernel has `close_range(2)` (Linux 5.9). Probed on first use by a call that
/// fails without effect; the answer is remembered for the life of the process.
pub fn close_range_supported() -> bool {
    match CLOSE_RANGE.load(Ordering::Relaxed) {
        PRESENT => true,
        MISSING => false,
        _ => {
            // SAFETY: close_range with first > last closes nothing: it fails with EINVAL on
            // kernels that have it and ENOSYS on those that do not.
            let r = unsafe { libc::syscall(libc::SYS_close_range, 1u32, 0u32, 0u32) };
            let present = !(r < 0 && Errno::last() == Errno::ENOSYS);
            CLOSE_RANGE.store(if present { PRESENT } else { MISSING }, Ordering::Relaxed);
            present
        }
    }
}

/// Test hook: behave as on a kernel without `close_range` (before 5.9). Only with the
/// `test-util` feature.
#[cfg(feature = "test-util")]
pub fn force_close_range_missing() {
    CLOSE_RANGE.store(MISSING, Ordering::Relaxed);
}

/// Closes every descriptor numbered `first` or higher. Post-fork safe: no allocation, no lock.
pub(crate) fn close_from(first: RawFd) -> Result<(), (&'static str, Errno)> {
    if CLOSE_RANGE.load(Ordering::Relaxed) != MISSING {
        // SAFETY: closes only descriptors >= first, which the caller has given up.
        let r = unsafe { libc::syscall(libc::SYS_close_range, first as u32, u32::MAX, 0u32) };
        if r == 0 {
            return Ok(());
        }
        let e = Errno::last();
        if e != Errno::ENOSYS {
            return Err(("close_range", e));
        }
        CLOSE_RANGE.store(MISSING, Ordering::Relaxed);
    }
    if close_listed(first).is_ok() {
        return Ok(());
    }
    close_every(first);
    Ok(())
}

/// A `getdents64` buffer, aligned for `struct linux_dirent64`.
#[repr(C, align(8))]
struct DirentBuf([u8; 2048]);

/// Closes every descriptor `>= first` listed in `/proc/self/fd` (except the listing's own).
/// Closing while listing is safe there: the directory's offsets are descriptor numbers.
pub(crate) fn close_listed(first: RawFd) -> Result<(), Errno> {
    // SAFETY: a NUL-terminated constant path; the fd is closed below.
    let dir = unsafe {
        libc::open(
            c"/proc/self/fd".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return Err(Errno::last());
    }
    let mut buf = DirentBuf([0; 2048]);
    let result = loop {
        // SAFETY: the kernel writes at most `buf.0.len()` bytes into the buffer we own.
        let n =
            unsafe { libc::syscall(libc::SYS_getdents64, dir, buf.0.as_mut_ptr(), buf.0.len()) };
        if n < 0 {
            break Err(Errno::last());
        }
        if n == 0 {
            break Ok(());
        }
        let filled = buf.0.get(..n.unsigned_abs() as usize).unwrap_or_default();
        let mut off = 0usize;
        // struct linux_dirent64: u64 d_ino, i64 d_off, u16 d_reclen, u8 d_type, char d_name[].
        while let Some(rec) = filled.get(off..) {
            let Some(&[lo, hi]) = rec.get(16..18) else {
                break;
            };
            let reclen = usize::from(u16::from_ne_bytes([lo, hi]));
            if reclen == 0 {
                break;
            }
            let fd = rec.get(19..reclen).and_then(parse_fd);
            if let Some(fd) = fd.filter(|&fd| fd >= first && fd != dir) {
                // SAFETY: the descriptor is one the caller gave up (>= first) and not ours.
                unsafe { libc::close(fd) };
            }
            off += reclen;
        }
    };
    // SAFETY: closing the directory we opened above.
    unsafe { libc::close(dir) };
    result
}

/// The number spelled by a NUL-terminated directory entry name (`.` and `..` are not).
fn parse_fd(name: &[u8]) -> Option<RawFd> {
    let mut fd: RawFd = 0;
    let mut digits = 0;
    for &b in name {
        match b {
            0 => break,
            b'0'..=b'9' => {
                fd = fd.checked_mul(10)?.checked_add(RawFd::from(b - b'0'))?;
                digits += 1;
            }
            _ => return None,
        }
    }
    (digits > 0).then_some(fd)
}

/// Closes every number from `first` up to the soft `RLIMIT_NOFILE` (no descriptor can be
/// opened above it; one opened before the limit was lowered would survive, which is why the
/// `/proc` listing comes first).
pub(crate) fn close_every(first: RawFd) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur.min(1 << 20)
    } else {
        1 << 20
    };
    let max = RawFd::try_from(max).unwrap_or(RawFd::MAX);
    for fd in first..max {
        // SAFETY: every descriptor >= first has been given up by the caller.
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Forks; the child opens fds 100 and 1000, runs `close` and exits 0 iff both are closed
    /// and fd 0 (below `first`) is not.
    fn closes_in_child(close: fn(RawFd)) {
        // SAFETY: the child runs only raw system calls and leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: raw descriptor calls in the forked child on descriptors it owns.
            unsafe {
                libc::dup2(0, 100);
                libc::dup2(0, 1000);
                close(5);
                let closed = |fd| libc::fcntl(fd, libc::F_GETFD) < 0;
                let ok = closed(100) && closed(1000) && !closed(0);
                libc::_exit(if ok { 0 } else { 1 });
            }
        }
        let mut status = 0;
        // SAFETY: waiting for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn proc_listing_closes_every_higher_fd() {
        closes_in_child(|first| close_listed(first).unwrap());
    }

    #[test]
    fn counting_up_to_the_limit_closes_every_higher_fd() {
        closes_in_child(close_every);
    }

    #[test]
    fn close_from_without_close_range_closes_every_higher_fd() {
        force_close_range_missing();
        closes_in_child(|first| close_from(first).unwrap());
        assert!(!close_range_supported());
    }

    #[test]
    fn parse_fd_reads_numbers_only() {
        assert_eq!(parse_fd(b"17\0"), Some(17));
        assert_eq!(parse_fd(b".\0"), None);
        assert_eq!(parse_fd(b"..\0"), None);
        assert_eq!(parse_fd(b"\0"), None);
    }
}
