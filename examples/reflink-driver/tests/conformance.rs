//! The reflink driver passes the whole conformance suite, and is selectable from a config file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The driver with `copy_fallback = true`, so the suite runs on every filesystem: cloning where
/// it can (XFS, btrfs: CI's filesystem matrix), copying elsewhere.
fn init(home: &std::path::Path) -> graphdriver::Result<Box<dyn graphdriver::Driver>> {
    let text = "[storage]\n[storage.options.reflink]\ncopy_fallback = true\n";
    let config = graphdriver::Config::from_toml(
        graphdriver::Config::new(home),
        text,
        std::path::Path::new("test.toml"),
    )?;
    reflink_driver::init(home, &config.options_for("reflink"))
}

graphdriver_conformance::conformance_tests!(init, deep_layers = 32);

#[test]
fn selectable_by_name_from_toml() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "[storage]\ndriver = \"reflink\"\nroot = {:?}\n[storage.options.reflink]\nsync = true\ncopy_fallback = true\n",
        tmp.path().display().to_string()
    );
    let config = graphdriver::Config::from_toml(
        graphdriver::Config::new(tmp.path()),
        &text,
        std::path::Path::new("storage.toml"),
    )
    .unwrap();
    let selected = graphdriver::open(&config).unwrap();
    assert_eq!(selected.name, "reflink");
    assert_eq!(selected.driver.name(), "reflink");
    assert_eq!(selected.home, tmp.path().join("reflink"));
    let id = graphdriver::LayerId::new("l1").unwrap();
    selected.driver.create(&id, None).unwrap();
    assert!(selected.driver.exists(&id));
    let status = selected.driver.status();
    assert!(
        status.iter().any(|(k, _)| k == "files cloned"),
        "{status:?}"
    );
}
