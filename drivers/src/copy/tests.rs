#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CStr;
use std::fs;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use archive::compare::{CompareOptions, assert_same_tree};
use rustix::fs::{FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps, makedev};

use super::*;

fn set_time(path: &Path, sec: i64, nsec: i64) {
    let t = Timestamps {
        last_access: Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        last_modification: Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    };
    rustix::fs::utimensat(CWD, path, &t, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

/// A tree with every kind of node and metadata copy_tree must keep.
fn fixture(src: &Path) {
    fs::create_dir_all(src.join("d/sub")).unwrap();
    fs::write(src.join("d/file"), "content").unwrap();
    fs::hard_link(src.join("d/file"), src.join("link1")).unwrap();
    fs::hard_link(src.join("d/file"), src.join("d/sub/link2")).unwrap();
    fs::write(src.join("suid"), "x").unwrap();
    std::os::unix::fs::chown(src.join("suid"), Some(1000), Some(1000)).unwrap();
    fs::set_permissions(src.join("suid"), fs::Permissions::from_mode(0o6755)).unwrap();
    fs::create_dir(src.join("sticky")).unwrap();
    fs::set_permissions(src.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::symlink("d/file", src.join("sym")).unwrap();
    let node = |name: &str, ft: FileType, dev| {
        rustix::fs::mknodat(CWD, src.join(name), ft, Mode::from_raw_mode(0o644), dev).unwrap()
    };
    node("fifo", FileType::Fifo, 0);
    node("sock", FileType::Socket, 0);
    node("null", FileType::CharacterDevice, makedev(1, 3));
    node("whiteout", FileType::CharacterDevice, makedev(0, 0));
    node("blk", FileType::BlockDevice, makedev(7, 0));
    xattr::set(src.join("d/file"), "user.color", b"blue").unwrap();
    xattr::set(src.join("d/file"), "trusted.note", b"t").unwrap();
    xattr::set(src.join("d/sub"), "trusted.overlay.opaque", b"y").unwrap();
    // On nodes that are never opened: read through their directory, written through
    // /proc/self/fd/<dir>/<name> (the xattr crate does not follow the symlink).
    xattr::set(src.join("sym"), "trusted.on-link", b"L").unwrap();
    xattr::set(src.join("fifo"), "trusted.on-fifo", b"F").unwrap();
    xattr::set(src.join("null"), "security.on-dev", b"D").unwrap();
    // A valid v2 file capability (CAP_NET_BIND_SERVICE permitted).
    let cap: [u8; 20] = [0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    xattr::set(src.join("suid"), "security.capability", &cap).unwrap();
    set_time(&src.join("d/sub"), 1_000_000_000, 123_456_789);
    set_time(&src.join("d"), 1_100_000_000, 987_654_321);
    set_time(&src.join("sym"), 1_200_000_000, 5);
}

fn mtime_ns(p: &Path) -> (i64, i64) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec())
}

#[test]
fn content_copy_keeps_everything() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fixture(&src);
    copy_tree(&src, &dst, CopyMode::Content).unwrap();
    assert_same_tree(&src, &dst, &CompareOptions::default()).unwrap();

    let ft = |p: &str| fs::symlink_metadata(dst.join(p)).unwrap().file_type();
    use std::os::unix::fs::FileTypeExt;
    assert!(ft("sock").is_socket(), "sockets stay sockets");
    assert!(ft("fifo").is_fifo());
    assert!(ft("whiteout").is_char_device());
    assert!(ft("blk").is_block_device());
    assert!(ft("sym").is_symlink());
    // Hardlink group preserved, and not shared with the source.
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&dst.join("d/file")), ino(&dst.join("link1")));
    assert_eq!(ino(&dst.join("d/file")), ino(&dst.join("d/sub/link2")));
    assert_ne!(ino(&dst.join("d/file")), ino(&src.join("d/file")));
    assert_eq!(fs::metadata(dst.join("d/file")).unwrap().nlink(), 3);
    // Modes with suid/sgid/sticky and owner; capability survives the chown.
    let m = fs::metadata(dst.join("suid")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o6755, 1000, 1000));
    assert!(
        xattr::get(dst.join("suid"), "security.capability")
            .unwrap()
            .is_some()
    );
    assert_eq!(
        fs::metadata(dst.join("sticky")).unwrap().mode() & 0o7777,
        0o1777
    );
    // All xattrs, trusted.* and overlay's opaque marker included.
    assert_eq!(
        xattr::get(dst.join("d/file"), "trusted.note")
            .unwrap()
            .unwrap(),
        b"t"
    );
    assert_eq!(
        xattr::get(dst.join("d/sub"), "trusted.overlay.opaque")
            .unwrap()
            .unwrap(),
        b"y"
    );
    // Nanosecond times; directories set after their children.
    assert_eq!(mtime_ns(&dst.join("d/sub")), (1_000_000_000, 123_456_789));
    assert_eq!(mtime_ns(&dst.join("d")), (1_100_000_000, 987_654_321));
    assert_eq!(mtime_ns(&dst.join("sym")), (1_200_000_000, 5));
    assert_unopened_xattrs(&dst);
}

/// The xattrs of the fixture's symlink, FIFO and device node, on the copies themselves.
fn assert_unopened_xattrs(dst: &Path) {
    for (name, attr, value) in [
        ("sym", "trusted.on-link", b"L"),
        ("fifo", "trusted.on-fifo", b"F"),
        ("null", "security.on-dev", b"D"),
    ] {
        assert_eq!(
            xattr::get(dst.join(name), attr).unwrap().as_deref(),
            Some(&value[..]),
            "{name}: {attr}"
        );
    }
    assert!(
        xattr::get_deref(dst.join("sym"), "trusted.on-link")
            .unwrap()
            .is_none(),
        "set on the link, not on its target"
    );
}

#[test]
fn hardlink_copy_links_files_and_copies_the_rest() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fixture(&src);
    copy_tree(&src, &dst, CopyMode::Hardlink).unwrap();
    assert_same_tree(&src, &dst, &CompareOptions::default()).unwrap();
    let ino = |p: &Path| fs::symlink_metadata(p).unwrap().ino();
    assert_eq!(ino(&src.join("d/file")), ino(&dst.join("d/file")));
    assert_eq!(ino(&src.join("suid")), ino(&dst.join("suid")));
    assert_ne!(
        ino(&src.join("d")),
        ino(&dst.join("d")),
        "directories are copies"
    );
    assert_ne!(ino(&src.join("sym")), ino(&dst.join("sym")));
    assert_eq!(mtime_ns(&dst.join("d")), (1_100_000_000, 987_654_321));
    assert_unopened_xattrs(&dst);
}

#[test]
fn hardlink_copy_falls_back_to_content_on_emlink() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("only"), "data").unwrap();
    xattr::set(src.join("only"), "user.k", b"v").unwrap();
    INJECT_EMLINK.with(|c| c.set(1));
    copy_tree(&src, &dst, CopyMode::Hardlink).unwrap();
    assert_eq!(INJECT_EMLINK.with(|c| c.get()), 0, "the hook fired");
    let (a, b) = (
        fs::metadata(src.join("only")).unwrap(),
        fs::metadata(dst.join("only")).unwrap(),
    );
    assert_ne!(a.ino(), b.ino(), "copied, not linked");
    assert_eq!(fs::read(dst.join("only")).unwrap(), b"data");
    assert_same_tree(&src, &dst, &CompareOptions::default()).unwrap();
}

#[test]
fn refuses_a_non_directory_and_an_existing_destination() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("f"), "x").unwrap();
    assert!(copy_tree(&t.path().join("f"), &t.path().join("g"), CopyMode::Content).is_err());
    fs::create_dir(t.path().join("s")).unwrap();
    fs::create_dir(t.path().join("e")).unwrap();
    let err = copy_tree(&t.path().join("s"), &t.path().join("e"), CopyMode::Content).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EEXIST));
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

/// Lowers the soft open-file limit to 1,024 (the common default) for this test process; nextest
/// runs each test in its own process.
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

fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd").unwrap().count()
}

fn dir_fd(p: &Path) -> OwnedFd {
    open_dir(CWD, p).unwrap()
}

fn write_at(dir: &OwnedFd, name: &CStr, data: &[u8]) {
    let f = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&f, data).unwrap();
}

fn read_at(dir: &OwnedFd, name: &CStr) -> Vec<u8> {
    let f = rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).unwrap();
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut File::from(f), &mut v).unwrap();
    v
}

const DEEP: usize = 10_000;

/// `DEEP` nested directories `d/…/d` below `root`, each holding a file `f` with its level
/// number, every hundredth a symlink `up` → `..`, and (at the top and at the bottom) two
/// names of one file, `hl`.
fn deep_tree(root: &Path) {
    let mut cur = dir_fd(root);
    write_at(&cur, c"hl", b"shared");
    for i in 0..DEEP {
        rustix::fs::mkdirat(&cur, c"d", Mode::from_raw_mode(0o750)).unwrap();
        write_at(&cur, c"f", format!("{i}").as_bytes());
        if i % 100 == 0 {
            rustix::fs::symlinkat(c"..", &cur, c"up").unwrap();
        }
        cur = open_dir(&cur, c"d").unwrap();
    }
    let top = dir_fd(root);
    rustix::fs::linkat(&top, c"hl", &cur, c"hl", AtFlags::empty()).unwrap();
}

/// Walks down the copy checking every level.
fn check_deep_copy(src: &Path, dst: &Path, mode: CopyMode) {
    let (mut s, mut d) = (dir_fd(src), dir_fd(dst));
    for i in 0..DEEP {
        assert_eq!(read_at(&d, c"f"), format!("{i}").as_bytes(), "level {i}");
        if i % 100 == 0 {
            assert_eq!(
                rustix::fs::readlinkat(&d, c"up", Vec::new())
                    .unwrap()
                    .as_bytes(),
                b".."
            );
        }
        let (sf, df) = (
            rustix::fs::statat(&s, c"f", AtFlags::empty()).unwrap(),
            rustix::fs::statat(&d, c"f", AtFlags::empty()).unwrap(),
        );
        assert_eq!(
            sf.st_ino == df.st_ino,
            mode == CopyMode::Hardlink,
            "level {i}: linked in hardlink mode only"
        );
        let dd = rustix::fs::statat(&d, c"d", AtFlags::SYMLINK_NOFOLLOW).unwrap();
        assert_eq!(
            dd.st_mode & 0o7777,
            0o750,
            "level {i}: the directory's mode"
        );
        s = open_dir(&s, c"d").unwrap();
        d = open_dir(&d, c"d").unwrap();
    }
    let (top, bottom) = (
        rustix::fs::statat(dir_fd(dst), c"hl", AtFlags::empty()).unwrap(),
        rustix::fs::statat(&d, c"hl", AtFlags::empty()).unwrap(),
    );
    assert_eq!(
        top.st_ino, bottom.st_ino,
        "the hardlink group spans the depth"
    );
    assert_eq!(read_at(&d, c"hl"), b"shared");
}

fn deep_copy(mode: CopyMode) {
    limit_fds();
    let t = DeepScratch::new();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    deep_tree(&src);
    let before = open_fds();
    copy_tree(&src, &dst, mode).unwrap();
    assert_eq!(open_fds(), before, "no descriptor leaked");
    check_deep_copy(&src, &dst, mode);
    // TempDir's own cleanup is std's remove_dir_all: one descriptor per level.
    archive::fs::remove_tree(&src).unwrap();
    archive::fs::remove_tree(&dst).unwrap();
}

#[test]
fn content_copy_of_a_10000_level_tree_with_1024_descriptors() {
    deep_copy(CopyMode::Content);
}

#[test]
fn hardlink_copy_of_a_10000_level_tree_with_1024_descriptors() {
    deep_copy(CopyMode::Hardlink);
}

const MIB: u64 = 1 << 20;

/// A sparse file: holes at the start, in the middle and at the end, data between.
fn sparse_file(p: &Path) -> Vec<(u64, Vec<u8>)> {
    let f = fs::File::create(p).unwrap();
    let pieces = vec![
        (MIB, vec![b'a'; 4096]),
        (5 * MIB + 17, b"middle".to_vec()),
        (9 * MIB, vec![b'z'; 300 * 1024]),
    ];
    for (off, data) in &pieces {
        std::os::unix::fs::FileExt::write_all_at(&f, data, *off).unwrap();
    }
    f.set_len(64 * MIB).unwrap();
    pieces
}

fn blocks(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks()
}

fn sparse_copy(force_pread: bool) {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    let pieces = sparse_file(&src.join("sparse"));
    fs::write(src.join("dense"), vec![7u8; 300 * 1024 + 5]).unwrap();
    // All hole, and data ending exactly at the end.
    fs::File::create(src.join("empty-hole"))
        .unwrap()
        .set_len(3 * MIB)
        .unwrap();
    let tail = fs::File::create(src.join("tail")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&tail, b"end", 2 * MIB - 3).unwrap();
    FORCE_PREAD.with(|c| c.set(force_pread));
    copy_tree(&src, &dst, CopyMode::Content).unwrap();
    for name in ["sparse", "dense", "empty-hole", "tail"] {
        assert_eq!(
            fs::read(src.join(name)).unwrap(),
            fs::read(dst.join(name)).unwrap(),
            "{name}: same bytes"
        );
        assert!(
            blocks(&dst.join(name)) <= blocks(&src.join(name)) + 8,
            "{name}: {} blocks in the copy, {} in the source",
            blocks(&dst.join(name)),
            blocks(&src.join(name))
        );
    }
    let data: u64 = pieces.iter().map(|(_, d)| d.len() as u64).sum();
    assert!(
        blocks(&dst.join("sparse")) * 512 < data + MIB,
        "the holes stay holes: {} blocks for {data} bytes of data",
        blocks(&dst.join("sparse"))
    );
    assert_eq!(fs::metadata(dst.join("sparse")).unwrap().len(), 64 * MIB);
}

#[test]
fn content_copy_keeps_holes() {
    sparse_copy(false);
}

#[test]
fn content_copy_keeps_holes_without_copy_file_range() {
    sparse_copy(true);
}

/// A host directory with a canary, and a source tree with a directory `d`, files `f` and `g`.
struct RaceFixture {
    _t: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    host: tempfile::TempDir,
}

const CANARY: &[u8] = b"HOST-CANARY-BYTES";

fn race_fixture() -> RaceFixture {
    let t = tempfile::tempdir().unwrap();
    let host = tempfile::tempdir().unwrap();
    fs::write(host.path().join("canary"), CANARY).unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/inner"), "inner").unwrap();
    fs::write(src.join("f"), "file").unwrap();
    fs::write(src.join("g"), "other").unwrap();
    RaceFixture {
        _t: t,
        src,
        dst,
        host,
    }
}

/// Every regular file below `dst`, symlinks not followed, must not hold host bytes nor be a
/// host inode.
fn assert_no_host_data(dst: &Path, host: &Path) {
    let canary_ino = fs::metadata(host.join("canary")).unwrap().ino();
    let mut todo = vec![dst.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(entries) = fs::read_dir(&p) else {
            continue;
        };
        for e in entries {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                todo.push(e.path());
            } else if m.is_file() {
                assert_ne!(m.ino(), canary_ino, "{}: a host inode", e.path().display());
                let data = fs::read(e.path()).unwrap();
                assert!(
                    !data.windows(CANARY.len()).any(|w| w == CANARY),
                    "{}: host bytes",
                    e.path().display()
                );
            }
        }
    }
    assert_eq!(
        fs::read(host.join("canary")).unwrap(),
        CANARY,
        "host untouched"
    );
}

fn with_race_window(f: impl FnMut(BorrowedFd<'_>, &CStr) + 'static) {
    RACE_WINDOW.with(|h| *h.borrow_mut() = Some(Box::new(f)));
}

/// Swaps the entry `victim` for `with` (made by `make` in the same directory) the first time
/// the copy reaches `victim`'s window.
fn swap_once(victim: &'static CStr, make: impl Fn(BorrowedFd<'_>) + 'static) {
    let mut done = false;
    with_race_window(move |dir, name| {
        if done || name != victim {
            return;
        }
        done = true;
        rustix::fs::renameat(dir, victim, dir, c"moved-away").unwrap();
        make(dir);
    });
}

#[test]
fn a_directory_swapped_for_a_symlink_is_refused() {
    for mode in [CopyMode::Content, CopyMode::Hardlink] {
        let fx = race_fixture();
        let host = fx.host.path().to_path_buf();
        swap_once(c"d", move |dir| {
            rustix::fs::symlinkat(host.as_path(), dir, c"d").unwrap();
        });
        let err = copy_tree(&fx.src, &fx.dst, mode).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{mode:?}: {err}");
        assert!(
            err.to_string().contains("d"),
            "{mode:?}: names the entry: {err}"
        );
        assert_no_host_data(&fx.dst, fx.host.path());
        assert!(!fx.dst.join("d/canary").exists());
    }
}

#[test]
fn a_directory_swapped_for_another_directory_is_refused() {
    let fx = race_fixture();
    swap_once(c"d", move |dir| {
        // Another directory moved in (as a rename of a host directory would).
        rustix::fs::mkdirat(dir, c"d", Mode::from_raw_mode(0o755)).unwrap();
    });
    let err = copy_tree(&fx.src, &fx.dst, CopyMode::Content).unwrap_err();
    assert!(
        err.to_string().contains("changed while being read"),
        "{err}"
    );
}

#[test]
fn a_file_swapped_for_a_fifo_is_refused_without_blocking() {
    let fx = race_fixture();
    swap_once(c"f", |dir| {
        rustix::fs::mknodat(dir, c"f", FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
    });
    // Blocking here would hang the test (no writer ever opens the FIFO).
    let err = copy_tree(&fx.src, &fx.dst, CopyMode::Content).unwrap_err();
    assert!(err.to_string().contains("FIFO"), "{err}");
}

#[test]
fn a_file_swapped_for_a_device_or_a_symlink_is_refused() {
    let root = rustix::process::geteuid().is_root();
    if !root {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true: run as root"
        );
    }
    for (what, expect) in [("symlink", "symlink"), ("block device", "block device")] {
        if what == "block device" && !root {
            eprintln!("skipping the block device case: mknod needs root");
            continue;
        }
        let fx = race_fixture();
        let host = fx.host.path().join("canary");
        swap_once(c"f", move |dir| {
            if what == "symlink" {
                rustix::fs::symlinkat(host.as_path(), dir, c"f").unwrap();
            } else {
                rustix::fs::mknodat(
                    dir,
                    c"f",
                    FileType::BlockDevice,
                    Mode::from_raw_mode(0o644),
                    makedev(7, 0),
                )
                .unwrap();
            }
        });
        let err = copy_tree(&fx.src, &fx.dst, CopyMode::Content).unwrap_err();
        assert!(err.to_string().contains(expect), "{what}: {err}");
        assert_no_host_data(&fx.dst, fx.host.path());
    }
}

/// Another thread exchanges, in a loop, the directory `d` with a symlink to a host directory,
/// and the file `f` with a FIFO, a block device (as root) and a symlink to a host file, while
/// the tree is copied again and again: no copy ever holds host bytes or blocks; copies fail or
/// succeed with the tree as it was at some moment.
#[test]
fn racing_swaps_never_bring_host_data_into_the_copy() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let fx = race_fixture();
    let src = dir_fd(&fx.src);
    rustix::fs::symlinkat(fx.host.path(), &src, c"d-link").unwrap();
    rustix::fs::symlinkat(fx.host.path().join("canary").as_path(), &src, c"f-link").unwrap();
    rustix::fs::mknodat(
        &src,
        c"f-fifo",
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let mut pairs = vec![(c"d", c"d-link"), (c"f", c"f-fifo"), (c"f", c"f-link")];
    if rustix::process::geteuid().is_root() {
        rustix::fs::mknodat(
            &src,
            c"f-blk",
            FileType::BlockDevice,
            Mode::from_raw_mode(0o644),
            makedev(7, 0),
        )
        .unwrap();
        pairs.push((c"f", c"f-blk"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (a, b) in &pairs {
                    rustix::fs::renameat_with(&src, *a, &src, *b, RenameFlags::EXCHANGE).unwrap();
                    swaps += 1;
                }
            }
            swaps
        })
    };
    let (mut ok, mut refused) = (0, 0);
    for i in 0..400 {
        let mode = if i % 2 == 0 {
            CopyMode::Content
        } else {
            CopyMode::Hardlink
        };
        match copy_tree(&fx.src, &fx.dst, mode) {
            Ok(()) => ok += 1,
            Err(_) => refused += 1,
        }
        assert_no_host_data(&fx.dst, fx.host.path());
        archive::fs::remove_tree(&fx.dst).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = attacker.join().unwrap();
    assert!(swaps > 0);
    eprintln!("{ok} copies, {refused} refused, {swaps} swaps");
}
