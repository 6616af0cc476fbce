//! The code that runs in the forked child.
//!
//! # Post-fork rules (the invariant of everything in this module and everything it calls)
//!
//! The caller is normally multi-threaded (a daemon, a test harness). `fork` copies only the
//! calling thread; every lock another thread held at that instant stays locked forever in the
//! child. Measured on these machines (glibc 2.36) with prototypes, and obeyed here:
//!
//! 1. **Descriptors first.** Another thread may have created its own pipes at the moment we
//!    forked; a child that keeps those ends open keeps another apply's pipe alive and deadlocks
//!    it (5 % of 800 concurrent applies). The first thing [`run`] does is move its two pipe ends
//!    to fds 3 and 4, `close_range(5, ~0)` everything else (before Linux 5.9: close each fd
//!    listed in `/proc/self/fd`, without allocating, see `crate::fds`) and point 0–2 at
//!    `/dev/null` (so a stray write to stderr can never land in a layer file opened on fd 2). The parent creates
//!    every pipe `O_CLOEXEC` so fork+exec users elsewhere in the process never inherit them.
//! 2. **No std locks.** No `print!`, `eprintln!`, `std::io::stdout/stderr`, `std::env`, no
//!    logging (`tracing` subscribers take locks), no `set_hook`/`take_hook`. Another thread
//!    holding the stdout lock at fork time hung 98 % of children that printed. Errors travel as
//!    data over the result pipe ([`crate::protocol`]); the child leaves with `_exit`, never
//!    through `exit`/destructors/atexit handlers.
//! 3. **Panics.** Rust runs the panic hook *before* unwinding, and the default hook reads
//!    `RUST_BACKTRACE` (env lock) and writes to stderr (stderr lock, or the test harness's
//!    capture mutex) — exactly the hazard of rule 2. So a panic must never reach the default
//!    hook in the child. Our choice: the parent installs, once and before its first fork, a
//!    wrapping panic hook (`crate::install_panic_hook`) that delegates to the previous hook in
//!    every process except a confined child; in the child (recognised by a static flag set
//!    right after fork, so only the child's copy of memory sees it) it closes the input pipe,
//!    writes a `Panicked` message to the result pipe and `_exit`s without unwinding. The child
//!    code itself is written panic-free (no unwrap, no indexing that can fail), and
//!    `archive::apply_layer` promises to turn every bad input into an `Error`. `catch_unwind`
//!    around the job remains as a second line for the case where the application replaced
//!    the hook after us; in that case the replaced hook runs in the child and may hang on a
//!    lock — documented, unavoidable without the unstable `always_abort`.
//! 4. **Allocation is fine with glibc.** glibc's malloc takes all arena locks in its own
//!    `atfork` handlers and resets them in the child, so `Vec`, `String` and `format!` are safe
//!    here. Another `#[global_allocator]` (jemalloc, mimalloc) or a musl build voids this
//!    guarantee; such builds must switch to the fork+exec design (re-exec the current
//!    executable, as moby does).
//! 5. **Namespaces only here.** `unshare(CLONE_NEWNS)` affects the calling thread only; doing
//!    it in the single-threaded child is the only way to confine the apply without touching
//!    the caller's threads.
//! 6. **Nothing from the layer is loaded.** No NSS lookups (owners are numeric), no
//!    decompressor (the parent decompresses), no `dlopen`, no exec.
//!
//! 7. **The child dies with its caller.** `PR_SET_PDEATHSIG(SIGKILL)` is requested first thing,
//!    so a killed caller (a SIGKILLed `graphctl apply`) never leaves a child writing into a layer
//!    that the next process's recovery deletes. The signal follows the *thread* that forked;
//!    that thread blocks in `apply_layer` until the child is reaped, so it cannot end first.
//!
//! `archive`'s apply path (`apply_layer`, `untar` and everything they call) is bound by rules
//! 2, 3 and 6 too: it never logs, prints, reads the environment or panics on input. The stress
//! test in `tests/stress.rs` runs 400 confined applies while other threads print, log through
//! an installed `tracing` subscriber, read the environment and allocate.

use std::ffi::CStr;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::Error;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{chdir, chroot, pivot_root};

use crate::protocol::{ConfinedBy, Message, encode};
use crate::{Job, TestFault};

/// The fd the child reads the plain tar from.
pub(crate) const INPUT_FD: RawFd = 3;
/// The fd the child writes its one result message to.
pub(crate) const RESULT_FD: RawFd = 4;

/// The first fd of the lower directories an overlay apply keeps ([`ApplyOptions::link_lowers`]).
///
/// [`ApplyOptions::link_lowers`]: archive::ApplyOptions::link_lowers
pub(crate) const LOWERS_FD: RawFd = 5;

/// Set in the child right after fork; the parent's copy stays `false` forever.
pub(crate) static IN_CONFINED_CHILD: AtomicBool = AtomicBool::new(false);

/// Exit status when the parent died before the child could tie its life to the parent's.
const EXIT_PARENT_GONE: i32 = 121;

/// Exit status when even the result pipe could not be set up.
const EXIT_NO_RESULT_PIPE: i32 = 120;

/// The child's whole life. Never returns.
pub(crate) fn run(input: RawFd, result: RawFd, dest: &CStr, job: &Job<'_>, fault: &TestFault) -> ! {
    IN_CONFINED_CHILD.store(true, Ordering::SeqCst);
    // The child has one thread: before Linux 6.13, xattrs of symlinks and special files may be
    // set after an fchdir into their directory, which needs no /proc (gone after pivot_root).
    archive::fs::declare_single_threaded();
    // If the caller dies (SIGKILL of a graphctl apply), the child must not go on writing into a
    // layer that recovery is about to delete: the kernel kills it with its parent. The second
    // getppid closes the window in which the parent died before the request was made.
    let parent = nix::unistd::getppid();
    if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err()
        || nix::unistd::getppid() != parent
    {
        exit(EXIT_PARENT_GONE);
    }
    // The lowers of an overlay apply stay open (read-only, for hardlink copy-up) at 5, 6, ….
    let lowers: Vec<RawFd> = match job {
        Job::Apply(opts) => opts.link_lowers.iter().map(|fd| fd.as_raw_fd()).collect(),
        Job::Untar(_) => Vec::new(),
    };
    if let Err((step, errno)) = setup_fds(input, result, &lowers) {
        // The fds may be half moved; try the original result end, then give up.
        let e = confinement(step, errno);
        write_all(result, &encode(&Message::Err(e)));
        exit(EXIT_NO_RESULT_PIPE);
    }
    let msg = match catch_unwind(AssertUnwindSafe(|| confine_and_run(dest, job, fault))) {
        Ok(Ok((report, by))) => Message::Ok {
            bytes: report.bytes,
            skipped: report.skipped,
            skipped_count: report.skipped_count,
            by,
        },
        Ok(Err(e)) => Message::Err(e),
        Err(payload) => Message::Panicked(payload_message(payload.as_ref())),
    };
    finish(&msg)
}

/// Closes the input (so a parent blocked writing gets `EPIPE` instead of waiting for a child
/// that waits for it), writes `msg` to the result pipe and exits.
fn finish(msg: &Message) -> ! {
    close(INPUT_FD);
    write_all(RESULT_FD, &encode(msg));
    exit(0)
}

/// Called from the panic hook in the child: report and leave without unwinding.
pub(crate) fn panicked(message: String) -> ! {
    finish(&Message::Panicked(message))
}

fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

/// Rule 1: pipe ends to 3 and 4, the `lowers` to 5, 6, … (see [`LOWERS_FD`]), everything else
/// closed, 0–2 on `/dev/null`.
fn setup_fds(input: RawFd, result: RawFd, lowers: &[RawFd]) -> Result<(), (&'static str, Errno)> {
    let first_free = LOWERS_FD + lowers.len() as RawFd;
    // SAFETY: plain fd syscalls on fds this process owns; F_DUPFD never clobbers an open fd.
    unsafe {
        let in_hi = libc::fcntl(input, libc::F_DUPFD, first_free);
        if in_hi < 0 {
            return Err(("duplicate the input pipe", Errno::last()));
        }
        let out_hi = libc::fcntl(result, libc::F_DUPFD, first_free);
        if out_hi < 0 {
            return Err(("duplicate the result pipe", Errno::last()));
        }
        let mut lowers_hi = Vec::with_capacity(lowers.len());
        for &fd in lowers {
            let hi = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, first_free);
            if hi < 0 {
                return Err(("duplicate a lower directory", Errno::last()));
            }
            lowers_hi.push(hi);
        }
        // Every copy is >= first_free, so these dup2s cannot close each other's source.
        if libc::dup2(in_hi, INPUT_FD) < 0 {
            return Err(("move the input pipe to fd 3", Errno::last()));
        }
        if libc::dup2(out_hi, RESULT_FD) < 0 {
            return Err(("move the result pipe to fd 4", Errno::last()));
        }
        for (i, hi) in lowers_hi.into_iter().enumerate() {
            if libc::dup2(hi, LOWERS_FD + i as RawFd) < 0 {
                return Err(("move a lower directory into place", Errno::last()));
            }
        }
        // close_range (5.9), or a listing of /proc/self/fd before 5.9: see `fds`.
        crate::fds::close_from(first_free)?;
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null < 0 {
            return Err(("open /dev/null", Errno::last()));
        }
        for fd in 0..3 {
            if libc::dup2(null, fd) < 0 {
                return Err(("point fds 0-2 at /dev/null", Errno::last()));
            }
        }
        if null > 2 {
            libc::close(null);
        }
    }
    Ok(())
}

fn confinement(step: &str, errno: Errno) -> Error {
    Error::Confinement {
        step: step.to_owned(),
        source: io::Error::from_raw_os_error(errno as i32),
    }
}

fn step<T>(name: &'static str, r: nix::Result<T>) -> Result<T, Error> {
    r.map_err(|errno| confinement(name, errno))
}

/// Confines the process to `dest` and runs the job on the pipe.
fn confine_and_run(
    dest: &CStr,
    job: &Job<'_>,
    fault: &TestFault,
) -> Result<(archive::ApplyReport, ConfinedBy), Error> {
    let ran_as_root = nix::unistd::geteuid().is_root();
    let by = confine(dest)?;
    match fault {
        TestFault::None => {}
        TestFault::KillChild => {
            // SAFETY: raising a signal in our own process.
            unsafe { libc::raise(libc::SIGKILL) };
        }
        TestFault::PanicChild => panic!("chrootarchive test hook: panic in the confined child"),
        TestFault::ExitChild => exit(3),
        TestFault::WriteHostPath(path) => {
            let _ = std::fs::write(path, b"escaped");
            let mut up = std::path::PathBuf::from("../../../../../../../..");
            up.push(path.strip_prefix("/").unwrap_or(path));
            let _ = std::fs::write(up, b"escaped");
        }
    }
    let reader = PipeReader(INPUT_FD);
    let root = Path::new("/");
    // The `_report` variants: they return what was skipped (device nodes in a user namespace)
    // instead of keeping it in thread-local state, which the child must not touch.
    let report = match job {
        Job::Apply(opts) => {
            let mut opts = (*opts).clone();
            if !ran_as_root {
                // In a user namespace only the caller's own ids are mapped: keep the caller as
                // the owner of everything, as rootless engines do.
                opts.same_owner = false;
            }
            // The parent's descriptors were moved; the clone names the child's. Replacing the
            // clone's copies only drops references: the originals stay with `job`.
            opts.link_lowers = (0..opts.link_lowers.len())
                .map(|i| {
                    // SAFETY: `setup_fds` put the lowers at LOWERS_FD.. and nothing else owns
                    // them in this single-threaded child; each is wrapped exactly once.
                    Arc::new(unsafe { OwnedFd::from_raw_fd(LOWERS_FD + i as RawFd) })
                })
                .collect();
            archive::apply_layer_report(root, reader, &opts)?
        }
        Job::Untar(opts) => {
            let mut report = archive::untar_report(root, reader, opts)?;
            report.bytes = 0;
            report
        }
    };
    Ok((report, by))
}

/// moby's sequence (2016): own mount namespace, `/` rslave, bind the target on itself,
/// `pivot_root` into it and detach the old root; `chroot` where `pivot_root` is refused.
///
/// Without root, the child first enters a new user namespace in which the caller's uid and gid
/// are mapped to 0 (what rootless container engines do); that namespace grants the mount
/// privileges the steps below need, confined to the child. Owners cannot be preserved there
/// (see [`confine_and_run`]).
fn confine(dest: &CStr) -> Result<ConfinedBy, Error> {
    const NONE: Option<&CStr> = None;
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    if uid.is_root() {
        step("unshare(CLONE_NEWNS)", unshare(CloneFlags::CLONE_NEWNS))?;
    } else {
        step(
            "unshare(CLONE_NEWUSER | CLONE_NEWNS) (unprivileged user namespaces may be disabled)",
            unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS),
        )?;
        write_proc(
            "write /proc/self/setgroups",
            c"/proc/self/setgroups",
            b"deny",
        )?;
        write_proc(
            "write /proc/self/uid_map",
            c"/proc/self/uid_map",
            format!("0 {uid} 1").as_bytes(),
        )?;
        write_proc(
            "write /proc/self/gid_map",
            c"/proc/self/gid_map",
            format!("0 {gid} 1").as_bytes(),
        )?;
    }
    // Nothing we do below may propagate back to the host's mounts.
    step(
        "make / a recursive slave mount",
        mount(NONE, c"/", NONE, MsFlags::MS_REC | MsFlags::MS_SLAVE, NONE),
    )?;
    // pivot_root needs the new root to be a mount point.
    step(
        "bind-mount the target on itself",
        mount(
            Some(dest),
            dest,
            NONE,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            NONE,
        ),
    )?;
    // Enter the bind mount (not the directory under it).
    step("chdir into the target", chdir(dest))?;
    let by = match pivot_root(c".", c".") {
        Ok(()) => {
            // The old root is now stacked on "."; detach it so nothing of the host remains.
            step("detach the old root", umount2(c".", MntFlags::MNT_DETACH))?;
            ConfinedBy::PivotRoot
        }
        Err(Errno::EINVAL) => {
            // Refused, e.g. when / is the initramfs rootfs: fall back to chroot.
            step("chroot into the target", chroot(c"."))?;
            ConfinedBy::Chroot
        }
        Err(e) => return Err(confinement("pivot_root", e)),
    };
    step("chdir to the new root", chdir(c"/"))?;
    Ok(by)
}

/// Writes `data` to a `/proc/self` control file with raw calls (no std locks; see rule 2).
fn write_proc(name: &'static str, path: &CStr, data: &[u8]) -> Result<(), Error> {
    let fd = step(
        name,
        nix::fcntl::open(
            path,
            nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ),
    )?;
    let written = step(name, nix::unistd::write(&fd, data));
    drop(fd);
    match written? {
        n if n == data.len() => Ok(()),
        _ => Err(confinement(name, Errno::EIO)),
    }
}

/// Reads the input pipe with raw `read(2)`: no buffering, no locks, never closes the fd.
struct PipeReader(RawFd);

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is a valid writable slice of `buf.len()` bytes.
            let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n.unsigned_abs());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn close(fd: RawFd) {
    // SAFETY: closing an fd this process owns and never uses again.
    unsafe { libc::close(fd) };
}

fn write_all(fd: RawFd, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid readable slice of `buf.len()` bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n > 0 {
            buf = buf.get(n.unsigned_abs()..).unwrap_or_default();
        } else if n == 0 || Errno::last() != Errno::EINTR {
            // The parent went away; nobody is left to tell.
            return;
        }
    }
}

fn exit(code: i32) -> ! {
    // SAFETY: `_exit` ends the process at once, skipping atexit handlers and destructors that
    // might take locks copied in a locked state (rule 2).
    unsafe { libc::_exit(code) }
}
