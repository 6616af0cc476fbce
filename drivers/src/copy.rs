//! Faithful tree copies: [`copy_tree`] in [`CopyMode::Content`] or [`CopyMode::Hardlink`] mode.
//!
//! Everything the seed's `copyDir` lost is kept: sockets stay sockets, FIFOs and char/block
//! devices (overlay whiteouts are char devices 0/0) are recreated, symlinks are copied as links,
//! **all** extended attributes are copied (`trusted.*` — overlay's opaque marker — and
//! `security.capability` included), owners and modes including suid/sgid/sticky (owner first,
//! then mode, then xattrs, since `chown` clears suid bits and file capabilities), hardlink groups
//! stay groups in content mode, sparse files keep their holes, and atimes/mtimes are kept to the
//! nanosecond with a directory's times set after its children are written.
//!
//! The walk goes through [`archive::fs`]: it is iterative (an explicit stack, no recursion) and
//! holds a bounded number of descriptors whatever the depth ([`DirStack`] on both sides), so a
//! tree 10,000 levels deep copies with the common soft limit of 1,024 open files. Each name is
//! resolved once, against its open parent directory, never as a full path, and the source is
//! read with checked opens: a directory swapped for a symlink, or a file swapped for a device
//! node or a FIFO, between the listing and the open is refused (the copy fails), never followed,
//! read or blocked on.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use archive::fs::{
    DirEntry, DirStack, XattrTarget, get_xattr, list_xattrs, open_beneath, open_file_checked,
    read_dir_sorted, readlink_at, same_inode, stat_at,
};
use graphdriver::{Error, Result};
use rustix::fs::{
    AtFlags, CWD, FileType, Gid, Mode, OFlags, SeekFrom, Stat, Timespec, Timestamps, Uid,
    XattrFlags,
};

/// How [`copy_tree`] copies regular files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// Copy file contents (reflink with `FICLONE` where the filesystem supports it, otherwise
    /// only the data segments `SEEK_DATA`/`SEEK_HOLE` find, with `copy_file_range`, falling
    /// back to `pread`/`pwrite`): holes stay holes. Hardlink groups of the source become
    /// hardlink groups of the copy.
    Content,
    /// Hardlink regular files to the source (sharing their data and metadata); everything else
    /// is copied. A file at its filesystem's link limit (`EMLINK`) is copied instead.
    Hardlink,
}

/// Copies the tree at `src` to `dst`, which must not exist yet; `dst` gets `src`'s own owner,
/// mode, xattrs and times.
///
/// `src` and `dst` are the caller's own paths (a driver's layer directories): they are resolved
/// from the working directory, but their last components are not followed. Below them, nothing
/// is resolved as a path (see the module documentation). Errors name the failing operation and
/// the source-relative path; a source entry that changed type or identity while being copied
/// fails the copy.
pub fn copy_tree(src: &Path, dst: &Path, mode: CopyMode) -> Result<()> {
    let st = rustix::fs::statat(CWD, src, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| io_err("lstat", src, e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Err(Error::io(
            "copy tree",
            src,
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "expected a directory, found another file type",
            ),
        ));
    }
    let sfd = open_dir(CWD, src).map_err(|e| io_err("open", src, e))?;
    let now = rustix::fs::fstat(&sfd).map_err(|e| io_err("stat", src, e))?;
    if !same_inode(&now, &st) {
        return Err(Error::io(
            "open",
            src,
            archive::fs::changed_during_walk(FileType::Directory, FileType::Directory),
        ));
    }
    rustix::fs::mkdirat(CWD, dst, Mode::from_raw_mode(0o700))
        .map_err(|e| io_err("create directory", dst, e))?;
    let dfd = open_dir(CWD, dst).map_err(|e| io_err("open", dst, e))?;
    let root_dfd = dfd.try_clone().map_err(|e| Error::io("dup", dst, e))?;
    let mut copier = Copier {
        mode,
        links: HashMap::new(),
        root_dfd,
        buf: Vec::new(),
        copy_file_range: !force_pread(),
        src: DirStack::new(sfd).map_err(|e| Error::io("open", src, e))?,
        dst: DirStack::new(dfd).map_err(|e| Error::io("open", dst, e))?,
    };
    copier.run(st)
}

#[cfg(test)]
thread_local! {
    /// Test hook: makes the next this-many `linkat` calls of hardlink mode fail with `EMLINK`.
    pub(crate) static INJECT_EMLINK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Test hook: called with the source directory and name of every entry after its `lstat`
    /// and before it is opened (the window a racing container has).
    #[allow(clippy::type_complexity)]
    pub(crate) static RACE_WINDOW: std::cell::RefCell<Option<Box<dyn FnMut(BorrowedFd<'_>, &CStr)>>> =
        const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
thread_local! {
    /// Test hook: copies file data with `pread`/`pwrite`, as where `copy_file_range` is refused.
    pub(crate) static FORCE_PREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
fn force_pread() -> bool {
    FORCE_PREAD.with(std::cell::Cell::get)
}

#[cfg(not(test))]
fn force_pread() -> bool {
    false
}

#[cfg(test)]
fn race_window(dir: BorrowedFd<'_>, name: &CStr) {
    RACE_WINDOW.with(|h| {
        if let Some(f) = h.borrow_mut().as_mut() {
            f(dir, name)
        }
    });
}

#[cfg(not(test))]
#[inline(always)]
fn race_window(_dir: BorrowedFd<'_>, _name: &CStr) {}

fn link_file(sdir: BorrowedFd<'_>, name: &CStr, ddir: BorrowedFd<'_>) -> rustix::io::Result<()> {
    #[cfg(test)]
    {
        let left = INJECT_EMLINK.with(std::cell::Cell::get);
        if left > 0 {
            INJECT_EMLINK.with(|c| c.set(left - 1));
            return Err(rustix::io::Errno::MLINK);
        }
    }
    rustix::fs::linkat(sdir, name, ddir, name, AtFlags::empty())
}

/// One source directory being copied: its sorted entries and its `lstat`.
struct Level {
    entries: Vec<DirEntry>,
    next: usize,
    stat: Stat,
}

struct Copier {
    mode: CopyMode,
    /// Content mode: (dev, ino) of a multiply-linked source file → its copy's path relative to
    /// the destination root.
    links: HashMap<(u64, u64), Vec<u8>>,
    root_dfd: OwnedFd,
    buf: Vec<u8>,
    /// Cleared when `copy_file_range` is refused between these filesystems: later files go
    /// straight to `pread`/`pwrite`.
    copy_file_range: bool,
    /// The source directories from the root down to the one being copied.
    src: DirStack,
    /// The destination directories, in step with `src` (same relative paths).
    dst: DirStack,
}

fn open_dir<Fd: AsFd, P: rustix::path::Arg>(dirfd: Fd, path: P) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dirfd,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn io_err(op: &str, path: &Path, e: rustix::io::Errno) -> Error {
    Error::io(op, path, io::Error::from(e))
}

fn timestamps(st: &Stat) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime as _,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

fn owner(st: &Stat) -> (Option<Uid>, Option<Gid>) {
    (
        Some(Uid::from_raw(st.st_uid as _)),
        Some(Gid::from_raw(st.st_gid as _)),
    )
}

fn perm_bits(st: &Stat) -> Mode {
    Mode::from_raw_mode(st.st_mode & 0o7777)
}

/// `rel/name` (or `name` at the root), as bytes.
fn join(rel: &[u8], name: &CStr) -> Vec<u8> {
    let mut p = Vec::with_capacity(rel.len() + 1 + name.to_bytes().len());
    p.extend_from_slice(rel);
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name.to_bytes());
    p
}

fn as_path(rel: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(rel))
}

impl Copier {
    /// The source-relative path of `name` in the current directory, for messages.
    fn path_of(&self, name: &CStr) -> PathBuf {
        as_path(&join(self.src.rel(), name)).to_path_buf()
    }

    fn list(&self) -> Result<Vec<DirEntry>> {
        read_dir_sorted(self.src.top())
            .map_err(|e| Error::io("read directory", self.src.rel_path(), e))
    }

    /// The walk: depth first, a directory's own metadata set when all its entries are copied.
    fn run(&mut self, root: Stat) -> Result<()> {
        let mut levels = vec![Level {
            entries: self.list()?,
            next: 0,
            stat: root,
        }];
        loop {
            let Some(level) = levels.last_mut() else {
                return Ok(());
            };
            let Some(ent) = level.entries.get_mut(level.next) else {
                let Some(done) = levels.pop() else {
                    return Ok(());
                };
                let rel = self.src.rel_path().to_path_buf();
                if levels.is_empty() {
                    let (s, d) = (self.src.top(), self.dst.top());
                    return metadata_fd(s, d, &done.stat, &rel);
                }
                // Leave both directories first: the copy's mode may keep even its owner from
                // reopening the parent through it.
                let s = self.src.pop().map_err(|e| Error::io("leave", &rel, e))?;
                let d = self.dst.pop().map_err(|e| Error::io("leave", &rel, e))?;
                let (Some(s), Some(d)) = (s, d) else {
                    return Err(Error::io(
                        "leave",
                        &rel,
                        io::Error::other("stack underflow"),
                    ));
                };
                metadata_fd(s.as_fd(), d.as_fd(), &done.stat, &rel)?;
                continue;
            };
            level.next += 1;
            let name = std::mem::take(&mut ent.name);
            let d_type = ent.file_type;
            if let Some(st) = self.entry(&name, d_type)? {
                // A directory, created in the copy: walk into both.
                race_window(self.src.top(), &name);
                self.src
                    .push(&name, Some(&st))
                    .map_err(|e| Error::io("open directory", self.path_of(&name), e))?;
                self.dst
                    .push(&name, None)
                    .map_err(|e| Error::io("open directory", self.path_of(&name), e))?;
                levels.push(Level {
                    entries: self.list()?,
                    next: 0,
                    stat: st,
                });
            }
        }
    }

    /// Copies the entry `name` of the current directory, except a directory's contents: for a
    /// directory, creates it in the copy and returns its `lstat` for the caller to walk into.
    fn entry(&mut self, name: &CStr, d_type: FileType) -> Result<Option<Stat>> {
        let mut link_tried = false;
        // Fast path of hardlink mode: a regular file by d_type needs no stat (linkat never
        // follows a symlink or opens what it links).
        if self.mode == CopyMode::Hardlink && d_type == FileType::RegularFile {
            match link_file(self.src.top(), name, self.dst.top()) {
                Ok(()) => return Ok(None),
                Err(rustix::io::Errno::MLINK) => {
                    tracing::debug!(path = %self.path_of(name).display(), "link limit reached; copying the file");
                    link_tried = true;
                }
                Err(e) => return Err(io_err("link", &self.path_of(name), e)),
            }
        }
        let (sdir, ddir) = (self.src.top(), self.dst.top());
        let st = stat_at(sdir, name).map_err(|e| Error::io("lstat", self.path_of(name), e))?;
        let ft = FileType::from_raw_mode(st.st_mode);
        match ft {
            FileType::Directory => {
                rustix::fs::mkdirat(ddir, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| io_err("create directory", &self.path_of(name), e))?;
                return Ok(Some(st));
            }
            FileType::RegularFile => self.regular(name, &st, link_tried)?,
            FileType::Symlink => {
                let path = self.path_of(name);
                let target =
                    readlink_at(sdir, name).map_err(|e| Error::io("read link", &path, e))?;
                rustix::fs::symlinkat(target.as_slice(), ddir, name)
                    .map_err(|e| io_err("create symlink", &path, e))?;
                metadata_at(sdir, ddir, name, &st, false, &path)?;
            }
            FileType::Fifo
            | FileType::CharacterDevice
            | FileType::BlockDevice
            | FileType::Socket => {
                let path = self.path_of(name);
                rustix::fs::mknodat(ddir, name, ft, perm_bits(&st), st.st_rdev as _)
                    .map_err(|e| io_err("mknod", &path, e))?;
                metadata_at(sdir, ddir, name, &st, true, &path)?;
            }
            FileType::Unknown => {
                return Err(Error::io(
                    "copy",
                    self.path_of(name),
                    io::Error::new(io::ErrorKind::InvalidData, "unknown file type"),
                ));
            }
        }
        Ok(None)
    }

    fn regular(&mut self, name: &CStr, st: &Stat, link_tried: bool) -> Result<()> {
        let path = self.path_of(name);
        let key = (st.st_dev, st.st_ino);
        if self.mode == CopyMode::Content
            && st.st_nlink > 1
            && let Some(first) = self.links.get(&key)
        {
            return self
                .link_to_copy(first, name)
                .map_err(|e| Error::io("link", &path, e));
        }
        let (sdir, ddir) = (self.src.top(), self.dst.top());
        if self.mode == CopyMode::Hardlink && !link_tried {
            // Reached when d_type did not say "regular" up front.
            match link_file(sdir, name, ddir) {
                Ok(()) => return Ok(()),
                Err(rustix::io::Errno::MLINK) => {
                    tracing::debug!(path = %path.display(), "link limit reached; copying the file");
                }
                Err(e) => return Err(io_err("link", &path, e)),
            }
        }
        race_window(sdir, name);
        let src = open_file_checked(sdir, name, st).map_err(|e| Error::io("open", &path, e))?;
        let dst = rustix::fs::openat(
            ddir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err("create", &path, e))?;
        // The size now, not the listing's: bounds the copy even if the file keeps growing.
        let size = rustix::fs::fstat(&src)
            .map_err(|e| io_err("stat", &path, e))?
            .st_size as u64;
        self.content(&src, &dst, size)
            .map_err(|e| Error::io("copy data", &path, e))?;
        metadata_fd(src.as_fd(), dst.as_fd(), st, &path)?;
        if self.mode == CopyMode::Content && st.st_nlink > 1 {
            self.links.insert(key, join(self.dst.rel(), name));
        }
        Ok(())
    }

    /// Links `name` in the current destination directory to the earlier copy at `first`
    /// (relative to the destination root), reaching its directory without following links and
    /// whatever the length of its path.
    fn link_to_copy(&self, first: &[u8], name: &CStr) -> io::Result<()> {
        let (dir, base) = match first.iter().rposition(|&b| b == b'/') {
            Some(i) => (&first[..i], &first[i + 1..]),
            None => (&first[..0], first),
        };
        let dirfd = open_beneath(
            self.root_dfd.as_fd(),
            as_path(dir),
            OFlags::PATH | OFlags::DIRECTORY,
        )?;
        rustix::fs::linkat(&dirfd, base, self.dst.top(), name, AtFlags::empty())
            .map_err(io::Error::from)
    }

    /// Copies `size` bytes of file data: reflink, else the data segments only (holes stay
    /// holes) with `copy_file_range`, else `pread`/`pwrite`; then sets the size.
    fn content(&mut self, src: &File, dst: &OwnedFd, size: u64) -> io::Result<()> {
        if size == 0 {
            return Ok(());
        }
        if rustix::fs::ioctl_ficlone(dst, src).is_ok() {
            return Ok(());
        }
        let mut off = 0u64;
        while off < size {
            let start = match rustix::fs::seek(src, SeekFrom::Data(off)) {
                Ok(p) => p,
                // No data after `off`: the rest is a hole.
                Err(rustix::io::Errno::NXIO) => break,
                // No SEEK_DATA here: everything left is data.
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => off,
                Err(e) => return Err(e.into()),
            };
            if start >= size {
                break;
            }
            let end = match rustix::fs::seek(src, SeekFrom::Hole(start)) {
                Ok(p) => p.min(size),
                Err(
                    rustix::io::Errno::NXIO
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::OPNOTSUPP,
                ) => size,
                Err(e) => return Err(e.into()),
            };
            if end <= start {
                break;
            }
            if !self.copy_range(src, dst, start, end)? {
                // The file ended early (it shrank while we copied).
                break;
            }
            off = end;
        }
        // Holes at the end, and the size of a file that shrank meanwhile.
        rustix::fs::ftruncate(dst, size).map_err(io::Error::from)
    }

    /// Copies bytes `start..end` to the same offsets; `false` if the source ended before `end`.
    fn copy_range(&mut self, src: &File, dst: &OwnedFd, start: u64, end: u64) -> io::Result<bool> {
        let (mut from, mut to) = (start, start);
        while self.copy_file_range && from < end {
            let len = usize::try_from(end - from)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            match rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), len) {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::OPNOTSUPP,
                ) => self.copy_file_range = false,
                Err(e) => return Err(e.into()),
            }
        }
        if from >= end {
            return Ok(true);
        }
        if self.buf.is_empty() {
            self.buf = vec![0u8; 128 * 1024];
        }
        while from < end {
            let want = usize::try_from(end - from)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let chunk = &mut self.buf[..want];
            let n = match rustix::io::pread(src, &mut *chunk, from) {
                Ok(0) => return Ok(false),
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut done = 0;
            while done < n {
                match rustix::io::pwrite(dst, &chunk[done..n], from + done as u64) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(w) => done += w,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            from += n as u64;
        }
        Ok(true)
    }
}

/// Owner, mode, xattrs and times of the open regular file or directory `dst`, copied from
/// the open source `src` whose stat is `st`.
fn metadata_fd(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, st: &Stat, rel: &Path) -> Result<()> {
    let (uid, gid) = owner(st);
    rustix::fs::fchown(dst, uid, gid).map_err(|e| io_err("chown", rel, e))?;
    rustix::fs::fchmod(dst, perm_bits(st)).map_err(|e| io_err("chmod", rel, e))?;
    copy_xattrs(XattrTarget::Fd(src), rel, |attr, value| {
        rustix::fs::fsetxattr(dst, attr, value, XattrFlags::empty())
    })?;
    rustix::fs::futimens(dst, &timestamps(st)).map_err(|e| io_err("set times", rel, e))
}

/// Owner, mode (with `chmod`; not for symlinks), xattrs and times of the node `name` in `ddir`,
/// which is not opened (symlinks, FIFOs, devices, sockets), copied from `name` in `sdir`.
fn metadata_at(
    sdir: BorrowedFd<'_>,
    ddir: BorrowedFd<'_>,
    name: &CStr,
    st: &Stat,
    chmod: bool,
    path: &Path,
) -> Result<()> {
    let (uid, gid) = owner(st);
    rustix::fs::chownat(ddir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| io_err("chown", path, e))?;
    if chmod {
        // `name` is the node just made in our own copy, not a symlink.
        rustix::fs::chmodat(ddir, name, perm_bits(st), AtFlags::empty())
            .map_err(|e| io_err("chmod", path, e))?;
    }
    let mut dst = None;
    copy_xattrs(XattrTarget::At(sdir, name), path, |attr, value| {
        // lsetxattr of /proc/self/fd/<ddir>/<name>: the kernel resolves the directory through
        // its descriptor, then looks up `name` there without following it.
        let p = dst.get_or_insert_with(|| proc_path(ddir, name));
        rustix::fs::lsetxattr(p.as_path(), attr, value, XattrFlags::empty())
    })?;
    rustix::fs::utimensat(ddir, name, &timestamps(st), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| io_err("set times", path, e))
}

/// `name` in the open directory `dir`, as a path through `/proc/self/fd` (resolved against the
/// descriptor, with `name` itself not followed by the `l*xattr` calls).
fn proc_path(dir: BorrowedFd<'_>, name: &CStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(OsStr::from_bytes(name.to_bytes()));
    p
}

/// Copies every xattr of `src` with `set`. An attribute the caller may not read (`trusted.*` as
/// a normal user) or that vanished meanwhile is skipped.
fn copy_xattrs(
    src: XattrTarget<'_>,
    rel: &Path,
    mut set: impl FnMut(&CStr, &[u8]) -> rustix::io::Result<()>,
) -> Result<()> {
    let names = list_xattrs(src).map_err(|e| Error::io("list xattrs", rel, e))?;
    for attr in names {
        let value = get_xattr(src, &attr).map_err(|e| xattr_err("read xattr", rel, &attr, e))?;
        let Some(value) = value else {
            continue;
        };
        set(&attr, &value).map_err(|e| xattr_err("set xattr", rel, &attr, e.into()))?;
    }
    Ok(())
}

fn xattr_err(op: &str, rel: &Path, name: &CStr, e: io::Error) -> Error {
    Error::io(
        format!("{op} {}", String::from_utf8_lossy(name.to_bytes())),
        rel,
        e,
    )
}

#[cfg(test)]
mod tests;
