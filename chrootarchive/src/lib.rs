//! Confined layer application: the front door every driver uses for `ApplyDiff`.
//!
//! Layer tarballs come from registries and users. [`apply_layer`] and [`untar`] have the
//! signatures and results of [`archive::apply_layer`] and [`archive::untar`], but the tar is
//! written by a forked child process that cannot reach the host even if the tar code has a bug:
//!
//! 1. The **parent** (the caller's thread) decompresses the input with [`archive::decompress`]
//!    — a layer never chooses a decompressor inside the confined child — creates two `O_CLOEXEC`
//!    pipes and forks (`nix::unistd::fork`).
//! 2. The **child** moves its pipe ends to fds 3 and 4 and closes every other fd, makes its own
//!    mount namespace (`unshare(CLONE_NEWNS)`), makes `/` a recursive slave, bind-mounts the
//!    target on itself, `pivot_root`s into it and detaches the old root (`chroot` where
//!    `pivot_root` is refused with `EINVAL`, e.g. on an initramfs root), changes to `/` and runs
//!    [`archive::apply_layer`] on `/`, reading the plain tar from the input pipe. Owners are
//!    numeric and nothing is loaded from the layer (no NSS, no decompressor, no exec).
//! 3. The parent streams the decompressed input into the pipe (enlarged to 256 KiB) in 128 KiB
//!    chunks while the child writes, so memory stays bounded for any layer size. The child
//!    writes one result message (bytes applied and entries skipped, or the [`archive::Error`]
//!    with its entry name, path and errno, see `protocol`) to the second pipe and leaves with `_exit`. The parent reads it, reaps the
//!    child and rebuilds an equal error.
//!
//! Without root the child first enters a user namespace that maps the caller's uid and gid to
//! 0 (as rootless container engines do): the mount steps then work inside it, and every entry is
//! owned by the caller (`same_owner` is forced off; char and block devices cannot be created
//! there and are skipped and reported, see [`apply_layer_report`]). If the
//! confinement cannot be set up (unprivileged user namespaces disabled, no mount namespaces), the
//! result is [`Error::Confinement`] naming the step; the layer is never applied
//! unconfined.
//!
//! # Failure modes
//!
//! * A child that dies (signal, kernel OOM kill, abort, panic) gives
//!   [`Error::ChildDied`] saying how it ended (`"was killed by signal SIGKILL"`,
//!   `"panicked: …"`). The parent never hangs on it: a dead child's pipe ends are closed, so
//!   the parent's write gets `EPIPE` and its read gets end-of-file; the child is always reaped
//!   (also when the caller's reader panics: a guard kills and reaps it), so no zombie is left.
//! * On any error the target is left partially applied, for the caller to discard.
//! * The child closes its input before it writes its result, so neither side can wait for the
//!   other however large the result is. The parent ignores `SIGPIPE` for the duration of the
//!   copy in its own thread (blocked and any pending instance consumed) when the process has
//!   not already set it to ignored, as Rust binaries and the test harness do.
//!
//! # Forking from a multi-threaded process
//!
//! The rules the child obeys — fds closed first, no stdout/stderr/env/logging/panic-hook, panics
//! reported without unwinding, `_exit`, allocation only because glibc's malloc is fork-safe,
//! `unshare` only in the single-threaded child — are written down next to the code that obeys
//! them, in `src/child.rs`. They bind `archive`'s apply path too, which documents the same
//! invariant. Two consequences for users of this crate:
//!
//! * **Panic hook.** Before its first fork this crate installs, once, a panic hook that wraps
//!   the existing one: it behaves exactly like the previous hook everywhere except in a
//!   confined child. An application that calls [`std::panic::set_hook`] *later* replaces it;
//!   a panic in the child (a bug: the apply path is panic-free on every input) might then hang
//!   on the stderr lock.
//! * **Allocator.** The child allocates, which is safe with glibc's malloc (its `atfork`
//!   handlers). A different `#[global_allocator]` or a musl build voids this; those builds must
//!   use a fork+exec design instead.
//! * **Cost.** `fork` copies the parent's page tables, so its cost grows with the caller's
//!   resident memory: about 0.5 ms at small RSS, ~30 ms at 512 MiB, ~110 ms at 2 GiB (measured
//!   with prototypes on these machines). `benches/confined.rs` reports it next to the apply:
//!   on a loaded 2-core machine, a 20-file layer took 6.7 ms in process and 8.7 ms confined
//!   (bare fork+exit+wait 0.8 ms); with 512 MiB more resident memory the bare fork took 45 ms
//!   and the confined apply 67 ms. Small next to applying a real layer, but a daemon with a
//!   huge heap pays it per layer.
//!
//! The bare fork (rather than moby's fork+exec of the current executable) is used because the
//! rules above made it reliable in measurement: the stress test runs 400 concurrent applies
//! among printing, logging, environment-reading and allocating threads without a hang, while
//! the same test hangs every time when the child is made to print or read the environment.

#![deny(missing_docs)]

mod child;
mod error;
mod fds;
mod protocol;

use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use archive::{ApplyOptions, ApplyReport, TarOptions};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pipe2};

pub use error::{Error, Result};
pub use fds::close_range_supported;
#[cfg(feature = "test-util")]
pub use fds::force_close_range_missing;
#[cfg(feature = "test-util")]
pub use protocol::ConfinedBy;
#[cfg(not(feature = "test-util"))]
use protocol::ConfinedBy;
use protocol::{MAX_MESSAGE, Message};

/// Applies the layer tar read from `reader` (compressed or not) onto the directory `dest`, in a
/// confined child process.
///
/// Same contract and results as [`archive::apply_layer`]: returns the number of regular-file
/// content bytes written, or the [`archive::Error`] the apply produced, rebuilt in the caller
/// ([`Error::Archive`]), which is also where an `UnknownFormat` or `Io` error from
/// decompressing in the caller lands. Additionally:
/// [`Error::Confinement`] when the child cannot be confined (never applied unconfined), and
/// [`Error::ChildDied`] when the child ends without a result. On error `dest` is left partially
/// applied for the caller to discard.
///
/// Entries the child skipped (device nodes it may not create, see
/// [`archive::apply_layer_report`]) are added to this thread's skipped list, which
/// [`archive::take_skipped`] returns; [`apply_layer_report`] returns them instead. Without root
/// the child applies in a user namespace, where char and block devices are always skipped
/// (char 0/0 entries are whiteouts, see [`archive::apply_layer`]).
pub fn apply_layer(dest: &Path, reader: impl Read, opts: &ApplyOptions) -> Result<u64> {
    let (report, _) = run(dest, reader, &Job::Apply(opts), &TestFault::None)?;
    archive::note_skipped(report.skipped, report.skipped_count);
    Ok(report.bytes)
}

/// [`apply_layer`], returning what the confined child skipped along with the byte count, as
/// [`archive::apply_layer_report`] does in process (this thread's skipped list is left alone).
pub fn apply_layer_report(
    dest: &Path,
    reader: impl Read,
    opts: &ApplyOptions,
) -> Result<ApplyReport> {
    run(dest, reader, &Job::Apply(opts), &TestFault::None).map(|(report, _)| report)
}

/// Extracts the tar read from `reader` (compressed or not) into `dest` without whiteout
/// semantics, in a confined child process.
///
/// Same contract and results as [`archive::untar`], with the additional errors of
/// [`apply_layer`].
pub fn untar(dest: &Path, reader: impl Read, opts: &TarOptions) -> Result<()> {
    let (report, _) = run(dest, reader, &Job::Untar(opts), &TestFault::None)?;
    archive::note_skipped(report.skipped, report.skipped_count);
    Ok(())
}

/// The fault hooks' vocabulary; public (as [`TestFault`]) only with the `test-util` feature.
mod fault {
    /// Test hook: makes the confined child misbehave after it confined itself (public only with
    /// the `test-util` feature).
    #[derive(Clone, Debug, PartialEq, Eq)]
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    pub enum TestFault {
        /// Behave normally.
        None,
        /// Raise `SIGKILL` in the child.
        KillChild,
        /// Panic in the child.
        PanicChild,
        /// `_exit(3)` in the child without reporting anything.
        ExitChild,
        /// Simulate a tar-code bug: before applying, write to this absolute host path directly and
        /// through `../` climbing, ignoring errors. Confinement must make those writes land inside
        /// the target.
        WriteHostPath(std::path::PathBuf),
    }
}
#[cfg(feature = "test-util")]
pub use fault::TestFault;
#[cfg(not(feature = "test-util"))]
use fault::TestFault;

/// Test hook: [`apply_layer`] with a fault injected into the child, also reporting how the
/// child confined itself. Only with the `test-util` feature.
#[cfg(feature = "test-util")]
pub fn apply_layer_with_fault(
    dest: &Path,
    reader: impl Read,
    opts: &ApplyOptions,
    fault: TestFault,
) -> Result<(u64, ConfinedBy)> {
    run(dest, reader, &Job::Apply(opts), &fault).map(|(report, by)| (report.bytes, by))
}

/// What the child runs.
pub(crate) enum Job<'a> {
    /// [`archive::apply_layer`].
    Apply(&'a ApplyOptions),
    /// [`archive::untar`].
    Untar(&'a TarOptions),
}

/// Chunk size of the copy into the input pipe (bounds the parent's memory).
const CHUNK: usize = 128 << 10;

/// The input pipe's capacity we ask for (`F_SETPIPE_SZ`; the default is 64 KiB): fewer
/// wake-ups of either side per byte. A refusal (a lower `pipe-max-size`) keeps the default.
const PIPE_SIZE: libc::c_int = 256 << 10;

fn confinement_err(step: &str, errno: Errno) -> Error {
    Error::Confinement {
        step: step.to_owned(),
        source: io::Error::from_raw_os_error(errno as i32),
    }
}

/// The parent side of one confined job.
fn run(
    dest: &Path,
    reader: impl Read,
    job: &Job<'_>,
    fault: &TestFault,
) -> Result<(ApplyReport, ConfinedBy)> {
    // Everything the child needs is prepared here, before the fork.
    let abs = fs::canonicalize(dest).map_err(|e| Error::io("canonicalize", dest, e))?;
    let meta = fs::metadata(&abs).map_err(|e| Error::io("stat", dest, e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            "open",
            dest,
            io::Error::from_raw_os_error(libc::ENOTDIR),
        ));
    }
    let dest_c = CString::new(abs.as_os_str().as_bytes())
        .map_err(|_| Error::io("open", dest, io::Error::from_raw_os_error(libc::EINVAL)))?;
    // Decompression happens here, in the trusted process.
    let mut input = archive::decompress(reader)?;
    let mut buf = vec![0u8; CHUNK];
    install_panic_hook();
    probe_kernel();

    let (in_r, in_w) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| confinement_err("create the input pipe", e))?;
    // SAFETY: fcntl on a pipe fd we own; F_SETPIPE_SZ only changes its capacity.
    let _ = unsafe { libc::fcntl(in_w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    let (res_r, res_w) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| confinement_err("create the result pipe", e))?;

    // SAFETY: after fork the child runs only `child::run`, which never returns and obeys the
    // post-fork rules documented in `child.rs`: it first closes every fd but its two pipe ends,
    // never touches stdout/stderr, the environment, logging or the panic machinery's default
    // hook, allocates only through glibc's fork-safe malloc, and leaves with `_exit`.
    let pid = match unsafe { fork() } {
        Err(e) => return Err(confinement_err("fork", e)),
        Ok(ForkResult::Child) => {
            child::run(in_r.as_raw_fd(), res_w.as_raw_fd(), &dest_c, job, fault)
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    let mut guard = ChildGuard { pid, reaped: false };
    drop(in_r);
    drop(res_w);

    let fed = {
        let _sigpipe = SigpipeGuard::new();
        feed(&mut input, in_w, &mut buf)
    };
    if let Feed::ReadFailed(e) = fed {
        // The input broke: whatever the child made of a truncated stream is not the answer.
        guard.kill_and_reap();
        return Err(archive::Error::Stream {
            op: "read".into(),
            source: e,
        }
        .into());
    }
    let raw = read_result(res_r);
    let status = match guard.reap() {
        Ok(status) => Some(status),
        // Auto-reaped (the process ignores SIGCHLD): the message alone has to tell.
        Err(Errno::ECHILD) => None,
        Err(e) => return Err(confinement_err("wait for the apply process", e)),
    };
    let outcome = interpret(raw, status)?;
    if let Feed::WriteFailed(e) = fed {
        return Err(confinement_err("write to the apply process", e));
    }
    if matches!(fed, Feed::ChildStopped) {
        // The child finished without reading everything (it drains padding itself, so this is
        // only a safety net): consume the rest so a digesting reader sees the whole stream.
        io::copy(
            &mut (&mut input).take(archive::MAX_TRAILING),
            &mut io::sink(),
        )
        .map_err(|e| archive::Error::Stream {
            op: "read".into(),
            source: e,
        })?;
    }
    Ok(outcome)
}

/// How copying the input into the pipe ended.
#[derive(Debug)]
enum Feed {
    /// All input written and the pipe closed.
    Eof,
    /// The child closed its end (`EPIPE`): it finished or failed; its result says which.
    ChildStopped,
    /// Reading the caller's input failed.
    ReadFailed(io::Error),
    /// Writing to the pipe failed with something other than `EPIPE`.
    WriteFailed(Errno),
}

fn feed(input: &mut dyn Read, pipe: OwnedFd, buf: &mut [u8]) -> Feed {
    loop {
        let n = match input.read(buf) {
            Ok(0) => return Feed::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Feed::ReadFailed(e),
        };
        let mut chunk = buf.get(..n).unwrap_or_default();
        while !chunk.is_empty() {
            match nix::unistd::write(&pipe, chunk) {
                Ok(w) => chunk = chunk.get(w..).unwrap_or_default(),
                Err(Errno::EINTR) => {}
                Err(Errno::EPIPE) => return Feed::ChildStopped,
                Err(e) => return Feed::WriteFailed(e),
            }
        }
    }
}

/// Reads the child's result until end-of-file (the child exited or closed it), keeping at most
/// [`MAX_MESSAGE`] + 1 bytes so an oversized message is detected, not buffered.
fn read_result(pipe: OwnedFd) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    fs::File::from(pipe)
        .take(MAX_MESSAGE as u64 + 1)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// Turns the child's message and exit status (`None`: not available) into the job's result.
fn interpret(
    raw: io::Result<Vec<u8>>,
    status: Option<WaitStatus>,
) -> Result<(ApplyReport, ConfinedBy)> {
    let msg = match raw {
        Ok(raw) if raw.is_empty() => None,
        Ok(raw) if raw.len() > MAX_MESSAGE => Some(Err(format!(
            "expected a result of at most {MAX_MESSAGE} bytes, found more"
        ))),
        Ok(raw) => Some(protocol::decode(&raw)),
        Err(e) => Some(Err(format!("reading the result pipe failed: {e}"))),
    };
    let died = |how: String| Err(Error::ChildDied { how });
    match (status, msg) {
        (_, Some(Ok(Message::Panicked(m)))) => died(format!("panicked: {m}")),
        (Some(WaitStatus::Signaled(_, sig, core)), _) => died(format!(
            "was killed by signal {}{}",
            sig.as_str(),
            if core { " (core dumped)" } else { "" }
        )),
        (
            Some(WaitStatus::Exited(_, 0)) | None,
            Some(Ok(Message::Ok {
                bytes,
                skipped,
                skipped_count,
                by,
            })),
        ) => {
            let mut report = ApplyReport::new(bytes);
            report.skipped = skipped;
            report.skipped_count = skipped_count;
            Ok((report, by))
        }
        (Some(WaitStatus::Exited(_, 0)) | None, Some(Ok(Message::Err(e)))) => Err(e),
        (_, Some(Err(reason))) => died(format!("sent a malformed result: {reason}")),
        (Some(WaitStatus::Exited(_, code)), Some(Ok(Message::Err(e)))) => {
            died(format!("exited with status {code} after reporting: {e}"))
        }
        (Some(WaitStatus::Exited(_, code)), _) => died(format!(
            "exited with status {code} without reporting a result"
        )),
        (None, _) => {
            died("ended without reporting a result (its exit status was not available)".to_owned())
        }
        (Some(other), _) => died(format!("ended in an unexpected state: {other:?}")),
    }
}

/// Owns the child until it is reaped: dropping it unreaped (an early return, or the caller's
/// reader panicking mid-copy) kills the child and waits for it, so no zombie is left.
struct ChildGuard {
    pid: Pid,
    reaped: bool,
}

impl ChildGuard {
    /// Waits for the child to end (retrying on `EINTR`).
    fn reap(&mut self) -> std::result::Result<WaitStatus, Errno> {
        loop {
            match waitpid(self.pid, None) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    self.reaped = true;
                    return Ok(s);
                }
                // Stopped/continued are only reported with flags we do not pass; keep waiting.
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    // ECHILD: someone else reaped it (a SIGCHLD=SIG_IGN process); nothing to do.
                    self.reaped = true;
                    return Err(e);
                }
            }
        }
    }

    /// Kills the child (it is ours and not yet reaped, so the pid cannot have been reused) and
    /// reaps it.
    fn kill_and_reap(&mut self) {
        if !self.reaped {
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = self.reap();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// Keeps a write to a pipe whose reader died from killing the process with `SIGPIPE`.
///
/// When `SIGPIPE` is already ignored (Rust binaries, the test harness) this does nothing.
/// Otherwise it blocks `SIGPIPE` in the calling thread for the copy — the signal a failed write
/// raises is thread-directed, so it stays pending instead of being delivered and the write
/// returns `EPIPE` — and on drop consumes a pending instance it caused before restoring the
/// thread's mask.
struct SigpipeGuard {
    /// The thread's mask before, and whether SIGPIPE was pending then; `None` when inactive.
    saved: Option<(SigSet, bool)>,
}

impl SigpipeGuard {
    fn new() -> Self {
        let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
        // SAFETY: querying (not changing) the disposition into a zeroed, writable sigaction.
        let rc = unsafe { libc::sigaction(libc::SIGPIPE, std::ptr::null(), old.as_mut_ptr()) };
        // SAFETY: `sigaction` succeeded (or the struct is still the zeroed, valid value).
        let old = unsafe { old.assume_init() };
        if rc == 0 && old.sa_sigaction == libc::SIG_IGN {
            return SigpipeGuard { saved: None };
        }
        let mut block = SigSet::empty();
        block.add(Signal::SIGPIPE);
        let pending_before = sigpipe_pending();
        match block.thread_swap_mask(SigmaskHow::SIG_BLOCK) {
            Ok(mask) => SigpipeGuard {
                saved: Some((mask, pending_before)),
            },
            Err(_) => SigpipeGuard { saved: None },
        }
    }
}

fn sigpipe_pending() -> bool {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: `set` is a valid, writable sigset_t; on success it is initialised.
    unsafe {
        libc::sigpending(set.as_mut_ptr()) == 0
            && libc::sigismember(set.as_ptr(), libc::SIGPIPE) == 1
    }
}

impl Drop for SigpipeGuard {
    fn drop(&mut self) {
        let Some((mask, pending_before)) = self.saved.take() else {
            return;
        };
        if !pending_before && !mask.contains(Signal::SIGPIPE) && sigpipe_pending() {
            let mut set = SigSet::empty();
            set.add(Signal::SIGPIPE);
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: valid sigset and timespec; consumes the pending SIGPIPE our write raised.
            unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &zero) };
        }
        let _ = mask.thread_set_mask();
    }
}

/// Whether the wrapping panic hook is installed (once per process).
static HOOK_INSTALLED: AtomicBool = AtomicBool::new(false);

/// Installs, once, a panic hook that reports a panic in a confined child over the result pipe
/// and `_exit`s without unwinding, and delegates to the previous hook everywhere else. See
/// `child.rs`, rule 3.
/// Every system call the confined apply has a fallback for: `close_range` (the child's fd
/// cleanup) and those of [`archive::fs::fallbacks`]. Each is probed without effect and the
/// answer recorded; the confined child inherits the parent's answers, so what this reports is
/// what the next apply's child uses. Serves `graphctl status`.
pub fn fallbacks() -> Vec<archive::fs::Fallback> {
    let mut all = archive::fs::fallbacks();
    all.push(archive::fs::Fallback {
        call: "close_range",
        since: "5.9",
        available: close_range_supported(),
        instead: "closing each fd listed in /proc/self/fd (before confinement), one by one",
    });
    all
}

/// Asks the kernel, once per process and before the first fork, which system calls with a
/// fallback it lacks (`close_range`, `openat2`, the `*xattrat` calls, `fchmodat2`), so that
/// every child inherits the answers and goes straight to the fallback instead of each
/// learning it again from an `ENOSYS`.
fn probe_kernel() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        fds::close_range_supported();
        archive::fs::fallbacks();
    });
}

fn install_panic_hook() {
    if std::thread::panicking() || HOOK_INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if child::IN_CONFINED_CHILD.load(Ordering::SeqCst) {
            let payload = info.payload();
            let msg = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_owned()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "a panic with a non-string payload".to_owned()
            };
            let msg = match info.location() {
                Some(l) => format!("{msg} at {}:{}", l.file(), l.line()),
                None => msg,
            };
            child::panicked(msg);
        }
        previous(info);
    }));
}
