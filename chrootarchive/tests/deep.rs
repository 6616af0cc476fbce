//! Deep trees applied confined: a 10,000-level layer (20,000-byte PAX names) and a whiteout of
//! it, with the soft `RLIMIT_NOFILE` at 1,024 (lowered first thing in each test; the confined
//! child inherits it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use archive::ApplyOptions;
use rustix::fs::{Mode, OFlags};
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

fn deep(n: usize) -> String {
    let mut s = "d/".repeat(n);
    s.pop();
    s
}

/// One entry with its name in a PAX `path` record, as raw bytes.
fn entry(kind: EntryType, name: &str, data: &[u8], mtime: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("path", name.as_bytes())])
        .unwrap();
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

/// The layer `d`, `d/d`, … (each directory its own mtime), then `d/…/d/f`, generated as read.
struct DeepLayer {
    i: usize,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for DeepLayer {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            self.pos = 0;
            self.buf = match self.i {
                i if i < LEVELS => entry(EntryType::Directory, &deep(i + 1), b"", MTIME + i as u64),
                i if i == LEVELS => entry(
                    EntryType::Regular,
                    &format!("{}/f", deep(LEVELS)),
                    b"bottom",
                    MTIME,
                ),
                i if i == LEVELS + 1 => vec![0; 1024],
                _ => return Ok(0),
            };
            self.i += 1;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn layer() -> DeepLayer {
    DeepLayer {
        i: 0,
        buf: Vec::new(),
        pos: 0,
    }
}

/// Opens `rel` below `root` one component at a time.
fn open_deep(root: &Path, rel: &str) -> OwnedFd {
    let mut fd = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
    for c in rel.split('/') {
        fd = rustix::fs::openat(&fd, c, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty()).unwrap();
    }
    fd
}

#[test]
fn confined_deep_tree_applies_and_whites_out_with_1024_fds() {
    if !common::need_root("confined_deep_tree_applies_and_whites_out_with_1024_fds") {
        return;
    }
    limit_fds();
    let t = DeepScratch::new();
    std::fs::write(t.path().join("kept"), b"k").unwrap();
    let bytes = chrootarchive::apply_layer(t.path(), layer(), &ApplyOptions::default())
        .unwrap_or_else(|e| panic!("confined deep apply: {e}"));
    assert_eq!(bytes, 6);
    let bottom = open_deep(t.path(), &deep(LEVELS));
    let f = rustix::fs::openat(&bottom, "f", OFlags::RDONLY, Mode::empty()).unwrap();
    let mut data = Vec::new();
    std::fs::File::from(f).read_to_end(&mut data).unwrap();
    assert_eq!(data, b"bottom");
    for level in [1, LEVELS / 2, LEVELS] {
        let st = rustix::fs::fstat(open_deep(t.path(), &deep(level))).unwrap();
        assert_eq!(
            st.st_mtime as u64,
            MTIME + level as u64 - 1,
            "level {level}"
        );
    }
    drop(bottom);

    // A whiteout of the top removes all 10,000 levels, confined too.
    let wh = entry(EntryType::Regular, ".wh.d", b"", MTIME);
    let mut tar = wh;
    tar.extend_from_slice(&[0; 1024]);
    chrootarchive::apply_layer(t.path(), &tar[..], &ApplyOptions::default())
        .unwrap_or_else(|e| panic!("confined deep whiteout: {e}"));
    assert!(t.path().join("d").symlink_metadata().is_err());
    assert_eq!(std::fs::read(t.path().join("kept")).unwrap(), b"k");
}
