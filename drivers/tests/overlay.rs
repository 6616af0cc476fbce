//! overlay-specific behaviour: mounts, refcounts, hardlinked image roots, removal rules, status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use archive::compare::{CompareOptions, assert_same_tree};
use common::{id, mounts_at, root_or_skip, tar_of, write_files};
use drivers::overlay::{Overlay, OverlayConfig};
use graphdriver::{DiffDriver, Error, MountOpts, ProtoDriver};
use naive_diff::NaiveDiffDriver;

fn overlay(t: &Path) -> NaiveDiffDriver<Overlay> {
    Overlay::driver(&t.join("overlay"), OverlayConfig::default()).unwrap()
}

/// base (applied) → app (applied on base) → ctr (read-write on app).
fn stack(d: &NaiveDiffDriver<Overlay>, t: &Path) {
    let s0 = t.join("s0");
    write_files(
        &s0,
        &[("etc/passwd", "root"), ("bin/sh", "shell"), ("gone", "x")],
    );
    d.create(&id("base"), None).unwrap();
    d.apply_diff(&id("base"), None, &mut &tar_of(&s0)[..])
        .unwrap();
    let s1 = t.join("s1");
    write_files(&s1, &[("app/run", "app"), (".wh.gone", "")]);
    d.create(&id("app"), Some(&id("base"))).unwrap();
    let n = d
        .apply_diff(&id("app"), Some(&id("base")), &mut &tar_of(&s1)[..])
        .unwrap();
    assert_eq!(n, 3);
    d.create_read_write(&id("ctr"), Some(&id("app"))).unwrap();
}

#[test]
fn image_layer_shares_unchanged_files_with_its_parent() {
    if !root_or_skip("image_layer_shares_unchanged_files_with_its_parent") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = overlay(t.path());
    stack(&d, t.path());
    let base = d.inner().layer_dir(&id("base")).join("root");
    let app = d.inner().layer_dir(&id("app")).join("root");
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(&base.join("bin/sh")),
        ino(&app.join("bin/sh")),
        "hardlinked"
    );
    assert_ne!(
        ino(&base.join("bin")),
        ino(&app.join("bin")),
        "directories copied"
    );
    assert!(!app.join("gone").exists());
    assert!(base.join("gone").exists(), "the parent is untouched");
    for leftover in ["upper", "work", "merged", "lower-id", "root-staging"] {
        assert!(
            !d.inner().layer_dir(&id("app")).join(leftover).exists(),
            "{leftover}"
        );
    }
    // get on an image layer returns root/ without mounting, but counts.
    let p = d.get(&id("app"), &MountOpts::default()).unwrap();
    assert_eq!(p, app);
    assert!(matches!(d.remove(&id("app")), Err(Error::InUse { .. })));
    d.put(&id("app")).unwrap();
}

#[test]
fn nested_gets_share_one_mount_and_the_last_put_unmounts() {
    if !root_or_skip("nested_gets_share_one_mount_and_the_last_put_unmounts") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = overlay(t.path());
    stack(&d, t.path());
    let ctr = id("ctr");
    let merged = d.get(&ctr, &MountOpts::default()).unwrap();
    assert_eq!(merged, d.inner().layer_dir(&ctr).join("merged"));
    assert_eq!(d.get(&ctr, &MountOpts::default()).unwrap(), merged);
    assert_eq!(mounts_at(&merged), 1, "one mount for two gets");
    assert!(merged.join("app/run").exists());
    assert!(matches!(d.remove(&ctr), Err(Error::InUse { .. })));
    assert!(matches!(
        d.remove(&id("app")),
        Err(Error::HasChildren { .. })
    ));
    let status = d.status();
    assert!(
        status.contains(&("Mounted".to_string(), "1".to_string())),
        "{status:?}"
    );
    assert!(
        status.contains(&("Layers".to_string(), "3".to_string())),
        "{status:?}"
    );
    assert!(
        status
            .iter()
            .any(|(k, v)| k == "Backing Filesystem" && !v.is_empty())
    );
    assert!(status.contains(&("Supports d_type".to_string(), "true".to_string())));
    d.put(&ctr).unwrap();
    assert_eq!(mounts_at(&merged), 1, "still one get outstanding");
    d.put(&ctr).unwrap();
    assert_eq!(mounts_at(&merged), 0, "the last put unmounts");
    d.remove(&ctr).unwrap();
    assert!(!d.exists(&ctr));
}

#[test]
fn a_mount_that_vanished_is_made_again() {
    if !root_or_skip("a_mount_that_vanished_is_made_again") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = overlay(t.path());
    stack(&d, t.path());
    let ctr = id("ctr");
    let merged = d.get(&ctr, &MountOpts::default()).unwrap();
    drivers::mountinfo::unmount(&merged).unwrap();
    assert_eq!(mounts_at(&merged), 0);
    d.get(&ctr, &MountOpts::default()).unwrap();
    assert_eq!(mounts_at(&merged), 1, "the next get remounts");
    assert!(merged.join("etc/passwd").exists());
    d.cleanup().unwrap();
    assert_eq!(mounts_at(&merged), 0, "cleanup unmounts everything");
    assert!(
        d.inner()
            .status()
            .contains(&("Mounted".to_string(), "0".to_string()))
    );
}

#[test]
fn writes_through_the_mount_and_child_of_rw_layer_copies_upper() {
    if !root_or_skip("writes_through_the_mount_and_child_of_rw_layer_copies_upper") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = overlay(t.path());
    stack(&d, t.path());
    let ctr = id("ctr");
    let m = d.get(&ctr, &MountOpts::default()).unwrap();
    fs::remove_file(m.join("etc/passwd")).unwrap();
    fs::remove_dir_all(m.join("app")).unwrap();
    fs::create_dir(m.join("app")).unwrap();
    fs::write(m.join("new"), "n").unwrap();
    d.put(&ctr).unwrap();
    let mut changes: Vec<String> = d
        .changes(&ctr, Some(&id("app")))
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    changes.sort();
    assert!(
        changes.contains(&"D /etc/passwd".to_string()),
        "{changes:?}"
    );
    assert!(changes.contains(&"A /new".to_string()), "{changes:?}");
    // A layer on the rw layer inherits its upper (whiteouts and opaque dirs included).
    d.create_read_write(&id("ctr2"), Some(&ctr)).unwrap();
    let a = d.get(&ctr, &MountOpts::default()).unwrap();
    let b = d.get(&id("ctr2"), &MountOpts::default()).unwrap();
    assert_same_tree(&a, &b, &CompareOptions::default()).unwrap();
    assert!(!b.join("etc/passwd").exists());
    assert!(
        !b.join("app/run").exists(),
        "the opaque directory hides the lower's files"
    );
    d.put(&ctr).unwrap();
    d.put(&id("ctr2")).unwrap();
}

#[test]
fn naive_apply_on_an_overlay_layer_writes_whiteouts() {
    if !root_or_skip("naive_apply_on_an_overlay_layer_writes_whiteouts") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = overlay(t.path());
    stack(&d, t.path());
    let s = t.path().join("s2");
    write_files(&s, &[("etc/.wh.passwd", ""), ("x", "y")]);
    // ctr is a rw layer: the native apply falls back, the naive one writes through the mount.
    d.apply_diff(&id("ctr"), Some(&id("app")), &mut &tar_of(&s)[..])
        .unwrap();
    let upper = d.inner().layer_dir(&id("ctr")).join("upper");
    use std::os::unix::fs::FileTypeExt;
    assert!(
        fs::symlink_metadata(upper.join("etc/passwd"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(
        mounts_at(&d.inner().layer_dir(&id("ctr")).join("merged")),
        0
    );
}

#[test]
fn mount_options_are_probed_and_used() {
    if !root_or_skip("mount_options_are_probed_and_used") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let cfg = OverlayConfig {
        mount_options: Some("noatime_is_not_an_overlay_option".into()),
        ..OverlayConfig::default()
    };
    let d = Overlay::driver(&t.path().join("overlay"), OverlayConfig::default()).unwrap();
    stack(&d, t.path());
    drop(d);
    let bad = Overlay::driver(&t.path().join("overlay"), cfg);
    // Overlay works here, so a failing probe with the user's options is the option's fault:
    // a fatal InvalidOption naming the key, not "not supported" (which selection would skip).
    let err = bad.err().unwrap();
    assert!(!err.is_not_supported(), "{err}");
    assert!(
        matches!(&err, Error::InvalidOption { key, .. } if key == "mount_options"),
        "{err}"
    );
    assert!(
        err.to_string().contains("noatime_is_not_an_overlay_option"),
        "{err}"
    );
    // A good extra option is used.
    let good = OverlayConfig {
        mount_options: Some("redirect_dir=off".into()),
        ..OverlayConfig::default()
    };
    let d = Overlay::driver(&t.path().join("overlay"), good).unwrap();
    let m = d.get(&id("ctr"), &MountOpts::default()).unwrap();
    let line = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.contains(m.to_str().unwrap()))
        .unwrap()
        .to_string();
    d.put(&id("ctr")).unwrap();
    assert!(
        line.contains("redirect_dir=off") || !line.contains("redirect_dir=on"),
        "{line}"
    );
}

#[test]
fn a_home_overlay_cannot_express_is_not_supported() {
    if !root_or_skip("a_home_overlay_cannot_express_is_not_supported") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let err = Overlay::driver(&t.path().join("a,b"), OverlayConfig::default())
        .err()
        .unwrap();
    assert!(err.is_not_supported(), "{err}");
    assert!(err.to_string().contains("','"), "{err}");
}

#[test]
fn hardlink_limit_falls_back_to_copies() {
    if !root_or_skip("hardlink_limit_falls_back_to_copies") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = overlay(t.path());
    let s0 = t.path().join("s0");
    write_files(&s0, &[("f", "shared")]);
    d.create(&id("base"), None).unwrap();
    d.apply_diff(&id("base"), None, &mut &tar_of(&s0)[..])
        .unwrap();
    let f = d.inner().layer_dir(&id("base")).join("root/f");
    // Push the file to the link limit (65000 on ext4): links in a scratch dir, same filesystem.
    let scratch = t.path().join("links");
    fs::create_dir(&scratch).unwrap();
    let mut n = 0u32;
    loop {
        match fs::hard_link(&f, scratch.join(n.to_string())) {
            Ok(()) => n += 1,
            Err(e) if e.raw_os_error() == Some(libc::EMLINK) => break,
            Err(e) => panic!("link: {e}"),
        }
        assert!(n < 200_000, "no link limit found");
    }
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();
    d.create(&id("app"), Some(&id("base"))).unwrap();
    d.apply_diff(&id("app"), Some(&id("base")), &mut &tar_of(&empty)[..])
        .unwrap();
    let g = d.inner().layer_dir(&id("app")).join("root/f");
    assert_ne!(
        fs::metadata(&f).unwrap().ino(),
        fs::metadata(&g).unwrap().ino()
    );
    assert_eq!(fs::read_to_string(&g).unwrap(), "shared");
    fs::remove_dir_all(&scratch).unwrap();
}

/// A `lower-id` replaced by a symlink to a host file (which holds a valid-looking id) is
/// refused by name when the layer is mounted or gets a child; the host file is never read.
#[test]
fn a_planted_lower_id_symlink_is_not_read_through() {
    if !root_or_skip("a_planted_lower_id_symlink_is_not_read_through") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = overlay(t.path());
    stack(&d, t.path());
    let host = t.path().join("host-id");
    fs::write(&host, "base").unwrap();
    let lower_id = d.inner().layer_dir(&id("ctr")).join("lower-id");
    fs::remove_file(&lower_id).unwrap();
    std::os::unix::fs::symlink(&host, &lower_id).unwrap();
    let e = d.get(&id("ctr"), &MountOpts::default()).unwrap_err();
    assert!(e.to_string().contains("lower-id"), "{e}");
    assert!(e.to_string().contains("symlink"), "{e}");
    let e = d
        .create_read_write(&id("ctr2"), Some(&id("ctr")))
        .unwrap_err();
    assert!(e.to_string().contains("lower-id"), "{e}");
    assert_eq!(
        mounts_at(&d.inner().layer_dir(&id("ctr")).join("merged")),
        0
    );
}

/// A layer that is neither an image layer (`root/`) nor a whole overlay layer is refused by
/// name, with what it does hold, and nothing is mounted.
#[test]
fn a_layer_of_neither_shape_is_refused_naming_what_it_holds() {
    if !root_or_skip("a_layer_of_neither_shape_is_refused_naming_what_it_holds") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = overlay(t.path());
    stack(&d, t.path());
    let dir = d.inner().layer_dir(&id("ctr"));
    fs::remove_dir(dir.join("work")).unwrap();
    let e = d.get(&id("ctr"), &MountOpts::default()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(msg.contains("found only upper/ merged/ lower-id"), "{msg}");
    let e = d
        .create_read_write(&id("ctr2"), Some(&id("ctr")))
        .unwrap_err();
    assert!(e.to_string().contains("found only upper/"), "{e}");
    assert_eq!(mounts_at(&dir.join("merged")), 0);
}

/// A mounted layer that lost its `lower-id` does not stop the driver from starting: the
/// mount repair keeps its count while `merged/` is mounted, and the last put unmounts it.
#[test]
fn a_mounted_layer_of_neither_shape_keeps_its_count_across_a_restart() {
    if !root_or_skip("a_mounted_layer_of_neither_shape_keeps_its_count_across_a_restart") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = overlay(t.path());
    stack(&d, t.path());
    let dir = d.inner().layer_dir(&id("ctr"));
    d.get(&id("ctr"), &MountOpts::durable()).unwrap();
    fs::remove_file(dir.join("lower-id")).unwrap();
    drop(d);
    let d = overlay(t.path());
    assert_eq!(mounts_at(&dir.join("merged")), 1);
    d.put(&id("ctr")).unwrap();
    assert_eq!(mounts_at(&dir.join("merged")), 0);
}
