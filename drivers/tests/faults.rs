//! Failed applies are all or nothing: a layer the driver just created for the apply (fresh) is
//! removed again, a layer that existed before (created by another process) is kept exactly as
//! it was; corrupt input and a full disk leave the parent intact and give the space back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use archive::compare::{CompareOptions, differences, snapshot};
use common::{id, root_or_skip, tar_of, write_files};
use graphdriver::{Driver, Error};

fn vfs(home: &Path) -> Box<dyn Driver> {
    Box::new(drivers::vfs::Vfs::driver(home, graphdriver::Durability::None).unwrap())
}

fn overlay(home: &Path) -> Box<dyn Driver> {
    Box::new(drivers::overlay::Overlay::driver(home, Default::default()).unwrap())
}

/// The parent's tree, as the driver shows it.
fn tree(d: &dyn Driver, layer: &str) -> archive::compare::Snapshot {
    let p = d.get(&id(layer), &Default::default()).unwrap();
    let s = snapshot(&p).unwrap();
    d.put(&id(layer)).unwrap();
    s
}

fn base(d: &dyn Driver, t: &Path) {
    let s = t.join("base-src");
    write_files(&s, &[("etc/os-release", "test"), ("bin/tool", "binary")]);
    d.create(&id("base"), None).unwrap();
    d.apply_diff(&id("base"), None, &mut &tar_of(&s)[..])
        .unwrap();
}

fn corrupt_inputs(t: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let s = t.join("big-src");
    write_files(&s, &[("etc/os-release", "changed")]);
    fs::write(s.join("blob"), vec![1u8; 100_000]).unwrap();
    let tar = tar_of(&s);
    let mut bad_checksum = tar.clone();
    bad_checksum[148] ^= 0x55;
    vec![
        ("truncated", tar[..tar.len() / 2].to_vec()),
        ("bad checksum", bad_checksum),
        ("garbage", b"this is not a tar stream at all".repeat(40)),
    ]
}

fn corrupt_apply_leaves_nothing(make: fn(&Path) -> Box<dyn Driver>) {
    let t = tempfile::tempdir().unwrap();
    let d = make(&t.path().join("home"));
    base(&*d, t.path());
    let before = tree(&*d, "base");
    for (what, input) in corrupt_inputs(t.path()) {
        // Fresh: created by this driver for the apply, so a failed apply removes it.
        d.create(&id("child"), Some(&id("base"))).unwrap();
        let err = d
            .apply_diff(&id("child"), Some(&id("base")), &mut &input[..])
            .unwrap_err();
        assert!(matches!(err, Error::Archive { .. }), "{what}: {err}");
        assert!(
            err.to_string().contains("child"),
            "{what}: error names the layer: {err}"
        );
        assert!(!d.exists(&id("child")), "{what}: a fresh layer is removed");
        assert!(
            !d.home().join("child").exists(),
            "{what}: no directory left"
        );
        assert!(matches!(d.remove(&id("child")), Err(Error::NotFound(_))));
        // Existing: created by another driver instance (another process), so kept as it was.
        let other = make(d.home());
        other.create(&id("old"), Some(&id("base"))).unwrap();
        drop(other);
        let old_before = tree(&*d, "old");
        let err = d
            .apply_diff(&id("old"), Some(&id("base")), &mut &input[..])
            .unwrap_err();
        assert!(matches!(err, Error::Archive { .. }), "{what}: {err}");
        assert!(d.exists(&id("old")), "{what}: an existing layer is kept");
        let diffs = differences(&old_before, &tree(&*d, "old"), &CompareOptions::default());
        assert!(
            diffs.is_empty(),
            "{what}: the existing layer changed: {diffs:?}"
        );
        d.remove(&id("old")).unwrap();
        let diffs = differences(&before, &tree(&*d, "base"), &CompareOptions::default());
        assert!(diffs.is_empty(), "{what}: parent changed: {diffs:?}");
    }
}

#[test]
fn corrupt_tar_on_vfs() {
    if root_or_skip("corrupt_tar_on_vfs") {
        corrupt_apply_leaves_nothing(vfs);
    }
}

#[test]
fn corrupt_tar_on_overlay() {
    if root_or_skip("corrupt_tar_on_overlay") {
        corrupt_apply_leaves_nothing(overlay);
    }
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        drivers::mountinfo::mount("tmpfs", at, "tmpfs", &format!("size={size},mode=0755")).unwrap();
        Tmpfs(at.to_path_buf())
    }
    fn free_blocks(&self) -> u64 {
        rustix::fs::statvfs(&self.0).unwrap().f_bfree
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

fn enospc_is_clear(make: fn(&Path) -> Box<dyn Driver>) {
    let t = tempfile::tempdir().unwrap();
    let fsys = Tmpfs::new(&t.path().join("small"), "2m");
    let d = make(&fsys.0.join("home"));
    base(&*d, t.path());
    let before = tree(&*d, "base");
    let s = t.path().join("huge-src");
    fs::create_dir(&s).unwrap();
    fs::write(s.join("huge"), vec![9u8; 4 << 20]).unwrap();
    let tar = tar_of(&s);
    d.create(&id("child"), Some(&id("base"))).unwrap();
    let free = fsys.free_blocks();
    let err = d
        .apply_diff(&id("child"), Some(&id("base")), &mut &tar[..])
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOSPC), "{err}");
    assert!(
        !d.exists(&id("child")),
        "a failed apply removes the fresh layer"
    );
    assert!(!d.home().join("child").exists());
    let diffs = differences(&before, &tree(&*d, "base"), &CompareOptions::default());
    assert!(diffs.is_empty(), "parent changed: {diffs:?}");
    assert!(
        fsys.free_blocks() >= free,
        "space returned: {} < {free}",
        fsys.free_blocks()
    );
    // An existing layer (another instance made it): the staged copy fills the disk, and the
    // layer, its tree and the free space are as before.
    let other = make(d.home());
    other.create(&id("old"), Some(&id("base"))).unwrap();
    drop(other);
    let old_before = tree(&*d, "old");
    let free = fsys.free_blocks();
    let err = d
        .apply_diff(&id("old"), Some(&id("base")), &mut &tar[..])
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOSPC), "{err}");
    assert!(d.exists(&id("old")));
    let diffs = differences(&old_before, &tree(&*d, "old"), &CompareOptions::default());
    assert!(diffs.is_empty(), "the existing layer changed: {diffs:?}");
    assert!(
        fsys.free_blocks() >= free,
        "space returned: {} < {free}",
        fsys.free_blocks()
    );
    drop(d);
}

#[test]
fn enospc_on_vfs() {
    if root_or_skip("enospc_on_vfs") {
        enospc_is_clear(vfs);
    }
}

#[test]
fn enospc_on_overlay() {
    if root_or_skip("enospc_on_overlay") {
        enospc_is_clear(overlay);
    }
}
