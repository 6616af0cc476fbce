//! Every entry type lands with exact metadata; replacement rules; directory mtimes last.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod apply_util;

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use apply_util::{MTIME, Tb};
use archive::{ApplyOptions, apply_layer};
use tar::EntryType;

#[test]
fn every_type_with_metadata() {
    let d = tempfile::tempdir().unwrap();
    let mut t = Tb::new();
    t.pax(&[("SCHILY.xattr.user.dir", b"dv")]);
    t.entry(EntryType::Directory, "d", 0o1775, (7, 8), 1000, None, b"");
    t.entry(
        EntryType::Directory,
        "d/sub",
        0o750,
        (0, 0),
        2000,
        None,
        b"",
    );
    t.pax(&[
        ("SCHILY.xattr.user.k", b"v1"),
        (
            "SCHILY.xattr.security.capability",
            b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        ),
    ]);
    t.entry(
        EntryType::Regular,
        "d/sub/suid",
        0o4755,
        (1000, 1001),
        3000,
        None,
        b"hello",
    );
    t.entry(
        EntryType::Symlink,
        "d/link",
        0o777,
        (5, 6),
        4000,
        Some("sub/suid"),
        b"",
    );
    t.pax(&[("SCHILY.xattr.trusted.sym", b"s")]);
    t.entry(
        EntryType::Symlink,
        "d/link2",
        0o777,
        (0, 0),
        4000,
        Some("/nowhere"),
        b"",
    );
    t.entry(
        EntryType::Link,
        "d/hard",
        0,
        (0, 0),
        0,
        Some("d/sub/suid"),
        b"",
    );
    t.device(EntryType::Char, "d/null", 0o620, 1, 3);
    t.device(EntryType::Block, "d/blk", 0o600, 7, 9);
    t.device(EntryType::Fifo, "d/fifo", 0o640, 0, 0);
    t.pax(&[("mtime", b"5000.25")]);
    t.entry(EntryType::Regular, "d/frac", 0o600, (0, 0), 1, None, b"x");
    let tar = t.finish();
    let n = apply_layer(d.path(), &tar[..], &ApplyOptions::default()).unwrap();
    assert_eq!(n, 6, "regular bytes: 5 + 1, hardlink counts 0");

    let p = d.path();
    let md = std::fs::symlink_metadata(p.join("d")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()),
        (0o1775, 7, 8, 1000)
    );
    assert_eq!(xattr::get(p.join("d"), "user.dir").unwrap().unwrap(), b"dv");
    let md = std::fs::symlink_metadata(p.join("d/sub")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.mtime()),
        (0o750, 2000),
        "dir mtime set after its children"
    );
    let md = std::fs::symlink_metadata(p.join("d/sub/suid")).unwrap();
    assert_eq!(
        (
            md.mode() & 0o7777,
            md.uid(),
            md.gid(),
            md.mtime(),
            md.nlink()
        ),
        (0o4755, 1000, 1001, 3000, 2)
    );
    assert_eq!(std::fs::read(p.join("d/sub/suid")).unwrap(), b"hello");
    assert_eq!(
        xattr::get(p.join("d/sub/suid"), "user.k").unwrap().unwrap(),
        b"v1"
    );
    assert!(
        xattr::get(p.join("d/sub/suid"), "security.capability")
            .unwrap()
            .is_some(),
        "capability survives chown"
    );
    let md = std::fs::symlink_metadata(p.join("d/link")).unwrap();
    assert!(md.file_type().is_symlink());
    assert_eq!((md.uid(), md.gid(), md.mtime()), (5, 6, 4000));
    assert_eq!(
        std::fs::read_link(p.join("d/link")).unwrap().to_str(),
        Some("sub/suid")
    );
    assert_eq!(
        xattr::get(p.join("d/link2"), "trusted.sym")
            .unwrap()
            .unwrap(),
        b"s"
    );
    assert_eq!(
        std::fs::read_link(p.join("d/link2")).unwrap().to_str(),
        Some("/nowhere")
    );
    let hard = std::fs::symlink_metadata(p.join("d/hard")).unwrap();
    assert_eq!(
        hard.ino(),
        std::fs::metadata(p.join("d/sub/suid")).unwrap().ino()
    );
    let md = std::fs::symlink_metadata(p.join("d/null")).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(
        (md.rdev(), md.mode() & 0o7777),
        (rustix::fs::makedev(1, 3), 0o620)
    );
    let md = std::fs::symlink_metadata(p.join("d/blk")).unwrap();
    assert!(md.file_type().is_block_device());
    assert_eq!(md.rdev(), rustix::fs::makedev(7, 9));
    let md = std::fs::symlink_metadata(p.join("d/fifo")).unwrap();
    assert!(md.file_type().is_fifo());
    assert_eq!(md.mode() & 0o7777, 0o640);
    let md = std::fs::symlink_metadata(p.join("d/frac")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (5000, 250_000_000));
}

#[test]
fn missing_parents_are_created_0755_root_owned() {
    let d = tempfile::tempdir().unwrap();
    let tar = Tb::new().file("a/b/c/f", b"x").finish();
    apply_layer(d.path(), &tar[..], &ApplyOptions::default()).unwrap();
    for dir in ["a", "a/b", "a/b/c"] {
        let md = std::fs::metadata(d.path().join(dir)).unwrap();
        assert_eq!(
            (md.mode() & 0o7777, md.uid(), md.gid()),
            (0o755, 0, 0),
            "{dir}"
        );
    }
}

#[test]
fn replacement_rules() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::create_dir_all(p.join("wasdir/inner")).unwrap();
    std::fs::write(p.join("wasfile"), b"old").unwrap();
    std::fs::create_dir(p.join("keep")).unwrap();
    std::fs::write(p.join("keep/lower"), b"lower").unwrap();
    std::os::unix::fs::symlink("/etc", p.join("wassym")).unwrap();
    let tar = Tb::new()
        .file("wasdir", b"now a file")
        .dir("wasfile")
        .entry(EntryType::Directory, "keep", 0o700, (3, 4), 77, None, b"")
        .file("wassym", b"file")
        .finish();
    apply_layer(p, &tar[..], &ApplyOptions::default()).unwrap();
    assert_eq!(std::fs::read(p.join("wasdir")).unwrap(), b"now a file");
    assert!(
        std::fs::symlink_metadata(p.join("wasfile"))
            .unwrap()
            .is_dir()
    );
    let md = std::fs::metadata(p.join("keep")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()),
        (0o700, 3, 4, 77)
    );
    assert_eq!(
        std::fs::read(p.join("keep/lower")).unwrap(),
        b"lower",
        "dir over dir keeps contents"
    );
    assert_eq!(std::fs::read(p.join("wassym")).unwrap(), b"file");
    assert!(
        std::fs::symlink_metadata(p.join("wassym"))
            .unwrap()
            .is_file()
    );
}

#[test]
fn same_owner_false_keeps_caller() {
    let d = tempfile::tempdir().unwrap();
    let tar = Tb::new()
        .entry(
            EntryType::Regular,
            "f",
            0o640,
            (1234, 5678),
            MTIME,
            None,
            b"x",
        )
        .finish();
    let mut o = ApplyOptions::default();
    o.same_owner = false;
    apply_layer(d.path(), &tar[..], &o).unwrap();
    let md = std::fs::metadata(d.path().join("f")).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw()
        )
    );
    assert_eq!(md.mode() & 0o7777, 0o640);
}

#[test]
fn long_names_and_trailing_garbage_drained() {
    let d = tempfile::tempdir().unwrap();
    let long = format!("{}/{}", "x".repeat(150), "y".repeat(120));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o600);
    h.set_entry_type(EntryType::Regular);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
    let mut tar = b.into_inner().unwrap();
    tar.extend(std::iter::repeat_n(0u8, 10 * 512 + 17));
    let mut cursor = std::io::Cursor::new(&tar[..]);
    apply_layer(d.path(), &mut cursor, &ApplyOptions::default()).unwrap();
    assert_eq!(
        cursor.position() as usize,
        tar.len(),
        "reader drained to the end"
    );
    assert_eq!(std::fs::read(d.path().join(&long)).unwrap(), b"abc");
}

#[test]
fn xattr_values_with_newlines_and_equals_round_trip() {
    use archive::compare::{CompareOptions, assert_same_tree};
    use archive::{TarOptions, tar_tree};
    let src = tempfile::tempdir().unwrap();
    let p = src.path();
    std::fs::create_dir(p.join("d")).unwrap();
    std::fs::write(p.join("d/f"), b"x").unwrap();
    // Values holding record separators: `\n`, `=`, digits and spaces that look like a length.
    xattr::set(p.join("d/f"), "user.nl", b"a\nb=c\n").unwrap();
    xattr::set(p.join("d/f"), "user.fake", b"\n12 path=../x\n").unwrap();
    xattr::set(p.join("d"), "trusted.eq", b"==\n\n").unwrap();
    let t = filetime::FileTime::from_unix_time(1_500_000_000, 0);
    for e in ["d/f", "d", "."] {
        filetime::set_symlink_file_times(p.join(e), t, t).unwrap();
    }
    let mut tar = Vec::new();
    std::io::copy(&mut tar_tree(p, &TarOptions::default()).unwrap(), &mut tar).unwrap();
    let dest = tempfile::tempdir().unwrap();
    apply_layer(dest.path(), &tar[..], &ApplyOptions::default()).unwrap();
    assert_eq!(
        xattr::get(dest.path().join("d/f"), "user.fake")
            .unwrap()
            .unwrap(),
        b"\n12 path=../x\n"
    );
    assert!(!dest.path().parent().unwrap().join("x").exists());
    let opts = CompareOptions {
        root_metadata: false,
        ..CompareOptions::default()
    };
    if let Err(diff) = assert_same_tree(p, dest.path(), &opts) {
        panic!("{diff}");
    }
}
