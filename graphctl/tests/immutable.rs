//! Committed layers are immutable (issue 14): an apply into an image layer that an apply
//! finished into, or into any layer with children, is refused and changes nothing; a failed
//! apply never removes a layer that existed before it; a fresh read-write layer still takes one.

use crate::util::{Store, layer_tar};

/// A layer tar cut off in the middle of a file's data: the apply fails part-way.
fn truncated_tar() -> Vec<u8> {
    let mut tar = layer_tar(&[("a", b"first\n"), ("big", &[7u8; 4096])]);
    tar.truncate(512 + 512 + 512 + 1000);
    tar
}

/// `base` (applied) with image child `app` (applied) on `s`.
fn two_layers(s: &Store) {
    s.cmd(&["apply", "base", "-"])
        .stdin(layer_tar(&[("etc/hostname", b"one\n")]))
        .ok();
    s.cmd(&["apply", "--parent", "base", "app", "-"])
        .stdin(layer_tar(&[("app/bin", b"run\n")]))
        .ok();
}

driver_test!(apply_into_a_committed_layer_is_refused, |driver| {
    let s = Store::new(driver);
    two_layers(&s);
    let changes = s.ok(&["changes", "app"]);
    for id in ["base", "app"] {
        let err = s
            .cmd(&["apply", id, "-"])
            .stdin(layer_tar(&[("newfile", b"x\n")]))
            .err();
        assert!(
            err.contains(id) && err.contains("committed") && err.contains("--parent"),
            "the refusal names the layer and says what to do: {err}"
        );
    }
    assert_eq!(
        s.ok(&["changes", "app"]),
        changes,
        "the child's changes are unchanged"
    );
    assert_eq!(s.ok(&["ls"]), "app base\nbase -\n");
});

driver_test!(a_failed_apply_keeps_existing_layers, |driver| {
    let s = Store::new(driver);
    two_layers(&s);
    let changes = s.ok(&["changes", "app"]);
    // Onto a layer with children: refused, nothing removed.
    s.cmd(&["apply", "base", "-"]).stdin(truncated_tar()).err();
    assert_eq!(s.ok(&["ls"]), "app base\nbase -\n");
    assert_eq!(s.ok(&["changes", "app"]), changes);
    // Onto an existing, uncommitted layer (created empty by an earlier command, no children):
    // fails part-way, and the layer is still there, without any part of the diff.
    s.ok(&["create", "--parent", "app", "empty"]);
    s.cmd(&["apply", "empty", "-"]).stdin(truncated_tar()).err();
    assert!(s.ok(&["ls"]).contains("empty app\n"), "{}", s.ok(&["ls"]));
    assert_eq!(s.ok(&["changes", "empty"]), "", "all or nothing");
    s.cmd(&["apply", "empty", "-"])
        .stdin(layer_tar(&[("a", b"good\n")]))
        .ok();
    assert_eq!(s.ok(&["changes", "empty"]), "A /a\n");
    // A layer the failed command created itself is gone again.
    s.cmd(&["apply", "--parent", "app", "fresh", "-"])
        .stdin(truncated_tar())
        .err();
    assert!(!s.ok(&["ls"]).contains("fresh"));
    // The parent chain still mounts and unmounts.
    let (_, held) = s.look("app");
    s.unlook(&held);
});

driver_test!(apply_into_a_fresh_read_write_layer_works, |driver| {
    let s = Store::new(driver);
    two_layers(&s);
    s.ok(&["create", "--rw", "--parent", "app", "ctr"]);
    s.cmd(&["apply", "ctr", "-"])
        .stdin(layer_tar(&[("added", b"y\n")]))
        .ok();
    let changes = s.ok(&["changes", "ctr"]);
    assert!(changes.contains("A /added"), "{changes}");
    // Still uncommitted (rw, no children): a second apply is accepted too.
    s.cmd(&["apply", "ctr", "-"])
        .stdin(layer_tar(&[("again", b"z\n")]))
        .ok();
    assert!(s.ok(&["changes", "ctr"]).contains("A /again"));
});

/// Writes `data` to `path` (appending); the OS error number if it failed.
fn append(path: &std::path::Path, data: &[u8]) -> Option<i32> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .err()
        .map(|e| e.raw_os_error().unwrap_or(-1))
}

driver_test!(mount_of_a_committed_layer_is_a_read_only_view, |driver| {
    let s = Store::new(driver);
    two_layers(&s);
    if let Some(reason) = crate::util::skip_root_test() {
        // Without mount privilege no view can be made: refused, never a writable tree.
        let err = s.err(&["mount", "app"]);
        assert!(err.contains("root"), "{err}");
        eprintln!("skipping the rest: {reason}");
        return;
    }
    let base_changes = s.ok(&["changes", "base"]);
    let app_changes = s.ok(&["changes", "app"]);
    for id in ["base", "app"] {
        let path = std::path::PathBuf::from(s.ok(&["mount", id]).trim());
        assert_eq!(
            std::fs::read(path.join("etc/hostname")).unwrap(),
            b"one\n",
            "the view shows the layer's tree"
        );
        for target in ["etc/hostname", "new-file"] {
            assert_eq!(
                append(&path.join(target), b"x\n"),
                Some(libc::EROFS),
                "a write to {target} through the view of {id} fails with EROFS"
            );
        }
        assert_eq!(
            std::fs::remove_file(path.join("etc/hostname"))
                .err()
                .and_then(|e| e.raw_os_error()),
            Some(libc::EROFS)
        );
        // A second mount shares the view; the last unmount takes it down.
        assert_eq!(s.ok(&["mount", id]).trim(), path.to_str().unwrap());
        s.ok(&["unmount", id]);
        assert!(crate::util::is_mount_point(&path), "still held once");
        s.ok(&["unmount", id]);
        assert!(!crate::util::is_mount_point(&path), "the last unmount");
    }
    assert_eq!(s.ok(&["changes", "base"]), base_changes);
    assert_eq!(s.ok(&["changes", "app"]), app_changes);
    let json = s.ok(&["--json", "mount", "app"]);
    assert!(json.contains("\"read_only\": true"), "{json}");
    s.ok(&["unmount", "app"]);
    // A committed layer's view does not stand in the way of removing its child and itself.
    s.ok(&["mount", "app"]);
    s.err(&["rm", "app"]);
    s.ok(&["unmount", "app"]);
    s.ok(&["rm", "app"]);
    s.ok(&["rm", "base"]);
});

driver_test!(mount_rw_of_a_committed_layer_is_refused, |driver| {
    let s = Store::new(driver);
    two_layers(&s);
    // `base` is committed twice over: applied, and it has a child. A plain created layer
    // becomes committed once it has a child.
    s.ok(&["create", "--parent", "app", "empty"]);
    s.ok(&["create", "--rw", "--parent", "empty", "ctr"]);
    for id in ["base", "app", "empty"] {
        let err = s.err(&["mount", "--rw", id]);
        assert!(
            err.contains(id) && err.contains("committed") && err.contains("create --rw --parent"),
            "the refusal names the layer and says what to do: {err}"
        );
        assert!(
            s.ok(&["info", id]).contains("mount_count: 0"),
            "nothing was mounted"
        );
    }
});

driver_test!(writes_in_a_read_write_layer_stay_in_it, |driver| {
    if let Some(reason) = crate::util::skip_root_test() {
        eprintln!("skipping: {reason} (reads the committed parent through a view)");
        return;
    }
    let s = Store::new(driver);
    two_layers(&s);
    s.ok(&["create", "--rw", "--parent", "app", "one"]);
    s.ok(&["create", "--rw", "--parent", "app", "two"]);
    let one = std::path::PathBuf::from(s.ok(&["mount", "--rw", "one"]).trim());
    let two = std::path::PathBuf::from(s.ok(&["mount", "two"]).trim());
    assert!(
        s.ok(&["--json", "mount", "two"])
            .contains("\"read_only\": false")
    );
    s.ok(&["unmount", "two"]);
    assert_eq!(append(&one.join("etc/hostname"), b"changed\n"), None);
    assert_eq!(append(&one.join("only-in-one"), b"1\n"), None);
    assert_eq!(
        std::fs::read(one.join("etc/hostname")).unwrap(),
        b"one\nchanged\n"
    );
    assert_eq!(std::fs::read(two.join("etc/hostname")).unwrap(), b"one\n");
    assert!(
        !two.join("only-in-one").exists(),
        "the sibling does not see it"
    );
    let app = std::path::PathBuf::from(s.ok(&["mount", "app"]).trim());
    assert_eq!(std::fs::read(app.join("etc/hostname")).unwrap(), b"one\n");
    assert!(
        !app.join("only-in-one").exists(),
        "the parent does not see it"
    );
    let changes = s.ok(&["changes", "one"]);
    assert!(
        changes.contains("C /etc/hostname") && changes.contains("A /only-in-one"),
        "{changes}"
    );
    assert_eq!(s.ok(&["changes", "two"]), "");
    for id in ["one", "two", "app"] {
        s.ok(&["unmount", id]);
    }
});

driver_test!(
    an_apply_into_a_used_read_write_layer_is_all_or_nothing,
    |driver| {
        let s = Store::new(driver);
        two_layers(&s);
        s.ok(&["create", "--rw", "--parent", "app", "ctr"]);
        let path = std::path::PathBuf::from(s.ok(&["mount", "ctr"]).trim());
        std::fs::write(path.join("kept"), b"mine\n").unwrap();
        std::fs::remove_file(path.join("etc/hostname")).unwrap();
        std::fs::create_dir(path.join("app/more")).unwrap();
        std::fs::write(path.join("app/more/x"), b"x\n").unwrap();
        s.ok(&["unmount", "ctr"]);
        let before = s.ok(&["changes", "ctr"]);
        assert!(before.contains("D /etc/hostname"), "{before}");
        // A tar that breaks off in the middle: nothing of it shows, nothing of the layer is lost.
        let err = s.cmd(&["apply", "ctr", "-"]).stdin(truncated_tar()).err();
        assert!(err.contains("ctr"), "{err}");
        assert_eq!(s.ok(&["changes", "ctr"]), before);
        let path = std::path::PathBuf::from(s.ok(&["mount", "ctr"]).trim());
        assert_eq!(std::fs::read(path.join("kept")).unwrap(), b"mine\n");
        assert!(!path.join("etc/hostname").exists(), "the deletion stays");
        assert!(!path.join("a").exists(), "no entry of the broken tar");
        s.ok(&["unmount", "ctr"]);
        // A good one goes in whole, on top of what the layer had.
        s.cmd(&["apply", "ctr", "-"])
            .stdin(layer_tar(&[("added", b"y\n"), ("kept", b"theirs\n")]))
            .ok();
        let after = s.ok(&["changes", "ctr"]);
        for line in ["A /added", "A /kept", "D /etc/hostname", "A /app/more"] {
            assert!(after.contains(line), "{line} missing in {after}");
        }
        let path = std::path::PathBuf::from(s.ok(&["mount", "ctr"]).trim());
        assert_eq!(std::fs::read(path.join("kept")).unwrap(), b"theirs\n");
        assert_eq!(std::fs::read(path.join("app/more/x")).unwrap(), b"x\n");
        s.ok(&["unmount", "ctr"]);
        // The parents never changed, and no staged entry is left in the layer.
        assert_eq!(s.ok(&["changes", "app"]), "A /app\nA /app/bin\n");
        let home = s.root.join(driver).join("ctr");
        let staged: Vec<_> = std::fs::read_dir(&home)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("apply-"))
            .collect();
        assert!(staged.is_empty(), "{staged:?}");
    }
);

driver_test!(a_dead_builders_staging_entry_pins_nothing, |driver| {
    let s = Store::new(driver);
    s.ok(&["create", "--rw", "p"]);
    // A builder of child `c` of `p` that died mid-create: its pid is gone, nobody holds the
    // entry's flock.
    let dead = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let entry = s
        .root
        .join(driver)
        .join(".staging")
        .join(format!("new-c-{dead}-0"));
    std::fs::create_dir_all(&entry).unwrap();
    std::fs::write(entry.join("parent"), "p").unwrap();
    // Neither apply nor remove of the parent is held up by it, and it is cleaned away.
    s.cmd(&["apply", "p", "-"])
        .stdin(layer_tar(&[("a", b"1\n")]))
        .ok();
    assert!(!entry.exists(), "the abandoned entry is removed");
    assert_eq!(s.ok(&["changes", "p"]), "A /a\n");
    s.ok(&["rm", "p"]);
    assert_eq!(s.ok(&["ls"]), "");
});

/// Issue 16: with a home path long enough that the overlay mount data passes a page, `mount`
/// and `apply` into a read-write layer fail with an error naming the mount options, and the
/// read-write layer stays (it used to be deleted by the failed apply).
#[test]
fn a_too_long_home_fails_clearly_and_keeps_the_read_write_layer() {
    if let Some(reason) = crate::util::skip_root_test() {
        eprintln!("skipping: {reason}");
        return;
    }
    let base = crate::util::test_tmp();
    let dir = tempfile::tempdir_in(&base).unwrap();
    // A home of 1,250 bytes: the driver's probe (short names) still fits in a page, the
    // mount data of 100-byte layer ids does not.
    let mut root = dir.path().to_path_buf();
    let want = 1250 - "/overlay".len();
    let mut i = 0;
    while root.as_os_str().len() < want {
        let left = want - root.as_os_str().len() - 1;
        root.push(format!(
            "{i}{}",
            "x".repeat(left.min(200).saturating_sub(1))
        ));
        i += 1;
    }
    std::fs::create_dir_all(&root).unwrap();
    let s = Store::at("overlay", root);
    let long = "l".repeat(96);
    s.cmd(&["apply", &long, "-"])
        .stdin(layer_tar(&[("a", b"1\n")]))
        .ok();
    let ctr = format!("{long}-ctr");
    s.ok(&["create", "--rw", "--parent", &long, &ctr]);
    let err = s
        .cmd(&["apply", &ctr, "-"])
        .stdin(layer_tar(&[("b", b"2\n")]))
        .err();
    assert!(err.contains("one page") && err.contains(&ctr), "{err}");
    assert!(s.ok(&["ls"]).contains(&ctr), "the read-write layer is kept");
    // (Nothing that mounts the layer works under such a home; its upper is untouched.)
    let upper = s.root.join("overlay").join(&ctr).join("upper");
    assert_eq!(std::fs::read_dir(&upper).unwrap().count(), 0);
    let err = s.err(&["mount", &ctr]);
    assert!(err.contains("one page"), "{err}");
}

// Issue 16: a crash that emptied one layer's `parent` file must not brick the store: `ls`,
// `tree`, `apply` and `rm` of other layers work (the damaged layer is reported and left out)
// and `rm` removes the damaged layer itself.
driver_test!(one_damaged_layer_does_not_brick_the_store, |driver| {
    let s = Store::new(driver);
    two_layers(&s);
    s.ok(&["create", "--rw", "--parent", "app", "ctr"]);
    std::fs::write(s.root.join(driver).join("ctr").join("parent"), b"").unwrap();
    let out = s.cmd(&["ls"]).output();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "app base\nbase -\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ctr") && stderr.contains("damaged"),
        "{stderr}"
    );
    s.ok(&["tree"]);
    s.cmd(&["apply", "--parent", "app", "more", "-"])
        .stdin(layer_tar(&[("m", b"m\n")]))
        .ok();
    s.ok(&["rm", "more"]);
    s.ok(&["rm", "ctr"]);
    assert!(!s.root.join(driver).join("ctr").exists());
    assert_eq!(s.ok(&["ls"]), "app base\nbase -\n");
});
