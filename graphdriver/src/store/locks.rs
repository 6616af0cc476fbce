//! The store's locks: the store-wide flock (`.lock`, shared for reads and exclusive around
//! check-then-rename changes) and the flocked files other parts hold ([`FileLock`]).

use super::*;

/// An exclusive or shared hold on a flock; released on drop.
#[derive(Debug)]
pub struct FileLock {
    pub(super) file: Option<File>,
}

impl FileLock {
    /// Opens (creating, mode 0600) regular file `name` of `dir` without following a symlink and
    /// locks it with `op`, waiting for the lock. A read-only store (a read-only bind mount, a
    /// snapshot) can still be read: flock works on a read-only descriptor of an existing file.
    pub(super) fn acquire_at(
        dir: BorrowedFd<'_>,
        name: &str,
        path: &Path,
        op: FlockOperation,
    ) -> Result<FileLock> {
        let file = match nofollow::open_file(dir, name, path, true, true) {
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EROFS) => {
                nofollow::open_file(dir, name, path, false, false)?.ok_or_else(|| {
                    Error::io(
                        "open lock file",
                        path,
                        io::Error::from(io::ErrorKind::NotFound),
                    )
                })?
            }
            other => other?.ok_or_else(|| {
                Error::io(
                    "open lock file",
                    path,
                    io::Error::from(io::ErrorKind::NotFound),
                )
            })?,
        };
        FileLock::on(file.into(), path, op)
    }

    /// Locks the open file or directory `fd` with `op`, waiting for the lock.
    pub(super) fn on(fd: OwnedFd, path: &Path, op: FlockOperation) -> Result<FileLock> {
        rustix::fs::flock(&fd, op).map_err(|e| Error::io("lock", path, e.into()))?;
        Ok(FileLock {
            file: Some(File::from(fd)),
        })
    }

    /// The locked file's descriptor.
    pub(super) fn fd(&self, path: &Path) -> Result<BorrowedFd<'_>> {
        self.file.as_ref().map(|f| f.as_fd()).ok_or_else(|| {
            Error::io(
                "use lock file",
                path,
                io::Error::new(io::ErrorKind::NotFound, "the lock file is missing"),
            )
        })
    }

    /// Tries to take an exclusive lock on an already open file or directory without blocking;
    /// `None` if someone else holds it.
    pub(super) fn try_exclusive(fd: impl Into<OwnedFd>) -> Option<FileLock> {
        let fd: OwnedFd = fd.into();
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Some(FileLock {
                file: Some(File::from(fd)),
            }),
            Err(_) => None,
        }
    }
}

/// True if the file `lock` holds is still entry `name` of `dir` (not unlinked or replaced).
pub(super) fn still_linked(lock: &FileLock, dir: BorrowedFd<'_>, name: &str) -> bool {
    let (Some(file), Ok(now)) = (
        lock.file.as_ref(),
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
    ) else {
        return false;
    };
    rustix::fs::fstat(file).is_ok_and(|held| held.st_ino == now.st_ino && held.st_dev == now.st_dev)
}

impl LayerStore {
    /// Takes the store lock exclusively (blocks until free). Hold it around metadata changes
    /// that must not interleave with other processes' (check-then-rename).
    pub fn lock_exclusive(&self) -> Result<FileLock> {
        FileLock::acquire_at(
            self.fd(),
            LOCK_FILE,
            &self.home.join(LOCK_FILE),
            FlockOperation::LockExclusive,
        )
    }

    /// Takes the store lock shared (many readers). On a read-only store without a lock file
    /// nobody can change anything, and the hold is empty.
    pub fn lock_shared(&self) -> Result<FileLock> {
        let path = self.home.join(LOCK_FILE);
        match FileLock::acquire_at(self.fd(), LOCK_FILE, &path, FlockOperation::LockShared) {
            Err(Error::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && self.is_read_only() =>
            {
                Ok(FileLock { file: None })
            }
            other => other,
        }
    }
}
