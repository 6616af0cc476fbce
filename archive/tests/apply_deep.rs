//! Deep trees: a 10,000-level layer (names of ~20,000 bytes, far beyond `PATH_MAX`, carried by
//! PAX `path` records) applies, whites out and is removed with the soft `RLIMIT_NOFILE` at
//! 1,024. This binary lowers its own limit first thing in every test (nextest runs each test in
//! its own process; under `cargo test` all of them share the lowered limit, which is the point).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use archive::{ApplyOptions, apply_layer};
use rustix::fs::{AtFlags, Mode, OFlags};
use tar::{EntryType, Header};

const LEVELS: usize = 10_000;
const MTIME: u64 = 1_600_000_000;

fn limit_fds() {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(1024),
            maximum: lim.maximum,
        },
    )
    .unwrap();
}

/// A temporary directory for a deep tree, removed with `archive::fs::remove_tree` when dropped
/// (also when the test panics): `TempDir`'s own cleanup is std's recursive `remove_dir_all`,
/// which runs out of descriptors at this depth with the limit the test sets, and the tree
/// would stay behind.
struct DeepScratch(tempfile::TempDir);

impl DeepScratch {
    fn new() -> DeepScratch {
        DeepScratch(tempfile::tempdir().unwrap())
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for DeepScratch {
    fn drop(&mut self) {
        let _ = archive::fs::remove_tree(self.0.path());
    }
}

/// `d/d/…/d` with `n` components.
fn deep(n: usize) -> String {
    let mut s = "d/".repeat(n);
    s.pop();
    s
}

/// One tar entry (with a PAX `path` record, and `linkpath` for links) as raw bytes.
fn entry(kind: EntryType, name: &str, link: Option<&str>, data: &[u8], mtime: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut recs: Vec<(&str, &[u8])> = vec![("path", name.as_bytes())];
    if let Some(l) = link {
        recs.push(("linkpath", l.as_bytes()));
    }
    b.append_pax_extensions(recs).unwrap();
    let mut h = Header::new_ustar();
    h.set_entry_type(kind);
    h.set_path("x").unwrap();
    h.set_mode(if kind == EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
    std::mem::take(b.get_mut())
}

/// A tar stream generated entry by entry (a 10,000-level layer is ~100 MB of PAX records).
struct Stream<F: FnMut(usize) -> Option<Vec<u8>>> {
    next: F,
    i: usize,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

fn stream<F: FnMut(usize) -> Option<Vec<u8>>>(next: F) -> Stream<F> {
    Stream {
        next,
        i: 0,
        buf: Vec::new(),
        pos: 0,
        done: false,
    }
}

impl<F: FnMut(usize) -> Option<Vec<u8>>> Read for Stream<F> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            self.pos = 0;
            self.buf = match (self.next)(self.i) {
                Some(b) => b,
                None => {
                    self.done = true;
                    vec![0u8; 1024]
                }
            };
            self.i += 1;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Every directory `d`, `d/d`, … down to `levels`, each with its own mtime, then `tail`.
fn deep_layer(levels: usize, tail: Vec<Vec<u8>>) -> impl Read {
    let mut tail = tail.into_iter();
    stream(move |i| {
        if i < levels {
            Some(entry(
                EntryType::Directory,
                &deep(i + 1),
                None,
                b"",
                MTIME + i as u64,
            ))
        } else {
            tail.next()
        }
    })
}

/// Opens `rel` below `root` one component at a time (test-side, one fd at a time).
fn open_deep(root: &Path, rel: &str) -> OwnedFd {
    let mut fd = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
    for c in rel.split('/') {
        fd = rustix::fs::openat(&fd, c, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty())
            .unwrap_or_else(|e| panic!("open component {c:?} of a deep path: {e}"));
    }
    fd
}

fn read_deep(root: &Path, dir: &str, name: &str) -> Vec<u8> {
    let d = open_deep(root, dir);
    let f = rustix::fs::openat(&d, name, OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty()).unwrap();
    let mut out = Vec::new();
    std::fs::File::from(f).read_to_end(&mut out).unwrap();
    out
}

fn exists_deep(root: &Path, dir: &str, name: &str) -> bool {
    let d = open_deep(root, dir);
    rustix::fs::statat(&d, name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
}

fn tail_files() -> Vec<Vec<u8>> {
    let bottom = deep(LEVELS);
    let mid = deep(LEVELS / 2);
    vec![
        entry(
            EntryType::Regular,
            &format!("{bottom}/f"),
            None,
            b"bottom",
            MTIME,
        ),
        // A hardlink whose target lies 5,000 levels deeper than the link.
        entry(
            EntryType::Link,
            &format!("{mid}/hl"),
            Some(&format!("{bottom}/f")),
            b"",
            MTIME,
        ),
        // A symlink at depth, and a file written through it: it resolves beneath the target.
        entry(
            EntryType::Symlink,
            &format!("{mid}/up"),
            Some("/"),
            b"",
            MTIME,
        ),
        entry(
            EntryType::Regular,
            &format!("{mid}/up/through-link"),
            None,
            b"top",
            MTIME,
        ),
        // A relative symlink climbing three levels at depth (`..` checked on the way up).
        entry(
            EntryType::Symlink,
            &format!("{mid}/rel"),
            Some("../../.."),
            b"",
            MTIME,
        ),
        entry(
            EntryType::Regular,
            &format!("{mid}/rel/climbed"),
            None,
            b"c",
            MTIME,
        ),
        // An absolute symlink that then climbs: clamped at the target, never above it.
        entry(
            EntryType::Symlink,
            &format!("{mid}/esc"),
            Some(&format!("/{}", "../".repeat(1000))),
            b"",
            MTIME,
        ),
        entry(
            EntryType::Regular,
            &format!("{mid}/esc/escaped"),
            None,
            b"e",
            MTIME,
        ),
    ]
}

#[test]
fn deep_tree_applies_with_1024_fds() {
    limit_fds();
    let t = DeepScratch::new();
    let bytes = apply_layer(
        t.path(),
        deep_layer(LEVELS, tail_files()),
        &ApplyOptions::default(),
    )
    .unwrap();
    assert_eq!(bytes, "bottom".len() as u64 + "top".len() as u64 + 2);
    assert_eq!(read_deep(t.path(), &deep(LEVELS / 2 - 3), "climbed"), b"c");
    assert_eq!(std::fs::read(t.path().join("escaped")).unwrap(), b"e");
    let above = t.path().parent().unwrap();
    assert!(above.join("escaped").symlink_metadata().is_err());
    assert_eq!(read_deep(t.path(), &deep(LEVELS), "f"), b"bottom");
    assert_eq!(read_deep(t.path(), &deep(LEVELS / 2), "hl"), b"bottom");
    // `up` points at `/`: the target's top, where the file lands.
    assert_eq!(
        std::fs::read(t.path().join("through-link")).unwrap(),
        b"top"
    );
    // Directory mtimes were set after everything below was written, at every depth.
    for level in [1, 2, LEVELS / 2, LEVELS - 1, LEVELS] {
        let fd = open_deep(t.path(), &deep(level));
        let st = rustix::fs::fstat(&fd).unwrap();
        assert_eq!(
            st.st_mtime as u64,
            MTIME + level as u64 - 1,
            "level {level}"
        );
    }
}

#[test]
fn whiteout_removes_a_deep_directory() {
    limit_fds();
    let t = DeepScratch::new();
    std::fs::write(t.path().join("kept"), b"k").unwrap();
    apply_layer(
        t.path(),
        deep_layer(LEVELS, tail_files()),
        &ApplyOptions::default(),
    )
    .unwrap();
    let wh = stream(|i| (i == 0).then(|| entry(EntryType::Regular, ".wh.d", None, b"", MTIME)));
    apply_layer(t.path(), wh, &ApplyOptions::default()).unwrap();
    assert!(!t.path().join("d").exists());
    assert!(t.path().join("kept").exists());
}

#[test]
fn deep_opaque_directory_and_whiteout() {
    limit_fds();
    let t = DeepScratch::new();
    apply_layer(
        t.path(),
        deep_layer(LEVELS, tail_files()),
        &ApplyOptions::default(),
    )
    .unwrap();
    // Upper layer: level 3,000 becomes opaque (everything below it goes, 7,000 levels), one new
    // file there; at level 2,000 a whiteout removes `up` and a new file arrives.
    let opq = deep(3000);
    let two = deep(2000);
    let mut entries = vec![
        entry(
            EntryType::Regular,
            &format!("{opq}/.wh..wh..opq"),
            None,
            b"",
            MTIME,
        ),
        entry(EntryType::Regular, &format!("{opq}/new"), None, b"n", MTIME),
        entry(EntryType::Regular, &format!("{two}/x"), None, b"x", MTIME),
    ]
    .into_iter();
    let layer = stream(move |_| entries.next());
    apply_layer(t.path(), layer, &ApplyOptions::default()).unwrap();
    assert!(exists_deep(t.path(), &opq, "new"));
    assert!(
        !exists_deep(t.path(), &opq, "d"),
        "opaque dir kept lower content"
    );
    assert!(exists_deep(t.path(), &two, "x"));
    assert!(exists_deep(t.path(), &two, "d"));
}

#[test]
fn remove_tree_at_removes_a_deep_tree_with_bounded_fds() {
    limit_fds();
    let t = DeepScratch::new();
    apply_layer(
        t.path(),
        deep_layer(LEVELS, tail_files()),
        &ApplyOptions::default(),
    )
    .unwrap();
    // Modes that would stop a naive removal (no read, no write, no search).
    for (level, mode) in [(10, 0o000), (5000, 0o500), (9000, 0o100)] {
        let fd = open_deep(t.path(), &deep(level));
        let parent = open_deep(t.path(), &deep(level - 1));
        let _ = fd;
        rustix::fs::chmodat(&parent, "d", Mode::from_raw_mode(mode), AtFlags::empty()).unwrap();
    }
    let root = rustix::fs::open(t.path(), OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
    archive::fs::remove_tree_at(root.as_fd(), c"d").unwrap();
    assert!(!t.path().join("d").exists());
    assert!(t.path().join("through-link").exists());
    // Removing what is not there says so (as std::fs::remove_dir_all); a symlink is removed,
    // not followed.
    let gone = archive::fs::remove_tree_at(root.as_fd(), c"d").unwrap_err();
    assert_eq!(gone.kind(), std::io::ErrorKind::NotFound);
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("canary"), b"c").unwrap();
    std::os::unix::fs::symlink(outside.path(), t.path().join("link")).unwrap();
    archive::fs::remove_tree_at(root.as_fd(), c"link").unwrap();
    assert!(t.path().join("link").symlink_metadata().is_err());
    assert_eq!(std::fs::read(outside.path().join("canary")).unwrap(), b"c");
    let _ = std::fs::metadata(t.path()).unwrap().mode();
}
