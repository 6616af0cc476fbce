//! Writing trees and change lists as layer tar streams.
//!
//! The format is documented on [`tar_tree`], the streaming on [`TarStream`].

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

/// Size of the buffers handed from the producer thread to the reader. Headers and file data
/// are written straight into them (file contents are `read(2)` into place), and a buffer is sent
/// only when full, so a tree of small files costs one hand-over per 256 KiB, not one per file.
const CHUNK: usize = 256 * 1024;

/// Buffers in flight between producer and reader (beyond the one each side is working on).
const CHANNEL_DEPTH: usize = 4;

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
    /// Each is also warned about through `tracing` when it is skipped.
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

    /// Reads exactly `size` bytes of `fd` into the output: at its current offset, or with
    /// `pread(2)` from `offset`.
    fn copy_from(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: Option<u64>,
        size: u64,
        path: &Path,
    ) -> Result<()> {
        let mut left = size;
        while left > 0 {
            let room = self
                .room()
                .map_err(|e| werr(path.as_os_str().as_bytes(), e))?;
            let want = (left.min(room as u64)) as usize;
            let dst = &mut self.buf[self.fill..self.fill + want];
            let got = match offset {
                Some(off) => rustix::io::pread(fd, dst, off + (size - left)),
                None => rustix::io::read(fd, dst),
            };
            let n = match got {
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
    /// Whole seconds; negative before 1970 (written as a PAX `mtime` record, as Go does).
    mtime: i64,
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
    /// A file with holes, written as a PAX 1.0 sparse member: the map, then each data segment
    /// read from the descriptor at its offset.
    Sparse(BorrowedFd<'a>, &'a Path, &'a SparseMap),
}

/// The data segments of a file with holes, as a GNU PAX 1.0 sparse member describes them.
struct SparseMap {
    /// The file's size (`GNU.sparse.realsize`).
    real_size: u64,
    /// `(offset, length)` of each data segment, ascending and disjoint; a file ending in a
    /// hole ends with the empty segment `(real_size, 0)`, as GNU tar writes it.
    segs: Vec<(u64, u64)>,
}

/// The most data segments an exported sparse map holds; beyond this, the smallest holes are
/// written as zeros (memory stays bounded, and apply's limit of 2^20 segments is never hit).
const MAX_EXPORT_SEGMENTS: usize = 1 << 16;

fn decimal_len(n: u64) -> u64 {
    n.checked_ilog10().map_or(1, |l| u64::from(l) + 1)
}

impl SparseMap {
    /// Bytes of the map text (`count\n` then `offset\nlength\n` per segment), unpadded.
    fn text_len(&self) -> u64 {
        self.segs
            .iter()
            .fold(decimal_len(self.segs.len() as u64) + 1, |t, &(o, l)| {
                t + decimal_len(o) + decimal_len(l) + 2
            })
    }

    /// The member's stored size: the padded map and the data segments.
    fn stored_size(&self) -> u64 {
        let text = self.text_len();
        let data: u64 = self.segs.iter().map(|s| s.1).sum();
        text + pad_len(text) as u64 + data
    }
}

/// `dir/GNUSparseFile.0/base`, the member name GNU tar gives a 1.0 sparse file (readers that
/// do not know the format extract the raw map and data there, not over the real name).
fn sparse_header_name(name: &[u8]) -> Vec<u8> {
    let (parent, base) = match name.iter().rposition(|&b| b == b'/') {
        Some(i) => (&name[..=i], &name[i + 1..]),
        None => (&b""[..], name),
    };
    let mut p = parent.to_vec();
    p.extend_from_slice(b"GNUSparseFile.0/");
    p.extend_from_slice(base);
    p
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
        h.set_mtime(u64::try_from(m.mtime).unwrap_or(0).min(OCTAL11));
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
        let sparse = match data {
            Data::Sparse(_, _, map) => Some(map),
            _ => None,
        };
        let sparse_name = sparse.map(|_| sparse_header_name(name));
        let hname = sparse_name.as_deref().unwrap_or(name);
        let pax = &mut self.pax;
        pax.clear();
        if hname.len() > 100 {
            pax_record(pax, b"path", hname);
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
        if !(0..=OCTAL11 as i64).contains(&m.mtime) {
            pax_record(pax, b"mtime", m.mtime.to_string().as_bytes());
        }
        for (k, v) in xattrs {
            pax_record(pax, format!("SCHILY.xattr.{k}").as_bytes(), v);
        }
        if let Some(map) = sparse {
            // After any `path`: readers take the last name record, and GNU.sparse.name is
            // the real one.
            pax_record(pax, b"GNU.sparse.major", b"1");
            pax_record(pax, b"GNU.sparse.minor", b"0");
            pax_record(pax, b"GNU.sparse.name", name);
            pax_record(
                pax,
                b"GNU.sparse.realsize",
                map.real_size.to_string().as_bytes(),
            );
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
        let mut h = Self::raw_header(hname, link, m);
        h.set_cksum();
        self.out
            .write_all(h.as_bytes())
            .map_err(|e| werr(name, e))?;
        match data {
            Data::None => {}
            Data::Fd(fd, path) => {
                self.out.copy_from(fd, None, m.size, path)?;
                self.out.zeros(pad_len(m.size)).map_err(|e| werr(name, e))?;
            }
            Data::Sparse(fd, path, map) => {
                self.sparse_map(map).map_err(|e| werr(name, e))?;
                for &(off, len) in &map.segs {
                    self.out.copy_from(fd, Some(off), len, path)?;
                }
                self.out.zeros(pad_len(m.size)).map_err(|e| werr(name, e))?;
            }
        }
        Ok(())
    }

    /// Writes the 1.0 sparse map (decimal lines) padded to a whole block.
    fn sparse_map(&mut self, map: &SparseMap) -> io::Result<()> {
        let mut line = String::new();
        let mut put = |out: &mut Out, n: u64| {
            use std::fmt::Write as _;
            line.clear();
            let _ = writeln!(line, "{n}");
            out.write_all(line.as_bytes())
        };
        put(&mut self.out, map.segs.len() as u64)?;
        for &(o, l) in &map.segs {
            put(&mut self.out, o)?;
            put(&mut self.out, l)?;
        }
        self.out.zeros(pad_len(map.text_len()))
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

fn ftype(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

#[allow(clippy::unnecessary_cast)]
fn st_size(st: &Stat) -> u64 {
    u64::try_from(st.st_size).unwrap_or(0)
}

/// The data layout of the regular file open as `fd` (`lstat` `st`) when it has holes, or `None`
/// for a dense file (and on filesystems without `SEEK_DATA`/`SEEK_HOLE`, which report one data
/// segment). Files whose allocated blocks cover their size are not probed at all. Leaves the
/// file offset at 0.
#[allow(clippy::unnecessary_cast)]
fn sparse_layout(fd: BorrowedFd<'_>, st: &Stat) -> io::Result<Option<SparseMap>> {
    let size = st_size(st);
    let allocated = u64::try_from(st.st_blocks)
        .unwrap_or(u64::MAX)
        .saturating_mul(512);
    if size == 0 || allocated >= size {
        return Ok(None);
    }
    let res = probe_segments(fd, size);
    rustix::fs::seek(fd, SeekFrom::Start(0))?;
    let segs = match res? {
        Some(s) => s,
        None => return Ok(None),
    };
    Ok(Some(SparseMap {
        real_size: size,
        segs,
    }))
}

/// The data segments of the first `size` bytes of `fd`, `None` when there is no hole.
fn probe_segments(fd: BorrowedFd<'_>, size: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
    let mut segs: Vec<(u64, u64)> = Vec::new();
    // Holes shorter than this are written as data (only raised past MAX_EXPORT_SEGMENTS).
    let mut min_hole = 0u64;
    let mut off = 0u64;
    while off < size {
        let data = match rustix::fs::seek(fd, SeekFrom::Data(off)) {
            Ok(d) => d,
            // No data after `off`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            // No SEEK_DATA here: treat the file as dense.
            Err(rustix::io::Errno::INVAL) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match rustix::fs::seek(fd, SeekFrom::Hole(data)) {
            Ok(h) => h.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if hole <= data {
            break;
        }
        match segs.last_mut() {
            Some(last) if data - (last.0 + last.1) < min_hole => last.1 = hole - last.0,
            _ => segs.push((data, hole - data)),
        }
        if segs.len() > MAX_EXPORT_SEGMENTS {
            while segs.len() > MAX_EXPORT_SEGMENTS / 2 {
                min_hole = min_hole.saturating_mul(2).max(4096);
                coalesce(&mut segs, min_hole);
            }
        }
        off = hole;
    }
    if segs.len() == 1 && segs[0] == (0, size) {
        return Ok(None);
    }
    if segs.last().is_none_or(|&(o, l)| o + l < size) {
        segs.push((size, 0));
    }
    Ok(Some(segs))
}

/// Merges segments separated by holes shorter than `min_hole`.
fn coalesce(segs: &mut Vec<(u64, u64)>, min_hole: u64) {
    let mut kept = 0;
    for i in 0..segs.len() {
        let (o, l) = segs[i];
        if kept > 0 {
            let (po, pl) = segs[kept - 1];
            if o - (po + pl) < min_hole {
                segs[kept - 1].1 = o + l - po;
                continue;
            }
        }
        segs[kept] = (o, l);
        kept += 1;
    }
    segs.truncate(kept);
}

/// State shared by the walk of one export.
struct Exporter {
    /// The root as the caller named it, for error messages only: nothing is opened by path.
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

    /// The full path of `rel`, for error messages.
    fn full(&self, rel: &[u8]) -> PathBuf {
        self.root.join(rel_path(rel))
    }

    /// Leaves `rel` out of the archive for reason `why`: recorded for [`TarStream::skipped`]
    /// and warned about through `tracing` (as GNU tar says "socket ignored"), so that no entry
    /// vanishes from a layer silently.
    fn skip(&self, rel: &[u8], why: &str) {
        tracing::warn!(path = %rel_path(rel).display(), reason = why,
            "left out of the layer tar");
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

    /// One xattr's value; `None` when it is not set (or cannot be read for lack of support or
    /// permission).
    fn read_xattr(&self, t: XattrTarget<'_>, name: &str, rel: &[u8]) -> Result<Option<Vec<u8>>> {
        let Ok(cname) = CString::new(name) else {
            return Ok(None);
        };
        fs::get_xattr(t, &cname)
            .map_err(|e| Error::io(format!("read xattr {name} of"), self.full(rel), e))
    }

    /// The selected xattrs of an entry, sorted by name.
    fn xattrs(&self, t: XattrTarget<'_>, rel: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
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

    fn meta(st: &Stat) -> EntryMeta {
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
    fn write_dir(
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
    fn write_other(
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
struct TreeExport<'a> {
    ex: Exporter,
    w: &'a mut TarWriter,
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

/// How many names of each multiply-linked regular file a change list holds, against its link
/// count.
#[derive(Default)]
pub(crate) struct LinkCounts(HashMap<(u64, u64), (u64, u64)>);

impl LinkCounts {
    /// Counts one (distinct) listed name whose `lstat` is `st`; only regular files with more
    /// than one link are recorded.
    #[allow(clippy::unnecessary_cast)]
    pub(crate) fn add(&mut self, st: &Stat) {
        if ftype(st) == FileType::RegularFile && st.st_nlink > 1 {
            self.0
                .entry((st.st_dev as u64, st.st_ino as u64))
                .or_insert((0, st.st_nlink as u64))
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

/// Reaches listed paths below a root one after another, moving a [`DirStack`] from the parent
/// of one path to the parent of the next: a sorted list costs one `openat` per directory
/// entered, whatever its depth, and no path is ever resolved from the root as a whole.
pub(crate) struct ListCursor {
    stack: DirStack,
    /// The root as the caller named it, for error messages only.
    root: PathBuf,
}

impl ListCursor {
    /// A cursor at `root`, opened as the caller's own path.
    pub(crate) fn open(root: &Path) -> Result<ListCursor> {
        let fd = fs::open_root_dir(root).map_err(|e| Error::io("open directory", root, e))?;
        Self::new(fd, root)
    }

    fn new(fd: OwnedFd, root: &Path) -> Result<ListCursor> {
        Ok(ListCursor {
            stack: DirStack::new(fd).map_err(|e| Error::io("open directory", root, e))?,
            root: root.to_path_buf(),
        })
    }

    /// Opens the parent directories of `rel` (a non-empty path of normal components relative
    /// to the root) one at a time, never following a symlink, and returns the parent's
    /// descriptor with the last component's name.
    ///
    /// The stack first returns to the deepest directory it holds that is an ancestor of `rel`
    /// (compared as bytes with the stack's own path), then descends: the work is proportional to
    /// the distance between consecutive paths, not to their depth.
    pub(crate) fn reach(&mut self, rel: &Path) -> Result<(BorrowedFd<'_>, CString)> {
        let root = &self.root;
        let bad = |what: &str| {
            Error::io(
                format!("read listed path ({what})"),
                root.join(rel),
                io::Error::from_raw_os_error(libc::EINVAL),
            )
        };
        if rel.is_absolute() {
            return Err(bad("expected a path below the root"));
        }
        let (Some(last), Some(parent)) = (rel.file_name(), rel.parent()) else {
            return Err(bad("expected a path below the root"));
        };
        let last = CString::new(last.as_bytes()).map_err(|_| bad("NUL byte in a name"))?;
        let parent = parent.as_os_str().as_bytes();
        loop {
            let s = self.stack.rel();
            if s.is_empty()
                || (parent.starts_with(s) && parent.get(s.len()).is_none_or(|&b| b == b'/'))
            {
                break;
            }
            self.stack.pop().map_err(|e| {
                Error::io(
                    "return to the parent of",
                    self.root.join(self.stack.rel_path()),
                    e,
                )
            })?;
        }
        let rest = &parent[self.stack.rel().len()..];
        for c in rest.split(|&b| b == b'/') {
            match c {
                b"" | b"." => continue,
                b".." => return Err(bad("expected a path below the root")),
                _ => {}
            }
            let name = CString::new(c).map_err(|_| bad("NUL byte in a name"))?;
            self.stack.push(&name, None).map_err(|e| {
                Error::io(
                    "open directory",
                    self.root
                        .join(self.stack.rel_path())
                        .join(OsStr::from_bytes(c)),
                    e,
                )
            })?;
        }
        Ok((self.stack.top(), last))
    }

    /// `lstat` of the listed path `rel`.
    pub(crate) fn stat(&mut self, rel: &Path) -> Result<Stat> {
        let (dir, name) = self.reach(rel)?;
        match fs::stat_at(dir, &name) {
            Ok(st) => Ok(st),
            Err(e) => Err(Error::io("lstat", self.root.join(rel), e)),
        }
    }
}

/// For each inode in `want`, the bytewise-smallest name (relative to `root`) of a regular file
/// under `root` that is that inode and that neither `changes` nor an `Add`/`Delete` of one of its
/// ancestors touches, so it exists unchanged in the parent the changes were taken against.
///
/// One [`fs::walk`] of the whole tree, not following symlinks, run only when `want` is not
/// empty; memory is one name per wanted inode plus the names of the directories being walked.
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
    let dir = fs::open_root_dir(root).map_err(|e| Error::io("open directory", root, e))?;
    let mut scan = Scan {
        listed: &listed,
        want,
        found: &mut found,
    };
    fs::walk(dir, root, &mut scan)?;
    Ok(found)
}

/// The walk of [`names_outside`].
struct Scan<'a> {
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
}

impl fs::Visitor for Scan<'_> {
    type Error = Error;

    #[allow(clippy::unnecessary_cast)]
    fn entry(&mut self, _: BorrowedFd<'_>, _: &CStr, rel: &[u8], st: &Stat) -> Result<bool> {
        let key = (st.st_dev as u64, st.st_ino as u64);
        if ftype(st) == FileType::RegularFile && st.st_nlink > 1 && self.want.contains(&key) {
            let better = self.found.get(&key).is_none_or(|cur| rel < cur.as_slice());
            if better && self.unchanged(rel) {
                self.found.insert(key, rel.to_vec());
            }
        }
        Ok(true)
    }
}

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
/// [`WhiteoutFormat::Overlay`] `root` is an upper directory, not the whole new tree, so no
/// names outside the list are used. [`crate::changes_size`] counts the same way (a file linked
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
        let mut scanned = ex.overlay_ns().is_some();
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
