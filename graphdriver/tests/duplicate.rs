//! Two registrations of one name are reported, never silently shadowed. This lives in its own
//! test binary because the duplicate would break every other registry test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use graphdriver::{Driver, DriverOptions, Error, Result};

fn init_one(home: &Path, opts: &DriverOptions) -> Result<Box<dyn Driver>> {
    common::DirDriver::init("twice", home, opts)
}
fn init_two(home: &Path, opts: &DriverOptions) -> Result<Box<dyn Driver>> {
    common::DirDriver::init("twice", home, opts)
}

mod first {
    graphdriver::register_driver!("twice", super::init_one);
}
mod second {
    graphdriver::register_driver!("twice", super::init_two);
}

#[test]
fn duplicate_registration_is_an_error() {
    let err = graphdriver::registrations().unwrap_err();
    match &err {
        Error::DuplicateDriver {
            name,
            first,
            second,
        } => {
            assert_eq!(name, "twice");
            assert!(first.ends_with("::first"), "{first}");
            assert!(second.ends_with("::second"), "{second}");
        }
        other => panic!("expected DuplicateDriver, found {other:?}"),
    }
    assert!(graphdriver::lookup("twice").is_err());
    assert_eq!(graphdriver::registered(), vec!["twice"]);
}
