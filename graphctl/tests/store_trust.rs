//! The store trusts nothing it did not make, and a killed command leaks no mount reference
//! (issue 12, items 3 and 4), seen through the CLI.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::util::{Store, layer_tar, skip_root_test};

/// A directory outside the store with a file in it, checked unchanged at the end.
fn canary(s: &Store) -> PathBuf {
    let dir = s.scratch("canary");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("file"), "precious").unwrap();
    dir
}

fn assert_canary_intact(dir: &Path) {
    assert_eq!(fs::read_to_string(dir.join("file")).unwrap(), "precious");
    let names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["file"], "something was written into the canary dir");
}

/// Mount points at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = fs::canonicalize(dir).unwrap();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(&dir))
        .map(str::to_string)
        .collect()
}

/// A store of `driver` with an image layer `base` (a tree big enough that `changes` is still
/// comparing when it is killed) and a read-write layer `ctr` on it, on which `graphctl changes`
/// was SIGKILLed while it held its mount reference.
fn store_after_a_killed_changes(driver: &'static str) -> Store {
    let s = Store::new(driver);
    let names: Vec<String> = (0..30)
        .flat_map(|d| {
            std::iter::once(format!("d{d}/")).chain((0..100).map(move |f| format!("d{d}/f{f}")))
        })
        .collect();
    let entries: Vec<(&str, &[u8])> = names
        .iter()
        .map(|n| {
            (
                n.as_str(),
                if n.ends_with('/') {
                    &b""[..]
                } else {
                    &b"x"[..]
                },
            )
        })
        .collect();
    let tar = s.scratch("big.tar");
    fs::write(&tar, layer_tar(&entries)).unwrap();
    s.ok(&["apply", "base", tar.to_str().unwrap()]);
    s.ok(&["create", "--rw", "--parent", "base", "ctr"]);
    let refs = s.root.join(driver).join(".mounts").join(".refs-ctr");
    let holds_a_reference = || {
        fs::read_dir(&refs).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("ref-"))
        })
    };
    // Kill `changes` while it holds its reference (seen as its holder file); a run that ends
    // before we see it is retried.
    let mut killed_holding = false;
    for _ in 0..20 {
        // overlay2 answers `changes` against the parent from diff/ alone, without a get; its
        // reader that holds a mount reference is `export` (the whole merged tree).
        let reader: &[&str] = if driver == "overlay2" {
            &["export", "ctr"]
        } else {
            &["changes", "ctr"]
        };
        let mut cmd = s.cmd(reader).cmd;
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let seen = loop {
            if holds_a_reference() {
                break true;
            }
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            std::thread::yield_now();
        };
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        if seen && status.code().is_none() {
            killed_holding = true;
            break;
        }
    }
    assert!(
        killed_holding,
        "never caught `changes` holding its reference"
    );
    assert!(
        holds_a_reference(),
        "the dead holder's file is left for reclaiming"
    );
    if driver == "overlay" {
        let merged = s.root.join(driver).join("ctr").join("merged");
        assert!(
            mounts_under(&s.root).contains(&merged.display().to_string()),
            "the killed reader's mount is left behind"
        );
    }
    s
}

driver_test!(rm_works_after_a_killed_changes, |driver| {
    let s = store_after_a_killed_changes(driver);
    // Its reference died with it: the layers can be removed, and nothing stays mounted.
    s.ok(&["rm", "ctr"]);
    s.ok(&["rm", "base"]);
    assert_eq!(s.ok(&["ls"]).trim(), "");
    assert!(
        mounts_under(&s.root).is_empty(),
        "{:?}",
        mounts_under(&s.root)
    );
});

driver_test!(cleanup_unmounts_what_a_killed_changes_left, |driver| {
    let s = store_after_a_killed_changes(driver);
    s.ok(&["cleanup"]);
    assert!(
        mounts_under(&s.root).is_empty(),
        "{:?}",
        mounts_under(&s.root)
    );
    // And the layer can be got, put and applied to again.
    s.ok(&["mount", "ctr"]);
    s.ok(&["unmount", "ctr"]);
    let tar = s.scratch("more.tar");
    fs::write(&tar, layer_tar(&[("new", b"n")])).unwrap();
    s.ok(&["apply", "ctr", tar.to_str().unwrap()]);
    assert!(
        mounts_under(&s.root).is_empty(),
        "{:?}",
        mounts_under(&s.root)
    );
    s.ok(&["rm", "ctr"]);
});

driver_test!(graphctl_mount_is_durable_until_unmount, |driver| {
    let s = Store::new(driver);
    let tar = s.scratch("a.tar");
    fs::write(&tar, layer_tar(&[("a", b"a")])).unwrap();
    s.ok(&["apply", "base", tar.to_str().unwrap()]);
    s.ok(&["create", "--rw", "--parent", "base", "ctr"]);
    // `mount` takes a durable reference: it outlives graphctl, and `unmount` releases it.
    let path = PathBuf::from(s.ok(&["mount", "ctr"]).trim());
    assert!(path.join("a").exists());
    assert!(s.err(&["rm", "ctr"]).contains("in use"));
    s.ok(&["unmount", "ctr"]);
    assert!(
        mounts_under(&s.root).is_empty(),
        "{:?}",
        mounts_under(&s.root)
    );
    s.ok(&["rm", "ctr"]);
});

#[test]
fn a_root_other_users_can_write_is_refused_and_their_links_are_not_followed() {
    if let Some(reason) = skip_root_test() {
        eprintln!("skipping: {reason}");
        return;
    }
    // A folder every user can reach (the checkout may sit under a 0700 directory such as
    // /root), so that the planting user really reaches the root.
    let reachable = tempfile::Builder::new()
        .prefix("graphctl-trust-")
        .tempdir_in("/var/tmp")
        .unwrap();
    fs::set_permissions(reachable.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let s = Store::at("vfs", reachable.path().join("root"));
    let canary = canary(&s);
    fs::create_dir(&s.root).unwrap();
    fs::set_permissions(&s.root, fs::Permissions::from_mode(0o1777)).unwrap();
    // An unprivileged user plants the driver home as a link to a directory of root's.
    let home = s.root.join("vfs");
    let st = std::process::Command::new("/bin/ln")
        .arg("-s")
        .arg(&canary)
        .arg(&home)
        .uid(65534)
        .gid(65534)
        .status()
        .unwrap();
    assert!(st.success());
    let err = s.err(&["ls"]);
    assert!(err.contains(&s.root.display().to_string()), "{err}");
    assert!(
        err.contains("writable by group/others (mode 1777)"),
        "{err}"
    );
    // The root made private again, the link is still refused, not followed.
    fs::set_permissions(&s.root, fs::Permissions::from_mode(0o755)).unwrap();
    let err = s.err(&["ls"]);
    assert!(err.contains(&home.display().to_string()), "{err}");
    assert!(
        err.contains("expected a directory, found a symlink"),
        "{err}"
    );
    assert_canary_intact(&canary);
    fs::remove_file(&home).unwrap();
    s.ok(&["ls"]);
}

driver_test!(
    a_planted_root_symlink_is_refused_by_apply_get_and_create,
    |driver| {
        let s = Store::new(driver);
        let canary = canary(&s);
        s.ok(&["create", "base"]);
        // The layer's tree: `root/` on vfs and overlay, `diff/` on overlay2.
        let tree = if driver == "overlay2" { "diff" } else { "root" };
        let root = s.root.join(driver).join("base").join(tree);
        fs::remove_dir(&root).unwrap();
        std::os::unix::fs::symlink(&canary, &root).unwrap();
        let tar = s.scratch("a.tar");
        fs::write(&tar, layer_tar(&[("planted", b"x")])).unwrap();
        let refused = |err: String| {
            assert!(err.contains(&root.display().to_string()), "{err}");
            assert!(
                err.contains("expected a directory, found a symlink"),
                "{err}"
            );
        };
        refused(s.err(&["mount", "base"]));
        refused(s.err(&["create", "--parent", "base", "child"]));
        refused(s.err(&["apply", "base", tar.to_str().unwrap()]));
        assert_canary_intact(&canary);
    }
);
