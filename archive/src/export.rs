//! Writing trees and change lists as layer tar streams.
//!
//! The format is documented on [`tar_tree`], the streaming on [`TarStream`].

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::change::{get_xattr, rel_of};
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

/// Size of the chunks handed from the producer thread to the reader, and of the file copy buffer.
const CHUNK: usize = 64 * 1024;

/// Chunks in flight between producer and reader.
const CHANNEL_DEPTH: usize = 2;

type Skipped = Arc<Mutex<Vec<(PathBuf, String)>>>;

enum Msg {
    Data(Vec<u8>),
    Failed(Error),
    End,
}

/// A layer tar being produced in the background; read it like a file.
///
/// Reading returns the tar bytes in order and then end-of-file once the archive, including its
/// two zero end blocks, is complete.
///
/// The tar is produced by a background thread and handed over in 64 KiB chunks through a
/// channel holding at most two of them, so memory stays bounded whatever the tree size. A
/// failure in the producer (a file vanished, a read error) makes `read` return
/// an [`std::io::Error`] wrapping the [`crate::Error`] (`get_ref()` / `into_inner()` give it
/// back): the stream is never silently truncated. Dropping the stream early stops the producer
/// at its next write, and the drop waits for it to end.
pub struct TarStream {
    rx: Option<Receiver<Msg>>,
    cur: Vec<u8>,
    pos: usize,
    finished: bool,
    failed: Option<String>,
    skipped: Skipped,
    thread: Option<JoinHandle<()>>,
}

impl TarStream {
    /// The entries left out of the archive (sockets, xattrs with non-UTF-8 names), each with
    /// the reason, as paths relative to the root. Complete once `read` has returned end-of-file.
    pub fn skipped(&self) -> Vec<(PathBuf, String)> {
        match self.skipped.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn spawn<F>(job: F) -> TarStream
    where
        F: FnOnce(&mut TarWriter, &Skipped) -> Result<()> + Send + 'static,
    {
        let (tx, rx) = sync_channel(CHANNEL_DEPTH);
        let skipped: Skipped = Arc::default();
        let sk = Arc::clone(&skipped);
        let thread = std::thread::spawn(move || {
            let mut w = TarWriter {
                out: ChunkWriter {
                    tx: tx.clone(),
                    buf: Vec::with_capacity(CHUNK),
                },
                copy_buf: vec![0; CHUNK],
            };
            let res = job(&mut w, &sk).and_then(|()| w.finish());
            match res {
                Ok(()) => {
                    let _ = tx.send(Msg::End);
                }
                Err(e) => {
                    // A send error means the reader is gone: nobody to tell.
                    let _ = tx.send(Msg::Failed(e));
                }
            }
        });
        TarStream {
            rx: Some(rx),
            cur: Vec::new(),
            pos: 0,
            finished: false,
            failed: None,
            skipped,
            thread: Some(thread),
        }
    }
}

impl Read for TarStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos < self.cur.len() {
                let n = buf.len().min(self.cur.len() - self.pos);
                buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if let Some(msg) = &self.failed {
                return Err(io::Error::other(msg.clone()));
            }
            if self.finished {
                return Ok(0);
            }
            let Some(rx) = &self.rx else {
                return Ok(0);
            };
            match rx.recv() {
                Ok(Msg::Data(d)) => {
                    self.cur = d;
                    self.pos = 0;
                }
                Ok(Msg::End) => self.finished = true,
                Ok(Msg::Failed(e)) => {
                    self.failed = Some(e.to_string());
                    return Err(io::Error::other(e));
                }
                Err(_) => {
                    let msg = "layer tar producer ended without finishing the archive".to_string();
                    self.failed = Some(msg.clone());
                    return Err(io::Error::other(msg));
                }
            }
        }
    }
}

impl Drop for TarStream {
    fn drop(&mut self) {
        // Closing the receiver makes the producer's next send fail, which ends it.
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Collects bytes into 64 KiB chunks and sends them to the reader.
struct ChunkWriter {
    tx: SyncSender<Msg>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .send(Msg::Data(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the tar reader went away"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_chunk()
    }
}

/// Header metadata of one entry, independent of where it came from.
struct EntryMeta {
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    dev: Option<(u32, u32)>,
}

impl EntryMeta {
    fn whiteout() -> EntryMeta {
        EntryMeta {
            kind: tar::EntryType::Regular,
            mode: 0o600,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            dev: None,
        }
    }
}

const OCTAL7: u64 = 0o7_777_777;
const OCTAL11: u64 = 0o77_777_777_777;

/// Writes tar entries (PAX where needed) to the chunk writer.
struct TarWriter {
    out: ChunkWriter,
    copy_buf: Vec<u8>,
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "<len> <key>=<value>\n", where <len> counts itself.
    let base = key.len() + value.len() + 3;
    let mut len = base + 1;
    while len != base + len.to_string().len() {
        len = base + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn werr(name: &[u8], e: io::Error) -> Error {
    Error::io("write tar entry", PathBuf::from(OsStr::from_bytes(name)), e)
}

impl TarWriter {
    fn raw_header(name: &[u8], link: &[u8], m: &EntryMeta) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        if let Some(u) = h.as_ustar_mut() {
            let n = name.len().min(u.name.len());
            u.name[..n].copy_from_slice(&name[..n]);
            let l = link.len().min(u.linkname.len());
            u.linkname[..l].copy_from_slice(&link[..l]);
        }
        h.set_entry_type(m.kind);
        h.set_mode(m.mode & 0o7777);
        h.set_uid(m.uid.min(OCTAL7));
        h.set_gid(m.gid.min(OCTAL7));
        h.set_size(if m.size > OCTAL11 { 0 } else { m.size });
        h.set_mtime(m.mtime.min(OCTAL11));
        if let Some((ma, mi)) = m.dev {
            let _ = h.set_device_major(ma);
            let _ = h.set_device_minor(mi);
        }
        h
    }

    /// Writes one entry: a PAX header when needed, the ustar header, then `data` (exactly
    /// `m.size` bytes are expected from it).
    fn entry(
        &mut self,
        name: &[u8],
        link: &[u8],
        m: &EntryMeta,
        xattrs: &[(String, Vec<u8>)],
        data: Option<(&mut dyn Read, &Path)>,
    ) -> Result<()> {
        let mut pax = Vec::new();
        if name.len() > 100 {
            pax_record(&mut pax, b"path", name);
        }
        if link.len() > 100 {
            pax_record(&mut pax, b"linkpath", link);
        }
        if m.uid > OCTAL7 {
            pax_record(&mut pax, b"uid", m.uid.to_string().as_bytes());
        }
        if m.gid > OCTAL7 {
            pax_record(&mut pax, b"gid", m.gid.to_string().as_bytes());
        }
        if m.size > OCTAL11 {
            pax_record(&mut pax, b"size", m.size.to_string().as_bytes());
        }
        if m.mtime > OCTAL11 {
            pax_record(&mut pax, b"mtime", m.mtime.to_string().as_bytes());
        }
        for (k, v) in xattrs {
            pax_record(&mut pax, format!("SCHILY.xattr.{k}").as_bytes(), v);
        }
        if !pax.is_empty() {
            let mut pname = b"PaxHeaders.0/".to_vec();
            let base = name
                .rsplit(|&b| b == b'/')
                .find(|s| !s.is_empty())
                .unwrap_or(b"entry");
            pname.extend_from_slice(&base[..base.len().min(80)]);
            let pm = EntryMeta {
                kind: tar::EntryType::XHeader,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: pax.len() as u64,
                mtime: 0,
                dev: None,
            };
            let mut h = Self::raw_header(&pname, b"", &pm);
            h.set_cksum();
            self.out
                .write_all(h.as_bytes())
                .map_err(|e| werr(name, e))?;
            self.out.write_all(&pax).map_err(|e| werr(name, e))?;
            self.pad(pax.len() as u64).map_err(|e| werr(name, e))?;
        }
        let mut h = Self::raw_header(name, link, m);
        h.set_cksum();
        self.out
            .write_all(h.as_bytes())
            .map_err(|e| werr(name, e))?;
        if let Some((r, path)) = data {
            let mut left = m.size;
            while left > 0 {
                let want = (left.min(CHUNK as u64)) as usize;
                let n = match r.read(&mut self.copy_buf[..want]) {
                    Ok(0) => {
                        return Err(Error::io(
                            "read",
                            path,
                            io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!(
                                    "file shrank while being exported: expected {} bytes, found {}",
                                    m.size,
                                    m.size - left
                                ),
                            ),
                        ));
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::io("read", path, e)),
                };
                self.out
                    .write_all(&self.copy_buf[..n])
                    .map_err(|e| werr(name, e))?;
                left -= n as u64;
            }
            self.pad(m.size).map_err(|e| werr(name, e))?;
        }
        Ok(())
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let rem = (size % 512) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; 512][..512 - rem])?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.out
            .write_all(&[0u8; 1024])
            .and_then(|()| self.out.flush())
            .map_err(|e| werr(b"end of archive", e))
    }
}

/// State shared by the walk of one export.
struct Exporter {
    root: PathBuf,
    opts: TarOptions,
    /// (dev, ino) → first name written, for hardlink detection.
    links: HashMap<(u64, u64), Vec<u8>>,
    skipped: Skipped,
}

fn name_bytes(rel: &Path) -> Vec<u8> {
    rel.as_os_str().as_bytes().to_vec()
}

fn whiteout_name(rel: &Path) -> Vec<u8> {
    let mut p = rel.parent().map(name_bytes).unwrap_or_default();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(WHITEOUT_PREFIX.as_bytes());
    p.extend_from_slice(rel.file_name().map(|n| n.as_bytes()).unwrap_or_default());
    p
}

impl Exporter {
    fn overlay_ns(&self) -> Option<crate::OverlayXattr> {
        match self.opts.whiteout_format {
            WhiteoutFormat::Overlay(ns) => Some(ns),
            WhiteoutFormat::Oci => None,
        }
    }

    fn skip(&self, rel: &Path, why: &str) {
        let mut g = match self.skipped.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.push((rel.to_path_buf(), why.to_string()));
    }

    /// Whether `rel` is selected, and whether a directory at `rel` should be descended into.
    fn selected(&self, rel: &Path) -> (bool, bool) {
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

    fn xattrs(&self, full: &Path, rel: &Path) -> Result<Vec<(String, Vec<u8>)>> {
        let names = match xattr::list(full) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list xattrs of", full, e)),
        };
        let mut out = Vec::new();
        for n in names {
            let Some(s) = n.to_str() else {
                self.skip(rel, &format!("xattr with a non-UTF-8 name {n:?} left out"));
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
            if wanted && let Some(v) = get_xattr(full, s)? {
                out.push((s.to_string(), v));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Writes the entry at `rel` (metadata `md`).
    fn write_path(&mut self, w: &mut TarWriter, rel: &Path, md: &Metadata) -> Result<()> {
        let full = self.root.join(rel);
        let ft = md.file_type();
        let ns = self.overlay_ns();
        if ft.is_socket() {
            self.skip(rel, "sockets cannot be stored in a tar archive");
            return Ok(());
        }
        if ns.is_some() && ft.is_char_device() && md.rdev() == 0 {
            return w.entry(&whiteout_name(rel), b"", &EntryMeta::whiteout(), &[], None);
        }
        let mut name = name_bytes(rel);
        let mut m = EntryMeta {
            kind: tar::EntryType::Regular,
            mode: md.mode() & 0o7777,
            uid: u64::from(md.uid()),
            gid: u64::from(md.gid()),
            size: 0,
            mtime: u64::try_from(md.mtime()).unwrap_or(0),
            dev: None,
        };
        if ft.is_dir() {
            let xattrs = self.xattrs(&full, rel)?;
            if let Some(ns) = ns {
                let redirect = format!("{}redirect", ns.prefix());
                if get_xattr(&full, &redirect)?.is_some() {
                    return Err(Error::io(
                        format!(
                            "export overlay upper (expected no {redirect} xattr, found one; redirect_dir uppers are not supported)"
                        ),
                        &full,
                        io::Error::from(io::ErrorKind::Unsupported),
                    ));
                }
            }
            name.push(b'/');
            m.kind = tar::EntryType::Directory;
            w.entry(&name, b"", &m, &xattrs, None)?;
            if let Some(ns) = ns
                && get_xattr(&full, ns.opaque_name())?.as_deref() == Some(b"y")
            {
                name.extend_from_slice(WHITEOUT_OPAQUE.as_bytes());
                w.entry(&name, b"", &EntryMeta::whiteout(), &[], None)?;
            }
            return Ok(());
        }
        if md.nlink() > 1 {
            match self.links.get(&(md.dev(), md.ino())) {
                Some(first) => {
                    let first = first.clone();
                    m.kind = tar::EntryType::Link;
                    return w.entry(&name, &first, &m, &[], None);
                }
                None => {
                    self.links.insert((md.dev(), md.ino()), name.clone());
                }
            }
        }
        // Hardlink entries carry no xattrs: the first name of the inode has them.
        let xattrs = self.xattrs(&full, rel)?;
        if ft.is_symlink() {
            let target = std::fs::read_link(&full).map_err(|e| Error::io("readlink", &full, e))?;
            m.kind = tar::EntryType::Symlink;
            return w.entry(&name, target.as_os_str().as_bytes(), &m, &xattrs, None);
        }
        if ft.is_char_device() || ft.is_block_device() {
            m.kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            };
            let rdev = md.rdev();
            m.dev = Some((libc::major(rdev), libc::minor(rdev)));
            return w.entry(&name, b"", &m, &xattrs, None);
        }
        if ft.is_fifo() {
            m.kind = tar::EntryType::Fifo;
            return w.entry(&name, b"", &m, &xattrs, None);
        }
        // A regular file.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&full)
            .map_err(|e| Error::io("open", &full, e))?;
        m.size = md.len();
        let f: &mut File = &mut f;
        w.entry(&name, b"", &m, &xattrs, Some((f, &full)))
    }

    fn walk(&mut self, w: &mut TarWriter, rel: &Path) -> Result<()> {
        let dir = self.root.join(rel);
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::io("read directory", &dir, e))?;
        let mut names = Vec::new();
        for ent in rd {
            names.push(
                ent.map_err(|e| Error::io("read directory", &dir, e))?
                    .file_name(),
            );
        }
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for n in names {
            let rel_c = rel.join(&n);
            let (take, descend) = self.selected(&rel_c);
            if !take && !descend {
                continue;
            }
            let full = self.root.join(&rel_c);
            let md = std::fs::symlink_metadata(&full).map_err(|e| Error::io("lstat", &full, e))?;
            if take {
                self.write_path(w, &rel_c, &md)?;
            }
            if descend && md.is_dir() {
                self.walk(w, &rel_c)?;
            }
        }
        Ok(())
    }
}

fn check_root(root: &Path) -> Result<PathBuf> {
    let md = std::fs::metadata(root).map_err(|e| Error::io("stat", root, e))?;
    if !md.is_dir() {
        return Err(Error::io(
            "export (expected a directory, found another file type)",
            root,
            io::Error::from_raw_os_error(libc::ENOTDIR),
        ));
    }
    Ok(root.to_path_buf())
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
/// the first one written (within [`export_changes`], only names in the change list count).
/// Deletions are written as empty regular `.wh.<name>` entries (mode 0600, mtime 0, owner 0:0).
/// Devices and FIFOs are exported; sockets cannot be and are left out, listed by
/// [`TarStream::skipped`].
///
/// `opts` selects paths, xattrs and — with [`WhiteoutFormat::Overlay`] — converts an overlay
/// upper's whiteouts (char device 0/0 → empty `.wh.<name>`, opaque directory → the directory followed by
/// `<dir>/.wh..wh..opq`; overlay xattrs are never written). Fails up front when `root` is not a
/// readable directory; later failures surface as read errors of the stream.
pub fn tar_tree(root: &Path, opts: &TarOptions) -> Result<TarStream> {
    let root = check_root(root)?;
    let opts = opts.clone();
    Ok(TarStream::spawn(move |w, skipped| {
        let mut ex = Exporter {
            root,
            opts,
            links: HashMap::new(),
            skipped: Arc::clone(skipped),
        };
        ex.walk(w, Path::new(""))
    }))
}

/// Streams the entries a change list names, read from `root` (the new tree), as a layer tar.
///
/// `Add` and `Modify` entries are written as they are in `root` (a directory without its
/// contents: its changed children are in the list themselves); a `Delete` becomes an empty
/// `.wh.<name>` entry in its parent directory. Entries follow the order of `changes` after
/// sorting them by path, so a list from [`crate::changes`] is written as is. Hardlinks are
/// linked only to names that are part of the change list. `opts.include`/`exclude` filter the
/// list; `opts.whiteout_format` applies as in [`tar_tree`].
pub fn export_changes(root: &Path, changes: &[Change], opts: &TarOptions) -> Result<TarStream> {
    let root = check_root(root)?;
    let opts = opts.clone();
    let mut list: Vec<Change> = changes.to_vec();
    list.sort();
    list.dedup_by(|a, b| a.path == b.path);
    Ok(TarStream::spawn(move |w, skipped| {
        let mut ex = Exporter {
            root,
            opts,
            links: HashMap::new(),
            skipped: Arc::clone(skipped),
        };
        for c in &list {
            let rel = rel_of(&c.path);
            if rel.as_os_str().is_empty() || !ex.selected(&rel).0 {
                continue;
            }
            if c.kind == ChangeKind::Delete {
                w.entry(&whiteout_name(&rel), b"", &EntryMeta::whiteout(), &[], None)?;
                continue;
            }
            let full = ex.root.join(&rel);
            let md = std::fs::symlink_metadata(&full).map_err(|e| Error::io("lstat", &full, e))?;
            ex.write_path(w, &rel, &md)?;
        }
        Ok(())
    }))
}
