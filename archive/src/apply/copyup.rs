//! Copy-up for hardlinks into an overlay upper: a layer tar may link to a file its parent
//! layers hold (our own exporter writes such links so hardlink groups survive, see
//! [`crate::export_changes`]); applied straight into an upper directory, that file is not
//! there. Like overlayfs before a `link(2)` to a lower file, the file is first copied up from
//! the topmost lower that has it, with the parent directories it needs.
//!
//! Lowers are read below their descriptors one component at a time, never following a symlink,
//! with overlay's lookup rules: a whiteout (char 0/0) ends the search, an opaque directory hides
//! the lowers below it, and a non-directory hides what a lower below has under its name.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps};

use crate::fs::{self as lfs, XattrTarget};
use crate::whiteout::OverlayXattr;

/// What an entry is, for overlay's lookup.
enum Found {
    Missing,
    Whiteout,
    Dir(Stat),
    Other(Stat),
}

fn look(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Found> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => Found::Dir(st),
            FileType::CharacterDevice if st.st_rdev == 0 => Found::Whiteout,
            _ => Found::Other(st),
        }),
        Err(rustix::io::Errno::NOENT) => Ok(Found::Missing),
        Err(e) => Err(e.into()),
    }
}

fn is_opaque(dir: BorrowedFd<'_>, ns: OverlayXattr) -> io::Result<bool> {
    let name =
        CString::new(ns.opaque_name()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(lfs::get_xattr(XattrTarget::Fd(dir), &name)?.is_some_and(|v| v == b"y"))
}

fn open_dir(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    lfs::open_dir_at(dir, name)
}

/// Copies `rel` (a path of normal components, at least one) up from `lowers` (topmost first)
/// into the upper open as `root`, if the upper lacks it and a lower shows it. Returns whether
/// it copied; `false` leaves the caller's own error (the link target is missing) to stand.
pub(super) fn copy_up(
    root: BorrowedFd<'_>,
    lowers: &[Arc<OwnedFd>],
    ns: OverlayXattr,
    rel: &Path,
    same_owner: bool,
) -> io::Result<bool> {
    let comps = components(rel)?;
    let Some((last, parents)) = comps.split_last() else {
        return Ok(false);
    };
    let Some(mut upper_dirs) = walk_upper(root, ns, parents)? else {
        return Ok(false);
    };
    // The upper has every parent: then it must lack the entry itself.
    if upper_dirs.len() == parents.len() + 1 {
        let has = upper_dirs
            .last()
            .map(|d| look(d.as_fd(), last))
            .transpose()?;
        if !matches!(has, Some(Found::Missing)) {
            return Ok(false);
        }
    }
    let existing = upper_dirs.len() - 1;
    let Some(found) = find_in_lowers(lowers, ns, parents, last)? else {
        return Ok(false);
    };
    let LowerFind {
        dir: src_dir,
        st,
        is_dir,
        dir_meta,
    } = found;
    if is_dir || dir_meta.iter().skip(existing).any(Option::is_none) {
        return Ok(false);
    }
    // The deepest directory the upper already has gets its times back afterwards: the copy-up
    // is not a change of it.
    let deepest = upper_dirs
        .pop()
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let deepest_st = rustix::fs::fstat(deepest.as_fd())?;
    let mut dir = lfs::open_dir_at(deepest.as_fd(), c".")?;
    let mut created: Vec<(OwnedFd, Stat)> = Vec::new();
    for (name, meta) in parents.iter().zip(&dir_meta).skip(existing) {
        let Some(meta) = meta else {
            return Ok(false);
        };
        rustix::fs::mkdirat(dir.as_fd(), name.as_c_str(), Mode::from_raw_mode(0o700))?;
        let next = open_dir(dir.as_fd(), name)?;
        if same_owner {
            rustix::fs::fchown(
                next.as_fd(),
                Some(rustix::fs::Uid::from_raw(meta.st_uid)),
                Some(rustix::fs::Gid::from_raw(meta.st_gid)),
            )?;
        }
        rustix::fs::fchmod(next.as_fd(), Mode::from_raw_mode(meta.st_mode & 0o7777))?;
        created.push((lfs::open_dir_at(next.as_fd(), c".")?, *meta));
        dir = next;
    }
    copy_entry(src_dir.as_fd(), dir.as_fd(), last, &st, same_owner, ns)?;
    for (fd, meta) in created.iter().rev() {
        set_times(fd.as_fd(), meta)?;
    }
    set_times(deepest.as_fd(), &deepest_st)?;
    Ok(true)
}

fn times_of(st: &Stat) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

fn set_times(fd: BorrowedFd<'_>, st: &Stat) -> io::Result<()> {
    rustix::fs::futimens(fd, &times_of(st))?;
    Ok(())
}

/// Copies the non-directory `name` of `from` into `to` under the same name: content, mode,
/// owner (with `same_owner`), xattrs other than overlay's own, and times.
fn copy_entry(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    name: &CStr,
    st: &Stat,
    same_owner: bool,
    ns: OverlayXattr,
) -> io::Result<()> {
    let mode = st.st_mode & 0o7777;
    let owner = || {
        (
            Some(rustix::fs::Uid::from_raw(st.st_uid)),
            Some(rustix::fs::Gid::from_raw(st.st_gid)),
        )
    };
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {
            let src = rustix::fs::openat(
                from,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let dst = rustix::fs::openat(
                to,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            let (mut src, mut dst) = (File::from(src), File::from(dst));
            io::copy(&mut src, &mut dst)?;
            // Owner first: a chown clears `security.capability`.
            if same_owner {
                let (u, g) = owner();
                rustix::fs::fchown(&dst, u, g)?;
            }
            copy_xattrs(XattrTarget::Fd(src.as_fd()), to, name, ns)?;
            rustix::fs::fchmod(&dst, Mode::from_raw_mode(mode))?;
            rustix::fs::futimens(&dst, &times_of(st))?;
            return Ok(());
        }
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(from, name, Vec::new())?;
            rustix::fs::symlinkat(target.as_c_str(), to, name)?;
        }
        FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice => {
            rustix::fs::mknodat(
                to,
                name,
                FileType::from_raw_mode(st.st_mode),
                Mode::from_raw_mode(mode),
                st.st_rdev,
            )?;
        }
        _ => return Err(io::Error::from(io::ErrorKind::Unsupported)),
    }
    if same_owner {
        let (u, g) = owner();
        rustix::fs::chownat(to, name, u, g, AtFlags::SYMLINK_NOFOLLOW)?;
    }
    copy_xattrs(XattrTarget::At(from, name), to, name, ns)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
        rustix::fs::chmodat(to, name, Mode::from_raw_mode(mode), AtFlags::empty())?;
    }
    rustix::fs::utimensat(to, name, &times_of(st), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// Copies the xattrs of `src` to the entry `name` of `to`, except overlay's own.
fn copy_xattrs(
    src: XattrTarget<'_>,
    to: BorrowedFd<'_>,
    name: &CStr,
    ns: OverlayXattr,
) -> io::Result<()> {
    for attr in lfs::list_xattrs(src)? {
        if attr.as_bytes().starts_with(ns.prefix().as_bytes()) {
            continue;
        }
        if let Some(value) = lfs::get_xattr(src, &attr)? {
            lfs::set_xattr_at(to, name, &attr, &value)?;
        }
    }
    Ok(())
}

/// Whether the merged view below the upper open as `root` would show `rel` from a lower: no
/// directory on the way in the upper is opaque or replaced, and a lower (topmost first, with
/// overlay's lookup rules) has it. A whiteout for a name no lower shows hides nothing; written
/// anyway it would show in listings of a directory overlayfs reads as it is (one only the
/// upper has, or an opaque one) as a name that cannot be opened.
pub(super) fn visible_in_lowers(
    root: BorrowedFd<'_>,
    lowers: &[Arc<OwnedFd>],
    ns: OverlayXattr,
    rel: &Path,
) -> io::Result<bool> {
    let comps = components(rel)?;
    let Some((last, parents)) = comps.split_last() else {
        return Ok(false);
    };
    if walk_upper(root, ns, parents)?.is_none() {
        return Ok(false);
    }
    Ok(find_in_lowers(lowers, ns, parents, last)?.is_some())
}

/// The upper's directories along `parents` from `root`, down to the deepest it has (the root
/// first, so never empty); `None` when an opaque directory, a whiteout or a non-directory on
/// the way hides the lowers there.
fn walk_upper(
    root: BorrowedFd<'_>,
    ns: OverlayXattr,
    parents: &[CString],
) -> io::Result<Option<Vec<OwnedFd>>> {
    let mut dirs = vec![lfs::open_dir_at(root, c".")?];
    for name in parents {
        let Some(cur) = dirs.last() else { break };
        match look(cur.as_fd(), name)? {
            Found::Missing => break,
            Found::Dir(_) => {
                let next = open_dir(cur.as_fd(), name)?;
                if is_opaque(next.as_fd(), ns)? {
                    return Ok(None);
                }
                dirs.push(next);
            }
            Found::Whiteout | Found::Other(_) => return Ok(None),
        }
    }
    Ok(Some(dirs))
}

/// What the lowers show at a path ([`find_in_lowers`]).
struct LowerFind {
    /// The lower directory holding it.
    dir: OwnedFd,
    /// Its `lstat`.
    st: Stat,
    /// It is a directory.
    is_dir: bool,
    /// For each parent, the `lstat` of the topmost lower directory there.
    dir_meta: Vec<Option<Stat>>,
}

/// The entry `last` below `parents` as the merged view of `lowers` (topmost first) shows it,
/// with overlay's lookup rules: a whiteout ends the search, an opaque directory hides the
/// lowers below it, a non-directory hides what lowers below have under its name.
fn find_in_lowers(
    lowers: &[Arc<OwnedFd>],
    ns: OverlayXattr,
    parents: &[CString],
    last: &CStr,
) -> io::Result<Option<LowerFind>> {
    let mut dir_meta: Vec<Option<Stat>> = vec![None; parents.len()];
    'lowers: for lower in lowers {
        let mut stop_below = false;
        let mut cur = lfs::open_dir_at(lower.as_fd(), c".")?;
        for (k, name) in parents.iter().enumerate() {
            match look(cur.as_fd(), name)? {
                Found::Missing => continue 'lowers,
                Found::Dir(st) => {
                    dir_meta[k].get_or_insert(st);
                    cur = open_dir(cur.as_fd(), name)?;
                    stop_below |= is_opaque(cur.as_fd(), ns)?;
                }
                Found::Whiteout | Found::Other(_) => return Ok(None),
            }
        }
        match look(cur.as_fd(), last)? {
            Found::Other(st) => {
                return Ok(Some(LowerFind {
                    dir: cur,
                    st,
                    is_dir: false,
                    dir_meta,
                }));
            }
            Found::Dir(st) => {
                return Ok(Some(LowerFind {
                    dir: cur,
                    st,
                    is_dir: true,
                    dir_meta,
                }));
            }
            Found::Whiteout => return Ok(None),
            Found::Missing if stop_below => return Ok(None),
            Found::Missing => {}
        }
    }
    Ok(None)
}

/// The lowers seen from the directory an apply writes in, for [`LowerView::visible`]: cursors
/// (`crate::change::Lowers`) that follow the parent path of the last question, moved by the
/// common prefix to the next one. A tar lists entries directory by directory, so answering for
/// a whole layer costs about one `fstatat` per lower and entry, not one per path component:
/// a layer nested thousands of directories deep with a whiteout on every level stays linear.
///
/// The upper's side is what this apply marked opaque ([`LowerView::mark_opaque`]; the view is
/// only used for an upper that started empty, so nothing else in it can hide the lowers),
/// recorded as keyed hashes of their paths, one `u64` each.
pub(super) struct LowerView {
    lowers: crate::change::Lowers,
    /// The components the cursors stand at.
    path: Vec<CString>,
    /// `hashes[k]`: the keyed hash of `path[..k]` (`hashes[0]` is the root's).
    hashes: Vec<u64>,
    /// The shallowest depth on `path` this apply marked opaque.
    upper_opaque_from: Option<usize>,
    /// Keyed hashes of the directories this apply marked opaque.
    marked: std::collections::HashSet<u64>,
    keys: std::hash::RandomState,
}

impl LowerView {
    /// A view of `lowers` (topmost first).
    pub(super) fn new(lowers: &[Arc<OwnedFd>], ns: OverlayXattr) -> io::Result<LowerView> {
        let mut fds = Vec::with_capacity(lowers.len());
        let mut paths = Vec::with_capacity(lowers.len());
        for (i, l) in lowers.iter().enumerate() {
            fds.push(l.as_fd().try_clone_to_owned()?);
            paths.push(std::path::PathBuf::from(format!("<lower layer {i}>")));
        }
        let lowers = crate::change::Lowers::from_fds(fds, paths, ns).map_err(to_io)?;
        Ok(LowerView {
            lowers,
            path: Vec::new(),
            hashes: vec![0],
            upper_opaque_from: None,
            marked: std::collections::HashSet::new(),
            keys: std::hash::RandomState::new(),
        })
    }

    fn hash_next(&self, prev: u64, comp: &CStr) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.keys.build_hasher();
        prev.hash(&mut h);
        comp.to_bytes().hash(&mut h);
        h.finish()
    }

    /// Moves the cursors to the directory `dir` (components from the root).
    fn reach(&mut self, dir: &[CString]) -> io::Result<()> {
        let common = self
            .path
            .iter()
            .zip(dir)
            .take_while(|(a, b)| a == b)
            .count();
        while self.path.len() > common {
            let depth = self.path.len();
            self.lowers.pop(b"").map_err(to_io)?;
            self.path.pop();
            self.hashes.pop();
            if self.upper_opaque_from == Some(depth) {
                self.upper_opaque_from = None;
            }
        }
        for comp in &dir[common..] {
            let prev = self.hashes.last().copied().unwrap_or(0);
            let h = self.hash_next(prev, comp);
            self.lowers.push(comp, b"").map_err(to_io)?;
            self.path.push(comp.clone());
            self.hashes.push(h);
            if self.upper_opaque_from.is_none() && self.marked.contains(&h) {
                self.upper_opaque_from = Some(self.path.len());
            }
        }
        Ok(())
    }

    /// Records that this apply marked the directory `dir` opaque.
    pub(super) fn mark_opaque(&mut self, dir: &Path) -> io::Result<()> {
        let comps = components(dir)?;
        let mut h = 0;
        for c in &comps {
            h = self.hash_next(h, c);
        }
        self.marked.insert(h);
        // The cursors may stand at or below it.
        let depth = comps.len();
        if depth <= self.path.len()
            && self.path[..depth] == comps[..]
            && self.upper_opaque_from.is_none_or(|d| d > depth)
        {
            self.upper_opaque_from = Some(depth);
        }
        Ok(())
    }

    /// Whether the merged view would show `rel` from a lower (see [`visible_in_lowers`]).
    pub(super) fn visible(&mut self, rel: &Path) -> io::Result<bool> {
        let comps = components(rel)?;
        let Some((last, parents)) = comps.split_last() else {
            return Ok(false);
        };
        self.reach(parents)?;
        if self.upper_opaque_from.is_some() {
            return Ok(false);
        }
        Ok(self.lowers.lookup(last, b"").map_err(to_io)?.is_some())
    }
}

fn components(rel: &Path) -> io::Result<Vec<CString>> {
    rel.components()
        .map(|c| CString::new(c.as_os_str().as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn to_io(e: crate::Error) -> io::Error {
    match e {
        crate::Error::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}
