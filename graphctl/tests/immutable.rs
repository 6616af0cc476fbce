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
    // Onto an existing, uncommitted layer (created empty, no children): fails part-way, and the
    // layer is still there.
    s.ok(&["create", "--parent", "app", "empty"]);
    s.cmd(&["apply", "empty", "-"]).stdin(truncated_tar()).err();
    assert!(s.ok(&["ls"]).contains("empty app\n"), "{}", s.ok(&["ls"]));
    // A layer the failed command created itself is gone again.
    s.cmd(&["apply", "--parent", "app", "fresh", "-"])
        .stdin(truncated_tar())
        .err();
    assert!(!s.ok(&["ls"]).contains("fresh"));
    // The parent chain still mounts and unmounts.
    s.ok(&["mount", "app"]);
    s.ok(&["unmount", "app"]);
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
