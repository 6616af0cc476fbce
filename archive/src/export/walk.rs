//! The walk of an export: which entries are written and how ([`Exporter`]), and the
//! [`fs::Visitor`] of a whole-tree export.

use super::*;

/// State shared by the walk of one export.
pub(crate) struct Exporter {
    /// The root as the caller named it, for error messages only: nothing is opened by path.
    pub(crate) root: PathBuf,
    pub(crate) opts: TarOptions,
    /// (dev, ino) → first name written, for hardlink detection.
    pub(crate) links: HashMap<(u64, u64), Vec<u8>>,
    /// (dev, ino) → a name of the inode outside the change list ([`export_changes`] only).
    pub(crate) unchanged: HashMap<(u64, u64), Vec<u8>>,
    pub(crate) skipped: Skipped,
    /// Whether `opts` selects everything (no include or exclude lists).
    pub(crate) select_all: bool,
}

pub(crate) fn whiteout_name(rel: &[u8]) -> Vec<u8> {
    let (parent, base) = match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..=i], &rel[i + 1..]),
        None => (&b""[..], rel),
    };
    let mut p = parent.to_vec();
    p.extend_from_slice(WHITEOUT_PREFIX.as_bytes());
    p.extend_from_slice(base);
    p
}

pub(crate) fn rel_path(rel: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(rel))
}

impl Exporter {
    pub(crate) fn new(root: PathBuf, opts: TarOptions, skipped: &Skipped) -> Exporter {
        Exporter {
            root,
            select_all: opts.include.is_empty() && opts.exclude.is_empty(),
            opts,
            links: HashMap::new(),
            unchanged: HashMap::new(),
            skipped: Arc::clone(skipped),
        }
    }

    pub(crate) fn overlay_ns(&self) -> Option<crate::OverlayXattr> {
        match self.opts.whiteout_format {
            WhiteoutFormat::Overlay(ns) => Some(ns),
            WhiteoutFormat::Oci => None,
        }
    }

    /// The full path of `rel`, for error messages.
    pub(crate) fn full(&self, rel: &[u8]) -> PathBuf {
        self.root.join(rel_path(rel))
    }

    /// Leaves `rel` out of the archive for reason `why`: recorded for [`TarStream::skipped`]
    /// and warned about through `tracing` (as GNU tar says "socket ignored"), so that no entry
    /// vanishes from a layer silently.
    pub(crate) fn skip(&self, rel: &[u8], why: &str) {
        tracing::warn!(path = %rel_path(rel).display(), reason = why,
            "left out of the layer tar");
        let mut g = match self.skipped.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.push((rel_path(rel).to_path_buf(), why.to_string()));
    }

    /// Whether `rel` is selected, and whether a directory at `rel` should be descended into.
    pub(crate) fn selected(&self, rel: &Path) -> (bool, bool) {
        if self.select_all {
            return (true, true);
        }
        if self.opts.exclude.iter().any(|e| rel.starts_with(rel_of(e))) {
            return (false, false);
        }
        if self.opts.include.is_empty() {
            return (true, true);
        }
        let inc = self.opts.include.iter().map(|i| rel_of(i));
        let mut descend = false;
        for i in inc {
            if rel.starts_with(&i) {
                return (true, true);
            }
            if i.starts_with(rel) {
                descend = true;
            }
        }
        (false, descend)
    }

    /// One xattr's value; `None` when it is not set (or cannot be read for lack of support or
    /// permission).
    pub(crate) fn read_xattr(
        &self,
        t: XattrTarget<'_>,
        name: &str,
        rel: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        let Ok(cname) = CString::new(name) else {
            return Ok(None);
        };
        fs::get_xattr(t, &cname)
            .map_err(|e| Error::io(format!("read xattr {name} of"), self.full(rel), e))
    }

    /// The selected xattrs of an entry, sorted by name.
    pub(crate) fn xattrs(&self, t: XattrTarget<'_>, rel: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
        let names =
            fs::list_xattrs(t).map_err(|e| Error::io("list xattrs of", self.full(rel), e))?;
        let mut out = Vec::new();
        for n in names {
            let Ok(s) = std::str::from_utf8(n.to_bytes()) else {
                self.skip(
                    rel,
                    &format!(
                        "xattr with a non-UTF-8 name {:?} left out",
                        OsStr::from_bytes(n.to_bytes())
                    ),
                );
                continue;
            };
            let wanted = if s == "security.capability" {
                true
            } else if s.starts_with("trusted.overlay.") || s.starts_with("user.overlay.") {
                false
            } else if self.opts.xattr_prefixes.is_empty() {
                true
            } else {
                self.opts
                    .xattr_prefixes
                    .iter()
                    .any(|p| s.starts_with(p.as_str()))
            };
            if wanted
                && let Some(v) = fs::get_xattr(t, &n)
                    .map_err(|e| Error::io(format!("read xattr {s} of"), self.full(rel), e))?
            {
                out.push((s.to_string(), v));
            }
        }
        out.sort();
        Ok(out)
    }

    pub(crate) fn meta(st: &Stat) -> EntryMeta {
        #[allow(clippy::unnecessary_cast)]
        EntryMeta {
            kind: tar::EntryType::Regular,
            mode: st.st_mode as u32 & 0o7777,
            uid: u64::from(st.st_uid),
            gid: u64::from(st.st_gid),
            size: 0,
            mtime: st.st_mtime,
            dev: None,
        }
    }

    /// Writes the directory `rel` (`lstat` `st`), open as `fd` (checked to be that inode).
    pub(crate) fn write_dir(
        &mut self,
        w: &mut TarWriter,
        fd: BorrowedFd<'_>,
        rel: &[u8],
        st: &Stat,
    ) -> Result<()> {
        let ns = self.overlay_ns();
        let t = XattrTarget::Fd(fd);
        let xattrs = self.xattrs(t, rel)?;
        if let Some(ns) = ns {
            let redirect = format!("{}redirect", ns.prefix());
            if self.read_xattr(t, &redirect, rel)?.is_some() {
                return Err(Error::io(
                    format!(
                        "export overlay upper (expected no {redirect} xattr, found one; redirect_dir uppers are not supported)"
                    ),
                    self.full(rel),
                    io::Error::from(io::ErrorKind::Unsupported),
                ));
            }
        }
        let mut m = Self::meta(st);
        let mut name = Vec::with_capacity(rel.len() + 1 + WHITEOUT_OPAQUE.len());
        name.extend_from_slice(rel);
        name.push(b'/');
        m.kind = tar::EntryType::Directory;
        w.entry(&name, b"", &m, &xattrs, Data::None)?;
        if let Some(ns) = ns
            && self.read_xattr(t, ns.opaque_name(), rel)?.as_deref() == Some(b"y")
        {
            name.extend_from_slice(WHITEOUT_OPAQUE.as_bytes());
            w.entry(&name, b"", &EntryMeta::whiteout(), &[], Data::None)?;
        }
        Ok(())
    }

    /// Writes the entry `name` of the directory open as `dir`: `rel` is its path relative to
    /// the root and `st` its `lstat`. Not for directories ([`Exporter::write_dir`]).
    ///
    /// Nothing but a regular file is ever opened, and that one with
    /// [`fs::open_file_checked`]: if it was swapped for another inode (a device, a FIFO, a
    /// symlink) since `st` was taken, the export fails instead of reading it.
    pub(crate) fn write_other(
        &mut self,
        w: &mut TarWriter,
        dir: BorrowedFd<'_>,
        name: &CStr,
        rel: &[u8],
        st: &Stat,
    ) -> Result<()> {
        let kind = ftype(st);
        if kind == FileType::Socket {
            self.skip(rel, "sockets cannot be stored in a tar archive");
            return Ok(());
        }
        #[allow(clippy::unnecessary_cast)]
        let (dev, ino, nlink, rdev) = (
            st.st_dev as u64,
            st.st_ino as u64,
            st.st_nlink as u64,
            st.st_rdev as u64,
        );
        if self.overlay_ns().is_some() && kind == FileType::CharacterDevice && rdev == 0 {
            return w.entry(
                &whiteout_name(rel),
                b"",
                &EntryMeta::whiteout(),
                &[],
                Data::None,
            );
        }
        let mut m = Self::meta(st);
        if nlink > 1 && kind == FileType::RegularFile {
            if let Some(first) = self.links.get(&(dev, ino)) {
                let first = first.clone();
                m.kind = tar::EntryType::Link;
                return w.entry(rel, &first, &m, &[], Data::None);
            }
            if let Some(target) = self.unchanged.get(&(dev, ino)) {
                // The first exported name of an inode that also has a name outside the change
                // list: that name exists unchanged in the parent, so link to it.
                let target = target.clone();
                self.links.insert((dev, ino), target.clone());
                m.kind = tar::EntryType::Link;
                return w.entry(rel, &target, &m, &[], Data::None);
            }
            self.links.insert((dev, ino), rel.to_vec());
        }
        let at = XattrTarget::At(dir, name);
        match kind {
            FileType::Symlink => {
                let xattrs = self.xattrs(at, rel)?;
                let target = fs::readlink_at(dir, name)
                    .map_err(|e| Error::io("readlink", self.full(rel), e))?;
                m.kind = tar::EntryType::Symlink;
                w.entry(rel, &target, &m, &xattrs, Data::None)
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                let xattrs = self.xattrs(at, rel)?;
                m.kind = match kind {
                    FileType::CharacterDevice => tar::EntryType::Char,
                    FileType::BlockDevice => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                };
                if kind != FileType::Fifo {
                    m.dev = Some((libc::major(rdev), libc::minor(rdev)));
                }
                w.entry(rel, b"", &m, &xattrs, Data::None)
            }
            FileType::RegularFile => {
                let full = self.full(rel);
                let f = fs::open_file_checked(dir, name, st)
                    .map_err(|e| Error::io("open", &full, e))?;
                let xattrs = self.xattrs(XattrTarget::Fd(f.as_fd()), rel)?;
                match sparse_layout(f.as_fd(), st).map_err(|e| Error::io("seek", &full, e))? {
                    Some(map) => {
                        m.size = map.stored_size();
                        w.entry(rel, b"", &m, &xattrs, Data::Sparse(f.as_fd(), &full, &map))
                    }
                    None => {
                        m.size = st_size(st);
                        w.entry(rel, b"", &m, &xattrs, Data::Fd(f.as_fd(), &full))
                    }
                }
            }
            _ => {
                self.skip(rel, "unknown file type left out");
                Ok(())
            }
        }
    }
}

/// The [`fs::Visitor`] of [`tar_tree`]: directories are written when entered (through their
/// own descriptor), everything else when listed.
pub(crate) struct TreeExport<'a> {
    pub(crate) ex: Exporter,
    pub(crate) w: &'a mut TarWriter,
}

impl fs::Visitor for TreeExport<'_> {
    type Error = Error;

    fn entry(&mut self, dir: BorrowedFd<'_>, name: &CStr, rel: &[u8], st: &Stat) -> Result<bool> {
        let (take, descend) = self.ex.selected(rel_path(rel));
        if ftype(st) == FileType::Directory {
            // Written by `enter`, once its descriptor is open and checked.
            return Ok(take || descend);
        }
        if take {
            self.ex.write_other(self.w, dir, name, rel, st)?;
        }
        Ok(false)
    }

    fn enter(&mut self, dir: BorrowedFd<'_>, rel: &[u8], st: &Stat) -> Result<()> {
        if !rel.is_empty() && self.ex.selected(rel_path(rel)).0 {
            self.ex.write_dir(self.w, dir, rel, st)?;
        }
        Ok(())
    }
}
