//! Without root, the confined apply enters a user namespace instead of failing; owners become
//! the caller's. Run as root, this test re-runs itself as `nobody` (uid 65534) to check that.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;

const INNER: &str = "CHROOTARCHIVE_ROOTLESS_INNER";

#[test]
fn rootless_apply_uses_a_user_namespace() {
    if let Some(dir) = std::env::var_os(INNER) {
        inner(std::path::Path::new(&dir));
        return;
    }
    if !common::need_root("rootless_apply_uses_a_user_namespace") {
        return;
    }
    // A copy of this test binary that `nobody` may execute, and a target directory it owns.
    let scratch = tempfile::tempdir().unwrap();
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = scratch.path().join("rootless-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = scratch.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::chown(&target, Some(65534), Some(65534)).unwrap();

    let out = Command::new(&exe)
        .args([
            "--exact",
            "rootless_apply_uses_a_user_namespace",
            "--nocapture",
        ])
        .env(INNER, &target)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "inner run as nobody failed:\n{log}");
    assert!(
        log.contains("1 passed"),
        "the inner test did not run:\n{log}"
    );
    // What the unprivileged apply wrote is owned by the unprivileged caller.
    let meta = std::fs::metadata(target.join("etc/motd")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    assert_eq!(std::fs::read(target.join("etc/motd")).unwrap(), b"hello");
}

fn inner(target: &std::path::Path) {
    assert_ne!(
        nix::unistd::geteuid().as_raw(),
        0,
        "the inner run must not be root"
    );
    // Entries owned by root in the tar: a rootless apply cannot keep them and must not fail.
    let tar = common::tar_of(&[
        common::dir("etc/"),
        common::file("etc/motd", b"hello"),
        common::symlink("etc/link", "motd"),
    ]);
    let bytes = chrootarchive::apply_layer(target, &tar[..], &archive::ApplyOptions::default())
        .unwrap_or_else(|e| panic!("rootless apply failed: {e}"));
    assert_eq!(bytes, 5);
    assert_eq!(
        std::fs::read_link(target.join("etc/link")).unwrap(),
        std::path::Path::new("motd")
    );
    devices_are_skipped_and_reported(target);
    mode_000_directories_are_removed(target);
}

/// A tar with a char device, a block device, a char 0/0 (a whiteout) and files.
fn device_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, kind: tar::EntryType, dev: (u32, u32), data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        h.set_device_major(dev.0).unwrap();
        h.set_device_minor(dev.1).unwrap();
        b.append_data(&mut h, name, data).unwrap();
    };
    add("dev/", tar::EntryType::Directory, (0, 0), b"");
    add("dev/null", tar::EntryType::Char, (1, 3), b"");
    add("dev/loop0", tar::EntryType::Block, (7, 0), b"");
    add("etc/link", tar::EntryType::Char, (0, 0), b"");
    add("dev/after", tar::EntryType::Regular, (0, 0), b"applied");
    b.into_inner().unwrap()
}

/// As a normal user (confined in a user namespace, and in process) device nodes are skipped,
/// each named with the reason, and the rest of the layer is applied; a char 0/0 is a whiteout.
fn devices_are_skipped_and_reported(target: &std::path::Path) {
    let layer = device_layer();
    let report =
        chrootarchive::apply_layer_report(target, &layer[..], &archive::ApplyOptions::default())
            .unwrap_or_else(|e| panic!("rootless apply of devices failed: {e}"));
    assert_eq!(report.bytes, 7);
    let paths: Vec<_> = report.skipped.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(
        paths,
        [
            std::path::PathBuf::from("dev/null"),
            std::path::PathBuf::from("dev/loop0")
        ]
    );
    assert_eq!(report.skipped_count, 2);
    assert!(
        report.skipped[0].1.contains("char device 1/3"),
        "{}",
        report.skipped[0].1
    );
    assert!(report.skipped[1].1.contains("block device 7/0"));
    assert_eq!(std::fs::read(target.join("dev/after")).unwrap(), b"applied");
    assert!(target.join("dev/null").symlink_metadata().is_err());
    // The char 0/0 whited out the file of the first layer.
    assert!(target.join("etc/link").symlink_metadata().is_err());

    // The byte-count API leaves them for `take_skipped` (what graphctl prints).
    let _ = archive::take_skipped();
    chrootarchive::apply_layer(target, &layer[..], &archive::ApplyOptions::default()).unwrap();
    let (skipped, count) = archive::take_skipped();
    assert_eq!((skipped.len(), count), (2, 2));
    assert_eq!(archive::take_skipped().1, 0);

    // In process, as the unprivileged user itself.
    let plain = tempfile::tempdir_in(target).unwrap_or_else(|e| {
        let m = std::fs::metadata(target).unwrap();
        panic!(
            "tempdir in {} (mode {:o}, uid {}): {e}",
            target.display(),
            m.mode(),
            m.uid()
        )
    });
    let mut opts = archive::ApplyOptions::default();
    opts.same_owner = false;
    let report = archive::apply_layer_report(plain.path(), &layer[..], &opts).unwrap();
    assert_eq!(report.skipped.len(), 2);
    assert_eq!(
        std::fs::read(plain.path().join("dev/after")).unwrap(),
        b"applied"
    );
}

/// `remove_tree_at` removes directories a normal user may not read, write or search.
fn mode_000_directories_are_removed(target: &std::path::Path) {
    let top = target.join("locked");
    std::fs::create_dir_all(top.join("a/b/c")).unwrap();
    std::fs::write(top.join("a/b/c/f"), b"x").unwrap();
    std::fs::write(top.join("a/f"), b"x").unwrap();
    for (p, mode) in [("a/b/c", 0o000), ("a/b", 0o500), ("a", 0o000)] {
        std::fs::set_permissions(top.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o000)).unwrap();
    let dir = std::fs::File::open(target).unwrap();
    use std::os::fd::AsFd;
    archive::fs::remove_tree_at(dir.as_fd(), c"locked")
        .unwrap_or_else(|e| panic!("remove_tree_at of mode-000 directories as nobody: {e}"));
    assert!(top.symlink_metadata().is_err());
}
