//! Writing trees and change lists as layer tar streams.
//!
//! The format is documented on [`tar_tree`], the streaming on [`TarStream`].

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, OsStr};
use std::fs::Metadata;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Stat};

use crate::change::{get_xattr, rel_of};
use crate::compare::Kind;
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

/// Size of the buffers handed from the producer thread to the reader. Headers and file data
/// are written straight into them (file contents are `read(2)` into place), and a buffer is sent
/// only when full, so a tree of small files costs one hand-over per 256 KiB, not one per file.
const CHUNK: usize = 256 * 1024;

/// Buffers in flight between producer and reader (beyond the one each side is working on).
const CHANNEL_DEPTH: usize = 4;

/// Directory nesting beyond which the walk stops holding one open descriptor per level and
/// reopens parents by path instead, so deep trees cannot exhaust the descriptor limit.
const MAX_HELD_DIR_FDS: usize = 32;

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
/// The tar is produced by a background thread and handed over in 256 KiB buffers through a
/// channel holding at most four of them (consumed buffers are recycled), so memory stays
/// bounded (about 1.5 MiB) whatever the tree size. A failure in the producer (a file vanished,
/// a read error) makes `read` return an [`std::io::Error`] wrapping the [`crate::Error`]
/// (`get_ref()` / `into_inner()` give it back): the stream is never silently truncated.
/// Dropping the stream early stops the producer at its next hand-over, and the drop waits for
/// it to end.
pub struct TarStream {
    rx: Option<Receiver<Msg>>,
    recycle: Sender<Vec<u8>>,
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
        let (recycle, spare) = channel();
        let skipped: Skipped = Arc::default();
        let sk = Arc::clone(&skipped);
        let thread = std::thread::spawn(move || {
            let mut w = TarWriter {
                out: Out {
                    tx: tx.clone(),
                    spare,
                    buf: vec![0; CHUNK],
                    fill: 0,
                },
                pax: Vec::new(),
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
            recycle,
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
                    let used = std::mem::replace(&mut self.cur, d);
                    self.pos = 0;
                    if used.capacity() == CHUNK {
                        // The producer may be gone already: then the buffer is just freed.
                        let _ = self.recycle.send(used);
                    }
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

/// The producer's output buffer: filled in place, sent to the reader when full.
struct Out {
    tx: SyncSender<Msg>,
    /// Buffers the reader is done with.
    spare: Receiver<Vec<u8>>,
    /// Always `CHUNK` bytes long; `buf[..fill]` is pending output.
    buf: Vec<u8>,
    fill: usize,
}

impl Out {
    fn send(&mut self) -> io::Result<()> {
        if self.fill == 0 {
            return Ok(());
        }
        let mut next = self.spare.try_recv().unwrap_or_default();
        next.resize(CHUNK, 0);
        let mut chunk = std::mem::replace(&mut self.buf, next);
        chunk.truncate(self.fill);
        self.fill = 0;
        self.tx
            .send(Msg::Data(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the tar reader went away"))
    }

    /// Room for at least one byte, sending the buffer when it is full.
    fn room(&mut self) -> io::Result<usize> {
        if self.fill == CHUNK {
            self.send()?;
        }
        Ok(CHUNK - self.fill)
    }

    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.room()?.min(data.len());
            self.buf[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
        }
        Ok(())
    }

    fn zeros(&mut self, mut n: usize) -> io::Result<()> {
        while n > 0 {
            let k = self.room()?.min(n);
            self.buf[self.fill..self.fill + k].fill(0);
            self.fill += k;
            n -= k;
        }
        Ok(())
    }

    /// Reads exactly `size` bytes of `fd` (at its current offset) into the output.
    fn copy_from(&mut self, fd: BorrowedFd<'_>, size: u64, path: &Path) -> Result<()> {
        let mut left = size;
        while left > 0 {
            let room = self
                .room()
                .map_err(|e| werr(path.as_os_str().as_bytes(), e))?;
            let want = (left.min(room as u64)) as usize;
            let n = match rustix::io::read(fd, &mut self.buf[self.fill..self.fill + want]) {
                Ok(0) => {
                    return Err(Error::io(
                        "read",
                        path,
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "file shrank while being exported: expected {size} bytes, found {}",
                                size - left
                            ),
                        ),
                    ));
                }
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::io("read", path, e.into())),
            };
            self.fill += n;
            left -= n as u64;
        }
        Ok(())
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

/// Writes tar entries (PAX where needed) into the output buffer.
struct TarWriter {
    out: Out,
    /// Reused PAX record buffer.
    pax: Vec<u8>,
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

/// Where an entry's file data comes from.
enum Data<'a> {
    None,
    /// Read `size` bytes from this descriptor; the path is for error messages.
    Fd(BorrowedFd<'a>, &'a Path),
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
        data: Data<'_>,
    ) -> Result<()> {
        let pax = &mut self.pax;
        pax.clear();
        if name.len() > 100 {
            pax_record(pax, b"path", name);
        }
        if link.len() > 100 {
            pax_record(pax, b"linkpath", link);
        }
        if m.uid > OCTAL7 {
            pax_record(pax, b"uid", m.uid.to_string().as_bytes());
        }
        if m.gid > OCTAL7 {
            pax_record(pax, b"gid", m.gid.to_string().as_bytes());
        }
        if m.size > OCTAL11 {
            pax_record(pax, b"size", m.size.to_string().as_bytes());
        }
        if m.mtime > OCTAL11 {
            pax_record(pax, b"mtime", m.mtime.to_string().as_bytes());
        }
        for (k, v) in xattrs {
            pax_record(pax, format!("SCHILY.xattr.{k}").as_bytes(), v);
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
                .and_then(|()| self.out.write_all(&self.pax))
                .and_then(|()| self.out.zeros(pad_len(self.pax.len() as u64)))
                .map_err(|e| werr(name, e))?;
        }
        let mut h = Self::raw_header(name, link, m);
        h.set_cksum();
        self.out
            .write_all(h.as_bytes())
            .map_err(|e| werr(name, e))?;
        if let Data::Fd(fd, path) = data {
            self.out.copy_from(fd, m.size, path)?;
            self.out.zeros(pad_len(m.size)).map_err(|e| werr(name, e))?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.out
            .zeros(1024)
            .and_then(|()| self.out.send())
            .map_err(|e| werr(b"end of archive", e))
    }
}

fn pad_len(size: u64) -> usize {
    match (size % 512) as usize {
        0 => 0,
        rem => 512 - rem,
    }
}

/// What the export needs from `lstat`, from either `std` or `rustix`.
struct Meta {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    nlink: u64,
    dev: u64,
    ino: u64,
    rdev: u64,
}

impl Meta {
    fn from_std(md: &Metadata) -> Meta {
        let kind = Kind::from(md.file_type());
        Meta {
            kind,
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: md.len(),
            mtime: md.mtime(),
            nlink: md.nlink(),
            dev: md.dev(),
            ino: md.ino(),
            rdev: md.rdev(),
        }
    }

    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    fn from_stat(st: &Stat) -> Meta {
        let kind = match FileType::from_raw_mode(st.st_mode as _) {
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            FileType::CharacterDevice => Kind::Char,
            FileType::BlockDevice => Kind::Block,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            _ => Kind::File,
        };
        Meta {
            kind,
            mode: st.st_mode as u32,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: st.st_mtime as i64,
            nlink: st.st_nlink as u64,
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            rdev: st.st_rdev as u64,
        }
    }
}

/// How to reach an entry's xattrs, link target and contents.
#[derive(Clone, Copy)]
enum Access<'a> {
    /// Only through its full path (not following a final symlink).
    Path,
    /// Through its parent directory and name, and, for directories and regular files, an open
    /// descriptor of the entry itself.
    At {
        dir: BorrowedFd<'a>,
        name: &'a CStr,
        fd: Option<BorrowedFd<'a>>,
    },
}

/// Runs a `*listxattr`/`*getxattr`-style call into a growing buffer.
fn xattr_call(
    mut call: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
    mut query: impl FnMut() -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    let mut stack = [0u8; 512];
    match call(&mut stack) {
        Ok(n) => return Ok(stack[..n].to_vec()),
        Err(rustix::io::Errno::RANGE) => {}
        Err(e) => return Err(e),
    }
    loop {
        let want = query()?;
        let mut v = vec![0u8; want];
        match call(&mut v) {
            Ok(n) => {
                v.truncate(n);
                return Ok(v);
            }
            // It grew in between: ask again.
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The NUL-separated xattr names of an entry (empty when the filesystem has none).
fn list_xattr_names(full: &Path, fd: Option<BorrowedFd<'_>>) -> Result<Vec<u8>> {
    let res = match fd {
        Some(fd) => xattr_call(
            |b| rustix::fs::flistxattr(fd, b),
            || rustix::fs::flistxattr_query(fd),
        ),
        None => xattr_call(
            |b| rustix::fs::llistxattr(full, b),
            || rustix::fs::llistxattr_query(full),
        ),
    };
    match res {
        Ok(v) => Ok(v),
        Err(rustix::io::Errno::NOTSUP) => Ok(Vec::new()),
        Err(e) => Err(Error::io("list xattrs of", full, e.into())),
    }
}

/// One xattr's value; `None` when it is not set (or cannot be read for lack of support or
/// permission, as [`get_xattr`] treats it).
fn read_xattr(full: &Path, fd: Option<BorrowedFd<'_>>, name: &str) -> Result<Option<Vec<u8>>> {
    let res = match fd {
        Some(fd) => xattr_call(
            |b| rustix::fs::fgetxattr(fd, name, b),
            || rustix::fs::fgetxattr_query(fd, name),
        ),
        None => return get_xattr(full, name),
    };
    match res {
        Ok(v) => Ok(Some(v)),
        Err(rustix::io::Errno::NOTSUP | rustix::io::Errno::NODATA | rustix::io::Errno::PERM) => {
            Ok(None)
        }
        Err(e) => Err(Error::io(format!("read xattr {name} of"), full, e.into())),
    }
}

/// State shared by the walk of one export.
struct Exporter {
    root: PathBuf,
    opts: TarOptions,
    /// (dev, ino) → first name written, for hardlink detection.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// (dev, ino) → a name of the inode outside the change list ([`export_changes`] only).
    unchanged: HashMap<(u64, u64), Vec<u8>>,
    skipped: Skipped,
    /// Whether `opts` selects everything (no include or exclude lists).
    select_all: bool,
}

fn whiteout_name(rel: &[u8]) -> Vec<u8> {
    let (parent, base) = match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..=i], &rel[i + 1..]),
        None => (&b""[..], rel),
    };
    let mut p = parent.to_vec();
    p.extend_from_slice(WHITEOUT_PREFIX.as_bytes());
    p.extend_from_slice(base);
    p
}

fn rel_path(rel: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(rel))
}

impl Exporter {
    fn new(root: PathBuf, opts: TarOptions, skipped: &Skipped) -> Exporter {
        Exporter {
            root,
            select_all: opts.include.is_empty() && opts.exclude.is_empty(),
            opts,
            links: HashMap::new(),
            unchanged: HashMap::new(),
            skipped: Arc::clone(skipped),
        }
    }

    fn overlay_ns(&self) -> Option<crate::OverlayXattr> {
        match self.opts.whiteout_format {
            WhiteoutFormat::Overlay(ns) => Some(ns),
            WhiteoutFormat::Oci => None,
        }
    }

    fn skip(&self, rel: &[u8], why: &str) {
        let mut g = match self.skipped.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.push((rel_path(rel).to_path_buf(), why.to_string()));
    }

    /// Whether `rel` is selected, and whether a directory at `rel` should be descended into.
    fn selected(&self, rel: &Path) -> (bool, bool) {
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

    fn xattrs(
        &self,
        full: &Path,
        fd: Option<BorrowedFd<'_>>,
        rel: &[u8],
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let names = list_xattr_names(full, fd)?;
        let mut out = Vec::new();
        for n in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let Ok(s) = std::str::from_utf8(n) else {
                self.skip(
                    rel,
                    &format!(
                        "xattr with a non-UTF-8 name {:?} left out",
                        OsStr::from_bytes(n)
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
            if wanted && let Some(v) = read_xattr(full, fd, s)? {
                out.push((s.to_string(), v));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Writes the entry `rel` (full path `full`, metadata `md`), reaching it through `acc`.
    fn write_entry(
        &mut self,
        w: &mut TarWriter,
        rel: &[u8],
        full: &Path,
        md: &Meta,
        acc: Access<'_>,
    ) -> Result<()> {
        let ns = self.overlay_ns();
        if md.kind == Kind::Socket {
            self.skip(rel, "sockets cannot be stored in a tar archive");
            return Ok(());
        }
        if ns.is_some() && md.kind == Kind::Char && md.rdev == 0 {
            return w.entry(
                &whiteout_name(rel),
                b"",
                &EntryMeta::whiteout(),
                &[],
                Data::None,
            );
        }
        let fd = match acc {
            Access::At { fd, .. } => fd,
            Access::Path => None,
        };
        let mut m = EntryMeta {
            kind: tar::EntryType::Regular,
            mode: md.mode & 0o7777,
            uid: u64::from(md.uid),
            gid: u64::from(md.gid),
            size: 0,
            mtime: u64::try_from(md.mtime).unwrap_or(0),
            dev: None,
        };
        if md.kind == Kind::Dir {
            let xattrs = self.xattrs(full, fd, rel)?;
            if let Some(ns) = ns {
                let redirect = format!("{}redirect", ns.prefix());
                if read_xattr(full, fd, &redirect)?.is_some() {
                    return Err(Error::io(
                        format!(
                            "export overlay upper (expected no {redirect} xattr, found one; redirect_dir uppers are not supported)"
                        ),
                        full,
                        io::Error::from(io::ErrorKind::Unsupported),
                    ));
                }
            }
            let mut name = Vec::with_capacity(rel.len() + 1 + WHITEOUT_OPAQUE.len());
            name.extend_from_slice(rel);
            name.push(b'/');
            m.kind = tar::EntryType::Directory;
            w.entry(&name, b"", &m, &xattrs, Data::None)?;
            if let Some(ns) = ns
                && read_xattr(full, fd, ns.opaque_name())?.as_deref() == Some(b"y")
            {
                name.extend_from_slice(WHITEOUT_OPAQUE.as_bytes());
                w.entry(&name, b"", &EntryMeta::whiteout(), &[], Data::None)?;
            }
            return Ok(());
        }
        if md.nlink > 1
            && md.kind == Kind::File
            && !self.links.contains_key(&(md.dev, md.ino))
            && let Some(target) = self.unchanged.get(&(md.dev, md.ino))
        {
            // The first exported name of an inode that also has a name outside the change
            // list: that name exists unchanged in the parent, so link to it.
            let target = target.clone();
            self.links.insert((md.dev, md.ino), target.clone());
            m.kind = tar::EntryType::Link;
            return w.entry(rel, &target, &m, &[], Data::None);
        }
        if md.nlink > 1 {
            match self.links.get(&(md.dev, md.ino)) {
                Some(first) => {
                    let first = first.clone();
                    m.kind = tar::EntryType::Link;
                    return w.entry(rel, &first, &m, &[], Data::None);
                }
                None => {
                    self.links.insert((md.dev, md.ino), rel.to_vec());
                }
            }
        }
        match md.kind {
            Kind::Symlink => {
                // Hardlink entries carry no xattrs: the first name of the inode has them.
                let xattrs = self.xattrs(full, None, rel)?;
                let target = match acc {
                    Access::At { dir, name, .. } => rustix::fs::readlinkat(dir, name, Vec::new())
                        .map(|t| t.into_bytes())
                        .map_err(io::Error::from),
                    Access::Path => std::fs::read_link(full).map(|t| t.into_os_string().into_vec()),
                }
                .map_err(|e| Error::io("readlink", full, e))?;
                m.kind = tar::EntryType::Symlink;
                w.entry(rel, &target, &m, &xattrs, Data::None)
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                let xattrs = self.xattrs(full, None, rel)?;
                m.kind = match md.kind {
                    Kind::Char => tar::EntryType::Char,
                    Kind::Block => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                };
                if md.kind != Kind::Fifo {
                    m.dev = Some((libc::major(md.rdev), libc::minor(md.rdev)));
                }
                w.entry(rel, b"", &m, &xattrs, Data::None)
            }
            _ => {
                // A regular file.
                m.size = md.size;
                match fd {
                    Some(fd) => {
                        let xattrs = self.xattrs(full, Some(fd), rel)?;
                        w.entry(rel, b"", &m, &xattrs, Data::Fd(fd, full))
                    }
                    None => {
                        let f = std::fs::OpenOptions::new()
                            .read(true)
                            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
                            .open(full)
                            .map_err(|e| Error::io("open", full, e))?;
                        let xattrs = self.xattrs(full, Some(f.as_fd()), rel)?;
                        w.entry(rel, b"", &m, &xattrs, Data::Fd(f.as_fd(), full))
                    }
                }
            }
        }
    }

    /// Writes the contents of the directory open as `dir`, whose path relative to the root is
    /// `rel` and whose full path is `full` (both restored on return).
    fn walk(
        &mut self,
        w: &mut TarWriter,
        dir: OwnedFd,
        rel: &mut Vec<u8>,
        full: &mut PathBuf,
        depth: usize,
    ) -> Result<()> {
        // All names first (sorted bytewise), in one arena: (offset, length, type).
        let mut arena: Vec<u8> = Vec::new();
        let mut ents: Vec<(usize, usize, FileType)> = Vec::new();
        let mut rd = Dir::new(dir).map_err(|e| Error::io("read directory", &*full, e.into()))?;
        while let Some(ent) = rd.read() {
            let ent = ent.map_err(|e| Error::io("read directory", &*full, e.into()))?;
            let n = ent.file_name().to_bytes_with_nul();
            if n == b".\0" || n == b"..\0" {
                continue;
            }
            ents.push((arena.len(), n.len(), ent.file_type()));
            arena.extend_from_slice(n);
        }
        ents.sort_unstable_by(|a, b| arena[a.0..a.0 + a.1].cmp(&arena[b.0..b.0 + b.1]));
        let mut rd = Some(rd);
        for &(off, len, ft) in &ents {
            let name_z = &arena[off..off + len];
            let name = &name_z[..len - 1];
            let Ok(cname) = CStr::from_bytes_with_nul(name_z) else {
                continue;
            };
            let rel_len = rel.len();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name);
            full.push(OsStr::from_bytes(name));
            let res = self.walk_child(w, &mut rd, cname, ft, rel, full, depth);
            full.pop();
            rel.truncate(rel_len);
            res?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_child(
        &mut self,
        w: &mut TarWriter,
        rd: &mut Option<Dir>,
        name: &CStr,
        ft: FileType,
        rel: &mut Vec<u8>,
        full: &mut PathBuf,
        depth: usize,
    ) -> Result<()> {
        let (take, descend) = self.selected(rel_path(rel));
        if !take && !descend {
            return Ok(());
        }
        if rd.is_none() {
            // Deep in the tree the parent was closed while a child was walked: reopen it.
            let parent = full.parent().unwrap_or(full.as_path()).to_path_buf();
            let fd = rustix::fs::open(
                &parent,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io("open directory", &parent, e.into()))?;
            *rd = Some(Dir::new(fd).map_err(|e| Error::io("read directory", &parent, e.into()))?);
        }
        let Some(dir) = rd.as_ref() else {
            return Ok(());
        };
        let dirfd = dir
            .fd()
            .map_err(|e| Error::io("read directory", &*full, e.into()))?;
        let open_flags =
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
        // Regular files and directories are opened (and then fstat'ed), everything else is
        // lstat'ed by name: never open a device or FIFO.
        let opened = match ft {
            FileType::RegularFile if take => Some(open_flags),
            FileType::Directory => Some(open_flags | OFlags::DIRECTORY),
            _ => None,
        };
        let (md, fd) = match opened {
            Some(fl) => {
                let fd = rustix::fs::openat(dirfd, name, fl, Mode::empty())
                    .map_err(|e| Error::io("open", &*full, e.into()))?;
                let st =
                    rustix::fs::fstat(&fd).map_err(|e| Error::io("fstat", &*full, e.into()))?;
                (Meta::from_stat(&st), Some(fd))
            }
            None => {
                let st = rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| Error::io("lstat", &*full, e.into()))?;
                let md = Meta::from_stat(&st);
                let fd = match md.kind {
                    Kind::Dir => Some(open_flags | OFlags::DIRECTORY),
                    Kind::File if take => Some(open_flags),
                    _ => None,
                }
                .map(|fl| {
                    rustix::fs::openat(dirfd, name, fl, Mode::empty())
                        .map_err(|e| Error::io("open", &*full, e.into()))
                })
                .transpose()?;
                (md, fd)
            }
        };
        if take {
            let acc = Access::At {
                dir: dirfd,
                name,
                fd: fd.as_ref().map(|f| f.as_fd()),
            };
            self.write_entry(w, rel, full, &md, acc)?;
        }
        if descend
            && md.kind == Kind::Dir
            && let Some(fd) = fd
        {
            if depth >= MAX_HELD_DIR_FDS {
                *rd = None;
            }
            self.walk(w, fd, rel, full, depth + 1)?;
        }
        Ok(())
    }
}

/// How many names of each multiply-linked regular file a change list holds, against its link
/// count.
#[derive(Default)]
pub(crate) struct LinkCounts(HashMap<(u64, u64), (u64, u64)>);

impl LinkCounts {
    /// Counts one (distinct) listed name with metadata `md`; only regular files with more than
    /// one link are recorded.
    pub(crate) fn add(&mut self, md: &Metadata) {
        if md.file_type().is_file() && md.nlink() > 1 {
            self.0
                .entry((md.dev(), md.ino()))
                .or_insert((0, md.nlink()))
                .0 += 1;
        }
    }

    /// The inodes with more links than listed names: they may have names outside the list.
    pub(crate) fn wanted(&self) -> HashSet<(u64, u64)> {
        self.0
            .iter()
            .filter(|(_, (names, nlink))| names < nlink)
            .map(|(k, _)| *k)
            .collect()
    }
}

/// For each inode in `want`, the bytewise-smallest name (relative to `root`) of a regular file
/// under `root` that is that inode and that neither `changes` nor an `Add`/`Delete` of one of its
/// ancestors touches, so it exists unchanged in the parent the changes were taken against.
///
/// One walk of the whole tree, not following symlinks, run only when `want` is not empty;
/// memory is one name per wanted inode plus the names of the directories being walked.
pub(crate) fn names_outside(
    root: &Path,
    changes: &[Change],
    want: &HashSet<(u64, u64)>,
) -> Result<HashMap<(u64, u64), Vec<u8>>> {
    let mut found = HashMap::new();
    if want.is_empty() {
        return Ok(found);
    }
    let listed: HashMap<Vec<u8>, ChangeKind> = changes
        .iter()
        .map(|c| (rel_of(&c.path).into_os_string().into_vec(), c.kind))
        .collect();
    let dir = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("open directory", root, e.into()))?;
    let mut scan = Scan {
        root,
        listed: &listed,
        want,
        found: &mut found,
    };
    scan.dir(dir, &mut Vec::new(), 0)?;
    Ok(found)
}

/// The walk of [`names_outside`].
struct Scan<'a> {
    root: &'a Path,
    listed: &'a HashMap<Vec<u8>, ChangeKind>,
    want: &'a HashSet<(u64, u64)>,
    found: &'a mut HashMap<(u64, u64), Vec<u8>>,
}

impl Scan<'_> {
    /// Whether `rel` exists unchanged in the parent: it is not listed and no ancestor of it
    /// was added or deleted.
    fn unchanged(&self, rel: &[u8]) -> bool {
        if self.listed.contains_key(rel) {
            return false;
        }
        rel.iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'/')
            .all(|(i, _)| {
                !matches!(
                    self.listed.get(&rel[..i]),
                    Some(ChangeKind::Add | ChangeKind::Delete)
                )
            })
    }

    fn dir(&mut self, dir: OwnedFd, rel: &mut Vec<u8>, depth: usize) -> Result<()> {
        let full = || self.root.join(rel_path(rel));
        let mut subdirs: Vec<u8> = Vec::new();
        let mut rd = Dir::new(dir).map_err(|e| Error::io("read directory", full(), e.into()))?;
        while let Some(ent) = rd.read() {
            let ent = ent.map_err(|e| Error::io("read directory", full(), e.into()))?;
            let name = ent.file_name();
            let nb = name.to_bytes();
            if nb == b"." || nb == b".." {
                continue;
            }
            let mut ft = ent.file_type();
            if ft == FileType::Unknown || ft == FileType::RegularFile {
                let dirfd = rd
                    .fd()
                    .map_err(|e| Error::io("read directory", full(), e.into()))?;
                let st =
                    rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| {
                        Error::io("lstat", full().join(OsStr::from_bytes(nb)), e.into())
                    })?;
                let md = Meta::from_stat(&st);
                ft = match md.kind {
                    Kind::Dir => FileType::Directory,
                    Kind::File => FileType::RegularFile,
                    _ => FileType::Unknown,
                };
                let key = (md.dev, md.ino);
                if md.kind == Kind::File && md.nlink > 1 && self.want.contains(&key) {
                    let mut r = rel.clone();
                    if !r.is_empty() {
                        r.push(b'/');
                    }
                    r.extend_from_slice(nb);
                    let better = self.found.get(&key).is_none_or(|cur| r < *cur);
                    if better && self.unchanged(&r) {
                        self.found.insert(key, r);
                    }
                }
            }
            if ft == FileType::Directory {
                subdirs.extend_from_slice(name.to_bytes_with_nul());
            }
        }
        // Deep in the tree, stop holding this level's descriptor: reopen by path instead.
        let held = if depth < MAX_HELD_DIR_FDS {
            Some(rd)
        } else {
            drop(rd);
            None
        };
        for name_z in subdirs.split_inclusive(|&b| b == 0) {
            let Ok(cname) = CStr::from_bytes_with_nul(name_z) else {
                continue;
            };
            let rel_len = rel.len();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(cname.to_bytes());
            let fl = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let opened = match &held {
                Some(rd) => rd
                    .fd()
                    .and_then(|d| rustix::fs::openat(d, cname, fl, Mode::empty())),
                None => rustix::fs::open(self.root.join(rel_path(rel)), fl, Mode::empty()),
            };
            let res = opened
                .map_err(|e| Error::io("open directory", self.root.join(rel_path(rel)), e.into()))
                .and_then(|fd| self.dir(fd, rel, depth + 1));
            rel.truncate(rel_len);
            res?;
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
/// the first one written (see [`export_changes`] for names outside a change list).
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
        let dir = rustix::fs::open(
            &root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open directory", &root, e.into()))?;
        let mut full = root.clone();
        let mut ex = Exporter::new(root, opts, skipped);
        ex.walk(w, dir, &mut Vec::new(), &mut full, 0)
    }))
}

/// Streams the entries a change list names, read from `root` (the new tree), as a layer tar.
///
/// `Add` and `Modify` entries are written as they are in `root` (a directory without its
/// contents: its changed children are in the list themselves); a `Delete` becomes an empty
/// `.wh.<name>` entry in its parent directory. Entries follow the order of `changes` after
/// sorting them by path, so a list from [`crate::changes`] is written as is.
///
/// Hardlinks: the 2nd and later exported names of an inode link to the first. The first
/// exported name of a regular file with more links than exported names is instead written as a
/// hardlink to another name of the same inode under `root` that is *not* in the list (nor under
/// an added or deleted directory), so that it exists unchanged in the parent when the layer is
/// applied and the hardlink group survives; the bytewise-smallest such name is chosen. Finding
/// it takes one walk of the whole tree, done only when such a file is met (at most once per
/// export). Without such a name, the file is written in full. With
/// [`WhiteoutFormat::Overlay`] `root` is an upper directory, not the whole new tree, so no
/// names outside the list are used. [`crate::changes_size`] counts the same way (a file linked
/// to an unchanged name adds no bytes).
///
/// `opts.include`/`exclude` filter the list; `opts.whiteout_format` applies as in
/// [`tar_tree`].
pub fn export_changes(root: &Path, changes: &[Change], opts: &TarOptions) -> Result<TarStream> {
    let root = check_root(root)?;
    let opts = opts.clone();
    let mut list: Vec<Change> = changes.to_vec();
    list.sort();
    list.dedup_by(|a, b| a.path == b.path);
    Ok(TarStream::spawn(move |w, skipped| {
        let mut ex = Exporter::new(root, opts, skipped);
        // Whether names outside the list were looked for (once, on the first inode that needs it).
        let mut scanned = ex.overlay_ns().is_some();
        for c in &list {
            let rel = rel_of(&c.path);
            if rel.as_os_str().is_empty() || !ex.selected(&rel).0 {
                continue;
            }
            let rel = rel.as_os_str().as_bytes();
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
            let full = ex.root.join(rel_path(rel));
            let md = std::fs::symlink_metadata(&full).map_err(|e| Error::io("lstat", &full, e))?;
            if !scanned
                && md.file_type().is_file()
                && md.nlink() > 1
                && !ex.links.contains_key(&(md.dev(), md.ino()))
            {
                scanned = true;
                let mut counts = LinkCounts::default();
                for c in &list {
                    let r = rel_of(&c.path);
                    if c.kind == ChangeKind::Delete
                        || r.as_os_str().is_empty()
                        || !ex.selected(&r).0
                    {
                        continue;
                    }
                    let p = ex.root.join(&r);
                    let m = std::fs::symlink_metadata(&p).map_err(|e| Error::io("lstat", &p, e))?;
                    counts.add(&m);
                }
                ex.unchanged = names_outside(&ex.root, &list, &counts.wanted())?;
            }
            ex.write_entry(w, rel, &full, &Meta::from_std(&md), Access::Path)?;
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
    /// exported, in order, with its contents (the walk reopens parents by path past the limit).
    #[test]
    fn deep_tree_is_exported_completely_and_in_order() {
        let t = tempfile::tempdir().unwrap();
        let levels = MAX_HELD_DIR_FDS * 3;
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
