//! The guard test: linking `drivers` registers both drivers, and `graphdriver::open` finds them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use drivers as _;

#[test]
fn overlay_and_vfs_are_registered() {
    let names = graphdriver::registered();
    assert!(names.contains(&"overlay"), "{names:?}");
    assert!(names.contains(&"vfs"), "{names:?}");
    graphdriver::registrations().unwrap();
}

#[test]
fn open_vfs_by_name_works_and_rejects_unknown_options() {
    let t = tempfile::tempdir().unwrap();
    let mut config = graphdriver::Config {
        driver: Some("vfs".into()),
        ..graphdriver::Config::new(t.path().join("root"))
    };
    let selected = graphdriver::open(&config).unwrap();
    assert_eq!(selected.driver.name(), "vfs");
    assert_eq!(selected.driver.home(), t.path().join("root/vfs"));
    drop(selected);
    config.add_option("vfs.sync=true", "test").unwrap();
    graphdriver::open(&config).unwrap();
    config.add_option("vfs.frob=1", "test").unwrap();
    let err = graphdriver::open(&config).err().unwrap();
    assert!(err.to_string().contains("frob"), "{err}");
}
