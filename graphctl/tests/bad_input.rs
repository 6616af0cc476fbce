//! Bad input: each case gives exit status 1, one `error:` line naming the thing, and leaves the
//! store unchanged.

use std::fs;

use crate::util::{Store, TmpMount, layer_tar, skip_root_test, test_tmp};

#[test]
fn unknown_driver() {
    let s = Store::new("nosuchdriver");
    let msg = s.err(&["ls"]);
    assert!(msg.contains("nosuchdriver") && msg.contains("vfs"), "{msg}");
}

#[test]
fn missing_layer() {
    let s = Store::new("vfs");
    s.ok(&["create", "base"]);
    for args in [
        &["mount", "nope"][..],
        &["rm", "nope"],
        &["changes", "nope"],
        &["diff", "nope"],
        &["diff-size", "nope"],
        &["create", "--parent", "nope", "child"],
    ] {
        let msg = s.err(args);
        assert!(
            msg.contains("nope") && msg.contains("does not exist"),
            "{args:?}: {msg}"
        );
    }
    assert_eq!(s.ok(&["ls"]), "base -\n");
}

#[test]
fn invalid_id() {
    let s = Store::new("vfs");
    for id in ["../escape", "a/b", ".hidden", "x y"] {
        let msg = s.err(&["create", id]);
        assert!(msg.contains("invalid layer id"), "{id}: {msg}");
        // `exists` answers 1 for "no such layer" only; an error is 125.
        let (_, msg) = s.cmd(&["exists", id]).status(125);
        assert!(msg.contains("invalid layer id"), "{id}: {msg}");
    }
    let msg = s.err(&["create", "--parent", "../x", "ok"]);
    assert!(msg.contains("invalid layer id"), "{msg}");
    assert_eq!(s.ok(&["ls"]), "");
    assert!(!s.root.parent().unwrap().join("escape").exists());
}

#[test]
fn duplicate_layer() {
    let s = Store::new("vfs");
    s.ok(&["create", "base"]);
    let msg = s.err(&["create", "base"]);
    assert!(
        msg.contains("base") && msg.contains("already exists"),
        "{msg}"
    );
}

driver_test!(corrupt_and_truncated_tar, |driver| {
    let s = Store::new(driver);
    s.ok(&["create", "base"]);
    // Not a tar at all.
    let garbage = s.scratch("garbage");
    fs::write(&garbage, vec![0x42u8; 4096]).unwrap();
    let msg = s.err(&["apply", "--parent", "base", "l1", garbage.to_str().unwrap()]);
    assert!(msg.contains("garbage") || msg.contains("l1"), "{msg}");
    // A tar cut in the middle of a file.
    let tar = layer_tar(&[("big", &vec![b'x'; 100_000]), ("after", b"y")]);
    let cut = s.scratch("cut.tar");
    fs::write(&cut, &tar[..50_000]).unwrap();
    let msg = s.err(&["apply", "--parent", "base", "l2", cut.to_str().unwrap()]);
    assert!(msg.contains("l2"), "{msg}");
    // A truncated gzip stream.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let gz = gz.finish().unwrap();
    let cutgz = s.scratch("cut.tar.gz");
    fs::write(&cutgz, &gz[..gz.len() / 2]).unwrap();
    let msg = s.err(&["apply", "--parent", "base", "l3", cutgz.to_str().unwrap()]);
    assert!(msg.contains("l3"), "{msg}");
    // A hostile entry.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    let name = b"../../escaped";
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let evil = s.scratch("evil.tar");
    fs::write(&evil, b.into_inner().unwrap()).unwrap();
    s.err(&["apply", "--parent", "base", "l4", evil.to_str().unwrap()]);
    assert!(!s.root.join("escaped").exists() && !s.dir.path().join("escaped").exists());
    assert_eq!(
        s.ok(&["ls"]),
        "base -\n",
        "a failed apply left a layer behind"
    );
});

#[test]
fn unknown_format_shows_the_first_bytes_in_hex() {
    let s = Store::new("vfs");
    let zip = s.scratch("image.zip");
    fs::write(&zip, b"PK\x03\x04\x14\x00\x00\x00 and then some more").unwrap();
    let msg = s.err(&["apply", "l1", zip.to_str().unwrap()]);
    assert!(
        msg.contains("image.zip")
            && msg.contains("0x50 0x4b 0x03 0x04 0x14 0x00 0x00 0x00")
            && msg.contains("hex"),
        "{msg}"
    );
    assert_eq!(s.ok(&["ls"]), "");
}

#[test]
fn wrong_config_key() {
    let s = Store::new("vfs");
    let conf = s.scratch("storage.toml");
    fs::write(&conf, "[storage]\ndriverr = \"vfs\"\n").unwrap();
    let mut c = s.cmd(&["ls"]);
    c.cmd.env("GRAPHCTL_CONFIG", &conf);
    let msg = c.err();
    assert!(
        msg.contains("storage.toml") && msg.contains("driverr") && msg.contains("line 2"),
        "{msg}"
    );
    let msg = s.err(&[
        "--config",
        s.scratch("missing.toml").to_str().unwrap(),
        "ls",
    ]);
    assert!(msg.contains("missing.toml"), "{msg}");
    let msg = s.err(&["-o", "novalue", "ls"]);
    assert!(
        msg.contains("novalue") && msg.contains("KEY=VALUE"),
        "{msg}"
    );
}

driver_test!(read_only_root, |driver| {
    if let Some(reason) = skip_root_test() {
        eprintln!("skipping: mounting a tmpfs {reason}");
        return;
    }
    let tmp = tempfile::tempdir_in(test_tmp()).unwrap();
    let mnt = TmpMount::tmpfs(tmp.path(), "16m");
    let s = Store::at(driver, mnt.path.join("root"));
    s.ok(&["create", "base"]);
    mnt.remount("ro");
    let msg = s.err(&["create", "--parent", "base", "child"]);
    assert!(msg.contains("read-only"), "{msg}");
    let tar = s.scratch("l.tar");
    fs::write(&tar, layer_tar(&[("a", b"a")])).unwrap();
    let msg = s.err(&["apply", "l", tar.to_str().unwrap()]);
    assert!(msg.contains("read-only"), "{msg}");
    let msg = s.err(&["import", crate::util::sample_image().to_str().unwrap()]);
    assert!(msg.contains("read-only"), "{msg}");
    mnt.remount("rw");
    assert_eq!(s.ok(&["ls"]), "base -\n");
});

driver_test!(no_space, |driver| {
    if let Some(reason) = skip_root_test() {
        eprintln!("skipping: mounting a tmpfs {reason}");
        return;
    }
    let tmp = tempfile::tempdir_in(test_tmp()).unwrap();
    let mnt = TmpMount::tmpfs(tmp.path(), "1m");
    let s = Store::at(driver, mnt.path.join("root"));
    s.ok(&["create", "base"]);
    let big = s.scratch("big.tar");
    fs::write(&big, layer_tar(&[("big", &vec![b'z'; 4 << 20])])).unwrap();
    let msg = s.err(&["apply", "--parent", "base", "big", big.to_str().unwrap()]);
    assert!(
        msg.contains("no space") || msg.contains("No space"),
        "{msg}"
    );
    assert_eq!(s.ok(&["ls"]), "base -\n");
});
