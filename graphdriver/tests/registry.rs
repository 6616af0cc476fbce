//! Registration and selection, through the real `inventory` registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::DirDriver;
use graphdriver::{Config, Driver, DriverOptions, Error, LayerId, Result, SelectedBy};

fn init_alpha(home: &Path, opts: &DriverOptions) -> Result<Box<dyn Driver>> {
    DirDriver::init("t-alpha", home, opts)
}
fn init_beta(home: &Path, opts: &DriverOptions) -> Result<Box<dyn Driver>> {
    DirDriver::init("t-beta", home, opts)
}
fn init_never(_home: &Path, _opts: &DriverOptions) -> Result<Box<dyn Driver>> {
    Err(Error::NotSupported {
        driver: "t-never".into(),
        reason: "the test kernel lacks frobfs".into(),
    })
}
fn init_broken(_home: &Path, _opts: &DriverOptions) -> Result<Box<dyn Driver>> {
    Err(Error::io(
        "open",
        "/dev/broken",
        std::io::Error::other("injected failure"),
    ))
}

graphdriver::register_driver!("t-alpha", init_alpha);
graphdriver::register_driver!("t-beta", init_beta);
graphdriver::register_driver!("t-never", init_never);
graphdriver::register_driver!("t-broken", init_broken);

fn config(root: &Path, priority: &[&str]) -> Config {
    Config {
        driver_priority: priority.iter().map(|s| s.to_string()).collect(),
        ..Config::new(root)
    }
}

#[test]
fn registered_lists_every_registration() {
    let names = graphdriver::registered();
    for n in ["t-alpha", "t-beta", "t-never", "t-broken"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    assert!(graphdriver::registrations().is_ok());
}

#[test]
fn unknown_driver_says_how_to_link_it() {
    let err = graphdriver::lookup("zfs").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::UnknownDriver { .. }));
    assert!(msg.contains("\"zfs\"") && msg.contains("t-alpha"), "{msg}");
    assert!(msg.contains("use drivers as _;"), "{msg}");
}

#[test]
fn explicit_name_wins() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &["t-alpha"]);
    c.driver = Some("t-beta".into());
    let s = graphdriver::open(&c).unwrap();
    assert_eq!(s.name, "t-beta");
    assert_eq!(s.selected_by, SelectedBy::Name);
    assert_eq!(s.home, dir.path().join("t-beta"));
    assert_eq!(s.driver.name(), "t-beta");
}

#[test]
fn explicit_unsupported_driver_is_an_error_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[]);
    c.driver = Some("t-never".into());
    let msg = graphdriver::open(&c).unwrap_err().to_string();
    assert!(msg.contains("frobfs"), "{msg}");
}

#[test]
fn priority_skips_unsupported_and_keeps_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), &["t-missing", "t-never", "t-alpha", "t-beta"]);
    let s = graphdriver::open(&c).unwrap();
    assert_eq!(s.name, "t-alpha");
    assert_eq!(s.selected_by, SelectedBy::Priority);
    assert_eq!(s.skipped.len(), 2);
    assert_eq!(s.skipped[0].0, "t-missing");
    assert!(s.skipped[0].1.contains("not registered"));
    assert_eq!(s.skipped[1].0, "t-never");
    assert!(s.skipped[1].1.contains("frobfs"));
    assert!(
        !dir.path().join("t-never").exists(),
        "no empty home is left for a skipped driver"
    );
}

#[test]
fn no_usable_driver_lists_every_reason() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), &["t-never", "t-missing"]);
    let err = graphdriver::open(&c).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::NoUsableDriver { .. }));
    assert!(msg.contains("t-never") && msg.contains("frobfs"), "{msg}");
    assert!(
        msg.contains("t-missing") && msg.contains("not registered"),
        "{msg}"
    );
}

#[test]
fn a_fatal_init_error_stops_selection() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), &["t-broken", "t-alpha"]);
    let msg = graphdriver::open(&c).unwrap_err().to_string();
    assert!(msg.contains("/dev/broken"), "{msg}");
}

#[test]
fn prior_state_beats_priority_and_an_empty_home_does_not_count() {
    let dir = tempfile::tempdir().unwrap();
    // An earlier run used t-beta and left a layer.
    let mut first = config(dir.path(), &[]);
    first.driver = Some("t-beta".into());
    let s = graphdriver::open(&first).unwrap();
    s.driver
        .create(&LayerId::new("base").unwrap(), None)
        .unwrap();
    // t-alpha has a home with only bookkeeping in it.
    std::fs::create_dir_all(dir.path().join("t-alpha/.staging")).unwrap();
    let c = config(dir.path(), &["t-alpha", "t-beta"]);
    let s = graphdriver::open(&c).unwrap();
    assert_eq!(s.name, "t-beta");
    assert_eq!(s.selected_by, SelectedBy::PriorState);
}

#[test]
fn two_prior_states_ask_the_user_to_choose() {
    let dir = tempfile::tempdir().unwrap();
    // Left by an older version that let a second driver start beside the first one.
    for name in ["t-alpha", "t-beta"] {
        std::fs::create_dir_all(dir.path().join(name).join("l")).unwrap();
    }
    let err = graphdriver::open(&config(dir.path(), &["t-alpha"])).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::AmbiguousPriorState { .. }));
    assert!(
        msg.contains("t-alpha, t-beta") && msg.contains("--driver"),
        "{msg}"
    );
}

#[test]
fn naming_one_of_two_prior_states_chooses_it() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["t-alpha", "t-beta"] {
        std::fs::create_dir_all(dir.path().join(name).join("l")).unwrap();
    }
    let mut c = config(dir.path(), &[]);
    c.driver = Some("t-beta".into());
    assert_eq!(graphdriver::open(&c).unwrap().name, "t-beta");
}

/// A root with t-alpha's layer `base` in it.
fn alpha_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[]);
    c.driver = Some("t-alpha".into());
    let s = graphdriver::open(&c).unwrap();
    s.driver
        .create(&LayerId::new("base").unwrap(), None)
        .unwrap();
    dir
}

#[test]
fn a_named_driver_other_than_the_one_under_the_root_is_refused() {
    let dir = alpha_root();
    let mut c = config(dir.path(), &["t-beta"]);
    c.driver = Some("t-beta".into());
    let err = graphdriver::open(&c).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, Error::DriverMismatch { requested, found, .. }
            if requested == "t-beta" && found == &["t-alpha".to_string()]),
        "{err:?}"
    );
    assert!(
        msg.contains("t-alpha")
            && msg.contains("t-beta")
            && msg.contains(&dir.path().display().to_string()),
        "{msg}"
    );
    assert!(
        !dir.path().join("t-beta").exists(),
        "a refused driver gets no home"
    );
    // The driver that owns the layers is still accepted, named or not.
    c.driver = Some("t-alpha".into());
    assert_eq!(graphdriver::open(&c).unwrap().name, "t-alpha");
    c.driver = None;
    let s = graphdriver::open(&c).unwrap();
    assert_eq!(
        (s.name.as_str(), s.selected_by),
        ("t-alpha", SelectedBy::PriorState)
    );
}

#[test]
fn a_root_without_layers_accepts_any_named_driver() {
    let dir = tempfile::tempdir().unwrap();
    // Homes with nothing but bookkeeping, stray files or a planted link are not layers.
    std::fs::create_dir_all(dir.path().join("t-alpha/.staging/new-x-1-1")).unwrap();
    std::fs::create_dir_all(dir.path().join("t-alpha/.mounts")).unwrap();
    std::fs::write(dir.path().join("t-alpha/.lock"), "").unwrap();
    std::fs::write(dir.path().join("t-alpha/stray"), "").unwrap();
    std::os::unix::fs::symlink("/", dir.path().join("t-alpha/link")).unwrap();
    std::fs::create_dir_all(dir.path().join("t-alpha/not a layer id")).unwrap();
    assert_eq!(
        graphdriver::prior_state(dir.path()).unwrap(),
        Vec::<String>::new()
    );
    for name in ["t-beta", "t-alpha"] {
        let mut c = config(dir.path(), &[]);
        c.driver = Some(name.into());
        assert_eq!(graphdriver::open(&c).unwrap().name, name);
    }
}

#[test]
fn a_home_emptied_by_removing_its_layers_no_longer_binds_the_root() {
    let dir = alpha_root();
    let mut c = config(dir.path(), &[]);
    c.driver = Some("t-alpha".into());
    let s = graphdriver::open(&c).unwrap();
    s.driver.remove(&LayerId::new("base").unwrap()).unwrap();
    drop(s);
    c.driver = Some("t-beta".into());
    assert_eq!(graphdriver::open(&c).unwrap().name, "t-beta");
}

#[test]
fn unknown_option_names_key_and_origin() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[]);
    c.driver = Some("t-alpha".into());
    c.add_option("t-alpha.flavor=x", "command line").unwrap();
    let msg = graphdriver::open(&c).unwrap_err().to_string();
    assert!(
        msg.contains("\"flavor\"") && msg.contains("command line"),
        "{msg}"
    );
    assert!(
        msg.contains("flavour"),
        "the message lists the known keys: {msg}"
    );
}

#[test]
fn options_scoped_to_another_driver_are_not_passed() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[]);
    c.driver = Some("t-alpha".into());
    c.add_option("t-beta.whatever=1", "command line").unwrap();
    c.add_option("flavour=mint", "command line").unwrap();
    assert!(graphdriver::open(&c).is_ok());
}
