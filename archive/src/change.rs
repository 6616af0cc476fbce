//! Changes between two trees: what a layer adds, modifies and deletes.
//!
//! The rules are documented on [`changes`] and [`changes_from_overlay_upper`].

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Stat};

use crate::{Error, OverlayXattr, Result};

/// What happened to a path between the parent tree and the layer's tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChangeKind {
    /// The path exists in both trees and differs (`C` in `docker diff`).
    Modify,
    /// The path exists only in the new tree (`A`).
    Add,
    /// The path exists only in the old tree (`D`).
    Delete,
}

impl ChangeKind {
    /// The one-letter code `docker diff` prints: `C`, `A` or `D`.
    pub fn letter(self) -> char {
        match self {
            ChangeKind::Modify => 'C',
            ChangeKind::Add => 'A',
            ChangeKind::Delete => 'D',
        }
    }
}

/// One change: a path, written as an absolute path from the layer's root (`/etc/passwd`), and
/// what happened to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Change {
    /// The changed path, absolute from the layer root.
    pub path: PathBuf,
    /// What happened to it.
    pub kind: ChangeKind,
}

impl fmt::Display for Change {
    /// Formats as `docker diff` does: `"A /path"`, the path written by
    /// [`crate::quote::quote_name`] (raw when plain, else a Go-style quoted string), so that a
    /// name holding a newline or escape sequence cannot forge a line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = crate::quote::quote_name(self.path.as_os_str().as_bytes());
        write!(f, "{} {path}", self.kind.letter())
    }
}

/// The xattr compared by [`changes`] besides the inode metadata.
const CAPABILITY: &str = "security.capability";

/// Size of each of the two buffers used to compare file contents.
const CMP_BUF: usize = 64 * 1024;

/// One directory entry as `getdents64` reports it.
struct Ent {
    name: CString,
    ino: u64,
    ft: FileType,
}

fn os_name(name: &CStr) -> &OsStr {
    OsStr::from_bytes(name.to_bytes())
}

fn rerr(op: &str, path: &Path, e: rustix::io::Errno) -> Error {
    Error::io(op, path, io::Error::from(e))
}

/// Opens `name` below `dir` as a directory without following symlinks.
pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr, path: &Path) -> Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| rerr("open directory", path, e))
}

fn open_root(path: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| rerr("open directory", path, e))
}

/// Reads every entry of `dir` except `.` and `..`, sorted bytewise by name.
fn read_entries(dir: BorrowedFd<'_>, path: &Path) -> Result<Vec<Ent>> {
    let mut d = Dir::read_from(dir).map_err(|e| rerr("read directory", path, e))?;
    let mut out = Vec::new();
    while let Some(ent) = d.read() {
        let ent = ent.map_err(|e| rerr("read directory", path, e))?;
        let name = ent.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        out.push(Ent {
            name: name.to_owned(),
            ino: ent.ino(),
            ft: ent.file_type(),
        });
    }
    out.sort_unstable_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    Ok(out)
}

fn lstat_at(dir: BorrowedFd<'_>, name: &CStr, path: &Path) -> Result<Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| rerr("lstat", path, e))
}

/// Reads xattr `name` of `path` without following symlinks; `None` when absent or unsupported.
pub(crate) fn get_xattr(path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    match xattr::get(path, name) {
        Ok(v) => Ok(v),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTSUP) | Some(libc::ENODATA) | Some(libc::EPERM)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::io(format!("read xattr {name} of"), path, e)),
    }
}

fn ns_of(sec: i64, nsec: i64) -> i128 {
    i128::from(sec) * 1_000_000_000 + i128::from(nsec)
}

/// Whether two mtimes are equal under the tar-truncation rule.
fn times_equal(a: (i64, i64), b: (i64, i64)) -> bool {
    a.0 == b.0 && (a.1 == 0 || b.1 == 0 || a.1 == b.1)
}

#[allow(clippy::unnecessary_cast)]
fn mtime(st: &Stat) -> (i64, i64) {
    (st.st_mtime as i64, st.st_mtime_nsec as i64)
}

#[allow(clippy::unnecessary_cast)]
fn ctime(st: &Stat) -> (i64, i64) {
    (st.st_ctime as i64, st.st_ctime_nsec as i64)
}

#[allow(clippy::unnecessary_cast)]
fn base_meta_differs(a: &Stat, b: &Stat) -> bool {
    a.st_mode as u32 != b.st_mode as u32
        || a.st_uid != b.st_uid
        || a.st_gid != b.st_gid
        || a.st_rdev as u64 != b.st_rdev as u64
}

fn child(rel: &Path, name: &CStr) -> PathBuf {
    rel.join(os_name(name))
}

fn abs(rel: &Path) -> PathBuf {
    Path::new("/").join(rel)
}

/// Compares two trees and lists what changed from `old` to `new`.
///
/// `old` of `None` means an empty parent: everything in `new` is an [`ChangeKind::Add`]. The
/// roots themselves are never reported.
///
/// # Rules
///
/// Both trees are walked together, directory by directory, through directory file descriptors
/// (`openat` + `getdents64`, every name resolved relative to its parent's descriptor and never
/// following symlinks). Names are compared bytewise; the output is in [`Path`] order (component by
/// component), so a directory always comes before the entries below it.
///
/// * A name only in the new tree is an [`ChangeKind::Add`]; an added directory is reported
///   together with *everything* below it (each as `Add`).
/// * A name only in the old tree is one [`ChangeKind::Delete`], also for a whole directory.
/// * A name in both trees whose two entries have the **same inode number on the same device**
///   (checked with one `fstat` per directory pair) is the same object and is skipped without any
///   `stat`; for a directory the whole subtree is skipped without being entered. This is what
///   makes diffing a hardlink-copied tree (files shared, directories copied) cost little more
///   than reading the directories.
/// * Otherwise both entries are `lstat`ed. A different file type is a `Modify` (a new directory's
///   contents are then all `Add`). Same type: the entry is modified when mode (including
///   setuid/setgid/sticky), uid, gid or rdev differ, or the `security.capability` xattr differs
///   (like moby, no other xattr is compared: `user.*` attributes are not part of the change
///   rules), or — for non-directories only — size or mtime differ. A directory's mtime alone is
///   ignored. A directory with changes below it is reported as `Modify` before its children.
/// * Mtimes are equal when the seconds match and either nanosecond field is zero (tar keeps
///   whole seconds only), otherwise when seconds and nanoseconds match.
/// * Symlinks with different inodes compare their targets.
/// * **Same-size, same-mtime files** (the case moby misses, moby issues 21555 and 31805): when two
///   regular files have different inodes, equal size and equal mtime, their *content* is
///   compared (streaming, two fixed 64 KiB buffers) if either
///   (a) the new file's ctime is less than one second after its mtime — the *racy* rule git uses
///   for its index: the metadata was last changed within the same clock tick as the content
///   claims to have been written, so a rewrite within that tick that restored the mtime is
///   indistinguishable by metadata — or
///   (b) both nanosecond fields are zero (a tar-extracted tree; containerd's rule).
///   No sleeping is needed to make changes visible.
pub fn changes(new: &Path, old: Option<&Path>) -> Result<Vec<Change>> {
    let mut w = Walker {
        out: Vec::new(),
        buf_a: vec![0; CMP_BUF],
        buf_b: vec![0; CMP_BUF],
    };
    let new_fd = open_root(new)?;
    match old {
        None => w.add_all(new_fd.as_fd(), new, Path::new(""))?,
        Some(old) => {
            let old_fd = open_root(old)?;
            w.diff_dir(new_fd.as_fd(), old_fd.as_fd(), new, old, Path::new(""))?;
        }
    }
    Ok(w.out)
}

struct Walker {
    out: Vec<Change>,
    buf_a: Vec<u8>,
    buf_b: Vec<u8>,
}

impl Walker {
    fn push(&mut self, rel: &Path, kind: ChangeKind) {
        self.out.push(Change {
            path: abs(rel),
            kind,
        });
    }

    /// Reports everything below the directory `dir` as added.
    fn add_all(&mut self, dir: BorrowedFd<'_>, full: &Path, rel: &Path) -> Result<()> {
        for e in read_entries(dir, full)? {
            let rel_c = child(rel, &e.name);
            self.push(&rel_c, ChangeKind::Add);
            let full_c = full.join(os_name(&e.name));
            let is_dir = match e.ft {
                FileType::Directory => true,
                FileType::Unknown => {
                    let st = lstat_at(dir, &e.name, &full_c)?;
                    FileType::from_raw_mode(st.st_mode) == FileType::Directory
                }
                _ => false,
            };
            if is_dir {
                let fd = open_dir_at(dir, &e.name, &full_c)?;
                self.add_all(fd.as_fd(), &full_c, &rel_c)?;
            }
        }
        Ok(())
    }

    fn diff_dir(
        &mut self,
        new: BorrowedFd<'_>,
        old: BorrowedFd<'_>,
        new_full: &Path,
        old_full: &Path,
        rel: &Path,
    ) -> Result<()> {
        let new_dev = rustix::fs::fstat(new)
            .map_err(|e| rerr("stat", new_full, e))?
            .st_dev;
        let old_dev = rustix::fs::fstat(old)
            .map_err(|e| rerr("stat", old_full, e))?
            .st_dev;
        let same_dev = new_dev == old_dev;
        let new_ents = read_entries(new, new_full)?;
        let old_ents = read_entries(old, old_full)?;
        let (mut i, mut j) = (0, 0);
        while i < new_ents.len() || j < old_ents.len() {
            let ord = match (new_ents.get(i), old_ents.get(j)) {
                (Some(n), Some(o)) => n.name.as_bytes().cmp(o.name.as_bytes()),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match ord {
                std::cmp::Ordering::Less => {
                    let e = &new_ents[i];
                    i += 1;
                    let rel_c = child(rel, &e.name);
                    let full_c = new_full.join(os_name(&e.name));
                    self.push(&rel_c, ChangeKind::Add);
                    let st_is_dir = match e.ft {
                        FileType::Directory => true,
                        FileType::Unknown => {
                            FileType::from_raw_mode(lstat_at(new, &e.name, &full_c)?.st_mode)
                                == FileType::Directory
                        }
                        _ => false,
                    };
                    if st_is_dir {
                        let fd = open_dir_at(new, &e.name, &full_c)?;
                        self.add_all(fd.as_fd(), &full_c, &rel_c)?;
                    }
                }
                std::cmp::Ordering::Greater => {
                    let e = &old_ents[j];
                    j += 1;
                    self.push(&child(rel, &e.name), ChangeKind::Delete);
                }
                std::cmp::Ordering::Equal => {
                    let (n, o) = (&new_ents[i], &old_ents[j]);
                    i += 1;
                    j += 1;
                    if same_dev && n.ino == o.ino {
                        continue;
                    }
                    self.diff_entry(new, old, new_full, old_full, rel, &n.name)?;
                }
            }
        }
        Ok(())
    }

    fn diff_entry(
        &mut self,
        new: BorrowedFd<'_>,
        old: BorrowedFd<'_>,
        new_full: &Path,
        old_full: &Path,
        rel: &Path,
        name: &CStr,
    ) -> Result<()> {
        let rel_c = child(rel, name);
        let new_c = new_full.join(os_name(name));
        let old_c = old_full.join(os_name(name));
        let ns = lstat_at(new, name, &new_c)?;
        let os = lstat_at(old, name, &old_c)?;
        let nt = FileType::from_raw_mode(ns.st_mode);
        let ot = FileType::from_raw_mode(os.st_mode);
        if nt != ot {
            self.push(&rel_c, ChangeKind::Modify);
            if nt == FileType::Directory {
                let fd = open_dir_at(new, name, &new_c)?;
                self.add_all(fd.as_fd(), &new_c, &rel_c)?;
            }
            return Ok(());
        }
        if nt == FileType::Directory {
            let modified = base_meta_differs(&ns, &os)
                || get_xattr(&new_c, CAPABILITY)? != get_xattr(&old_c, CAPABILITY)?;
            let mark = self.out.len();
            if modified {
                self.push(&rel_c, ChangeKind::Modify);
            }
            let nfd = open_dir_at(new, name, &new_c)?;
            let ofd = open_dir_at(old, name, &old_c)?;
            self.diff_dir(nfd.as_fd(), ofd.as_fd(), &new_c, &old_c, &rel_c)?;
            if !modified && self.out.len() > mark {
                self.out.insert(
                    mark,
                    Change {
                        path: abs(&rel_c),
                        kind: ChangeKind::Modify,
                    },
                );
            }
            return Ok(());
        }
        if self.file_differs(new, old, name, &new_c, &old_c, &ns, &os)? {
            self.push(&rel_c, ChangeKind::Modify);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn file_differs(
        &mut self,
        new: BorrowedFd<'_>,
        old: BorrowedFd<'_>,
        name: &CStr,
        new_c: &Path,
        old_c: &Path,
        ns: &Stat,
        os: &Stat,
    ) -> Result<bool> {
        if base_meta_differs(ns, os) || ns.st_size != os.st_size {
            return Ok(true);
        }
        let (nm, om) = (mtime(ns), mtime(os));
        if !times_equal(nm, om) {
            return Ok(true);
        }
        if get_xattr(new_c, CAPABILITY)? != get_xattr(old_c, CAPABILITY)? {
            return Ok(true);
        }
        match FileType::from_raw_mode(ns.st_mode) {
            FileType::Symlink => {
                let a = rustix::fs::readlinkat(new, name, Vec::new())
                    .map_err(|e| rerr("readlink", new_c, e))?;
                let b = rustix::fs::readlinkat(old, name, Vec::new())
                    .map_err(|e| rerr("readlink", old_c, e))?;
                Ok(a != b)
            }
            FileType::RegularFile => {
                let (cs, cn) = ctime(ns);
                let racy = ns_of(cs, cn) - ns_of(nm.0, nm.1) < 1_000_000_000;
                let truncated = nm.1 == 0 && om.1 == 0;
                if racy || truncated {
                    self.content_differs(new, old, name, new_c, old_c)
                } else {
                    Ok(false)
                }
            }
            _ => Ok(false),
        }
    }

    fn content_differs(
        &mut self,
        new: BorrowedFd<'_>,
        old: BorrowedFd<'_>,
        name: &CStr,
        new_c: &Path,
        old_c: &Path,
    ) -> Result<bool> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut a = std::fs::File::from(
            rustix::fs::openat(new, name, flags, Mode::empty())
                .map_err(|e| rerr("open", new_c, e))?,
        );
        let mut b = std::fs::File::from(
            rustix::fs::openat(old, name, flags, Mode::empty())
                .map_err(|e| rerr("open", old_c, e))?,
        );
        loop {
            let n = read_full(&mut a, &mut self.buf_a).map_err(|e| Error::io("read", new_c, e))?;
            let m = read_full(&mut b, &mut self.buf_b).map_err(|e| Error::io("read", old_c, e))?;
            if n != m || self.buf_a[..n] != self.buf_b[..m] {
                return Ok(true);
            }
            if n == 0 {
                return Ok(false);
            }
        }
    }
}

/// Reads until `buf` is full or the end of the file.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Turns a change path (`/a/b`, or `a/b`) into a path relative to the layer root.
pub(crate) fn rel_of(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect()
}

/// Sums the bytes the changes hold: `st_size` of every added or modified **regular file** under
/// `root`, counting an inode shared by several changed names (hardlinks) once. Directories,
/// symlinks, devices and deletions count 0, and so does a file that [`crate::export_changes`]
/// writes as a hardlink to a name outside the list. This is the same measure [`crate::apply_layer`]
/// returns (regular-file bytes written), so the size of a diff and of its apply agree.
pub fn changes_size(root: &Path, changes: &[Change]) -> Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut linked = Vec::new();
    let mut counts = crate::export::LinkCounts::default();
    let mut paths = HashSet::new();
    for c in changes {
        if c.kind == ChangeKind::Delete {
            continue;
        }
        let r = rel_of(&c.path);
        let p = root.join(&r);
        let md = std::fs::symlink_metadata(&p).map_err(|e| Error::io("lstat", &p, e))?;
        if !md.file_type().is_file() || r.as_os_str().is_empty() || !paths.insert(r) {
            continue;
        }
        if md.nlink() == 1 {
            total = total.saturating_add(md.size());
            continue;
        }
        counts.add(&md);
        if seen.insert((md.dev(), md.ino())) {
            linked.push(((md.dev(), md.ino()), md.size()));
        }
    }
    // Files linked to a name outside the list are hardlink entries of the export: no bytes.
    let outside = crate::export::names_outside(root, changes, &counts.wanted())?;
    Ok(linked
        .into_iter()
        .filter(|(k, _)| !outside.contains_key(k))
        .fold(total, |t, (_, s)| t.saturating_add(s)))
}

/// What one lower layer says about a path.
enum LowerState {
    /// The path exists in this lower.
    Present(std::fs::Metadata),
    /// Not in this lower; look further down.
    Absent,
    /// Deleted or hidden by this lower (a whiteout, an opaque or non-directory ancestor): the
    /// path does not exist in the merged lower view and no deeper lower is consulted.
    Hidden,
}

fn is_whiteout(md: &std::fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn lstat_opt(p: &Path) -> Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(p) {
        Ok(m) => Ok(Some(m)),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::io("lstat", p, e)),
    }
}

fn is_opaque(p: &Path, ns: OverlayXattr) -> Result<bool> {
    Ok(get_xattr(p, ns.opaque_name())?.as_deref() == Some(b"y"))
}

fn lower_state(lower: &Path, rel: &Path, ns: OverlayXattr) -> Result<LowerState> {
    if let Some(md) = lstat_opt(&lower.join(rel))? {
        return Ok(if is_whiteout(&md) {
            LowerState::Hidden
        } else {
            LowerState::Present(md)
        });
    }
    // Not here: does an ancestor in this lower hide the lowers below it?
    let mut acc = PathBuf::new();
    let comps: Vec<_> = rel.components().collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        acc.push(c);
        let p = lower.join(&acc);
        match lstat_opt(&p)? {
            None => return Ok(LowerState::Absent),
            Some(md) if !md.is_dir() => return Ok(LowerState::Hidden),
            Some(_) if is_opaque(&p, ns)? => return Ok(LowerState::Hidden),
            Some(_) => {}
        }
    }
    Ok(LowerState::Absent)
}

/// The first lower (in order) that has `rel`, or `None` when no lower view has it.
fn lookup_lower(
    lowers: &[PathBuf],
    rel: &Path,
    ns: OverlayXattr,
) -> Result<Option<std::fs::Metadata>> {
    for l in lowers {
        match lower_state(l, rel, ns)? {
            LowerState::Present(md) => return Ok(Some(md)),
            LowerState::Hidden => return Ok(None),
            LowerState::Absent => {}
        }
    }
    Ok(None)
}

/// Names the merged lower view has inside directory `rel`.
fn lower_children(lowers: &[PathBuf], rel: &Path, ns: OverlayXattr) -> Result<Vec<Vec<u8>>> {
    let mut names = std::collections::BTreeSet::new();
    let mut hidden = HashSet::new();
    for l in lowers {
        match lower_state(l, rel, ns)? {
            LowerState::Hidden => break,
            LowerState::Absent => continue,
            LowerState::Present(md) => {
                if !md.is_dir() {
                    break;
                }
                let dir = l.join(rel);
                let rd =
                    std::fs::read_dir(&dir).map_err(|e| Error::io("read directory", &dir, e))?;
                for ent in rd {
                    let ent = ent.map_err(|e| Error::io("read directory", &dir, e))?;
                    let name = ent.file_name().as_bytes().to_vec();
                    let md = ent
                        .metadata()
                        .map_err(|e| Error::io("lstat", ent.path(), e))?;
                    if is_whiteout(&md) {
                        hidden.insert(name);
                    } else if !hidden.contains(&name) {
                        names.insert(name);
                    }
                }
                if is_opaque(&dir, ns)? {
                    break;
                }
            }
        }
    }
    Ok(names.into_iter().collect())
}

/// Lists the changes an overlayfs upper directory holds relative to its lower layers, without
/// diffing whole trees.
///
/// `lowers` are the lower layers' directories in overlay's `lowerdir=` order: `lowers[0]` is the
/// nearest (topmost); the first lower that has a path wins, and a whiteout or opaque directory in
/// a lower hides the lowers below it. `ns` is the xattr namespace the mount used.
///
/// Rules, per entry of `upper`:
/// * a character device 0/0 (overlay whiteout) is a `Delete` of its path;
/// * an entry absent from the merged lower view is an `Add`, and everything below an added
///   directory is `Add` too;
/// * a non-directory present in a lower is a `Modify` (a type change is also a `Modify`);
/// * a directory present in a lower is a `Modify` only when something below it changed or its
///   mode, owner or `security.capability` differ from the lower's;
/// * an **opaque** directory (`<ns>.overlay.opaque=y`) is `Modify` (or `Add` if no lower has
///   it); everything below it in upper is `Add`, and every name the lower view had in it that
///   upper does not is reported as a `Delete`. This is containers/storage's meaning of opacity
///   ("the lower contents are gone") expressed in plain change-list terms, so that
///   [`crate::export_changes`] of the result reproduces the upper view through ordinary
///   whiteouts.
///
/// Uppers written with `redirect_dir` or `metacopy` cannot be read this way: an entry carrying
/// `<ns>.overlay.redirect` or `<ns>.overlay.metacopy` is an error, never a wrong answer.
pub fn changes_from_overlay_upper(
    upper: &Path,
    lowers: &[PathBuf],
    ns: OverlayXattr,
) -> Result<Vec<Change>> {
    let mut out = BTreeMap::new();
    walk_upper(upper, lowers, ns, Path::new(""), false, &mut out)?;
    Ok(out
        .into_iter()
        .map(|(path, kind)| Change { path, kind })
        .collect())
}

fn refuse_redirect(full: &Path, md: &std::fs::Metadata, ns: OverlayXattr) -> Result<()> {
    for what in ["redirect", "metacopy"] {
        let name = format!("{}{what}", ns.prefix());
        if (md.is_dir() || what == "metacopy") && get_xattr(full, &name)?.is_some() {
            return Err(Error::io(
                format!(
                    "read overlay upper (expected no {name} xattr, found one; redirect_dir and metacopy uppers are not supported)"
                ),
                full,
                io::Error::from(io::ErrorKind::Unsupported),
            ));
        }
    }
    Ok(())
}

/// Walks upper directory `rel`; returns whether anything below it was recorded.
fn walk_upper(
    upper: &Path,
    lowers: &[PathBuf],
    ns: OverlayXattr,
    rel: &Path,
    forced_add: bool,
    out: &mut BTreeMap<PathBuf, ChangeKind>,
) -> Result<bool> {
    let dir = upper.join(rel);
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::io("read directory", &dir, e))?;
    let mut ents = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io("read directory", &dir, e))?;
        ents.push(ent.file_name());
    }
    ents.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in &ents {
        let rel_c = rel.join(name);
        let full = upper.join(&rel_c);
        let md = std::fs::symlink_metadata(&full).map_err(|e| Error::io("lstat", &full, e))?;
        refuse_redirect(&full, &md, ns)?;
        if is_whiteout(&md) {
            if !forced_add {
                out.insert(abs(&rel_c), ChangeKind::Delete);
            }
            continue;
        }
        if forced_add {
            out.insert(abs(&rel_c), ChangeKind::Add);
            if md.is_dir() {
                walk_upper(upper, lowers, ns, &rel_c, true, out)?;
            }
            continue;
        }
        let lower = lookup_lower(lowers, &rel_c, ns)?;
        if !md.is_dir() {
            let kind = if lower.is_some() {
                ChangeKind::Modify
            } else {
                ChangeKind::Add
            };
            out.insert(abs(&rel_c), kind);
            continue;
        }
        let lower_dir = match &lower {
            None => {
                out.insert(abs(&rel_c), ChangeKind::Add);
                walk_upper(upper, lowers, ns, &rel_c, true, out)?;
                continue;
            }
            Some(l) if !l.is_dir() => {
                out.insert(abs(&rel_c), ChangeKind::Modify);
                walk_upper(upper, lowers, ns, &rel_c, true, out)?;
                continue;
            }
            Some(l) => l,
        };
        if is_opaque(&full, ns)? {
            out.insert(abs(&rel_c), ChangeKind::Modify);
            walk_upper(upper, lowers, ns, &rel_c, true, out)?;
            for lname in lower_children(lowers, &rel_c, ns)? {
                let p = rel_c.join(OsStr::from_bytes(&lname));
                if lstat_opt(&upper.join(&p))?.is_none() {
                    out.insert(abs(&p), ChangeKind::Delete);
                }
            }
            continue;
        }
        let below = walk_upper(upper, lowers, ns, &rel_c, false, out)?;
        let meta_differs = md.mode() != lower_dir.mode()
            || md.uid() != lower_dir.uid()
            || md.gid() != lower_dir.gid()
            || get_xattr(&full, CAPABILITY)? != lower_cap(lowers, &rel_c, ns)?;
        if below || meta_differs {
            out.insert(abs(&rel_c), ChangeKind::Modify);
        }
    }
    Ok(any_below(out, rel))
}

/// The capability xattr of the lower entry that wins for `rel`.
fn lower_cap(lowers: &[PathBuf], rel: &Path, ns: OverlayXattr) -> Result<Option<Vec<u8>>> {
    for l in lowers {
        match lower_state(l, rel, ns)? {
            LowerState::Present(_) => return get_xattr(&l.join(rel), CAPABILITY),
            LowerState::Hidden => return Ok(None),
            LowerState::Absent => {}
        }
    }
    Ok(None)
}

/// Whether anything strictly below `rel` has been recorded.
fn any_below(out: &BTreeMap<PathBuf, ChangeKind>, rel: &Path) -> bool {
    use std::ops::Bound;
    let base = abs(rel);
    out.range::<PathBuf, _>((Bound::Excluded(&base), Bound::Unbounded))
        .next()
        .is_some_and(|(p, _)| p.starts_with(&base))
}
