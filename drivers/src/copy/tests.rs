#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use archive::compare::{CompareOptions, assert_same_tree};
use rustix::fs::{FileType, Mode, Timespec, Timestamps, makedev};

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
