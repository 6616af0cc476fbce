//! A char device 0/0 in a layer tar has one meaning in every view: with OCI whiteouts it is a
//! whiteout (the path is deleted and nothing is created, like `.wh.<name>`), with overlay
//! whiteouts it stays the char 0/0 that overlayfs reads as a whiteout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod apply_util;

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use apply_util::Tb;
use archive::{ApplyOptions, OverlayXattr, WhiteoutFormat, apply_layer_report};
use tar::EntryType;

/// Whether the root-only `test` runs (mknod): see [`test_support::root_or_skip`].
fn is_root_or_ci(test: &str) -> bool {
    test_support::root_or_skip(&format!("{test} (mknod)"))
}

/// Every path in `dir` (recursively) that is a character or block device.
fn devices(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_char_device() || ft.is_block_device() {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

fn lower(dir: &Path) {
    std::fs::create_dir_all(dir.join("etc/sub")).unwrap();
    std::fs::write(dir.join("etc/gone"), b"lower").unwrap();
    std::fs::write(dir.join("etc/sub/deep"), b"lower").unwrap();
    std::fs::write(dir.join("etc/kept"), b"lower").unwrap();
}

#[test]
fn char00_is_a_whiteout_in_oci_layers() {
    let t = tempfile::tempdir().unwrap();
    lower(t.path());
    let tar = Tb::new()
        .dir("etc")
        .device(EntryType::Char, "etc/gone", 0o644, 0, 0)
        .device(EntryType::Char, "etc/sub", 0o600, 0, 0)
        // Whiting out what does not exist is fine and creates nothing.
        .device(EntryType::Char, "etc/never", 0o644, 0, 0)
        .file("etc/new", b"upper")
        .finish();
    let report = apply_layer_report(t.path(), &tar[..], &ApplyOptions::default()).unwrap();
    assert_eq!(report.bytes, 5);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let etc = t.path().join("etc");
    assert!(etc.join("gone").symlink_metadata().is_err());
    assert!(etc.join("sub").symlink_metadata().is_err());
    assert!(etc.join("never").symlink_metadata().is_err());
    assert_eq!(std::fs::read(etc.join("kept")).unwrap(), b"lower");
    assert_eq!(std::fs::read(etc.join("new")).unwrap(), b"upper");
    // The resulting tree shows no device: its own view agrees with an overlay stacked on it.
    assert_eq!(devices(t.path()), Vec::<String>::new());
}

#[test]
fn char00_inside_an_opaque_directory_is_not_kept() {
    let t = tempfile::tempdir().unwrap();
    lower(t.path());
    let tar = Tb::new()
        .dir("etc")
        .file("etc/.wh..wh..opq", b"")
        .device(EntryType::Char, "etc/kept", 0o644, 0, 0)
        .file("etc/new", b"n")
        .finish();
    apply_layer_report(t.path(), &tar[..], &ApplyOptions::default()).unwrap();
    let names: Vec<_> = std::fs::read_dir(t.path().join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["new"]);
}

#[test]
fn char00_stays_a_char00_with_overlay_whiteouts() {
    if !is_root_or_ci("char00_stays_a_char00_with_overlay_whiteouts") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let tar = Tb::new()
        .dir("etc")
        .device(EntryType::Char, "etc/gone", 0o644, 0, 0)
        .file("etc/.wh.other", b"")
        .finish();
    let mut opts = ApplyOptions::default();
    opts.whiteout_format = WhiteoutFormat::Overlay(OverlayXattr::Trusted);
    apply_layer_report(t.path(), &tar[..], &opts).unwrap();
    let mut devs = devices(t.path());
    devs.sort();
    assert_eq!(devs, ["etc/gone", "etc/other"]);
    for d in devs {
        let st = rustix::fs::lstat(t.path().join(d)).unwrap();
        assert_eq!(st.st_rdev, 0);
    }
}

#[test]
fn other_devices_are_created_by_root() {
    if !is_root_or_ci("other_devices_are_created_by_root") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let tar = Tb::new()
        .device(EntryType::Char, "null", 0o666, 1, 3)
        .device(EntryType::Block, "loop", 0o660, 7, 0)
        .finish();
    let report = apply_layer_report(t.path(), &tar[..], &ApplyOptions::default()).unwrap();
    assert!(report.skipped.is_empty());
    let mut devs = devices(t.path());
    devs.sort();
    assert_eq!(devs, ["loop", "null"]);
}
