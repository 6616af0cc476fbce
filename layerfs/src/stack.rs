//! The path of open directories from a root down to the current one, with bounded descriptors.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{Mode, OFlags, Stat};

use super::open::{moved_during_walk, open_dir_at, open_dir_checked};

/// How many directory descriptors a [`DirStack`] keeps open at most. Deeper levels close the
/// shallower descriptors and reopen them on the way back up.
pub const MAX_HELD_FDS: usize = 16;

struct Frame {
    /// `None` for a level whose descriptor was closed to bound the count.
    fd: Option<OwnedFd>,
    dev: u64,
    ino: u64,
    /// Length of `rel` before this level's name was appended (0 for the root).
    rel_len: usize,
}

/// A stack of open directories from a root down to the current (top) one.
///
/// [`push`](DirStack::push) opens a child of the top directory without following symlinks,
/// [`pop`](DirStack::pop) returns to its parent. At most [`MAX_HELD_FDS`] descriptors are open
/// at any depth: pushing deeper closes the shallowest one still open; popping back to a level
/// whose descriptor was closed reopens it as `..` of the level being left and checks that it is
/// the same directory (device and inode) as on the way down, so a directory moved elsewhere
/// during the walk is refused rather than followed.
///
/// [`rel`](DirStack::rel) is the top's path relative to the root, for messages and for
/// callers that need names; nothing here ever opens it as a path.
pub struct DirStack {
    frames: Vec<Frame>,
    rel: Vec<u8>,
    /// Descriptors kept open at most (at least 1: the top).
    max_held: usize,
}

impl DirStack {
    /// A stack holding only `root`, an open directory.
    pub fn new(root: OwnedFd) -> io::Result<DirStack> {
        Self::with_max_held(root, MAX_HELD_FDS)
    }

    /// A stack holding only `root` that keeps at most `max_held` descriptors open (at least
    /// one, the top's) instead of [`MAX_HELD_FDS`]: for walks that run many stacks side by side
    /// (one per lower layer), trading a reopen through `..` on the way up for descriptors.
    pub fn with_max_held(root: OwnedFd, max_held: usize) -> io::Result<DirStack> {
        let st = rustix::fs::fstat(&root)?;
        Ok(DirStack {
            frames: vec![Frame {
                fd: Some(root),
                dev: st.st_dev,
                ino: st.st_ino,
                rel_len: 0,
            }],
            rel: Vec::new(),
            max_held: max_held.max(1),
        })
    }

    /// The top directory's descriptor.
    pub fn top(&self) -> BorrowedFd<'_> {
        // The top frame always holds its descriptor: only frames below it are ever closed.
        match self.frames.last().and_then(|f| f.fd.as_ref()) {
            Some(fd) => fd.as_fd(),
            None => unreachable!("the top of a DirStack always holds its descriptor"),
        }
    }

    /// How many levels below the root the top is (0 at the root).
    pub fn depth(&self) -> usize {
        self.frames.len() - 1
    }

    /// The top's path relative to the root, as bytes (`a/b/c`; empty at the root).
    pub fn rel(&self) -> &[u8] {
        &self.rel
    }

    /// [`rel`](DirStack::rel) as a [`Path`].
    pub fn rel_path(&self) -> &Path {
        Path::new(std::ffi::OsStr::from_bytes(&self.rel))
    }

    /// Opens the child directory `name` of the top and makes it the top.
    ///
    /// With `expected`, the opened directory must be the inode it describes (from an earlier
    /// `lstat`), otherwise [`super::changed_during_walk`]; a symlink is refused either way.
    pub fn push(&mut self, name: &CStr, expected: Option<&Stat>) -> io::Result<()> {
        match expected {
            // Checked against `st` already: no second `fstat`.
            Some(st) => {
                let fd = open_dir_checked(self.top(), name, st)?;
                self.push_known(fd, name, st.st_dev, st.st_ino);
                Ok(())
            }
            None => {
                let fd = open_dir_at(self.top(), name)?;
                self.push_fd(fd, name)
            }
        }
    }

    /// Makes `fd`, an already open child directory `name` of the top, the top.
    pub fn push_fd(&mut self, fd: OwnedFd, name: &CStr) -> io::Result<()> {
        let st = rustix::fs::fstat(&fd)?;
        self.push_known(fd, name, st.st_dev, st.st_ino);
        Ok(())
    }

    fn push_known(&mut self, fd: OwnedFd, name: &CStr, dev: u64, ino: u64) {
        let rel_len = self.rel.len();
        if !self.rel.is_empty() {
            self.rel.push(b'/');
        }
        self.rel.extend_from_slice(name.to_bytes());
        self.frames.push(Frame {
            fd: Some(fd),
            dev,
            ino,
            rel_len,
        });
        let n = self.frames.len();
        if n > self.max_held {
            self.frames[n - 1 - self.max_held].fd = None;
        }
    }

    /// Leaves the top directory and returns its descriptor; the parent becomes the top
    /// (reopened through `..` and checked if its descriptor was closed). Popping the root
    /// returns `None`. On an error (the parent moved during the walk) the stack is unchanged.
    pub fn pop(&mut self) -> io::Result<Option<OwnedFd>> {
        let n = self.frames.len();
        if n == 1 {
            return Ok(None);
        }
        if self.frames[n - 2].fd.is_none() {
            let fd = rustix::fs::openat(
                self.top(),
                c"..",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let st = rustix::fs::fstat(&fd)?;
            let parent = &mut self.frames[n - 2];
            if st.st_dev != parent.dev || st.st_ino != parent.ino {
                return Err(moved_during_walk());
            }
            parent.fd = Some(fd);
        }
        let Some(frame) = self.frames.pop() else {
            return Ok(None);
        };
        self.rel.truncate(frame.rel_len);
        Ok(frame.fd)
    }
}
