//! Opening directories and files relative to a directory descriptor, never following symlinks.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, Stat};

/// Flags of every directory open: read-only, must be a directory, never a symlink.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Flags of every file open for its content: a FIFO swapped in cannot block the open or the
/// reads, a terminal cannot become the controlling one, a symlink is not followed.
const FILE_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// Cleared after the first `ENOSYS` from `openat2` (kernels before 5.6, or a seccomp profile
/// that answers like one): later calls go straight to the component walk.
static OPENAT2: AtomicBool = AtomicBool::new(true);

/// Whether [`open_beneath`] (and the apply's path resolution) use `openat2` (`false` once the
/// kernel answered `ENOSYS`).
pub fn openat2_supported() -> bool {
    OPENAT2.load(Ordering::Relaxed)
}

/// Records that the kernel answered `ENOSYS` for `openat2`: every later call walks instead.
pub fn note_openat2_missing() {
    OPENAT2.store(false, Ordering::Relaxed);
}

/// Probes, without effect, whether the kernel has `openat2` (Linux 5.6): on descriptor -1 it
/// fails with `EBADF` where it exists and `ENOSYS` where not. Records the answer.
pub fn probe_openat2() -> bool {
    // struct open_how: flags, mode, resolve (all u64), zeroed.
    let how = [0u64; 3];
    // SAFETY: a NUL-terminated constant path and a live, correctly sized `struct open_how`;
    // the call fails on the bad descriptor before opening anything.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            -1,
            c"x".as_ptr(),
            how.as_ptr(),
            std::mem::size_of_val(&how),
        )
    };
    if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        note_openat2_missing();
    }
    openat2_supported()
}

/// The error for an entry that changed between being listed and being opened (a swapped
/// directory, a file replaced by a device, FIFO or symlink): `ErrorKind::Other` with a message
/// saying so. Readers treat it like any I/O error: the operation fails, nothing is read.
#[cold]
pub fn changed_during_walk(expected: FileType, found: FileType) -> io::Error {
    io::Error::other(format!(
        "changed while being read (listed as {}, found {})",
        describe(expected),
        describe(found)
    ))
}

/// The error for a directory that is no longer where a walk left it (`..` of its child is
/// another directory): the walk stops instead of continuing somewhere else.
#[cold]
pub(crate) fn moved_during_walk() -> io::Error {
    io::Error::other("a directory was moved while the tree was being read")
}

/// What a file of type `ft` is called in messages: "a regular file", "a symlink", …
pub fn describe(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "a file of unknown type",
    }
}

/// Whether two stats name the same inode (device and inode number) of the same type.
pub fn same_inode(a: &Stat, b: &Stat) -> bool {
    a.st_dev == b.st_dev
        && a.st_ino == b.st_ino
        && FileType::from_raw_mode(a.st_mode) == FileType::from_raw_mode(b.st_mode)
}

/// Opens the caller's own directory `path` to start a walk from.
///
/// *Ambient*: `path` is resolved from the working directory like `open(2)`, following symlinks
/// in it, so pass only paths the caller controls (a driver's layer directory), never a path
/// found inside a layer.
pub fn open_root_dir(path: &Path) -> io::Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// Opens the directory `name` (one component) inside `dir`, failing on a symlink
/// (`openat(2)` with `O_DIRECTORY | O_NOFOLLOW`).
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(io::Error::from)
}

fn check(fd: &impl AsFd, expected: &Stat) -> io::Result<()> {
    let st = rustix::fs::fstat(fd)?;
    if same_inode(&st, expected) {
        Ok(())
    } else {
        Err(changed_during_walk(
            FileType::from_raw_mode(expected.st_mode),
            FileType::from_raw_mode(st.st_mode),
        ))
    }
}

/// Opens the directory `name` inside `dir` like [`open_dir_at`] and checks that it is the
/// directory `expected` describes (same device and inode): a directory swapped between a listing
/// and this call is refused with [`changed_during_walk`].
pub fn open_dir_checked(dir: BorrowedFd<'_>, name: &CStr, expected: &Stat) -> io::Result<OwnedFd> {
    let fd = open_dir_at(dir, name).map_err(|e| swapped_or(e, dir, name, expected))?;
    check(&fd, expected)?;
    Ok(fd)
}

/// Opens the regular file `name` inside `dir` for reading its content, and refuses it unless
/// the opened descriptor is still the regular file `expected` describes (same type, device and
/// inode).
///
/// Opened with `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`: a symlink swapped in fails the open, a FIFO
/// swapped in neither blocks the open nor is read (the `fstat` check refuses it), and a device
/// node swapped in is refused before a byte is read.
pub fn open_file_checked(dir: BorrowedFd<'_>, name: &CStr, expected: &Stat) -> io::Result<File> {
    let fd = rustix::fs::openat(dir, name, FILE_FLAGS, Mode::empty())
        .map_err(|e| swapped_or(io::Error::from(e), dir, name, expected))?;
    check(&fd, expected)?;
    Ok(File::from(fd))
}

/// `ELOOP`/`ENOTDIR` from an `O_NOFOLLOW`/`O_DIRECTORY` open means the entry is no longer what
/// the listing saw: say what is there now instead of printing a bare errno.
fn swapped_or(e: io::Error, dir: BorrowedFd<'_>, name: &CStr, expected: &Stat) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR) => {
            let found = rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                .map_or(FileType::Unknown, |st| FileType::from_raw_mode(st.st_mode));
            changed_during_walk(FileType::from_raw_mode(expected.st_mode), found)
        }
        _ => e,
    }
}

/// Opens the relative `path` below `dir` with `flags` (`O_NOFOLLOW` and `O_CLOEXEC` are always
/// added), following no symlink on the way and never leaving `dir`.
///
/// Uses `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`; where the
/// kernel lacks it (`ENOSYS`, remembered) or the path is longer than the kernel takes at once,
/// opens one component at a time with `O_NOFOLLOW`. An absolute path, a `..` component, or a
/// symlink anywhere on the way fails (`EXDEV`/`ELOOP`/`ENOTDIR`), on both routes alike. An empty path (or `.`) opens
/// `dir` itself again.
pub fn open_beneath(dir: BorrowedFd<'_>, path: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let bytes = path.as_os_str().as_bytes();
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    // PATH_MAX counts the terminating NUL.
    if OPENAT2.load(Ordering::Relaxed) && !bytes.is_empty() && bytes.len() < 4096 {
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(dir, path, flags, Mode::empty(), how) {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::NOSYS) => OPENAT2.store(false, Ordering::Relaxed),
            // A concurrent rename elsewhere on the system makes openat2 give up: walk instead.
            Err(rustix::io::Errno::AGAIN) => {}
            Err(e) => return Err(e.into()),
        }
    }
    open_beneath_walk(dir, path, flags)
}

/// The per-component walk of [`open_beneath`]: every intermediate component opened with
/// `O_DIRECTORY | O_NOFOLLOW`, the last with `flags`.
pub(crate) fn open_beneath_walk(
    dir: BorrowedFd<'_>,
    path: &Path,
    flags: OFlags,
) -> io::Result<OwnedFd> {
    let mut names = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => names.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(io::Error::from_raw_os_error(libc::EXDEV)),
            Component::RootDir | Component::Prefix(_) => {
                return Err(io::Error::from_raw_os_error(libc::EXDEV));
            }
        }
    }
    let Some((last, inner)) = names.split_last() else {
        return rustix::fs::openat(dir, c".", flags, Mode::empty()).map_err(io::Error::from);
    };
    let mut cur: Option<OwnedFd> = None;
    for n in inner {
        let base = cur.as_ref().map_or(dir, |f| f.as_fd());
        cur = Some(rustix::fs::openat(base, *n, DIR_FLAGS, Mode::empty())?);
    }
    let base = cur.as_ref().map_or(dir, |f| f.as_fd());
    rustix::fs::openat(base, *last, flags, Mode::empty()).map_err(io::Error::from)
}

/// Test hook: forget that `openat2` works, as on a kernel before 5.6. Only with the `test-util` feature.
#[cfg(any(test, feature = "test-util"))]
pub fn force_openat2_missing() {
    OPENAT2.store(false, Ordering::Relaxed);
}
