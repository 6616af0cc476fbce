//! Reading a tree that a hostile container changes under us, and trees deeper than any path.
//!
//! A thread swaps (`renameat2` `RENAME_EXCHANGE`) a directory with a symlink to a host
//! directory, a regular file with a FIFO, and (as root) a regular file with a block device node,
//! in a loop, while `tar_tree`, `export_changes`, `changes` and `changes_size` run on the tree:
//! no host byte or host name ever appears in an output, nothing blocks (nextest's slow-timeout
//! would kill a hang), and every outcome is a success or an error, never a panic. The deep tests
//! run 10,000 levels with the soft `RLIMIT_NOFILE` at 1,024.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CStr;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use archive::compare::{CompareOptions, differences, snapshot};
use archive::{Change, ChangeKind, TarOptions, changes, changes_size, export_changes, tar_tree};
use rustix::fs::{FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps};

const CANARY: &[u8] = b"CANARY-HOST-BYTES-0123456789";
const SAFE: &[u8] = b"safe layer content, 28 bytes";
/// Larger than anything in the tree: a `changes_size` that counted it read the host.
const HOST_BIG: usize = 1 << 20;

use test_support::is_root;

/// A block device to plant: the one holding the temp directory when it is a real disk (so
/// reading it would show host bytes), else loop0 (7:0).
fn block_dev(near: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(near).unwrap().dev();
    if rustix::fs::major(dev) != 0 {
        dev
    } else {
        rustix::fs::makedev(7, 0)
    }
}

/// The attacked tree `root/tree` and the host directory `root/host` its symlink points to.
struct Scene {
    _t: tempfile::TempDir,
    tree: std::path::PathBuf,
    old: std::path::PathBuf,
    with_block: bool,
}

fn set_mtime(p: &Path) {
    let ts = Timespec {
        tv_sec: 1_600_000_000,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &Timestamps {
            last_access: ts,
            last_modification: ts,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn scene() -> Scene {
    let t = tempfile::tempdir().unwrap();
    let host = t.path().join("host");
    fs::create_dir(&host).unwrap();
    fs::write(host.join("inner"), CANARY).unwrap();
    fs::write(
        host.join("hostonly"),
        CANARY.repeat(HOST_BIG / CANARY.len() + 1),
    )
    .unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::create_dir(tree.join("dir")).unwrap();
    fs::write(tree.join("dir/inner"), SAFE).unwrap();
    std::os::unix::fs::symlink(&host, tree.join("link")).unwrap();
    fs::write(tree.join("file"), SAFE).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        tree.join("fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let with_block = is_root();
    if with_block {
        fs::write(tree.join("file2"), SAFE).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            tree.join("blk"),
            FileType::BlockDevice,
            Mode::from_raw_mode(0o600),
            block_dev(t.path()),
        )
        .unwrap();
    } else if std::env::var_os("CI").is_some() {
        panic!("CI runs this test as root (the block device half needs it)");
    } else {
        eprintln!("block device swap skipped: not root (mknod of a block device needs root)");
    }
    // The parent tree: same names, same sizes and (whole-second) mtimes, so `changes` compares
    // file contents (opening both sides) where the listing saw regular files.
    let old = t.path().join("old");
    fs::create_dir_all(old.join("dir")).unwrap();
    for f in ["file", "file2", "dir/inner", "fifo", "blk"] {
        fs::write(old.join(f), b"Safe layer content, 28 bytes").unwrap();
    }
    for p in ["file", "file2", "dir/inner", "fifo", "blk"] {
        for root in [&tree, &old] {
            if root.join(p).symlink_metadata().is_ok() {
                set_mtime(&root.join(p));
            }
        }
    }
    Scene {
        _t: t,
        tree,
        old,
        with_block,
    }
}

/// Swaps the pairs in a loop until `stop`.
fn attacker(tree: &Path, with_block: bool, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let dir: OwnedFd = rustix::fs::open(
        tree,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap();
    std::thread::spawn(move || {
        let mut pairs: Vec<(&CStr, &CStr)> = vec![(c"dir", c"link"), (c"file", c"fifo")];
        if with_block {
            pairs.push((c"file2", c"blk"));
        }
        let mut swaps = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for (a, b) in &pairs {
                rustix::fs::renameat_with(dir.as_fd(), *a, dir.as_fd(), *b, RenameFlags::EXCHANGE)
                    .unwrap();
                swaps += 1;
            }
        }
        swaps
    })
}

/// Reads a stream to its end or first error; the bytes read so far either way.
fn drain(r: archive::Result<archive::TarStream>) -> (Vec<u8>, bool) {
    let Ok(mut s) = r else {
        return (Vec::new(), false);
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

/// No host byte in `tar`, and every complete regular member holds the layer's own content.
fn assert_clean_tar(tar: &[u8], what: &str) {
    assert!(
        !tar.windows(CANARY.len()).any(|w| w == CANARY),
        "{what}: host bytes in the output"
    );
    let mut a = tar::Archive::new(tar);
    let Ok(entries) = a.entries() else { return };
    for e in entries {
        // A stream cut by an error ends with an incomplete member: stop there.
        let Ok(mut e) = e else { return };
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let mut data = Vec::new();
        if e.read_to_end(&mut data).is_err() {
            return;
        }
        assert_eq!(
            data, SAFE,
            "{what}: member {name} holds bytes that are not the layer's"
        );
    }
}

fn assert_clean_changes(list: &[Change], what: &str) {
    for c in list {
        let p = c.path.to_string_lossy();
        assert!(!p.contains("hostonly"), "{what}: host name listed: {p}");
    }
}

#[test]
fn swapped_entries_never_leak_host_data_or_block() {
    let s = scene();
    let stop = Arc::new(AtomicBool::new(false));
    let th = attacker(&s.tree, s.with_block, Arc::clone(&stop));
    let fixed: Vec<Change> = [
        "/dir",
        "/dir/inner",
        "/file",
        "/file2",
        "/fifo",
        "/link",
        "/blk",
    ]
    .iter()
    .map(|p| Change {
        path: p.into(),
        kind: ChangeKind::Add,
    })
    .collect();
    let (mut ok, mut failed) = (0u32, 0u32);
    let mut count = |good: bool| {
        if good { ok += 1 } else { failed += 1 }
    };
    for _ in 0..500 {
        let (tar, good) = drain(tar_tree(&s.tree, &TarOptions::default()));
        assert_clean_tar(&tar, "tar_tree");
        count(good);

        let (tar, good) = drain(export_changes(&s.tree, &fixed, &TarOptions::default()));
        assert_clean_tar(&tar, "export_changes");
        count(good);

        match changes(&s.tree, Some(&s.old)) {
            Ok(list) => {
                assert_clean_changes(&list, "changes");
                count(true);
                let (tar, good) = drain(export_changes(&s.tree, &list, &TarOptions::default()));
                assert_clean_tar(&tar, "export_changes of changes");
                count(good);
            }
            Err(_) => count(false),
        }
        match changes(&s.tree, None) {
            Ok(list) => {
                assert_clean_changes(&list, "changes without a parent");
                count(true);
            }
            Err(_) => count(false),
        }
        match changes_size(&s.tree, &fixed) {
            Ok(n) => {
                assert!(n < HOST_BIG as u64, "changes_size counted host bytes: {n}");
                count(true);
            }
            Err(_) => count(false),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = th.join().unwrap();
    eprintln!("{swaps} swaps; {ok} operations succeeded, {failed} failed cleanly");

    // Quiet again: every operation works on whichever state the swaps left.
    let (tar, good) = drain(tar_tree(&s.tree, &TarOptions::default()));
    assert!(good);
    assert_clean_tar(&tar, "tar_tree at rest");
    let list = changes(&s.tree, Some(&s.old)).unwrap();
    assert_clean_changes(&list, "changes at rest");
    let (tar, good) = drain(export_changes(&s.tree, &list, &TarOptions::default()));
    assert!(good);
    assert_clean_tar(&tar, "export_changes at rest");
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

/// Lowers the soft open-file limit to 1,024 for this test process (nextest runs each test in
/// its own process).
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

const LEVELS: usize = 10_000;

/// `levels` nested directories `d/d/…` below `root`, each level holding a file `f` with
/// content `"<level>"` padded to 8 bytes and a fixed whole-second mtime (made through
/// descriptors: the full path is far beyond `PATH_MAX`).
fn deep_tree(root: &Path, levels: usize) {
    let mut cur: OwnedFd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap();
    let ts = Timespec {
        tv_sec: 1_600_000_000,
        tv_nsec: 0,
    };
    for i in 0..levels {
        rustix::fs::mkdirat(&cur, c"d", Mode::from_raw_mode(0o755)).unwrap();
        let f = rustix::fs::openat(
            &cur,
            c"f",
            OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        rustix::io::write(&f, format!("{i:08}").as_bytes()).unwrap();
        rustix::fs::futimens(
            &f,
            &Timestamps {
                last_access: ts,
                last_modification: ts,
            },
        )
        .unwrap();
        cur = rustix::fs::openat(
            &cur,
            c"d",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
    }
}

/// Rewrites the file `f` at `level` with other content of the same size and mtime.
fn modify_deep(root: &Path, level: usize) {
    let mut cur: OwnedFd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap();
    for _ in 0..level {
        cur = rustix::fs::openat(
            &cur,
            c"d",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
    }
    let f =
        rustix::fs::openat(&cur, c"f", OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty()).unwrap();
    rustix::io::write(&f, b"CHANGED!").unwrap();
    let ts = Timespec {
        tv_sec: 1_600_000_000,
        tv_nsec: 0,
    };
    rustix::fs::futimens(
        &f,
        &Timestamps {
            last_access: ts,
            last_modification: ts,
        },
    )
    .unwrap();
}

fn deep_rel(level: usize, leaf: &str) -> String {
    let mut p = "d/".repeat(level);
    p.push_str(leaf);
    p
}

#[test]
fn deep_tree_exports_completely_with_1024_descriptors() {
    limit_fds();
    let t = DeepScratch::new();
    deep_tree(t.path(), LEVELS);
    let mut a = tar::Archive::new(tar_tree(t.path(), &TarOptions::default()).unwrap());
    let (mut dirs, mut files) = (0usize, 0usize);
    let mut last = String::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        match e.header().entry_type() {
            tar::EntryType::Directory => dirs += 1,
            tar::EntryType::Regular => {
                let mut data = String::new();
                e.read_to_string(&mut data).unwrap();
                let level = name.matches("d/").count();
                assert_eq!(data, format!("{level:08}"), "{}", &name[name.len() - 20..]);
                files += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
        last = name;
    }
    assert_eq!((dirs, files), (LEVELS, LEVELS));
    // Depth-first with sorted names: the outermost `f` comes last.
    assert_eq!(last, "f");
}

#[test]
fn deep_trees_diff_export_size_and_compare_with_1024_descriptors() {
    limit_fds();
    let t = DeepScratch::new();
    let (old, new) = (t.path().join("old"), t.path().join("new"));
    fs::create_dir(&old).unwrap();
    fs::create_dir(&new).unwrap();
    deep_tree(&old, LEVELS);
    deep_tree(&new, LEVELS);
    let deep = LEVELS - 7;
    modify_deep(&new, deep);

    // `changes`: the file (found by comparing contents: same size, same whole-second mtime) and
    // every directory above it.
    let list = changes(&new, Some(&old)).unwrap();
    assert_eq!(list.len(), deep + 1);
    let want = format!("/{}", deep_rel(deep, "f"));
    let last = list.last().unwrap();
    assert_eq!(
        (last.path.to_str().unwrap(), last.kind),
        (want.as_str(), ChangeKind::Modify)
    );
    assert!(list[..deep].iter().all(|c| c.kind == ChangeKind::Modify));

    assert_eq!(changes_size(&new, &list).unwrap(), 8);

    // `export_changes` reaches the 10,000-level path component by component.
    let mut a = tar::Archive::new(export_changes(&new, &list, &TarOptions::default()).unwrap());
    let mut found = false;
    let mut n = 0;
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        n += 1;
        if e.header().entry_type() == tar::EntryType::Regular {
            let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            assert_eq!(format!("/{name}"), want);
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            assert_eq!(data, b"CHANGED!");
            found = true;
        }
    }
    assert!(found);
    assert_eq!(n, deep + 1);

    // The oracle walks both trees too.
    let (so, sn) = (snapshot(&old).unwrap(), snapshot(&new).unwrap());
    assert_eq!(so.len(), 2 * LEVELS + 1);
    let opts = CompareOptions {
        dir_mtimes: false,
        root_metadata: false,
        ..Default::default()
    };
    let d = differences(&so, &sn, &opts);
    assert_eq!(d, [format!("{want}: content differs")]);
}
