//! One driver per root: a driver named by `--driver`, `GRAPHDRIVER` or `driver =` in the config
//! that is not the one whose layers are under the root is refused, naming both and the root.

use crate::util::{Store, layer_tar};

/// `s` (driver `owner`, with a layer `base` made by `apply`) refuses `other` named each of the
/// three ways, leaves no home for it, and keeps working with `owner`.
fn refuses_the_other_driver(owner: &'static str, other: &'static str) {
    let s = Store::new(owner);
    s.cmd(&["apply", "base", "-"])
        .stdin(layer_tar(&[("etc/hostname", b"one\n")]))
        .ok();
    let root = s.root.display().to_string();
    let named_both = |msg: &str| {
        assert!(
            msg.contains(owner) && msg.contains(other) && msg.contains(&root),
            "the error names both drivers and the root: {msg}"
        );
    };

    // --driver OTHER
    named_both(&s.cmd_auto(&["--driver", other, "ls"]).err());
    // GRAPHDRIVER=OTHER
    let mut c = s.cmd_auto(&["ls"]);
    c.cmd.env("GRAPHDRIVER", other);
    named_both(&c.err());
    // driver = "OTHER" in the config file
    let conf = s.scratch("storage.toml");
    std::fs::write(&conf, format!("[storage]\ndriver = \"{other}\"\n")).unwrap();
    let mut c = s.cmd_auto(&["ls"]);
    c.cmd.env("GRAPHCTL_CONFIG", &conf);
    named_both(&c.err());
    // A refused import creates nothing: no second store beside the first.
    s.cmd_auto(&["--driver", other, "apply", "second", "-"])
        .stdin(layer_tar(&[("f", b"x")]))
        .err();
    assert!(
        !s.root.join(other).exists(),
        "no home was made for the refused driver"
    );

    // The owner still works, named or selected by prior state.
    assert_eq!(s.ok(&["ls"]), "base -\n");
    assert_eq!(s.cmd_auto(&["ls"]).ok(), "base -\n");
    let mut c = s.cmd_auto(&["ls"]);
    c.cmd.env("GRAPHDRIVER", owner);
    assert_eq!(c.ok(), "base -\n");
}

driver_test!(another_driver_is_refused_on_a_root_with_layers, |driver| {
    let other = if driver == "vfs" { "overlay" } else { "vfs" };
    refuses_the_other_driver(driver, other);
});

driver_test!(an_empty_root_accepts_the_driver, |driver| {
    let s = Store::new(driver);
    // The other driver's home exists but holds no layer (a layer made and removed again).
    let other = if driver == "vfs" { "overlay" } else { "vfs" };
    if other == "vfs" || crate::util::skip_root_test().is_none() {
        let o = Store::at(other, s.root.clone());
        o.ok(&["create", "gone"]);
        o.ok(&["rm", "gone"]);
    }
    s.ok(&["create", "base"]);
    assert_eq!(s.ok(&["ls"]), "base -\n");
    let mut c = s.cmd_auto(&["ls"]);
    c.cmd.env("GRAPHDRIVER", driver);
    assert_eq!(c.ok(), "base -\n");
});
