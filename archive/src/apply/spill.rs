//! Bookkeeping of an apply in bounded memory: what does not fit in a small in-memory chunk goes
//! to an unlinked scratch file in the target.
//!
//! An apply must remember two things for the whole layer: the paths it wrote (an opaque
//! directory keeps them, see `Applier::prune`) and the directories whose times are set at the
//! end. Kept in memory, both grow with the layer (about 80 bytes per file). Here each is a log
//! with a memory budget ([`limit`]); past it, the chunk is written to a scratch file and memory
//! is reused:
//!
//! * [`PathLog`] is a set of paths: each spilled chunk is a **sorted run**; reading merges the
//!   runs (at most [`FAN_IN`] at a time, merging runs into longer ones first when there are
//!   more) into one sorted stream ([`Merged`]), which the opaque-directory pass walks in step
//!   with its depth-first walk of the tree, so no query goes back.
//! * [`TimeLog`] is an ordered list of (directory, mtime): chunks are appended as they are and
//!   read back in order. A directory met again while its record is still in memory updates it
//!   (a layer may repeat one directory entry a million times); once spilled, a new record is
//!   added and, read back later, overrides it: the last metadata wins either way.
//!
//! Keys are paths with `/` replaced by a 0 byte (names hold neither), so that byte order is the
//! order of a depth-first walk with each directory's names in byte order: `a`, `a/b`, `a-b`.
//!
//! The scratch file is made only when a chunk first spills: an `O_TMPFILE` in the target (no
//! name, gone when closed; the target is the one place the apply may write, also in the
//! confined child), or where the filesystem has no `O_TMPFILE`, a reserved `.wh..wh.` name
//! created exclusively and unlinked at once. Nothing here reads the environment or takes a
//! lock (see the module's fork-safety invariant).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, Timespec};

/// Memory budget of one log, in bytes (see [`limit`]).
const DEFAULT_LIMIT: usize = 512 * 1024;

/// The budget in force; only tests change it.
static LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_LIMIT);

/// Bytes a log keeps in memory before it spills to the scratch file.
pub(crate) fn limit() -> usize {
    LIMIT.load(Ordering::Relaxed)
}

/// Test hook: sets how many bytes each bookkeeping log of an apply keeps in memory before it
/// spills to a scratch file in the target (default 512 KiB), for the whole process; a few bytes
/// make every small test layer spill. Only with the `test-util` feature.
#[cfg(any(test, feature = "test-util"))]
pub fn set_spill_limit(bytes: usize) {
    LIMIT.store(bytes.max(1), Ordering::Relaxed);
}

/// The most runs merged at once; more are first merged into longer runs.
pub(crate) const FAN_IN: usize = 16;

/// Read buffer of one run while merging.
const RUN_BUFFER: usize = 16 * 1024;

/// Write buffer when appending to the scratch file.
const WRITE_BUFFER: usize = 64 * 1024;

/// Memory counted per in-memory record on top of its bytes (index entries, hash slots).
const RECORD_OVERHEAD: usize = 48;

/// The key of a normalised relative path: `/` replaced by 0.
pub(crate) fn key_of(path: &[u8]) -> Vec<u8> {
    path.iter()
        .map(|&b| if b == b'/' { 0 } else { b })
        .collect()
}

/// The path of a key: 0 replaced by `/`.
pub(crate) fn path_of(key: &[u8]) -> Vec<u8> {
    key.iter().map(|&b| if b == 0 { b'/' } else { b }).collect()
}

/// Whether `key` is `dir` or below it (every key is below the root, the empty key).
pub(crate) fn at_or_under(dir: &[u8], key: &[u8]) -> bool {
    dir.is_empty() || (key.starts_with(dir) && matches!(key.get(dir.len()), None | Some(0)))
}

/// An unlinked scratch file in the target, written at its end and read anywhere.
struct Scratch {
    file: File,
    /// Bytes written.
    len: u64,
}

impl Scratch {
    /// Makes the scratch file beneath `root` (see the module documentation).
    fn create(root: BorrowedFd<'_>) -> io::Result<Scratch> {
        let mode = Mode::from_raw_mode(0o600);
        match rustix::fs::openat(
            root,
            ".",
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            mode,
        ) {
            Ok(fd) => {
                return Ok(Scratch {
                    file: File::from(fd),
                    len: 0,
                });
            }
            // No O_TMPFILE on this filesystem (or kernel): a named file, unlinked at once.
            Err(
                rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::ISDIR
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::NOENT,
            ) => {}
            Err(e) => return Err(e.into()),
        }
        let pid = rustix::process::getpid().as_raw_nonzero().get();
        for n in 0..1000u32 {
            let name = format!("{}spill-{pid}-{n}", crate::WHITEOUT_META_PREFIX);
            match rustix::fs::openat(
                root,
                name.as_str(),
                OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                mode,
            ) {
                Ok(fd) => {
                    rustix::fs::unlinkat(root, name.as_str(), AtFlags::empty())?;
                    return Ok(Scratch {
                        file: File::from(fd),
                        len: 0,
                    });
                }
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "expected a free scratch file name in the target, found 1000 taken",
        ))
    }
}

/// Buffered appends to a [`Scratch`].
struct Appender<'a> {
    scratch: &'a mut Scratch,
    buf: Vec<u8>,
}

impl<'a> Appender<'a> {
    fn new(scratch: &'a mut Scratch) -> Self {
        Appender {
            scratch,
            buf: Vec::with_capacity(WRITE_BUFFER),
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.buf.len() + data.len() > WRITE_BUFFER {
            self.flush()?;
        }
        if data.len() >= WRITE_BUFFER {
            self.scratch.file.write_all_at(data, self.scratch.len)?;
            self.scratch.len += data.len() as u64;
        } else {
            self.buf.extend_from_slice(data);
        }
        Ok(())
    }

    /// Writes one length-prefixed record.
    fn record(&mut self, bytes: &[u8]) -> io::Result<()> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
        self.write(&len.to_le_bytes())?;
        self.write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.scratch
            .file
            .write_all_at(&self.buf, self.scratch.len)?;
        self.scratch.len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

/// Sequential reads of the byte range `pos..end` of a scratch file.
struct RangeReader {
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    /// Unread bytes are `buf[at..]`.
    at: usize,
}

impl RangeReader {
    fn new(pos: u64, end: u64) -> Self {
        RangeReader {
            pos,
            end,
            buf: Vec::new(),
            at: 0,
        }
    }

    /// Appends the next `n` bytes of the range to `out`.
    fn read_into(&mut self, file: &File, mut n: usize, out: &mut Vec<u8>) -> io::Result<()> {
        while n > 0 {
            if self.at == self.buf.len() {
                let left = self.end - self.pos;
                if left == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "scratch file shorter than recorded",
                    ));
                }
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(RUN_BUFFER);
                self.buf.resize(want, 0);
                file.read_exact_at(&mut self.buf, self.pos)?;
                self.pos += want as u64;
                self.at = 0;
            }
            let take = n.min(self.buf.len() - self.at);
            out.extend_from_slice(&self.buf[self.at..self.at + take]);
            self.at += take;
            n -= take;
        }
        Ok(())
    }

    /// Whether bytes are left.
    fn more(&self) -> bool {
        self.at < self.buf.len() || self.pos < self.end
    }

    /// Reads one length-prefixed record into `out` (cleared first); `false` at the end.
    fn record(&mut self, file: &File, out: &mut Vec<u8>) -> io::Result<bool> {
        out.clear();
        if !self.more() {
            return Ok(false);
        }
        self.read_into(file, 4, out)?;
        let len = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) as usize;
        out.clear();
        self.read_into(file, len, out)?;
        Ok(true)
    }
}

/// A set of paths in bounded memory (see the module documentation).
pub(crate) struct PathLog {
    /// Memory budget (see [`limit`]).
    limit: usize,
    /// Keys of the in-memory chunk, back to back.
    arena: Vec<u8>,
    /// (start, end) of each key in `arena`.
    index: Vec<(usize, usize)>,
    /// Sorted runs in the scratch file: (start, end) byte ranges.
    runs: Vec<(u64, u64)>,
    scratch: Option<Scratch>,
    /// Whether `index` is sorted and free of duplicates.
    sorted: bool,
}

impl Default for PathLog {
    fn default() -> Self {
        PathLog::with_limit(limit())
    }
}

impl PathLog {
    /// An empty log that spills past `limit` bytes.
    pub(crate) fn with_limit(limit: usize) -> Self {
        PathLog {
            limit,
            arena: Vec::new(),
            index: Vec::new(),
            runs: Vec::new(),
            scratch: None,
            sorted: true,
        }
    }

    /// Whether nothing was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.index.is_empty() && self.runs.is_empty()
    }

    fn mem_key(&self, i: usize) -> &[u8] {
        let (s, e) = self.index[i];
        &self.arena[s..e]
    }

    /// Adds the path `path` (normalised, relative); the scratch file, when needed, is made
    /// beneath `root`.
    pub(crate) fn insert(&mut self, root: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
        self.insert_key(root, &key_of(path.as_os_str().as_bytes()))
    }

    /// Adds a key.
    pub(crate) fn insert_key(&mut self, root: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
        // The same path again (a directory and then its first child share nothing, but
        // repeated entries and whiteout markers do): nothing to add.
        if let Some(last) = self.index.len().checked_sub(1)
            && self.mem_key(last) == key
        {
            return Ok(());
        }
        let start = self.arena.len();
        self.arena.extend_from_slice(key);
        self.index.push((start, self.arena.len()));
        self.sorted = false;
        if self.arena.len() + self.index.len() * RECORD_OVERHEAD > self.limit {
            self.spill(root)?;
        }
        Ok(())
    }

    /// Sorts the in-memory keys and drops duplicates.
    fn sort(&mut self) {
        if self.sorted {
            return;
        }
        let arena = &self.arena;
        self.index
            .sort_unstable_by(|a, b| arena[a.0..a.1].cmp(&arena[b.0..b.1]));
        self.index
            .dedup_by(|a, b| arena[a.0..a.1] == arena[b.0..b.1]);
        self.sorted = true;
    }

    /// Writes the in-memory chunk as one sorted run and empties it.
    fn spill(&mut self, root: BorrowedFd<'_>) -> io::Result<()> {
        self.sort();
        if self.scratch.is_none() {
            self.scratch = Some(Scratch::create(root)?);
        }
        let Some(scratch) = self.scratch.as_mut() else {
            return Err(io::Error::other("internal: no scratch file"));
        };
        let start = scratch.len;
        let mut w = Appender::new(scratch);
        for &(s, e) in &self.index {
            w.record(&self.arena[s..e])?;
        }
        w.flush()?;
        self.runs.push((start, scratch.len));
        self.arena = Vec::new();
        self.index = Vec::new();
        Ok(())
    }

    /// Gets ready for [`PathLog::iter`]: sorts the in-memory chunk and merges runs until at
    /// most [`FAN_IN`] are left.
    pub(crate) fn prepare(&mut self) -> io::Result<()> {
        self.sort();
        while self.runs.len() > FAN_IN {
            let Some(scratch) = self.scratch.as_mut() else {
                return Err(io::Error::other("internal: runs without a scratch file"));
            };
            let group: Vec<(u64, u64)> = self.runs.drain(..FAN_IN).collect();
            let start = scratch.len;
            // Read through a second handle of the same file while appending to it.
            let file = scratch.file.try_clone()?;
            let mut merged = Merged::over(Some(&file), &group, &[], &[])?;
            let mut w = Appender::new(scratch);
            while let Some(k) = merged.head() {
                w.record(k)?;
                merged.advance()?;
            }
            w.flush()?;
            self.runs.push((start, scratch.len));
        }
        Ok(())
    }

    /// The keys in byte order, without duplicates. Call [`PathLog::prepare`] first.
    pub(crate) fn iter(&self) -> io::Result<Merged<'_>> {
        if !self.sorted || self.runs.len() > FAN_IN {
            return Err(io::Error::other("internal: path log read before prepare"));
        }
        Merged::over(
            self.scratch.as_ref().map(|s| &s.file),
            &self.runs,
            &self.arena,
            &self.index,
        )
    }
}

/// One sorted run being merged.
struct RunCursor {
    reader: RangeReader,
    /// Its current key; `None` once it is exhausted.
    cur: Option<Vec<u8>>,
}

/// The merged, sorted, duplicate-free stream of a [`PathLog`]'s keys.
pub(crate) struct Merged<'a> {
    file: Option<&'a File>,
    runs: Vec<RunCursor>,
    arena: &'a [u8],
    index: &'a [(usize, usize)],
    /// Next in-memory key.
    mem_at: usize,
    /// The current key; `None` at the end.
    head: Option<Vec<u8>>,
}

impl<'a> Merged<'a> {
    fn over(
        file: Option<&'a File>,
        runs: &[(u64, u64)],
        arena: &'a [u8],
        index: &'a [(usize, usize)],
    ) -> io::Result<Self> {
        let mut m = Merged {
            file,
            runs: Vec::with_capacity(runs.len()),
            arena,
            index,
            mem_at: 0,
            head: None,
        };
        for &(s, e) in runs {
            let mut rc = RunCursor {
                reader: RangeReader::new(s, e),
                cur: None,
            };
            m.step_run(&mut rc)?;
            m.runs.push(rc);
        }
        m.pick()?;
        Ok(m)
    }

    fn step_run(&self, rc: &mut RunCursor) -> io::Result<()> {
        let Some(file) = self.file else {
            rc.cur = None;
            return Ok(());
        };
        let mut buf = rc.cur.take().unwrap_or_default();
        if rc.reader.record(file, &mut buf)? {
            rc.cur = Some(buf);
        }
        Ok(())
    }

    fn mem_cur(&self) -> Option<&'a [u8]> {
        let &(s, e) = self.index.get(self.mem_at)?;
        self.arena.get(s..e)
    }

    /// Makes the smallest current key the head and steps every source standing on it.
    fn pick(&mut self) -> io::Result<()> {
        let mut min: Option<&[u8]> = self.mem_cur();
        for rc in &self.runs {
            if let Some(c) = rc.cur.as_deref()
                && min.is_none_or(|m| c < m)
            {
                min = Some(c);
            }
        }
        let Some(min) = min.map(<[u8]>::to_vec) else {
            self.head = None;
            return Ok(());
        };
        if self.mem_cur() == Some(&min[..]) {
            self.mem_at += 1;
        }
        let mut runs = std::mem::take(&mut self.runs);
        let mut stepped = Ok(());
        for rc in &mut runs {
            if rc.cur.as_deref() == Some(&min[..])
                && let Err(e) = self.step_run(rc)
            {
                stepped = Err(e);
                break;
            }
        }
        self.runs = runs;
        stepped?;
        self.head = Some(min);
        Ok(())
    }

    /// The current key, `None` at the end.
    pub(crate) fn head(&self) -> Option<&[u8]> {
        self.head.as_deref()
    }

    /// Moves to the next key.
    pub(crate) fn advance(&mut self) -> io::Result<()> {
        self.pick()
    }

    /// Whether the key `key`, or a key below it, is in the log: the path was added, or is an
    /// ancestor of one added. Moves past every smaller key, so successive calls must ask in
    /// increasing key order.
    pub(crate) fn covers(&mut self, key: &[u8]) -> io::Result<bool> {
        while let Some(h) = self.head()
            && h < key
        {
            self.advance()?;
        }
        // Keys below `key` start with `key` and a 0: the first of them follows `key` itself.
        Ok(self
            .head()
            .is_some_and(|h| h.starts_with(key) && matches!(h.get(key.len()), None | Some(0))))
    }
}

/// Directory times in bounded memory, in the order recorded (see the module documentation).
pub(crate) struct TimeLog {
    /// Memory budget (see [`limit`]).
    limit: usize,
    /// Records: u32 path length, path, i64 seconds, i64 nanoseconds (little-endian).
    buf: Vec<u8>,
    /// Keyed 128-bit hash of a path in `buf` → offset of its seconds field. The keys are
    /// random per run, so a layer cannot be built to make two of its paths collide.
    index: HashMap<u128, usize>,
    a: RandomState,
    b: RandomState,
    scratch: Option<Scratch>,
}

impl Default for TimeLog {
    fn default() -> Self {
        TimeLog::with_limit(limit())
    }
}

impl TimeLog {
    /// An empty log that spills past `limit` bytes.
    pub(crate) fn with_limit(limit: usize) -> Self {
        TimeLog {
            limit,
            buf: Vec::new(),
            index: HashMap::new(),
            a: RandomState::new(),
            b: RandomState::new(),
            scratch: None,
        }
    }
}

impl TimeLog {
    /// Records `mtime` for the directory `rel`; the scratch file, when needed, is made beneath
    /// `root`.
    pub(crate) fn push(
        &mut self,
        root: BorrowedFd<'_>,
        rel: &Path,
        mtime: Timespec,
    ) -> io::Result<()> {
        let bytes = rel.as_os_str().as_bytes();
        let key = (u128::from(self.a.hash_one(bytes)) << 64) | u128::from(self.b.hash_one(bytes));
        let sec = mtime.tv_sec.to_le_bytes();
        let nsec = mtime.tv_nsec.to_le_bytes();
        if let Some(&at) = self.index.get(&key)
            && let Some(field) = self.buf.get_mut(at..at + 16)
        {
            // The last metadata of a repeated entry wins; its place in the order stays.
            field[..8].copy_from_slice(&sec);
            field[8..].copy_from_slice(&nsec);
            return Ok(());
        }
        let len = u32::try_from(bytes.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(bytes);
        self.index.insert(key, self.buf.len());
        self.buf.extend_from_slice(&sec);
        self.buf.extend_from_slice(&nsec);
        if self.buf.len() + self.index.len() * RECORD_OVERHEAD > self.limit {
            if self.scratch.is_none() {
                self.scratch = Some(Scratch::create(root)?);
            }
            if let Some(s) = self.scratch.as_mut() {
                let mut w = Appender::new(s);
                w.write(&self.buf)?;
                w.flush()?;
            }
            self.buf = Vec::new();
            self.index = HashMap::new();
        }
        Ok(())
    }

    /// Calls `f` with every path and mtime, in the order recorded (spilled ones first), until
    /// it fails; a failure to read the scratch file is turned into `E` by `read_err`.
    pub(crate) fn for_each<E>(
        self,
        mut f: impl FnMut(&Path, Timespec) -> Result<(), E>,
        read_err: impl Fn(io::Error) -> E,
    ) -> Result<(), E> {
        let mut path = Vec::new();
        let mut field = Vec::with_capacity(16);
        let mut one = |path: &[u8], field: &[u8]| -> Result<(), E> {
            let mut sec = [0u8; 8];
            let mut nsec = [0u8; 8];
            sec.copy_from_slice(&field[..8]);
            nsec.copy_from_slice(&field[8..16]);
            let ts = Timespec {
                tv_sec: i64::from_le_bytes(sec),
                tv_nsec: i64::from_le_bytes(nsec),
            };
            f(Path::new(OsStr::from_bytes(path)), ts)
        };
        if let Some(s) = &self.scratch {
            let mut r = RangeReader::new(0, s.len);
            let mut len = Vec::with_capacity(4);
            while r.more() {
                len.clear();
                r.read_into(&s.file, 4, &mut len).map_err(&read_err)?;
                let n = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
                path.clear();
                r.read_into(&s.file, n, &mut path).map_err(&read_err)?;
                field.clear();
                r.read_into(&s.file, 16, &mut field).map_err(&read_err)?;
                one(&path, &field)?;
            }
        }
        let mut at = 0;
        while at + 4 <= self.buf.len() {
            let b = &self.buf;
            let n = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
            let (p, t) = (at + 4, at + 4 + n);
            let (Some(path), Some(field)) = (b.get(p..t), b.get(t..t + 16)) else {
                return Err(read_err(io::Error::other("internal: time log cut short")));
            };
            one(path, field)?;
            at = t + 16;
        }
        Ok(())
    }

    /// Records held in memory (for tests).
    #[cfg(test)]
    pub(crate) fn in_memory(&self) -> usize {
        self.index.len()
    }

    /// Whether records were written to the scratch file (for tests).
    #[cfg(test)]
    pub(crate) fn spilled(&self) -> bool {
        self.scratch.as_ref().is_some_and(|s| s.len > 0)
    }
}

impl PathLog {
    /// Whether runs were written to the scratch file (for tests).
    #[cfg(test)]
    pub(crate) fn spilled(&self) -> bool {
        !self.runs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::os::fd::AsFd;

    /// A small deterministic generator (xorshift).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Random paths over a tiny alphabet, so that prefixes, `a/b` against `a-b` and
    /// duplicates all happen.
    fn path(rng: &mut Rng) -> String {
        let comps = 1 + rng.next() % 4;
        (0..comps)
            .map(|_| {
                let len = 1 + rng.next() % 3;
                (0..len)
                    .map(|_| ['a', 'b', '-', '.'][(rng.next() % 4) as usize])
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Whether `p` or a path below it is in `set` (the model of `Merged::covers`).
    fn covered(set: &BTreeSet<String>, p: &str) -> bool {
        set.iter()
            .any(|s| s == p || s.starts_with(&format!("{p}/")))
    }

    /// Spilled runs (more than `FAN_IN`, so they are merged first) and the in-memory chunk
    /// read back as one sorted set: the stream, and `covers` asked in walk order, agree with
    /// a `BTreeSet`.
    #[test]
    fn path_log_spills_merges_and_answers_in_order() {
        let d = tempfile::tempdir().unwrap();
        let root = crate::apply::open_root(d.path()).unwrap();
        for (limit, n) in [(1, 300), (200, 3000), (1 << 20, 500)] {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ limit as u64);
            let mut log = PathLog::with_limit(limit);
            let mut model = BTreeSet::new();
            for _ in 0..n {
                let p = path(&mut rng);
                log.insert(root.as_fd(), Path::new(&p)).unwrap();
                model.insert(p);
            }
            assert_eq!(log.spilled(), limit < 1 << 20, "limit {limit}");
            log.prepare().unwrap();
            assert!(log.runs.len() <= FAN_IN);
            let mut got = Vec::new();
            let mut it = log.iter().unwrap();
            while let Some(k) = it.head() {
                got.push(String::from_utf8(path_of(k)).unwrap());
                it.advance().unwrap();
            }
            let mut want: Vec<String> = model.iter().cloned().collect();
            want.sort_by_key(|p| key_of(p.as_bytes()));
            assert_eq!(got, want, "limit {limit}");
            // Queries in key order, as the opaque walk asks them.
            let mut queries: Vec<String> = (0..n).map(|_| path(&mut rng)).collect();
            queries.extend(model.iter().cloned());
            queries.sort_by_key(|p| key_of(p.as_bytes()));
            let mut it = log.iter().unwrap();
            for q in &queries {
                assert_eq!(
                    it.covers(&key_of(q.as_bytes())).unwrap(),
                    covered(&model, q),
                    "limit {limit}: {q}"
                );
            }
        }
    }

    /// Spilled time records come back in order, and the last one for a directory wins.
    #[test]
    fn time_log_spills_in_order() {
        let d = tempfile::tempdir().unwrap();
        let root = crate::apply::open_root(d.path()).unwrap();
        let mut log = TimeLog::with_limit(100);
        let ts = |s| Timespec {
            tv_sec: s,
            tv_nsec: 7,
        };
        for i in 0..1000 {
            log.push(root.as_fd(), Path::new(&format!("d{}", i % 300)), ts(i))
                .unwrap();
        }
        assert!(log.spilled());
        let mut last = std::collections::HashMap::new();
        log.for_each(
            |p, t| {
                assert_eq!(t.tv_nsec, 7);
                last.insert(p.to_path_buf(), t.tv_sec);
                Ok::<(), io::Error>(())
            },
            |e| e,
        )
        .unwrap();
        assert_eq!(last.len(), 300);
        for i in 0..300 {
            let want = if i < 100 { 900 + i } else { 600 + i };
            assert_eq!(last[Path::new(&format!("d{i}"))], want);
        }
        // The scratch file has no name in the target.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
