//! Changes between two trees: what a layer adds, modifies and deletes.
//!
//! The rules are documented on [`changes`] and [`changes_from_overlay_upper`].

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Stat};

use crate::fs::{self, DirEntry, DirStack, XattrTarget};
use crate::{Error, OverlayXattr, Result};
pub use graphdriver::{Change, ChangeKind};

/// The xattr compared by [`changes`] besides the inode metadata.
const CAPABILITY: &CStr = c"security.capability";

/// Size of each of the two buffers used to compare file contents.
const CMP_BUF: usize = 64 * 1024;

fn ioerr(op: &str, root: &Path, rel: &[u8], e: io::Error) -> Error {
    Error::io(op, root.join(OsStr::from_bytes(rel)), e)
}

fn open_root(path: &Path) -> Result<OwnedFd> {
    fs::open_root_dir(path).map_err(|e| Error::io("open directory", path, e))
}

fn ftype(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// `dir_rel/name` (or `name` at the root) as bytes.
fn join_rel(dir_rel: &[u8], name: &CStr) -> Vec<u8> {
    let mut r = Vec::with_capacity(dir_rel.len() + 1 + name.to_bytes().len());
    r.extend_from_slice(dir_rel);
    if !r.is_empty() {
        r.push(b'/');
    }
    r.extend_from_slice(name.to_bytes());
    r
}

/// The change path (`/a/b`) of a root-relative path given as bytes.
fn abs_bytes(rel: &[u8]) -> PathBuf {
    let mut p = Vec::with_capacity(rel.len() + 1);
    p.push(b'/');
    p.extend_from_slice(rel);
    PathBuf::from(std::ffi::OsString::from_vec(p))
}

/// The capability xattr of a target; `None` when absent or unsupported.
fn capability(t: XattrTarget<'_>, root: &Path, rel: &[u8]) -> Result<Option<Vec<u8>>> {
    fs::get_xattr(t, CAPABILITY)
        .map_err(|e| ioerr("read xattr security.capability of", root, rel, e))
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
/// ([`crate::fs`]: two [`DirStack`]s moved in lockstep, every name resolved relative to its
/// parent's descriptor, never following symlinks, a directory entered only if it is still the
/// inode its `lstat` saw). The walk is iterative (an explicit stack) and holds a bounded number
/// of descriptors, so trees of any depth work. Names are compared bytewise; the output is in
/// [`Path`] order (component by component), so a directory always comes before the entries
/// below it.
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
///   No sleeping is needed to make changes visible. Both files are opened with
///   [`fs::open_file_checked`]: an entry swapped for a FIFO, device or symlink in the meantime is
///   an error, never read (and a FIFO cannot block the walk).
pub fn changes(new: &Path, old: Option<&Path>) -> Result<Vec<Change>> {
    let new_fd = open_root(new)?;
    let new_root_st = rustix::fs::fstat(&new_fd).map_err(|e| Error::io("stat", new, e.into()))?;
    let mut d = Differ {
        out: Vec::new(),
        buf_a: vec![0; CMP_BUF],
        buf_b: vec![0; CMP_BUF],
        new_root: new,
        old_root: old.unwrap_or(Path::new("")),
        new: DirStack::new(new_fd).map_err(|e| Error::io("open directory", new, e))?,
        old: None,
        frames: Vec::new(),
    };
    let ents = fs::read_dir_sorted(d.new.top()).map_err(|e| Error::io("read directory", new, e))?;
    match old {
        None => d.frames.push(Frame {
            ents,
            i: 0,
            kind: FrameKind::Add,
        }),
        Some(old) => {
            let old_fd = open_root(old)?;
            let old_st =
                rustix::fs::fstat(&old_fd).map_err(|e| Error::io("stat", old, e.into()))?;
            let old_stack =
                DirStack::new(old_fd).map_err(|e| Error::io("open directory", old, e))?;
            let old_ents = fs::read_dir_sorted(old_stack.top())
                .map_err(|e| Error::io("read directory", old, e))?;
            d.old = Some(old_stack);
            d.frames.push(Frame {
                ents,
                i: 0,
                kind: FrameKind::Diff {
                    old_ents,
                    j: 0,
                    same_dev: new_root_st.st_dev == old_st.st_dev,
                    mark: None,
                },
            });
        }
    }
    d.run()?;
    Ok(d.out)
}

/// One directory being walked by [`changes`].
struct Frame {
    /// The new tree's entries of this directory.
    ents: Vec<DirEntry>,
    /// The next of `ents` to look at.
    i: usize,
    kind: FrameKind,
}

enum FrameKind {
    /// A directory only in the new tree: everything below is added (the old stack stays put).
    Add,
    /// A directory in both trees (the old stack is at its old side).
    Diff {
        old_ents: Vec<DirEntry>,
        j: usize,
        /// Whether both sides are on one device (inode numbers are then comparable).
        same_dev: bool,
        /// Where this directory's own `Modify` goes in the output (`None` for the roots):
        /// pushed on entry with an empty path, given its path when the directory is modified
        /// or something below it is, dropped otherwise.
        mark: Option<usize>,
    },
}

/// The state of one [`changes`] run.
struct Differ<'a> {
    out: Vec<Change>,
    buf_a: Vec<u8>,
    buf_b: Vec<u8>,
    new_root: &'a Path,
    old_root: &'a Path,
    new: DirStack,
    /// `None` without an old tree.
    old: Option<DirStack>,
    frames: Vec<Frame>,
}

impl Differ<'_> {
    fn run(&mut self) -> Result<()> {
        loop {
            let Some(f) = self.frames.last_mut() else {
                return Ok(());
            };
            match &mut f.kind {
                FrameKind::Add => {
                    let Some(e) = f.ents.get_mut(f.i) else {
                        self.leave()?;
                        continue;
                    };
                    f.i += 1;
                    let (name, ft) = (std::mem::take(&mut e.name), e.file_type);
                    self.added(&name, ft)?;
                }
                FrameKind::Diff {
                    old_ents,
                    j,
                    same_dev,
                    ..
                } => {
                    let ord = match (f.ents.get(f.i), old_ents.get(*j)) {
                        (Some(n), Some(o)) => n.name.as_bytes().cmp(o.name.as_bytes()),
                        (Some(_), None) => std::cmp::Ordering::Less,
                        (None, Some(_)) => std::cmp::Ordering::Greater,
                        (None, None) => {
                            self.leave()?;
                            continue;
                        }
                    };
                    match ord {
                        std::cmp::Ordering::Less => {
                            let e = &mut f.ents[f.i];
                            f.i += 1;
                            let (name, ft) = (std::mem::take(&mut e.name), e.file_type);
                            self.added(&name, ft)?;
                        }
                        std::cmp::Ordering::Greater => {
                            let name = std::mem::take(&mut old_ents[*j].name);
                            *j += 1;
                            let rel = join_rel(self.new.rel(), &name);
                            self.push(&rel, ChangeKind::Delete);
                        }
                        std::cmp::Ordering::Equal => {
                            let same = *same_dev && f.ents[f.i].ino == old_ents[*j].ino;
                            let name = std::mem::take(&mut f.ents[f.i].name);
                            f.i += 1;
                            *j += 1;
                            if !same {
                                self.both(&name)?;
                            }
                        }
                    }
                }
            }
        }
    }

    fn push(&mut self, rel: &[u8], kind: ChangeKind) {
        self.out.push(Change {
            path: abs_bytes(rel),
            kind,
        });
    }

    fn old(&mut self) -> &mut DirStack {
        match self.old.as_mut() {
            Some(o) => o,
            None => unreachable!("a Diff frame exists only with an old tree"),
        }
    }

    /// The top directory is done: settle its `Modify` and return to the parent(s).
    fn leave(&mut self) -> Result<()> {
        let Some(f) = self.frames.pop() else {
            return Ok(());
        };
        let is_root = self.frames.is_empty();
        if let FrameKind::Diff { mark: Some(m), .. } = f.kind {
            if self.out.len() == m + 1 && self.out[m].path.as_os_str().is_empty() {
                // Unmodified, nothing below: no entry.
                self.out.pop();
            } else if self.out[m].path.as_os_str().is_empty() {
                self.out[m].path = abs_bytes(self.new.rel());
            }
            let old_root = self.old_root;
            self.old()
                .pop()
                .map_err(|e| Error::io("return to a parent directory in", old_root, e))?;
        }
        if !is_root {
            self.new
                .pop()
                .map_err(|e| Error::io("return to a parent directory in", self.new_root, e))?;
        }
        Ok(())
    }

    /// Enters the new tree's directory `name` (checked against `st` when given) and reports
    /// everything below it as added.
    fn enter_added(&mut self, name: &CStr, st: Option<&Stat>) -> Result<()> {
        let rel = join_rel(self.new.rel(), name);
        self.new
            .push(name, st)
            .map_err(|e| ioerr("open directory", self.new_root, &rel, e))?;
        let ents = fs::read_dir_sorted(self.new.top())
            .map_err(|e| ioerr("read directory", self.new_root, &rel, e))?;
        self.frames.push(Frame {
            ents,
            i: 0,
            kind: FrameKind::Add,
        });
        Ok(())
    }

    /// `name` of the current directory exists only in the new tree.
    fn added(&mut self, name: &CStr, ft: FileType) -> Result<()> {
        let rel = join_rel(self.new.rel(), name);
        self.push(&rel, ChangeKind::Add);
        let st = match ft {
            FileType::Directory => None,
            FileType::Unknown => {
                let st = fs::stat_at(self.new.top(), name)
                    .map_err(|e| ioerr("lstat", self.new_root, &rel, e))?;
                if ftype(&st) != FileType::Directory {
                    return Ok(());
                }
                Some(st)
            }
            _ => return Ok(()),
        };
        self.enter_added(name, st.as_ref())
    }

    /// `name` exists in both current directories as different inodes.
    fn both(&mut self, name: &CStr) -> Result<()> {
        let rel = join_rel(self.new.rel(), name);
        let (new_root, old_root) = (self.new_root, self.old_root);
        let ns =
            fs::stat_at(self.new.top(), name).map_err(|e| ioerr("lstat", new_root, &rel, e))?;
        let os =
            fs::stat_at(self.old().top(), name).map_err(|e| ioerr("lstat", old_root, &rel, e))?;
        let (nt, ot) = (ftype(&ns), ftype(&os));
        if nt != ot {
            self.push(&rel, ChangeKind::Modify);
            if nt == FileType::Directory {
                self.enter_added(name, Some(&ns))?;
            }
            return Ok(());
        }
        if nt != FileType::Directory {
            if self.file_differs(name, &rel, &ns, &os)? {
                self.push(&rel, ChangeKind::Modify);
            }
            return Ok(());
        }
        self.new
            .push(name, Some(&ns))
            .map_err(|e| ioerr("open directory", new_root, &rel, e))?;
        if let Err(e) = self.old().push(name, Some(&os)) {
            // Keep the stacks in lockstep with the frames for the caller's sake.
            let _ = self.new.pop();
            return Err(ioerr("open directory", old_root, &rel, e));
        }
        let modified = base_meta_differs(&ns, &os)
            || capability(XattrTarget::Fd(self.new.top()), new_root, &rel)?
                != capability(XattrTarget::Fd(self.old().top()), old_root, &rel)?;
        let new_ents = fs::read_dir_sorted(self.new.top())
            .map_err(|e| ioerr("read directory", new_root, &rel, e))?;
        let old_ents = fs::read_dir_sorted(self.old().top())
            .map_err(|e| ioerr("read directory", old_root, &rel, e))?;
        let mark = self.out.len();
        self.out.push(Change {
            path: if modified {
                abs_bytes(&rel)
            } else {
                PathBuf::new()
            },
            kind: ChangeKind::Modify,
        });
        self.frames.push(Frame {
            ents: new_ents,
            i: 0,
            kind: FrameKind::Diff {
                old_ents,
                j: 0,
                same_dev: ns.st_dev == os.st_dev,
                mark: Some(mark),
            },
        });
        Ok(())
    }

    /// Whether the non-directories `name` (same type on both sides) differ.
    fn file_differs(&mut self, name: &CStr, rel: &[u8], ns: &Stat, os: &Stat) -> Result<bool> {
        if base_meta_differs(ns, os) || ns.st_size != os.st_size {
            return Ok(true);
        }
        let (nm, om) = (mtime(ns), mtime(os));
        if !times_equal(nm, om) {
            return Ok(true);
        }
        let (new_root, old_root) = (self.new_root, self.old_root);
        let Some(old) = self.old.as_ref() else {
            unreachable!("files are compared only with an old tree")
        };
        let (nd, od) = (self.new.top(), old.top());
        if capability(XattrTarget::At(nd, name), new_root, rel)?
            != capability(XattrTarget::At(od, name), old_root, rel)?
        {
            return Ok(true);
        }
        match ftype(ns) {
            FileType::Symlink => {
                let a =
                    fs::readlink_at(nd, name).map_err(|e| ioerr("readlink", new_root, rel, e))?;
                let b =
                    fs::readlink_at(od, name).map_err(|e| ioerr("readlink", old_root, rel, e))?;
                Ok(a != b)
            }
            FileType::RegularFile => {
                let (cs, cn) = ctime(ns);
                let racy = ns_of(cs, cn) - ns_of(nm.0, nm.1) < 1_000_000_000;
                let truncated = nm.1 == 0 && om.1 == 0;
                if !(racy || truncated) {
                    return Ok(false);
                }
                let mut a = fs::open_file_checked(nd, name, ns)
                    .map_err(|e| ioerr("open", new_root, rel, e))?;
                let mut b = fs::open_file_checked(od, name, os)
                    .map_err(|e| ioerr("open", old_root, rel, e))?;
                loop {
                    let n = read_full(&mut a, &mut self.buf_a)
                        .map_err(|e| ioerr("read", new_root, rel, e))?;
                    let m = read_full(&mut b, &mut self.buf_b)
                        .map_err(|e| ioerr("read", old_root, rel, e))?;
                    if n != m || self.buf_a[..n] != self.buf_b[..m] {
                        return Ok(true);
                    }
                    if n == 0 {
                        return Ok(false);
                    }
                }
            }
            _ => Ok(false),
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
    // Fast path for the usual, already clean `/a/b` (checked with std's optimized string
    // search: deep change lists hold paths of thousands of components).
    let b = path.as_os_str().as_bytes();
    let b = &b[b.iter().take_while(|&&c| c == b'/').count()..];
    if let Ok(s) = std::str::from_utf8(b) {
        let clean = !s.is_empty()
            && s != "."
            && s != ".."
            && !s.ends_with('/')
            && !s.ends_with("/.")
            && !s.ends_with("/..")
            && !s.starts_with("./")
            && !s.starts_with("../")
            && !s.contains("//")
            && !s.contains("/./")
            && !s.contains("/../");
        if clean {
            return PathBuf::from(s);
        }
    }
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
    let mut paths: Vec<PathBuf> = changes
        .iter()
        .filter(|c| c.kind != ChangeKind::Delete)
        .map(|c| rel_of(&c.path))
        .filter(|r| !r.as_os_str().is_empty())
        .collect();
    // Sorted, the cursor moves from one parent directory to the next without backtracking.
    paths.sort();
    paths.dedup();
    let mut cur = crate::export::ListCursor::open(root)?;
    for r in &paths {
        let st = cur.stat(r)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            continue;
        }
        #[allow(clippy::unnecessary_cast)]
        let (key, nlink) = ((st.st_dev as u64, st.st_ino as u64), st.st_nlink as u64);
        let size = u64::try_from(st.st_size).unwrap_or(0);
        if nlink == 1 {
            total = total.saturating_add(size);
            continue;
        }
        counts.add(&st);
        if seen.insert(key) {
            linked.push((key, size));
        }
    }
    // Files linked to a name outside the list are hardlink entries of the export: no bytes.
    let outside = crate::export::names_outside(root, changes, &counts.wanted())?;
    Ok(linked
        .into_iter()
        .filter(|(k, _)| !outside.contains_key(k))
        .fold(total, |t, (_, s)| t.saturating_add(s)))
}

#[allow(clippy::unnecessary_cast)]
fn is_whiteout(st: &Stat) -> bool {
    ftype(st) == FileType::CharacterDevice && st.st_rdev as u64 == 0
}

fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
    )
}

fn cname(b: &[u8]) -> CString {
    // Names come from directory listings: they hold no NUL.
    CString::new(b).unwrap_or_default()
}

/// Whether two open files hold the same bytes (read in chunks, bounded memory).
fn same_bytes(mut a: std::fs::File, mut b: std::fs::File) -> io::Result<bool> {
    use std::io::Read;
    let (mut x, mut y) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    loop {
        let n = read_full(&mut a, &mut x)?;
        let m = read_full(&mut b, &mut y)?;
        if n != m || x[..n] != y[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match f.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }
}

/// One lower layer followed along the walk of the upper: its directory at the upper's current
/// path while it has one.
struct LowerCursor {
    /// The lower's directories from its root down to the deepest one on the upper's path.
    stack: DirStack,
    /// The upper depth at which this lower has no directory on the path any more (`None`: it
    /// has the upper's current directory, at the top of `stack`).
    diverged_at: Option<usize>,
    /// At the divergence a whiteout or non-directory stands on the path: it hides the lowers
    /// below for everything under it.
    blocked: bool,
    /// The upper depth of the shallowest opaque directory on the path in this lower: the
    /// lowers below see nothing under it that this lower lacks.
    opaque_from: Option<usize>,
}

/// The lower layers of an overlay upper, each followed by a [`LowerCursor`] as the upper is
/// walked ([`Lowers::push`], [`Lowers::pop`]): every lookup is one `fstatat` below a held
/// descriptor, never a path resolved from the root, so the cost of a walk follows the upper's
/// size, not its size times its depth. Each cursor holds one descriptor (the top; parents are
/// reopened through `..` and checked on the way up), so a chain of hundreds of lowers fits in
/// the usual descriptor limit. Nothing is ever followed through a symlink.
///
/// The apply uses the same walk for its overlay lookups (`apply::copyup`).
pub(crate) struct Lowers {
    cursors: Vec<LowerCursor>,
    /// The lowers' paths, for messages.
    paths: Vec<PathBuf>,
    ns: OverlayXattr,
    /// The upper's current depth.
    depth: usize,
}

impl Lowers {
    fn open(paths: &[PathBuf], ns: OverlayXattr) -> Result<Lowers> {
        let mut fds = Vec::with_capacity(paths.len());
        for p in paths {
            fds.push(open_root(p)?);
        }
        Lowers::from_fds(fds, paths.to_vec(), ns)
    }

    /// Cursors at the roots `fds` (topmost first); `paths` name them in messages.
    pub(crate) fn from_fds(
        fds: Vec<OwnedFd>,
        paths: Vec<PathBuf>,
        ns: OverlayXattr,
    ) -> Result<Lowers> {
        let mut cursors = Vec::with_capacity(fds.len());
        for (fd, p) in fds.into_iter().zip(&paths) {
            cursors.push(LowerCursor {
                stack: DirStack::with_max_held(fd, 1)
                    .map_err(|e| Error::io("open directory", p, e))?,
                diverged_at: None,
                blocked: false,
                opaque_from: None,
            });
        }
        Ok(Lowers {
            cursors,
            paths,
            ns,
            depth: 0,
        })
    }

    fn is_opaque(&self, t: XattrTarget<'_>, l: usize, rel: &[u8]) -> Result<bool> {
        let attr = cname(self.ns.opaque_name().as_bytes());
        Ok(fs::get_xattr(t, &attr)
            .map_err(|e| ioerr("read xattr of", &self.paths[l], rel, e))?
            .as_deref()
            == Some(b"y"))
    }

    /// The upper entered its directory `name` (now at `rel`): every lower that has the parent
    /// follows into its own `name` if that is a directory.
    pub(crate) fn push(&mut self, name: &CStr, rel: &[u8]) -> Result<()> {
        self.depth += 1;
        let depth = self.depth;
        for l in 0..self.cursors.len() {
            if self.cursors[l].diverged_at.is_some() {
                continue;
            }
            let st = match fs::stat_at(self.cursors[l].stack.top(), name) {
                Ok(st) => Some(st),
                Err(e) if is_absent(&e) => None,
                Err(e) => return Err(ioerr("lstat", &self.paths[l], rel, e)),
            };
            match st {
                Some(st) if ftype(&st) == FileType::Directory => {
                    self.cursors[l]
                        .stack
                        .push(name, Some(&st))
                        .map_err(|e| ioerr("open directory", &self.paths[l], rel, e))?;
                    let opaque =
                        self.is_opaque(XattrTarget::Fd(self.cursors[l].stack.top()), l, rel)?;
                    let c = &mut self.cursors[l];
                    if opaque && c.opaque_from.is_none() {
                        c.opaque_from = Some(depth);
                    }
                }
                other => {
                    let c = &mut self.cursors[l];
                    c.diverged_at = Some(depth);
                    c.blocked = other.is_some();
                }
            }
        }
        Ok(())
    }

    /// The upper left its current directory (`rel`) for the parent.
    pub(crate) fn pop(&mut self, rel: &[u8]) -> Result<()> {
        let depth = self.depth;
        for l in 0..self.cursors.len() {
            let c = &mut self.cursors[l];
            match c.diverged_at {
                None => {
                    c.stack.pop().map_err(|e| {
                        ioerr("return to a parent directory in", &self.paths[l], rel, e)
                    })?;
                    if c.opaque_from == Some(depth) {
                        c.opaque_from = None;
                    }
                }
                Some(d) if d == depth => {
                    c.diverged_at = None;
                    c.blocked = false;
                }
                Some(_) => {}
            }
        }
        self.depth = depth.saturating_sub(1);
        Ok(())
    }

    /// The winning lower entry for `name` in the upper's current directory (`rel` is its whole
    /// path, for messages): its lower index and `lstat`.
    pub(crate) fn lookup(&self, name: &CStr, rel: &[u8]) -> Result<Option<(usize, Stat)>> {
        for (l, c) in self.cursors.iter().enumerate() {
            if c.diverged_at.is_some() {
                if c.blocked || c.opaque_from.is_some() {
                    return Ok(None);
                }
                continue;
            }
            match fs::stat_at(c.stack.top(), name) {
                Ok(st) if is_whiteout(&st) => return Ok(None),
                Ok(st) => return Ok(Some((l, st))),
                Err(e) if is_absent(&e) => {
                    if c.opaque_from.is_some() {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(ioerr("lstat", &self.paths[l], rel, e)),
            }
        }
        Ok(None)
    }

    /// The capability xattr of the lower entry that wins for `name` (at `rel`).
    fn cap(&self, name: &CStr, rel: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some((l, _)) = self.lookup(name, rel)? else {
            return Ok(None);
        };
        capability(
            XattrTarget::At(self.cursors[l].stack.top(), name),
            &self.paths[l],
            rel,
        )
    }

    /// Whether the regular file `name` of the upper directory `dir` (`lstat` `st`) is an
    /// unchanged copy of its lower entry in lower `l` (`lstat` `lst`): the same type, mode,
    /// owner, size, mtime (to the nanosecond), capability and content. An apply's copy-up for a
    /// hardlink to a lower file leaves such copies (see `ApplyOptions::link_lowers`), as does a
    /// rewrite of the same bytes with the time put back; a tree comparison sees no change
    /// there, and neither does this. Contents are read only when all metadata is equal.
    fn is_copy_up(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &CStr,
        st: &Stat,
        (l, lst): (usize, &Stat),
        rel: &[u8],
    ) -> Result<bool> {
        let same_meta = ftype(st) == FileType::RegularFile
            && st.st_mode == lst.st_mode
            && st.st_uid == lst.st_uid
            && st.st_gid == lst.st_gid
            && st.st_size == lst.st_size
            && st.st_mtime == lst.st_mtime
            && st.st_mtime_nsec == lst.st_mtime_nsec;
        if !same_meta {
            return Ok(false);
        }
        let lower_dir = self.cursors[l].stack.top();
        let upper_cap = capability(XattrTarget::At(dir, name), &self.paths[l], rel)?;
        let lower_cap = capability(XattrTarget::At(lower_dir, name), &self.paths[l], rel)?;
        if upper_cap != lower_cap {
            return Ok(false);
        }
        let a = fs::open_file_checked(dir, name, st)
            .map_err(|e| ioerr("open", &self.paths[l], rel, e))?;
        let b = fs::open_file_checked(lower_dir, name, lst)
            .map_err(|e| ioerr("open", &self.paths[l], rel, e))?;
        same_bytes(a, b).map_err(|e| ioerr("read", &self.paths[l], rel, e))
    }

    /// Names the merged lower view has in the upper's current directory (`rel`).
    fn children(&self, rel: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut names = std::collections::BTreeSet::new();
        let mut hidden = HashSet::new();
        for (l, c) in self.cursors.iter().enumerate() {
            if c.diverged_at.is_some() {
                if c.blocked || c.opaque_from.is_some() {
                    break;
                }
                continue;
            }
            let dir = c.stack.top();
            let path = || self.paths[l].join(OsStr::from_bytes(rel));
            for ent in
                fs::read_dir_sorted(dir).map_err(|e| Error::io("read directory", path(), e))?
            {
                let whiteout = match ent.file_type {
                    FileType::CharacterDevice | FileType::Unknown => {
                        match fs::stat_at(dir, &ent.name) {
                            Ok(st) => is_whiteout(&st),
                            Err(e) if is_absent(&e) => continue,
                            Err(e) => {
                                return Err(Error::io(
                                    "lstat",
                                    path().join(OsStr::from_bytes(ent.name.as_bytes())),
                                    e,
                                ));
                            }
                        }
                    }
                    _ => false,
                };
                let name = ent.name.into_bytes();
                if whiteout {
                    hidden.insert(name);
                } else if !hidden.contains(&name) {
                    names.insert(name);
                }
            }
            if c.opaque_from.is_some() {
                break;
            }
        }
        Ok(names.into_iter().collect())
    }
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
/// * an **opaque** directory (`<ns>.overlay.opaque=y`) is `Add` if no lower has it; otherwise
///   it and every directory below it that the lower view also has are compared with the lower
///   view as whole trees: every name the lower view had that upper does not is a `Delete`,
///   names in both are compared as above, whiteouts there hide nothing. This is
///   containers/storage's meaning of opacity ("the lower contents are gone") expressed in
///   plain change-list terms, the same list a comparison of the mounted trees gives, so that
///   [`crate::export_changes`] of the result reproduces the upper view through ordinary
///   whiteouts;
/// * a regular file that is an unchanged copy of its lower file (same metadata to the
///   nanosecond, and content: what an apply's hardlink copy-up leaves) is no change.
///
/// The upper is walked iteratively through a [`DirStack`] (bounded descriptors, any depth) and
/// every lower is read below its own descriptor, never following a symlink: a symlink where a
/// lower has a directory hides what is below, as overlayfs treats it.
///
/// Uppers written with `redirect_dir` or `metacopy` cannot be read this way: an entry carrying
/// `<ns>.overlay.redirect` or `<ns>.overlay.metacopy` is an error, never a wrong answer.
pub fn changes_from_overlay_upper(
    upper: &Path,
    lowers: &[PathBuf],
    ns: OverlayXattr,
) -> Result<Vec<Change>> {
    let mut lw = Lowers::open(lowers, ns)?;
    let mut out = BTreeMap::new();
    let mut stack =
        DirStack::new(open_root(upper)?).map_err(|e| Error::io("open directory", upper, e))?;
    let ents =
        fs::read_dir_sorted(stack.top()).map_err(|e| Error::io("read directory", upper, e))?;
    let mut frames = vec![UpperFrame {
        ents,
        i: 0,
        forced_add: false,
        opaque_scope: false,
        meta_differs: None,
    }];
    while let Some(f) = frames.last_mut() {
        let Some(ent) = f.ents.get_mut(f.i) else {
            let Some(done) = frames.pop() else { break };
            if let Some(meta_differs) = done.meta_differs {
                let rel = stack.rel_path().to_path_buf();
                if meta_differs || any_below(&out, &rel) {
                    out.insert(abs(&rel), ChangeKind::Modify);
                }
            }
            if !frames.is_empty() {
                lw.pop(stack.rel())?;
                stack
                    .pop()
                    .map_err(|e| Error::io("return to a parent directory in", upper, e))?;
            }
            continue;
        };
        f.i += 1;
        let forced_add = f.forced_add;
        let opaque_scope = f.opaque_scope;
        let name = std::mem::take(&mut ent.name);
        let rel = join_rel(stack.rel(), &name);
        let relp = Path::new(OsStr::from_bytes(&rel)).to_path_buf();
        let st = fs::stat_at(stack.top(), &name).map_err(|e| ioerr("lstat", upper, &rel, e))?;
        let is_dir = ftype(&st) == FileType::Directory;
        let at = XattrTarget::At(stack.top(), &name);
        refuse_redirect(at, is_dir, ns, upper, &rel)?;
        if is_whiteout(&st) {
            // Below an opaque directory a whiteout hides nothing; elsewhere it deletes only a
            // name the lower view has (a layer tar may white out a name that never existed).
            if !forced_add && !opaque_scope && lw.lookup(&name, &rel)?.is_some() {
                out.insert(abs(&relp), ChangeKind::Delete);
            }
            continue;
        }
        let mut enter = |stack: &mut DirStack,
                         lw: &mut Lowers,
                         forced_add: bool,
                         opaque_scope: bool,
                         meta_differs: Option<bool>| {
            stack
                .push(&name, Some(&st))
                .map_err(|e| ioerr("open directory", upper, &rel, e))?;
            lw.push(&name, &rel)?;
            let ents = fs::read_dir_sorted(stack.top())
                .map_err(|e| ioerr("read directory", upper, &rel, e))?;
            frames.push(UpperFrame {
                ents,
                i: 0,
                forced_add,
                opaque_scope,
                meta_differs,
            });
            Ok::<(), Error>(())
        };
        if forced_add {
            out.insert(abs(&relp), ChangeKind::Add);
            if is_dir {
                enter(&mut stack, &mut lw, true, false, None)?;
            }
            continue;
        }
        let lower = lw.lookup(&name, &rel)?;
        if !is_dir {
            let kind = match &lower {
                None => ChangeKind::Add,
                Some((l, lst)) if lw.is_copy_up(stack.top(), &name, &st, (*l, lst), &rel)? => {
                    continue;
                }
                Some(_) => ChangeKind::Modify,
            };
            out.insert(abs(&relp), kind);
            continue;
        }
        let lower_st = match lower {
            None => {
                out.insert(abs(&relp), ChangeKind::Add);
                enter(&mut stack, &mut lw, true, false, None)?;
                continue;
            }
            Some((_, l)) if ftype(&l) != FileType::Directory => {
                out.insert(abs(&relp), ChangeKind::Modify);
                enter(&mut stack, &mut lw, true, false, None)?;
                continue;
            }
            Some((_, l)) => l,
        };
        #[allow(clippy::unnecessary_cast)]
        let meta_differs = st.st_mode as u32 != lower_st.st_mode as u32
            || st.st_uid != lower_st.st_uid
            || st.st_gid != lower_st.st_gid
            || capability(at, upper, &rel)? != lw.cap(&name, &rel)?;
        let opaque = opaque_scope
            || fs::get_xattr(at, &cname(ns.opaque_name().as_bytes()))
                .map_err(|e| ioerr("read xattr of", upper, &rel, e))?
                .as_deref()
                == Some(b"y");
        if opaque {
            // The lower contents are gone, here and in every directory below that the upper
            // has: compared as two trees, as `changes` of the mounted views would.
            enter(&mut stack, &mut lw, false, true, Some(meta_differs))?;
            for lname in lw.children(&rel)? {
                let c = cname(&lname);
                match fs::stat_at(stack.top(), &c) {
                    Ok(_) => {}
                    Err(e) if is_absent(&e) => {
                        out.insert(
                            abs(&relp.join(OsStr::from_bytes(&lname))),
                            ChangeKind::Delete,
                        );
                    }
                    Err(e) => return Err(ioerr("lstat", upper, &join_rel(&rel, &c), e)),
                }
            }
            continue;
        }
        enter(&mut stack, &mut lw, false, false, Some(meta_differs))?;
    }
    Ok(out
        .into_iter()
        .map(|(path, kind)| Change { path, kind })
        .collect())
}

/// One upper directory being walked by [`changes_from_overlay_upper`].
struct UpperFrame {
    ents: Vec<DirEntry>,
    i: usize,
    /// Everything below is added (an added or retyped directory).
    forced_add: bool,
    /// Inside an opaque directory: the lowers' contents are hidden, so every directory below
    /// that a lower has too is compared as a whole (missing names are deletions).
    opaque_scope: bool,
    /// For a directory present in the lower view: whether its own metadata differs (it is then
    /// `Modify`, as it is when anything below it changed).
    meta_differs: Option<bool>,
}

fn refuse_redirect(
    t: XattrTarget<'_>,
    is_dir: bool,
    ns: OverlayXattr,
    upper: &Path,
    rel: &[u8],
) -> Result<()> {
    for what in ["redirect", "metacopy"] {
        let name = format!("{}{what}", ns.prefix());
        if (is_dir || what == "metacopy")
            && fs::get_xattr(t, &cname(name.as_bytes()))
                .map_err(|e| ioerr(&format!("read xattr {name} of"), upper, rel, e))?
                .is_some()
        {
            return Err(Error::io(
                format!(
                    "read overlay upper (expected no {name} xattr, found one; redirect_dir and metacopy uppers are not supported)"
                ),
                upper.join(OsStr::from_bytes(rel)),
                io::Error::from(io::ErrorKind::Unsupported),
            ));
        }
    }
    Ok(())
}

/// Whether anything strictly below `rel` has been recorded.
fn any_below(out: &BTreeMap<PathBuf, ChangeKind>, rel: &Path) -> bool {
    use std::ops::Bound;
    let base = abs(rel);
    out.range::<PathBuf, _>((Bound::Excluded(&base), Bound::Unbounded))
        .next()
        .is_some_and(|(p, _)| p.starts_with(&base))
}
