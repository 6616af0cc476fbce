//! Opening the store's own files and directories without following symlinks, and the ownership
//! and mode checks of the home and the root above it.
//!
//! Everything here works relative to an open directory descriptor with `O_NOFOLLOW`, so a
//! symlink planted where the store expects one of its files or directories is reported (naming
//! the path and what was found) instead of followed.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::{Error, Result};

/// The longest bookkeeping file the store reads (a parent id, a count).
const MAX_SMALL_FILE: u64 = 4096;

/// An [`Error::Io`] on `path` saying what was expected and what was found there.
pub(super) fn unexpected(op: &str, path: &Path, expected: &str, found: FileType) -> Error {
    Error::io(
        op,
        path,
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected {expected}, found {}", layerfs::describe(found)),
        ),
    )
}

/// The type of `name` in `dir` without following a symlink; `None` if absent.
pub(super) fn lstat_type(dir: BorrowedFd<'_>, name: &str, path: &Path) -> Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(Error::io("stat", path, e.into())),
    }
}

/// Turns a failed `openat(.., O_NOFOLLOW)` of `name` into an error that says what was there
/// when the cause is a symlink or another type than `expected_type`.
fn open_error(
    dir: BorrowedFd<'_>,
    name: &str,
    path: &Path,
    op: &str,
    expected: (&str, FileType),
    e: Errno,
) -> Error {
    if matches!(e, Errno::LOOP | Errno::NOTDIR | Errno::NXIO)
        && let Ok(Some(found)) = lstat_type(dir, name, path)
        && found != expected.1
    {
        return unexpected(op, path, expected.0, found);
    }
    Error::io(op, path, e.into())
}

/// Opens directory `name` (one component) of `dir` without following a symlink; `None` if it
/// does not exist. Anything else than a directory there is an error naming `path`.
pub(super) fn open_dir_opt(
    dir: BorrowedFd<'_>,
    name: &str,
    path: &Path,
) -> Result<Option<OwnedFd>> {
    match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(open_error(
            dir,
            name,
            path,
            "open directory",
            ("a directory", FileType::Directory),
            e,
        )),
    }
}

/// [`open_dir_opt`], with a missing directory an error (`NotFound`) naming `path`.
pub(super) fn open_dir(dir: BorrowedFd<'_>, name: &str, path: &Path) -> Result<OwnedFd> {
    open_dir_opt(dir, name, path)?.ok_or_else(|| {
        Error::io(
            "open directory",
            path,
            io::Error::from(io::ErrorKind::NotFound),
        )
    })
}

/// Creates directory `name` in `dir` with `mode` unless an entry of that name exists (whatever
/// it is: the open that follows checks it).
pub(super) fn mkdir_if_missing(
    dir: BorrowedFd<'_>,
    name: &str,
    mode: u32,
    path: &Path,
) -> Result<()> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode)) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(Error::io("create directory", path, e.into())),
    }
}

/// Opens (creating with mode 0600 if `create`) regular file `name` of `dir` for reading and,
/// if `write`, writing, without following a symlink. Never blocks on a FIFO: anything but a
/// regular file is refused, naming `path`. `None` if it does not exist and `create` is false.
pub(super) fn open_file(
    dir: BorrowedFd<'_>,
    name: &str,
    path: &Path,
    write: bool,
    create: bool,
) -> Result<Option<File>> {
    let mut flags = OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    flags |= if write { OFlags::RDWR } else { OFlags::RDONLY };
    if create {
        flags |= OFlags::CREATE;
    }
    let fd = match rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => fd,
        Err(Errno::NOENT) if !create => return Ok(None),
        Err(e) => {
            return Err(open_error(
                dir,
                name,
                path,
                "open",
                ("a regular file", FileType::RegularFile),
                e,
            ));
        }
    };
    // O_NONBLOCK stays: it changes nothing for a regular file (and flock has its own flag).
    check_regular(&fd, path)?;
    Ok(Some(File::from(fd)))
}

/// Creates regular file `name` in `dir` (mode 0600), failing if any entry of that name exists.
pub(super) fn create_new_file(dir: BorrowedFd<'_>, name: &str, path: &Path) -> Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| Error::io("create", path, e.into()))?;
    Ok(File::from(fd))
}

/// Fails unless `fd` is a regular file.
fn check_regular(fd: &OwnedFd, path: &Path) -> Result<()> {
    let st = rustix::fs::fstat(fd).map_err(|e| Error::io("stat", path, e.into()))?;
    let t = FileType::from_raw_mode(st.st_mode);
    if t != FileType::RegularFile {
        return Err(unexpected("open", path, "a regular file", t));
    }
    Ok(())
}

/// The content of small regular file `name` of `dir` (at most 4 KiB), without following a
/// symlink; `None` if it does not exist.
pub(super) fn read_small(dir: BorrowedFd<'_>, name: &str, path: &Path) -> Result<Option<String>> {
    read_limited(dir, name, path, MAX_SMALL_FILE)
}

/// The content of regular file `name` of `dir`, at most `max` bytes (longer is an error naming
/// the limit, never a silently cut record), without following a symlink; `None` if absent.
pub(super) fn read_limited(
    dir: BorrowedFd<'_>,
    name: &str,
    path: &Path,
    max: u64,
) -> Result<Option<String>> {
    let Some(file) = open_file(dir, name, path, false, false)? else {
        return Ok(None);
    };
    let mut s = String::new();
    file.take(max.saturating_add(1))
        .read_to_string(&mut s)
        .map_err(|e| Error::io("read", path, e))?;
    if s.len() as u64 > max {
        return Err(Error::io(
            "read",
            path,
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected a record of at most {max} bytes, found more"),
            ),
        ));
    }
    Ok(Some(s))
}

/// Removes entry `name` of `dir` (a file, or a whole tree) without following symlinks; absent
/// is fine; `path` names the same entry, for messages. A tree is removed through descriptors by
/// [`layerfs::remove_tree_at`]: iteratively at any depth with bounded descriptors, mode-000
/// directories included, never entering a filesystem mounted below it.
pub(super) fn remove_entry(dir: BorrowedFd<'_>, name: &str, path: &Path) -> Result<()> {
    match lstat_type(dir, name, path)? {
        None => Ok(()),
        Some(FileType::Directory) => {
            let cname = std::ffi::CString::new(name).map_err(|_| {
                Error::io("remove", path, io::Error::from(io::ErrorKind::InvalidInput))
            })?;
            match layerfs::remove_tree_at(dir, &cname) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other.map_err(|e| Error::io("remove", path, e)),
            }
        }
        Some(_) => match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(Error::io("remove", path, e.into())),
        },
    }
}

// === the home and the root above it ===

/// Opens the driver home `home` (creating it with mode 0700 if missing) after checking it and
/// the root directory above it like ssh's `StrictModes`: neither may be a symlink, the home must
/// be owned by the effective uid, the root by the effective uid or root, and group and others
/// must not be able to write either. Returns the home's descriptor.
pub(super) fn open_home(home: &Path) -> Result<OwnedFd> {
    let name = home
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| *n != "." && *n != "..")
        .ok_or_else(|| {
            Error::io(
                "open driver home",
                home,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "expected a path ending in a UTF-8 directory name",
                ),
            )
        })?;
    let root: PathBuf = match home.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let euid = rustix::process::geteuid().as_raw();
    let root_fd = rustix::fs::open(
        &root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        if matches!(e, Errno::LOOP | Errno::NOTDIR)
            && let Ok(m) = std::fs::symlink_metadata(&root)
        {
            return unexpected(
                "open storage root",
                &root,
                "a directory",
                FileType::from_raw_mode(std::os::unix::fs::MetadataExt::mode(&m)),
            );
        }
        Error::io("open storage root", &root, e.into())
    })?;
    check_trusted(&root_fd, &root, "storage root", &[euid, 0])?;
    mkdir_if_missing(root_fd.as_fd(), name, 0o700, home)?;
    let home_fd = open_dir(root_fd.as_fd(), name, home)?;
    check_trusted(&home_fd, home, "driver home", &[euid])?;
    Ok(home_fd)
}

/// Fails, naming `path`, unless `fd` is owned by one of `owners` and not writable by group
/// or others.
fn check_trusted(fd: &OwnedFd, path: &Path, what: &str, owners: &[u32]) -> Result<()> {
    let st = rustix::fs::fstat(fd).map_err(|e| Error::io("stat", path, e.into()))?;
    let refuse = |msg: String| {
        Error::io(
            format!("check {what}"),
            path,
            io::Error::new(io::ErrorKind::PermissionDenied, msg),
        )
    };
    if !owners.contains(&st.st_uid) {
        return Err(refuse(format!(
            "expected owner uid {}, found uid {} (refusing a directory another user controls)",
            owners[0], st.st_uid
        )));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(refuse(format!(
            "writable by group/others (mode {mode:04o}); make it writable by its owner only"
        )));
    }
    Ok(())
}
