//! Faithful tree copies: [`copy_tree`] in [`CopyMode::Content`] or [`CopyMode::Hardlink`] mode.
//!
//! Everything the seed's `copyDir` lost is kept: sockets stay sockets, FIFOs and char/block
//! devices (overlay whiteouts are char devices 0/0) are recreated, symlinks are copied as links,
//! **all** extended attributes are copied (`trusted.*` — overlay's opaque marker — and
//! `security.capability` included), owners and modes including suid/sgid/sticky (owner first,
//! then mode, then xattrs, since `chown` clears suid bits and file capabilities), hardlink groups
//! stay groups in content mode, and atimes/mtimes are kept to the nanosecond with a directory's
//! times set after its children are written.
//!
//! The walk is fd-relative (`openat`, `statat`, `linkat`, …): each name is resolved once, against
//! its open parent directory, never as a full path.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use graphdriver::{Error, Result};
use rustix::fs::{
    AtFlags, CWD, Dir, FileType, Gid, Mode, OFlags, Stat, Timespec, Timestamps, Uid, XattrFlags,
};

/// How [`copy_tree`] copies regular files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// Copy file contents (reflink with `FICLONE` where the filesystem supports it, otherwise
    /// `copy_file_range`, otherwise read/write). Hardlink groups of the source become hardlink
    /// groups of the copy.
    Content,
    /// Hardlink regular files to the source (sharing their data and metadata); everything else
    /// is copied. A file at its filesystem's link limit (`EMLINK`) is copied instead.
    Hardlink,
}

/// Copies the tree at `src` to `dst`, which must not exist yet; `dst` gets `src`'s own owner,
/// mode, xattrs and times.
///
/// Errors name the failing operation and the source-relative path.
pub fn copy_tree(src: &Path, dst: &Path, mode: CopyMode) -> Result<()> {
    let st = rustix::fs::statat(CWD, src, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| io_err("lstat", src, e))?;
    if FileType::from_raw_mode(st.st_mode as _) != FileType::Directory {
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
    rustix::fs::mkdirat(CWD, dst, Mode::from_raw_mode(0o700))
        .map_err(|e| io_err("create directory", dst, e))?;
    let dfd = open_dir(CWD, dst).map_err(|e| io_err("open", dst, e))?;
    let root_dfd = dfd.try_clone().map_err(|e| Error::io("dup", dst, e))?;
    let mut copier = Copier {
        mode,
        links: HashMap::new(),
        root_dfd,
        rel: PathBuf::new(),
        buf: Vec::new(),
        xbuf: XattrBuf::new(),
    };
    copier.dir(&sfd, &dfd)?;
    copier.metadata_fd(&sfd, &dfd, &st, Path::new(""))?;
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Test hook: makes the next this-many `linkat` calls of hardlink mode fail with `EMLINK`.
    pub(crate) static INJECT_EMLINK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

fn link_file(sdir: &OwnedFd, name: &CStr, ddir: &OwnedFd) -> rustix::io::Result<()> {
    #[cfg(test)]
    {
        let left = INJECT_EMLINK.with(|c| c.get());
        if left > 0 {
            INJECT_EMLINK.with(|c| c.set(left - 1));
            return Err(rustix::io::Errno::MLINK);
        }
    }
    rustix::fs::linkat(sdir, name, ddir, name, AtFlags::empty())
}

struct Copier {
    mode: CopyMode,
    /// Content mode: (dev, ino) of a multiply-linked source file → its copy, relative to the
    /// destination root.
    links: HashMap<(u64, u64), PathBuf>,
    root_dfd: OwnedFd,
    /// The current directory, relative to both roots (for messages and the link map).
    rel: PathBuf,
    buf: Vec<u8>,
    xbuf: XattrBuf,
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

impl Copier {
    fn path_of(&self, name: &CStr) -> PathBuf {
        self.rel.join(OsStr::from_bytes(name.to_bytes()))
    }

    fn dir(&mut self, sfd: &OwnedFd, dfd: &OwnedFd) -> Result<()> {
        let rel = self.rel.clone();
        let reader = Dir::read_from(sfd).map_err(|e| io_err("read directory", &rel, e))?;
        for entry in reader {
            let entry = entry.map_err(|e| io_err("read directory", &rel, e))?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            // Fast path of hardlink mode: a regular file by d_type needs no stat.
            if self.mode == CopyMode::Hardlink && entry.file_type() == FileType::RegularFile {
                match link_file(sfd, name, dfd) {
                    Ok(()) => continue,
                    Err(rustix::io::Errno::MLINK) => {
                        tracing::debug!(path = %self.path_of(name).display(), "link limit reached; copying the file");
                        self.entry(sfd, dfd, name, true)?;
                        continue;
                    }
                    Err(e) => return Err(io_err("link", &self.path_of(name), e)),
                }
            }
            self.entry(sfd, dfd, name, false)?;
        }
        Ok(())
    }

    fn entry(&mut self, sfd: &OwnedFd, dfd: &OwnedFd, name: &CStr, link_tried: bool) -> Result<()> {
        let st = rustix::fs::statat(sfd, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("lstat", &self.path_of(name), e))?;
        let ft = FileType::from_raw_mode(st.st_mode as _);
        match ft {
            FileType::Directory => {
                let path = self.path_of(name);
                rustix::fs::mkdirat(dfd, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| io_err("create directory", &path, e))?;
                let child_s = open_dir(sfd, name).map_err(|e| io_err("open", &path, e))?;
                let child_d = open_dir(dfd, name).map_err(|e| io_err("open", &path, e))?;
                let saved = std::mem::replace(&mut self.rel, path);
                let res = self.dir(&child_s, &child_d);
                let path = std::mem::replace(&mut self.rel, saved);
                res?;
                // After the children, so their creation does not move the times.
                self.metadata_fd(&child_s, &child_d, &st, &path)
            }
            FileType::RegularFile => self.regular(sfd, dfd, name, &st, link_tried),
            FileType::Symlink => {
                let path = self.path_of(name);
                let target = rustix::fs::readlinkat(sfd, name, Vec::new())
                    .map_err(|e| io_err("read link", &path, e))?;
                rustix::fs::symlinkat(target.as_c_str(), dfd, name)
                    .map_err(|e| io_err("create symlink", &path, e))?;
                self.metadata_at(sfd, dfd, name, &st, false)
            }
            FileType::Fifo
            | FileType::CharacterDevice
            | FileType::BlockDevice
            | FileType::Socket => {
                let path = self.path_of(name);
                rustix::fs::mknodat(dfd, name, ft, perm_bits(&st), st.st_rdev as _)
                    .map_err(|e| io_err("mknod", &path, e))?;
                self.metadata_at(sfd, dfd, name, &st, true)
            }
            FileType::Unknown => Err(Error::io(
                "copy",
                self.path_of(name),
                io::Error::new(io::ErrorKind::InvalidData, "unknown file type"),
            )),
        }
    }

    fn regular(
        &mut self,
        sfd: &OwnedFd,
        dfd: &OwnedFd,
        name: &CStr,
        st: &Stat,
        link_tried: bool,
    ) -> Result<()> {
        let path = self.path_of(name);
        let key = (st.st_dev, st.st_ino);
        if self.mode == CopyMode::Content && st.st_nlink > 1 {
            if let Some(first) = self.links.get(&key) {
                return rustix::fs::linkat(
                    &self.root_dfd,
                    first.as_path(),
                    dfd,
                    name,
                    AtFlags::empty(),
                )
                .map_err(|e| io_err("link", &path, e));
            }
        }
        if self.mode == CopyMode::Hardlink && !link_tried {
            // Reached when d_type did not say "regular" up front.
            match link_file(sfd, name, dfd) {
                Ok(()) => return Ok(()),
                Err(rustix::io::Errno::MLINK) => {
                    tracing::debug!(path = %path.display(), "link limit reached; copying the file");
                }
                Err(e) => return Err(io_err("link", &path, e)),
            }
        }
        let src = rustix::fs::openat(
            sfd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err("open", &path, e))?;
        let dst = rustix::fs::openat(
            dfd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err("create", &path, e))?;
        self.content(&src, &dst, st.st_size as u64)
            .map_err(|e| Error::io("copy data", &path, e))?;
        self.metadata_fd(&src, &dst, st, &path)?;
        if self.mode == CopyMode::Content && st.st_nlink > 1 {
            self.links.insert(key, path);
        }
        Ok(())
    }

    /// Copies file data: reflink, else `copy_file_range`, else read/write.
    fn content(&mut self, src: &OwnedFd, dst: &OwnedFd, size: u64) -> io::Result<()> {
        if size == 0 {
            return Ok(());
        }
        if rustix::fs::ioctl_ficlone(dst, src).is_ok() {
            return Ok(());
        }
        let mut copied = 0u64;
        loop {
            match rustix::fs::copy_file_range(src, None, dst, None, 1 << 30) {
                Ok(0) => return Ok(()),
                Ok(n) => copied += n as u64,
                Err(rustix::io::Errno::INTR) => {}
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::OPNOTSUPP,
                ) if copied == 0 => break,
                Err(e) => return Err(e.into()),
            }
        }
        // Fallback: plain read/write through a reused buffer.
        if self.buf.is_empty() {
            self.buf = vec![0u8; 128 * 1024];
        }
        let mut r = File::from(src.try_clone()?);
        let mut w = File::from(dst.try_clone()?);
        loop {
            let n = match r.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            w.write_all(self.buf.get(..n).unwrap_or_default())?;
        }
    }

    /// Owner, mode, xattrs and times of the open regular file or directory `dst`, copied from
    /// the open source `src` whose stat is `st`.
    fn metadata_fd(&mut self, src: &OwnedFd, dst: &OwnedFd, st: &Stat, rel: &Path) -> Result<()> {
        let (uid, gid) = owner(st);
        rustix::fs::fchown(dst, uid, gid).map_err(|e| io_err("chown", rel, e))?;
        rustix::fs::fchmod(dst, perm_bits(st)).map_err(|e| io_err("chmod", rel, e))?;
        copy_xattrs(&mut self.xbuf, XNode::Fd(src), XNode::Fd(dst), rel)?;
        rustix::fs::futimens(dst, &timestamps(st)).map_err(|e| io_err("set times", rel, e))
    }

    /// Owner, mode (not for symlinks), xattrs and times of the node `name` in `dfd`, which cannot
    /// be opened (symlinks, FIFOs, devices, sockets), copied from `name` in `sfd`.
    fn metadata_at(
        &mut self,
        sfd: &OwnedFd,
        dfd: &OwnedFd,
        name: &CStr,
        st: &Stat,
        chmod: bool,
    ) -> Result<()> {
        let path = self.path_of(name);
        let (uid, gid) = owner(st);
        rustix::fs::chownat(dfd, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("chown", &path, e))?;
        if chmod {
            rustix::fs::chmodat(dfd, name, perm_bits(st), AtFlags::empty())
                .map_err(|e| io_err("chmod", &path, e))?;
        }
        let (sp, dp) = (proc_path(sfd, name), proc_path(dfd, name));
        copy_xattrs(&mut self.xbuf, XNode::Path(&sp), XNode::Path(&dp), &path)?;
        rustix::fs::utimensat(dfd, name, &timestamps(st), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("set times", &path, e))
    }
}

/// `name` in the open directory `dir`, as a path through `/proc/self/fd` (resolved against the
/// fd, with `name` itself not followed by the `l*xattr` calls).
fn proc_path(dir: &OwnedFd, name: &CStr) -> PathBuf {
    use std::os::fd::AsRawFd;
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(OsStr::from_bytes(name.to_bytes()));
    p
}

/// Where xattrs are read or written: an open file, or a path not to be followed.
enum XNode<'a> {
    Fd(&'a OwnedFd),
    Path(&'a Path),
}

/// Reusable buffers for xattr names and values (each at most 64 KiB on Linux).
struct XattrBuf {
    list: Vec<u8>,
    value: Vec<u8>,
}

impl XattrBuf {
    fn new() -> Self {
        XattrBuf {
            list: vec![0u8; 65536],
            value: vec![0u8; 65536],
        }
    }
}

fn copy_xattrs(buf: &mut XattrBuf, src: XNode<'_>, dst: XNode<'_>, rel: &Path) -> Result<()> {
    let listed = match &src {
        XNode::Fd(fd) => rustix::fs::flistxattr(fd, &mut buf.list[..]),
        XNode::Path(p) => rustix::fs::llistxattr(*p, &mut buf.list[..]),
    };
    let len = match listed {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(io_err("list xattrs", rel, e)),
    };
    let names = buf.list.get(..len).unwrap_or_default();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = OsStr::from_bytes(name);
        let got = match &src {
            XNode::Fd(fd) => rustix::fs::fgetxattr(fd, cname, &mut buf.value[..]),
            XNode::Path(p) => rustix::fs::lgetxattr(*p, cname, &mut buf.value[..]),
        };
        let n = match got {
            Ok(n) => n,
            // Removed between list and get.
            Err(rustix::io::Errno::NODATA) => continue,
            Err(e) => {
                return Err(xattr_err("read xattr", rel, name, e));
            }
        };
        let value = buf.value.get(..n).unwrap_or_default();
        let set = match &dst {
            XNode::Fd(fd) => rustix::fs::fsetxattr(fd, cname, value, XattrFlags::empty()),
            XNode::Path(p) => rustix::fs::lsetxattr(*p, cname, value, XattrFlags::empty()),
        };
        set.map_err(|e| xattr_err("set xattr", rel, name, e))?;
    }
    Ok(())
}

fn xattr_err(op: &str, rel: &Path, name: &[u8], e: rustix::io::Errno) -> Error {
    Error::io(
        format!("{op} {}", String::from_utf8_lossy(name)),
        rel,
        io::Error::from(e),
    )
}

#[cfg(test)]
mod tests;
