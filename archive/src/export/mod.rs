//! Writing trees and change lists as layer tar streams.
//!
//! The format is documented on [`tar_tree`], the streaming on [`TarStream`]. The parts:
//! `stream` (the producer's buffer and [`TarStream`]), `walk` (what is written for each entry),
//! `links` (hardlinks of change-list exports), `sparse` (holes); the tar encoding itself is
//! [`crate::codec::writer`].

mod links;
mod sparse;
mod stream;
mod walk;

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::fs::{FileType, SeekFrom, Stat};

use crate::change::rel_of;
use crate::fs::{self, DirStack, XattrTarget};
use crate::{Change, ChangeKind, Error, Result, WHITEOUT_OPAQUE, WHITEOUT_PREFIX, WhiteoutFormat};

/// Options for [`tar_tree`], [`export_changes`] and [`crate::untar`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct TarOptions {
    /// Only paths at or below one of these (relative to the root) are included; empty means all.
    pub include: Vec<PathBuf>,
    /// Paths at or below one of these (relative to the root) are left out.
    pub exclude: Vec<PathBuf>,
    /// How whiteouts are represented in the tree being read (see [`WhiteoutFormat`]).
    pub whiteout_format: WhiteoutFormat,
    /// Extended attribute name prefixes to include (for example `"user."`, `"trusted."`); empty
    /// means every attribute except overlayfs' own bookkeeping (`trusted.overlay.*`,
    /// `user.overlay.*`). `security.capability` is always included.
    pub xattr_prefixes: Vec<String>,
}

pub(crate) use crate::codec::writer::*;
pub(crate) use links::*;
pub(crate) use sparse::*;
pub use stream::TarStream;
pub(crate) use stream::*;
pub(crate) use walk::*;

/// Opens the caller's `root` for an export, failing up front when it is not a directory.
fn open_export_root(root: &Path) -> Result<OwnedFd> {
    fs::open_root_dir(root).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTDIR) {
            Error::io(
                "export (expected a directory, found another file type)",
                root,
                e,
            )
        } else {
            Error::io("open directory", root, e)
        }
    })
}

/// Streams the whole tree under `root` (not the root itself) as a PAX layer tar.
///
/// PAX (POSIX.1-2001) tar written header by header: a ustar header per entry, preceded by a PAX
/// extended header (`x`) when the entry needs one — a name or link target over 100 bytes, a uid,
/// gid or size too large for the octal fields, or extended attributes (`SCHILY.xattr.<name>`).
/// Owners are numeric only (no user or group names), mtimes are whole seconds, modes keep
/// setuid/setgid/sticky. Entries come in a deterministic order: a depth-first walk with the
/// names of each directory sorted bytewise, so a directory always precedes its contents; the
/// root itself is not written.
///
/// The 2nd and later name of an inode with more than one link becomes a hardlink entry naming
/// the first one written (see [`export_changes`] for names outside a change list).
/// Deletions are written as empty regular `.wh.<name>` entries (mode 0600, mtime 0, owner 0:0).
/// Devices and FIFOs are exported; sockets cannot be and are left out, listed by
/// [`TarStream::skipped`].
///
/// **Sparse files**: a regular file with holes (fewer allocated blocks than its size, and
/// `SEEK_DATA`/`SEEK_HOLE` finding a hole) is written as a GNU PAX 1.0 sparse member: records
/// `GNU.sparse.major=1`, `GNU.sparse.minor=0`, `GNU.sparse.name` (the real name) and
/// `GNU.sparse.realsize`, the member named `<dir>/GNUSparseFile.0/<name>`, its data the map
/// (decimal lines: count, then offset and length of each data segment, padded to 512 bytes)
/// followed by the data segments only. GNU tar, Go's `archive/tar` and [`crate::apply_layer`]
/// restore the holes. A file without holes is written as a plain member, so trees without holes
/// export byte for byte as before. Maps are kept to at most 65,536 segments (the shortest holes
/// are then written as zeros).
///
/// **Reading a tree that changes**: the tree is read through [`crate::fs`] only (one
/// [`fs::walk`], every name relative to its parent's descriptor, no symlink followed, a bounded
/// number of descriptors and constant native stack at any depth). Regular files are opened with
/// [`fs::open_file_checked`] and read only when they are still the inode the listing saw;
/// devices, FIFOs and symlinks are never opened (their xattrs are read through the parent). An
/// entry swapped in the meantime (a directory for a symlink, a file for a device or FIFO) fails
/// the stream with an error naming it; host files are never read.
///
/// `opts` selects paths, xattrs and — with [`WhiteoutFormat::Overlay`] — converts an overlay
/// upper's whiteouts (char device 0/0 → empty `.wh.<name>`, opaque directory → the directory followed by
/// `<dir>/.wh..wh..opq`; overlay xattrs are never written). Fails up front when `root` is not a
/// readable directory; later failures surface as read errors of the stream.
pub fn tar_tree(root: &Path, opts: &TarOptions) -> Result<TarStream> {
    let fd = open_export_root(root)?;
    let root = root.to_path_buf();
    let opts = opts.clone();
    Ok(TarStream::spawn(move |w, skipped| {
        let mut v = TreeExport {
            ex: Exporter::new(root.clone(), opts, skipped),
            w,
        };
        fs::walk(fd, &root, &mut v)
    }))
}

/// Streams the entries a change list names, read from `root` (the new tree), as a layer tar.
///
/// `Add` and `Modify` entries are written as they are in `root` (a directory without its
/// contents: its changed children are in the list themselves); a `Delete` becomes an empty
/// `.wh.<name>` entry in its parent directory. Entries follow the order of `changes` after
/// sorting them by path, so a list from [`crate::changes`] is written as is.
///
/// Each listed path is reached component by component from `root`'s descriptor (a
/// [`DirStack`] moved from one parent directory to the next, never following a symlink), and
/// read as [`tar_tree`] reads entries: a path whose parent became a symlink, or a file swapped
/// for another inode, fails the stream; lists of any depth work with bounded descriptors.
/// Sparse files are written as [`tar_tree`] describes.
///
/// Hardlinks: the 2nd and later exported names of an inode link to the first. The first
/// exported name of a regular file with more links than exported names is instead written as a
/// hardlink to another name of the same inode under `root` that is *not* in the list (nor under
/// an added or deleted directory), so that it exists unchanged in the parent when the layer is
/// applied and the hardlink group survives; the bytewise-smallest such name is chosen. Finding
/// it takes one walk of the whole tree, done only when such a file is met (at most once per
/// export). Without such a name, the file is written in full. With
/// [`WhiteoutFormat::Overlay`] `root` is an upper directory; the only names there outside a
/// list of [`crate::changes_from_overlay_upper`] are unchanged copies of lower files (left by
/// an apply's hardlink copy-up), which the parent has too, so they are used the same way. [`crate::changes_size`] counts the same way (a file linked
/// to an unchanged name adds no bytes).
///
/// `opts.include`/`exclude` filter the list; `opts.whiteout_format` applies as in
/// [`tar_tree`].
pub fn export_changes(root: &Path, changes: &[Change], opts: &TarOptions) -> Result<TarStream> {
    let fd = open_export_root(root)?;
    let root = root.to_path_buf();
    let opts = opts.clone();
    let mut list: Vec<Change> = changes.to_vec();
    list.sort();
    list.dedup_by(|a, b| a.path == b.path);
    Ok(TarStream::spawn(move |w, skipped| {
        let mut ex = Exporter::new(root.clone(), opts, skipped);
        let mut cur = ListCursor::new(fd, &root)?;
        // Whether names outside the list were looked for (once, on the first inode that needs it).
        let mut scanned = false;
        for c in &list {
            let relp = rel_of(&c.path);
            if relp.as_os_str().is_empty() || !ex.selected(&relp).0 {
                continue;
            }
            let rel = relp.as_os_str().as_bytes();
            if c.kind == ChangeKind::Delete {
                w.entry(
                    &whiteout_name(rel),
                    b"",
                    &EntryMeta::whiteout(),
                    &[],
                    Data::None,
                )?;
                continue;
            }
            let st = cur.stat(&relp)?;
            #[allow(clippy::unnecessary_cast)]
            let key = (st.st_dev as u64, st.st_ino as u64);
            if !scanned
                && ftype(&st) == FileType::RegularFile
                && st.st_nlink > 1
                && !ex.links.contains_key(&key)
            {
                scanned = true;
                let mut counts = LinkCounts::default();
                // A second cursor: `cur` stays where it is.
                let mut other = ListCursor::open(&root)?;
                for c in &list {
                    let r = rel_of(&c.path);
                    if c.kind == ChangeKind::Delete
                        || r.as_os_str().is_empty()
                        || !ex.selected(&r).0
                    {
                        continue;
                    }
                    counts.add(&other.stat(&r)?);
                }
                ex.unchanged = names_outside(&root, &list, &counts.wanted())?;
            }
            let (dir, name) = cur.reach(&relp)?;
            if ftype(&st) == FileType::Directory {
                let d = fs::open_dir_checked(dir, &name, &st)
                    .map_err(|e| Error::io("open directory", ex.full(rel), e))?;
                ex.write_dir(w, d.as_fd(), rel, &st)?;
            } else {
                ex.write_other(w, dir, &name, rel, &st)?;
            }
        }
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::fs;

    /// Name, data and xattrs of one archive entry.
    type Entry = (String, Vec<u8>, Vec<(String, Vec<u8>)>);

    fn entries(root: &Path) -> Vec<Entry> {
        let mut a = tar::Archive::new(tar_tree(root, &TarOptions::default()).unwrap());
        let mut out = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let mut xattrs = Vec::new();
            if let Some(ext) = e.pax_extensions().unwrap() {
                for x in ext {
                    let x = x.unwrap();
                    if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                        xattrs.push((k.to_string(), x.value_bytes().to_vec()));
                    }
                }
            }
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push((name, data, xattrs));
        }
        out
    }

    /// A tree deeper than the number of directory descriptors the walk holds: every level is
    /// exported, in order, with its contents (the walk reopens parents through `..` past the limit).
    #[test]
    fn deep_tree_is_exported_completely_and_in_order() {
        let t = tempfile::tempdir().unwrap();
        let levels = crate::fs::MAX_HELD_FDS * 3;
        let mut rel = PathBuf::new();
        for i in 0..levels {
            rel.push("d");
            fs::create_dir(t.path().join(&rel)).unwrap();
            // "a" sorts before "d": the file comes before the next level, "z" after it.
            for (f, body) in [("a", format!("a{i}")), ("z", format!("z{i}"))] {
                fs::write(t.path().join(&rel).join(f), &body).unwrap();
            }
        }
        // Expected order: d/, d/a, d/d/, d/d/a, ..., then the z files innermost first.
        let mut order = Vec::new();
        let mut p = String::new();
        for i in 0..levels {
            p.push_str(if i == 0 { "d" } else { "/d" });
            order.push((format!("{p}/"), Vec::new()));
            order.push((format!("{p}/a"), format!("a{i}").into_bytes()));
        }
        for i in (0..levels).rev() {
            let dir: Vec<&str> = std::iter::repeat_n("d", i + 1).collect();
            order.push((format!("{}/z", dir.join("/")), format!("z{i}").into_bytes()));
        }
        let got: Vec<(String, Vec<u8>)> = entries(t.path())
            .into_iter()
            .map(|(n, d, _)| (n, d))
            .collect();
        assert_eq!(got.len(), levels * 3);
        assert_eq!(got, order);
    }

    /// Xattr names and values larger than the first-try stack buffer are read in full, from
    /// regular files (through their descriptor), directories and symlinks.
    #[test]
    fn large_xattrs_are_read_in_full() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::write(r.join("f"), b"data").unwrap();
        fs::create_dir(r.join("d")).unwrap();
        let big: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let long_name = format!("user.{}", "n".repeat(200));
        for p in [r.join("f"), r.join("d")] {
            xattr::set(&p, "user.big", &big).unwrap();
            xattr::set(&p, &long_name, b"1").unwrap();
            xattr::set(&p, "user.more", b"2").unwrap();
            xattr::set(&p, "user.evenmore", b"3").unwrap();
        }
        let es = entries(r);
        for name in ["d/", "f"] {
            let (_, data, x) = es.iter().find(|e| e.0 == name).unwrap();
            let keys: Vec<&str> = x.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(
                keys,
                ["user.big", "user.evenmore", "user.more", long_name.as_str()],
                "{name}"
            );
            assert_eq!(x[0].1, big, "{name}");
            if name == "f" {
                assert_eq!(data, b"data");
            }
        }
    }
}
