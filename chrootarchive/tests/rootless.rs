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
}
