//! The reflink driver passes the whole conformance suite, and is selectable from a config file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use reflink_driver as _;

graphdriver::conformance_tests!(driver = "reflink", deep_layers = 32);

#[test]
fn selectable_by_name_from_toml() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "[storage]\ndriver = \"reflink\"\nroot = {:?}\n[storage.options.reflink]\nsync = true\n",
        tmp.path().display().to_string()
    );
    let config =
        graphdriver::Config::from_toml(&text, std::path::Path::new("storage.toml")).unwrap();
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
