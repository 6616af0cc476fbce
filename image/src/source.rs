//! Where an image's files are read from, confined to the image.
//!
//! * A directory: every file is opened from a descriptor of the image directory with
//!   [`archive::fs::open_beneath`] (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or an
//!   `O_NOFOLLOW` walk), so nothing outside the directory is ever opened. A symlink inside the
//!   image (older `docker save` links a repeated layer to its first copy) is resolved by name,
//!   within the image, and the result opened the same way; a symlink that leaves the image
//!   (absolute, or `..` past its top) is refused naming its path in the image. Only regular
//!   files are read: they are opened with `O_NONBLOCK` and checked with `fstat`, so a FIFO or a
//!   device (`/dev/zero`) is refused before a byte is read.
//! * A tar: indexed once ([`tar_index`](crate::tar_index), bounded memory); members are read by
//!   offset. Links between members are followed only to other members; a link that leaves the
//!   archive is refused.
//!
//! Errors name paths inside the image, never the target of a link, and nothing outside the
//! image is ever read, so no error can show its bytes or digest.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::path::{normalize, normalize_dots};
use crate::tar_index::{LinkTarget, TarIndex};

/// The most symlinks followed to open one file.
const MAX_LINKS: usize = 16;

/// An image: a directory or an indexed tar.
pub(crate) enum Source {
    /// An image directory (OCI layout or extracted `docker save`).
    Dir {
        /// The directory, opened once.
        root: OwnedFd,
    },
    /// An image tar.
    Tar {
        /// The tar file.
        file: Arc<File>,
        /// Its entries.
        index: TarIndex,
    },
}

/// A file of the image, opened for reading.
pub(crate) struct Opened {
    /// Its content.
    pub reader: Box<dyn Read + Send>,
    /// Its length in bytes.
    pub len: u64,
}

impl Source {
    /// Opens the image at `path` (a directory or a tar file; the caller's own argument).
    pub(crate) fn new(path: &Path) -> Result<Source> {
        let open = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open)?;
        if meta.is_dir() {
            let root = archive::fs::open_root_dir(path).map_err(open)?;
            return Ok(Source::Dir { root });
        }
        if !meta.is_file() {
            return Err(Error::NotAnImage {
                path: path.to_path_buf(),
            });
        }
        let file = File::open(path).map_err(open)?;
        let index = crate::tar_index::index(&file, path)?;
        Ok(Source::Tar {
            file: Arc::new(file),
            index,
        })
    }

    /// True if the image has an entry `name` (of any type, not followed).
    pub(crate) fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir { root } => {
                rustix::fs::statat(root, name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
            }
            Source::Tar { index, .. } => {
                let Ok(n) = normalize(name) else { return false };
                index.files.contains_key(&n) || index.links.contains_key(&n)
            }
        }
    }

    /// Opens the regular file `name` of the image.
    pub(crate) fn open(&self, name: &str) -> Result<Opened> {
        match self {
            Source::Dir { root } => {
                let file = open_in_dir(root.as_fd(), name)?;
                let len = file
                    .metadata()
                    .map_err(|source| Error::InImage {
                        op: "stat",
                        name: name.to_string(),
                        source,
                    })?
                    .len();
                // A file that grows while it is read is cut at the length it had.
                Ok(Opened {
                    reader: Box::new(io::BufReader::new(file).take(len)),
                    len,
                })
            }
            Source::Tar { file, index } => {
                let (offset, len) = resolve_in_tar(index, name)?;
                Ok(Opened {
                    reader: Box::new(io::BufReader::new(Member {
                        file: file.clone(),
                        pos: offset,
                        end: offset + len,
                    })),
                    len,
                })
            }
        }
    }
}

/// A tar member's data, read with `pread`.
struct Member {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for Member {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.end - self.pos).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The (offset, size) of tar member `name`, following links between members.
fn resolve_in_tar(index: &TarIndex, name: &str) -> Result<(u64, u64)> {
    let mut cur = normalize(name)?;
    for _ in 0..MAX_LINKS {
        if let Some(found) = index.files.get(&cur) {
            return Ok(*found);
        }
        match index.links.get(&cur) {
            Some(LinkTarget::Inside(next)) => cur = next.clone(),
            Some(LinkTarget::Outside) => return Err(Error::LinkLeavesImage { name: cur }),
            None => {
                return Err(match index.others.get(&cur) {
                    Some(t) => Error::NotRegularFile {
                        name: cur,
                        found: format!("tar type {:?}", char::from(*t)),
                    },
                    None => Error::NoFile { name: cur },
                });
            }
        }
    }
    Err(Error::TooManyLinks {
        name: name.to_string(),
    })
}

/// Opens regular file `name` beneath the image directory `root`, resolving symlinks only
/// inside the image.
fn open_in_dir(root: BorrowedFd<'_>, name: &str) -> Result<File> {
    let mut cur = normalize(name)?;
    for _ in 0..MAX_LINKS {
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY;
        match archive::fs::open_beneath(root, Path::new(&cur), flags) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd).map_err(|e| Error::InImage {
                    op: "stat",
                    name: cur.clone(),
                    source: e.into(),
                })?;
                let t = FileType::from_raw_mode(st.st_mode);
                if t != FileType::RegularFile {
                    return Err(Error::NotRegularFile {
                        name: cur,
                        found: archive::fs::describe(t).to_string(),
                    });
                }
                return Ok(File::from(fd));
            }
            Err(e)
                if [Errno::LOOP, Errno::XDEV, Errno::NOTDIR]
                    .iter()
                    .any(|n| e.raw_os_error() == Some(n.raw_os_error())) =>
            {
                match follow_inside(root, &cur)? {
                    Some(next) => cur = next,
                    None => {
                        return Err(Error::InImage {
                            op: "open",
                            name: cur,
                            source: e,
                        });
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NoFile { name: cur });
            }
            Err(e) => {
                return Err(Error::InImage {
                    op: "open",
                    name: cur,
                    source: e,
                });
            }
        }
    }
    Err(Error::TooManyLinks {
        name: name.to_string(),
    })
}

/// Finds the first symlink on `path` and returns the path with it replaced by its target,
/// resolved inside the image; an error naming the link if its target leaves the image; `None`
/// if there is no symlink on the way (something else made the open fail).
fn follow_inside(root: BorrowedFd<'_>, path: &str) -> Result<Option<String>> {
    let parts: Vec<&str> = path.split('/').collect();
    let mut dir: Option<OwnedFd> = None;
    for (i, part) in parts.iter().enumerate() {
        let base = dir.as_ref().map_or(root, |d| d.as_fd());
        let here = parts[..=i].join("/");
        let st = match rustix::fs::statat(base, *part, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Err(Error::NoFile { name: here }),
            Err(e) => {
                return Err(Error::InImage {
                    op: "stat",
                    name: here,
                    source: e.into(),
                });
            }
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(base, *part, Vec::new()).map_err(|e| {
                    Error::InImage {
                        op: "read symlink",
                        name: here.clone(),
                        source: e.into(),
                    }
                })?;
                let target = target.to_string_lossy().into_owned();
                let leaves = || Error::LinkLeavesImage { name: here.clone() };
                if target.starts_with('/') {
                    return Err(leaves());
                }
                let mut joined = parts[..i].join("/");
                joined.push('/');
                joined.push_str(&target);
                for rest in &parts[i + 1..] {
                    joined.push('/');
                    joined.push_str(rest);
                }
                let next = normalize_dots(&joined).ok_or_else(leaves)?;
                if next.is_empty() {
                    return Err(leaves());
                }
                return Ok(Some(next));
            }
            FileType::Directory if i + 1 < parts.len() => {
                let open_error = |source| Error::InImage {
                    op: "open",
                    name: here.clone(),
                    source,
                };
                let c_name = std::ffi::CString::new(*part)
                    .map_err(|e| open_error(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
                dir = Some(archive::fs::open_dir_at(base, &c_name).map_err(open_error)?);
            }
            t if i + 1 < parts.len() => {
                return Err(Error::NotADirectory {
                    name: here,
                    found: archive::fs::describe(t).to_string(),
                });
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Reads through a limit: more than `limit` bytes is an error naming the blob and both sizes,
/// raised as soon as byte `limit + 1` arrives, so a blob longer than its descriptor says (or
/// one that never ends) is never read further.
pub(crate) struct Limited<R> {
    inner: R,
    limit: u64,
    read: u64,
    what: Arc<str>,
}

impl<R> Limited<R> {
    /// Limits `inner` to `limit` bytes; `what` names the blob in the error.
    pub(crate) fn new(inner: R, limit: u64, what: impl Into<Arc<str>>) -> Self {
        Limited {
            inner,
            limit,
            read: 0,
            what: what.into(),
        }
    }
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.read >= self.limit {
            // Everything allowed was read: one more byte is the error, end of file is not.
            let mut probe = [0u8; 1];
            let n = loop {
                match self.inner.read(&mut probe) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other?,
                }
            };
            if n == 0 {
                return Ok(0);
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                Error::LongerThanDeclared {
                    blob: self.what.to_string(),
                    declared: self.limit,
                    found: self.limit + 1,
                },
            ));
        }
        let room = usize::try_from(self.limit - self.read).unwrap_or(usize::MAX);
        let want = buf.len().min(room);
        let n = self.inner.read(&mut buf[..want])?;
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn limited_fails_at_one_byte_past_the_limit() {
        // An endless stream (what /dev/zero would give): stops at limit + 1.
        let mut r = Limited::new(io::repeat(0), 1000, "sha256:abc");
        let mut buf = Vec::new();
        let e = r.read_to_end(&mut buf).unwrap_err().to_string();
        assert!(
            e.contains("sha256:abc") && e.contains("1000") && e.contains("1001"),
            "{e}"
        );
        assert_eq!(buf.len(), 1000);
        // Exactly the limit is fine.
        let mut r = Limited::new(&[7u8; 1000][..], 1000, "x");
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).unwrap();
        assert_eq!(buf.len(), 1000);
    }
}
