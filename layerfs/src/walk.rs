//! The one iterative depth-first walk of a tree.

use std::ffi::CStr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::{fmt, io};

use rustix::fs::{FileType, Stat};

use super::dirs::{DirEntry, read_dir_sorted, stat_at};
use super::stack::DirStack;
/// An I/O error of [`walk`] itself (listing, `lstat`, opening a directory), naming the
/// operation and the path. A [`Visitor`]'s error type converts from it, so a walk returns the
/// visitor's own errors and the walk's in one type.
#[derive(Debug)]
pub struct WalkError {
    /// What the walk was doing (`"lstat"`, `"open directory"`, ...).
    pub op: &'static str,
    /// The path, below the `display_root` given to [`walk`].
    pub path: PathBuf,
    /// The OS error.
    pub source: io::Error,
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.op, self.path.display(), self.source)
    }
}

impl std::error::Error for WalkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// What [`walk`] shows its caller.
pub trait Visitor {
    /// The visitor's error type; the walk's own failures arrive as [`WalkError`].
    type Error: From<WalkError>;

    /// The entry `name` of the directory open as `dir`; `rel` is the entry's path relative to
    /// the root (`a/b/name`) and `st` its `lstat`. Called in depth-first pre-order, the names of
    /// each directory sorted bytewise. Return `true` for a directory to walk into it (its
    /// entries follow, then [`leave`](Visitor::leave)); the value is ignored for other types.
    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        rel: &[u8],
        st: &Stat,
    ) -> Result<bool, Self::Error>;

    /// The directory `rel` (empty for the root), whose `lstat` is `st`, has just been opened as
    /// `dir` (checked to be the inode the listing saw) and its entries come next. Called for the
    /// root first and for each directory [`entry`](Visitor::entry) asked to walk into; `dir` is
    /// the descriptor to read the directory's own xattrs through.
    fn enter(&mut self, dir: BorrowedFd<'_>, rel: &[u8], st: &Stat) -> Result<(), Self::Error> {
        let _ = (dir, rel, st);
        Ok(())
    }

    /// Every entry of the directory open as `dir` (path `rel`, empty for the root, `lstat`
    /// `st` as given to [`entry`](Visitor::entry)) has been visited. Called for each directory
    /// walked into, and last for the root.
    fn leave(&mut self, dir: BorrowedFd<'_>, rel: &[u8], st: &Stat) -> Result<(), Self::Error> {
        let _ = (dir, rel, st);
        Ok(())
    }
}

struct Level {
    entries: Vec<DirEntry>,
    next: usize,
    stat: Stat,
}

fn io_err(op: &'static str, display_root: &Path, rel: &[u8], e: io::Error) -> WalkError {
    WalkError {
        op,
        path: display_root.join(Path::new(std::ffi::OsStr::from_bytes(rel))),
        source: e,
    }
}

/// Walks the tree below the directory `root` (an open descriptor), calling `v` for every
/// entry; `display_root` is only used in error messages.
///
/// Iterative (an explicit stack, no recursion) and built on [`DirStack`]: any depth is walked
/// with at most [`super::MAX_HELD_FDS`] directory descriptors and constant native stack. Every
/// directory is entered with [`super::open_dir_checked`] against the `lstat` its parent's
/// listing produced, so a directory swapped for a symlink or for another directory between the
/// listing and the descent stops the walk with an error; nothing below `root` is ever resolved
/// as a path.
pub fn walk<V: Visitor>(root: OwnedFd, display_root: &Path, v: &mut V) -> Result<(), V::Error> {
    let root_stat =
        rustix::fs::fstat(&root).map_err(|e| io_err("stat", display_root, b"", e.into()))?;
    let mut stack = DirStack::new(root).map_err(|e| io_err("open", display_root, b"", e))?;
    v.enter(stack.top(), b"", &root_stat)?;
    let entries =
        read_dir_sorted(stack.top()).map_err(|e| io_err("read directory", display_root, b"", e))?;
    let mut levels = vec![Level {
        entries,
        next: 0,
        stat: root_stat,
    }];
    let mut rel = Vec::new();
    loop {
        let Some(level) = levels.last_mut() else {
            return Ok(());
        };
        let Some(ent) = level.entries.get_mut(level.next) else {
            // This directory is done.
            let Some(done) = levels.pop() else {
                return Ok(());
            };
            v.leave(stack.top(), stack.rel(), &done.stat)?;
            if levels.is_empty() {
                return Ok(());
            }
            stack
                .pop()
                .map_err(|e| io_err("return to the parent of", display_root, stack.rel(), e))?;
            continue;
        };
        level.next += 1;
        // Each name is visited once: take it instead of copying it.
        let name = std::mem::take(&mut ent.name);
        rel.clear();
        rel.extend_from_slice(stack.rel());
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.to_bytes());
        let st = stat_at(stack.top(), &name).map_err(|e| io_err("lstat", display_root, &rel, e))?;
        let descend = v.entry(stack.top(), &name, &rel, &st)?;
        if descend && FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            stack
                .push(&name, Some(&st))
                .map_err(|e| io_err("open directory", display_root, &rel, e))?;
            v.enter(stack.top(), &rel, &st)?;
            let entries = read_dir_sorted(stack.top())
                .map_err(|e| io_err("read directory", display_root, &rel, e))?;
            levels.push(Level {
                entries,
                next: 0,
                stat: st,
            });
        }
    }
}
