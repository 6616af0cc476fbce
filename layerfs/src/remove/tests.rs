#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use rustix::fs::{Mode, OFlags};

use super::*;

fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd").unwrap().count()
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

/// `levels` nested directories `d/d/…/d` below `root`, each holding a file `f` and a symlink
/// `up` to `..` (made through descriptors: the full path is far beyond `PATH_MAX`).
fn deep_tree(root: &Path, levels: usize) {
    let mut cur = open_root_dir(root).unwrap();
    for i in 0..levels {
        rustix::fs::mkdirat(&cur, c"d", Mode::from_raw_mode(0o755)).unwrap();
        let f = rustix::fs::openat(
            &cur,
            c"f",
            OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        rustix::io::write(&f, format!("{i}").as_bytes()).unwrap();
        rustix::fs::symlinkat(c"..", &cur, c"up").unwrap();
        cur = open_dir_at(cur.as_fd(), c"d").unwrap();
    }
}

#[test]
fn removes_a_10000_level_tree_with_1024_descriptors() {
    limit_fds();
    let t = tempfile::tempdir().unwrap();
    let top = t.path().join("top");
    fs::create_dir(&top).unwrap();
    deep_tree(&top, 10_000);
    let before = open_fds();
    remove_tree(&top).unwrap();
    assert!(fs::symlink_metadata(&top).is_err(), "the tree is gone");
    assert_eq!(open_fds(), before, "no descriptor leaked");
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0);
}

#[test]
fn follows_no_symlink() {
    let t = tempfile::tempdir().unwrap();
    let host = tempfile::tempdir().unwrap();
    fs::write(host.path().join("canary"), "host").unwrap();
    fs::create_dir(host.path().join("sub")).unwrap();
    fs::write(host.path().join("sub/canary2"), "host2").unwrap();
    let top = t.path().join("top");
    fs::create_dir_all(top.join("a/b")).unwrap();
    symlink(host.path(), top.join("to-host")).unwrap();
    symlink(host.path().join("sub"), top.join("a/b/to-sub")).unwrap();
    symlink(host.path().join("canary"), top.join("a/to-canary")).unwrap();
    // The removed name itself a symlink to a host directory: only the link goes.
    let link = t.path().join("link");
    symlink(host.path(), &link).unwrap();
    remove_tree(&link).unwrap();
    assert!(fs::symlink_metadata(&link).is_err());

    remove_tree(&top).unwrap();
    assert!(fs::symlink_metadata(&top).is_err());
    assert_eq!(fs::read(host.path().join("canary")).unwrap(), b"host");
    assert_eq!(fs::read(host.path().join("sub/canary2")).unwrap(), b"host2");
}

#[test]
fn removes_a_single_file_and_reports_a_missing_name() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("f"), "x").unwrap();
    remove_tree(&t.path().join("f")).unwrap();
    assert!(fs::symlink_metadata(t.path().join("f")).is_err());
    let e = remove_tree(&t.path().join("f")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    let e = remove_tree(Path::new("/")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
}

const NOBODY_DIR: &str = "ARCHIVE_REMOVE_TREE_NOBODY_DIR";

/// Directories whose modes keep their owner out, and what it takes to remove each: `000`
/// (cannot open), `0500` (cannot unlink in it), `0600` (cannot search it), `0300` (cannot list
/// it), nested. Run as a normal user — as root the permission checks do not apply, so as root
/// the test re-runs itself as `nobody` (uid 65534).
#[test]
fn removes_mode_000_directories_as_a_normal_user() {
    if let Some(dir) = std::env::var_os(NOBODY_DIR) {
        return locked_out_tree_is_removed(Path::new(&dir));
    }
    if !rustix::process::geteuid().is_root() {
        let t = tempfile::tempdir().unwrap();
        return locked_out_tree_is_removed(t.path());
    }
    let scratch = tempfile::tempdir().unwrap();
    fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let exe = scratch.path().join("remove-tree-test");
    fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let work = scratch.path().join("work");
    fs::create_dir(&work).unwrap();
    std::os::unix::fs::chown(&work, Some(65534), Some(65534)).unwrap();
    let out = Command::new(&exe)
        .args([
            "--exact",
            "remove::tests::removes_mode_000_directories_as_a_normal_user",
            "--nocapture",
        ])
        .env(NOBODY_DIR, &work)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the run as nobody failed:\n{log}");
    assert!(
        log.contains("1 passed"),
        "the inner test did not run:\n{log}"
    );
    assert_eq!(fs::read_dir(&work).unwrap().count(), 0, "the tree is gone");
}

fn locked_out_tree_is_removed(work: &Path) {
    assert!(!rustix::process::geteuid().is_root());
    let top = work.join("top");
    for d in ["a/x/y", "b/x", "c/x", "d/x", "e"] {
        fs::create_dir_all(top.join(d)).unwrap();
        fs::write(top.join(d).join("f"), "data").unwrap();
    }
    fs::write(top.join("a/f"), "data").unwrap();
    symlink("/etc/passwd", top.join("a/x/l")).unwrap();
    let mode = |p: &str, m: u32| {
        fs::set_permissions(top.join(p), fs::Permissions::from_mode(m)).unwrap();
    };
    // Deepest first, or we lock ourselves out while setting up.
    mode("a/x/y", 0o000);
    mode("a/x", 0o000);
    mode("a", 0o000);
    mode("b/x", 0o000);
    mode("b", 0o500);
    mode("c", 0o600);
    mode("d", 0o300);
    mode("e", 0o000);
    // Locked directories deeper than the descriptors a DirStack holds: leaving them reopens
    // their parents through `..`.
    let chain: Vec<String> = (1..=2 * super::super::MAX_HELD_FDS + 5)
        .map(|n| format!("deep/{}", vec!["d"; n].join("/")))
        .collect();
    fs::create_dir_all(top.join(chain.last().unwrap())).unwrap();
    for p in chain.iter().rev() {
        fs::write(top.join(p).join("f"), "data").unwrap();
        mode(p, 0o000);
    }
    mode(".", 0o500);
    // The control: std cannot do it.
    assert!(fs::remove_dir_all(&top).is_err());
    remove_tree(&top).unwrap();
    assert!(fs::symlink_metadata(&top).is_err(), "the tree is gone");
}

/// A directory of another filesystem below the tree (a mount point: a layer's overlay left
/// mounted) is refused, and nothing on it is removed.
#[test]
fn does_not_remove_below_a_mount_point() {
    if !test_support::root_or_skip("mounting a tmpfs needs root") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let top = t.path().join("top");
    let mnt = top.join("a/mnt");
    fs::create_dir_all(&mnt).unwrap();
    rustix::mount::mount(
        c"tmpfs",
        mnt.as_path(),
        c"tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .unwrap();
    fs::write(mnt.join("kept"), "k").unwrap();
    let e = remove_tree(&top).unwrap_err();
    let kept = fs::read(mnt.join("kept"));
    rustix::mount::unmount(mnt.as_path(), rustix::mount::UnmountFlags::DETACH).unwrap();
    assert_eq!(e.raw_os_error(), None, "wrapped: {e}");
    assert!(e.to_string().contains("a/mnt"), "{e}");
    assert!(e.to_string().contains("mount point"), "{e}");
    assert_eq!(kept.unwrap(), b"k");
    remove_tree(&top).unwrap();
}
